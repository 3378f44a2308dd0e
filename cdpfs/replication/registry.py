"""The ``replicas`` table: what a store knows of each of its replicas.

One ``ReplicaState`` per replica name (address, mode, acknowledged position,
counters, last error), keyed by the name. ``cdpfs replica add`` registers a
replica, its sender keeps the state up to date, ``cdpfs status`` reads it, and
retention keeps the journal after the lowest acknowledged position
(``needed_after``). This module is the only one that reads or writes the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb
import msgpack

from ..store.journal import last
from ..store.lmdb import Store

MAX_LAG_RECORDS = 10_000_000  # default of config.replica_max_lag


@dataclass(slots=True)
class ReplicaState:
    """What the primary knows of one replica (kept in the ``replicas`` table)."""

    name: str
    address: str
    mode: str = "async"
    acked: int = 0
    acked_ts: int = 0  # timestamp of the acknowledged record
    hold: int = 0  # during a full resync, its base's seq: the journal after it is needed
    connected: bool = False
    bytes_sent: int = 0
    records_sent: int = 0
    last_error: str = ""
    updated_ns: int = 0
    limit: int = 0  # bytes per second on the wire, 0: no limit
    rate: float = 0.0  # bytes per second sent lately (moving average while shipping)
    record_rate: float = 0.0  # records per second shipped lately
    extra: dict[str, Any] = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ReplicaState:
        return cls(**msgpack.unpackb(bytes(raw), raw=False))


def get(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> ReplicaState | None:
    raw = txn.get(name.encode(), db=dbs["replicas"])
    return None if raw is None else ReplicaState.unpack(raw)


def put(txn: lmdb.Transaction, dbs: dict[str, Any], state: ReplicaState) -> None:
    txn.put(state.name.encode(), state.pack(), db=dbs["replicas"])


def delete(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> bool:
    """Forget replica ``name`` (``cdpfs replica remove``); False if it was not there."""
    return bool(txn.delete(name.encode(), db=dbs["replicas"]))


def save_progress(txn: lmdb.Transaction, dbs: dict[str, Any], state: ReplicaState,
                  create: bool = False) -> bool:
    """Store what a sender learnt of its replica (position, counters, errors), keeping
    what the user set (address, mode, limit) as it is in the table now: a change made
    by ``cdpfs replica add`` while it ships is never written back over. A replica no
    longer registered stays so unless ``create``. Whether anything was written."""
    known = get(txn, dbs, state.name)
    if known is None and not create:
        return False
    if known is not None:
        state = ReplicaState(**{**asdict(state), "address": known.address,
                                "mode": known.mode, "limit": known.limit})
    put(txn, dbs, state)
    return True


def states(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[ReplicaState]:
    """Every registered replica, by name."""
    return [ReplicaState.unpack(v) for _, v in txn.cursor(db=dbs["replicas"])]


def load_states(store: Store) -> list[ReplicaState]:
    """Every registered replica of ``store``, read in a transaction of its own."""
    with store.txn() as txn:
        return states(txn, store.db)


def min_acked(txn: lmdb.Transaction, dbs: dict[str, Any], newest: int,
              cap: int = MAX_LAG_RECORDS) -> int | None:
    """The lowest position a registered replica acknowledged, among those less than
    ``cap`` records behind ``newest`` (None: none). A replica further behind gets a
    full resync when it comes back."""
    acks = [max(s.acked, s.hold) for s in states(txn, dbs)
            if newest - max(s.acked, s.hold) <= cap]
    return min(acks) if acks else None


def needed_after(store: Store, txn: lmdb.Transaction) -> int | None:
    """The seq after which retention must keep the journal (and what it references)
    for the replicas (``history.prune.Pruner``'s ``keep_after``); None: none needs any."""
    cap = store.config(txn, "replica_max_lag") or MAX_LAG_RECORDS
    return min_acked(txn, store.db, last(txn, store.db)[0], cap)
