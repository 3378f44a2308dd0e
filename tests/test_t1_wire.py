"""The replication wire format, frame by frame, over trio in-memory streams.

``wire.frame`` builds a frame's parts and ``wire.Connection`` sends and receives
them: bodies and pieces round-trip exactly, payloads are compressed only when that
shrinks them, damage to the header, payload, piece table or check is refused
(damage to a piece is left to ``codec.check``, by design), malformed headers are
refused before any body is read, a keepalive's body is checked like any other,
ERROR frames become ``PeerError``, a close
between frames is ``Closed`` and one inside a frame is not, and the byte counters
count what crossed. No network, no TLS: only the transport is in memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from cdpfs.errors import Corrupt
from cdpfs.replication import wire
from cdpfs.store import codec

HEAD = struct.Struct(">2sBBI")  # magic, type, flags, payload length (docs/architecture.md)
COUNT = struct.Struct(">I")


def _joined(parts: Sequence[wire.Part]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def _pair() -> tuple[wire.Connection, wire.Connection]:
    """Two connected ends: (sending, receiving)."""
    ours, theirs = trio.testing.memory_stream_pair()
    return wire.Connection(ours), wire.Connection(theirs)


async def _received(data: bytes, *expect: int, close: bool = True,
                    ) -> tuple[int, Any, list[bytes]]:
    """What a Connection makes of ``data`` (raw bytes on the stream), then a close."""
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(data)
    if close:
        await ours.aclose()
    with trio.fail_after(5):
        return await wire.Connection(theirs).recv_frame(*expect)


def _blocks(n: int, size: int = 5000) -> list[tuple[bytes, bytes]]:
    """``n`` stored blocks of random data (raw: random bytes do not compress) and
    their names."""
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((codec.digest(data), codec.encode(data)))
    return out


BODY = {"records": [[7, b"\x00\x01" * 40], [8, b"r" * 3]], "uuid": "u-1", 5: [1, 2.5, None],
        "nested": {"ok": True, "bin": b"\xff" * 10}}


# --- round trips ---------------------------------------------------------------------


async def test_body_and_pieces_round_trip_exactly() -> None:
    bufs = [os.urandom(100_000), b"", os.urandom(1)]
    pieces: list[wire.Part] = [bufs[0], memoryview(bufs[1]), memoryview(bytearray(bufs[2]))]
    pieces.append(memoryview(os.urandom(3000))[100:2100])  # a slice of a larger buffer
    parts = wire.frame(wire.DATA, BODY, pieces=pieces)
    # Pieces are sent from their own buffers: the very objects, not copies.
    assert all(a is b for a, b in zip(parts[1:-1], pieces, strict=True))
    a, b = _pair()
    size = await a.send_frame(parts)
    assert size == wire.frame_size(parts) == len(_joined(parts))
    kind, body, got = await b.recv_frame(wire.DATA)
    assert kind == wire.DATA
    assert body == BODY
    assert got == [bytes(p) for p in pieces]
    assert all(type(p) is bytes for p in got)


async def test_frames_without_pieces_round_trip_in_order() -> None:
    a, b = _pair()
    bodies = [(wire.HELLO, {"proto": 2, "uuid": "x", "block_size": 4096, "name": "r"}),
              (wire.WANT, {"blocks": [b"h" * 32], "packs": [1, 2]}),
              (wire.ACK, {"seq": 2**63}), (wire.MARKS, {}),
              (wire.OFFER, {"blocks": [os.urandom(32) for _ in range(100)], "packs": []})]
    for kind, body in bodies:
        await a.send(kind, body)
    for kind, body in bodies:
        assert await b.recv() == (kind, body)


def test_frame_layout_is_as_documented() -> None:
    pieces = [b"abc", b"defgh"]
    parts = wire.frame(wire.DATA, {"x": 1}, pieces=pieces)
    data = _joined(parts)
    magic, kind, flags, length = HEAD.unpack_from(data)
    assert (magic, kind, flags) == (b"CD", wire.DATA, wire.PIECES)
    (count,) = COUNT.unpack_from(data, HEAD.size)
    sizes = struct.unpack_from(">2I", data, HEAD.size + 4)
    assert (count, sizes) == (2, (3, 5))
    table_end = HEAD.size + 4 + 8
    payload = data[table_end:table_end + length]
    assert msgpack.unpackb(payload) == {"x": 1}
    assert data[table_end + length:table_end + length + 8] == b"abcdefgh"
    check = data[table_end + length + 8:]
    assert check == codec.digest(data[:table_end] + payload)[:wire.CHECK]
    # Without pieces: no table, flag 2 clear.
    plain = _joined(wire.frame(wire.ACK, {"seq": 1}))
    assert HEAD.unpack_from(plain)[2] == 0
    assert len(plain) == HEAD.size + len(msgpack.packb({"seq": 1})) + wire.CHECK


async def test_the_largest_piece_count_is_accepted() -> None:
    pieces = [b""] * wire.MAX_PIECES
    pieces[-1] = b"last"
    a, b = _pair()
    await a.send_frame(wire.frame(wire.DATA, {}, pieces=pieces))
    _, _, got = await b.recv_frame()
    assert len(got) == wire.MAX_PIECES and got[-1] == b"last"


# --- compression ---------------------------------------------------------------------


@pytest.mark.parametrize("body, compress, compressed", [
    ({"records": [[1, b"a" * 5000]]}, True, True),  # shrinks: compressed
    ({"records": [[1, b"a" * 5000]]}, False, False),  # not asked for
    ({"records": [[1, os.urandom(5000)]]}, True, False),  # would not shrink
    ({"r": b"a" * (wire.COMPRESS_MIN - 20)}, True, False),  # too small to bother
], ids=["compressible", "off", "incompressible", "small"])
async def test_compression_only_when_it_shrinks(body: dict[str, Any], compress: bool,
                                                compressed: bool) -> None:
    parts = wire.frame(wire.DATA, body, compress)
    data = _joined(parts)
    packed = msgpack.packb(body, use_bin_type=True)
    flags, length = HEAD.unpack_from(data)[2:]
    assert bool(flags & wire.COMPRESSED) is compressed
    if compressed:
        assert length < len(packed) // 10
    else:
        assert data[HEAD.size:HEAD.size + length] == packed
    a, b = _pair()
    await a.send_frame(parts)
    assert await b.recv() == (wire.DATA, body)


# --- damage --------------------------------------------------------------------------


def _flips(data: bytes, positions: range | list[int]) -> list[tuple[int, int, bytes]]:
    """Every single-bit flip and the whole-byte inversion at each position."""
    out = []
    for pos in positions:
        for mask in [*(1 << i for i in range(8)), 0xFF]:
            damaged = bytearray(data)
            damaged[pos] ^= mask
            out.append((pos, mask, bytes(damaged)))
    return out


async def _outcome(data: bytes, *expect: int) -> str:
    try:
        await _received(data, *expect)
    except wire.WireError:
        return "refused"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


async def test_damage_to_payload_piece_table_or_check_is_refused() -> None:
    (_, stored), = _blocks(1, 300)
    body = {"records": [[1, os.urandom(200)]], "pad": list(range(200))}
    for compress in (False, True):
        parts = wire.frame(wire.DATA, body, compress, pieces=[stored, b"xyz"])
        data = _joined(parts)
        head_end = len(parts[0])
        pieces_end = head_end + len(stored) + 3
        # the header, the piece table and the payload; then the check
        positions = [*range(head_end), *range(pieces_end, len(data))]
        wrong = {(pos, mask): got for pos, mask, damaged in _flips(data, positions)
                 if (got := await _outcome(damaged, wire.DATA)) != "refused"}
        assert not wrong, f"damaged frames not refused (compress={compress}): {wrong}"


async def test_a_changed_type_or_flags_byte_fails_the_check() -> None:
    """The header is checked too: a frame whose type byte became ERROR (or any
    other type), or whose compression flag flipped, is damage, not a refusal."""
    kinds = sorted(wire.NAMES)
    for kind in kinds:
        data = bytearray(_joined(wire.frame(kind, {"message": "m", "seq": 1}, False)))
        for other in [k for k in kinds if k != kind]:
            data[2] = other
            with pytest.raises(wire.WireError, match="check mismatch"):
                await _received(bytes(data))
        data[2] = kind
        data[3] ^= wire.COMPRESSED
        with pytest.raises(wire.WireError, match="check mismatch"):
            await _received(bytes(data))


async def test_a_damaged_piece_arrives_and_fails_its_hash_check() -> None:
    compressible = b"block " * 3000
    named = [*_blocks(2), (codec.digest(compressible), codec.encode(compressible))]
    assert named[-1][1][0] == codec.ZSTD and named[0][1][0] == codec.RAW
    for which in range(len(named)):
        pieces = [stored for _, stored in named]
        damaged = bytearray(pieces[which])
        damaged[len(damaged) // 2] ^= 0x10
        pieces[which] = bytes(damaged)
        kind, _, got = await _received(_joined(wire.frame(wire.DATA, {}, pieces=pieces)))
        assert kind == wire.DATA and got == pieces  # pieces are not the frame check's job
        for i, ((digest, _), piece) in enumerate(zip(named, got, strict=True)):
            if i == which:
                with pytest.raises(Corrupt):
                    codec.check(piece, digest)
            else:
                codec.check(piece, digest)


# --- malformed headers: refused before the body ----------------------------------------


async def _refused_after(data: bytes, trailing: int = 1 << 20) -> tuple[str, int, bytes]:
    """Send a header (then ``trailing`` junk bytes, the stream left open): the error,
    the bytes the connection consumed and what is left unread on the stream."""
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(data + b"\x00" * trailing)
    conn = wire.Connection(theirs)
    with trio.fail_after(2), pytest.raises(wire.WireError) as err:
        await conn.recv_frame()
    left = b""
    while len(left) < trailing:
        left += await theirs.receive_some()
    return str(err.value), conn.received, left


async def test_bad_magic_is_refused_before_the_body() -> None:
    header = HEAD.pack(b"XD", wire.DATA, wire.PIECES, 1000)
    message, consumed, left = await _refused_after(header)
    assert "malformed" in message and "magic" in message
    assert consumed == HEAD.size and len(left) == 1 << 20


async def test_an_oversized_length_is_refused_before_the_body() -> None:
    header = HEAD.pack(b"CD", wire.DATA, 0, wire.MAX_FRAME + 1)
    message, consumed, left = await _refused_after(header)
    assert "malformed" in message and consumed == HEAD.size and len(left) == 1 << 20
    # The pieces count too: a small payload with pieces over the limit.
    header = HEAD.pack(b"CD", wire.DATA, wire.PIECES, 10) + COUNT.pack(2) + \
        struct.pack(">2I", wire.MAX_FRAME - 10, 1)
    message, consumed, left = await _refused_after(header)
    assert "malformed" in message and consumed == len(header) and len(left) == 1 << 20


async def test_the_largest_length_is_read() -> None:
    """MAX_FRAME itself is allowed: the connection goes on to wait for the payload."""
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(HEAD.pack(b"CD", wire.DATA, 0, wire.MAX_FRAME) + b"x" * 1000)
    conn = wire.Connection(theirs)
    with trio.move_on_after(0.3) as waited:
        await conn.recv_frame()
    assert waited.cancelled_caught  # still reading the payload, not refused
    assert conn.received == HEAD.size


async def test_too_many_pieces_are_refused_before_the_table() -> None:
    header = HEAD.pack(b"CD", wire.DATA, wire.PIECES, 0) + COUNT.pack(wire.MAX_PIECES + 1)
    message, consumed, left = await _refused_after(header)
    assert f"{wire.MAX_PIECES + 1} pieces" in message
    assert consumed == HEAD.size + COUNT.size and len(left) == 1 << 20


def _handmade(kind: int, flags: int, payload: bytes) -> bytes:
    head = HEAD.pack(b"CD", kind, flags, len(payload))
    return head + payload + codec.digest(head + payload)[:wire.CHECK]


async def test_an_undecodable_payload_is_refused() -> None:
    for flags, payload in ((wire.COMPRESSED, b"not zstd at all" * 10),  # bad zstd
                           (0, b"\xc1"),  # a byte msgpack never uses
                           (0, b"\x92\x01"),  # an array of 2 with one element
                           (0, msgpack.packb(1) + msgpack.packb(2))):  # extra data
        with pytest.raises(wire.WireError, match="undecodable"):
            await _received(_handmade(wire.ACK, flags, payload))


# --- frame types ---------------------------------------------------------------------


async def test_an_unexpected_frame_type_is_refused() -> None:
    a, b = _pair()
    await a.send(wire.ACK, {"seq": 1})
    with pytest.raises(wire.WireError, match="unexpected ACK"):
        await b.recv(wire.WANT, wire.WELCOME)
    # A type nobody sends is named by its number.
    with pytest.raises(wire.WireError, match="unexpected 200"):
        await _received(_handmade(200, 0, msgpack.packb({})), wire.DATA)
    # No expectation: any type is returned.
    await a.send(wire.WANT, {"blocks": [], "packs": []})
    assert await b.recv() == (wire.WANT, {"blocks": [], "packs": []})



@pytest.mark.parametrize("kind", ["PING", "PONG"])
async def test_keepalive_bodies_are_checked(kind: str) -> None:
    """PING and PONG (protocol 4) carry one id, an integer from 0 to 2^64-1; any other
    body is refused naming the field, as for every frame type."""
    code = getattr(wire, kind)
    a, b = _pair()
    await a.send(code, {"id": 2**64 - 1})
    assert await b.recv(code) == (code, {"id": 2**64 - 1})
    for body, why in (({}, "no 'id'"), ({"id": -1}, f"{kind}.id: expected an integer"),
                      ({"id": 1.5}, f"{kind}.id: expected an integer"),
                      ({"id": "7"}, f"{kind}.id: expected an integer"),
                      ([7], "expected a map"), (None, "expected a map")):
        raw = _handmade(code, 0, msgpack.packb(body))
        with pytest.raises(wire.WireError, match=f"undecodable {kind} frame: .*{why}"):
            await _received(raw, code)


async def test_an_error_frame_raises_peer_error_with_its_message() -> None:
    a, b = _pair()
    await a.send(wire.ERROR, {"message": "this replica holds volume X, not Y"})
    with pytest.raises(wire.PeerError, match="this replica holds volume X, not Y") as err:
        await b.recv(wire.WELCOME)
    assert not isinstance(err.value, wire.WireError)  # a refusal, not a broken link
    await a.send(wire.ERROR, {})
    with pytest.raises(wire.PeerError, match="refused"):
        await b.recv_frame()


async def test_recv_refuses_a_frame_with_pieces() -> None:
    a, b = _pair()
    await a.send_frame(wire.frame(wire.WANT, {"blocks": [], "packs": []}, pieces=[b"p"]))
    with pytest.raises(wire.WireError, match="unexpected pieces"):
        await b.recv(wire.WANT)
    # recv_frame takes it (and the connection is still in step for the next).
    await a.send_frame(wire.frame(wire.DATA, {"records": []}, pieces=[b"p", b"q"]))
    assert await b.recv_frame(wire.DATA) == (wire.DATA, {"records": []}, [b"p", b"q"])


# --- closing ---------------------------------------------------------------------------


async def test_a_close_between_frames_is_closed() -> None:
    a, b = _pair()
    await a.stream.aclose()
    with pytest.raises(wire.Closed):
        await b.recv()
    a, b = _pair()
    await a.send(wire.ACK, {"seq": 3})
    await a.send(wire.ACK, {"seq": 4})
    await a.stream.aclose()
    assert await b.recv(wire.ACK) == (wire.ACK, {"seq": 3})
    assert await b.recv(wire.ACK) == (wire.ACK, {"seq": 4})
    with pytest.raises(wire.Closed):
        await b.recv(wire.ACK)


async def test_a_close_inside_a_frame_is_a_wire_error_not_closed() -> None:
    parts = wire.frame(wire.DATA, {"records": [[1, b"r" * 100]]}, pieces=[b"b" * 300])
    data = _joined(parts)
    head = len(parts[0])
    cuts = [1, HEAD.size - 1, HEAD.size, HEAD.size + 2, HEAD.size + 8, head - 1, head,
            head + 150, head + 300, len(data) - 1]
    for cut in cuts:
        a, b = _pair()
        await a.send(wire.ACK, {"seq": 1})  # a whole frame first: the close is not at start
        await a.stream.send_all(data[:cut])
        await a.stream.aclose()
        assert await b.recv(wire.ACK) == (wire.ACK, {"seq": 1})
        with pytest.raises(wire.WireError, match="middle of a frame") as err:
            await b.recv_frame()
        assert not isinstance(err.value, wire.Closed), cut


class _Broken(trio.abc.Stream):
    """A stream whose reads fail as a TLS record failing its MAC does."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("send on a broken link")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.BrokenResourceError("decryption failed or bad record mac")

    async def aclose(self) -> None:
        pass


