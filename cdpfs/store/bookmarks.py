"""The ``bookmarks`` table: named points of history, and holds.

Key: the name; value: ``seq(8) + created_ns(8)``. A name starting ``.hold.`` is a
*hold*: ``.hold.<pid>.<tag>``, a point a running process shows (kept while that
process lives), or ``.hold.clone:<path>``, the point a clone made at that path
reads through to (kept until the clone is deleted). What names are allowed, who
holds what and when a hold goes is ``history.bookmarks``'s; this module reads and
writes the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lmdb

from .. import system
from .lmdb import Store
from .schema import U64

HOLD = ".hold."
CLONE_HOLD = HOLD + "clone:"
MAX_NAME = 511  # bytes: LMDB's longest key


@dataclass(frozen=True, slots=True)
class Bookmark:
    """A named point: the journal sequence it names and when it was made."""

    name: str
    seq: int
    created_ns: int

    @property
    def is_hold(self) -> bool:
        return self.name.startswith(HOLD)

    @property
    def clone_path(self) -> Path | None:
        """For a clone's hold: the path the clone was made at (None for others)."""
        return Path(self.name[len(CLONE_HOLD):]) if self.name.startswith(CLONE_HOLD) else None

    @property
    def holder_alive(self) -> bool:
        """For a hold: whether it still holds, that is whether the process that wrote
        it still runs; a clone's hold holds until the clone is deleted."""
        if self.name.startswith(CLONE_HOLD):
            return True
        try:
            pid = int(self.name[len(HOLD):].split(".", 1)[0])
        except ValueError:
            return False
        return system.pid_alive(pid)


def _decode(name: bytes, raw: bytes | memoryview) -> Bookmark:
    return Bookmark(name.decode(), U64.unpack_from(raw)[0],
                    U64.unpack_from(raw, 8)[0] if len(raw) >= 16 else 0)


def points(store: Store, txn: lmdb.Transaction) -> list[Bookmark]:
    """Every bookmark and hold, by name."""
    cur = txn.cursor(db=store.db["bookmarks"])
    return [_decode(bytes(k), v) for k, v in cur.iternext()]


def get(store: Store, txn: lmdb.Transaction, name: str) -> Bookmark | None:
    raw = txn.get(name.encode(), db=store.db["bookmarks"])
    return None if raw is None else _decode(name.encode(), raw)


def put(store: Store, txn: lmdb.Transaction, mark: Bookmark) -> Bookmark:
    """Write ``mark`` (replacing one of the same name)."""
    txn.put(mark.name.encode(), U64.pack(mark.seq) + U64.pack(mark.created_ns),
            db=store.db["bookmarks"])
    return mark


def delete(store: Store, txn: lmdb.Transaction, name: str) -> bool:
    """Drop the bookmark or hold ``name``; whether there was one."""
    return bool(txn.delete(name.encode(), db=store.db["bookmarks"]))


def count(store: Store, txn: lmdb.Transaction) -> int:
    return int(txn.stat(store.db["bookmarks"])["entries"])
