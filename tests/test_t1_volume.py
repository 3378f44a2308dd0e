"""The volume service in this process: starting, serving, stopping, the writer lock,
the store's role, crash recovery, snapshot holds, the periodic prune, counters and
write-behind errors. Real LMDB stores in tmp_path and the real ``Volume``; no FUSE.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cdpfs.errors import (
    CdpfsError,
    Fenced,
    IsADirectory,
    NotFound,
    ReadOnly,
    StoreError,
    StoreLocked,
)
from cdpfs.fs.mutate import init_volume
from cdpfs.ha.fence import Fence
from cdpfs.history import bookmarks
from cdpfs.history.moments import BadMoment
from cdpfs.history.points import resolve
from cdpfs.history.retention import DAY, Policy, save_policy
from cdpfs.store import codec, journal
from cdpfs.store.lmdb import Store
from cdpfs.store.lock import WriterLock, holder
from cdpfs.store.schema import U64
from cdpfs.store.view import View, open_view
from cdpfs.testing import FakeClock, LiveStore, served
from cdpfs.volume import Mode, Volume, prune

BS = 128 * 1024
TIMEOUT = 30


def new_store(path: Path) -> Path:
    init_volume(path).close()
    return path


def with_store(path: Path, fn: Callable[[Store, Any], Any], write: bool = False) -> Any:
    """``fn(store, txn)`` in a transaction of a Store opened for it (nothing else may
    have the store open in this process)."""
    with Store(path) as store, store.txn(write=write) as txn:
        return fn(store, txn)


async def create(vol: Volume, name: bytes) -> tuple[int, int]:
    assert vol.fs is not None
    fh, entry = await vol.call(vol.fs.create, 1, name, 0o644, os.O_RDWR, 0, 0)
    return fh, entry.ino


async def read_path(vol: Volume, name: bytes, root: int = 1) -> bytes:
    """The whole file ``name`` in directory ``root``, read through the volume's fs."""
    fs = vol.fs
    assert fs is not None
    entry = await vol.call(fs.lookup, root, name)
    fh = await vol.call(fs.open, entry.ino, os.O_RDONLY)
    try:
        return bytes(await vol.call(fs.read, fh, 0, entry.attr.size + 1))
    finally:
        await vol.call(fs.release, fh)


async def committed_seq(vol: Volume) -> int:
    """Commit everything (an fsyncdir) and return the newest seq."""
    assert vol.fs is not None
    return int(await vol.call(vol.fs.sync, durable=True))


def holds(path: Path) -> dict[str, int]:
    return with_store(path, lambda s, txn: {b.name: b.seq for b in bookmarks.all_points(
        s, txn) if b.is_hold})


# --- starting and stopping ----------------------------------------------------------------------


