"""Replication sessions in-process: the real ``Sender`` and ``Receiver`` on real stores.

A primary store (made with the real volume service) is shipped to a replica store
by the real sender and receiver, joined by ``cdpfs.testing.MemoryLinks`` (trio
in-memory streams instead of TCP and TLS): the first ship creates the replica,
later ones send only new records and missing blocks, a cut link resumes at the
replica's position, another volume or a parted history is refused, bookmarks and
deletions follow, a damaged block is never applied, a record out of turn is
refused, a reconnecting primary replaces its stale session, a silent replica drops
the link, an idle link is kept alive by keepalives (and a silent idle one dropped)
and costs no CPU, status tells a live link from a silent one, a replica whose
records were pruned gets a full resync, and a live volume's fsync waits for its sync
replicas (or, past ``sync_timeout``, marks them degraded until they catch up). No
root, FUSE or network.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cdpfs.errors import CdpfsError
from cdpfs.fs.mutate import init_volume
from cdpfs.history import bookmarks, clones, retention
from cdpfs.history.points import Points, resolve
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.replication import registry, wire
from cdpfs.replication.protocol import (
    ANSWER_TIMEOUT,
    BASE_TABLES,
    IDLE_TIMEOUT,
    KEEPALIVE,
    PROTOCOL,
    record_check,
)
from cdpfs.replication.receiver import BASE_PENDING, ROLE_REPLICA, Receiver
from cdpfs.replication.registry import ReplicaState
from cdpfs.replication.sender import Connect, Sender
from cdpfs.store import codec, epochs, journal
from cdpfs.store.lmdb import Store, is_store
from cdpfs.store.lock import WriterLock
from cdpfs.store.schema import U64
from cdpfs.store.view import View
from cdpfs.testing import FakeClock, MemoryLinks, served
from cdpfs.volume import Mode, Volume, prune

NAME = "r1"
ADDRESS = "memory:r1"
MiB = 1 << 20
CHUNK = 128 << 10  # bytes per write, as FUSE sends them


# --- helpers ---------------------------------------------------------------------------


def _make(path: Path, block_size: int = 128 << 10) -> None:
    init_volume(path, block_size).close()


async def _write(path: Path, files: dict[bytes, bytes] | None = None, *,
                 dirs: tuple[bytes, ...] = (), unlink: tuple[bytes, ...] = (),
                 clock: Callable[[], int] | None = None, **options: Any) -> int:
    """Serve ``path`` live: make ``dirs``, write each file (a new file, or rewritten at
    0 and truncated if it exists; names may be ``dir/name``), unlink ``unlink``;
    everything committed. The newest seq."""
    if clock is not None:
        options["clock"] = clock
    async with served(path, **options) as vol:
        for name in dirs:
            await vol.call(vol.fs.mknod, 1, name, stat.S_IFDIR | 0o755, 0, 0)
        for name, data in (files or {}).items():
            fh = await _open(vol, name)
            for off in range(0, len(data), CHUNK):
                await vol.write(fh, off, data[off:off + CHUNK])
            await vol.fsync(fh)
            await vol.call(vol.fs.release, fh)
        for name in unlink:
            parent, base = await _parent(vol, name)
            await vol.call(vol.fs.unlink, parent, base)
        return int(await vol.call(vol.fs.sync, durable=True))


async def _parent(vol: Volume, name: bytes) -> tuple[int, bytes]:
    parent = 1
    *dirs, base = name.split(b"/")
    for d in dirs:
        parent = (await vol.call(vol.fs.lookup, parent, d)).ino
    return parent, base


async def _open(vol: Volume, name: bytes) -> int:
    parent, base = await _parent(vol, name)
    try:
        entry = await vol.call(vol.fs.lookup, parent, base)
    except CdpfsError:
        fh, _ = await vol.call(vol.fs.create, parent, base, 0o644, os.O_RDWR, 0, 0)
        return int(fh)
    await vol.call(functools.partial(vol.fs.setattr, entry.ino, size=0))
    return int(await vol.call(vol.fs.open, entry.ino, os.O_RDWR))


@dataclass
class Summary:
    uuid: str
    block_size: int
    seqs: list[int]  # every journal record's seq
    top: int
    tree: tuple[str, int]  # tree_hash at top
    blocks: set[bytes]  # block names stored


def _summary_of(store: Store) -> Summary:
    with store.txn() as txn:
        seqs = [U64.unpack(k)[0] for k in txn.cursor(db=store.db["journal"]).iternext(
            values=False)]
        top = journal.last(store, txn)[0]
        blocks = set(txn.cursor(db=store.db["blocks"]).iternext(values=False))
        return Summary(store.uuid, store.block_size, seqs, top, tree_hash(store, txn, top),
                       {bytes(b) for b in blocks})


def _summary(path: Path) -> Summary:
    with Store(path) as store:
        return _summary_of(store)


def _tables(path: Path, names: tuple[str, ...] | None = None) -> dict[str, dict[bytes, bytes]]:
    """Every entry of the named tables (all of them by default)."""
    with Store(path) as store, store.txn() as txn:
        return {name: {bytes(k): bytes(v) for k, v in txn.cursor(db=store.db[name])}
                for name in (names or tuple(store.db))}


def _tree_at(path: Path, seq: int) -> tuple[str, int]:
    with Store(path) as store, store.txn() as txn:
        return tree_hash(store, txn, seq)


@asynccontextmanager
async def _linked(replica: Path, **options: Any) -> AsyncIterator[tuple[MemoryLinks, Receiver]]:
    """A receiver for ``replica`` served over in-memory links (closed afterwards)."""
    receiver = Receiver(replica, **options)
    try:
        async with trio.open_nursery() as nursery:
            links = MemoryLinks(nursery)
            links.add(NAME, receiver)
            try:
                yield links, receiver
            finally:
                nursery.cancel_scope.cancel()
    finally:
        receiver.close()


async def _ship(primary: Path, connect: Connect, attempts: int = 3,
                on_batch: Callable[[ReplicaState], None] | None = None) -> Sender:
    """One ``cdpfs replicate``: ship until the replica has everything."""
    async with served(primary, Mode.SOURCE) as src:
        return await src.ship(NAME, ADDRESS, connect, follow=False, attempts=attempts,
                              on_batch=on_batch)


async def _refused(primary: Path, connect: Connect) -> CdpfsError:
    """The error a ship ends with (Volume.ship runs the sender in a nursery, so it
    comes wrapped in groups of one)."""
    try:
        await _ship(primary, connect)
    except BaseException as exc:
        err: BaseException = exc
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        if not isinstance(err, CdpfsError):
            raise
        return err
    raise AssertionError("the ship was not refused")


async def _eventually(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def _user_marks(store: Store) -> dict[str, tuple[int, int]]:
    with store.txn() as txn:
        return {b.name: (b.seq, b.created_ns) for b in bookmarks.bookmarks(store, txn)}


def _register(primary: Path, mode: str = "sync", **config: Any) -> None:
    with Store(primary) as store, store.txn(write=True) as txn:
        registry.put(store, txn, ReplicaState(NAME, ADDRESS, mode=mode))
        for key, value in config.items():
            store.set_config(txn, key, value)


def _replica_top(receiver: Receiver) -> int:
    assert receiver.store is not None
    with receiver.store.txn() as txn:
        return journal.last(receiver.store, txn)[0]


# --- first and later ships ---------------------------------------------------------------


async def test_first_ship_creates_the_replica_with_the_primarys_identity(
        tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary, block_size=64 << 10)  # not the default: the replica must take it
    top = await _write(primary, {b"big": os.urandom(300_000), b"small": b"s" * 3000,
                                 b"d/inner": b"inner " * 1000, b"empty": b""}, dirs=(b"d",))
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            assert receiver.store is None and not receiver.store_ready.is_set()
            sender = await _ship(primary, links.connect(NAME))
            assert receiver.store_ready.is_set()
            applied = receiver.counters.records_applied
    p, r = _summary(primary), _summary(replica)
    assert (r.uuid, r.block_size) == (p.uuid, 64 << 10)
    assert r.seqs == p.seqs == list(range(1, top + 1))
    assert r.tree == p.tree and r.tree[1] == 6  # root, d, d/inner, big, small, empty
    assert r.blocks == p.blocks
    # The records are kept byte for byte, and the replica is marked as one.
    assert _tables(replica, ("journal",)) == _tables(primary, ("journal",))
    with Store(replica) as store, store.txn() as txn:
        assert store.config(txn, "role") == ROLE_REPLICA
    assert applied == top and sender.state.acked == top and sender.state.records_sent == top
    # A one-off ship registers the replica as manual (a mount does not ship to it).
    with Store(primary) as store, store.txn() as txn:
        state = registry.get(store, txn, NAME)
    assert state is not None and (state.mode, state.acked, state.connected) == ("manual", top,
                                                                              False)


async def test_a_later_ship_sends_only_new_records_and_missing_blocks(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    content = os.urandom(MiB)
    first = await _write(primary, {b"a": content})
    fresh = os.urandom(200_000)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            one = await _ship(primary, links.connect(NAME))
            sent1, records1 = one.state.bytes_sent, one.state.records_sent
            received1 = receiver.counters.bytes_received
            assert sent1 > MiB  # the first ship had to send every block
            # A copy of a (the same blocks) and a new file.
            second = await _write(primary, {b"copy": content, b"fresh": fresh})
            two = await _ship(primary, links.connect(NAME))
            sent2 = two.state.bytes_sent - sent1
            received2 = receiver.counters.bytes_received - received1
            assert two.state.records_sent - records1 == second - first
            assert receiver.counters.records_applied == second
    assert len(fresh) < sent2 < len(fresh) + 100_000, sent2  # the copy's blocks not resent
    assert len(fresh) < received2 < len(fresh) + 100_000, received2
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == p.seqs and r.tree == p.tree and r.blocks == p.blocks


async def test_a_cut_link_resumes_at_the_replicas_position(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    # 40 MiB of blocks: several batches (each at most 8 MiB of blocks), pipelined.
    top = await _write(primary, {b"f%02d" % i: os.urandom(MiB) for i in range(40)})
    cut_at: list[int] = []
    with trio.fail_after(30):
        async with _linked(replica) as (links, receiver):

            def on_batch(state: ReplicaState) -> None:
                if not cut_at:  # the first acknowledgement: more batches are on the way
                    cut_at.append(state.acked)
                    links.nursery.start_soon(links.cut)

            sender = await _ship(primary, links.connect(NAME), attempts=5, on_batch=on_batch)
            assert links.connections == 2
            assert sender.state.acked == top
            # Every record applied exactly once over both connections.
            assert receiver.counters.records_applied == top
    assert cut_at and 0 < cut_at[0] < top
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == list(range(1, top + 1)) == p.seqs
    assert r.tree == p.tree and r.blocks == p.blocks


# --- refusals ------------------------------------------------------------------------------


async def test_a_replica_of_another_volume_refuses(tmp_path: Path) -> None:
    a, b, replica = tmp_path / "a", tmp_path / "b", tmp_path / "replica"
    _make(a)
    _make(b)
    await _write(a, {b"f": b"of a" * 1000})
    await _write(b, {b"f": b"of b" * 1000, b"g": os.urandom(10_000)})
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            await _ship(a, links.connect(NAME))
    before = _tables(replica)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            err = await _refused(b, links.connect(NAME))
            assert "refused" in str(err) and "holds volume" in str(err)
            assert not isinstance(err, wire.WireError)
            assert receiver.counters.records_applied == 0
            assert links.connections == 1  # a refusal is not retried
    assert _tables(replica) == before
    assert _summary(replica).uuid == _summary(a).uuid
    # b never heard from it: nothing registered there.
    with Store(b) as store, store.txn() as txn:
        assert registry.get(store, txn, NAME) is None


@pytest.mark.parametrize("ahead", ["replica", "primary"])
async def test_a_replica_whose_history_parted_is_refused(tmp_path: Path, ahead: str) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    shipped = await _write(primary, {b"f": os.urandom(50_000)})
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            await _ship(primary, links.connect(NAME))
    # The replica is made role-free and written to: its history parts from the primary's.
    with Store(replica) as store, store.txn(write=True) as txn:
        assert txn.delete(b"config.role", db=store.db["meta"])
    own = await _write(replica, {b"mine": b"written on the replica" * 100})
    assert own > shipped
    if ahead == "primary":  # the primary has a record (another) at the replica's position
        top = await _write(primary, {b"g%d" % i: b"later" * 10 for i in range(4)})
        assert top > own
    before = _tables(replica)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            assert "parted" in str(await _refused(primary, links.connect(NAME)))
            assert receiver.counters.records_applied == 0
    assert _tables(replica) == before  # its own records stay
    with Store(primary) as store, store.txn() as txn:
        state = registry.get(store, txn, NAME)
    assert state is not None and "parted" in state.last_error and not state.connected
    assert state.acked == shipped


async def test_a_protocol_mismatch_is_refused_before_the_store_is_made(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    with Store(primary) as store:
        uuid, block_size = store.uuid, store.block_size
    with trio.fail_after(10):
        async with _linked(replica) as (links, receiver):
            conn = wire.Connection(await links.connect(NAME)())
            await conn.send(wire.HELLO, {"proto": PROTOCOL + 1, "uuid": uuid,
                                         "block_size": block_size, "name": NAME})
            with pytest.raises(wire.PeerError, match=f"protocol {PROTOCOL + 1} unsupported"):
                await conn.recv(wire.WELCOME)
            # Anything but a HELLO first drops the link.
            conn = wire.Connection(await links.connect(NAME)())
            await conn.send(wire.OFFER, {"blocks": [], "packs": []})
            with pytest.raises(wire.WireError):
                await conn.recv(wire.WANT)
            assert receiver.store is None
    assert not is_store(replica)


# --- what follows: bookmarks, deletions ---------------------------------------------------


async def test_bookmarks_follow_and_holds_stay_local(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    seqs = [await _write(primary, {b"f": b"version %d " % i * 500}) for i in range(4)]
    with Store(primary) as store, store.txn(write=True) as txn:
        made = {name: bookmarks.put(store, txn, name, seq)
                for name, seq in (("alpha", seqs[0]), ("beta", seqs[2]), ("gamma", seqs[3]))}
        bookmarks.hold(store, txn, "primary-view", seqs[1])  # a hold: not shipped
    want = {name: (m.seq, m.created_ns) for name, m in made.items()}
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            await _ship(primary, links.connect(NAME))
            store = receiver.store
            assert store is not None
            await _eventually("the bookmarks", lambda: _user_marks(store) == want)
            with store.txn(write=True) as txn:  # the replica's own hold
                bookmarks.hold(store, txn, "replica-view", seqs[1])
    with Store(primary) as store, store.txn(write=True) as txn:
        bookmarks.delete(store, txn, "alpha")
        moved = bookmarks.put(store, txn, "beta", seqs[1], replace=True)
        added = bookmarks.put(store, txn, "delta", seqs[0])
    want = {"beta": (moved.seq, moved.created_ns), "gamma": want["gamma"],
            "delta": (added.seq, added.created_ns)}
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            await _ship(primary, links.connect(NAME))
            store = receiver.store
            assert store is not None
            await _eventually("the bookmarks again", lambda: _user_marks(store) == want)
    with Store(replica) as store, store.txn() as txn:
        holds = [m.name for m in bookmarks.all_points(store, txn) if m.is_hold]
        assert holds == [bookmarks.hold_name("replica-view")]
        assert tree_hash(store, txn, want["beta"][0]) == _tree_at(primary, want["beta"][0])


async def test_deletions_follow_and_history_stays(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    before = await _write(primary, {b"a": os.urandom(300_000), b"b": b"bee" * 9000,
                                    b"d/x": b"x" * 7000}, dirs=(b"d",))
    async with served(primary) as vol:
        b = (await vol.call(vol.fs.lookup, 1, b"b")).ino
        await vol.call(vol.fs.setxattr, b, b"user.tag", b"v1")
        await vol.call(vol.fs.sync, durable=True)
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            await _ship(primary, links.connect(NAME))
            async with served(primary) as vol:
                await vol.call(vol.fs.unlink, 1, b"a")
                d = (await vol.call(vol.fs.lookup, 1, b"d")).ino
                await vol.call(vol.fs.unlink, d, b"x")
                await vol.call(vol.fs.rmdir, 1, b"d")
                await vol.call(vol.fs.removexattr, b, b"user.tag")
                await vol.call(functools.partial(vol.fs.setattr, b, size=10))
                after = int(await vol.call(vol.fs.sync, durable=True))
            await _ship(primary, links.connect(NAME))
    p, r = _summary(primary), _summary(replica)
    assert r.top == p.top == after and r.tree == p.tree and r.tree[1] == 2  # root and b
    with Store(replica) as store, store.txn() as txn:
        now, then = View(store, txn, after), View(store, txn, before)
        assert now.lookup(1, b"a") is None and now.lookup(1, b"d") is None
        assert now.xattr(b, b"user.tag") is None and now.read_file("b") == b"beebeebeeb"
        assert then.read_file("d/x") == b"x" * 7000 and then.lookup(1, b"a") is not None
    assert _tree_at(replica, before) == _tree_at(primary, before)


# --- damage on the wire ---------------------------------------------------------------------


class _Once:
    """Whether the damage is still to be done (shared by every connection)."""

    def __init__(self) -> None:
        self.armed = True
        self.damaged: bytes = b""


class _Corrupting(trio.abc.Stream):
    """A link that flips one byte of the first large piece it carries, once."""

    def __init__(self, inner: trio.abc.Stream, once: _Once) -> None:
        self.inner = inner
        self.once = once

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.once.armed and len(data) > 64 << 10 and bytes(data[:2]) != wire.MAGIC:
            self.once.armed = False
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            data = self.once.damaged = bytes(damaged)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_block_damaged_on_the_wire_is_never_applied(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    top = await _write(primary, {b"a": os.urandom(MiB), b"b": os.urandom(MiB)})
    once = _Once()
    caplog.set_level(logging.WARNING, "cdpfs.replication")
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            plain = links.connect(NAME)

            async def connect() -> trio.abc.Stream:
                return _Corrupting(await plain(), once)

            sender = await _ship(primary, connect, attempts=3)
            assert not once.armed and len(once.damaged) > CHUNK  # a whole stored block
            assert links.connections == 2  # dropped, then sent again
            assert sender.state.acked == top
            assert receiver.counters.records_applied == top  # none of the damaged batch
    assert any("received a damaged block" in r.getMessage() for r in caplog.records)
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == p.seqs and r.tree == p.tree and r.blocks == p.blocks
    with Store(replica) as store, store.txn() as txn:
        for name, stored in txn.cursor(db=store.db["blocks"]):
            codec.check(stored, bytes(name))  # every block is what its name says
            assert bytes(stored) != once.damaged


# --- records out of turn, stale sessions ------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 2], ids=["again", "gap"])
async def test_a_record_out_of_turn_is_refused(tmp_path: Path, offset: int,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A primary (here: frames made by hand) sending the replica's own last record
    again, or one past a gap: the link drops and nothing of the batch is applied."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    shipped = await _write(primary, {b"f": b"one" * 1000})
    top = await _write(primary, {b"g": b"two" * 1000, b"h": b"three" * 1000})
    assert top >= shipped + 2
    with Store(primary) as store, store.txn() as txn:
        uuid, block_size = store.uuid, store.block_size
        raw = {seq: bytes(txn.get(U64.pack(seq), db=store.db["journal"]))
               for seq in range(1, top + 1)}
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            conn = wire.Connection(await links.connect(NAME)())
            await conn.send(wire.HELLO, {"proto": PROTOCOL, "uuid": uuid,
                                         "block_size": block_size, "name": NAME})
            _, welcome = await conn.recv(wire.WELCOME)
            assert welcome["acked"] == 0 and welcome["uuid"] == uuid
            # Record #1 (the root; it references no blocks) is taken.
            await conn.send(wire.OFFER, {"blocks": [], "packs": []})
            await conn.recv(wire.WANT)
            await conn.send(wire.DATA, {"records": [[1, raw[1]]]})
            assert await conn.recv(wire.ACK) == (wire.ACK, {"seq": 1})
            seq = 1 + offset  # 1 again, or 3 with 2 missing
            await conn.send(wire.OFFER, {"blocks": [], "packs": []})
            await conn.recv(wire.WANT)
            await conn.send(wire.DATA, {"records": [[seq, raw[seq]]]})
            with pytest.raises(wire.WireError):
                await conn.recv(wire.ACK)
            assert any(f"record #{seq} out of order (this store is at #1)" in r.getMessage()
                       for r in caplog.records)
            assert _replica_top(receiver) == 1 and receiver.counters.records_applied == 1
            # A real ship then completes from #1.
            sender = await _ship(primary, links.connect(NAME))
            assert sender.state.records_sent == top - 1
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == p.seqs and r.tree == p.tree


async def test_a_reconnecting_primary_replaces_its_stale_session(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    top = await _write(primary, {b"f": os.urandom(400_000)})
    with Store(primary) as store:
        uuid, block_size = store.uuid, store.block_size
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            stale = wire.Connection(await links.connect(NAME)())
            await stale.send(wire.HELLO, {"proto": PROTOCOL, "uuid": uuid,
                                          "block_size": block_size, "name": NAME})
            await stale.recv(wire.WELCOME)  # a session, then silence (a dead link)
            sender = await _ship(primary, links.connect(NAME), attempts=1)
            assert sender.state.acked == top
            with pytest.raises(wire.WireError):  # the stale one was dropped
                await stale.recv()
    assert _summary(replica).tree == _summary(primary).tree


@pytest.fixture
def jumping_clock() -> trio.testing.MockClock:
    """Virtual time that jumps to the next deadline once trio has waited 0.5 s of real
    time, so a 30 s timeout takes a moment. Waiting on a thread counts as waiting: a
    state save's fsync, slow on a busy machine, must not let the clock jump past the
    timers the code under test is about to start (a test's guard would fire)."""
    return trio.testing.MockClock(autojump_threshold=0.5)


async def test_a_replica_that_never_welcomes_drops_the_link(
        tmp_path: Path, jumping_clock: trio.testing.MockClock) -> None:
    """A replica that takes the connection and the HELLO, then moves no byte (a hung
    process, a partition): the sender owes nothing, the replica owes WELCOME. After
    ANSWER_TIMEOUT of silence the link is dropped and, attempts spent, the sender
    gives up (docs: "a peer that owes an answer and moves no byte for 30 s also drops
    the link")."""
    primary = tmp_path / "primary"
    _make(primary)
    silent: list[trio.abc.Stream] = []

    async def connect() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        silent.append(theirs)
        return ours

    with Store(primary) as store:
        sender = Sender(store, NAME, ADDRESS, connect)
        start = trio.current_time()
        with trio.move_on_after(ANSWER_TIMEOUT * 4) as hung, \
                pytest.raises(CdpfsError, match=NAME):
            await sender.run(follow=False, attempts=1)
        assert not hung.cancelled_caught, "the sender waits for WELCOME forever"
        assert ANSWER_TIMEOUT <= trio.current_time() - start < ANSWER_TIMEOUT * 2
        assert len(silent) == 1 and sender.state.last_error


async def test_a_replica_that_welcomes_then_fails_is_not_retried_at_once(
        tmp_path: Path, jumping_clock: trio.testing.MockClock) -> None:
    """A replica that welcomes every connection and then drops it acknowledges
    nothing: each retry waits longer, and with attempts the sender gives up, as for
    a replica that cannot be reached (a WELCOME is not progress)."""
    primary = tmp_path / "primary"
    _make(primary)
    await _write(primary, {b"f": b"x" * 1000})
    times: list[float] = []

    async def welcome_then_drop(stream: trio.abc.Stream) -> None:
        conn = wire.Connection(stream)
        _, hello = await conn.recv(wire.HELLO)
        await conn.send(wire.WELCOME, {"uuid": hello["uuid"], "acked": 0})
        await stream.aclose()

    async def connect() -> trio.abc.Stream:
        times.append(trio.current_time())
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(welcome_then_drop, theirs)
        return ours

    with Store(primary) as store:
        async with trio.open_nursery() as nursery:
            sender = Sender(store, NAME, ADDRESS, connect)
            with trio.move_on_after(60) as spun, pytest.raises(CdpfsError, match=NAME):
                await sender.run(follow=False, attempts=4)
    assert not spun.cancelled_caught, "a replica that only welcomes is retried for ever"
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0], gaps


