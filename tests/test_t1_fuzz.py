"""Hostile peers on the wire: random and mutated frames, in both directions.

A property-based fuzzer (hypothesis) sends frames of every type, well framed and
with valid checks, whose bodies are random values or valid bodies with a field
changed, dropped or retyped, and zstd bombs: to the real ``Receiver`` as a
primary would, and to the real ``Sender`` as a replica would, over in-memory
streams. Whatever arrives, it costs that connection only: nothing but the end of
the connection (a refusal, for the sender) comes out, the replica store stays
sound and an honest primary then ships to it as before; a live volume whose
replica is hostile goes on serving. The cases issue 10 names (a WELCOME that is
not a map, an ``acked`` that is a string, a HELLO that is a list or an int, zstd
bombs both ways) are tested by name too.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdpfs.errors import CdpfsError
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.replication import registry, wire
from cdpfs.replication.protocol import PROTOCOL
from cdpfs.replication.receiver import Receiver
from cdpfs.replication.registry import ReplicaState
from cdpfs.replication.sender import Sender
from cdpfs.store import codec, journal
from cdpfs.store.lmdb import Store
from cdpfs.store.view import View
from cdpfs.testing import LiveStore, MemoryLinks, served
from cdpfs.volume import Mode

NAME = "r1"
_HEAD = struct.Struct(">2sBBI")

# --- frames ----------------------------------------------------------------------------------

# msgpack-able values of every kind, nested a little
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

HASH = b"\x11" * 32


def _valid(uuid: str) -> dict[int, Any]:
    """A body of each frame type that has the shape the protocol names."""
    return {
        wire.HELLO: {"proto": PROTOCOL, "uuid": uuid, "block_size": 128 << 10, "name": NAME},
        wire.WELCOME: {"acked": 0, "uuid": uuid, "base_pending": False, "check": b""},
        wire.OFFER: {"blocks": [HASH], "packs": [1]},
        wire.WANT: {"blocks": [HASH], "packs": []},
        wire.DATA: {"records": [[1, msgpack.packb([1, "init", 1, {}, []])]]},
        wire.ACK: {"seq": 1},
        wire.ERROR: {"message": "no"},
        wire.BASE: {"begin": True, "seq": 3},
        wire.MARKS: {"mark": [1, 5]},
        wire.PING: {"id": 1},
        wire.PONG: {"id": 1},
        wire.STREAM: {"format": 1, "uuid": uuid, "block_size": 128 << 10, "from": 0, "to": 1,
                      "to_ts": 1, "ends": False, "epochs": [[0, 1]]},
        wire.END: {"records": 1, "pieces": 0, "chain": bytes(16)},
        wire.FETCH: {"proto": PROTOCOL, "uuid": uuid, "after": 1, "check": bytes(16),
                     "tree": True},
    }


@st.composite
def _mutated(draw: st.DrawFn, uuid: str, kinds: tuple[int, ...]) -> tuple[int, Any]:
    """A valid body of one of ``kinds`` with one field replaced, dropped or added."""
    kind = draw(st.sampled_from(kinds))
    body = dict(_valid(uuid)[kind])
    how = draw(st.sampled_from(["replace", "drop", "add", "whole"]))
    key = draw(st.sampled_from(sorted(body))) if body else "x"
    if how == "replace" or (how == "drop" and not body):
        body[key] = draw(VALUES)
    elif how == "drop":
        body.pop(key, None)
    elif how == "add":
        body[draw(st.text(max_size=6))] = draw(VALUES)
    else:
        return kind, draw(VALUES)
    return kind, body


# A zstd frame that declares 64 MiB + 1, and one of unknown size that expands to 200 MiB.
_DECLARED = zstandard.ZstdCompressor().compress(bytes((64 << 20) + 1))


def _streamed_bomb(mib: int = 200) -> bytes:
    obj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    chunk = bytes(1 << 20)
    return b"".join([*(obj.compress(chunk) for _ in range(mib)), obj.flush()])


BOMBS = (_DECLARED, _streamed_bomb())


def _raw(kind: int, payload: bytes, flags: int = 0, pieces: tuple[bytes, ...] = ()) -> bytes:
    """A well-framed frame with a valid check around any payload."""
    sizes = b""
    if pieces:
        flags |= wire.PIECES
        sizes = struct.pack(f">I{len(pieces)}I", len(pieces), *map(len, pieces))
    head = _HEAD.pack(wire.MAGIC, kind, flags, len(payload)) + sizes
    return head + payload + b"".join(pieces) + codec.digest(head + payload)[:wire.CHECK]


def test_handmade_frames_are_the_wire_format() -> None:
    """The fuzzer's frames pass the frame check, so they reach the body checks."""
    body = msgpack.packb({"seq": 3}, use_bin_type=True)
    assert _raw(wire.ACK, body) == b"".join(wire.frame(wire.ACK, {"seq": 3}, False))
    parts = wire.frame(wire.DATA, {"seq": 3}, False, pieces=[b"ab", b"c"])
    assert _raw(wire.DATA, body, pieces=(b"ab", b"c")) == b"".join(bytes(p) for p in parts)


