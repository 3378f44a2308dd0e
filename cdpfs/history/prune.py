"""Prune: drop the versions, journal records, blocks and packs no kept point needs.

Works in bounded steps, each in the caller's write transaction, so a mount can
interleave them with its own work (see ``step``). The kept points are fixed when
the ``Pruner`` is made (points.Points): every seq from ``full_from`` on, and a
sparse sorted list below it (the policy's minute/hour/day points, bookmarks,
holds). Phases:

1. versions, one inode at a time across the inodes, dirents, xattrs and extents
   tables: a version is kept when some kept point shows it (for an extent, while
   no newer FULL or HOLE covers it) and, for everything an inode owns, the inode
   exists at that point. Tombstones left oldest are dropped (absence says the same).
2. journal: records below ``full_from`` that are neither kept points nor the
   seq of a kept version go, and so do time index entries of non-kept records.
3. mark: every block hash and pack an extent still references.
4. sweep: unreferenced blocks and packs go. Each sweep step first marks what
   records written since the mark began reference, so a write that deduplicated
   against a block between steps keeps it.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from ..store import blocks, journal, versions
from ..store.lmdb import Store
from ..store.refs import Refs
from ..store.schema import MAX_SEQ, U64, Extent, seq_of
from ..store.view import View
from . import bookmarks
from .points import Points

log = logging.getLogger(__name__)

INF = MAX_SEQ + 1
_PHASES = ("versions", "journal", "mark", "sweep-blocks", "sweep-packs", "done")


@dataclass(slots=True)
class PruneResult:
    """What a prune removed."""

    versions: int = 0
    records: int = 0
    blocks: int = 0
    packs: int = 0
    bytes_freed: int = 0
    holds: int = 0
    seconds: float = 0.0
    kept_points: int = 0
    full_from: int = 0
    notes: list[str] = field(default_factory=list)


class Pruner:
    """One prune of ``store``; call ``step(txn)`` in write transactions until it returns True.

    ``keep_after``: journal records after this seq stay, and the blocks and packs
    they reference (a replica has not acknowledged them yet, so it can still be
    sent them); None when no replica needs any.
    """

    def __init__(self, store: Store, txn: lmdb.Transaction, *, keep_after: int | None,
                 now_ns: int | None = None, step_keys: int = 20000) -> None:
        self.store = store
        self.step_keys = step_keys
        points = Points(store, txn, now_ns)
        self.full_from = points.first_full()
        self.sparse = points.kept_sparse(self.full_from)
        self._sparse_set = set(self.sparse)
        self.stale_holds = [b.name for b in bookmarks.all_points(store, txn)
                            if b.is_hold and not b.holder_alive]
        last = journal.last(store, txn)[0]
        self.keep_after = last if keep_after is None else keep_after
        self.survivors: set[int] = set()  # seqs < full_from of versions kept
        self.refs = Refs()  # blocks and packs some version references (the mark)
        self.phase = 0
        self.cursor: bytes | None = b""
        self.mark_seq = 0
        self.result = PruneResult(kept_points=len(self.sparse), full_from=self.full_from)
        self._started = time.monotonic()

    @property
    def done(self) -> bool:
        return _PHASES[self.phase] == "done"

    def kept_in(self, lo: int, hi: int) -> bool:
        """Whether some kept point k has lo <= k < hi."""
        if hi <= lo:
            return False
        if hi > self.full_from and hi - 1 >= max(lo, self.full_from):
            return True
        i = bisect.bisect_left(self.sparse, lo)
        return i < len(self.sparse) and self.sparse[i] < hi

    def step(self, txn: lmdb.Transaction) -> bool:
        """Do one bounded piece of work in ``txn``; True when the prune is complete."""
        if self.stale_holds:
            bookmarks.drop(self.store, txn, self.stale_holds)
            self.result.holds = len(self.stale_holds)
            self.stale_holds = []
        phase = _PHASES[self.phase]
        finished = getattr(self, "_" + phase.replace("-", "_"))(txn)
        if finished:
            self.phase += 1
            self.cursor = b""
        if self.done:
            self.result.seconds = time.monotonic() - self._started
        return self.done

    def run(self, begin: Any) -> PruneResult:
        """All steps, each in its own transaction from ``begin()`` (a context manager)."""
        while not self.done:
            with begin() as txn:
                self.step(txn)
        return self.result

    # --- phase 1: versions ---------------------------------------------------------

    def _next_ino(self, txn: lmdb.Transaction, start: int) -> int | None:
        found = [ino for table in versions.TABLES
                 if (ino := versions.first_ino(self.store, txn, table, start)) is not None]
        return min(found, default=None)

    def _versions(self, txn: lmdb.Transaction) -> bool:
        start = U64.unpack(self.cursor)[0] if self.cursor else 0
        seen = 0
        while seen < self.step_keys:
            ino = self._next_ino(txn, start)
            if ino is None:
                return True
            seen += self._prune_ino(txn, ino)
            start = ino + 1
            self.cursor = U64.pack(start)
        return False

    def _groups(self, txn: lmdb.Transaction, table: str, ino: int
                ) -> list[list[tuple[bytes, int, bytes]]]:
        """Versions (key, seq, value) of each object of ``ino`` in ``table``, newest first."""
        groups: list[list[tuple[bytes, int, bytes]]] = []
        prefix = None
        for key, value in versions.scan(self.store, txn, table, prefix=U64.pack(ino)):
            if key[:-8] != prefix:
                prefix = key[:-8]
                groups.append([])
            groups[-1].append((key, seq_of(key), value))
        return groups

    def _prune_ino(self, txn: lmdb.Transaction, ino: int) -> int:
        seen = 0
        alive: list[tuple[int, int]] = []
        hi = INF
        for group in self._groups(txn, "inodes", ino):
            for _key, seq, value in group:
                if value:  # back-to-back versions make one interval: one per lifetime
                    if alive and alive[-1][0] == hi:
                        alive[-1] = (seq, alive[-1][1])
                    else:
                        alive.append((seq, hi))
                hi = seq
            seen += self._decide(txn, "inodes", group, [(0, INF)])
        under = View(self.store, txn).under
        if under is not None and under.inode(ino) is not None:
            # A clone: the base's inode lives on here until the clone's oldest version.
            if alive and alive[-1][0] == hi:
                alive[-1] = (0, alive[-1][1])
            else:
                alive.append((0, hi))
        for table in ("dirents", "xattrs", "extents"):
            for group in self._groups(txn, table, ino):
                seen += self._decide(txn, table, group, alive)
        return seen

    def _decide(self, txn: lmdb.Transaction, table: str, group: list[tuple[bytes, int, bytes]],
                alive: list[tuple[int, int]]) -> int:
        extents = table == "extents"
        keep = []
        hi = INF
        for _key, seq, value in group:
            keep.append(any(self.kept_in(max(seq, a), min(hi, b)) for a, b in alive))
            if not extents or Extent.unpack(value).is_base:
                hi = seq
        # A tombstone with nothing kept under it says what absence says (but not in
        # a clone, where absence shows the base).
        for i in range(len(group) - 1, -1, -1):
            if self.store.base is not None:
                break
            if not keep[i]:
                continue
            value = group[i][2]
            if value and not (extents and value == b"H"):
                break
            keep[i] = False
        for (key, seq, _value), kept in zip(group, keep, strict=True):
            if kept:
                if seq < self.full_from:
                    self.survivors.add(seq)
            else:
                versions.delete(self.store, txn, table, key)
                self.result.versions += 1
        return len(group)

    # --- phase 2: journal ----------------------------------------------------------

    def _journal(self, txn: lmdb.Transaction) -> bool:
        start = U64.unpack(self.cursor)[0] if self.cursor else 0
        for n, (seq, raw) in enumerate(journal.packed(self.store, txn, start)):
            if seq >= self.full_from or seq > self.keep_after:
                return True
            if n >= self.step_keys:
                self.cursor = U64.pack(seq)
                return False
            if seq in self._sparse_set:
                continue
            journal.unindex(self.store, txn, seq, journal.ts_of(raw))
            if seq not in self.survivors:
                journal.delete(self.store, txn, seq)
                self.result.records += 1
        return True

    # --- phase 3 and 4: mark and sweep ----------------------------------------------

    def _mark(self, txn: lmdb.Transaction) -> bool:
        if not self.cursor:
            self.mark_seq = min(journal.last(self.store, txn)[0], self.keep_after)
        for n, (key, value) in enumerate(versions.scan(self.store, txn, "extents",
                                                       self.cursor or b"")):
            if n >= self.step_keys:
                self.cursor = bytes(key)
                return False
            self.refs.add_extent(value)
        return True

    def _catch_up(self, txn: lmdb.Transaction) -> None:
        """Mark what records written since the mark began reference."""
        for rec in journal.records(self.store, txn, self.mark_seq + 1):
            self.refs.add_record(rec)
            self.mark_seq = rec.seq

    def _swept(self, done: blocks.Swept, table: str) -> bool:
        self.result.bytes_freed += done.nbytes
        if table == "blocks":
            self.result.blocks += done.count
        else:
            self.result.packs += done.count
        if done.resume is None:
            return True
        self.cursor = done.resume
        return False

    def _sweep_blocks(self, txn: lmdb.Transaction) -> bool:
        self._catch_up(txn)
        done = blocks.sweep(self.store, txn, self.cursor or b"", self.refs.blocks.__contains__,
                            self.step_keys)
        return self._swept(done, "blocks")

    def _sweep_packs(self, txn: lmdb.Transaction) -> bool:
        self._catch_up(txn)
        done = blocks.sweep_packs(self.store, txn, self.cursor or b"",
                                  self.refs.packs.__contains__, self.step_keys)
        return self._swept(done, "packs")


def prune_store(store: Store, *, keep_after: int | None, now_ns: int | None = None,
                ) -> PruneResult:
    """Prune ``store`` in write transactions of its own (beside a mount, or in a
    replica server); ``keep_after`` as for ``Pruner``."""
    with store.txn() as txn:
        pruner = Pruner(store, txn, keep_after=keep_after, now_ns=now_ns)

    result = pruner.run(lambda: store.txn(write=True))
    log.info("pruned %s: %d versions, %d records, %d blocks, %d packs, %.1f MiB freed",
             store.path, result.versions, result.records, result.blocks, result.packs,
             result.bytes_freed / 2**20)
    return result