async def test_start_returns_once_the_volume_serves(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            vol: Volume = await nursery.start(Volume(path, Mode.LIVE).run)
            # the very next request works: store open, engine running, recovery done
            assert vol.fs is not None and vol.store is not None
            assert (await vol.call(vol.fs.getattr, 1)).is_dir
            fh, ino = await create(vol, b"f")
            await vol.write(fh, 0, b"data")
            assert await vol.call(vol.fs.read, fh, 0, 100) == b"data"
            assert (await vol.call(vol.fs.lookup, 1, b"f")).ino == ino
            nursery.cancel_scope.cancel()


async def test_stopping_commits_what_was_applied(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    data = os.urandom(3 * BS + 5)
    with trio.fail_after(TIMEOUT):
        async with served(path) as vol:
            fh, _ = await create(vol, b"f")
            await vol.write(fh, 0, data)  # write-behind: queued, no fsync
            await vol.write(fh, len(data), b"tail")
    with Store(path) as store, open_view(store) as view:
        assert view.read_file("f") == data + b"tail"


async def test_the_writer_lock_is_held_while_serving_and_released_after(
        tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    assert holder(path) is None
    with trio.fail_after(TIMEOUT):
        async with served(path, owner="test-mount") as vol:
            who = holder(path)
            assert who is not None and who.pid == os.getpid()
            assert "test-mount" in who.text
            with pytest.raises(StoreLocked, match=rf"in use by test-mount \(pid {os.getpid()}\)"):
                WriterLock(path).acquire("second writer")
            await create(vol, b"f")
    assert holder(path) is None
    lock = WriterLock(path)
    lock.acquire("after")
    lock.release()


def test_a_released_lock_is_free_though_a_child_forked_meanwhile_lives_on(
        tmp_path: Path) -> None:
    """A process forked by another thread while the lock was held (a hook started
    from a worker thread) keeps a copy of the lock's file until it execs or exits:
    a lock let go must still be free at once, and so must one only looked at."""
    path = new_store(tmp_path / "s")
    lock = WriterLock(path)
    lock.acquire("demote")
    pid = os.fork()
    if pid == 0:  # the child: alive, still holding the copy, for a while
        time.sleep(3)
        os._exit(0)
    try:
        lock.release()
        assert holder(path) is None
        again = WriterLock(path)
        again.acquire("the next writer")  # StoreLocked "in use by demote" without unlock
        again.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def test_a_locked_store_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """A second writer (here the lock taken as a tool would take it, so that the store
    is not opened twice in one process) makes the volume's start fail."""
    path = new_store(tmp_path / "s")
    lock = WriterLock(path)
    lock.acquire("cdpfs prune")
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                with pytest.raises(StoreLocked,
                                   match=rf"in use by cdpfs prune \(pid {os.getpid()}\)"):
                    await nursery.start(Volume(path).run)
        who = holder(path)
        assert who is not None and who.text == f"cdpfs prune (pid {os.getpid()})"
    finally:
        lock.release()
    with trio.fail_after(TIMEOUT):  # the refused start closed the store: it serves now
        async with served(path) as vol:
            await create(vol, b"f")


async def test_a_replica_store_is_refused_for_live_and_served_for_follow(
        tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LiveStore(path) as live:
        fh, _ = live.create(b"f")
        live(live.fs.write, fh, 0, b"replicated")
        live.sync()
        last = live.seq()
    with_store(path, lambda s, txn: s.set_config(txn, "role", "replica"), write=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            with pytest.raises(StoreError, match="--follow") as exc:
                await nursery.start(Volume(path, Mode.LIVE).run)
        assert not isinstance(exc.value, StoreLocked)
        assert "replica" in str(exc.value)
        assert holder(path) is None  # the refusal let the lock go
        async with served(path, Mode.FOLLOW) as vol:
            assert await read_path(vol, b"f") == b"replicated"
            assert vol.fs is not None
            with pytest.raises(ReadOnly):
                await create(vol, b"g")
    assert with_store(path, lambda s, txn: journal.last(s, txn)[0]) == last  # none written


async def test_recovery_frees_an_inode_a_crash_left_unlinked_but_open(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LiveStore(path) as live:
        fh, ino = live.create(b"f")
        live(live.fs.write, fh, 0, b"still open")
        gfh, gino = live.create(b"g")
        live(live.fs.release, gfh)
        live(live.fs.unlink, 1, b"f")  # open: listed in orphans, not freed
        live.sync()
        # closed without releasing fh: what a crash leaves
    gone_at = with_store(path, lambda s, txn: journal.last(s, txn)[0])

    def mark_g(store: Store, txn: Any) -> None:  # an orphans entry for a linked inode
        txn.put(U64.pack(gino), b"", db=store.db["orphans"])

    with_store(path, mark_g, write=True)

    def state(store: Store, txn: Any) -> tuple[set[int], Any, Any, bytes]:
        cur = txn.cursor(db=store.db["orphans"])
        orphans = {U64.unpack(k)[0] for k in cur.iternext(values=False)}
        inodes = txn.cursor(db=store.db["inodes"])
        assert inodes.set_range(U64.pack(ino))
        newest = bytes(inodes.value()) if bytes(inodes.key()[:8]) == U64.pack(ino) else b"?"
        view = View(store, txn)
        return orphans, view.inode(ino), view.inode(gino), newest

    orphans, node, gnode, _ = with_store(path, state)
    assert orphans == {ino, gino}
    assert node is not None and node.nlink == 0 and node.size == 10
    assert gnode is not None and gnode.nlink == 1
    with trio.fail_after(TIMEOUT):
        async with served(path) as vol:
            assert vol.fs is not None
            with pytest.raises(NotFound):
                await vol.call(vol.fs.getattr, ino)
            assert (await vol.call(vol.fs.getattr, gino)).nlink == 1
    orphans, node, gnode, newest = with_store(path, state)
    assert orphans == set()
    assert node is None and newest == b""  # the inode's newest version is empty: freed
    assert gnode is not None and gnode.nlink == 1  # a linked inode is only taken off the list
    rec = with_store(path, lambda s, txn: journal.get(s, txn, gone_at + 1))
    assert rec is not None and (rec.op, rec.ino) == ("free", ino)
    past = with_store(path, lambda s, txn: View(s, txn, gone_at).inode(ino))
    assert past is not None and past.nlink == 0  # history still has it


# --- snapshots ------------------------------------------------------------------------------


async def write_versions(path: Path, versions: list[bytes],
                         clock: FakeClock | None = None) -> list[int]:
    """Write each of ``versions`` over file f, committed; the seq of each."""
    seqs = []
    async with served(path, **({} if clock is None else {"clock": clock})) as vol:
        fh, _ = await create(vol, b"f")
        for data in versions:
            await vol.write(fh, 0, data)
            await vol.fsync(fh)
            seqs.append(await committed_seq(vol))
        await vol.call(vol.fs.release, fh)  # type: ignore[union-attr]
    return seqs


async def test_a_snapshot_holds_its_point_and_shows_it(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    versions = [b"one..", b"two..", b"three"]
    with trio.fail_after(TIMEOUT):
        seqs = await write_versions(path, versions)
        hold = bookmarks.hold_name("snapshot")
        async with served(path, Mode.SNAPSHOT, at=f"#{seqs[0]}") as snap:
            assert snap.seq == seqs[0]
            store = snap.store
            assert store is not None
            with store.txn() as txn:
                mark = bookmarks.get(store, txn, hold)
            assert mark is not None and mark.seq == seqs[0]
            assert await read_path(snap, b"f") == versions[0]
            with pytest.raises(ReadOnly):
                await create(snap, b"g")
            # retention that keeps nothing but the newest record: the hold keeps the point
            with store.txn(write=True) as txn:
                save_policy(store, txn, Policy(1, 1, 1, 1))
            later = time.time_ns() + DAY
            await trio.to_thread.run_sync(prune, store, later)
            assert await read_path(snap, b"f") == versions[0]
            with store.txn() as txn:
                assert resolve(store, txn, f"#{seqs[0]}", later).seq == seqs[0]
                with pytest.raises(BadMoment):
                    resolve(store, txn, f"#{seqs[1]}", later)
    assert hold not in holds(path)
    assert holds(path) == {}
    # released, the point goes at the next prune
    with Store(path) as store:
        prune(store, time.time_ns() + DAY)
        with store.txn() as txn, pytest.raises(BadMoment, match="not kept"):
            resolve(store, txn, f"#{seqs[0]}", time.time_ns() + DAY)
        with open_view(store) as view:
            assert view.read_file("f") == versions[-1]


@pytest.mark.parametrize("at", ["#999", "#0", "no-such-bookmark", "-1h", "2999-01-01T00:00Z",
                                "2026-13-01", "#x"])
async def test_a_bad_moment_fails_the_start_and_holds_nothing(tmp_path: Path, at: str) -> None:
    path = new_store(tmp_path / "s")
    with trio.fail_after(TIMEOUT):
        await write_versions(path, [b"a", b"b"])
        async with trio.open_nursery() as nursery:
            with pytest.raises(BadMoment):
                await nursery.start(Volume(path, Mode.SNAPSHOT, at=at).run)
    assert with_store(path, lambda s, txn: bookmarks.all_points(s, txn)) == []
    assert holder(path) is None


def test_snapshot_and_only_snapshot_needs_a_moment(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    with pytest.raises(ValueError, match="needs a moment"):
        Volume(path, Mode.SNAPSHOT)
    with pytest.raises(ValueError, match="needs a moment"):
        Volume(path, Mode.LIVE, at="#1")
    with pytest.raises(ValueError, match="needs a moment"):
        Volume(path, Mode.FOLLOW, at="now")
    with pytest.raises(ValueError, match="replica volume needs"):
        Volume(path, Mode.REPLICA)
    assert holder(path) is None


async def test_a_snapshot_moment_is_read_by_the_volume_clock(tmp_path: Path) -> None:
    """A relative moment names the same point in a live volume's @ names and as a
    snapshot's ``at``, when both are given the same clock."""
    path = new_store(tmp_path / "s")
    clock = FakeClock(time.time_ns() + 2 * DAY)
    with trio.fail_after(TIMEOUT):
        async with served(path, clock=clock) as vol:
            assert vol.fs is not None
            fh, _ = await create(vol, b"f")
            await vol.write(fh, 0, b"old")
            await vol.fsync(fh)
            clock.advance(3600)
            await vol.write(fh, 0, b"new")
            await vol.fsync(fh)
            clock.advance(600)
            past = await vol.call(vol.fs.lookup, 1, b"@-30m")
            assert await read_path(vol, b"f", past.ino) == b"old"
        async with trio.open_nursery() as nursery:
            snap: Volume = await nursery.start(
                Volume(path, Mode.SNAPSHOT, at="-30m", clock=clock).run)
            assert await read_path(snap, b"f") == b"old"
            nursery.cancel_scope.cancel()


async def test_a_source_volume_takes_no_lock_and_serves_no_filesystem(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    with trio.fail_after(TIMEOUT):
        async with served(path, Mode.SOURCE) as vol:
            assert vol.store is not None and vol.fs is None
            assert holder(path) is None  # it reads beside whoever writes
            with pytest.raises(CdpfsError, match="not served as a filesystem"):
                await vol.call(len, b"")
            assert vol.lag() == {}


# --- background work, counters, write-behind ----------------------------------------------------


async def test_the_periodic_prune_runs_on_its_interval(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """trio's clock jumps whenever every task waits (threads included), so the prune
    interval passes at once; the volume's fake wall clock ages the records.

    Nothing can prune before the interval: the volume's prune loop starts sleeping
    no earlier than ``nursery.start`` returns, and a request made 50 (virtual) seconds
    later is applied before the prune's first step."""
    path = tmp_path / "s"
    clock = FakeClock()
    rnd = random.Random(3)

    seqs: list[int] = []
    digests: list[bytes] = []
    with LiveStore(path, clock=clock) as live:
        fh, _ = live.create(b"f")
        for _ in range(4):
            last = rnd.randbytes(BS)  # a whole block: each version a FULL block
            clock.advance(1)
            live(live.fs.write, fh, 0, last)
            live.sync()
            seqs.append(live.seq())
            digests.append(codec.digest(last))
        live(live.fs.release, fh)

    def configure(store: Store, txn: Any) -> None:
        store.set_config(txn, "prune_interval", 60)
        save_policy(store, txn, Policy(60, 60, 60, 60))

    with_store(path, configure, write=True)
    clock.advance(3600)  # every version but the newest is older than every period
    real_deadline = time.monotonic() + TIMEOUT  # trio's own clock is virtual here
    async with served(path, clock=clock) as vol:
        started = trio.current_time()

        def present(seqs: list[int], digests: list[bytes]) -> tuple[list[bool], list[bool]]:
            assert vol.live is not None and vol.store is not None
            txn, db = vol.live.engine.reader(), vol.store.db
            return ([txn.get(U64.pack(s), db=db["journal"]) is not None for s in seqs],
                    [txn.get(d, db=db["blocks"]) is not None for d in digests])

        async def wait_pruned(seqs: list[int], digests: list[bytes]) -> float:
            pruned = ([False] * (len(seqs) - 1) + [True], [False] * (len(digests) - 1) + [True])
            while True:
                await trio.sleep(5)
                if await vol.call(present, seqs, digests) == pruned:
                    return trio.current_time()
                assert time.monotonic() < real_deadline, "the periodic prune did not run"

        await trio.sleep(50)
        assert await vol.call(present, seqs, digests) == ([True] * 4, [True] * 4)
        assert await wait_pruned(seqs, digests) - started >= 60
        assert await read_path(vol, b"f") == last

        # it runs again: new versions written through the volume go in their turn
        assert vol.fs is not None
        entry = await vol.call(vol.fs.lookup, 1, b"f")
        fh = await vol.call(vol.fs.open, entry.ino, os.O_RDWR)

        seqs, digests = [], []
        for _ in range(4):
            last = rnd.randbytes(BS)
            clock.advance(1)
            await vol.write(fh, 0, last)
            await vol.fsync(fh)
            seqs.append(await committed_seq(vol))
            digests.append(codec.digest(last))
        clock.advance(3600)
        await wait_pruned(seqs, digests)
        assert await read_path(vol, b"f") == last
        await vol.call(vol.fs.release, fh)
async def test_counters_count_commits_and_pending_bytes(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    with trio.fail_after(TIMEOUT):
        async with served(path) as vol:
            fh, _ = await create(vol, b"f")
            await vol.fsync(fh)
            commits = vol.counters.commits
            assert commits >= 1
            data = os.urandom(4 * BS)
            await vol.write(fh, 0, data)
            # applied, not yet committed (within the group-commit interval)
            assert vol.counters.pending_bytes >= len(data)
            before = vol.counters.pending_bytes
            await vol.write(fh, len(data), b"x" * 100)
            assert vol.counters.pending_bytes > before
            await vol.fsync(fh)
            assert vol.counters.pending_bytes == 0
            assert vol.counters.commits == commits + 1
            await vol.fsync(fh)  # nothing new: no commit
            await vol.fsyncdir()
            assert vol.counters.commits == commits + 1
            for i in range(3):
                await vol.write(fh, i, b"y")
                await vol.fsync(fh)
                assert vol.counters.commits == commits + 2 + i
            assert vol.counters.as_dict()["commits"] == commits + 4
            assert vol.counters.pending_bytes == 0


async def test_a_failed_write_is_refused_by_the_write_itself(tmp_path: Path) -> None:
    """A write is applied before it is acknowledged: a write to a directory's handle
    fails at once (IsADirectory), and nothing of it is left for a later fsync or
    close to report; the other file's data is there."""
    path = new_store(tmp_path / "s")
    with trio.fail_after(TIMEOUT):
        async with served(path) as vol:
            fs = vol.fs
            assert fs is not None
            fh, _ = await create(vol, b"f")
            dfh = await vol.call(fs.opendir, 1)
            with pytest.raises(IsADirectory):
                await vol.write(dfh, 0, b"x")
            with pytest.raises(IsADirectory):
                await vol.write(dfh, 0, os.urandom(4 * BS))  # hashed first, then refused
            await vol.write(fh, 0, b"fine")
            await vol.fsync(fh)
            await vol.fsync(dfh)
            await vol.flush(dfh)
            await vol.call(fs.releasedir, dfh)
            assert await vol.call(fs.read, fh, 0, 10) == b"fine"
    with Store(path) as store, open_view(store) as view:
        assert view.read_file("f") == b"fine"
        assert sorted(name for name, _ in view.listdir(1)) == [b"f"]


async def test_requests_go_on_while_a_commit_is_under_way(tmp_path: Path) -> None:
    """A commit writes in a worker thread; meanwhile every kind of request is answered
    at once, sees what came before (the layer being committed included), and what
    is applied meanwhile goes with the next commit. The commit is held open by a
    job in its write transaction until the requests are done. (History is hidden, as
    by default: a root listing with history waits for the commit.)"""
    path = new_store(tmp_path / "s")
    first = os.urandom(3 * BS + 10)
    gate = threading.Event()
    with trio.fail_after(TIMEOUT):
        async with served(path, show_history=False) as vol:
            fs, live = vol.fs, vol.live
            assert fs is not None and live is not None
            fh, ino = await create(vol, b"a")
            await vol.write(fh, 0, first)
            await vol.write(fh, 10, b"patch")  # a small write: into the open pack
            live.engine.job(lambda txn: gate.wait(TIMEOUT))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vol.fsyncdir)  # freezes the layer, waits at the gate
                while not live.engine.counters.pending_bytes or not live.engine._writing:
                    await trio.sleep(0.01)
                with trio.fail_after(2):  # nothing waits for the commit
                    expected = first[:10] + b"patch" + first[15:]
                    assert await read_path(vol, b"a") == expected
                    assert (await vol.call(fs.getattr, ino)).size == len(first)
                    fh2, _ = await create(vol, b"b")
                    await vol.write(fh2, 0, b"made during the commit")
                    await vol.call(fs.mknod, 1, b"d", 0o40755, 0, 0)
                    await vol.call(fs.unlink, 1, b"a")
                    names = [n for _, n, _ in await vol.call(fs.readdir,
                                                             await vol.call(fs.opendir, 1), 0)]
                    assert names == [b"b", b"d"]
                    assert await read_path(vol, b"b") == b"made during the commit"
                assert vol.store is not None
                with vol.store.txn() as txn:  # what LMDB holds: none of that yet
                    assert View(vol.store, txn).lookup(1, b"b") is None
                gate.set()
            await vol.fsync(fh2)
            await vol.call(fs.release, fh)
            await vol.call(fs.release, fh2)
    with Store(path) as store, open_view(store) as view:
        assert sorted(n for n, _ in view.listdir(1)) == [b"b", b"d"]
        assert view.read_file("b") == b"made during the commit"


# --- the fence of high availability ----------------------------------------------------


async def test_a_fenced_volume_refuses_every_change_and_still_reads(tmp_path: Path) -> None:
    """Past its deadline (a lease not renewed, or a pause longer than the lease) the
    volume refuses creates, writes, renames, attribute and xattr changes before they
    change anything, and fsyncs after their commit; reads go on. The deadline is read
    on the fence's clock at each request, with no renewal or timer needed."""
    path = new_store(tmp_path / "vol")
    now = [1000.0]
    fence = Fence(until=1005.0, clock=lambda: now[0])
    with trio.fail_after(TIMEOUT):
        async with served(path, gate=fence.check) as vol:
            fs = vol.fs
            assert fs is not None
            fh, ino = await create(vol, b"kept")
            await vol.write(fh, 0, b"before the deadline")
            await vol.fsync(fh)
            top = fs.live.m.last_seq
            now[0] = 1005.0  # the deadline: the lease may be gone
            with pytest.raises(Fenced) as info:
                await vol.write(fh, 0, b"after it")
            assert isinstance(info.value, ReadOnly) and "\n" not in str(info.value)
            refused = [
                (fs.create, 1, b"new", 0o644, os.O_RDWR, 0, 0),
                (fs.mknod, 1, b"dir", 0o40755, 0, 0),
                (fs.rename, 1, b"kept", 1, b"moved", 0),
                (fs.unlink, 1, b"kept"),
                (fs.setattr, ino, {"size": 0}),
                (fs.setxattr, ino, b"user.x", b"1"),
            ]
            for fn, *args in refused:
                kw = args.pop() if isinstance(args[-1], dict) else {}
                with pytest.raises(Fenced):
                    await vol.call(lambda fn=fn, args=args, kw=kw: fn(*args, **kw))
            with pytest.raises(Fenced):
                await vol.fsync(fh)
            assert fs.live.m.last_seq == top, "a refused change left a record"
            assert await read_path(vol, b"kept") == b"before the deadline"
            now[0] = 1000.0
            fence.open_until(1010.0)  # renewed: changes go through again
            await vol.write(fh, 0, b"renewed")
            fence.shut("the role was handed over")
            with pytest.raises(Fenced, match="handed over"):
                await vol.fsync(fh)  # applied before, refused at the acknowledgement