@st.composite
def _frames(draw: st.DrawFn, uuid: str, kinds: tuple[int, ...] = tuple(wire.NAMES)) -> bytes:
    """One frame: a random body, a mutated valid one (mostly of ``kinds``, what the
    other side expects next), or a bomb; sometimes with pieces."""
    choice = draw(st.sampled_from(["random", "mutated", "mutated", "mutated", "bomb"]))
    pieces = tuple(draw(st.lists(st.binary(max_size=64), max_size=3)))
    if choice == "bomb":
        kind = draw(st.sampled_from(sorted(wire.NAMES)))
        return _raw(kind, draw(st.sampled_from(BOMBS)), wire.COMPRESSED, pieces)
    if choice == "random":
        kind, body = draw(st.integers(0, max(wire.NAMES) + 1)), draw(VALUES)
    else:
        kind, body = draw(_mutated(uuid, draw(st.sampled_from([kinds] * 3 + [tuple(wire.NAMES)]))))
    payload = msgpack.packb(body, use_bin_type=True)
    if draw(st.booleans()):
        return _raw(kind, codec.encode(payload)[1:], wire.COMPRESSED, pieces)
    return _raw(kind, payload, 0, pieces)


# --- a primary and its replica -----------------------------------------------------------------


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small volume to ship: (store, volume uuid)."""
    path = tmp_path_factory.mktemp("fuzz") / "primary"
    with LiveStore(path) as live:
        for i in range(3):
            fh, _ino = live.create(b"f%d" % i)
            live(live.fs.write, fh, 0, os.urandom(3000) * (i + 1))
            live(live.fs.release, fh)
        live.sync()
        uuid = live.store.uuid
    return path, uuid


async def _hostile(stream: trio.abc.Stream, frames: list[bytes]) -> None:
    """Send ``frames`` and read whatever comes back, then close."""
    async def drain() -> None:
        try:
            while await stream.receive_some(1 << 16):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        try:
            for data in frames:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.sleep(0.01)
        await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def _honest_ship(primary: Path, receiver: Receiver) -> None:
    """The real sender ships the primary to ``receiver``; they end identical."""
    async with trio.open_nursery() as nursery:
        links = MemoryLinks(nursery)
        links.add(NAME, receiver)
        async with served(primary, Mode.SOURCE) as src:
            sender = await src.ship(NAME, "memory:r1", links.connect(NAME), attempts=3)
        nursery.cancel_scope.cancel()
    assert receiver.store is not None
    with Store(primary) as p, p.txn() as pt, receiver.store.txn() as rt:
        seq = journal.last(p, pt)[0]
        assert sender.state.acked == seq
        assert tree_hash(p, pt, seq) == tree_hash(receiver.store, rt, seq)
    assert verify(receiver.store) == []


def _start(uuid: str, hello: bool) -> list[bytes]:
    """The frames a fuzzed primary starts with: a valid HELLO, or nothing."""
    if not hello:
        return []
    return [b"".join(bytes(p) for p in wire.frame(wire.HELLO, _valid(uuid)[wire.HELLO]))]


def _no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Every bad frame was recognised as such (validated), none reached code that
    broke on it: a field used before it was checked shows as an internal error."""
    broke = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert not broke, broke


