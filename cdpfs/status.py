"""What ``cdpfs status`` shows of a store, read in one go.

The journal and the objects (``history.stats``), who holds the store, what it
is a clone of and which clones hold its points, a receive that broke off, its DR
tests (``drtests``), its backups (``backups``) and, for each registered replica,
its saved state and how much is still to send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import backups, drtests
from .figures import Lag, Window, replica_lag, window
from .history import clones
from .history.stats import StoreStats, store_stats
from .replication import stream
from .replication.registry import ReplicaState, load_states
from .store.lmdb import CloneOf, Store


@dataclass(frozen=True, slots=True)
class Status:
    """A store's state.

    Attributes:
        stats: journal, objects and space.
        holder: who holds the writer lock (None: nobody).
        clone_of: what a clone's meta says of its base (None: not a clone).
        held: the base's clone holds, and whether each clone is still there.
        tested: the last DR test; testing: one in progress or killed (a clone's
            settings are its base's: none for a clone); kept: the failed tests'
            clones kept (none for a clone).
        replicas: the registered replicas' saved states; lags: how far each is
            behind (``figures.replica_lag``), by name; at_ns: when (wall clock).
        window: how far back the volume can be rewound (``figures.window``).
        receiving: the resume token of a receive that broke off ("" if none).
    """

    stats: StoreStats
    holder: str | None
    clone_of: CloneOf | None
    held: list[clones.Held]
    tested: drtests.Result | None
    testing: drtests.Running | None
    kept: list[str]
    backed_up: backups.Schedule
    replicas: list[ReplicaState]
    lags: dict[str, Lag]
    at_ns: int
    window: Window
    receiving: str = ""


def status(path: Path) -> Status:
    """The state of the store at ``path`` (opened read-only)."""
    with Store(path, readonly=True) as store:
        return status_of(store)


def status_of(store: Store) -> Status:
    """The state of ``store``, open in this process (the node API's, beside its mount)."""
    stats = store_stats(store)
    tested = drtests.last(store)
    # A clone carries its base's settings: what they say of tests is the base's.
    testing = drtests.running(store) if store.clone_of is None else None
    kept = drtests.kept(store) if store.clone_of is None else []
    backed_up = backups.schedule(store) if store.clone_of is None else \
        backups.Schedule(None, None)
    who = store.holder()
    replicas = load_states(store)
    with store.txn() as txn:
        at_ns = time.time_ns()
        lags = {r.name: replica_lag(store, txn, r.acked, at_ns) for r in replicas}
        kept_window = window(store, txn, at_ns)
        held = clones.held(store, txn)
        receiving = stream.token_of(store, txn)
    return Status(stats, str(who) if who else None, store.clone_of, held, tested,
                  testing, kept, backed_up, replicas, lags, at_ns, kept_window, receiving)
