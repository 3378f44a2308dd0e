"""The ``replicas`` table: what a store knows of each of its replicas.

One ``ReplicaState`` per replica name (address, mode, acknowledged position,
counters, last error, when it last answered), keyed by the name. ``cdpfs
replica add`` registers a replica, its sender keeps the state up to date,
``cdpfs status`` reads it (through ``link``, which says what the saved state
means now), and retention keeps the journal after the lowest acknowledged
position (``needed_after``). The table itself is ``store.replicas``'s; a replica
is registered and forgotten here (``register``, ``unregister``: a clone is never
replicated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from ..errors import CdpfsError
from ..names import check_name
from ..store import journal
from ..store.lmdb import Store
from ..store.replicas import ReplicaState
from ..store.replicas import delete as delete
from ..store.replicas import get as get
from ..store.replicas import put as put
from ..store.replicas import states as states
from .protocol import KEEPALIVE

MAX_LAG_RECORDS = 10_000_000  # default of config.replica_max_lag
# A replica that answered longer ago than this is shown as silent. Its sender saves
# when it last heard from it on each keepalive answer (every KEEPALIVE seconds on an
# idle link) and, while shipping, with the acknowledgements (every 0.2 s at most):
# a live link is never older than that, plus a round trip.
SILENT_AFTER = 2 * KEEPALIVE
CONNECTED, SILENT, NOT_CONNECTED = "connected", "silent", "not connected"


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


def register(path: Path, name: str, address: str, mode: str = "async",
             limit: int = 0) -> ReplicaState:
    """Register (or change) replica ``name`` of the store at ``path`` (``cdpfs replica
    add``): a mount ships to it from then on. A clone is refused: its history starts
    at its point, which a replica would lack."""
    check_name(name, "replica")
    with Store(path) as store, store.txn(write=True) as txn:
        if store.clone_of is not None:
            raise CdpfsError(f"{path}: is a clone of {store.clone_of.path}; a clone cannot be "
                             f"replicated (its history starts at #{store.clone_of.seq}, which "
                             "a replica would lack)")
        state = get(store, txn, name) or ReplicaState(name, address)
        state.address, state.mode, state.limit = address, mode, limit
        put(store, txn, state)
    return state


def unregister(path: Path, name: str) -> None:
    """Forget replica ``name`` of the store at ``path`` (``cdpfs replica remove``):
    nothing is shipped to it any more, and retention no longer keeps journal for it.
    CdpfsError naming the replicas there if it has none of that name."""
    with Store(path) as store, store.txn(write=True) as txn:
        if name not in {s.name for s in states(store, txn)}:
            check_name(name, "replica")  # one registered before the rule can still go
        if not delete(store, txn, name):
            names = ", ".join(s.name for s in states(store, txn)) or "none"
            raise CdpfsError(f"{path} has no replica {name!r} (it has: {names})")


def save_progress(store: Store, txn: lmdb.Transaction, state: ReplicaState,
                  create: bool = False) -> bool:
    """Store what a sender learnt of its replica (position, counters, errors), keeping
    what the user set (address, mode, limit) as it is in the table now: a change made
    by ``cdpfs replica add`` while it ships is never written back over. A replica no
    longer registered stays so unless ``create``. Whether anything was written."""
    known = get(store, txn, state.name)
    if known is None and not create:
        return False
    if known is not None:
        state = ReplicaState(**{**asdict(state), "address": known.address,
                                "mode": known.mode, "limit": known.limit})
    put(store, txn, state)
    return True


def overview(path: Path) -> tuple[list[ReplicaState], int]:
    """The registered replicas of the store at ``path`` and its newest record's seq."""
    with Store(path) as store, store.txn() as txn:
        return states(store, txn), journal.last(store, txn)[0]


def load_states(store: Store) -> list[ReplicaState]:
    """Every registered replica of ``store``, read in a transaction of its own."""
    with store.txn() as txn:
        return states(store, txn)


def min_acked(store: Store, txn: lmdb.Transaction, newest: int,
              cap: int = MAX_LAG_RECORDS) -> int | None:
    """The lowest position a registered replica acknowledged, among those less than
    ``cap`` records behind ``newest`` (None: none). A replica further behind gets a
    full resync when it comes back."""
    acks = [max(s.acked, s.hold) for s in states(store, txn)
            if newest - max(s.acked, s.hold) <= cap]
    return min(acks) if acks else None


def needed_after(store: Store, txn: lmdb.Transaction) -> int | None:
    """The seq after which retention must keep the journal (and what it references)
    for the replicas (``history.prune.Pruner``'s ``keep_after``); None: none needs any."""
    cap = store.config(txn, "replica_max_lag") or MAX_LAG_RECORDS
    return min_acked(store, txn, journal.last(store, txn)[0], cap)