# --- the receiver under fire -----------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data(), hello=st.booleans())
def test_a_receiver_survives_any_frames(primary: tuple[Path, str],
                                        tmp_path_factory: pytest.TempPathFactory,
                                        caplog: pytest.LogCaptureFixture,
                                        data: st.DataObject, hello: bool) -> None:
    path, uuid = primary
    caplog.clear()
    first = () if hello else (wire.HELLO,)
    expected = (wire.OFFER, wire.DATA, wire.BASE, wire.MARKS, wire.PING)
    frames = _start(uuid, hello) + data.draw(st.lists(_frames(uuid, first or expected),
                                                      min_size=1, max_size=5))
    replica = tmp_path_factory.mktemp("replica") / "r"

    async def main() -> None:
        receiver = Receiver(replica)
        try:
            ours, theirs = trio.testing.memory_stream_pair()
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_hostile, ours, frames)
                    # returns, whatever came: nothing escapes a connection
                    await receiver.serve_connection(wire.Connection(theirs), "fuzz")
                if receiver.store is not None and receiver.store.uuid != uuid:
                    # A well-formed HELLO of another volume came first: this is now a
                    # replica of that one, and the primary is refused, saying why.
                    with pytest.raises(BaseException, match="this replica holds volume"):
                        await _honest_ship(path, receiver)
                else:
                    await _honest_ship(path, receiver)
        finally:
            receiver.close()

    with caplog.at_level(logging.INFO, "cdpfs"):
        trio.run(main)
    _no_internal_errors(caplog)



# --- the sender under fire -------------------------------------------------------------------


