"""The systemd units in contrib/, started as systemd would start them.

Each unit's ``ExecStart`` is read from the file, its ``EnvironmentFile`` written
as an operator would and its variables expanded as systemd does (``${VAR}`` one
word, ``$VAR`` split on blanks, ``%i`` the instance), with the installed
``cdpfs`` in place of ``/usr/local/bin/cdpfs``. Each then serves (its API
answers), and its ``KillSignal`` stops it with exit status 0 and nothing left
behind: the mount unmounted with what was written committed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import etcdcluster
import httpx
import pytest
from hacluster import HaNodes
from harness import (
    CLI,
    Procs,
    can_mount,
    cdpfs,
    force_unmount,
    free_port,
    pair_stores,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs /dev/fuse and CAP_SYS_ADMIN")

CONTRIB = Path(__file__).parent.parent / "contrib"


def _unit(name: str) -> dict[str, str]:
    service: dict[str, str] = {}
    section = ""
    for line in (CONTRIB / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            service[key] = value
    return service


def _command(unit: dict[str, str], instance: str, env: dict[str, str]) -> list[str]:
    """``ExecStart`` as systemd expands it."""
    words = []
    for word in shlex.split(unit["ExecStart"].replace("%i", instance)):
        whole = re.fullmatch(r"\$\{(\w+)\}", word)
        split = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words.append(env.get(whole[1], ""))
        elif split:
            words += env.get(split[1], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word))
    assert words[0] == "/usr/local/bin/cdpfs"
    return [*CLI, *words[1:]]


def _environment(unit: dict[str, str], instance: str, tmp_path: Path,
                 settings: dict[str, str]) -> dict[str, str]:
    """Write the unit's environment file (under tmp_path) and read it back."""
    path = tmp_path / Path(unit["EnvironmentFile"].replace("%i", instance)).name
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


class Started:
    def __init__(self, unit: str, instance: str, tmp_path: Path, procs: Procs,
                 settings: dict[str, str], env: dict[str, str] | None = None) -> None:
        self.unit = _unit(unit)
        values = _environment(self.unit, instance, tmp_path, settings)
        self.log = tmp_path / f"{unit}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(_command(self.unit, instance, values),
                                         env={**(env or os.environ), **values},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        procs.all.append(self.proc)

    def stop(self) -> int | None:
        return stop_process(self.proc, getattr(signal, self.unit["KillSignal"]))


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_mount_replica_and_console_units(tmp_path: Path, procs: Procs) -> None:
    store, mnt, replica = tmp_path / "vol.store", tmp_path / "vol.mnt", tmp_path / "r.store"
    mnt.mkdir()
    cdpfs("init", store)
    pair_stores(store, replica)  # the replica server's TLS identity, trusted both ways
    papi, rapi = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    try:
        serve = Started("cdpfs-replica@.service", "r", tmp_path, procs, {
            "CDPFS_STORE": str(replica), "CDPFS_LISTEN": f"127.0.0.1:{free_port()}",
            "CDPFS_REPLICA_OPTIONS": f"--api {rapi}"})
        mount = Started("cdpfs-mount@.service", "vol", tmp_path, procs, {
            "CDPFS_STORE": str(store), "CDPFS_MOUNTPOINT": str(mnt),
            "CDPFS_MOUNT_OPTIONS": f"--api {papi}"})
        page = f"127.0.0.1:{free_port()}"
        console = Started("cdpfs-console.service", "", tmp_path, procs, {
            "CDPFS_NODES": f"http://{papi},http://{rapi}", "CDPFS_CONSOLE_LISTEN": page})
        wait_until(lambda: _answers(f"http://{papi}/primary") and os.path.ismount(mnt),
                   what="the mount unit to serve")
        wait_until(lambda: _answers(f"http://{rapi}/replica"), what="the replica unit")
        wait_until(lambda: _answers(f"http://{page}/"), what="the console unit")
        assert "cdpfs console" in httpx.get(f"http://{page}/").text
        assert httpx.get(f"http://{page}/nodes/1/replica").status_code == 200
        (mnt / "kept").write_text("written under the unit\n")
        assert console.stop() == 0
        assert mount.stop() == 0
        assert serve.stop() == 0
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)
    status = cdpfs("status", store).stdout
    assert "in use       no" in status
    cdpfs("mount", store, mnt)
    try:
        assert (mnt / "kept").read_text() == "written under the unit\n"
    finally:
        cdpfs("umount", mnt)


def test_the_ha_unit(tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster,
                     procs: Procs) -> None:
    nodes = HaNodes(tmp_path, etcd_cluster, procs)  # a (the unit) and b
    try:
        env = nodes.env
        tokens = tmp_path / "tokens"
        tokens.write_text("viewer watcher a-viewer-token-of-16+\n")
        tokens.chmod(0o600)
        node = Started("cdpfs-ha@.service", "a", tmp_path, procs, {
            "CDPFS_CLUSTER": nodes.cluster, "CDPFS_ETCD": env["CDPFS_ETCD"],
            "CDPFS_ETCD_CA": env["CDPFS_ETCD_CA"], "CDPFS_ETCD_CERT": env["CDPFS_ETCD_CERT"],
            "CDPFS_ETCD_KEY": env["CDPFS_ETCD_KEY"],
            "CDPFS_HA_OPTIONS": f"--api-tokens {tokens}"})
        nodes.start("b")
        health = nodes.health["a"]
        wait_until(lambda: _answers(f"http://{health}/primary"), timeout=60,
                   what="the HA unit's node to be the primary")
        assert os.path.ismount(nodes.mnt("a"))
        about = f"http://{health}/api/v1/node"
        assert httpx.get(about).status_code == 401
        node_doc = httpx.get(about, headers={"Authorization": "Bearer a-viewer-token-of-16+"})
        assert node_doc.json()["role"] == "primary" and node_doc.json()["epoch"] >= 1
        assert node.stop() == 0  # it hands the role on, to b
        assert not os.path.ismount(nodes.mnt("a"))
        wait_until(lambda: nodes.primary() == "b", what="b to take the role")
    finally:
        nodes.cleanup()
