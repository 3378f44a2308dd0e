"""On-disk key and value layouts of the versioned tables (see docs/architecture.md).

Every versioned key ends in the *inverted* sequence number (``2**64-1-seq``,
big-endian), so within one object the newest version sorts first and
``set_range(prefix + inv(S))`` lands directly on the newest version <= S.
"""

from __future__ import annotations

import stat
import struct
from typing import NamedTuple

U64 = struct.Struct(">Q")
MAX_SEQ = 2**64 - 1
INV_LEN = 8

# Table codes used in journal records (the change list names tables by code).
T_INODE = 1
T_DIRENT = 2
T_EXTENT = 3
T_XATTR = 4
TABLE_NAMES = {T_INODE: b"inodes", T_DIRENT: b"dirents", T_EXTENT: b"extents", T_XATTR: b"xattrs"}

ROOT_INO = 1
# Meta key of a store a receive is filling (``replication.stream``): which stream, how far.
RECEIVING = b"receive.partial"
NAME_MAX = 255  # bytes of one name (a path component)


def inv(seq: int) -> bytes:
    """The key suffix of version ``seq``: newest first in key order."""
    return U64.pack(MAX_SEQ - seq)


def seq_of(key: bytes) -> int:
    """The sequence number a versioned key ends with."""
    return MAX_SEQ - U64.unpack_from(key, len(key) - INV_LEN)[0]


def u64(n: int) -> bytes:
    return U64.pack(n)


# --- inodes: ino(8) + inv(seq) -> Inode.pack() or b"" (freed at seq) ---------

_INODE = struct.Struct(">IIIIQqqqQQ")


class Inode(NamedTuple):
    """One version of an inode's attributes (times in ns since the epoch); a named
    tuple, as cheap to make as the hot paths need."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime: int
    mtime: int
    ctime: int
    rdev: int = 0
    blocks: int = 0  # store blocks holding data (not holes): what st_blocks counts
    target: bytes = b""  # symlink target

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.mode, self.uid, self.gid, self.nlink, self.size,
                self.atime, self.mtime, self.ctime, self.rdev, self.blocks,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Inode:
        fields = _INODE.unpack_from(raw)
        return cls(*fields, target=bytes(raw[_INODE.size:]))

    def with_(self, **kw: int | bytes) -> Inode:
        return self._replace(**kw)

    def st_blocks(self, block_size: int) -> int:
        """512-byte units allocated: the data blocks, never more than the size needs."""
        return min(self.blocks * block_size, self.size + 511) // 512

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)


def inode_prefix(ino: int) -> bytes:
    return U64.pack(ino)


# --- dirents: parent(8) + name + NUL + inv(seq) -> child ino(8) or b"" --------


def dirent_prefix(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + name + b"\0"


# --- xattrs: ino(8) + name + NUL + inv(seq) -> b"\x01" + value or b"" --------


def xattr_prefix(ino: int, name: bytes) -> bytes:
    return U64.pack(ino) + name + b"\0"


# --- extents: ino(8) + block index(8) + inv(seq) -> extent value -------------
# FULL  b"F" + hash(32) + len(4): the block is these bytes, zeros after len
# PATCH b"P" + off(4) + len(4) + hash(32) + pack(8) + pack_off(4): these bytes,
#       kept at pack_off in pack ``pack`` and checked by hash, laid over older versions
# ZERO  b"Z" + off(4) + len(4): zeros laid over older versions (punch, truncate)
# HOLE  b"H": the whole block reads as zeros (sparse, truncated away)

_FULL = struct.Struct(">32sI")
_PATCH = struct.Struct(">II32sQI")
_ZERO = struct.Struct(">II")


def extent_prefix(ino: int, index: int) -> bytes:
    return U64.pack(ino) + U64.pack(index)


def full(digest: bytes, length: int) -> bytes:
    return b"F" + _FULL.pack(digest, length)


def patch(off: int, digest: bytes, length: int, pack: int, pack_off: int) -> bytes:
    return b"P" + _PATCH.pack(off, length, digest, pack, pack_off)


def zero(off: int, length: int) -> bytes:
    return b"Z" + _ZERO.pack(off, length)


HOLE = b"H"


class Extent(NamedTuple):
    """A decoded extent value: ``kind`` is one of F, P, Z, H."""

    kind: str
    off: int
    length: int
    digest: bytes
    pack: int = 0
    pack_off: int = 0

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Extent:
        kind = chr(raw[0])
        if kind == "F":
            digest, length = _FULL.unpack_from(raw, 1)
            return cls(kind, 0, length, digest)
        if kind == "P":
            off, length, digest, pack, pack_off = _PATCH.unpack_from(raw, 1)
            return cls(kind, off, length, digest, pack, pack_off)
        if kind == "Z":
            off, length = _ZERO.unpack_from(raw, 1)
            return cls(kind, off, length, b"")
        return cls("H", 0, 0, b"")

    @property
    def is_base(self) -> bool:
        """FULL and HOLE end a chain: nothing older shows through them."""
        return self.kind in "FH"
