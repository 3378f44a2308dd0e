"""Writable clones: a thin store of its own over a base store as of one point.

``make`` creates a clone in constant time: a new store whose meta names the base
and the point (``store.lmdb.CloneOf``) and whose journal starts with one record
at that point's sequence number; reads of anything the clone has not changed go
through to the base (``store.view.View.under``). The base keeps the point from
pruning with a hold named after the clone's path (``bookmarks.CLONE_HOLD``) until
``delete`` removes the clone. ``describe`` says what a clone adds to its base.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import system
from ..errors import StoreError, StoreLocked
from ..store import journal
from ..store.lmdb import CloneOf, Store, encode_clone, is_store
from ..store.schema import ROOT_INO
from . import bookmarks
from .points import Point, resolve

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
    base = Store(Path(os.path.abspath(base_path)))
    try:
        # First a hold of this process (dropped if it dies), so that no prune of the
        # base frees the point before the clone's own hold names a clone that is there.
        with base.txn(write=True) as txn:
            point = resolve(base, txn, at or "now", now_ns)
            bookmarks.hold(txn, base.db, "clone", point.seq)
            pack_start = max(_counter(base, txn, b"next_pack", 1),
                             base.after_last(txn, "packs"))
            next_ino = max(_counter(base, txn, b"next_ino", ROOT_INO + 1),
                           base.after_last(txn, "inodes"))
            settings = {bytes(k): bytes(v) for k, v in txn.cursor(db=base.db["meta"])
                        if bytes(k).startswith(b"config.") and bytes(k) != b"config.role"}
        try:
            _build(base, clone_path, point, pack_start, next_ino, settings)
            with base.txn(write=True) as txn:
                bookmarks.hold_clone(txn, base.db, clone_path, point.seq)
                bookmarks.release(txn, base.db, "clone")
        except BaseException:
            with base.txn(write=True) as txn:
                bookmarks.release(txn, base.db, "clone")
            raise
    finally:
        base.close()
    log.info("cloned %s at #%d into %s", base.path, point.seq, clone_path)
    return Clone(clone_path, base.path, point.seq, point.ts)


def _counter(store: Store, txn: object, key: bytes, default: int) -> int:
    raw = txn.get(key, db=store.db["meta"])  # type: ignore[attr-defined]
    return int(raw) if raw else default


def _build(base: Store, clone_path: Path, point: Point, pack_start: int, next_ino: int,
           settings: dict[bytes, bytes]) -> None:
    """Make the clone's store aside and move it in whole: a clone is either complete
    at its path or not there."""
    tmp = Path(tempfile.mkdtemp(prefix=_MAKING, dir=clone_path.parent))
    try:
        store = Store.create(tmp / "store", block_size=base.block_size)
        try:
            with store.txn(write=True) as txn:
                meta = store.db["meta"]
                txn.put(b"clone", encode_clone(CloneOf(base.path, base.uuid, point.seq,
                                                       pack_start)), db=meta)
                txn.put(b"next_ino", str(next_ino).encode(), db=meta)
                txn.put(b"next_pack", str(pack_start).encode(), db=meta)
                for key, value in settings.items():
                    txn.put(key, value, db=meta)
                # The clone's history starts at the point it shows, at that point's time.
                journal.append(txn, store.db, journal.Record(
                    point.seq, point.ts, "clone", ROOT_INO,
                    {"base": str(base.path), "seq": point.seq}, []))
        finally:
            store.env.close()
        os.rename(tmp / "store", clone_path)
        system.fsync_dir(clone_path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def delete(clone_path: Path) -> Clone:
    """Remove the clone at ``clone_path`` and release its hold on the base (StoreError
    if it is not a clone, or is mounted). The base need not be there any more."""
    clone_path = Path(os.path.abspath(clone_path))
    store = Store(clone_path, open_base=False)
    try:
        of = store.clone_of
        if of is None:
            raise StoreError(f"{clone_path}: not a clone (clone --delete deletes only "
                             "clones; a store is never deleted by cdpfs)")
        store.lock("clone --delete")  # StoreLocked while mounted
        with store.txn() as txn:
            first = journal.get(txn, store.db, of.seq)
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
            bookmarks.release_clone(txn, base.db, clone_path)
    else:
        log.warning("%s: its base %s is gone; no hold to release", clone_path, of.path)
    return Clone(clone_path, of.path, of.seq, first.ts if first is not None else 0)
