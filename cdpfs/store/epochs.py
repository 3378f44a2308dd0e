"""Epochs: which primary wrote which records, and which primary a store follows.

Every promotion of a node to primary starts a new **epoch**, a number greater
than any before it in the cluster. A store keeps its *lineage*, the list of
``(epoch, first seq)`` of the epochs its records were written in, oldest first:
a record belongs to the newest epoch whose first seq is at or below its own, so
every journal record is bounded by its epoch without a byte in the record
itself. A store made before high availability, or never promoted, is in epoch 0
from seq 1. The lineage travels with the records: a replica takes its
primary's, so two stores whose lineages agree up to a seq hold the same records
up to it (the record checks of replication confirm it by hash).

A store also keeps the newest epoch it has seen from any primary (``seen``): a
replica refuses records from a primary of an older epoch, so a primary that
lost its role (paused, cut off) can never again get a write onto a replica.

``fork`` finds where two lineages part: the last seq both stores share, from
which a primary that came back as a replica resumes; what it wrote after that is
its diverged history.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import lmdb

from .journal import last
from .lmdb import Store

Lineage = list[tuple[int, int]]  # (epoch, first seq), oldest first
MAX_EPOCHS = 10_000  # entries a lineage may have (a promotion each)

_LINEAGE = "epochs"
_SEEN = "epoch_seen"


def lineage(store: Store, txn: lmdb.Transaction) -> Lineage:
    """The store's lineage (``[(0, 1)]`` for a store never promoted)."""
    raw = store.config(txn, _LINEAGE)
    return [(int(e), int(s)) for e, s in raw] if raw else [(0, 1)]


def current(store: Store, txn: lmdb.Transaction) -> int:
    """The epoch the store's newest records were written in (or will be)."""
    return lineage(store, txn)[-1][0]


def seen(store: Store, txn: lmdb.Transaction) -> int:
    """The newest epoch this store has seen from any primary, its own included."""
    own = current(store, txn)
    return max(own, int(store.config(txn, _SEEN) or 0))


def epoch_of(line: Sequence[tuple[int, int]], seq: int) -> int:
    """The epoch record ``seq`` was written in, by ``line``."""
    found = line[0][0]
    for epoch, first in line:
        if first > seq:
            break
        found = epoch
    return found


def begin(store: Store, txn: lmdb.Transaction, epoch: int) -> Lineage:
    """Start ``epoch`` on this store: its next record is the epoch's first. Refused
    unless ``epoch`` is newer than every epoch the store has seen."""
    if epoch <= seen(store, txn):
        raise ValueError(f"epoch {epoch} is not newer than {seen(store, txn)}")
    line = lineage(store, txn)
    first = last(store, txn)[0] + 1
    line = [(e, s) for e, s in line if s < first] + [(epoch, first)]
    store.set_config(txn, _LINEAGE, line)
    store.set_config(txn, _SEEN, epoch)
    return line


def follow(store: Store, txn: lmdb.Transaction, line: Lineage) -> None:
    """Take a primary's lineage (a replica whose records are a prefix of its
    primary's) and note its epoch as seen."""
    store.set_config(txn, _LINEAGE, [list(x) for x in line])
    if line[-1][0] > int(store.config(txn, _SEEN) or 0):
        store.set_config(txn, _SEEN, line[-1][0])


def valid(line: Sequence[Sequence[int]]) -> bool:
    """A lineage as a peer may send it: epochs and first seqs both strictly rising."""
    if not line or len(line) > MAX_EPOCHS:
        return False
    pairs = [tuple(x) for x in line]
    if any(len(p) != 2 for p in pairs):
        return False
    return all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(pairs))


def fork(mine: Sequence[tuple[int, int]], theirs: Sequence[tuple[int, int]],
         my_last: int) -> int:
    """The last seq two stores share by their lineages: records up to it were written
    in the same epochs; the first epoch that starts at a different seq, or is missing
    from one of them, ends the shared part just before it (and never past ``my_last``)."""
    shared = my_last
    for i, (epoch, first) in enumerate(mine):
        if i >= len(theirs):
            return min(shared, first - 1)  # they never saw this epoch of mine
        if theirs[i] != (epoch, first):
            return min(shared, first - 1, theirs[i][1] - 1)
    if len(theirs) > len(mine):
        shared = min(shared, theirs[len(mine)][1] - 1)  # my epoch ended there for them
    return shared
