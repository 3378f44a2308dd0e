"""The history tables entry by entry, as stored: what a full resync copies.

A full resync (``replication``) sends the primary's ``journal``, ``timeidx`` and
versioned tables as they are, key by key, up to one seq, and the replica lays
them over what it has. Every entry of these tables belongs to one journal
record, so each is read here with that record's seq (``read``); ``put`` writes
entries back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import lmdb

from .lmdb import Store
from .schema import U64, seq_of

TABLES = ("journal", "timeidx", "inodes", "dirents", "xattrs", "extents")


def read(store: Store, txn: lmdb.Transaction, table: str, after: bytes,
         ) -> Iterator[tuple[bytes, bytes, int]]:
    """(key, value, seq of its record) of the entries of ``table`` (one of ``TABLES``)
    after key ``after`` (b"": from the first), in key order."""
    if table not in TABLES:
        raise KeyError(table)
    cur = txn.cursor(db=store.db[table])
    if not cur.set_range(after):
        return
    for key, value in cur:
        key = bytes(key)
        if key == after:
            continue
        if table == "journal":
            seq = U64.unpack(key)[0]
        elif table == "timeidx":
            seq = U64.unpack_from(key, 8)[0]
        else:
            seq = seq_of(key)
        yield key, bytes(value), seq


def put(store: Store, txn: lmdb.Transaction, table: str,
        items: Iterable[tuple[bytes, bytes]]) -> None:
    """Write entries of ``table`` (one of ``TABLES``) as they are (KeyError for another)."""
    if table not in TABLES:
        raise KeyError(table)
    db = store.db[table]
    for key, value in items:
        txn.put(key, value, db=db)
