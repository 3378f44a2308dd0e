"""Rebuilding a lost primary in this process: a replica answers FETCH with a send
stream while it keeps receiving, and the store made from it becomes the primary.

A live volume ships to a real ``Receiver`` over in-memory links; the receiver
answers FETCH as ``cdpfs replica serve`` does (``rebuild.answer``, the hook the
volume service gives it). ``rebuild_from`` takes the whole history into a new
store, catches up with what the replica received meanwhile, and promotes it; the
old replica then follows the rebuilt primary without a full resync. A rebuild cut
anywhere goes on from where it was (the receive's token, or the stream all there),
from a link or a file; and what a rebuild must not touch or take is refused with
one line. Real stores, the real engine, sender and receiver; no FUSE, no network.
"""

from __future__ import annotations

import io
import logging
import os
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cdpfs import rebuild
from cdpfs.fs.mutate import init_volume
from cdpfs.ha import roles
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.replication import registry, stream, wire
from cdpfs.replication.protocol import PROTOCOL
from cdpfs.replication.receiver import BASE_PENDING, ROLE_REPLICA, Receiver
from cdpfs.store import epochs, journal
from cdpfs.store.lmdb import Store, is_store
from cdpfs.testing import MemoryLinks, served
from cdpfs.volume import Mode

NAME = "r1"
CHUNK = 128 << 10


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames of a few blocks each: a stream of these small volumes is many frames."""
    monkeypatch.setattr(stream, "BATCH_BYTES", 256 * 1024)


# --- helpers ---------------------------------------------------------------------------


async def _write(vol: Any, name: bytes, data: bytes) -> None:
    """Write ``name`` (made, or rewritten from 0) in a served live volume, fsynced."""
    try:
        ino = (await vol.call(vol.fs.lookup, 1, name)).ino
        fh = await vol.call(vol.fs.open, ino, os.O_RDWR)
    except Exception:
        fh, _ = await vol.call(vol.fs.create, 1, name, 0o644, os.O_RDWR, 0, 0)
    for off in range(0, len(data), CHUNK):
        await vol.write(fh, off, data[off:off + CHUNK])
    await vol.fsync(fh)
    await vol.call(vol.fs.release, fh)


async def _volume(path: Path, files: int = 12) -> None:
    """A volume with some history: files written, one rewritten, a directory."""
    init_volume(path).close()
    async with served(path) as vol:
        await vol.call(vol.fs.mknod, 1, b"d", stat.S_IFDIR | 0o755, 0, 0)
        for i in range(files):
            await _write(vol, b"f%02d" % i, os.urandom(200_000 + i))
        await _write(vol, b"f00", b"rewritten" * 1000)


def _top(path: Path) -> int:
    with Store(path, readonly=True) as store, store.txn() as txn:
        return journal.top(store, txn)


def _state(path: Path, seq: int | None = None) -> tuple[str, int, str, list[tuple[int, int]]]:
    """(uuid, newest seq, tree hash there, lineage) of the store at ``path``."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        top = journal.top(store, txn) if seq is None else seq
        return store.uuid, top, tree_hash(store, txn, top)[0], epochs.lineage(store, txn)


def _role(path: Path) -> str:
    return roles.role(path)


def _verified(path: Path) -> None:
    with Store(path) as store:
        assert verify(store) == []


class _End(trio.abc.Stream):
    """The rebuild's end of an in-memory link: slowed by ``pause`` per read, and cut
    (both ends closed) once ``cut`` bytes came through."""

    def __init__(self, inner: trio.abc.Stream, theirs: trio.abc.Stream, pause: float,
                 cut: int | None) -> None:
        self.inner, self.theirs, self.pause, self.cut = inner, theirs, pause, cut
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.pause:
            await trio.sleep(self.pause)
        if self.cut is not None:
            if self.received >= self.cut:
                await trio.aclose_forcefully(self.theirs)
                raise trio.BrokenResourceError("the link was cut")
            max_bytes = min(max_bytes or 1 << 16, self.cut - self.received)
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()
        await trio.aclose_forcefully(self.theirs)


