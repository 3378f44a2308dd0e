"""The ``replicas`` table: what a store knows of each of its replicas.

One ``ReplicaState`` per replica name (address, mode, acknowledged position,
counters, last error), written by its shipper and read by ``cdpfs status`` and by
retention, which keeps the journal after the lowest acknowledged position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from .store import Store


@dataclass(slots=True)
class ReplicaState:
    """What the primary knows of one replica (kept in the ``replicas`` table)."""

    name: str
    address: str
    mode: str = "async"
    acked: int = 0
    acked_ts: int = 0  # timestamp of the acknowledged record
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
    def unpack(cls, raw: bytes) -> ReplicaState:
        return cls(**msgpack.unpackb(raw, raw=False))


def load_states(store: Store) -> list[ReplicaState]:
    with store.txn() as txn:
        return [ReplicaState.unpack(bytes(v)) for _, v in txn.cursor(db=store.db["replicas"])]


MAX_LAG_RECORDS = 10_000_000  # default of config.replica_max_lag


def min_acked(txn: Any, dbs: dict[str, Any], last: int, cap: int = MAX_LAG_RECORDS,
              ) -> int | None:
    """The lowest position a registered replica acknowledged, among those less than
    ``cap`` records behind ``last`` (None: none): retention keeps the journal after it.
    A replica further behind gets a full resync when it comes back."""
    acks = [ReplicaState.unpack(bytes(v)).acked for _, v in txn.cursor(db=dbs["replicas"])]
    acks = [a for a in acks if last - a <= cap]
    return min(acks) if acks else None
