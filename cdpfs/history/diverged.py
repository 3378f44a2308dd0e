"""Keeping what a primary wrote after it lost its role, and taking it out of its store.

A primary cut off from the cluster may have committed records that never
reached the node that took over (async replication, or writes it committed but
never acknowledged). When it comes back as a replica of the new primary, its
lineage parts from the new one's after some seq F (``store.epochs.fork``).
Those records are the user's data: ``keep_and_truncate`` first copies the whole
store, as it is, to ``<store>.diverged-<epoch>-<time>`` beside it (a store of
its own: mount it with ``cdpfs mount --at`` to browse or copy the files back;
its bookmark ``diverged`` names its last record), and only then takes the
records after F out of the store (their versioned puts, journal entries, time
index entries and bookmarks), so that the store holds exactly the history both
share and replication resumes after F without a full resync. Blocks and packs
only those records referenced are left for prune.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from ..store import epochs, journal
from ..store.lmdb import Store
from ..store.schema import TABLE_NAMES, U64, inv
from . import bookmarks

log = logging.getLogger(__name__)

MARK = "diverged"


def keep_and_truncate(store: Store, fork: int) -> tuple[Path, int]:
    """Copy ``store`` aside, then remove every record after ``fork`` from it; the
    copy's path and how many records were taken out."""
    with store.txn() as txn:
        top = journal.last(txn, store.db)[0]
        epoch = epochs.epoch_of(epochs.lineage(store, txn), top)
    if top <= fork:
        raise ValueError(f"nothing after #{fork} to keep")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = store.path.parent / f"{store.path.name}.diverged-{epoch}-{stamp}"
    dest.mkdir()
    store.env.copy(str(dest), compact=True)
    with Store(dest) as copy, copy.txn(write=True) as txn:
        bookmarks.put(txn, copy.db, MARK, top, replace=True)
    with store.txn(write=True) as txn:
        for rec in list(journal.records(txn, store.db, fork + 1)):
            suffix = inv(rec.seq)
            for table, prefix, _ in rec.changes:
                txn.delete(prefix + suffix, db=store.db[TABLE_NAMES[table].decode()])
            txn.delete(U64.pack(rec.seq), db=store.db["journal"])
            txn.delete(U64.pack(rec.ts) + U64.pack(rec.seq), db=store.db["timeidx"])
        for mark in bookmarks.all_points(txn, store.db):
            if mark.seq > fork:
                bookmarks.delete(txn, store.db, mark.name)
    log.warning("%s: %d records after #%d were written in epoch %d after another node "
                "took over; kept in %s, taken out of this store", store.path, top - fork,
                fork, epoch, dest)
    return dest, top - fork