async def test_a_broken_link_is_a_wire_error() -> None:
    with pytest.raises(wire.WireError, match=r"link broken: .*bad record mac"):
        await wire.Connection(_Broken()).recv()


# --- counting ----------------------------------------------------------------------------


async def test_sent_and_received_count_the_bytes() -> None:
    a, b = _pair()
    (_, stored), = _blocks(1, 20_000)
    frames = [wire.frame(wire.HELLO, {"proto": 2}), wire.frame(wire.DATA, BODY, pieces=[stored]),
              wire.frame(wire.OFFER, {"blocks": [b"x" * 32] * 50, "packs": []})]
    total = 0
    for parts in frames:
        total += await a.send_frame(parts)
        assert a.sent == total
    assert total == sum(len(_joined(p)) for p in frames)
    assert total > 20_000
    assert b.received == 0
    seen = 0
    for parts in frames:
        await b.recv_frame()
        seen += len(_joined(parts))
        assert b.received == seen
    assert (a.received, b.sent) == (0, 0)
    # A paced send awaits the pacer before each write, with its size: the parts
    # are written about a MiB at a time, so a limit holds to within a MiB.
    paced: list[int] = []

    async def pace(n: int) -> None:
        paced.append(n)

    parts = wire.frame(wire.DATA, {}, pieces=[stored, b"ab"])
    await a.send_frame(parts, pace=pace)
    assert paced == [sum(map(len, parts))]
    big = [bytes(400_000)] * 6  # 2.4 MB: three writes of at least a MiB, then the rest
    parts = wire.frame(wire.DATA, {}, pieces=big)
    paced.clear()
    await a.send_frame(parts, pace=pace)
    assert sum(paced) == sum(map(len, parts)) and len(paced) == 3, paced
    assert all(n >= wire.SEND_SIZE for n in paced[:-1]), paced
