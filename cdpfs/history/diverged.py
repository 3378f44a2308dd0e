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

What holds a point after F goes with the copy, and nothing that reads such a
point ever sees the new primary's records in its place: bookmarks (and DR tests'
``tested-*`` points) are in the copy, named in the log; a clone of a point after
F is made to read through to the copy, which holds its point and its hold
(``clones.rebase``). A clone in use, or a running process showing such a point
(a snapshot mount), refuses the failback, with one line naming it, until it is
unmounted or stopped: the primary's next connection tries again.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from ..errors import StoreError, StoreLocked
from ..store import epochs, journal
from ..store.lmdb import Store
from ..store.lock import WriterLock
from ..store.lock import holder as lock_holder
from . import bookmarks, clones

log = logging.getLogger(__name__)

MARK = "diverged"


def keep_and_truncate(store: Store, fork: int) -> tuple[Path, int]:
    """Copy ``store`` aside, then remove every record after ``fork`` from it; the
    copy's path and how many records were taken out. StoreError (nothing changed)
    while a clone in use or a running process reads a point after ``fork``."""
    with store.txn() as txn:
        top = journal.last(store, txn)[0]
        epoch = epochs.epoch_of(epochs.lineage(store, txn), top)
        after = [mark for mark in bookmarks.all_points(store, txn) if mark.seq > fork]
        moving = [h for h in clones.held(store, txn) if h.seq > fork and h.present]
    if top <= fork:
        raise ValueError(f"nothing after #{fork} to keep")
    busy = [f"a process (pid {mark.name.split('.')[2]}) showing #{mark.seq}"
            for mark in after if mark.is_hold and mark.clone_path is None and mark.holder_alive]
    locks: list[WriterLock] = []
    try:
        for h in moving:  # kept from mounts until each reads through to the copy
            lock = WriterLock(h.path)
            try:
                lock.acquire("failback")
            except StoreLocked:
                busy.append(f"clone {h.path} of #{h.seq} (in use by {lock_holder(h.path)})")
                continue
            locks.append(lock)
        if busy:
            raise StoreError(f"{store.path}: its records after #{fork} cannot be taken out "
                             f"while {', '.join(busy)} reads them: unmount or stop it "
                             "(the primary's next connection tries again)")
        dest = _copy(store, epoch, top)
        for h in moving:
            clones.rebase(h.path, dest, locked=True)
    finally:
        for lock in locks:
            lock.release()
    with store.txn(write=True) as txn:
        for rec in list(journal.records(store, txn, fork + 1)):
            journal.remove(store, txn, rec)
        bookmarks.drop(store, txn, [mark.name for mark in after])
    log.warning("%s: %d records after #%d were written in epoch %d after another node "
                "took over; kept in %s, taken out of this store", store.path, top - fork,
                fork, epoch, dest)
    kept = [mark.name for mark in after if not mark.is_hold]
    if kept or moving:
        log.warning("%s: %s of points after #%d now in %s", store.path, ", ".join(
            [f"bookmark {name}" for name in kept] + [f"clone {h.path}" for h in moving]),
            fork, dest)
    return dest, top - fork


def _copy(store: Store, epoch: int, top: int) -> Path:
    """The whole store, copied (compacted) beside it, its last record bookmarked."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = store.path.parent / f"{store.path.name}.diverged-{epoch}-{stamp}"
    dest.mkdir()
    store.copy(dest)
    with Store(dest) as copy, copy.txn(write=True) as txn:
        bookmarks.put(copy, txn, MARK, top, replace=True)
    return dest
