"""The versioned tables: ``inodes``, ``dirents``, ``xattrs`` and ``extents``.

Every key is an object's prefix (``schema.inode_prefix`` and the others, all
starting with an inode number) followed by ``inv(seq)``, so an object's versions
are contiguous, newest first, and objects of one inode are contiguous too.
Versions are put by ``journal.apply`` (a record's changes) and read as of a seq
by ``view.View``; this module is for what walks the tables themselves: verify,
space figures, prune, the versions of one file.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from .lmdb import Store
from .schema import INV_LEN, U64, inv

TABLES = ("inodes", "dirents", "xattrs", "extents")
_NEXT_INO = b"\xff" * 9  # after every key of an inode number: its prefix + this


def scan(store: Store, txn: lmdb.Transaction, table: str, start: bytes = b"",
         prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the versions of ``table`` from key ``start`` on (the first
    whose key starts with ``prefix`` when ``start`` is empty), in key order, while
    keys start with ``prefix``."""
    cur = txn.cursor(db=store.db[table])
    if not cur.set_range(max(start, prefix)):
        return
    for key, value in cur:
        if not key.startswith(prefix):
            return
        yield key, value


def keys(store: Store, txn: lmdb.Transaction, table: str) -> Iterator[bytes]:
    """Every key of ``table``, in order."""
    yield from txn.cursor(db=store.db[table]).iternext(values=False)


def of(store: Store, txn: lmdb.Transaction, table: str, prefix: bytes,
       upto: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(seq, value) of the versions of the object at ``prefix`` (at or before seq
    ``upto``), newest first; an empty value: removed (freed) at that seq."""
    cur = txn.cursor(db=store.db[table])
    if not cur.set_range(prefix + (b"" if upto is None else inv(upto))):
        return
    size = len(prefix) + INV_LEN
    for key, value in cur:
        if len(key) != size or not key.startswith(prefix):
            return
        yield 2**64 - 1 - U64.unpack_from(key, len(prefix))[0], value


def has(store: Store, txn: lmdb.Transaction, table: str, prefix: bytes) -> bool:
    """Whether ``table`` holds any key starting with ``prefix`` (an inode number's
    8 bytes: any version of anything of that inode)."""
    cur = txn.cursor(db=store.db[table])
    return cur.set_range(prefix) and cur.key().startswith(prefix)


def first_ino(store: Store, txn: lmdb.Transaction, table: str, start: int) -> int | None:
    """The lowest inode number >= ``start`` with a version in ``table`` (None: none)."""
    cur = txn.cursor(db=store.db[table])
    return U64.unpack_from(cur.key())[0] if cur.set_range(U64.pack(start)) else None


def inos(store: Store, txn: lmdb.Transaction, table: str = "inodes") -> Iterator[int]:
    """Every inode number with a version in ``table``, in order (one seek each)."""
    cur = txn.cursor(db=store.db[table])
    ok = cur.first()
    while ok:
        prefix = bytes(cur.key()[:8])
        yield U64.unpack(prefix)[0]
        ok = cur.set_range(prefix + _NEXT_INO)


def delete(store: Store, txn: lmdb.Transaction, table: str, key: bytes) -> None:
    """Drop one version (prune: no kept point shows it)."""
    txn.delete(key, db=store.db[table])


def count(store: Store, txn: lmdb.Transaction) -> int:
    """How many versions the four tables hold."""
    return sum(int(txn.stat(store.db[table])["entries"]) for table in TABLES)
