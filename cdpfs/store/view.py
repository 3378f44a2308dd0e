"""Read the volume as of a sequence number by ordered seeks, never by replay.

A ``View`` wraps one LMDB transaction and a sequence number; every lookup
seeks to the newest version <= that number. The live volume's view also lays
the changes applied but not yet committed (``store.pending``) over what the
transaction sees. A clone's view lays its own tables over its base as of the
clone's point (``under``): an object the clone has no version of is the base's.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb

from ..errors import Corrupt, NotFound
from . import blocks, codec, journal
from .lmdb import Store
from .pending import MISSING, Pending
from .schema import (
    HOLE,
    MAX_SEQ,
    ROOT_INO,
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_XATTR,
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
_CODES = {"inodes": T_INODE, "dirents": T_DIRENT, "extents": T_EXTENT, "xattrs": T_XATTR}
_BASES = b"FH"  # extent kinds that end a chain
_LEN = struct.Struct(">I")  # the length of a PATCH or ZERO extent, at offset 5


class View:
    """The volume as of ``seq`` inside transaction ``txn``.

    Attributes:
        store: the open store.
        txn: the LMDB transaction all reads go through.
        seq: the newest journal record this view shows.
        pending: changes not yet committed, laid over ``txn`` (the live volume).
    """

    def __init__(self, store: Store, txn: lmdb.Transaction, seq: int = MAX_SEQ,
                 pending: Pending | None = None) -> None:
        self.store = store
        self.txn = txn
        self.seq = seq
        self.pending = pending
        self._inv = inv(seq)
        self._db = store.db
        self._under: View | None = None

    @property
    def under(self) -> View | None:
        """For a clone: the base as of the clone's point, read where the clone's own
        tables hold no version of an object (None for any other store)."""
        base = self.store.base
        if base is None:
            return None
        if self._under is None:
            self._under = View(base.store, self.store.under(self.txn), base.seq)
        return self._under

    def _newest(self, db: str, prefix: bytes) -> bytes | None:
        """Value of the newest version <= seq of the object at ``prefix``."""
        if self.pending is not None:
            value = self.pending.newest(_CODES[db], prefix, self.seq)
            if value is not MISSING:
                return value  # type: ignore[no-any-return]
        cur = self.txn.cursor(db=self._db[db])
        if cur.set_range(prefix + self._inv):
            key = cur.key()
            if len(key) == len(prefix) + 8 and key.startswith(prefix):
                return cur.value()
        under = self.under
        return None if under is None else under._newest(db, prefix)

    # --- inodes and names -------------------------------------------------------

    def resolve(self, path: str | bytes, follow: bool = False) -> int:
        """The inode of ``path`` (relative to the volume root) in this view."""
        # A name that is not UTF-8 came as a str with lone surrogates: its own bytes.
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        ino = ROOT_INO
        for part in (p for p in raw.split(b"/") if p and p != b"."):
            child = self.lookup(ino, part)
            if child is None:
                when = "now" if self.seq == MAX_SEQ else f"at #{self.seq}"
                raise NotFound(f"{raw.decode('utf-8', 'surrogateescape')}: no such file or "
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
        """(name, newest value <= seq) of each NUL-terminated name under ``base``:
        what LMDB holds, with the pending changes merged in, in name order."""
        under = self.under
        if under is None:
            stored = self._stored_names(db, base, after)
        else:  # a clone: its own names, removals included, over the base's
            stored = _overlay(under._names(db, base, after),
                              self._stored_names(db, base, after, removed=True))
        if self.pending is None:
            yield from stored
            return
        table = _CODES[db]
        changed = {}
        for name in self.pending.names(table, base):
            if after is None or name > after:
                value = self.pending.newest(table, base + name + b"\0", self.seq)
                if value is not MISSING:
                    changed[name] = value
        if not changed:
            yield from stored
            return
        yield from _overlay(stored, ((name, changed[name]) for name in sorted(changed)))

    def _stored_names(self, db: str, base: bytes, after: bytes | None,
                      removed: bool = False) -> Iterator[tuple[bytes, bytes]]:
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
                if value or removed:
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
        if self.pending is not None:
            yield from self.pending.all_names(T_XATTR)
        if self.under is not None:
            yield from self.under.xattr_names()

    def xattrs(self, ino: int) -> list[bytes]:
        return [name for name, _ in self._names("xattrs", U64.pack(ino), None)]

    # --- file data --------------------------------------------------------------

    def chain(self, ino: int, index: int) -> list[Extent]:
        """Extents of block ``index`` newest first, down to the first FULL or HOLE."""
        prefix = extent_prefix(ino, index)
        out: list[Extent] = []
        if self.pending is not None:
            for value in self.pending.versions(T_EXTENT, prefix, self.seq):
                ext = Extent.unpack(value)
                out.append(ext)
                if ext.is_base:
                    return out
        cur = self.txn.cursor(db=self._db["extents"])
        if cur.set_range(prefix + self._inv):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                ext = Extent.unpack(value)
                out.append(ext)
                if ext.is_base:
                    return out
        under = self.under
        return out if under is None else out + under.chain(ino, index)

    def patches(self, ino: int, index: int) -> tuple[bool, int, int]:
        """(holds data, patches, their bytes) of block ``index``: the newest extents
        down to the first FULL or HOLE, read without decoding them (what a small
        write needs to choose between a patch and a rewrite)."""
        prefix = extent_prefix(ino, index)
        count = size = 0
        first: bytes | None = None
        values: Iterator[bytes] = iter(())
        if self.pending is not None:
            values = self.pending.versions(T_EXTENT, prefix, self.seq)
        for value in values:
            first = value if first is None else first
            if value[0] in _BASES:
                return first[:1] != HOLE, count, size
            count += 1
            size += _LEN.unpack_from(value, 5)[0]
        cur = self.txn.cursor(db=self._db["extents"])
        if cur.set_range(prefix + self._inv):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                first = value if first is None else first
                if value[0] in _BASES:
                    return first[:1] != HOLE, count, size
                count += 1
                size += _LEN.unpack_from(value, 5)[0]
        under = self.under
        if under is not None:
            data, more, more_size = under.patches(ino, index)
            return (data if first is None else first[:1] != HOLE), count + more, size + more_size
        return first is not None and first[:1] != HOLE, count, size

    def allocated(self, ino: int, index: int) -> bool:
        """Whether block ``index`` holds data (its newest extent is not a hole)."""
        prefix = extent_prefix(ino, index)
        if self.pending is not None:
            value = self.pending.newest(T_EXTENT, prefix, self.seq)
            if value is not MISSING:
                return value[:1] != HOLE  # type: ignore[no-any-return]
        cur = self.txn.cursor(db=self._db["extents"])
        if cur.set_range(prefix + self._inv) and cur.key().startswith(prefix):
            return cur.value()[:1] != HOLE
        return self.under is not None and self.under.allocated(ino, index)

    def block_range(self, ino: int, index: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of block ``index`` (zeros where nothing was written)."""
        return self.plan(ino, index * self.store.block_size + lo, hi - lo,
                         index * self.store.block_size + hi).run(self.txn)

    def read(self, ino: int, off: int, size: int, file_size: int) -> bytes:
        return self.plan(ino, off, size, file_size).run(self.txn)

    def plan(self, ino: int, off: int, size: int, file_size: int) -> ReadPlan:
        """What a read of ``size`` bytes at ``off`` needs: each block's extents, and
        the data of blocks and packs not committed yet (``ReadPlan.run`` fetches the
        rest, on any thread)."""
        end = min(off + size, file_size)
        bs = self.store.block_size
        parts = []
        held: dict[bytes, bytes] = {}
        packs: dict[int, bytes] = {}
        pos = off
        while pos < end:
            index, lo = divmod(pos, bs)
            hi = min(bs, end - index * bs)
            chain = self.chain(ino, index)
            parts.append((index, lo, hi, chain))
            if self.pending is not None:
                self._take_pending(chain, held, packs)
            pos = index * bs + hi
        return ReadPlan(self.store, parts, held, packs)

    def _take_pending(self, chain: list[Extent], held: dict[bytes, bytes],
                      packs: dict[int, bytes]) -> None:
        assert self.pending is not None
        for ext in chain:
            if ext.kind == "F" and ext.digest not in held:
                stored = self.pending.block(ext.digest)
                if stored is not None:
                    held[ext.digest] = stored
            elif ext.kind == "P" and ext.pack not in packs:
                data = self.pending.pack(ext.pack)
                if data is None and ext.pack == self.store.open_pack[0]:
                    data = bytes(self.store.open_pack[1])
                if data is not None:
                    packs[ext.pack] = data

    def block_indices(self, ino: int, first: int = 0) -> Iterator[int]:
        """Indices >= first of blocks of ``ino`` that have any version at all."""
        extra = self.pending.indices(ino) if self.pending is not None else set()
        if self.under is not None:
            extra.update(self.under.block_indices(ino, first))
        if not extra:
            yield from self._stored_indices(ino, first)
            return
        yield from sorted({i for i in extra if i >= first} | set(self._stored_indices(ino, first)))

    def _stored_indices(self, ino: int, first: int) -> Iterator[int]:
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


