"""Events told by the store itself: what other processes recorded in it.

Bookmarks made by ``cdpfs bookmark``, DR tests run by ``cdpfs drtest`` or a
replica server's schedule, backups made by its child: each is recorded in the
store by whoever did it, often another process. The volume service looks
whenever the store changed (its watcher) and reports the difference from the
last look as events (``cdpfs.events``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import backups, drtests
from .history import bookmarks
from .store.lmdb import Store


@dataclass(frozen=True, slots=True)
class Seen:
    """What the last look found."""

    marks: dict[str, int]
    testing: int  # the start time (ns) of the DR test in progress (0: none)
    tested: int  # the start time of the last finished one (0: none)
    backup: int  # when the last backup was made or failed (0: none)


def look(store: Store) -> Seen:
    """What ``store`` records now (read-only, a few small reads)."""
    with store.txn() as txn:
        marks = {b.name: b.seq for b in bookmarks.bookmarks(store, txn)}
    running, last = drtests.running(store), drtests.last(store)
    made = backups.schedule(store).last
    return Seen(marks, running.ts if running else 0, last.ts if last else 0,
                made.made_at if made else 0)


def changes(store: Store, before: Seen, now: Seen) -> list[tuple[str, dict[str, Any]]]:
    """The events (kind, fields) between two looks at ``store``."""
    told: list[tuple[str, dict[str, Any]]] = []
    for name, seq in now.marks.items():
        if before.marks.get(name) != seq:
            told.append(("bookmark", {"name": name, "seq": seq}))
    told += [("bookmark-deleted", {"name": name}) for name in before.marks
             if name not in now.marks]
    if now.testing and now.testing != before.testing:
        told.append(("drtest-started", {"started": now.testing}))
    if now.tested and now.tested != before.tested:
        result = drtests.last(store)
        if result is not None:
            told.append(("drtest-passed" if result.ok else "drtest-failed",
                         {"started": result.ts, "seq": result.seq, "seconds": result.seconds,
                          "scenario": result.scenario, "detail": result.failed[:500]}))
    if now.backup and now.backup != before.backup:
        made = backups.schedule(store).last
        if made is not None:
            told.append(("backup-failed" if made.failed else "backup-done",
                         {"made": made.made_at, "file": made.path, "seq": made.seq,
                          "size": made.size,
                          "verified": made.verified, "detail": made.failed[:500]}))
    return told
