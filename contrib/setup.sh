#!/usr/bin/env bash
# Install everything cdpfs and its tests need on a fresh Debian machine (as root):
# FUSE 3, build tools for pyfuse3, the applications the test suite runs on a
# mount, and a virtualenv in .venv holding cdpfs itself. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
      sqlite3 git rsync tar xz-utils attr util-linux postgresql stress-ng tzdata curl
      fio        # bench/run.py: random 4 KiB I/O rows
      libarchive-tools  # bsdtar: the export tests restore archives with it and GNU tar
      iproute2   # ip netns: replication tests between network namespaces
      etcd-server  # high availability: leases on a real 3-member etcd cluster
      prometheus  # the node API's metrics, scraped by a real Prometheus (and promtool)
      chromium)  # the web console, driven by Playwright in headless Chromium
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A real (not editable) install: what users get, and what import-linter can read.
.venv/bin/python -m pip install -q --force-reinstall --no-deps . >/dev/null
.venv/bin/python -m pip install -q '.[test]'
echo "setup: ready (.venv/bin/cdpfs)"