# --- keepalives and the link's state ---------------------------------------------------------


def _saved(store: Store) -> ReplicaState:
    with store.txn() as txn:
        state = registry.get(store, txn, NAME)
    assert state is not None
    return state


async def test_an_idle_link_is_kept_alive_and_its_answers_saved(
        tmp_path: Path, jumping_clock: trio.testing.MockClock) -> None:
    """A replica that has everything gets a PING after KEEPALIVE seconds without an
    answer and answers PONG: the link stays up however long it is idle, the sender
    always heard from it lately, and each answer is saved for status."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    await _write(primary, {b"f": os.urandom(100_000)})
    # Virtual time stands still while the replica store is made and filled (threads
    # that take real time must not let a timeout jump by), then jumps while idle.
    jumping_clock.autojump_threshold = math.inf
    async with _linked(replica) as (links, _):
        with Store(primary) as store:
            sender = Sender(store, NAME, ADDRESS, links.connect(NAME))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                await sender.caught_up.wait()
                first = _saved(store).heard_ns
                jumping_clock.autojump_threshold = 0.2
                idle = IDLE_TIMEOUT * 3
                silences, answers = [], set()
                for _ in range(int(idle / 2)):
                    await trio.sleep(2)
                    silences.append(trio.current_time() - sender.heard_at)
                    answers.add(sender.heard_at)
                saved = _saved(store)
                nursery.cancel_scope.cancel()
    assert links.connections == 1 and saved.connected  # never dropped
    # Answered about every KEEPALIVE (virtual time may jump while a save's fsync
    # takes real time, so the bounds leave room), never near IDLE_TIMEOUT.
    assert len(answers) >= idle / KEEPALIVE / 2 and max(silences) < IDLE_TIMEOUT / 2, \
        (len(answers), silences)
    assert saved.heard_ns > first  # and saved: status sees a live replica
    assert registry.link(saved, saved.heard_ns, 0).state == registry.CONNECTED


async def _mute_replica(stream: trio.abc.Stream, store: Store, got: list[int],
                        say: tuple[tuple[int, Any], ...] = ()) -> None:
    """A replica that welcomes with the primary's own position (so it has everything),
    sends ``say``, then takes every frame and answers none (a cut, a hung process)."""
    conn = wire.Connection(stream)
    _, hello = await conn.recv(wire.HELLO)
    with store.txn() as txn:
        top = journal.last(store, txn)[0]
        check = record_check(txn, store, top)
    await conn.send(wire.WELCOME, {"acked": top, "uuid": hello["uuid"], "check": check})
    for kind, body in say:
        await conn.send(kind, body)
    try:
        while True:
            got.append((await conn.recv_frame())[0])
    except (wire.WireError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_a_silent_idle_replica_is_dropped_and_reconnected(
        tmp_path: Path, jumping_clock: trio.testing.MockClock) -> None:
    """An idle link whose replica answers no PING (a cut while nothing was being
    shipped: no send fails, no timeout ran) is dropped IDLE_TIMEOUT after the last
    answer and reconnected like any broken link; attempts spent, the sender gives up."""
    primary = tmp_path / "primary"
    _make(primary)
    await _write(primary, {b"f": b"x" * 1000})
    got: list[int] = []
    times: list[float] = []

    async def connect() -> trio.abc.Stream:
        times.append(trio.current_time())
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(_mute_replica, theirs, store, got)
        return ours

    with Store(primary) as store:
        async with trio.open_nursery() as nursery:
            sender = Sender(store, NAME, ADDRESS, connect)
            with trio.move_on_after(IDLE_TIMEOUT * 6) as hung, \
                    pytest.raises(CdpfsError, match=NAME):
                await sender.run(follow=True, attempts=2)
            nursery.cancel_scope.cancel()
        saved = _saved(store)
    assert not hung.cancelled_caught, "a silent idle link is kept for ever"
    assert len(times) == 2 and wire.PING in got
    assert IDLE_TIMEOUT <= times[1] - times[0] <= IDLE_TIMEOUT + 1, times
    assert "no answer" in saved.last_error and not saved.connected


@pytest.mark.parametrize(("body", "why"), [({"id": 9}, "PONG 9 answers no PING"),
                                           ({"id": 0}, "PONG 0 answers no PING"),
                                           ({"id": "9"}, "undecodable PONG frame")])
async def test_a_pong_that_answers_no_ping_or_is_malformed_drops_the_link(
        tmp_path: Path, body: dict[str, Any], why: str) -> None:
    primary = tmp_path / "primary"
    _make(primary)
    await _write(primary, {b"f": b"x" * 1000})

    async def connect() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(_mute_replica, theirs, store, [], ((wire.PONG, body),))
        return ours

    with trio.fail_after(20), Store(primary) as store:
        async with trio.open_nursery() as nursery:
            sender = Sender(store, NAME, ADDRESS, connect)
            with pytest.raises(CdpfsError, match=NAME):
                await sender.run(follow=True, attempts=1)
            nursery.cancel_scope.cancel()
    assert why in sender.state.last_error and not sender.state.connected


async def test_a_replica_answers_ping_and_refuses_a_malformed_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    with Store(primary) as store:
        uuid, block_size = store.uuid, store.block_size
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            conn = wire.Connection(await links.connect(NAME)())
            await conn.send(wire.HELLO, {"proto": PROTOCOL, "uuid": uuid,
                                         "block_size": block_size, "name": NAME})
            await conn.recv(wire.WELCOME)
            await conn.send(wire.PING, {"id": 7})
            assert await conn.recv() == (wire.PONG, {"id": 7})
            await conn.send(wire.PING, {"id": -7})
            with pytest.raises(wire.WireError):  # the connection is dropped
                await conn.recv()
    assert "undecodable PING frame" in caplog.text


class _Steps(trio.abc.Instrument):
    """Counts the steps trio's tasks take."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_an_idle_link_past_the_answer_timeout_costs_no_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing moved for longer than ANSWER_TIMEOUT and nothing is owed (the keepalive
    put off here): the watchdog sleeps. It used to wake at once, again and again (a
    sleep until a moment past): a core spent by an idle primary."""
    from cdpfs.replication import sender as sender_module
    monkeypatch.setattr(sender_module, "ANSWER_TIMEOUT", 0.1)
    monkeypatch.setattr(sender_module, "KEEPALIVE", 3600.0, raising=False)
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            with Store(primary) as store:
                sender = Sender(store, NAME, ADDRESS, links.connect(NAME))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender.run)
                    await sender.caught_up.wait()
                    await trio.sleep(0.3)  # idle past ANSWER_TIMEOUT
                    steps = _Steps()
                    trio.lowlevel.add_instrument(steps)
                    await trio.sleep(0.5)
                    trio.lowlevel.remove_instrument(steps)
                    nursery.cancel_scope.cancel()
    assert links.connections == 1 and steps.steps < 50, steps.steps


def test_status_tells_a_live_link_from_a_silent_one() -> None:
    """``registry.link``: what the saved state means at a moment. A replica that
    answered lately is connected, with a rate and an ETA while it is behind; one
    silent past SILENT_AFTER (a cut: its sender saves nothing new) is named silent
    for as long as it is, with neither; a replica never saved with ``heard_ns`` is
    judged by its last save."""
    now = time.time_ns()
    s = 1_000_000_000
    live = ReplicaState(NAME, ADDRESS, connected=True, heard_ns=now - s, rate=45.4e6)
    moving = registry.link(live, now, lag=100)
    assert (moving.state, moving.words(), moving.moving) == ("connected", "connected", True)
    assert moving.rate == 45.4e6 and moving.eta(int(3 * 45.4e6)) == pytest.approx(3)
    idle = registry.link(live, now, lag=0)
    assert idle.words() == "connected" and not idle.moving and idle.eta(1000) is None
    cut = ReplicaState(NAME, ADDRESS, connected=True, heard_ns=now - 20 * s, rate=45.4e6)
    silent = registry.link(cut, now, lag=100)
    assert (silent.state, silent.words()) == (registry.SILENT, "no answer for 20s")
    assert not silent.moving and silent.rate == 0 and silent.eta(1000) is None
    edge = registry.link(cut, cut.heard_ns + int(registry.SILENT_AFTER * s), lag=100)
    assert edge.state == registry.CONNECTED
    down = ReplicaState(NAME, ADDRESS, connected=False, heard_ns=now - s, rate=45.4e6)
    gone = registry.link(down, now, lag=100)
    assert gone.words() == "not connected" and gone.eta(1000) is None
    old = ReplicaState(NAME, ADDRESS, connected=True, updated_ns=now - 30 * s)
    assert registry.link(old, now, lag=0).words() == "no answer for 30s"


# --- full resync ------------------------------------------------------------------------------


def _thin(primary: Path, now_ns: int, **config: Any) -> None:
    """Keep every record for 1 s only, then prune as of ``now_ns``."""
    with Store(primary) as store:
        with store.txn(write=True) as txn:
            retention.save_policy(store, txn, retention.Policy(keep_all=1))
            for key, value in config.items():
                store.set_config(txn, key, value)
        result = prune(store, now_ns=now_ns)
    assert result.records > 0


def _history_tables(path: Path) -> dict[str, dict[bytes, bytes]]:
    return _tables(path, BASE_TABLES)


async def _thinned(primary: Path, clock: FakeClock, mark_at: int) -> tuple[list[int], int]:
    """A volume whose early journal is thinned (a bookmark at ``mark_at`` kept): its
    journal's seqs and the newest."""
    _make(primary)
    for i in range(6):
        await _write(primary, {b"f%d" % (i % 3): os.urandom(40_000)}, clock=clock)
    with Store(primary) as store, store.txn(write=True) as txn:
        bookmarks.put(store, txn, "early", mark_at)
    clock.advance(7200)
    _thin(primary, clock())
    seqs = _summary(primary).seqs
    assert mark_at in seqs and len(seqs) < seqs[-1]  # holes in the journal
    return seqs, seqs[-1]