class _Fetcher:
    """Connections to ``receiver`` for a rebuild, as TCP would make them, with
    backpressure (``lockstep_stream_pair``: the replica sends no faster than the
    rebuild reads): each made by ``connect``, the n-th cut after ``cuts[n]`` bytes."""

    def __init__(self, nursery: trio.Nursery, receiver: Receiver, pause: float = 0.0,
                 cuts: dict[int, int] | None = None,
                 before: Callable[[], Awaitable[None]] | None = None) -> None:
        self.nursery, self.receiver, self.pause = nursery, receiver, pause
        self.cuts = cuts or {}
        self.before = before  # awaited before each connection is made
        self.made = 0

    async def connect(self) -> trio.abc.Stream:
        if self.before is not None:
            await self.before()
        ours, theirs = trio.testing.lockstep_stream_pair()
        self.nursery.start_soon(self._serve, theirs)
        end = _End(ours, theirs, self.pause, self.cuts.get(self.made))
        self.made += 1
        return end

    async def _serve(self, stream_: trio.abc.Stream) -> None:
        try:
            await self.receiver.serve_connection(wire.Connection(stream_), "memory:rebuild")
        finally:
            await trio.aclose_forcefully(stream_)


@asynccontextmanager
async def _replica(path: Path) -> AsyncIterator[tuple[trio.Nursery, Receiver]]:
    """A replica's receiver, answering FETCH as a replica server does."""
    receiver = Receiver(path)
    receiver.on_fetch = rebuild.answer  # what the volume service gives it
    try:
        async with trio.open_nursery() as nursery:
            yield nursery, receiver
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()


async def _shipped(primary: Path, replica: Path) -> None:
    """The replica store made from the primary by the real sender and receiver."""
    async with _replica(replica) as (nursery, receiver):
        links = MemoryLinks(nursery)
        links.add(NAME, receiver)
        async with served(primary, Mode.SOURCE) as src:
            await src.ship(NAME, "memory:r1", links.connect(NAME), attempts=3)


def _refusal(run: Callable[[], Any]) -> str:
    with pytest.raises(rebuild.RebuildError) as err:
        run()
    text = str(err.value)
    assert "\n" not in text
    return text


# --- the tests ------------------------------------------------------------------------------


