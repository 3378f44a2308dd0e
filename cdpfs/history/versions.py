"""Questions about history: the versions of one file, and what changed between two points.

``file_versions`` and ``tree_changes`` answer them for the store at a path
(``cdpfs log``, ``cdpfs diff``), ``versions`` and ``diff`` inside a transaction.

Both read the versioned tables (``store.versions``, ``store.view``): a file's
versions are the versions of its inode (every change to a file writes one), and a
diff walks the two trees as of their sequence numbers, matching entries by inode
number so renames show as such.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from ..errors import NotFound
from ..store import journal
from ..store import versions as store_versions
from ..store.lmdb import Store
from ..store.schema import Inode, inode_prefix
from ..store.view import View
from .points import resolve


@dataclass(frozen=True, slots=True)
class Version:
    """One version of an inode: the record that made it (if still kept) and the inode."""

    seq: int
    ts: int | None
    op: str
    args: dict[str, Any]
    node: Inode | None  # None: the inode was freed at this point


def versions(store: Store, txn: lmdb.Transaction, ino: int, upto: int | None = None,
             ) -> Iterator[Version]:
    """Versions of inode ``ino`` (at or before seq ``upto``), newest first."""
    for seq, value in store_versions.of(store, txn, "inodes", inode_prefix(ino), upto or None):
        rec = journal.get(store, txn, seq)
        yield Version(seq, rec.ts if rec else None, rec.op if rec else "(thinned)",
                      rec.args if rec else {}, Inode.unpack(value) if value else None)


def file_versions(path: Path, rel: str, at: str | None = None, limit: int = 0,
                  ) -> list[Version]:
    """The versions (at most ``limit``, 0: all) of the file at ``rel`` in the volume of
    the store at ``path``, newest first; with ``at``, of the file that had that path
    at that moment, up to then."""
    with Store(path) as store:
        upto = None if at is None else _point(store, at)
        with store.txn() as txn:
            view = View(store, txn) if upto is None else View(store, txn, upto)
            out: list[Version] = []
            for version in versions(store, txn, view.resolve(rel), upto):
                out.append(version)
                if len(out) == limit:
                    break
            return out


def tree_changes(path: Path, t1: str, t2: str, rel: str = "") -> tuple[int, int, list[Change]]:
    """What changed under ``rel`` in the volume of the store at ``path`` between the
    kept points moments ``t1`` and ``t2`` name: those points and the changes."""
    with Store(path) as store:
        seq1, seq2 = _point(store, t1), _point(store, t2)
        with store.txn() as txn:
            return seq1, seq2, diff(store, txn, seq1, seq2, rel)


def _point(store: Store, moment: str) -> int:
    with store.txn() as txn:
        return resolve(store, txn, moment).seq


@dataclass(frozen=True, slots=True)
class Change:
    """One line of a diff: A added, M modified, D deleted, R renamed (``old`` set)."""

    kind: str
    path: str
    old: str = ""

    def __str__(self) -> str:
        return f"R  {self.old} -> {self.path}" if self.kind == "R" else f"{self.kind}  {self.path}"


def _walk(view: View, ino: int, path: str) -> dict[int, tuple[list[str], Inode]]:
    """Every inode under ``ino`` (included) with its paths, as of the view."""
    out: dict[int, tuple[list[str], Inode]] = {}
    todo = [(ino, path)]
    while todo:
        ino, path = todo.pop()
        node = view.inode(ino)
        if node is None:
            continue
        if ino in out:
            out[ino][0].append(path)
            continue
        out[ino] = ([path], node)
        if node.is_dir:
            for name, child in view.listdir(ino):
                todo.append((child, f"{path}/{name.decode(errors='surrogateescape')}"
                             if path else name.decode(errors="surrogateescape")))
    return out


def _same(a: View, b: View, ino: int, na: Inode, nb: Inode) -> bool:
    """Whether an inode shows the same content and attributes in both views
    (change times aside: a rename or a new link alone is not a modification)."""
    ignore = {"ctime": 0, "atime": 0, "nlink": 0}
    if na.is_dir:  # entries coming and going show as entries, not as a changed directory
        ignore.update(mtime=0, size=0)
    if na.with_(**ignore) != nb.with_(**ignore):
        return False
    if a.xattrs(ino) != b.xattrs(ino) or any(
            a.xattr(ino, x) != b.xattr(ino, x) for x in a.xattrs(ino)):
        return False
    if na.is_reg:
        return all(a.chain(ino, i) == b.chain(ino, i) for i in a.block_indices(ino))
    return True


def diff(store: Store, txn: lmdb.Transaction, seq1: int, seq2: int, path: str = "",
         ) -> list[Change]:
    """What changed under ``path`` between the points ``seq1`` and ``seq2``."""
    a, b = View(store, txn, seq1), View(store, txn, seq2)
    if path and not _exists(a, path) and not _exists(b, path):
        raise NotFound(f"{path}: no such file or directory at #{seq1} or at #{seq2}")
    old = _walk(a, a.resolve(path), path) if _exists(a, path) else {}
    new = _walk(b, b.resolve(path), path) if _exists(b, path) else {}

    out: list[Change] = []
    for ino, (paths, node) in new.items():
        if ino not in old:
            out += [Change("A", p) for p in paths]
            continue
        before, prev = old[ino]
        gone = sorted(set(before) - set(paths))
        came = sorted(set(paths) - set(before))
        for p_old, p_new in zip(gone, came, strict=False):
            out.append(Change("R", p_new, p_old))
        out += [Change("D", p) for p in gone[len(came):]]
        out += [Change("A", p) for p in came[len(gone):]]
        if not _same(a, b, ino, prev, node):
            out += [Change("M", p) for p in sorted(paths) if p in before or p in came]
    for ino, (paths, _node) in old.items():
        if ino not in new:
            out += [Change("D", p) for p in paths]
    moved = {c.old + "/": c.path + "/" for c in out if c.kind == "R"}
    out = [c for c in out if c.kind != "R" or not _follows(c, moved)]
    return sorted(out, key=lambda c: (c.path, c.kind))


def _follows(change: Change, moved: dict[str, str]) -> bool:
    """Whether a rename only follows the rename of a directory above it."""
    for old, new in moved.items():
        if change.old.startswith(old) and change.path == new + change.old[len(old):]:
            return True
    return False


def _exists(view: View, path: str) -> bool:
    try:
        view.resolve(path)
    except NotFound:

        return False
    return True
