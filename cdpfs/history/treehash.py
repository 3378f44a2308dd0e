"""A hash of a whole tree as of a seq: equal hashes mean identical volumes.

Used to check that a replica holds exactly the primary's state
(``cdpfs verify --compare``). The walk is in name order; every entry adds its
path, kind, permissions, owner, size, mtime, symlink target, extended
attributes and, for a regular file, the blake3 of its content.
"""

from __future__ import annotations

import blake3
import lmdb

from ..store.lmdb import Store
from ..store.schema import ROOT_INO
from ..store.view import View


def tree_hash(store: Store, txn: lmdb.Transaction, seq: int) -> tuple[str, int]:
    """(hex hash, number of entries) of the volume as of ``seq``."""
    view = View(store, txn, seq)
    h = blake3.blake3()
    count = 0
    todo: list[tuple[int, bytes]] = [(ROOT_INO, b"")]
    while todo:
        ino, path = todo.pop()
        node = view.inode(ino)
        if node is None:
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
