"""The ``replicas`` table: what a store knows of each of its replicas.

One ``ReplicaState`` per replica name (address, mode, acknowledged position,
counters, last error, when it last answered), keyed by the name. ``cdpfs
replica add`` registers a replica, its sender keeps the state up to date,
``cdpfs status`` reads it (through ``link``, which says what the saved state
means now), and retention keeps the journal after the lowest acknowledged
position (``needed_after``). This module is the only one that reads or writes
the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lmdb
import msgpack

from ..store.journal import last
from ..store.lmdb import Store
from .protocol import KEEPALIVE

MAX_LAG_RECORDS = 10_000_000  # default of config.replica_max_lag
# A replica that answered longer ago than this is shown as silent. Its sender saves
# when it last heard from it on each keepalive answer (every KEEPALIVE seconds on an
# idle link) and, while shipping, with the acknowledgements (every 0.2 s at most):
# a live link is never older than that, plus a round trip.
SILENT_AFTER = 2 * KEEPALIVE
CONNECTED, SILENT, NOT_CONNECTED = "connected", "silent", "not connected"


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


@dataclass(frozen=True, slots=True)
class Link:
    """What a replica's saved state means at one moment (``link``): what ``cdpfs
    status`` shows, and what metrics or a console should show alike.

    Attributes:
        state: CONNECTED (it answered lately), SILENT (a link is open but the
            replica has not answered for ``silent_s``: a cut, a hung replica, or a
            primary that died with the link open) or NOT_CONNECTED.
        silent_s: seconds since it last answered (None: never, as far as is saved).
        moving: records are on their way and the replica answers: ``rate`` and
            ``eta`` mean something (a rate of another moment is never shown).
        rate: bytes per second lately while ``moving``, else 0.
    """

    state: str
    silent_s: float | None
    moving: bool
    rate: float

    def words(self) -> str:
        """The state in a few words: "connected", "no answer for 12s", "not connected"."""
        if self.state == SILENT:
            return "no answer " + (f"for {self.silent_s:.0f}s" if self.silent_s is not None
                                   else "yet")
        return self.state

    def eta(self, nbytes: int) -> float | None:
        """Seconds until ``nbytes`` more are sent at the present rate (None: unknown)."""
        return nbytes / self.rate if self.moving and self.rate > 0 else None


def link(state: ReplicaState, now_ns: int, lag: int) -> Link:
    """How the link to the replica of ``state`` looks at ``now_ns`` (wall clock, ns),
    the replica ``lag`` records behind: from the state as last saved, so a sender
    that stopped saving (a cut link, a dead process) shows as the silence it is."""
    heard = state.heard_ns or state.updated_ns  # a state saved before heard_ns was
    silent = max(0.0, (now_ns - heard) / 1e9) if heard else None
    if not state.connected:
        return Link(NOT_CONNECTED, silent, False, 0.0)
    if silent is None or silent > SILENT_AFTER:
        return Link(SILENT, silent, False, 0.0)
    moving = lag > 0
    return Link(CONNECTED, silent, moving, state.rate if moving else 0.0)


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