def _overlay(lower: Iterator[tuple[bytes, bytes]], upper: Iterator[tuple[bytes, bytes]],
             ) -> Iterator[tuple[bytes, bytes]]:
    """Merge two name-ordered listings of (name, value): a name in ``upper`` takes its
    value from there, and an empty value there removes it."""
    nxt = next(upper, None)
    for name, value in lower:
        while nxt is not None and nxt[0] < name:
            if nxt[1]:
                yield nxt
            nxt = next(upper, None)
        if nxt is not None and nxt[0] == name:
            if nxt[1]:
                yield nxt
            nxt = next(upper, None)
        else:
            yield name, value
    while nxt is not None:
        if nxt[1]:
            yield nxt
        nxt = next(upper, None)


@contextmanager
def open_view(store: Store, *, seq: int | None = None, time_ns: int | None = None,
              ) -> Iterator[View]:
    """A read-only view of the volume as of ``seq``, or as of a time (ns since epoch).

    With neither, the newest committed state. The view holds a read
    transaction until the ``with`` block ends.
    """
    with store.txn() as txn:
        if time_ns is not None:
            seq = journal.seq_at(store, txn, time_ns)
            if seq == 0:
                raise NotFound("the volume did not exist yet at that time")

        yield View(store, txn, MAX_SEQ if seq is None else seq)