async def test_a_replica_joining_a_thinned_volume_gets_a_full_resync(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    clock = FakeClock()  # stands still: every record of the same minute
    seqs, top = await _thinned(primary, clock, mark_at=3)
    assert seqs[0] > 1  # the journal no longer starts at #1
    caplog.set_level(logging.INFO, "cdpfs.replication")
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            sender = await _ship(primary, links.connect(NAME))
            assert sender.state.acked == top
            assert receiver.counters.records_applied == 0  # history came as tables
    logs = [r.getMessage() for r in caplog.records]
    assert any("needs a full resync" in m for m in logs)
    assert any(f"full resync to #{top} done" in m for m in logs)
    assert _history_tables(replica) == _history_tables(primary)
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == p.seqs and r.tree == p.tree
    assert _tree_at(replica, 3) == _tree_at(primary, 3)  # the bookmarked point came along
    with Store(replica) as store, store.txn() as txn:
        assert txn.get(BASE_PENDING, db=store.db["meta"]) is None
    # Then ordinary records follow, without another resync.
    caplog.clear()
    newer = await _write(primary, {b"later": b"after the resync" * 100}, clock=clock)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            await _ship(primary, links.connect(NAME))
            assert receiver.counters.records_applied == newer - top
    assert not any("full resync" in r.getMessage() for r in caplog.records)
    p, r = _summary(primary), _summary(replica)
    assert r.seqs == p.seqs and r.tree == p.tree


async def test_a_full_resync_acknowledges_nothing_before_the_base_is_there(
        tmp_path: Path) -> None:
    """A sync write waits for its replica's acknowledgement: during a full resync
    the replica holds nothing of the base until its end, so no position may count as
    acknowledged before then (retention still keeps what comes after the base)."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _, top = await _thinned(primary, FakeClock(), mark_at=3)
    expected = _tree_at(primary, top)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            with Store(primary) as store:
                sender = Sender(store, NAME, ADDRESS, links.connect(NAME))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(sender.run, attempts=1))
                    await sender.wait_acked(top)
                    assert receiver.store is not None
                    with receiver.store.txn() as txn:
                        assert txn.get(BASE_PENDING, db=receiver.store.db["meta"]) is None, \
                            "acknowledged while the base was still on its way"
                        assert tree_hash(receiver.store, txn, top) == expected
                    nursery.cancel_scope.cancel()
                with store.txn() as txn:
                    assert registry.needed_after(store, txn) == top


async def test_a_hole_after_the_replicas_position_gets_a_full_resync(
        tmp_path: Path) -> None:
    """The journal thinned with its first record kept (bookmarked): the record after
    the replica's position is there, a later one is not. A full resync is still due
    (docs: "when the records after a replica's position are no longer in the
    journal"), not a refusal."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    clock = FakeClock()
    seqs, top = await _thinned(primary, clock, mark_at=1)
    assert seqs[:2] == [1, 2]  # #1 and #2 are there, then a hole
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            sender = await _ship(primary, links.connect(NAME))
            assert sender.state.acked == top
    assert _history_tables(replica) == _history_tables(primary)
    assert _tree_at(replica, top) == _tree_at(primary, top)


async def test_a_replica_let_go_gets_a_full_resync_of_what_differs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    clock = FakeClock()
    kept = os.urandom(2 * MiB)
    shipped = await _write(primary, {b"kept": kept, b"small": b"first"}, clock=clock)
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            await _ship(primary, links.connect(NAME))
    before = _history_tables(replica)
    # The replica goes away; the primary writes on, lets it go (max lag 1) and prunes.
    fresh = os.urandom(300_000)
    for i in range(5):  # each rewrite supersedes the one before: the records go
        await _write(primary, {b"small": b"line %d\n" % i * 50}, clock=clock)
    await _write(primary, {b"fresh": fresh}, clock=clock)
    clock.advance(7200)
    _thin(primary, clock(), replica_max_lag=1)
    with Store(primary) as store, store.txn() as txn:
        assert journal.get(store, txn, shipped + 1) is None
        top = journal.last(store, txn)[0]
        sent_before = registry.get(store, txn, NAME).bytes_sent  # type: ignore[union-attr]
    caplog.set_level(logging.INFO, "cdpfs.replication")
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            sender = await _ship(primary, links.connect(NAME))
    assert any("needs a full resync" in r.getMessage() for r in caplog.records)
    sent = sender.state.bytes_sent - sent_before
    assert len(fresh) < sent < len(fresh) + MiB // 2, sent  # kept's blocks were there
    # The primary's history is laid over the replica's, which keeps its own older
    # history: every entry the primary has is there, the same, and whatever else the
    # replica holds it held before.
    theirs, mine = _history_tables(primary), _history_tables(replica)
    for table, entries in theirs.items():
        assert entries.items() <= mine[table].items(), table
        assert set(mine[table]) - set(entries) <= set(before[table]), table
    p, r = _summary(primary), _summary(replica)
    assert r.top == p.top == top and r.tree == p.tree and p.blocks <= r.blocks
    with Store(primary) as store, store.txn() as txn:
        kept = [seq for seq in p.seqs if Points(store, txn, clock()).is_kept(seq)]
    for seq in kept:  # every point the primary kept reads the same on the replica
        assert _tree_at(replica, seq) == _tree_at(primary, seq), seq


# --- a live volume's fan-out, sync mode ----------------------------------------------------------


async def test_fsync_returns_once_the_sync_replica_holds_the_record(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    await _write(primary, {b"before": os.urandom(100_000)})
    _register(primary, mode="sync")
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver), \
                served(primary, connector=links.connector) as vol:
            assert vol.fanout is not None and vol.store is not None
            fh, _ = await vol.call(vol.fs.create, 1, b"f", 0o644, os.O_RDWR, 0, 0)
            for i in range(5):
                await vol.write(fh, i * CHUNK, os.urandom(CHUNK))
                await vol.fsync(fh)
                with vol.store.txn() as txn:
                    top = journal.last(vol.store, txn)[0]
                assert receiver.store is not None
                assert _replica_top(receiver) == top, i  # already there on return
            assert vol.fanout.degraded == set()
            assert vol.counters.records_shipped == top
            assert receiver.counters.records_applied == top
            assert vol.counters.bytes_shipped > 5 * CHUNK
            assert {n: lag.records for n, lag in vol.lag().items()} == {NAME: 0}
    assert _summary(replica).tree == _summary(primary).tree


class _Silent:
    """A connector to a replica that takes the connection and never answers, until
    ``revive``: then the links to the real receiver."""

    def __init__(self, links: MemoryLinks) -> None:
        self.links = links
        self.alive = False
        self.delay = 0.0
        self.dead: list[trio.abc.Stream] = []

    def connector(self, store: Store, state: ReplicaState) -> Connect:
        real = self.links.connect(state.name)

        async def connect() -> trio.abc.Stream:
            if self.alive:
                stream = await real()
                return _Late(stream, self.delay) if self.delay else stream
            ours, theirs = trio.testing.memory_stream_pair()
            self.dead.append(theirs)  # nobody reads it
            return ours

        return connect

    async def revive(self, delay: float = 0.0) -> None:
        """Answer again (each answer ``delay`` seconds late, as over a long link)."""
        self.alive, self.delay = True, delay
        for stream in self.dead:
            await trio.aclose_forcefully(stream)


class _Late(trio.abc.Stream):
    """A link whose answers arrive ``delay`` seconds after they were sent."""

    def __init__(self, inner: trio.abc.Stream, delay: float) -> None:
        self.inner, self.delay = inner, delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        await trio.sleep(self.delay)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _fsync_took(vol: Volume, fh: int, off: int) -> float:
    await vol.write(fh, off, os.urandom(4096))
    start = trio.current_time()
    await vol.fsync(fh)
    return trio.current_time() - start


async def test_a_silent_sync_replica_is_degraded_after_the_timeout(tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    _register(primary, mode="sync", sync_timeout=0.5)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            silent = _Silent(links)
            async with served(primary, connector=silent.connector) as vol:
                assert vol.fanout is not None
                fh, _ = await vol.call(vol.fs.create, 1, b"f", 0o644, os.O_RDWR, 0, 0)
                took = await _fsync_took(vol, fh, 0)
                assert 0.5 <= took < 2.0, took
                assert vol.fanout.degraded == {NAME}
                took = await _fsync_took(vol, fh, 4096)  # no longer waited for
                assert took < 0.4, took
                assert vol.counters.records_shipped == 0
                assert silent.dead and receiver.store is None


async def test_a_degraded_sync_replica_is_waited_for_again_once_caught_up(
        tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    _register(primary, mode="sync", sync_timeout=0.5)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            silent = _Silent(links)
            async with served(primary, connector=silent.connector) as vol:
                assert vol.fanout is not None and vol.store is not None
                fh, _ = await vol.call(vol.fs.create, 1, b"f", 0o644, os.O_RDWR, 0, 0)
                await _fsync_took(vol, fh, 0)
                assert vol.fanout.degraded == {NAME}
                await silent.revive()  # the replica answers again: the sender reconnects
                sender = vol.fanout.senders[NAME]
                with vol.store.txn() as txn:
                    top = journal.last(vol.store, txn)[0]
                await _eventually("the replica to catch up", lambda: sender.state.acked >= top)
                for i in range(3):  # caught up: each fsync waits for it again
                    await _fsync_took(vol, fh, (i + 1) * 4096)
                    with vol.store.txn() as txn:
                        top = journal.last(vol.store, txn)[0]
                    assert _replica_top(receiver) == top, i
                assert vol.fanout.degraded == set()
                assert vol.counters.records_shipped == receiver.counters.records_applied == top



async def test_a_degraded_sync_replica_is_back_in_sync_with_no_fsync_after_it(
        tmp_path: Path) -> None:
    """Writes stopped while the replica was away: once it has acknowledged every fsync
    that returned without it, it counts as in sync (HA may promote it) though no
    fsync comes to notice."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    _register(primary, mode="sync", sync_timeout=0.5)
    with trio.fail_after(20):
        async with _linked(replica) as (links, receiver):
            silent = _Silent(links)
            async with served(primary, connector=silent.connector) as vol:
                assert vol.fanout is not None and vol.store is not None
                fh, _ = await vol.call(vol.fs.create, 1, b"f", 0o644, os.O_RDWR, 0, 0)
                await _fsync_took(vol, fh, 0)
                assert vol.fanout.in_sync() == []
                await silent.revive()
                await _eventually("the replica back in sync",
                                  lambda: vol.fanout.in_sync() == [NAME])
                with vol.store.txn() as txn:
                    top = journal.last(vol.store, txn)[0]
                assert _replica_top(receiver) == top


async def test_a_degraded_sync_replica_gets_back_in_while_fsyncs_go_on_back_to_back(
        tmp_path: Path) -> None:
    """Writes that go on, over a long link: each fsync returns without the
    degraded replica, which is always a round trip behind the newest one; it must
    still get back in sync, with every fsync that returned."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    _register(primary, mode="sync", sync_timeout=0.5)
    with trio.fail_after(30):
        async with _linked(replica) as (links, receiver):
            silent = _Silent(links)
            await silent.revive(delay=0.01)
            async with served(primary, connector=silent.connector) as vol:
                assert vol.fanout is not None and vol.store is not None
                fh, _ = await vol.call(vol.fs.create, 1, b"f", 0o644, os.O_RDWR, 0, 0)
                await _fsync_took(vol, fh, 0)
                assert vol.fanout.in_sync() == [NAME]
                silent.alive = False  # the link drops; the replica no longer answers
                await links.cut()
                await _fsync_took(vol, fh, 4096)
                assert vol.fanout.degraded == {NAME}
                await silent.revive(delay=0.01)  # back, each answer after the next fsync
                off, until = 8192, trio.current_time() + 10
                while vol.fanout.degraded and trio.current_time() < until:
                    await _fsync_took(vol, fh, off % (1 << 20))
                    off += 4096
                    await trio.sleep(0.01)  # a steady stream the replica keeps up with
                assert vol.fanout.degraded == set(), "never taken back while writes went on"
                assert vol.fanout.in_sync() == [NAME]
                with vol.store.txn() as txn:  # and it has every fsync that returned
                    top = journal.last(vol.store, txn)[0]
                assert _replica_top(receiver) == top


# --- epochs: a primary that lost its role, a replica that follows a new one ------------


def _promote(path: Path, epoch: int) -> list[tuple[int, int]]:
    """What a promotion does to a store: a new epoch, and the store writable."""
    with Store(path) as store, store.txn(write=True) as txn:
        txn.delete(b"config.role", db=store.db["meta"])
        return epochs.begin(store, txn, epoch)


def _as_replica(path: Path) -> None:
    with Store(path) as store, store.txn(write=True) as txn:
        store.set_config(txn, "role", ROLE_REPLICA)


def _lineage(path: Path) -> tuple[list[tuple[int, int]], int]:
    with Store(path) as store, store.txn() as txn:
        return epochs.lineage(store, txn), epochs.seen(store, txn)


@pytest.mark.parametrize(("mine", "theirs", "last", "shared"), [
    ([(0, 1)], [(0, 1)], 50, 50),  # one lineage: all shared
    ([(0, 1)], [(0, 1), (1, 41)], 50, 40),  # they were promoted at 41; my 41..50 diverged
    ([(0, 1)], [(0, 1), (1, 61)], 50, 50),  # promoted after my last record: nothing lost
    ([(0, 1), (1, 41)], [(0, 1)], 50, 40),  # I was promoted at 41, they never saw it
    ([(0, 1), (1, 41)], [(0, 1), (2, 31)], 50, 30),  # two promotions of one epoch's replicas
    ([(0, 1), (2, 31)], [(0, 1), (2, 31), (3, 45)], 50, 44),
])
def test_the_fork_of_two_lineages(mine, theirs, last, shared) -> None:
    assert epochs.fork(mine, theirs, last) == shared
    assert epochs.valid(mine) and epochs.valid(theirs)


def test_an_epoch_starts_at_the_next_record_and_only_ever_grows(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    _make(path)
    trio.run(_write, path, {b"f": b"x" * 1000})
    with Store(path) as store, store.txn(write=True) as txn:
        top = journal.last(store, txn)[0]
        assert epochs.lineage(store, txn) == [(0, 1)] and epochs.seen(store, txn) == 0
        assert epochs.begin(store, txn, 3) == [(0, 1), (3, top + 1)]
        for stale in (3, 2):
            with pytest.raises(ValueError):
                epochs.begin(store, txn, stale)
        assert epochs.begin(store, txn, 4) == [(0, 1), (4, top + 1)]  # 3 wrote nothing
        assert epochs.epoch_of(epochs.lineage(store, txn), top) == 0
        assert epochs.epoch_of(epochs.lineage(store, txn), top + 1) == 4
    assert not epochs.valid([]) and not epochs.valid([[1, 5], [1, 9]])
    assert not epochs.valid([[0, 1], [2, 1]])


async def test_a_replica_follows_the_promoted_replica_without_a_resync(tmp_path: Path) -> None:
    """A ships to R and S; R is promoted (epoch 1) and writes; R then ships to S, which
    was never ahead of it: S resumes at its own position with R's lineage."""
    a, r, s = tmp_path / "a", tmp_path / "r", tmp_path / "s"
    _make(a)
    shipped = await _write(a, {b"f": os.urandom(40_000)})
    for replica in (r, s):
        with trio.fail_after(20):
            async with _linked(replica) as (links, _):
                await _ship(a, links.connect(NAME))
    line = _promote(r, 1)
    assert line == [(0, 1), (1, shipped + 1)]
    top = await _write(r, {b"after failover": b"new primary" * 100})
    with trio.fail_after(20):
        async with _linked(s) as (links, receiver):
            await _ship(r, links.connect(NAME))
            assert receiver.counters.records_applied == top - shipped
    assert _lineage(s) == (line, 1)
    assert _tree_at(s, top) == _tree_at(r, top)


async def test_a_primary_of_an_older_epoch_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    """The fencing of replicas: once a replica has seen epoch 1, the primary of epoch 0
    (paused or cut off while another node was promoted) gets nothing onto it."""
    a, r, s = tmp_path / "a", tmp_path / "r", tmp_path / "s"
    _make(a)
    await _write(a, {b"f": os.urandom(40_000)})
    for replica in (r, s):
        with trio.fail_after(20):
            async with _linked(replica) as (links, _):
                await _ship(a, links.connect(NAME))
    _promote(r, 1)
    await _write(r, {b"g": b"epoch 1" * 100})
    with trio.fail_after(20):
        async with _linked(s) as (links, _):
            await _ship(r, links.connect(NAME))
    await _write(a, {b"zombie": b"written by the old primary" * 100})
    before = _tables(s)
    with trio.fail_after(20):
        async with _linked(s) as (links, receiver):
            err = await _refused(a, links.connect(NAME))
            assert "epoch 0 is refused" in str(err) and "seen epoch 1" in str(err)
            assert "\n" not in str(err)
            assert receiver.counters.records_applied == 0
            assert links.connections == 1  # a refusal is not retried
    assert _tables(s) == before


async def _parted(a: Path, r: Path) -> tuple[int, int, int]:
    """A ships to R; R is promoted (epoch 1) and writes; A, not knowing, writes on and
    is then made a replica: (seq shipped, R's newest seq, A's newest seq)."""
    _make(a)
    shipped = await _write(a, {b"f": os.urandom(40_000)})
    with trio.fail_after(20):
        async with _linked(r) as (links, _):
            await _ship(a, links.connect(NAME))
    _promote(r, 1)
    top_r = await _write(r, {b"g": b"epoch 1" * 100})
    own = await _write(a, {b"zombie": b"written by the old primary" * 100})
    assert own > shipped
    return shipped, top_r, own


async def test_an_old_primary_that_wrote_on_is_told_where_history_parted(
        tmp_path: Path) -> None:
    """A wrote after R was promoted: shipping from R to A is refused with the fork
    point, and A keeps every record it wrote (failback keeps them, never drops them)."""
    a, r = tmp_path / "a", tmp_path / "r"
    shipped, _, own = await _parted(a, r)
    _as_replica(a)
    before = _tables(a)
    with trio.fail_after(20):
        async with _linked(a) as (links, receiver):
            err = await _refused(r, links.connect(NAME))
            assert f"history parted after #{shipped}" in str(err)
            assert f"up to #{own} were written in epoch 0" in str(err)
            assert receiver.counters.records_applied == 0
    assert _tables(a) == before


async def test_a_promoted_replica_hands_out_no_inode_or_pack_that_is_taken(
        tmp_path: Path) -> None:
    """A replica receives inodes and packs without the primary's counters; made the
    primary, its new files must neither reuse an inode number nor overwrite a pack
    holding small writes of the files it received."""
    a, r = tmp_path / "a", tmp_path / "r"
    _make(a)
    small = {b"s%d" % i: b"small write %d" % i for i in range(20)}  # kept in packs
    shipped = await _write(a, small)
    with trio.fail_after(20):
        async with _linked(r) as (links, _):
            await _ship(a, links.connect(NAME))
    _promote(r, 1)
    await _write(r, {b"new%d" % i: b"written after the failover %d" % i for i in range(20)})
    assert _tree_at(r, shipped) == _tree_at(a, shipped)
    async with served(r) as vol:
        fs = vol.fs
        assert fs is not None
        for name, data in small.items():
            entry = await vol.call(fs.lookup, 1, name)
            fh = await vol.call(fs.open, entry.ino, os.O_RDONLY)
            assert await vol.read(fh, 0, 1000) == data
            await vol.call(fs.release, fh)
        inos = {(await vol.call(fs.lookup, 1, n)).ino for n in [*small, b"new0", b"new19"]}
    assert len(inos) == len(small) + 2


async def test_failback_keeps_what_the_old_primary_wrote_and_resumes_at_the_fork(
        tmp_path: Path) -> None:
    """With failback (a node of a cluster rejoining), the old primary's records after
    the fork go to a copy of its store, kept and named, and are taken out of the
    store; the new primary then ships only what came after the fork: no resync."""
    a, r = tmp_path / "a", tmp_path / "r"
    shipped, top_r, own = await _parted(a, r)
    own_tree = _tree_at(a, own)
    _as_replica(a)
    with trio.fail_after(20):
        async with _linked(a, failback=True) as (links, receiver):
            await _ship(r, links.connect(NAME))
            # only the records after the fork were shipped: no full resync
            assert receiver.counters.records_applied == top_r - shipped
            [kept] = receiver.diverged
    assert _tree_at(a, top_r) == _tree_at(r, top_r)  # a holds r's history exactly
    assert kept.name.startswith("a.diverged-0-")
    assert _tree_at(kept, own) == own_tree  # nothing a wrote is lost
    with Store(kept) as store, store.txn() as txn:
        assert bookmarks.get(store, txn, "diverged").seq == own
    with Store(a) as store, store.txn() as txn:
        assert bookmarks.get(store, txn, "diverged") is None
        assert epochs.lineage(store, txn) == [(0, 1), (1, shipped + 1)]


# --- what holds a point survives a failback and a full resync --------------------------------


def _clone_tree(clone: Path, seq: int) -> tuple[str, int]:
    with Store(clone) as store, store.txn() as txn:
        return tree_hash(store, txn, seq)


async def test_failback_keeps_a_clone_of_a_diverged_point_reading_what_it_was_made_of(
        tmp_path: Path) -> None:
    """A clone of the old primary at a record only it wrote: the failback takes that
    record out of the store, so the clone is made to read through to the kept copy
    (which holds its point and its hold); it reads as before and verifies."""
    a, r = tmp_path / "a", tmp_path / "r"
    _, top_r, own = await _parted(a, r)
    clones.make(a, tmp_path / "clone", f"#{own}")
    before = _clone_tree(tmp_path / "clone", own)
    _as_replica(a)
    with trio.fail_after(20):
        async with _linked(a, failback=True) as (links, receiver):
            await _ship(r, links.connect(NAME))
            [kept] = receiver.diverged
    assert _tree_at(a, top_r) == _tree_at(r, top_r)
    assert _clone_tree(tmp_path / "clone", own) == before
    with Store(tmp_path / "clone") as clone:
        assert clone.clone_of is not None and clone.clone_of.path == kept
        assert verify(clone) == []
    with Store(kept) as store, store.txn() as txn:
        assert [(h.path, h.seq, h.present) for h in clones.held(store, txn)] == \
            [(tmp_path / "clone", own, True)]
    with Store(a) as store, store.txn() as txn:
        assert clones.held(store, txn) == []  # a's own #own is another record now


@pytest.mark.parametrize("holder", ["mounted clone", "snapshot"])
async def test_failback_is_refused_while_a_diverged_point_is_in_use(
        tmp_path: Path, holder: str) -> None:
    """A clone in use (its writer lock held, as by a mount) or a running process
    showing a point after the fork: the failback is refused with one line naming
    it, and nothing is copied or taken out; once released it goes through."""
    a, r = tmp_path / "a", tmp_path / "r"
    _, top_r, own = await _parted(a, r)
    lock = None
    if holder == "mounted clone":
        clones.make(a, tmp_path / "clone", f"#{own}")
        lock = WriterLock(tmp_path / "clone")
        lock.acquire("cdpfs mount")
        words = f"clone {tmp_path / 'clone'} of #{own} (in use by cdpfs mount"
    else:
        with Store(a) as store, store.txn(write=True) as txn:
            bookmarks.hold(store, txn, "snapshot", own)  # this process: alive
        words = f"a process (pid {os.getpid()}) showing #{own}"
    _as_replica(a)
    before = _tables(a)
    with trio.fail_after(20):
        async with _linked(a, failback=True) as (links, receiver):
            err = await _refused(r, links.connect(NAME))
            assert receiver.diverged == []
    assert words in str(err) and "\n" not in str(err), err
    assert _tables(a) == before
    assert not list(tmp_path.glob("a.diverged-*"))
    if lock is not None:
        lock.release()
    else:
        with Store(a) as store, store.txn(write=True) as txn:
            bookmarks.release_all(store, txn)
    with trio.fail_after(20):
        async with _linked(a, failback=True) as (links, receiver):
            await _ship(r, links.connect(NAME))
    assert _tree_at(a, top_r) == _tree_at(r, top_r)


async def test_a_full_resync_keeps_the_replicas_history_clones_and_tested_points(
        tmp_path: Path) -> None:
    """A replica let go by its primary gets a full resync: its clones' points, its
    DR tests' tested-* bookmarks and its own older history stay (the resync lays
    the primary's history over the replica's, nothing is cleared)."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    _make(primary)
    clock = FakeClock()
    for i in range(4):
        await _write(primary, {b"f%d" % (i % 2): os.urandom(30_000)}, clock=clock)
    point = await _write(primary, {b"f0": b"state the DR test saw" * 50}, clock=clock)
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            await _ship(primary, links.connect(NAME))
    with Store(replica) as store, store.txn(write=True) as txn:
        bookmarks.put(store, txn, "tested-20261207T000000Z", point)
    clones.make(replica, tmp_path / "clone", f"#{point}")
    then = _tree_at(replica, point)
    early = _tree_at(replica, 2)
    for i in range(5):
        await _write(primary, {b"f0": b"line %d\n" % i * 50}, clock=clock)
    clock.advance(7200)
    _thin(primary, clock(), replica_max_lag=1)
    with Store(primary) as store, store.txn() as txn:
        assert journal.get(store, txn, point) is None  # the primary no longer has it
        top = journal.last(store, txn)[0]
    with trio.fail_after(20):
        async with _linked(replica) as (links, _):
            sender = await _ship(primary, links.connect(NAME))
            assert sender.state.acked == top
    assert _tree_at(replica, top) == _tree_at(primary, top)
    assert _tree_at(replica, point) == then and _tree_at(replica, 2) == early
    with Store(replica) as store, store.txn() as txn:
        assert resolve(store, txn, "tested-20261207T000000Z").seq == point
        assert [(h.seq, h.present) for h in clones.held(store, txn)] == [(point, True)]
    assert _clone_tree(tmp_path / "clone", point) == then
    with Store(tmp_path / "clone") as clone:
        assert verify(clone) == []
    with Store(replica) as store:
        assert verify(store) == []
