"""A replica read while it receives: a following read-only mount of the replica store,
its history (``@`` names) and the primary's bookmarks, which replication carries.

Real processes on loopback: the primary is mounted and ships to ``cdpfs replica
serve`` by itself (the replica is added in async mode); the replica store is mounted
with ``cdpfs mount --follow`` beside its server. Every mount is unmounted and every
process killed at the end, also when a test fails.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from conftest import Served
from harness import (
    cdpfs,
    force_unmount,
    holder_pid,
    last_seq,
    store_seq,
    wait_replicated,
    wait_until,
)

MIB = 1 << 20


def _bookmarks(store: Path) -> list[str]:
    out = cdpfs("bookmarks", "--volume", store).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def _replica_status(store: Path) -> str:
    lines = cdpfs("status", store).stdout.splitlines()
    return "\n".join(ln for ln in lines if re.match(r"replica\s+r1 ", ln))


def _reads(path: Path, want: bytes, timeout: float = 10) -> None:
    """``path`` comes to read ``want`` (a following mount may show the state of up to
    a second ago)."""
    def ok() -> bool:
        try:
            return path.read_bytes() == want
        except FileNotFoundError:
            return False

    wait_until(ok, timeout=timeout, what=f"{path} to read {want[:20]!r}...")


def test_a_replica_mounted_with_follow_shows_what_arrives(served: Served,
                                                          tmp_path: Path) -> None:
    vol, replica, _ = served
    m = vol.mnt
    (m / "a.txt").write_bytes(b"one")
    big_a, big_b = os.urandom(3 * MIB), os.urandom(3 * MIB)
    (m / "big").write_bytes(big_a)
    first = wait_replicated(vol, replica)
    rmnt = tmp_path / "rmnt"
    rmnt.mkdir()
    try:
        # a plain mount is refused while the server holds the store, with the way out
        refused = cdpfs("mount", replica, rmnt, check=False)
        assert refused.returncode == 1 and "--follow" in refused.stderr, refused.stderr
        assert not os.path.ismount(rmnt)
        out = cdpfs("mount", "--follow", replica, rmnt).stdout
        assert "following" in out and os.path.ismount(rmnt)
        assert (rmnt / "a.txt").read_bytes() == b"one"
        with pytest.raises(OSError) as exc:
            (rmnt / "new").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS

        # a file held open keeps showing the version it was opened at
        held = open(rmnt / "big", "rb")  # noqa: SIM115 (closed below)
        try:
            assert held.read(MIB) == big_a[:MIB]
            (m / "a.txt").write_bytes(b"two")
            (m / "big").write_bytes(big_b)
            (m / "dir").mkdir()
            (m / "dir" / "c").write_bytes(b"new file")
            second = wait_replicated(vol, replica)
            assert held.read() == big_a[MIB:]
        finally:
            held.close()
        # what arrived shows up without remounting
        _reads(rmnt / "a.txt", b"two")
        _reads(rmnt / "dir" / "c", b"new file")
        _reads(rmnt / "big", big_b)
        # history on the replica: the same states as on the primary
        assert (rmnt / f"@#{first}" / "a.txt").read_bytes() == b"one"
        assert (rmnt / f"@#{first}" / "big").read_bytes() == big_a
        assert not (rmnt / f"@#{first}" / "dir").exists()
        assert (rmnt / f"@#{second}" / "dir" / "c").read_bytes() == b"new file"
        assert sorted(os.listdir(rmnt / f"@#{second}")) == \
            sorted(os.listdir(m / f"@#{second}"))
        cdpfs("umount", rmnt)
        assert not os.path.ismount(rmnt)
    finally:
        force_unmount(rmnt)
    assert "identical" in cdpfs("verify", "--compare", vol.store, replica).stdout


def test_bookmarks_follow_to_the_replica(served: Served,
                                         tmp_path: Path) -> None:
    vol, replica, _ = served
    m = vol.mnt
    (m / "f").write_bytes(b"v1")
    wait_replicated(vol, replica)
    cdpfs("bookmark", "release-1", "--volume", m)
    (m / "f").write_bytes(b"v2")
    cdpfs("bookmark", "release-2", "--volume", m)
    (m / "f").write_bytes(b"v3")
    wait_replicated(vol, replica)
    wait_until(lambda: _bookmarks(replica) == ["release-1", "release-2"], timeout=15,
               what="both bookmarks on the replica")
    rmnt = tmp_path / "rmnt"
    rmnt.mkdir()
    try:
        cdpfs("mount", "--follow", replica, rmnt)
        assert (rmnt / "@release-1" / "f").read_bytes() == b"v1"
        assert (rmnt / "@release-2" / "f").read_bytes() == b"v2"
        assert (rmnt / "f").read_bytes() == b"v3"
        # a bookmark of a past moment, and a deletion, follow too
        cdpfs("bookmark", "older", "--at", "release-1", "--volume", m)
        cdpfs("bookmark", "--delete", "release-1", "--volume", m)
        wait_until(lambda: _bookmarks(replica) == ["older", "release-2"], timeout=15,
                   what="the replica's bookmarks to follow a deletion and a new one")
        _reads(rmnt / "@older" / "f", b"v1")
        cdpfs("umount", rmnt)
    finally:
        force_unmount(rmnt)


def test_a_replica_is_not_mounted_for_writing_and_a_parted_one_gets_nothing(
        served: Served, tmp_path: Path) -> None:
    vol, replica, server = served
    (vol.mnt / "f").write_bytes(b"primary's")
    at = wait_replicated(vol, replica)
    wait_until(lambda: f"acked #{at}," in _replica_status(vol.store), timeout=30,
               what="the primary to know the replica has it all")  # not only the replica
    # stop the server: the store is free, but a live (read-write) mount is refused
    server.kill()
    wait_until(lambda: holder_pid(replica) is None, what="the replica server to stop")
    rmnt = tmp_path / "rmnt"
    rmnt.mkdir()
    refused = cdpfs("mount", replica, rmnt, check=False)
    assert refused.returncode == 1 and "is a replica" in refused.stderr, refused.stderr
    assert not os.path.ismount(rmnt)
    # a replica store written anyway (its role cleared by hand, as an older cdpfs
    # would have allowed): its history parts from the primary's
    from cdpfs.store.lmdb import Store

    with Store(replica) as st, st.txn(write=True) as txn:
        st.set_config(txn, "role", None)
    try:
        cdpfs("mount", replica, rmnt)
        (rmnt / "f").write_bytes(b"written on the replica")
        cdpfs("umount", rmnt)
    finally:
        force_unmount(rmnt)
    parted = store_seq(replica)
    assert parted > at
    (vol.mnt / "g").write_bytes(b"more on the primary")
    last_seq(vol)
    server.start()  # the mount ships to it again: refused, with the reason, nothing sent
    wait_until(lambda: "parted" in _replica_status(vol.store), timeout=30,
               what="status to report the parted history")
    assert "parted" in (vol.store / "cdpfs.log").read_text()
    assert f"acked #{at}," in _replica_status(vol.store)  # not the parted replica's #
    assert store_seq(replica) == parted
