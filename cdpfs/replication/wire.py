"""The replication wire format: checked, optionally compressed frames over a trio stream.

A frame is ``b"CD" | type (1) | flags (1) | length (4) [| count (4) | count sizes
(4 each)] | payload [| pieces] | check (16)``. The payload is msgpack
(zstd-compressed when flag 1 is set). Flag 2 says ``count`` pieces of raw bytes
follow the payload (blocks and packs, compressed already as stored), sent as they
are, without a msgpack copy and without being joined into one buffer. ``check``
is the first 16 bytes of blake3(the header, the sizes and the payload as sent),
so a damaged type or flags byte is caught like damaged data. Pieces are
content-addressed: the receiver checks each against the hash it is named by
before using it (``codec.check``), so they are not hashed twice. TLS already
authenticates every byte; the checks also catch damage from a bug on either
side. A frame or piece that fails its check raises ``WireError``: the connection
is dropped and the sender resends from the replica's acknowledged position, so
damaged data is never applied.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgpack
import trio
import zstandard

from ..errors import CdpfsError, root_cause
from ..store import codec
from . import messages
from .messages import (  # noqa: F401 (the frame types, as wire.HELLO ...)
    ACK,
    BASE,
    DATA,
    END,
    ERROR,
    FETCH,
    HELLO,
    MARKS,
    NAMES,
    OFFER,
    PING,
    PONG,
    STREAM,
    WANT,
    WELCOME,
)

MAGIC = b"CD"
_HEAD = struct.Struct(">2sBBI")
_COUNT = struct.Struct(">I")
CHECK = 16
MAX_FRAME = 256 << 20
MAX_BODY = 64 << 20  # bytes a compressed payload may decompress to
COMPRESSED = 1
PIECES = 2
MAX_PIECES = 1 << 16
COMPRESS_MIN = 512
READ_SIZE = 1 << 20  # bytes asked of the socket per read
SEND_SIZE = 1 << 20  # bytes given to the stream per write, about


Part = bytes | memoryview


class WireError(CdpfsError):
    """A frame that is malformed, fails its check, or was not expected."""


class Closed(WireError):
    """The peer closed the connection between frames (a normal end)."""


class PeerError(CdpfsError):
    """The peer refused: it sent an ERROR frame with its reason."""


def frame(kind: int, body: Any, compress: bool = True, pieces: Sequence[Part] = (),
          ) -> list[Part]:
    """The parts of one frame, in order (their concatenation is the frame)."""
    payload = msgpack.packb(body, use_bin_type=True)
    flags = 0
    if compress and len(payload) >= COMPRESS_MIN:
        packed = codec.encode(payload)
        if packed[0] == codec.ZSTD:
            payload, flags = packed[1:], COMPRESSED
    sizes = b""
    if pieces:
        flags |= PIECES
        sizes = _COUNT.pack(len(pieces)) + struct.pack(f">{len(pieces)}I", *map(len, pieces))
    head = _HEAD.pack(MAGIC, kind, flags, len(payload)) + sizes
    check = codec.digest(head + payload)[:CHECK]
    return [head + payload, *pieces, check]


def frame_size(parts: Sequence[Part]) -> int:
    return sum(map(len, parts))


class Connection:
    """Frames over one (TLS) stream; counts the bytes that crossed it and notes when
    bytes last moved (``active``, trio time) so a stalled peer can be told apart
    from a slow link."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._at_frame_start = False
        self.sent = 0
        self.received = 0
        self.active = trio.current_time()
        # The frames' checks so far, chained: a send stream's END carries the sender's
        # (``chain``), so a frame dropped, repeated or spliced in is noticed.
        self._chain = b""

    def chain(self) -> bytes:
        """The chain of the checks of every frame sent or received so far."""
        return self._chain

    def _link(self, check: bytes | memoryview) -> None:
        self._chain = codec.digest(self._chain + bytes(check))[:CHECK]

    async def send(self, kind: int, body: Any, compress: bool = True) -> int:
        return await self.send_frame(frame(kind, body, compress))

    async def send_frame(self, parts: Sequence[Part],
                         pace: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Send a frame made by ``frame``, its parts joined into writes of about
        ``SEND_SIZE`` (a write per block cost TLS and the event loop more than the
        bytes); ``pace(n)`` is awaited before each write (a bandwidth limit). The
        frame's size."""
        group: list[Part] = []
        size = 0
        for i, part in enumerate(parts):
            group.append(part)
            size += len(part)
            if size >= SEND_SIZE or i == len(parts) - 1:
                if pace is not None:
                    await pace(size)
                await self.stream.send_all(group[0] if len(group) == 1 else b"".join(group))
                self.sent += size
                self.active = trio.current_time()
                group, size = [], 0
        self._link(parts[-1])
        return frame_size(parts)

    async def _exactly(self, n: int) -> bytes:
        """The next ``n`` bytes (never more is asked of the stream: no buffer)."""
        parts: list[bytes | bytearray] = []
        have = 0
        while have < n:
            try:
                chunk = await self.stream.receive_some(n - have)
            except trio.BrokenResourceError as exc:  # e.g. a TLS record failing its MAC
                raise WireError(f"link broken: {root_cause(exc)}") from None
            if not chunk:
                if not have and self._at_frame_start:
                    raise Closed("connection closed by the peer")
                raise WireError("connection closed by the peer in the middle of a frame")
            parts.append(chunk)
            have += len(chunk)
            self.active = trio.current_time()
        self.received += n
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    async def recv(self, *expect: int) -> tuple[int, Any]:
        """The next frame's (type, body); WireError if damaged, if not one of
        ``expect``, or if it has pieces (see ``recv_frame``)."""
        kind, body, pieces = await self.recv_frame(*expect)
        if pieces:
            raise WireError(f"unexpected pieces in a {NAMES.get(kind, kind)} frame")
        return kind, body

    async def recv_frame(self, *expect: int) -> tuple[int, Any, list[bytes]]:
        """The next frame's (type, body, pieces). The pieces are not checked here:
        the caller checks each against its name."""
        self._at_frame_start = True
        head = await self._exactly(_HEAD.size)
        self._at_frame_start = False
        magic, kind, flags, length = _HEAD.unpack(head)
        sizes: tuple[int, ...] = ()
        table = b""
        if magic == MAGIC and flags & PIECES:
            count = await self._exactly(_COUNT.size)
            (n,) = _COUNT.unpack(count)
            if n > MAX_PIECES:
                raise WireError(f"malformed frame header ({n} pieces)")
            table = count + await self._exactly(4 * n)
            sizes = struct.unpack(f">{n}I", table[_COUNT.size:])
        if magic != MAGIC or length + sum(sizes) > MAX_FRAME:
            raise WireError(f"malformed frame header (magic {magic!r}, length "
                            f"{length}+{sum(sizes)})")
        rest = await self._exactly(length + sum(sizes) + CHECK)  # one read: pieces are many
        payload = rest[:length]
        pieces = []
        at = length
        for size in sizes:
            pieces.append(rest[at:at + size])
            at += size
        check = rest[at:]
        if codec.digest(head + table + payload)[:CHECK] != check:
            raise WireError(f"damaged {NAMES.get(kind, kind)} frame (check mismatch), dropped")
        self._link(check)
        name = NAMES.get(kind, str(kind))
        if expect and kind not in expect and kind != ERROR:
            raise WireError(f"unexpected {name} frame")
        try:
            if flags & COMPRESSED:
                payload = codec.unzstd(payload, MAX_BODY)
            body = msgpack.unpackb(payload, raw=False, strict_map_key=False)

            messages.check(kind, body)
        except (zstandard.ZstdError, ValueError, TypeError, messages.BadMessage) as exc:
            raise WireError(f"undecodable {name} frame: {exc}") from None
        if kind == ERROR:
            raise PeerError(body.get("message") or "refused")
        return kind, body, pieces



class FileStream(trio.abc.Stream):
    """A binary file (a pipe, a regular file, stdin or stdout) as a trio stream, so a
    send stream is read and written by the same frames as a replication link. Reads
    and writes run on a worker thread (a pipe may block). ``Connection`` writes a
    frame a MiB at a time and reads it in one piece after its head: a thread's
    round trip per part of a frame (a head, a block) cost more than the data."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self._read = getattr(file, "read1", file.read)  # what is there, up to the size asked

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await trio.to_thread.run_sync(self.file.write, data)
        except OSError as exc:
            raise trio.BrokenResourceError(exc.strerror or str(exc)) from None

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """At most ``max_bytes``: never more is taken from the file than asked for
        (what follows a stream in a file is the caller's to read)."""
        try:
            return await trio.to_thread.run_sync(self._read, max_bytes or READ_SIZE)
        except OSError as exc:
            raise trio.BrokenResourceError(exc.strerror or str(exc)) from None

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.file.flush)


class _LargeReads(trio.abc.Stream):
    """A TCP stream whose reads are large by default: TLS asks its transport for
    "some" bytes, 64 KiB at a time otherwise, which on a fast link costs more event
    loop turns than the data itself."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes or READ_SIZE)

    async def aclose(self) -> None:
        await self.inner.aclose()


def tls_stream(stream: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool,
               ) -> trio.SSLStream[trio.abc.Stream]:
    """TLS over ``stream`` (the handshake is done on first use or by ``do_handshake``)."""
    return trio.SSLStream(_LargeReads(stream), ctx, server_side=server_side)
