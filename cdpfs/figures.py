"""The figures operators watch, each computed in one place.

``cdpfs status``, the health endpoint, the metrics and the console read them
here, so no two of them can disagree about what a figure means:

- ``replica_lag``: how far a replica is behind: in records, in bytes still to
  send (at most: it may hold some blocks already), and in seconds, how long the
  oldest record it lacks has waited. The seconds are what a loss of the primary
  would cost right now (the recovery point), not the gap between the newest
  record's time and the last acknowledged one's: a replica away for 3 s after an
  hour without writes lacks 3 s of writes, not an hour.
- ``cluster_lag``: in an HA cluster, how many records each node is behind the
  most advanced position any node reported (what ``/replica?lag=N`` and ``cdpfs
  ha status`` tell).
- ``window``: the continuous-data-protection window: the oldest point any moment
  can still be rewound to (retention and prune thin and drop older ones), and
  its age.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import lmdb

from .history.points import oldest_point
from .replication.batches import backlog
from .store import journal
from .store.lmdb import Store


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a replica is behind the store it replicates.

    Attributes:
        records: records it lacks.
        bytes: bytes still to send at most (records, and the blocks and packs they
            reference, as stored); 0 when not counted.
        complete: ``bytes`` counts every record it lacks (False: only the first
            100,000, or not counted).
        seconds: how long the oldest record it lacks has waited (0: it lacks none).
    """

    records: int
    bytes: int
    complete: bool
    seconds: float


NONE = Lag(0, 0, True, 0.0)


def replica_lag(store: Store, txn: lmdb.Transaction, acked: int, now_ns: int, *,
                count_bytes: bool = True) -> Lag:
    """The lag of a replica that acknowledged record ``acked``, at ``now_ns`` (wall
    clock, ns); ``count_bytes``: also the bytes still to send (reads the records
    it lacks and their blocks' stored sizes)."""
    records = max(0, journal.top(store, txn) - acked)
    if not records:
        return NONE
    waiting = journal.after(store, txn, acked)  # the oldest record it lacks
    seconds = max(0.0, (now_ns - waiting[1]) / 1e9) if waiting else 0.0
    nbytes, complete = backlog(store, txn, acked) if count_bytes else (0, False)
    return Lag(records, nbytes, complete, seconds)


def cluster_lag(seqs: Mapping[str, int]) -> dict[str, int]:
    """Records each node of a cluster is behind the newest position reported, from
    each node's reported position (its newest record)."""
    top = max(seqs.values(), default=0)
    return {name: max(0, top - seq) for name, seq in seqs.items()}


@dataclass(frozen=True, slots=True)
class Window:
    """How far back a volume can be rewound.

    Attributes:
        oldest_seq: the oldest point kept (0: none, an empty journal).
        oldest_ts: its time (ns; 0 if none).
        seconds: its age at the moment asked (0 if none).
    """

    oldest_seq: int
    oldest_ts: int
    seconds: float


def window(store: Store, txn: lmdb.Transaction, now_ns: int) -> Window:
    """The CDP window of ``store`` at ``now_ns`` (wall clock, ns): its oldest point."""
    seq, ts = oldest_point(store, txn)
    return Window(seq, ts, max(0.0, (now_ns - ts) / 1e9) if seq else 0.0)
