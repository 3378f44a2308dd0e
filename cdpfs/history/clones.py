"""Writable clones: a thin store of its own over a base store as of one point.

``make`` creates a clone in constant time: a new store whose meta names the base,
the point and the check of the base's record there (``store.lmdb.CloneOf``) and
whose journal starts with one record at that point's sequence number; reads of
anything the clone has not changed go through to the base
(``store.view.View.under``), which must still hold that same record. The base
keeps the point from pruning with a hold named after the path the clone was made
at (``bookmarks.clone_hold_name``; its name is in the clone's meta, so a clone
that was moved still finds it) until ``delete`` removes the clone, or ``forget``
releases the hold of a clone removed by hand. ``held`` lists a base's clone holds
and whether each clone is still where it was made; ``rebase`` points a clone at
another copy of the same history (a failback keeps the history a clone reads in
a copy of its base).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .. import system
from ..errors import StoreError, StoreLocked
from ..store import journal
from ..store.lmdb import CloneOf, Store, encode_clone, is_store
from ..store.schema import ROOT_INO
from . import bookmarks
from .points import resolve

log = logging.getLogger(__name__)

_MAKING = ".cdpfs-clone-"  # prefix of the directory a clone is made in, beside it
_DELETING = ".cdpfs-deleting-"


@dataclass(frozen=True, slots=True)
class Clone:
    """A clone: where it is, its base, and the point of the base it shows."""

    path: Path
    base: Path
    seq: int
    ts: int


@dataclass(frozen=True, slots=True)
class Held:
    """A clone hold of a base: the hold's name, the point, the path the clone was made
    at, and whether a clone of this base is there now (if not, it was moved, or
    removed by hand: ``forget`` releases the hold)."""

    name: str
    seq: int
    path: Path
    present: bool


def make(base_path: Path, clone_path: Path, at: str | None = None,
         now_ns: int | None = None) -> Clone:
    """Clone the volume in ``base_path`` as of moment ``at`` (default: its newest
    record) into the new store ``clone_path``; StoreError (one line) and nothing
    changed if the moment is not kept, the path exists, or the base is no store."""
    clone_path = Path(os.path.abspath(clone_path))
    if os.path.lexists(clone_path):
        raise StoreError(f"{clone_path}: exists already (a clone is made at a new path)")
    if not clone_path.parent.is_dir():
        raise StoreError(f"{clone_path.parent}: no such directory")
    hold = bookmarks.clone_hold_name(clone_path)
    if len(hold.encode()) > bookmarks.MAX_NAME:
        raise StoreError(f"{clone_path}: too long a path for a clone (its base keeps its "
                         f"moment under a name of at most {bookmarks.MAX_NAME} bytes)")
    base = Store(Path(os.path.abspath(base_path)))
    try:
        # First a hold of this process (dropped if it dies), so that no prune of the
        # base frees the point before the clone's own hold names a clone that is there.
        with base.txn(write=True) as txn:
            point = resolve(base, txn, "now" if at is None else at, now_ns)
            bookmarks.hold(base, txn, "clone", point.seq)
            check = journal.check(base, txn, point.seq)
            pack_start = max(_counter(base, txn, b"next_pack", 1),
                             base.after_last(txn, "packs"))
            next_ino = max(_counter(base, txn, b"next_ino", ROOT_INO + 1),
                           base.after_last(txn, "inodes"))
            settings = {k: v for k, v in base.meta_items(txn, b"config.").items()
                        if k != b"config.role"}
        try:
            _build(base, clone_path, CloneOf(base.path, base.uuid, point.seq, pack_start,
                                             check, hold), point.ts, next_ino, settings)
            with base.txn(write=True) as txn:
                bookmarks.hold_clone(base, txn, hold, point.seq)
                bookmarks.release(base, txn, "clone")
        except BaseException:
            with base.txn(write=True) as txn:
                bookmarks.release(base, txn, "clone")
            raise
    finally:
        base.close()
    log.info("cloned %s at #%d into %s", base.path, point.seq, clone_path)
    return Clone(clone_path, base.path, point.seq, point.ts)


def _counter(store: Store, txn: lmdb.Transaction, key: bytes, default: int) -> int:
    raw = store.meta(txn, key)
    return int(raw) if raw else default


def _build(base: Store, clone_path: Path, of: CloneOf, ts: int, next_ino: int,
           settings: dict[bytes, bytes]) -> None:
    """Make the clone's store aside and move it in whole: a clone is either complete
    at its path or not there."""
    tmp = Path(tempfile.mkdtemp(prefix=_MAKING, dir=clone_path.parent))
    try:
        store = Store.create(tmp / "store", block_size=base.block_size)
        try:
            with store.txn(write=True) as txn:
                store.set_meta(txn, b"clone", encode_clone(of))
                store.set_meta(txn, b"next_ino", str(next_ino).encode())
                store.set_meta(txn, b"next_pack", str(of.pack_start).encode())
                for key, value in settings.items():
                    store.set_meta(txn, key, value)
                # The clone's history starts at the point it shows, at that point's time.
                journal.apply(store, txn, [journal.Record(
                    of.seq, ts, "clone", ROOT_INO, {"base": str(base.path), "seq": of.seq},
                    [])])
        finally:
            store.close()
        os.rename(tmp / "store", clone_path)
        system.fsync_dir(clone_path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def delete(clone_path: Path) -> Clone:
    """Remove the clone at ``clone_path`` and release its hold on the base (StoreError
    if it is not a clone, or is mounted). The base need not be there any more."""
    clone_path = Path(os.path.abspath(clone_path))
    if not is_store(clone_path):
        raise StoreError(f"{clone_path}: no clone there (for one removed by hand, release "
                         f"its base's hold: cdpfs clone --delete {clone_path} --base BASE)")
    store = Store(clone_path, open_base=False)
    try:
        of = store.clone_of
        if of is None:
            raise StoreError(f"{clone_path}: not a clone (clone --delete deletes only "
                             "clones; a store is never deleted by cdpfs)")
        store.lock("clone --delete")  # StoreLocked while mounted
        with store.txn() as txn:
            first = journal.get(store, txn, of.seq)
    except StoreLocked as exc:
        store.close()
        raise StoreLocked(f"{exc} (unmount it first)") from None
    except BaseException:
        store.close()
        raise
    gone = clone_path.parent / f"{_DELETING}{clone_path.name}"
    os.rename(clone_path, gone)  # the hold names no store from here on
    system.fsync_dir(clone_path.parent)
    store.close()
    shutil.rmtree(gone, ignore_errors=True)
    if is_store(of.path):
        with Store(of.path) as base, base.txn(write=True) as txn:
            bookmarks.release_clone(base, txn, of.hold or bookmarks.clone_hold_name(clone_path))
    else:
        log.warning("%s: its base %s is gone; no hold to release", clone_path, of.path)
    return Clone(clone_path, of.path, of.seq, first.ts if first is not None else 0)


def forget(base_path: Path, clone_path: Path) -> Clone:
    """Release the hold ``base_path`` keeps for a clone made at ``clone_path`` that was
    removed by hand (StoreError if a store is there: delete it with ``delete``;
    or if the base holds nothing for that path)."""
    clone_path = Path(os.path.abspath(clone_path))
    if is_store(clone_path):
        raise StoreError(f"{clone_path}: a store is there: delete the clone with "
                         f"cdpfs clone --delete {clone_path}")
    name = bookmarks.clone_hold_name(clone_path)
    with Store(Path(os.path.abspath(base_path))) as base, base.txn(write=True) as txn:
        mark = bookmarks.get(base, txn, name)
        if mark is None:
            raise StoreError(f"{base.path} holds no point for a clone made at {clone_path}")
        bookmarks.release_clone(base, txn, name)
        ts = journal.get(base, txn, mark.seq)
        log.info("%s: released the hold of the clone removed from %s (#%d)", base.path,
                 clone_path, mark.seq)
        return Clone(clone_path, base.path, mark.seq, ts.ts if ts is not None else 0)


def held(base: Store, txn: lmdb.Transaction) -> list[Held]:
    """The clone holds of ``base``, read through ``txn``, with whether a clone of this
    base is still at the path it was made at."""
    out = []
    for mark in bookmarks.all_points(base, txn):
        path = mark.clone_path
        if path is not None:
            out.append(Held(mark.name, mark.seq, path, _clone_of(path, base) is not None))
    return out


def holds(path: Path) -> list[Held]:
    """``held`` of the store at ``path``, opened read-only."""
    with Store(path, readonly=True) as base, base.txn() as txn:
        return held(base, txn)


def base_of(path: Path) -> CloneOf | None:
    """What the store at ``path`` says of its base if it is a clone (None if it is
    none); the base is not opened. StoreError if it is no store."""
    with Store(path, readonly=True, open_base=False) as store:
        return store.clone_of


def _clone_of(path: Path, base: Store) -> CloneOf | None:
    """What the store at ``path`` says of its base, if it is a clone of ``base``."""
    if not is_store(path):
        return None
    try:
        of = base_of(path)
    except StoreError:
        return None
    if of is None or of.uuid != base.uuid or \
            os.path.realpath(of.path) != os.path.realpath(base.path):
        return None
    return of


def rebase(clone_path: Path, base_path: Path, *, locked: bool = False) -> None:
    """Make the clone at ``clone_path`` read through to ``base_path``, another copy of
    its base's history up to its point (the clone's hold is in that copy already).
    StoreLocked while the clone is in use (``locked``: the caller holds its writer
    lock); StoreError unless ``base_path`` holds the same record at the clone's point."""
    store = Store(clone_path, open_base=False)
    try:
        of = store.clone_of
        if of is None:
            raise StoreError(f"{clone_path}: not a clone")
        if not locked:
            store.lock("clone rebase")
        with Store(base_path, readonly=True) as new, new.txn() as txn:
            same = new.uuid == of.uuid and journal.check(new, txn, of.seq) == of.check
        if not same or not of.check:
            raise StoreError(f"{base_path}: does not hold the history {clone_path} was "
                             f"cloned from at #{of.seq}")
        moved = CloneOf(Path(os.path.abspath(base_path)), *of[1:])
        with store.txn(write=True) as txn:
            store.set_meta(txn, b"clone", encode_clone(moved))
        log.warning("clone %s now reads #%d from %s", clone_path, of.seq, base_path)
    finally:
        store.close()
