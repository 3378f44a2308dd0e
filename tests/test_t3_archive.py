"""An export read back by GNU tar and bsdtar is the ``@`` tree of its moment, on a real mount.

A tree is built through the mount (files, a 100 MiB sparse file, hard links,
symlinks, a FIFO, a device node, ``user.*`` and ``trusted.*`` xattrs, names with
newlines and bytes that are not UTF-8, long names, nanosecond times, owners other
than root, setuid and sticky modes), then changed; ``cdpfs export --at`` the
earlier moment is extracted by ``tar --xattrs --xattrs-include='*' -xpf`` and by
``bsdtar --xattrs -xpf`` into native directories, and each must equal
``MNT/@#seq``: content, kind, mode, owner, mtime to the nanosecond, device numbers,
link targets, xattrs, link counts and hard-link groups, and holes (a sparse file
takes about the blocks it has data in). The archive imported back is the same tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import Volume, cdpfs, last_seq

MIB = 1 << 20
ODD = [b"new\nline", b"\xff\xfe-latin1", "é-utf8".encode(), b"n" * 200, b"sp ace=eq"]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (contrib/setup.sh installs it)")
    return path


def build(m: Path) -> None:
    """Every kind of entry, through the mount."""
    mb = os.fsencode(m)
    os.chmod(m, 0o751)
    os.chown(m, 10, 20)
    (m / "docs").mkdir()
    (m / "docs" / "readme.txt").write_bytes(b"read me\n" * 1000)
    os.chown(m / "docs", 1000, 1000)
    os.chown(m / "docs" / "readme.txt", 1234, 5678)
    os.chmod(m / "docs" / "readme.txt", 0o640)
    (m / "big.bin").write_bytes(os.urandom(3 * MIB) + b"text " * 200_000)
    with open(m / "sparse", "wb") as f:  # 100 MiB: data at 0, 40 MiB and 99 MiB only
        f.write(os.urandom(64 * 1024))
        f.seek(40 * MIB)
        f.write(os.urandom(MIB))
        f.seek(99 * MIB)
        f.write(b"near the end")
        f.truncate(100 * MIB)
    (m / "a").mkdir()
    (m / "b").mkdir()
    (m / "a" / "one").write_bytes(b"three names\n")
    os.link(m / "a" / "one", m / "a" / "two")
    os.link(m / "a" / "one", m / "b" / "three")
    os.symlink("docs/readme.txt", m / "link")
    os.symlink("/".join(["t" * 50] * 4), m / "long-link")
    os.lchown(m / "link", 7, 8)
    os.mkfifo(m / "fifo", 0o620)
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(m / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    (m / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(m / "setuid", 0o4755)
    (m / "sticky").mkdir()
    os.chmod(m / "sticky", 0o1777)
    for name in ODD:
        with open(mb + b"/sticky/" + name, "wb") as f:
            f.write(name)
    deep = mb + b"/" + b"/".join([b"d" * 120] * 3)
    os.makedirs(deep)
    with open(deep + b"/" + b"f" * 150, "wb") as f:
        f.write(b"deep")
    os.setxattr(m / "docs" / "readme.txt", "user.note", b"\x00\xff binary\n")
    os.setxattr(m / "docs", "user.dir", b"on a directory")
    os.setxattr(m / "a" / "one", "user.shared", b"by every name")
    os.setxattr(m / "link", "trusted.on-link", b"on a symlink", follow_symlinks=False)
    os.setxattr(m / "big.bin", "user.big", bytes(range(256)) * 8)
    os.utime(m / "docs" / "readme.txt", ns=(1_600_000_000_123_456_789,) * 2)
    os.utime(m / "big.bin", ns=(1_500_000_000_000_000_001, 1_500_000_000_999_999_999))
    os.utime(m / "link", ns=(1_400_000_000_000_000_007,) * 2, follow_symlinks=False)
    os.utime(m / "docs", ns=(1_300_000_000_000_000_003,) * 2)
    os.utime(m / "a", ns=(1_300_000_000_000_000_005,) * 2)


def change(m: Path) -> None:
    (m / "big.bin").write_bytes(b"replaced")
    (m / "docs" / "readme.txt").unlink()
    (m / "a" / "two").unlink()
    os.chmod(m / "fifo", 0o600)
    os.chown(m / "setuid", 99, 99)
    (m / "new-after").write_bytes(b"not at the moment")
    os.setxattr(m / "a" / "one", "user.shared", b"changed")
    with open(m / "sparse", "r+b") as f:
        f.seek(70 * MIB)
        f.write(b"later")


def tree(root: Path) -> dict[bytes, dict[str, Any]]:
    """Everything the comparison looks at, by path relative to ``root``."""
    out: dict[bytes, dict[str, Any]] = {}
    base = os.fsencode(root)
    groups: dict[int, list[bytes]] = {}
    for top, dirs, files in os.walk(base):
        for name in [b"", *dirs, *files] if top == base else [*dirs, *files]:
            path = os.path.join(top, name) if name else top
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            info: dict[str, Any] = {
                "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "mtime": st.st_mtime_ns,
                "xattrs": sorted((x, os.getxattr(path, x, follow_symlinks=False))
                                 for x in os.listxattr(path, follow_symlinks=False))}
            if not stat.S_ISDIR(st.st_mode):
                info["size"] = st.st_size
                info["nlink"] = st.st_nlink
                groups.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    info["sha"] = hashlib.sha256(f.read()).hexdigest()
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            info["blocks"] = st.st_blocks
            out[rel] = info
    for names in groups.values():
        for rel in names:
            out[rel]["names"] = sorted(names)
    return out


def same(native: dict[bytes, dict[str, Any]], then: dict[bytes, dict[str, Any]],
         tool: str) -> None:
    assert sorted(native) == sorted(then), tool
    for rel, want in then.items():
        have = dict(native[rel])
        want = dict(want)
        if rel == b"sparse":  # holes stay holes: about the blocks data is in, no more
            assert have["blocks"] * 512 <= want["blocks"] * 512 + MIB, (tool, have, want)
            assert want["blocks"] * 512 < 3 * MIB
        for d in (have, want):
            d.pop("blocks")
            if tool == "bsd" and rel == b".":
                # bsdtar keeps the directory it extracts into as the extraction left it
                # (its ./ entry's mode and owner are set, its mtime not: so it does with
                # GNU tar's own archives)
                d.pop("mtime")
        assert have == want, (tool, rel)


def test_gnu_tar_and_bsdtar_restore_an_export_to_its_moments_tree(volume: Volume,
                                                                  tmp_path: Path) -> None:
    gnu, bsd = need("tar"), need("bsdtar")
    m = volume.mnt
    build(m)
    seq = last_seq(volume)
    change(m)
    volume.sync()
    archive = tmp_path / "then.tar"
    said = cdpfs("export", volume.store, "--at", f"#{seq}", "-o", archive).stdout
    assert f"exported #{seq}" in said and "(1 sparse)" in said
    # through the mount point too: the same moment, the same bytes
    cdpfs("export", m, "--at", f"#{seq}", "-o", tmp_path / "again.tar")
    assert (tmp_path / "again.tar").read_bytes() == archive.read_bytes()
    # a subtree named by its path in the mount, as of the moment
    cdpfs("export", m, "--at", f"#{seq}", m / "docs", "-o", tmp_path / "docs.tar")
    listed = subprocess.run(["tar", "-tf", str(tmp_path / "docs.tar")], capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == ["docs/", "docs/readme.txt"]
    then = tree(m / f"@#{seq}")
    assert b"new-after" not in then and then[b"docs/readme.txt"]["uid"] == 1234
    for tool, argv in (("gnu", [gnu, "--xattrs", "--xattrs-include=*", "-xpf"]),
                       ("bsd", [bsd, "--xattrs", "-xpf"])):
        out = tmp_path / tool
        out.mkdir()
        proc = subprocess.run([*argv, str(archive), "-C", str(out)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (tool, proc.stderr)
        assert proc.stderr == "", (tool, proc.stderr)  # not one warning
        same(tree(out), then, tool)
    # imported back, and mounted: the same tree again
    copy = Volume(tmp_path, "copy")
    cdpfs("import", archive, copy.store)
    copy.mount()
    try:
        same(tree(copy.mnt), then, "import")
    finally:
        copy.umount()
