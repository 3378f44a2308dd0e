"""A hash of a whole tree as of a seq: equal hashes mean identical volumes.

Used to check that a replica holds exactly the primary's state
(``cdpfs verify --compare``: ``compare``), that a DR test's clone shows the
primary's state at the tested point (``hash_of``), and that a backup gives back
its point's tree (``cdpfs.backups``). The walk is in name order; every entry adds
its path, kind, permissions, owner, size, mtime, symlink target, extended
attributes and, for a regular file, the blake3 of its content.
"""

from __future__ import annotations

import stat
from pathlib import Path

import blake3
import lmdb

from ..errors import CdpfsError
from ..store import journal
from ..store.lmdb import Store, is_store
from ..store.schema import ROOT_INO
from ..store.view import View


def tree_hash(store: Store, txn: lmdb.Transaction, seq: int, *,
              sockets: bool = True) -> tuple[str, int]:
    """(hex hash, number of entries) of the volume as of ``seq``; without
    ``sockets``, sockets are left out (what a tar can hold: a tar backup's check)."""
    view = View(store, txn, seq)
    h = blake3.blake3()
    count = 0
    todo: list[tuple[int, bytes]] = [(ROOT_INO, b"")]
    while todo:
        ino, path = todo.pop()
        node = view.inode(ino)
        if node is None or (not sockets and stat.S_ISSOCK(node.mode)):
            continue
        count += 1
        h.update(b"%s\0%o %d %d %d %d\0%s\0" % (path, node.mode, node.uid, node.gid, node.size,
                                                node.mtime, node.target))
        for name in view.xattrs(ino):
            h.update(b"x%s=%s\0" % (name, view.xattr(ino, name) or b""))
        if node.is_reg:
            content = blake3.blake3()
            bs = store.block_size
            for off in range(0, node.size, bs):
                content.update(view.read(ino, off, bs, node.size))
            h.update(content.digest())
        if node.is_dir:
            children = list(view.listdir(ino))
            todo.extend((child, path + b"/" + name) for name, child in reversed(children))
    return h.hexdigest(), count


def hash_of(path: Path, seq: int) -> str:
    """The tree hash of the volume in the store at ``path`` as of ``seq``."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        return tree_hash(store, txn, seq)[0]


def compare(primary: Path, replica: Path, at: int | None = None) -> tuple[int, int, str]:
    """Check that two stores of one volume hold the same tree at seq ``at`` (default:
    the newest both have): (seq, entries, tree hash); CdpfsError if they differ, are
    not stores, hold other volumes or lack that seq."""
    for p in (primary, replica):
        if not is_store(p):
            raise CdpfsError(f"{p}: not a cdpfs store")
    with Store(primary) as a, Store(replica) as b, a.txn() as ta, b.txn() as tb:
        if a.uuid != b.uuid:
            raise CdpfsError(f"{replica} holds volume {b.uuid}, not {a.uuid}")
        last = min(journal.last(a, ta)[0], journal.last(b, tb)[0])
        seq = last if at is None else at
        if seq > last:
            raise CdpfsError(f"#{seq}: both stores have records only up to #{last}")
        ha, n = tree_hash(a, ta, seq)
        hb, _ = tree_hash(b, tb, seq)
    if ha != hb:
        raise CdpfsError(f"differ at #{seq}: {primary} {ha[:16]}, {replica} {hb[:16]}")
    return seq, n, ha
