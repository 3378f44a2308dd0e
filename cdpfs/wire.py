"""The replication wire format: checked, optionally compressed frames over a trio stream.

A frame is ``b"CD" | type (1) | flags (1) | length (4) | payload | check (16)``:
the payload is msgpack (zstd-compressed when flag 1 is set) and ``check`` is
the first 16 bytes of blake3(payload as sent). TLS already authenticates every
byte; the check also catches a damaged frame from a bug on either side. A frame
that fails its check raises ``WireError``: the connection is dropped and the
sender resends from the replica's acknowledged position, so a damaged frame is
never applied.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio
import zstandard

from . import codec
from .errors import CdpfsError, root_cause

MAGIC = b"CD"
_HEAD = struct.Struct(">2sBBI")
CHECK = 16
MAX_FRAME = 256 << 20
COMPRESSED = 1
COMPRESS_MIN = 512

# Frame types
HELLO, WELCOME, OFFER, WANT, DATA, RECORDS, ACK, ERROR, BASE = range(1, 10)
NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", OFFER: "OFFER", WANT: "WANT", DATA: "DATA",
         RECORDS: "RECORDS", ACK: "ACK", ERROR: "ERROR", BASE: "BASE"}


class WireError(CdpfsError):
    """A frame that is malformed, fails its check, or was not expected."""


class Closed(WireError):
    """The peer closed the connection between frames (a normal end)."""


class PeerError(CdpfsError):
    """The peer refused: it sent an ERROR frame with its reason."""


def encode(kind: int, body: Any, compress: bool = True) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    flags = 0
    if compress and len(payload) >= COMPRESS_MIN:
        packed = codec.encode(payload)
        if packed[0] == codec.ZSTD:
            payload, flags = packed[1:], COMPRESSED
    check = codec.digest(payload)[:CHECK]
    return _HEAD.pack(MAGIC, kind, flags, len(payload)) + payload + check


class Connection:
    """Frames over one (TLS) stream; counts the bytes that crossed it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._at_frame_start = False
        self.sent = 0
        self.received = 0

    async def send(self, kind: int, body: Any, compress: bool = True) -> int:
        frame = encode(kind, body, compress)
        await self.stream.send_all(frame)
        self.sent += len(frame)
        return len(frame)

    async def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            except trio.BrokenResourceError as exc:  # e.g. a TLS record failing its MAC
                raise WireError(f"link broken: {root_cause(exc)}") from None
            if not chunk:
                if not self._buf and self._at_frame_start:
                    raise Closed("connection closed by the peer")
                raise WireError("connection closed by the peer in the middle of a frame")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.received += n
        return out

    async def recv(self, *expect: int) -> tuple[int, Any]:
        """The next frame's (type, body); WireError if damaged or not one of ``expect``."""
        self._at_frame_start = True
        head = await self._exactly(_HEAD.size)
        self._at_frame_start = False
        magic, kind, flags, length = _HEAD.unpack(head)
        if magic != MAGIC or length > MAX_FRAME:
            raise WireError(f"malformed frame header (magic {magic!r}, length {length})")
        payload = await self._exactly(length)
        check = await self._exactly(CHECK)
        if codec.digest(payload)[:CHECK] != check:
            raise WireError(f"damaged {NAMES.get(kind, kind)} frame (check mismatch), dropped")
        try:
            if flags & COMPRESSED:
                payload = codec.unzstd(payload)
            body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except (zstandard.ZstdError, ValueError) as exc:
            raise WireError(f"undecodable {NAMES.get(kind, kind)} frame: {exc}") from None
        if kind == ERROR:
            raise PeerError(str(body.get("message", "refused")))
        if expect and kind not in expect:
            raise WireError(f"unexpected {NAMES.get(kind, kind)} frame")
        return kind, body