def _welcome(uuid: str) -> bytes:
    return b"".join(bytes(p) for p in wire.frame(wire.WELCOME, _valid(uuid)[wire.WELCOME]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data(), welcome=st.booleans())

def test_a_sender_survives_any_answers(primary: tuple[Path, str],
                                       caplog: pytest.LogCaptureFixture, data: st.DataObject,
                                       welcome: bool) -> None:
    path, uuid = primary
    caplog.clear()
    expected = (wire.WANT, wire.ACK, wire.PONG) if welcome else (wire.WELCOME,)
    answers = ([_welcome(uuid)] if welcome else []) + data.draw(
        st.lists(_frames(uuid, expected), min_size=1, max_size=5))
    connections = 0

    async def connect() -> trio.abc.Stream:
        nonlocal connections
        connections += 1
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(_hostile, theirs, answers)
        return ours

    async def main() -> None:
        nonlocal nursery
        with Store(path) as store:
            async with trio.open_nursery() as nursery:
                sender = Sender(store, NAME, "memory:r1", connect)
                # A replica that welcomes and then misbehaves is retried while it
                # acknowledges new records: watch it for a while.
                with trio.move_on_after(2):
                    try:
                        await sender.run(follow=False, attempts=2)
                    except CdpfsError:
                        pass  # a refusal or attempts spent: the one way it may end badly
                nursery.cancel_scope.cancel()
            assert sender.state.last_error, "a hostile replica was taken for a good one"

    nursery: trio.Nursery
    with caplog.at_level(logging.INFO, "cdpfs"):
        trio.run(main)
    assert connections >= 1
    _no_internal_errors(caplog)



# --- the named cases -------------------------------------------------------------------------


def _frame(kind: int, body: Any, compressed: bool = False) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    if compressed:
        return _raw(kind, codec.encode(payload)[1:], wire.COMPRESSED)
    return _raw(kind, payload)


@pytest.mark.parametrize("hello", [
    _frame(wire.HELLO, [1, 2, 3]),
    _frame(wire.HELLO, 7),
    _frame(wire.HELLO, {"proto": PROTOCOL}),  # no uuid, no block size
    _frame(wire.HELLO, {"proto": PROTOCOL, "uuid": 5, "block_size": "big"}),
    _raw(wire.HELLO, _DECLARED, wire.COMPRESSED),
    _raw(wire.HELLO, BOMBS[1], wire.COMPRESSED),
], ids=["list", "int", "no-fields", "wrong-types", "bomb-declared", "bomb-streamed"])
async def test_a_bad_hello_costs_the_connection_only(
        primary: tuple[Path, str], tmp_path: Path, hello: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    path, _uuid = primary
    receiver = Receiver(tmp_path / "r")
    try:
        ours, theirs = trio.testing.memory_stream_pair()
        with caplog.at_level(logging.INFO, "cdpfs"), trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_hostile, ours, [hello])
                await receiver.serve_connection(wire.Connection(theirs), "bad-primary")
        said = [r.getMessage() for r in caplog.records if "bad-primary" in r.getMessage()]
        assert len(said) == 1 and "\n" not in said[0], said
        assert "internal error" not in said[0], said  # refused as malformed, not broken on
        assert receiver.store is None  # nothing was made of it
        await _honest_ship(path, receiver)
    finally:
        receiver.close()


@pytest.mark.parametrize("answer", [
    _frame(wire.WELCOME, [1]),
    _frame(wire.WELCOME, {"acked": "12"}),
    _frame(wire.WELCOME, {"acked": -1}),
    _frame(wire.WELCOME, {"acked": 0, "check": "x" * 100}),
    _raw(wire.WELCOME, _DECLARED, wire.COMPRESSED),
    _raw(wire.WELCOME, BOMBS[1], wire.COMPRESSED),
], ids=["list", "string-acked", "negative", "long-check", "bomb-declared", "bomb-streamed"])
async def test_a_bad_welcome_never_stops_a_live_volume(
        primary: tuple[Path, str], tmp_path: Path, answer: bytes) -> None:
    """The live volume ships to a hostile replica, which answers HELLO with ``answer``:
    the sender drops the link and retries; the volume goes on serving writes and fsyncs."""
    src, _uuid = primary
    path = tmp_path / "vol"
    shutil.copytree(src, path)
    with Store(path) as store, store.txn(write=True) as txn:
        registry.put(store, txn, ReplicaState(NAME, "memory:r1", mode="async"))
    tried = trio.Event()
    attempts = 0

    def connector(store: Store, state: ReplicaState) -> Callable[[], Any]:
        async def connect() -> trio.abc.Stream:
            nonlocal attempts
            attempts += 1
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(_hostile, theirs, [answer])
            if attempts >= 2:
                tried.set()
            return ours
        return connect

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with served(path, connector=connector) as vol:
                await tried.wait()  # it came back for more: the first link was dropped
                fh, _e = await vol.call(vol.fs.create, 1, b"after", 0o644, os.O_RDWR, 0, 0)
                await vol.write(fh, 0, b"still serving")
                await vol.fsync(fh)
                assert vol.fanout is not None
                sender = vol.fanout.senders[NAME]
                assert sender.state.last_error and not sender.state.connected
            nursery.cancel_scope.cancel()
    with Store(path) as store, store.txn() as txn:
        assert View(store, txn).read_file("after") == b"still serving"


def test_decompression_is_bounded() -> None:
    """A declared size over the limit is refused before any memory is taken; an
    undeclared one stops at the limit."""
    with pytest.raises(zstandard.ZstdError, match="declares"):
        codec.unzstd(_DECLARED, 1 << 20)
    with pytest.raises(zstandard.ZstdError):
        codec.unzstd(BOMBS[1], 1 << 20)
    assert codec.unzstd(zstandard.ZstdCompressor().compress(b"x" * 1000), 1000) == b"x" * 1000
    block = zstandard.ZstdCompressor().compress(bytes(200_000))
    with pytest.raises(CdpfsError, match=r"corrupt|decompress"):
        codec.check(b"\x01" + block, codec.digest(bytes(200_000)), 128 << 10)
