"""Failover by hand, without a cluster (the static mode): a replica is promoted with
``cdpfs replica promote``, the old primary is demoted and follows the new one.

A mount ships to a replica server; the replica server goes away and the primary
writes on alone (async mode: its fsync does not wait); the primary crashes. The
replica is promoted (a new epoch) and mounted read-write; the old primary's store
is demoted and served with ``--failback``; the new primary ships to it. It ends
with the new primary's tree, and what it alone had written is kept in a copy
beside it that mounts at its ``diverged`` bookmark. Real FUSE mounts, real TLS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ReplicaServer,
    Volume,
    can_mount,
    cdpfs,
    force_unmount,
    last_seq,
    pair_stores,
    store_seq,
    wait_until,
)

from cdpfs.store import epochs
from cdpfs.store.lmdb import Store

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs /dev/fuse and CAP_SYS_ADMIN")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _error(*args: str | os.PathLike[str]) -> str:
    proc = cdpfs(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Volume, Volume]]:
    a, b = Volume(tmp_path, "a"), Volume(tmp_path, "b")
    try:
        yield a, b
    finally:
        for vol in (a, b):
            vol.cleanup()
        force_unmount(tmp_path / "old.mnt")


def test_a_replica_promoted_by_hand_takes_the_old_primary_back(
        pair: tuple[Volume, Volume], tmp_path: Path) -> None:
    a, b = pair
    a.init()
    pair_stores(a.store, b.store, down="b", up="a")
    server = ReplicaServer(b.store).start()
    cdpfs("replica", "add", a.store, "b", "--address", server.address, "--mode", "async")
    try:
        a.mount()
        _write(a.mnt / "shipped.txt", b"on both")
        wait_until(lambda: server.store.exists() and store_seq(b.store) == last_seq(a),
                   what="b caught up")
        assert "is not a replica" in _error("replica", "promote", a.store)
        assert "replica" in _error("replica", "promote", b.store)  # its server holds it
        server.stop()
        _write(a.mnt / "only-on-a.txt", b"written while b was away")
        a.kill()  # the primary's machine dies

        epoch_line = cdpfs("replica", "promote", b.store).stdout
        assert "epoch" in epoch_line
        b.mount()
        assert (b.mnt / "shipped.txt").read_bytes() == b"on both"
        assert not (b.mnt / "only-on-a.txt").exists()
        _write(b.mnt / "after.txt", b"written on the new primary")

        # The old primary comes back: demoted, it follows the new one.
        assert "is not a replica" in _error("replica", "promote", b.store)
        cdpfs("replica", "demote", a.store)
        assert "is a replica already" in _error("replica", "demote", a.store)
        back = ReplicaServer(a.store).start("--failback")
        cdpfs("replica", "add", b.store, "a", "--address", back.address, "--mode", "async")
        wait_until(lambda: back.resumed() and store_seq(a.store) == last_seq(b), timeout=60,
                   what="the old primary caught up")
        with Store(b.store, readonly=True) as store, store.txn() as txn:
            line = epochs.lineage(store, txn)
        assert line[-1][0] == 1 and back.resumed() == [line[-1][1] - 1], (line, back.resumed())
        # resumed after the last record both had (the promotion's fork), not from scratch
        assert "full resync" not in back.text()
        back.stop()
        b.umount()
        cdpfs("verify", "--compare", b.store, a.store)
        kept = sorted(tmp_path.glob("a.store.diverged-*"))
        assert len(kept) == 1, kept
        old = tmp_path / "old.mnt"
        old.mkdir()
        cdpfs("mount", kept[0], old, "--at", "diverged")
        try:
            assert (old / "only-on-a.txt").read_bytes() == b"written while b was away"
            assert not (old / "after.txt").exists()
        finally:
            cdpfs("umount", old)
    finally:
        server.stop()