class ReadPlan:
    """The extents a read needs, found by a view (metadata only), with the data of
    what was not committed when it was made: ``run`` fetches the committed blocks
    and packs, checks and decompresses them (the GIL is released for that), on any
    thread, in a read transaction of its own."""

    def __init__(self, store: Store, parts: list[tuple[int, int, int, list[Extent]]],
                 held: dict[bytes, bytes], packs: dict[int, bytes]) -> None:
        self.store = store
        self.parts = parts  # (block index, lo, hi, extents newest first)
        self.held = held  # hash -> stored form of blocks not committed
        self.packs = packs  # pack id -> plaintext of packs not committed

    def cached(self) -> bool:
        """Whether ``run`` needs nothing from LMDB (every block held or cached)."""
        cache = self.store.cache
        for _, _, _, chain in self.parts:
            for ext in chain:
                if ext.kind == "F" and ext.digest not in self.held \
                        and not cache.has(ext.digest):
                    return False
                if ext.kind == "P" and ext.pack not in self.packs \
                        and not cache.has(b"pack" + U64.pack(ext.pack)):
                    return False
        return True

    def run(self, txn: lmdb.Transaction | None = None) -> bytes:
        """The bytes read (in ``txn``, or in a read transaction of its own)."""
        if txn is None:
            with self.store.txn() as own:
                return self.run(own)
        out = [self._range(txn, *part) for part in self.parts]
        return out[0] if len(out) == 1 else b"".join(out)

    def _range(self, txn: lmdb.Transaction, index: int, lo: int, hi: int,
               chain: list[Extent]) -> bytes:
        if not chain:
            return bytes(hi - lo)
        base = chain[-1]
        if len(chain) == 1 and base.kind == "F":
            data = self._block(txn, index, base.digest)
            out = data[lo:hi]
            return out if len(out) == hi - lo else out + bytes(hi - lo - len(out))
        buf = bytearray(hi - lo)
        if base.kind == "F":
            data = self._block(txn, index, base.digest)[lo:hi]
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
                data = self._piece(txn, index, ext)
                buf[a - lo : b - lo] = data[a - ext.off : b - ext.off]
        return bytes(buf)

    def _block(self, txn: lmdb.Transaction, index: int, digest: bytes) -> bytes:
        try:
            stored = self.held.get(digest)
            if stored is not None:
                return codec.decode(stored, digest, self.store.block_size)
            return blocks.get(self.store, txn, digest)
        except Corrupt as exc:
            raise Corrupt(digest, f"{exc} (file block {index}, offset "
                                       f"{index * self.store.block_size})") from None

    def _piece(self, txn: lmdb.Transaction, index: int, ext: Extent) -> bytes:
        try:
            return blocks.piece(self.store, txn, ext.pack, ext.pack_off, ext.length,
                                ext.digest, self.packs.get(ext.pack))
        except Corrupt as exc:
            raise Corrupt(ext.digest, f"{exc} (file block {index}, offset "
                                           f"{index * self.store.block_size + ext.off})") from None
