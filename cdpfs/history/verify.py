"""Check a store: rehash every block and check every reference of every version.

``verify`` returns a list of problems, each one line naming what is damaged;
an empty list means the store is sound. A clone is also checked against its
base: the base still holds the clone's point for it (its hold), the base's
record there is the one the clone was made of (checked when the clone is
opened), and the clone has no version of its own at or before that point; so
the clone reads at its point exactly as its base did when it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb

from ..errors import Corrupt
from ..store import blocks, codec, journal, versions
from ..store.lmdb import Store
from ..store.refs import of_extent
from ..store.schema import MAX_SEQ, RECEIVING, U64, Extent, inode_prefix, seq_of
from ..store.view import View
from . import bookmarks


def _check_blocks(store: Store, txn: lmdb.Transaction) -> Iterator[str]:
    for key, raw in blocks.scan(store, txn):
        try:
            codec.decode(raw, key)
        except Corrupt as exc:
            yield f"corrupt block: {exc}"
    for pack, raw in blocks.scan_packs(store, txn):
        try:
            codec.decode_pack(raw, pack)
        except Corrupt as exc:
            yield f"corrupt pack: {exc}"


def _check_versions(store: Store, txn: lmdb.Transaction, last: int) -> Iterator[str]:
    known: set[int] = set()

    def recorded(seq: int) -> bool:
        if seq in known:
            return True
        if seq <= last and journal.has(store, txn, seq):
            known.add(seq)
            return True
        return False

    point = store.clone_of.seq if store.clone_of is not None else 0  # a clone's own start after
    for table in ("inodes", "dirents", "extents", "xattrs"):
        for key in versions.keys(store, txn, table):
            seq = seq_of(key)
            if not recorded(seq):
                yield f"{table}: version {key.hex()} has no journal record {seq}"
            elif seq <= point:
                yield (f"{table}: version {key.hex()} of the clone is at or before its "
                       f"point #{point}")

    for key, value in versions.scan(store, txn, "extents"):
        block, pack = of_extent(value)
        if block is None and pack is None:
            continue
        where = (f"inode {U64.unpack_from(key, 0)[0]} block {U64.unpack_from(key, 8)[0]} "
                 f"at seq {seq_of(key)}")
        if block is not None and not blocks.has(store, txn, block):
            yield f"missing block {block.hex()}: {where}"
        elif pack is not None:
            ext = Extent.unpack(value)
            try:
                blocks.piece(store, txn, ext.pack, ext.pack_off, ext.length, ext.digest)
            except Corrupt as exc:
                yield f"bad piece: {exc}: {where}"

    # A name must lead to an inode that existed while the name showed. Pruning
    # keeps what kept points show, so the inode's version from the seq the name
    # was made may be gone, and so may the removal of a name in a directory
    # since deleted: the check is that some version of the inode up to the
    # name's next version exists.
    prefix, newer = b"", MAX_SEQ + 1
    under = View(store, txn).under  # a clone's names may lead to its base's inodes
    for key, value in versions.scan(store, txn, "dirents"):
        seq = seq_of(key)
        until = newer - 1 if key[:-8] == prefix else MAX_SEQ
        prefix, newer = key[:-8], seq
        if not value:
            continue
        child = U64.unpack(value)[0]
        if not _existed(store, txn, child, until) and \
                (under is None or under.inode(child) is None):
            parent = U64.unpack_from(key, 0)[0]
            name = key[8:-9].decode(errors="replace")
            yield f"dangling name: {name!r} in directory {parent} -> inode {child} at seq {seq}"


def _existed(store: Store, txn: lmdb.Transaction, ino: int, until: int) -> bool:
    """Whether inode ``ino`` has a (non-freed) version at or before ``until``."""
    return any(value for _, value in versions.of(store, txn, "inodes", inode_prefix(ino),
                                                   until))


def _check_clone(store: Store, txn: lmdb.Transaction) -> Iterator[str]:
    """A clone's point is held by its base for it (the base's record there is checked
    by ``Store.under``; the clone's own versions by ``_check_versions``)."""
    of = store.clone_of
    if of is None or store.base is None:
        return
    name = of.hold or bookmarks.clone_hold_name(store.path)
    mark = bookmarks.get(store.base.store, store.under(txn), name)
    if mark is None or mark.seq != of.seq:
        yield (f"clone point #{of.seq} is not held by its base {of.path} (no hold {name!r}): "
               "a prune of the base may free what the clone reads")


def verify(store: Store, progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem found in ``store`` (empty when it is sound)."""
    problems: list[str] = []
    with store.txn() as txn:
        last = journal.top(store, txn)
        if progress:
            progress("checking blocks")
        problems.extend(_check_blocks(store, txn))
        if progress:
            progress("checking versions")
        problems.extend(_check_versions(store, txn, last))
        problems.extend(_check_clone(store, txn))
        # (a receive stopped before its first records made a store with nothing yet)
        if View(store, txn, MAX_SEQ).inode(1) is None and \
                not (last == 0 and store.meta(txn, RECEIVING) is not None):
            problems.append("root directory is missing")
    return problems


def check(path: Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """``verify`` of the store at ``path``, opened read-only (``cdpfs verify``)."""
    with Store(path, readonly=True) as store:
        return verify(store, progress)
