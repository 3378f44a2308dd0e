"""Block codec: blake3 content hashes and zstd compression of stored blocks.

A stored block is one tag byte (RAW or ZSTD) followed by the payload. Both
blake3 and zstandard release the GIL, so callers run them off the trio thread.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from ..errors import Corrupt

HASH_LEN = 32
RAW = 0
ZSTD = 1
DEFAULT_LEVEL = 1
MAX_PLAIN = 16 << 20  # the largest block or pack plaintext (blocks are at most 16 MiB)


_TAG_RAW = bytes((RAW,))
_TAG_ZSTD = bytes((ZSTD,))
# zstd (de)compressor objects must not be shared between threads.
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    comps = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        comp = comps[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def digest(data: bytes | memoryview) -> bytes:
    """The 32-byte blake3 hash that names a block."""
    return blake3.blake3(data).digest()


def encode(data: bytes | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress ``data`` for storage; keep it raw when zstd does not shrink it."""
    packed = _compressor(level).compress(data)
    if len(packed) + 1 < len(data):
        return _TAG_ZSTD + packed
    return _TAG_RAW + data  # one copy: bytes + buffer


def prepare(data: bytes, off: int, block_size: int) -> dict[int, tuple[bytes, bytes]]:
    """Hash and encode ahead, on any thread, each piece of a write at ``off`` that
    starts on a block boundary: {file offset: (hash, stored form)}."""
    out = {}
    mv = memoryview(data)
    start = (-off) % block_size
    for pos in range(start, len(data), block_size):
        piece = mv[pos : pos + block_size]
        out[off + pos] = (digest(piece), encode(piece))
    return out


def decode(stored: bytes | memoryview, key: bytes, limit: int = MAX_PLAIN) -> bytes:
    """Decompress a stored block (at most ``limit`` bytes of plaintext) and check it
    against its hash ``key``."""
    if not len(stored):
        raise Corrupt(key, f"block {key.hex()} is empty")
    tag = stored[0]
    try:
        if tag == RAW:
            data = bytes(stored[1:])
        elif tag == ZSTD:
            data = unzstd(stored[1:], limit)
        else:
            raise Corrupt(key, f"block {key.hex()} has unknown codec tag {tag}")
    except zstandard.ZstdError as exc:
        raise Corrupt(key, f"block {key.hex()} does not decompress: {exc}") from exc
    if len(data) > limit or digest(data) != key:
        raise Corrupt(key)
    return data


def check(stored: bytes | memoryview, key: bytes, limit: int = MAX_PLAIN) -> None:
    """Raise Corrupt unless ``stored`` decodes to at most ``limit`` bytes hashing to
    ``key`` (a raw block is hashed in place, not copied)."""
    if len(stored) and stored[0] == RAW:
        if len(stored) - 1 > limit or digest(memoryview(stored)[1:]) != key:
            raise Corrupt(key)
        return
    decode(stored, key, limit)


# A pack holds many small writes one after the other, stored as
# tag + blake3(plaintext) + payload (raw or zstd).


def encode_pack(data: bytes | bytearray, level: int = DEFAULT_LEVEL) -> bytes:
    stored = encode(bytes(data), level)
    return stored[:1] + digest(data) + stored[1:]


def decode_pack(stored: bytes | memoryview, pack: int, limit: int = MAX_PLAIN) -> bytes:
    """The plaintext of a stored pack, checked whole against its hash."""
    key = bytes(stored[1 : 1 + HASH_LEN])
    if len(key) != HASH_LEN:
        raise Corrupt(key, f"pack {pack} is corrupt: {len(stored)} bytes, shorter than a header")
    try:
        return decode(bytes(stored[:1]) + bytes(stored[1 + HASH_LEN :]), key, limit)
    except Corrupt as exc:
        raise Corrupt(key, f"pack {pack} is corrupt: {exc}") from None


def plain_size(stored: bytes | memoryview) -> int:
    """The plaintext length of a stored block, from its header (no decompression)."""
    if stored[0] == ZSTD:
        size = zstandard.frame_content_size(bytes(stored[1:20]))
        if size >= 0:
            return int(size)
        return len(unzstd(stored[1:], MAX_PLAIN))
    return len(stored) - 1



def unzstd(payload: bytes | memoryview, limit: int) -> bytes:
    """Decompress one zstd frame of at most ``limit`` bytes (zstandard.ZstdError if it
    is damaged or would be larger: a frame's declared size is checked before any
    memory is taken for it)."""
    declared = zstandard.frame_content_size(payload)
    if declared > limit:
        raise zstandard.ZstdError(f"frame declares {declared} bytes, more than {limit}")
    return _decompressor().decompress(payload, max_output_size=limit)
