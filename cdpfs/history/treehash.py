"""A hash of a whole tree as of a seq: equal hashes mean identical volumes.

Used to check that a replica holds exactly the primary's state
(``cdpfs verify --compare``: ``compare``), that a DR test's clone shows the
primary's state at the tested point (``hash_of``), and that a backup gives back
its point's tree (``cdpfs.backups``). The walk is in name order; every entry adds
its path, kind, permissions, owner, size, mtime, symlink target, extended
attributes and, for a regular file, a hash of its content: the blake3 of the
blake3 of each 128 KiB piece (``UNIT``) in turn. That is the same for any store
holding the same bytes, whatever its block size, and in a store of 128 KiB blocks
it is read from the extents without decompressing anything: a piece held whole by
one block or one pack piece is named by the hash it is stored under (present in
the store: checked; sound: the business of ``verify``, and of a receive, which
checks every block that arrives). Other pieces (patched, partly past the end,
holes) are read and hashed.
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Callable
from pathlib import Path

import blake3
import lmdb

from ..errors import CdpfsError
from ..store import blocks, codec, journal
from ..store.lmdb import Store, is_store
from ..store.schema import ROOT_INO, Extent
from ..store.view import View


def tree_hash(store: Store, txn: lmdb.Transaction, seq: int, *, sockets: bool = True,
              check: Callable[[], None] | None = None) -> tuple[str, int]:
    """(hex hash, number of entries) of the volume as of ``seq``; without
    ``sockets``, sockets are left out (what a tar can hold: a tar backup's check).
    ``check`` is called before each entry: what it raises stops the walk (a worker
    thread's ``trio.from_thread.check_cancelled``)."""
    view = View(store, txn, seq)
    h = blake3.blake3()
    count = 0
    todo: list[tuple[int, bytes]] = [(ROOT_INO, b"")]
    while todo:
        if check is not None:
            check()
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
            h.update(_content(store, txn, view, ino, node.size))
        if node.is_dir:
            children = list(view.listdir(ino))
            todo.extend((child, path + b"/" + name) for name, child in reversed(children))
    return h.hexdigest(), count


UNIT = 128 * 1024  # the pieces a file's content is hashed in


def _content(store: Store, txn: lmdb.Transaction, view: View, ino: int, size: int) -> bytes:
    """The hash of file ``ino``'s ``size`` bytes: blake3 of its pieces' blake3."""
    h = blake3.blake3()
    whole = store.block_size == UNIT  # a block is a piece: its extents may name it
    for off in range(0, size, UNIT):
        length = min(UNIT, size - off)
        if whole:
            chain = view.chain(ino, off // UNIT)
            named = _named(store, txn, chain, length)
            if named is not None:
                h.update(named)
                continue
        h.update(codec.digest(view.read(ino, off, length, size)))
    return h.digest()


def _named(store: Store, txn: lmdb.Transaction, chain: list[Extent],
           length: int) -> bytes | None:
    """The hash of a block's first ``length`` bytes when ``chain`` holds them whole
    under one name (a block, a pack piece from the start, or a hole), else None."""
    if not chain:
        return _zeros(length)
    if len(chain) != 1:
        return None
    ext = chain[0]
    if ext.kind == "H":
        return _zeros(length)
    if ext.kind == "F" and ext.length == length and blocks.holds(store, txn, ext.digest):
        return ext.digest
    if ext.kind == "P" and ext.off == 0 and ext.length == length and \
            blocks.holds_pack(store, txn, ext.pack):
        return ext.digest
    return None


@functools.lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return codec.digest(bytes(length))


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
