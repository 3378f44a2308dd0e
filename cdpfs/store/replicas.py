"""The ``replicas`` table: what a store knows of each of its replicas.

One ``ReplicaState`` per replica name (address, mode, acknowledged position,
counters, last error, when it last answered), keyed by the name, as msgpack.
What the states mean (a link's health, what retention keeps for them, what a
sender saves) is ``replication.registry``'s; this module reads and writes the
table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lmdb
import msgpack

from .lmdb import Store


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
    heard_ns: int = 0  # wall clock when the replica last answered (WANT, ACK, PONG ...)
    limit: int = 0  # bytes per second on the wire, 0: no limit
    rate: float = 0.0  # bytes per second sent lately (moving average while shipping)
    record_rate: float = 0.0  # records per second shipped lately
    extra: dict[str, Any] = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ReplicaState:
        """A saved state; fields this version does not know (a newer one saved them)
        are left out, so a store can be read by the release before."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in msgpack.unpackb(bytes(raw), raw=False).items()
                      if k in known})


def get(store: Store, txn: lmdb.Transaction, name: str) -> ReplicaState | None:
    raw = txn.get(name.encode(), db=store.db["replicas"])
    return None if raw is None else ReplicaState.unpack(raw)


def put(store: Store, txn: lmdb.Transaction, state: ReplicaState) -> None:
    txn.put(state.name.encode(), state.pack(), db=store.db["replicas"])


def delete(store: Store, txn: lmdb.Transaction, name: str) -> bool:
    """Forget replica ``name``; False if it was not there."""
    return bool(txn.delete(name.encode(), db=store.db["replicas"]))


def states(store: Store, txn: lmdb.Transaction) -> list[ReplicaState]:
    """Every registered replica, by name."""
    return [ReplicaState.unpack(v) for _, v in txn.cursor(db=store.db["replicas"])]
