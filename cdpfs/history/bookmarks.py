"""Bookmarks (named points in history) and holds (points a running process reads).

Both live in the ``bookmarks`` table (``store.bookmarks``), keyed by name. A
bookmark is kept by retention until deleted. A *hold* is a bookmark-like entry
named ``.hold.<pid>.<tag>`` that a mount writes while it shows a past state (an
``@`` directory, a snapshot mount); retention keeps its point while the process
lives and drops holds of dead processes. A clone's hold, ``.hold.clone:<path>``
(the path the clone was made at), keeps the point the clone reads through to
until the clone is deleted (``history.clones``): it is not dropped when nothing
is at that path, since a clone may be moved, and a point a clone reads must
never be pruned under it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from ..errors import Exists
from ..store import bookmarks as table
from ..store import journal
from ..store.bookmarks import CLONE_HOLD, HOLD, Bookmark
from ..store.bookmarks import MAX_NAME as MAX_NAME  # what a clone's hold name may take
from ..store.lmdb import Store
from .moments import BadMoment, parse
from .points import resolve

TESTED = "tested-"  # a replica's own bookmarks of points a DR test passed


def all_points(store: Store, txn: lmdb.Transaction) -> list[Bookmark]:
    """Every bookmark and hold, by name."""
    return table.points(store, txn)


def bookmarks(store: Store, txn: lmdb.Transaction) -> list[Bookmark]:
    """The user's bookmarks (holds left out), by name."""
    return [b for b in table.points(store, txn) if not b.is_hold]


def get(store: Store, txn: lmdb.Transaction, name: str) -> Bookmark | None:
    return table.get(store, txn, name)


def put(store: Store, txn: lmdb.Transaction, name: str, seq: int, *,
        replace: bool = False) -> Bookmark:
    """Name point ``seq``; BadMoment for a bad or taken name or an unknown seq."""
    if not valid_name(name):
        raise BadMoment(f"{name!r}: a bookmark name is letters, digits and _ . + - "
                        "(up to 100, no leading @) and must not read as a time or #sequence")
    if not replace and table.get(store, txn, name) is not None:
        raise Exists(f"bookmark {name!r} exists (delete it first)")
    return _write(store, txn, name, seq)


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a bookmark: letters, digits and _ . + - (up to 100,
    no leading @ or .) that do not read as a time or #sequence."""
    try:
        return name[:1] not in "@." and parse(name).kind == "bookmark"
    except BadMoment:
        return False


def hold(store: Store, txn: lmdb.Transaction, tag: str, seq: int) -> Bookmark:
    """Hold point ``seq`` for this process (``tag`` names the holder within it)."""
    return _write(store, txn, hold_name(tag), seq)


def clone_hold_name(clone: Path) -> str:
    """The name of the hold of a clone made at ``clone`` (an absolute path)."""
    return f"{CLONE_HOLD}{clone}"


def hold_clone(store: Store, txn: lmdb.Transaction, name: str, seq: int) -> Bookmark:
    """Hold point ``seq`` for a clone, under the hold ``name`` (``clone_hold_name``)
    that the clone keeps in its meta, until ``release_clone``."""
    return _write(store, txn, name, seq)


def release_clone(store: Store, txn: lmdb.Transaction, name: str) -> bool:
    """Drop the clone hold ``name``; whether there was one."""
    return table.delete(store, txn, name)


def release(store: Store, txn: lmdb.Transaction, tag: str) -> None:
    table.delete(store, txn, hold_name(tag))


def release_all(store: Store, txn: lmdb.Transaction) -> int:
    """Drop every hold of this process (it stops showing the past); how many."""
    mine = hold_name("")
    names = [m.name for m in table.points(store, txn) if m.name.startswith(mine)]
    for name in names:
        table.delete(store, txn, name)
    return len(names)


def drop(store: Store, txn: lmdb.Transaction, names: list[str]) -> None:
    """Drop the bookmarks and holds ``names`` whatever they are (prune: holds of
    processes that are gone; failback: the points of records it took out)."""
    for name in names:
        table.delete(store, txn, name)


def _write(store: Store, txn: lmdb.Transaction, name: str, seq: int) -> Bookmark:
    if not journal.has(store, txn, seq):
        raise BadMoment(f"#{seq}: no such journal record")
    return table.put(store, txn, Bookmark(name, seq, time.time_ns()))


def delete(store: Store, txn: lmdb.Transaction, name: str) -> None:
    """Delete the bookmark ``name`` (BadMoment if there is none; holds are not
    bookmarks: they go with what holds them)."""
    if name.startswith(HOLD) or not table.delete(store, txn, name):
        raise BadMoment(f"{name!r}: no such bookmark")


def mirror(store: Store, txn: lmdb.Transaction, marks: dict[str, list[int]]) -> int:
    """Make the user's bookmarks those of ``marks`` ({name: [seq, created_ns]}, a
    primary's, on its replica), leaving holds and the replica's own DR test
    bookmarks (``tested-*``) alone and skipping points not in the journal here.
    The number of bookmarks changed."""
    changed = 0
    for mark in bookmarks(store, txn):
        if mark.name not in marks and not mark.name.startswith(TESTED):
            table.delete(store, txn, mark.name)
            changed += 1
    for name, (seq, created_ns) in marks.items():
        if not valid_name(name) or not journal.has(store, txn, seq):
            continue  # holds are each store's own; a name no bookmark may have is skipped
        mark = Bookmark(name, seq, created_ns)
        if table.get(store, txn, name) != mark:
            table.put(store, txn, mark)
            changed += 1
    return changed


_tags = itertools.count(1)


@contextmanager
def holding(store: Store, seqs: Iterable[int], what: str) -> Iterator[None]:
    """Hold points ``seqs`` for this process while the block runs (a send or an
    export reading them, prune running elsewhere meanwhile). A process killed
    meanwhile holds nothing: a hold of a dead process is dropped by prune."""
    tags: list[str] = []
    with store.txn(write=True) as txn:
        for seq in sorted(set(seqs)):
            if seq:
                tags.append(f"{what}.{next(_tags)}")
                hold(store, txn, tags[-1], seq)
    try:
        yield
    finally:
        with store.txn(write=True) as txn:
            for tag in tags:
                release(store, txn, tag)


def hold_name(tag: str) -> str:
    return f"{HOLD}{os.getpid()}.{tag}"


def add(path: Path, name: str, at: str | None = None) -> tuple[Bookmark, int]:
    """Bookmark the kept point moment ``at`` names (default: the newest record) in the
    store at ``path`` as ``name``: the bookmark and the time of its record."""
    with Store(path) as store, store.txn(write=True) as txn:
        point = resolve(store, txn, "now" if at is None else at)
        return put(store, txn, name, point.seq), point.ts


def remove(path: Path, name: str) -> None:
    """Delete the bookmark ``name`` of the store at ``path`` (BadMoment if it has none)."""
    if not name or not name.isprintable() or len(name.encode()) > MAX_NAME:  # no LMDB key
        raise BadMoment(f"{name!r}: no such bookmark")
    with Store(path) as store, store.txn(write=True) as txn:
        delete(store, txn, name)


def listed(path: Path) -> list[tuple[Bookmark, int | None]]:
    """The bookmarks of the store at ``path`` with the times of their records."""
    with Store(path) as store, store.txn() as txn:
        return [(mark, journal.ts(store, txn, mark.seq)) for mark in bookmarks(store, txn)]
