"""The journal: one record per mutating operation, keyed by sequence number.

A record is msgpack ``[ts_ns, op, ino, args, changes]`` where ``changes`` is the
list of versioned puts the operation made, ``[table, key_prefix, value]``; the
full key is ``key_prefix + inv(seq)``. Applying a record's changes at its seq
reproduces the operation exactly (replication relies on this). ``timeidx`` maps
``ts(8) + seq(8)`` so a time resolves to a sequence number with one seek.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import lmdb
import msgpack

from . import codec
from .schema import TABLE_NAMES, U64, inv


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


def append(txn: lmdb.Transaction, dbs: dict[str, Any], rec: Record) -> None:
    """Write ``rec`` to the journal and the time index (its puts are made by the caller)."""
    txn.put(U64.pack(rec.seq), rec.pack(), db=dbs["journal"])
    txn.put(U64.pack(rec.ts) + U64.pack(rec.seq), b"", db=dbs["timeidx"])


def apply(txn: lmdb.Transaction, dbs: dict[str, Any], seq: int, raw: bytes) -> Record:
    """Make the versioned puts of a packed record (a replica receiving it) and
    keep the record as it came, byte for byte."""
    rec = Record.unpack(seq, raw)
    suffix = inv(seq)
    for table, prefix, value in rec.changes:
        txn.put(prefix + suffix, value, db=dbs[TABLE_NAMES[table].decode()])
    txn.put(U64.pack(seq), raw, db=dbs["journal"])
    txn.put(U64.pack(rec.ts) + U64.pack(seq), b"", db=dbs["timeidx"])
    return rec


def get(txn: lmdb.Transaction, dbs: dict[str, Any], seq: int) -> Record | None:
    raw = txn.get(U64.pack(seq), db=dbs["journal"])
    return None if raw is None else Record.unpack(seq, raw)


def check(txn: lmdb.Transaction, dbs: dict[str, Any], seq: int) -> bytes:
    """A short hash of the record at ``seq`` (empty if there is none): equal in two
    stores when they hold the same history up to there (records carry their
    time, so another history's record ``seq`` hashes otherwise). A replica's
    position and a clone's point are checked with it."""
    raw = txn.get(U64.pack(seq), db=dbs["journal"])
    return b"" if raw is None else codec.digest(raw)[:16]


def ts_of(raw: bytes | memoryview) -> int:
    """The timestamp of a packed record, without decoding the rest."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    unpacker.read_array_header()
    return int(unpacker.unpack())


def after(txn: lmdb.Transaction, dbs: dict[str, Any], seq: int) -> tuple[int, int] | None:
    """(seq, ts) of the first record after ``seq``, or None."""
    cur = txn.cursor(db=dbs["journal"])
    if not cur.set_range(U64.pack(seq + 1)):
        return None
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def before(txn: lmdb.Transaction, dbs: dict[str, Any], seq: int) -> tuple[int, int]:
    """(seq, ts) of the last record before ``seq``, or (0, 0)."""
    cur = txn.cursor(db=dbs["journal"])
    if cur.set_range(U64.pack(seq)):
        if not cur.prev():
            return 0, 0
    elif not cur.last():
        return 0, 0
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def last(txn: lmdb.Transaction, dbs: dict[str, Any]) -> tuple[int, int]:
    """(seq, ts) of the newest record, or (0, 0) for an empty journal."""
    cur = txn.cursor(db=dbs["journal"])
    if not cur.last():
        return 0, 0
    return U64.unpack(cur.key())[0], ts_of(cur.value())


def records(txn: lmdb.Transaction, dbs: dict[str, Any], start: int = 1) -> Iterator[Record]:
    """Records with seq >= start, in order."""
    cur = txn.cursor(db=dbs["journal"])
    if not cur.set_range(U64.pack(start)):
        return
    for key, raw in cur:
        yield Record.unpack(U64.unpack(key)[0], raw)


def seq_at(txn: lmdb.Transaction, dbs: dict[str, Any], ts_ns: int) -> int:
    """The newest seq whose timestamp is <= ts_ns (0 if none)."""
    return point_at(txn, dbs, ts_ns)[0]


def point_at(txn: lmdb.Transaction, dbs: dict[str, Any], ts_ns: int) -> tuple[int, int]:
    """(seq, ts) of the newest record whose timestamp is <= ts_ns ((0, 0) if none)."""
    cur = txn.cursor(db=dbs["timeidx"])
    if cur.set_range(U64.pack(max(0, ts_ns + 1))):
        if not cur.prev():
            return 0, 0
    elif not cur.last():
        return 0, 0
    key = cur.key()
    return U64.unpack(key[8:])[0], U64.unpack(key[:8])[0]
