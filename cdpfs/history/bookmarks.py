"""Bookmarks (named points in history) and holds (points a running process reads).

Both live in the ``bookmarks`` table, keyed by name, value ``seq(8) + created_ns(8)``.
A bookmark is kept by retention until deleted. A *hold* is a bookmark-like entry
named ``.hold.<pid>.<tag>`` that a mount writes while it shows a past state (an
``@`` directory, a snapshot mount); retention keeps its point while the process
lives and drops holds of dead processes. A clone's hold, ``.hold.clone:<path>``
(the path the clone was made at), keeps the point the clone reads through to
until the clone is deleted (``history.clones``): it is not dropped when nothing
is at that path, since a clone may be moved, and a point a clone reads must
never be pruned under it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from .. import system
from ..errors import Exists
from ..store import journal
from ..store.schema import U64
from .moments import BadMoment, parse

HOLD = ".hold."
CLONE_HOLD = HOLD + "clone:"
TESTED = "tested-"  # a replica's own bookmarks of points a DR test passed
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


def all_points(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[Bookmark]:
    """Every bookmark and hold, by name."""
    cur = txn.cursor(db=dbs["bookmarks"])
    return [_decode(bytes(k), v) for k, v in cur.iternext()]


def bookmarks(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[Bookmark]:
    """The user's bookmarks (holds left out), by name."""
    return [b for b in all_points(txn, dbs) if not b.is_hold]


def get(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> Bookmark | None:
    raw = txn.get(name.encode(), db=dbs["bookmarks"])
    return None if raw is None else _decode(name.encode(), raw)


def put(txn: lmdb.Transaction, dbs: dict[str, Any], name: str, seq: int, *,
        replace: bool = False) -> Bookmark:
    """Name point ``seq``; BadMoment for a bad or taken name or an unknown seq."""
    if not valid_name(name):
        raise BadMoment(f"{name!r}: a bookmark name is letters, digits and _ . + - "
                        "(up to 100, no leading @) and must not read as a time or #sequence")
    if not replace and get(txn, dbs, name) is not None:
        raise Exists(f"bookmark {name!r} exists (delete it first)")
    return _write(txn, dbs, name, seq)


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a bookmark: letters, digits and _ . + - (up to 100,
    no leading @ or .) that do not read as a time or #sequence."""
    try:
        return name[:1] not in "@." and parse(name).kind == "bookmark"
    except BadMoment:
        return False


def hold(txn: lmdb.Transaction, dbs: dict[str, Any], tag: str, seq: int) -> Bookmark:
    """Hold point ``seq`` for this process (``tag`` names the holder within it)."""
    return _write(txn, dbs, hold_name(tag), seq)


def clone_hold_name(clone: Path) -> str:
    """The name of the hold of a clone made at ``clone`` (an absolute path)."""
    return f"{CLONE_HOLD}{clone}"


def hold_clone(txn: lmdb.Transaction, dbs: dict[str, Any], name: str, seq: int) -> Bookmark:
    """Hold point ``seq`` for a clone, under the hold ``name`` (``clone_hold_name``)
    that the clone keeps in its meta, until ``release_clone``."""
    return _write(txn, dbs, name, seq)


def release_clone(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> bool:
    """Drop the clone hold ``name``; whether there was one."""
    return bool(txn.delete(name.encode(), db=dbs["bookmarks"]))


def release(txn: lmdb.Transaction, dbs: dict[str, Any], tag: str) -> None:
    txn.delete(hold_name(tag).encode(), db=dbs["bookmarks"])


def release_all(txn: lmdb.Transaction, dbs: dict[str, Any]) -> int:
    """Drop every hold of this process (it stops showing the past); how many."""
    mine = hold_name("")
    names = [m.name for m in all_points(txn, dbs) if m.name.startswith(mine)]
    for name in names:
        txn.delete(name.encode(), db=dbs["bookmarks"])
    return len(names)



def _write(txn: lmdb.Transaction, dbs: dict[str, Any], name: str, seq: int) -> Bookmark:
    if journal.get(txn, dbs, seq) is None:
        raise BadMoment(f"#{seq}: no such journal record")
    mark = Bookmark(name, seq, time.time_ns())
    txn.put(name.encode(), U64.pack(seq) + U64.pack(mark.created_ns), db=dbs["bookmarks"])
    return mark


def delete(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> None:
    """Delete the bookmark ``name`` (BadMoment if there is none; holds are not
    bookmarks: they go with what holds them)."""
    if name.startswith(HOLD) or not txn.delete(name.encode(), db=dbs["bookmarks"]):
        raise BadMoment(f"{name!r}: no such bookmark")


def mirror(txn: lmdb.Transaction, dbs: dict[str, Any], marks: dict[str, list[int]]) -> int:
    """Make the user's bookmarks those of ``marks`` ({name: [seq, created_ns]}, a
    primary's, on its replica), leaving holds and the replica's own DR test
    bookmarks (``tested-*``) alone and skipping points not in the journal here.
    The number of bookmarks changed."""
    changed = 0
    for mark in bookmarks(txn, dbs):
        if mark.name not in marks and not mark.name.startswith(TESTED):
            txn.delete(mark.name.encode(), db=dbs["bookmarks"])
            changed += 1
    for name, (seq, created_ns) in marks.items():
        value = U64.pack(seq) + U64.pack(created_ns)
        if not valid_name(name) or journal.get(txn, dbs, seq) is None:
            continue  # holds are each store's own; a name no bookmark may have is skipped

        if txn.get(name.encode(), db=dbs["bookmarks"]) != value:
            txn.put(name.encode(), value, db=dbs["bookmarks"])
            changed += 1
    return changed


def hold_name(tag: str) -> str:
    return f"{HOLD}{os.getpid()}.{tag}"
