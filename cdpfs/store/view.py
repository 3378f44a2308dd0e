"""Read the volume as of a sequence number by ordered seeks, never by replay.

A ``View`` wraps one LMDB transaction (a read transaction for past or
read-only views, the writer's transaction for the live volume) and a
sequence number; every lookup seeks to the newest version <= that number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb

from ..errors import Corrupt, NotFound
from . import journal
from .lmdb import Store
from .schema import (
    HOLE,
    MAX_SEQ,
    ROOT_INO,
    U64,
    Extent,
    Inode,
    dirent_prefix,
    extent_prefix,
    inode_prefix,
    inv,
    xattr_prefix,
)

log = logging.getLogger(__name__)
_PAST = b"\xff" * 8  # sorts after every version (seq 0 is never used)


class View:
    """The volume as of ``seq`` inside transaction ``txn``.

    Attributes:
        store: the open store.
        txn: the LMDB transaction all reads go through.
        seq: the newest journal record this view shows.
    """

    def __init__(self, store: Store, txn: lmdb.Transaction, seq: int = MAX_SEQ) -> None:
        self.store = store
        self.txn = txn
        self.seq = seq
        self._inv = inv(seq)
        self._db = store.db

    def _newest(self, db: str, prefix: bytes) -> bytes | None:
        """Value of the newest version <= seq of the object at ``prefix``."""
        cur = self.txn.cursor(db=self._db[db])
        if not cur.set_range(prefix + self._inv):
            return None
        key = cur.key()
        if len(key) != len(prefix) + 8 or not key.startswith(prefix):
            return None
        return cur.value()

    # --- inodes and names -------------------------------------------------------

    def resolve(self, path: str | bytes, follow: bool = False) -> int:
        """The inode of ``path`` (relative to the volume root) in this view."""
        raw = path.encode() if isinstance(path, str) else path
        ino = ROOT_INO
        for part in (p for p in raw.split(b"/") if p and p != b"."):
            child = self.lookup(ino, part)
            if child is None:
                when = "now" if self.seq == MAX_SEQ else f"at #{self.seq}"
                raise NotFound(f"{raw.decode(errors='replace')}: no such file or "
                               f"directory {when}")


            ino = child
        return ino

    def read_file(self, path: str | bytes) -> bytes:
        """The whole content of the regular file at ``path``."""
        ino = self.resolve(path)
        node = self.inode(ino)
        assert node is not None
        return self.read(ino, 0, node.size, node.size)

    def inode(self, ino: int) -> Inode | None:
        raw = self._newest("inodes", inode_prefix(ino))
        return Inode.unpack(raw) if raw else None

    def lookup(self, parent: int, name: bytes) -> int | None:
        raw = self._newest("dirents", dirent_prefix(parent, name))
        return U64.unpack(raw)[0] if raw else None

    def _names(self, db: str, base: bytes, after: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """(name, newest value <= seq) of each NUL-terminated name under ``base``."""
        cur = self.txn.cursor(db=self._db[db])
        ok = cur.set_range(base if after is None else base + after + b"\0" + _PAST)
        while ok:
            key = cur.key()
            if not key.startswith(base):
                return
            prefix = key[:-8]
            if key[-8:] < self._inv:
                ok = cur.set_range(prefix + self._inv)
                key = cur.key() if ok else b""
            if ok and key.startswith(prefix) and len(key) == len(prefix) + 8:
                value = cur.value()
                if value:
                    yield prefix[len(base) : -1], value
            ok = cur.set_range(prefix + _PAST)

    def listdir(self, parent: int, after: bytes | None = None) -> Iterator[tuple[bytes, int]]:
        """(name, ino) of the entries of ``parent`` in name order, after ``after``."""
        for name, value in self._names("dirents", U64.pack(parent), after):
            yield name, U64.unpack(value)[0]

    def is_empty_dir(self, ino: int) -> bool:
        return next(iter(self.listdir(ino)), None) is None

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        return node.target if node else b""

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self._newest("xattrs", xattr_prefix(ino, name))
        return bytes(raw[1:]) if raw else None

    def xattr_names(self) -> Iterator[bytes]:
        """Every xattr name any inode ever had (a scan of the whole table)."""
        cur = self.txn.cursor(db=self._db["xattrs"])
        last = None
        for key in cur.iternext(values=False):
            name = key[8:-9]
            if name != last:
                yield name
                last = name

    def xattrs(self, ino: int) -> list[bytes]:
        return [name for name, _ in self._names("xattrs", U64.pack(ino), None)]

    # --- file data --------------------------------------------------------------

    def chain(self, ino: int, index: int) -> list[Extent]:
        """Extents of block ``index`` newest first, down to the first FULL or HOLE."""
        prefix = extent_prefix(ino, index)
        cur = self.txn.cursor(db=self._db["extents"])
        out: list[Extent] = []
        if not cur.set_range(prefix + self._inv):
            return out
        for key, value in cur:
            if not key.startswith(prefix):
                break
            ext = Extent.unpack(value)
            out.append(ext)
            if ext.is_base:
                break
        return out

    def allocated(self, ino: int, index: int) -> bool:
        """Whether block ``index`` holds data (its newest extent is not a hole)."""
        prefix = extent_prefix(ino, index)
        cur = self.txn.cursor(db=self._db["extents"])
        if not cur.set_range(prefix + self._inv) or not cur.key().startswith(prefix):
            return False
        return cur.value()[:1] != HOLE

    def block_range(self, ino: int, index: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of block ``index`` (zeros where nothing was written)."""
        chain = self.chain(ino, index)
        if not chain:
            return bytes(hi - lo)
        base = chain[-1]
        if len(chain) == 1 and base.kind == "F":
            data = self._block(ino, index, base.digest)
            out = data[lo:hi]
            return out if len(out) == hi - lo else out + bytes(hi - lo - len(out))
        buf = bytearray(hi - lo)
        if base.kind == "F":
            data = self._block(ino, index, base.digest)[lo:hi]
            buf[: len(data)] = data
        for ext in reversed(chain):
            if ext.kind in "FH":
                continue
            a, b = max(lo, ext.off), min(hi, ext.off + ext.length)
            if a >= b:
                continue
            if ext.kind == "Z":
                buf[a - lo : b - lo] = bytes(b - a)
            else:
                data = self._piece(index, ext)
                buf[a - lo : b - lo] = data[a - ext.off : b - ext.off]
        return bytes(buf)

    def _block(self, ino: int, index: int, digest: bytes) -> bytes:
        try:
            return self.store.get_block(self.txn, digest)
        except Corrupt as exc:
            raise Corrupt(digest, f"{exc} (file block {index}, offset "
                                       f"{index * self.store.block_size})") from None

    def _piece(self, index: int, ext: Extent) -> bytes:
        try:
            return self.store.get_piece(self.txn, ext.pack, ext.pack_off, ext.length, ext.digest)
        except Corrupt as exc:
            raise Corrupt(ext.digest, f"{exc} (file block {index}, offset "
                                           f"{index * self.store.block_size + ext.off})") from None

    def read(self, ino: int, off: int, size: int, file_size: int) -> bytes:
        end = min(off + size, file_size)
        if off >= end:
            return b""
        bs = self.store.block_size
        parts = []
        pos = off
        while pos < end:
            index, lo = divmod(pos, bs)
            hi = min(bs, end - index * bs)
            parts.append(self.block_range(ino, index, lo, hi))
            pos = index * bs + hi
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def block_indices(self, ino: int, first: int = 0) -> Iterator[int]:
        """Indices >= first of blocks of ``ino`` that have any version at all."""
        base = U64.pack(ino)
        cur = self.txn.cursor(db=self._db["extents"])
        index = first
        while cur.set_range(base + U64.pack(index)):
            key = cur.key()
            if not key.startswith(base):
                return
            index = U64.unpack_from(key, 8)[0]
            yield index
            index += 1


@contextmanager
def open_view(store: Store, *, seq: int | None = None, time_ns: int | None = None,
              ) -> Iterator[View]:
    """A read-only view of the volume as of ``seq``, or as of a time (ns since epoch).

    With neither, the newest committed state. The view holds a read
    transaction until the ``with`` block ends.
    """
    with store.env.begin() as txn:
        if time_ns is not None:
            seq = journal.seq_at(txn, store.db, time_ns)
            if seq == 0:
                raise NotFound("the volume did not exist yet at that time")

        yield View(store, txn, MAX_SEQ if seq is None else seq)