async def test_a_replica_streams_its_store_while_it_keeps_receiving(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica, target = tmp_path / "primary", tmp_path / "replica", tmp_path / "new"
    caplog.set_level(logging.INFO, "cdpfs")
    await _volume(primary)
    with Store(primary) as store, store.txn(write=True) as txn:
        registry.put(store, txn, registry.ReplicaState(NAME, "memory:r1", mode="async"))
    applied: list[int] = []  # the replica's records applied, at each frame the rebuild got
    with trio.fail_after(120):
        async with _replica(replica) as (nursery, receiver):
            links = MemoryLinks(nursery)
            links.add(NAME, receiver)
            async with served(primary, connector=links.connector) as vol:
                assert vol.fanout is not None
                await _write(vol, b"first", b"x" * 1000)
                while _replica_top(receiver) < _top_of(vol):
                    await trio.sleep(0.02)
                stop, stopped = trio.Event(), trio.Event()

                async def writer() -> None:  # the primary goes on writing, and shipping
                    i = 0
                    while not stop.is_set():
                        await _write(vol, b"w%03d" % i, os.urandom(20_000))
                        i += 1
                        await trio.sleep(0.005)
                    stopped.set()

                async def lost() -> None:
                    """Once the primary stopped writing, the rest of the rebuild waits
                    until the replica has all it wrote (as when a primary is lost)."""
                    if stop.is_set():
                        await stopped.wait()
                        while _replica_top(receiver) < _top_of(vol):
                            await trio.sleep(0.02)

                def progress(nbytes: int) -> None:
                    applied.append(receiver.counters.records_applied)
                    if applied[-1] - applied[0] >= 30:
                        stop.set()  # it kept applying while it streamed: enough

                nursery.start_soon(writer)
                fetcher = _Fetcher(nursery, receiver, pause=0.002, before=lost)
                out = await rebuild.rebuild_from(target, fetcher.connect, "memory:r1",
                                                 progress=progress)
                assert stop.is_set(), f"the replica applied nothing while it streamed: {applied}"
                assert links.connections == 1  # the primary's session never broke
                assert receiver.store is not None
                with receiver.store.txn() as txn:
                    assert receiver.store.meta(txn, BASE_PENDING) is None
                replica_top = _replica_top(receiver)
                with receiver.store.txn() as txn:
                    r_tree = tree_hash(receiver.store, txn, replica_top)[0]
                    r_line = epochs.lineage(receiver.store, txn)
            # the rebuilt store: the replica's history, the primary of a new epoch
            assert fetcher.made >= 2  # the stream, and what came meanwhile (or "nothing")
            assert out.to_seq == replica_top and out.checked and out.resumed == 0
            uuid, top, tree, line = _state(target)
            assert (uuid, top, tree) == (receiver.store.uuid, replica_top, r_tree) == \
                (out.uuid, out.to_seq, out.tree)
            assert line == [*r_line, (r_line[-1][0] + 1, top + 1)] and out.epoch == line[-1][0]
            assert _role(target) == roles.ROLE_LIVE
            _verified(target)
            # The old replica follows the rebuilt primary from where it is: no resync.
            registry.register(target, NAME, "memory:r1")
            async with served(target, connector=links.connector) as vol:
                await _write(vol, b"after-rebuild", os.urandom(300_000))
                while _replica_top(receiver) < _top_of(vol):
                    await trio.sleep(0.02)
                assert links.connections == 2
    assert "full resync" not in caplog.text
    assert f"resuming after #{top}" in caplog.text
    a, b = _state(target), _state(replica)
    assert a == b and a[3][-1][0] == out.epoch


def _replica_top(receiver: Receiver) -> int:
    if receiver.store is None:  # not made yet by the primary's first HELLO
        return 0
    with receiver.store.txn() as txn:
        return journal.top(receiver.store, txn)


def _top_of(vol: Any) -> int:
    with vol.store.txn() as txn:
        return journal.top(vol.store, txn)


async def test_a_rebuild_cut_anywhere_goes_on_from_where_it_was(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    await _volume(primary, files=20)
    await _shipped(primary, replica)
    want = _state(replica)
    total = len(await _sent(replica))
    rnd = random.Random(20)
    taken_up = 0
    for n, cut in enumerate(sorted(rnd.sample(range(200, total), 3))):
        target = tmp_path / f"new{n}"
        async with _replica(replica) as (nursery, receiver):
            fetcher = _Fetcher(nursery, receiver, cuts={0: cut})
            with pytest.raises(rebuild.RebuildError) as err:
                await rebuild.rebuild_from(target, fetcher.connect, "memory:r1")
            assert "\n" not in str(err.value)
            if not is_store(target):  # cut before its first records: nothing is left
                assert "run the same command again" not in str(err.value)
                continue
            assert "run the same command again to go on" in str(err.value)
            token = stream.pending(target)
            assert token and _role(target) == ROLE_REPLICA  # a partial, not a primary
            _verified(target)
            at = _top(target)
            out = await rebuild.rebuild_from(target, fetcher.connect, "memory:r1")
        assert out.resumed == at > 0 and out.checked
        assert out.records == want[1] - at  # the rest, not all again
        assert _state(target)[:3] == want[:3]
        assert _role(target) == roles.ROLE_LIVE and stream.pending(target) == ""
        _verified(target)
        taken_up += 1
    assert taken_up >= 2, "the cuts missed the records: no rebuild was taken up"
    assert "internal error" not in caplog.text  # a cut costs the replica that link only


async def _sent(path: Path) -> bytes:
    """A full send stream of the store at ``path``, with its tree hash."""
    out = io.BytesIO()
    with Store(path) as store:
        await stream.send(store, wire.Connection(wire.FileStream(out)),
                          stream.plan(store, tree=True))
    return out.getvalue()


async def test_a_rebuild_stopped_after_its_stream_or_its_promotion_is_finished(
        tmp_path: Path) -> None:
    primary, replica, target = tmp_path / "primary", tmp_path / "replica", tmp_path / "new"
    await _volume(primary, files=4)
    await _shipped(primary, replica)
    top = _top(replica)
    async with _replica(replica) as (nursery, receiver):
        fetcher = _Fetcher(nursery, receiver, cuts={1: 0})  # the second FETCH goes nowhere
        text = str(await _raises(rebuild.rebuild_from(target, fetcher.connect, "memory:r1")))
        assert "memory:r1: no answer" in text
        assert _role(target) == ROLE_REPLICA and stream.pending(target) == ""
        out = await rebuild.rebuild_from(target, fetcher.connect, "memory:r1")
        assert (out.records, out.resumed, out.finished) == (0, top, False)
        assert _role(target) == roles.ROLE_LIVE
        # killed after the promotion, before it was marked done: only that is left
        with Store(target) as store, store.txn(write=True) as txn:
            store.set_meta(txn, rebuild.REBUILDING, b"memory:r1")
        made = fetcher.made
        out = await rebuild.rebuild_from(target, fetcher.connect, "memory:r1")
        assert out.finished and fetcher.made == made  # nothing asked of the replica
        assert out.epoch == 1  # promoted once
    assert _state(target)[:3] == _state(replica)[:3]


async def _raises(coro: Any) -> rebuild.RebuildError:
    with pytest.raises(rebuild.RebuildError) as err:
        await coro
    assert "\n" not in str(err.value)
    return err.value


async def test_what_a_rebuild_must_not_take_or_touch_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = tmp_path / "ra", tmp_path / "rb"
    await _volume(a, files=6)
    await _volume(b, files=2)
    await _shipped(a, ra)
    await _shipped(b, rb)
    uuid_a, uuid_b, half = _state(ra)[0], _state(rb)[0], len(await _sent(ra)) // 2
    target = tmp_path / "new"
    async with _replica(ra) as (nursery, receiver):
        # a partial rebuild of volume a
        fetcher = _Fetcher(nursery, receiver, cuts={0: half})
        await _raises(rebuild.rebuild_from(target, fetcher.connect, "memory:ra"))
        token = stream.pending(target)
        assert token
        # a forged resume token: the replica refuses it, naming what it does not hold
        ident, after, _ = stream.read_token(token)
        conn = wire.Connection(await fetcher.connect())
        await conn.send(wire.FETCH, {"proto": PROTOCOL, "tree": True,
                                     "resume": stream.make_token(ident, after, bytes(16))})
        await conn.recv(wire.WELCOME)
        with pytest.raises(wire.PeerError, match=f"names record #{after} as this store does "
                                                  "not hold it"):
            await conn.recv(wire.STREAM)
        # another protocol
        conn = wire.Connection(await fetcher.connect())
        await conn.send(wire.FETCH, {"proto": PROTOCOL + 1})
        with pytest.raises(wire.PeerError, match=f"protocol {PROTOCOL + 1} unsupported"):
            await conn.recv(wire.WELCOME)
    async with _replica(rb) as (nursery, receiver):
        fetcher = _Fetcher(nursery, receiver)
        # ... taken up from a replica of another volume: refused, nothing changed
        err = await _raises(rebuild.rebuild_from(target, fetcher.connect, "memory:rb"))
        assert str(err) == f"memory:rb refused: this replica holds volume {uuid_b}, not " \
                           f"{uuid_a}"
        assert stream.pending(target) == token
        # a volume, and a replica that no rebuild made, are never written over
        made = fetcher.made
        err = await _raises(rebuild.rebuild_from(a, fetcher.connect, "memory:rb"))
        assert "holds volume" in str(err) and "already (a primary" in str(err)
        err = await _raises(rebuild.rebuild_from(ra, fetcher.connect, "memory:rb"))
        assert "is a replica of volume" in str(err) and "replica promote" in str(err)
        assert fetcher.made == made  # refused before asking anyone
    # a replica server that has no store yet, or does not serve streams
    empty = Receiver(tmp_path / "none")
    empty.on_fetch = rebuild.answer
    bare = Receiver(ra)
    try:
        async with trio.open_nursery() as nursery:
            for server, why in ((empty, "holds no volume yet"),
                                (bare, "does not serve send streams")):
                err = await _raises(rebuild.rebuild_from(
                    tmp_path / "other", _Fetcher(nursery, server).connect, "memory:x"))
                assert why in str(err) and not (tmp_path / "other").exists()
            nursery.cancel_scope.cancel()
    finally:
        empty.close()
        bare.close()


def test_a_rebuild_from_a_file_goes_on_with_the_same_file(tmp_path: Path) -> None:
    primary, target = tmp_path / "primary", tmp_path / "new"
    trio.run(_volume, primary, 16)
    data = trio.run(_sent, primary)
    whole, cut = tmp_path / "vol.stream", tmp_path / "cut.stream"
    whole.write_bytes(data)
    cut.write_bytes(data[: len(data) * 2 // 3])
    text = _refusal(lambda: rebuild.rebuild_file(target, cut))
    assert "run the same command again to go on" in text
    at = _top(target)
    assert at > 0 and _role(target) == ROLE_REPLICA
    _verified(target)
    # another stream into it: refused; the same stream again: goes on after what it has
    other = tmp_path / "other"
    trio.run(_volume, other, 1)
    (tmp_path / "other.stream").write_bytes(trio.run(_sent, other))
    assert "the stream is of volume" in _refusal(
        lambda: rebuild.rebuild_file(target, tmp_path / "other.stream"))
    assert stream.pending(target)
    out = rebuild.rebuild(target, str(whole))
    assert out.resumed == at and out.checked and not out.finished
    assert out.records == _top(target) - at  # read again, only what it lacked applied
    assert _state(target)[:3] == _state(primary)[:3]
    assert _role(target) == roles.ROLE_LIVE
    _verified(target)
    # a rebuilt store is a volume now: rebuilding into it again is refused
    assert "already (a primary" in _refusal(lambda: rebuild.rebuild(target, str(whole)))
    # a source that is neither a file nor an address
    assert "no such file, and not a HOST:PORT" in _refusal(
        lambda: rebuild.rebuild(tmp_path / "x", str(tmp_path / "missing")))
