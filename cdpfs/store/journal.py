"""The journal: one record per mutating operation, keyed by sequence number.

A record is msgpack ``[ts_ns, op, ino, args, changes]`` where ``changes`` is the
list of versioned puts the operation made, ``[table, key_prefix, value]``; the
full key is ``key_prefix + inv(seq)``. ``timeidx`` maps ``ts(8) + seq(8)`` so a
time resolves to a sequence number with one seek.

``apply`` is the one writer of records: it makes a record's versioned puts at
its seq and keeps the record and its time index entry, for the primary's group
commit (``pending.write``) and a replica receiving (``replication.receiver``)
alike, so applying a record's changes at its seq reproduces the operation
exactly, wherever it is applied. ``remove`` takes one out again (failback),
``delete`` and ``unindex`` thin the journal (prune).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import lmdb
import msgpack

from . import codec
from .schema import TABLE_NAMES, U64, inv

if TYPE_CHECKING:
    from .lmdb import Store

_TABLES = {code: name.decode() for code, name in TABLE_NAMES.items()}


class Record(NamedTuple):
    """One journal record: what happened (op, ino, args) and the puts it made."""

    seq: int
    ts: int
    op: str
    ino: int
    args: dict[str, Any]
    changes: list[tuple[int, bytes, bytes]]

    def pack(self) -> bytes:
        return msgpack.packb(
            [self.ts, self.op, self.ino, self.args, [list(c) for c in self.changes]],
            use_bin_type=True,
        )

    @classmethod
    def unpack(cls, seq: int, raw: bytes | memoryview) -> Record:
        ts, op, ino, args, changes = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return cls(seq, ts, op, ino, args, [(t, bytes(k), bytes(v)) for t, k, v in changes])


def apply(store: Store, txn: lmdb.Transaction, records: Sequence[Record],
          raws: Sequence[bytes] | None = None) -> None:
    """Apply ``records`` in write transaction ``txn``, in order: each one's versioned
    puts at its seq, the record itself and its time index entry. ``raws``: the
    records as packed elsewhere (a replica receiving them), kept byte for byte;
    without, each is packed here. The blocks and packs they reference are put
    beforehand (``blocks``). KeyError for a change to a table that does not exist."""
    dbs = store.db
    tables = {code: dbs[name] for code, name in _TABLES.items()}
    journal, timeidx = dbs["journal"], dbs["timeidx"]
    put = txn.put
    for i, rec in enumerate(records):
        suffix = inv(rec.seq)
        for table, prefix, value in rec.changes:
            put(prefix + suffix, value, db=tables[table])
        key = U64.pack(rec.seq)
        put(key, rec.pack() if raws is None else raws[i], db=journal)
        put(U64.pack(rec.ts) + key, b"", db=timeidx)


def remove(store: Store, txn: lmdb.Transaction, rec: Record) -> None:
    """Take record ``rec`` out again: its versioned puts, the record and its time
    index entry (what ``apply`` put; the blocks and packs stay for prune)."""
    dbs = store.db
    suffix = inv(rec.seq)
    for table, prefix, _ in rec.changes:
        txn.delete(prefix + suffix, db=dbs[_TABLES[table]])
    delete(store, txn, rec.seq)
    unindex(store, txn, rec.seq, rec.ts)


def delete(store: Store, txn: lmdb.Transaction, seq: int) -> bool:
    """Drop record ``seq`` from the journal (its time index entry is ``unindex``'s)."""
    return bool(txn.delete(U64.pack(seq), db=store.db["journal"]))


def unindex(store: Store, txn: lmdb.Transaction, seq: int, ts: int) -> None:
    """Drop the time index entry of record ``seq`` stamped ``ts``: a time no longer
    resolves to it (prune keeps records that date kept versions, not their times)."""
    txn.delete(U64.pack(ts) + U64.pack(seq), db=store.db["timeidx"])


def indexed(store: Store, txn: lmdb.Transaction, seq: int, ts: int) -> bool:
    """Whether record ``seq`` stamped ``ts`` is a point a time resolves to (prune
    drops the time index entries of the records it thins)."""
    return txn.get(U64.pack(ts) + U64.pack(seq), db=store.db["timeidx"]) is not None


def kept(store: Store, txn: lmdb.Transaction, rec: Record) -> Record:
    """``rec`` with only the changes whose versions the tables still hold (prune
    drops versions no kept point shows; their records may stay): ``rec`` itself
    when it lost none."""
    dbs = store.db
    suffix = inv(rec.seq)
    changes = [c for c in rec.changes
               if txn.get(c[1] + suffix, db=dbs[_TABLES[c[0]]]) is not None]
    return rec if len(changes) == len(rec.changes) else rec._replace(changes=changes)


def get(store: Store, txn: lmdb.Transaction, seq: int) -> Record | None:
    raw = txn.get(U64.pack(seq), db=store.db["journal"])
    return None if raw is None else Record.unpack(seq, raw)


def raw(store: Store, txn: lmdb.Transaction, seq: int) -> bytes | None:
    """Record ``seq`` packed, as stored (None if the journal does not hold it)."""
    value = txn.get(U64.pack(seq), db=store.db["journal"])
    return None if value is None else bytes(value)


def has(store: Store, txn: lmdb.Transaction, seq: int) -> bool:
    """Whether the journal holds record ``seq``."""
    return txn.get(U64.pack(seq), db=store.db["journal"]) is not None


def ts(store: Store, txn: lmdb.Transaction, seq: int) -> int | None:
    """The time of record ``seq`` (None if the journal does not hold it)."""
    raw = txn.get(U64.pack(seq), db=store.db["journal"])
    return None if raw is None else ts_of(raw)


def check(store: Store, txn: lmdb.Transaction, seq: int) -> bytes:
    """A short hash of the record at ``seq`` (empty if there is none): equal in two
    stores when they hold the same history up to there (records carry their
    time, so another history's record ``seq`` hashes otherwise). A replica's
    position and a clone's point are checked with it."""
    raw = txn.get(U64.pack(seq), db=store.db["journal"])
    return b"" if raw is None else codec.digest(raw)[:16]


def ts_of(raw: bytes | memoryview) -> int:
    """The timestamp of a packed record, without decoding the rest."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    unpacker.read_array_header()
    return int(unpacker.unpack())


def count(store: Store, txn: lmdb.Transaction) -> int:
    """How many records the journal holds."""
    return int(txn.stat(store.db["journal"])["entries"])


def after(store: Store, txn: lmdb.Transaction, seq: int) -> tuple[int, int] | None:
    """(seq, ts) of the first record after ``seq``, or None."""
    cur = txn.cursor(db=store.db["journal"])
    if not cur.set_range(U64.pack(seq + 1)):
        return None
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def before(store: Store, txn: lmdb.Transaction, seq: int) -> tuple[int, int]:
    """(seq, ts) of the last record before ``seq``, or (0, 0)."""
    cur = txn.cursor(db=store.db["journal"])
    if cur.set_range(U64.pack(seq)):
        if not cur.prev():
            return 0, 0
    elif not cur.last():
        return 0, 0
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def last(store: Store, txn: lmdb.Transaction) -> tuple[int, int]:
    """(seq, ts) of the newest record, or (0, 0) for an empty journal."""
    cur = txn.cursor(db=store.db["journal"])
    if not cur.last():
        return 0, 0
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def top(store: Store, txn: lmdb.Transaction) -> int:
    """The newest record's seq (0 for an empty journal), without reading the record."""
    cur = txn.cursor(db=store.db["journal"])
    return U64.unpack(cur.key())[0] if cur.last() else 0


def records(store: Store, txn: lmdb.Transaction, start: int = 1) -> Iterator[Record]:
    """Records with seq >= start, in order."""
    for seq, raw in packed(store, txn, start):
        yield Record.unpack(seq, raw)


def packed(store: Store, txn: lmdb.Transaction, start: int = 1,
           ) -> Iterator[tuple[int, bytes]]:
    """(seq, packed record) of the records with seq >= start, in order, as stored
    (valid while ``txn`` is; what replication ships, and scans that need only times)."""
    cur = txn.cursor(db=store.db["journal"])
    if not cur.set_range(U64.pack(start)):
        return
    for key, raw in cur:
        yield U64.unpack(key)[0], raw


def seq_at(store: Store, txn: lmdb.Transaction, ts_ns: int) -> int:
    """The newest seq whose timestamp is <= ts_ns (0 if none)."""
    return point_at(store, txn, ts_ns)[0]


def point_at(store: Store, txn: lmdb.Transaction, ts_ns: int) -> tuple[int, int]:
    """(seq, ts) of the newest record whose timestamp is <= ts_ns ((0, 0) if none)."""
    cur = txn.cursor(db=store.db["timeidx"])
    if cur.set_range(U64.pack(max(0, ts_ns + 1))):
        if not cur.prev():
            return 0, 0
    elif not cur.last():
        return 0, 0
    key = cur.key()
    return U64.unpack(key[8:])[0], U64.unpack(key[:8])[0]
