"""Mutating operations on the live volume: each one is one journal record.

A ``Mutator`` applies operations to the changes not yet committed
(``store.pending``), reading through the current request's LMDB read
transaction with those changes laid over it. Every operation checks its
preconditions, makes versioned puts at a fresh sequence number and appends the
journal record that lists them; one that fails is taken back, so an operation
is applied whole or not at all. The engine commits the changes. Block-map policy lives here too: a
write that covers a block stores the whole block (FULL); a small write is
stored as a PATCH over the older versions, its bytes appended to the open
*pack* (small writes side by side, so a 4 KiB write costs 4 KiB, not a page
or a block), until the chain of patches grows past a bound and the block is
rewritten whole (compaction). Call ``seal()`` before committing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from ..errors import (
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)
from ..store import blocks, codec, epochs, journal, pending
from ..store.journal import Record
from ..store.lmdb import DEFAULT_BLOCK_SIZE, Store
from ..store.pending import Pending
from ..store.schema import (
    HOLE,
    MAX_SEQ,
    NAME_MAX,
    ROOT_INO,
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_XATTR,
    U64,
    Inode,
    dirent_prefix,
    extent_prefix,
    full,
    inode_prefix,
    patch,
    xattr_prefix,
    zero,
)
from ..store.view import View
from ..system import coarse_time_ns

T = TypeVar("T")
XATTR_CREATE = 1
XATTR_REPLACE = 2
PACK_EPOCH_SHIFT = 40  # epoch E numbers its packs from E << 40 on (see Mutator: counters)



class Op:
    """The operation being built: its seq, timestamp and the puts made so far."""

    def __init__(self, m: Mutator, seq: int, ts: int) -> None:
        self.m = m
        self.seq = seq
        self.ts = ts
        self.ino = 0
        self.changes: dict[tuple[int, bytes], bytes] = {}
        self._layer = m.pending.current

    def put(self, table: int, prefix: bytes, value: bytes) -> None:
        self._layer.put(table, prefix, self.seq, value)
        self.changes[(table, prefix)] = value

    def inode(self, ino: int, node: Inode | None) -> None:
        self.put(T_INODE, inode_prefix(ino), node.pack() if node else b"")

    def dirent(self, parent: int, name: bytes, child: int | None) -> None:
        self.put(T_DIRENT, dirent_prefix(parent, name), U64.pack(child) if child else b"")


class Mutator:
    """Applies operations to the live volume's pending changes.

    Attributes:
        store: the open store.
        reader: the LMDB read transaction of the request under way.
        pending: the changes applied and not yet committed.
        last_seq, last_ts: the newest journal record's seq and timestamp.
        stored_bytes: bytes of new blocks written through this mutator.
        max_patches, max_patch_bytes: the bounds of a block's patch chain.
        clock: the wall clock records are stamped with (ns; made non-decreasing).
        gate: called before every operation changes anything; raises to refuse it
            (a fenced primary: ``ha.fence``); None lets everything through.
    """

    def __init__(self, store: Store, reader: Callable[[], lmdb.Transaction], pending: Pending,
                 clock: Callable[[], int] = coarse_time_ns) -> None:
        self.store = store
        self.clock = clock
        self.reader = reader
        self.pending = pending
        self.bs = store.block_size
        self._zeros = bytes(self.bs)
        self.max_patches = 64
        self.max_patch_bytes = 2 * self.bs
        self.stored_bytes = 0
        self.gate: Callable[[], None] | None = None
        self.pack_id: int | None = None
        self.pack_buf = bytearray()
        self._added: list[tuple[dict[Any, Any], Any]] = []  # this op's blocks and packs
        txn = reader()
        self.last_seq, self.last_ts = journal.last(store, txn)
        # The counters, and never below what the tables hold: a replica receives
        # inodes and packs without the primary's counters, so a replica made the
        # primary (a failover) must not hand out a number that is taken.
        raw = store.meta(txn, b"next_ino")
        self.next_ino = max(int(raw) if raw else ROOT_INO + 1, store.after_last(txn, "inodes"))
        # Pack ids are not content hashes: a primary that lost its role may have
        # written packs after the fork that its store keeps when it rejoins as a
        # replica (a failback takes out records, not packs), and a replica would take
        # an offered pack of the same id as one it has. So each epoch numbers its
        # packs from a range of its own.
        raw = store.meta(txn, b"next_pack")
        self.next_pack = max(int(raw) if raw else 1, store.after_last(txn, "packs"),
                             epochs.current(store, txn) << PACK_EPOCH_SHIFT)

    @property
    def view(self) -> View:
        return View(self.store, self.reader(), MAX_SEQ, self.pending)

    def put_plain(self, table: str, key: bytes, value: bytes | None) -> None:
        """Put (None: delete) ``key`` of an unversioned table with the next commit."""
        self.pending.current.plain[(table, key)] = value

    def run(self, name: str, args: dict[str, Any], body: Callable[[Op], T]) -> T:
        """Run ``body`` as one journaled operation, atomically."""
        if self.gate is not None:
            self.gate()
        layer = self.pending.current
        mark = layer.mark()
        self._added = []  # blocks and packs it adds: taken back if it fails
        op = Op(self, self.last_seq + 1, max(self.clock(), self.last_ts))
        next_ino, next_pack = self.next_ino, self.next_pack
        pack = (self.pack_id, self.pack_buf, len(self.pack_buf))
        try:
            result = body(op)
        except BaseException:
            layer.undo(mark)
            for table, key in self._added:
                table.pop(key, None)
            self.next_ino, self.next_pack = next_ino, next_pack
            self.pack_id, self.pack_buf = pack[0], pack[1]
            del self.pack_buf[pack[2] :]
            self.store.open_pack = (self.pack_id or 0, self.pack_buf)
            raise
        changes = [(t, p, v) for (t, p), v in op.changes.items()]
        layer.records.append(Record(op.seq, op.ts, name, op.ino, args, changes))
        if self.next_ino != next_ino:
            layer.plain[("meta", b"next_ino")] = str(self.next_ino).encode()
        if self.next_pack != next_pack:
            layer.plain[("meta", b"next_pack")] = str(self.next_pack).encode()
        self.last_seq, self.last_ts = op.seq, op.ts
        return result

    # --- helpers --------------------------------------------------------------

    def _get(self, ino: int) -> Inode:
        node = self.view.inode(ino)
        if node is None:
            raise NotFound(f"inode {ino} does not exist")
        return node

    def _dir(self, ino: int) -> Inode:
        node = self._get(ino)
        if not node.is_dir:
            raise NotADirectory()
        return node

    def _touch_dir(self, op: Op, ino: int, node: Inode, dlink: int = 0) -> Inode:
        node = node.with_(mtime=op.ts, ctime=op.ts, nlink=node.nlink + dlink)
        op.inode(ino, node)
        return node

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise InvalidArgument(f"invalid file name {name!r}")

    # --- namespace ------------------------------------------------------------

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0, target: bytes = b"") -> tuple[int, Inode]:
        """Create a file, directory, symlink, FIFO or device node."""
        self._check_name(name)

        def body(op: Op) -> tuple[int, Inode]:
            pnode = self._dir(parent)
            if self.view.lookup(parent, name) is not None:
                raise Exists()
            nonlocal gid, mode
            if pnode.mode & stat.S_ISGID:
                gid = pnode.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = op.ino = self.next_ino
            self.next_ino += 1
            is_dir = stat.S_ISDIR(mode)
            node = Inode(mode, uid, gid, 2 if is_dir else 1, len(target), op.ts, op.ts, op.ts,
                         rdev, target=target)
            op.inode(ino, node)
            op.dirent(parent, name, ino)
            self._touch_dir(op, parent, pnode, 1 if is_dir else 0)
            return ino, node

        kind = stat.S_IFMT(mode)
        return self.run("mknod", {"parent": parent, "name": name, "mode": mode, "kind": kind}, body)

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._check_name(name)

        def body(op: Op) -> Inode:
            op.ino = ino
            node = self._get(ino)
            if node.is_dir:
                raise NotPermitted("hard links to directories are not allowed")
            pnode = self._dir(parent)
            if self.view.lookup(parent, name) is not None:
                raise Exists()
            node = node.with_(nlink=node.nlink + 1, ctime=op.ts)
            op.inode(ino, node)
            op.dirent(parent, name, ino)
            self._touch_dir(op, parent, pnode)
            return node

        return self.run("link", {"parent": parent, "name": name}, body)

    def remove(self, parent: int, name: bytes, *, is_dir: bool) -> tuple[int, Inode]:
        """unlink (is_dir False) or rmdir: drop the name, return (ino, its new inode)."""

        if len(name) > NAME_MAX:
            raise NameTooLong()

        def body(op: Op) -> tuple[int, Inode]:
            pnode = self._dir(parent)
            ino = self.view.lookup(parent, name)
            if ino is None:
                raise NotFound()
            op.ino = ino
            node = self._get(ino)
            if is_dir and not node.is_dir:
                raise NotADirectory()
            if not is_dir and node.is_dir:
                raise IsADirectory()
            if is_dir and not self.view.is_empty_dir(ino):
                raise NotEmpty()
            node = node.with_(nlink=0 if is_dir else node.nlink - 1, ctime=op.ts)
            op.inode(ino, node)
            op.dirent(parent, name, None)
            self._touch_dir(op, parent, pnode, -1 if is_dir else 0)
            return ino, node

        return self.run("rmdir" if is_dir else "unlink", {"parent": parent, "name": name}, body)

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0,
               ) -> tuple[int, Inode] | None:
        """Rename atomically; return (ino, inode) of a replaced target, if any."""
        self._check_name(n2)
        if len(n1) > NAME_MAX:
            raise NameTooLong()
        noreplace, exchange = flags & 1, flags & 2

        def body(op: Op) -> tuple[int, Inode] | None:
            src = self.view.lookup(p1, n1)
            if src is None:
                raise NotFound()
            op.ino = src
            dst = self.view.lookup(p2, n2)
            snode = self._get(src)
            pn1 = self._dir(p1)
            if dst is not None and noreplace:
                raise Exists()
            if exchange:
                if dst is None:
                    raise NotFound()
                dnode = self._get(dst)
                op.dirent(p1, n1, dst)
                op.dirent(p2, n2, src)
                op.inode(src, snode.with_(ctime=op.ts))
                op.inode(dst, dnode.with_(ctime=op.ts))
                if p1 != p2 and snode.is_dir != dnode.is_dir:
                    d = 1 if dnode.is_dir else -1
                    self._touch_dir(op, p1, pn1, d)
                    self._touch_dir(op, p2, self._dir(p2), -d)
                else:
                    self._touch_dir(op, p1, pn1)
                    if p2 != p1:
                        self._touch_dir(op, p2, self._dir(p2))
                return None
            if dst == src:
                return None
            replaced = None
            dlink1 = -1 if snode.is_dir else 0
            dlink2 = 1 if snode.is_dir else 0
            if dst is not None:
                dnode = self._get(dst)
                if snode.is_dir and not dnode.is_dir:
                    raise NotADirectory()
                if not snode.is_dir and dnode.is_dir:
                    raise IsADirectory()
                if dnode.is_dir:
                    if not self.view.is_empty_dir(dst):
                        raise NotEmpty()
                    dnode = dnode.with_(nlink=0, ctime=op.ts)
                    dlink2 -= 1
                else:
                    dnode = dnode.with_(nlink=dnode.nlink - 1, ctime=op.ts)
                op.inode(dst, dnode)
                replaced = (dst, dnode)
            op.dirent(p1, n1, None)
            op.dirent(p2, n2, src)
            op.inode(src, snode.with_(ctime=op.ts))
            if p1 == p2:
                self._touch_dir(op, p1, pn1, dlink1 + dlink2)
            else:
                self._touch_dir(op, p1, pn1, dlink1)
                self._touch_dir(op, p2, self._dir(p2), dlink2)
            return replaced

        args = {"parent": p1, "name": n1, "new_parent": p2, "new_name": n2, "flags": flags}
        return self.run("rename", args, body)

    def free(self, ino: int) -> None:
        """Forget an inode whose last name and last user are gone (history keeps it)."""

        def body(op: Op) -> None:
            op.ino = ino
            op.inode(ino, None)
            self.put_plain("orphans", U64.pack(ino), None)

        self.run("free", {}, body)

    # --- attributes -------------------------------------------------------------

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime: int | None = None,
                mtime: int | None = None, ctime: int | None = None) -> Inode:
        args = {k: v for k, v in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size),
                                  ("atime", atime), ("mtime", mtime)) if v is not None}

        def body(op: Op) -> Inode:
            op.ino = ino
            node = self._get(ino)
            new: dict[str, int] = {"ctime": op.ts if ctime is None else ctime}
            if mode is not None:
                new["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            if uid is not None:
                new["uid"] = uid
            if gid is not None:
                new["gid"] = gid
            if atime is not None:
                new["atime"] = atime
            if mtime is not None:
                new["mtime"] = mtime
            if size is not None:
                if node.is_dir:
                    raise IsADirectory()
                if not node.is_reg:
                    raise InvalidArgument()
                new["blocks"] = node.blocks + self._truncate(op, ino, node.size, size)
                new["size"] = size
                if mtime is None:
                    new["mtime"] = op.ts
            node = node.with_(**new)
            op.inode(ino, node)
            return node

        return self.run("truncate" if size is not None and len(args) == 1 else "setattr",
                        args, body)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        def body(op: Op) -> None:
            op.ino = ino
            node = self._get(ino)
            old = self.view.xattr(ino, name)
            if flags & XATTR_CREATE and old is not None:
                raise Exists()
            if flags & XATTR_REPLACE and old is None:
                raise NoAttribute()
            op.put(T_XATTR, xattr_prefix(ino, name), b"\x01" + value)
            op.inode(ino, node.with_(ctime=op.ts))

        if not name or b"\0" in name or len(name) > 255:
            raise InvalidArgument("invalid extended attribute name")
        self.run("setxattr", {"name": name, "len": len(value)}, body)

    def removexattr(self, ino: int, name: bytes) -> None:
        def body(op: Op) -> None:
            op.ino = ino
            node = self._get(ino)
            if self.view.xattr(ino, name) is None:
                raise NoAttribute()
            op.put(T_XATTR, xattr_prefix(ino, name), b"")
            op.inode(ino, node.with_(ctime=op.ts))

        self.run("removexattr", {"name": name}, body)

    # --- data -----------------------------------------------------------------

    def write(self, ino: int, off: int, data: bytes,
              prepared: dict[int, tuple[bytes, bytes]] | None = None,
              touch: bool = True) -> Inode:
        """Write ``data`` at ``off``; returns the inode with its new size.

        ``prepared`` holds blocks hashed and encoded ahead (codec.prepare).
        ``touch=False`` leaves mtime alone, for a front end whose kernel keeps
        mtime itself and sends it as a setattr (FUSE's writeback cache).
        """
        ready = prepared or {}

        def body(op: Op) -> Inode:
            op.ino = ino
            node = self._get(ino)
            if not node.is_reg:
                raise IsADirectory() if node.is_dir else InvalidArgument()
            mv = memoryview(data)
            pos = off
            blocks = node.blocks
            while mv:
                index, boff = divmod(pos, self.bs)
                n = min(self.bs - boff, len(mv))
                blocks += self._write_piece(op, ino, index, boff, mv[:n], node.size,
                                            ready.get(pos))
                mv = mv[n:]
                pos += n
            node = node.with_(size=max(node.size, off + len(data)), ctime=op.ts,
                              mtime=op.ts if touch else node.mtime, blocks=blocks)
            op.inode(ino, node)
            return node

        return self.run("write", {"off": off, "len": len(data)}, body)

    def _append_piece(self, piece: bytes | memoryview) -> tuple[int, int]:
        """Add a small write to the open pack; return (pack, offset in pack)."""
        if self.pack_id is not None and len(self.pack_buf) + len(piece) > self.bs:
            self.seal()
        if self.pack_id is None:
            self.pack_id, self.pack_buf = self.next_pack, bytearray()
            self.next_pack += 1
            self.store.open_pack = (self.pack_id, self.pack_buf)
        off = len(self.pack_buf)
        self.pack_buf += piece
        return self.pack_id, off

    def seal(self) -> None:
        """End the open pack: it takes no more writes (it is hashed and compressed
        when committed)."""
        if self.pack_id is not None:
            packs = self.pending.current.packs
            packs[self.pack_id] = bytes(self.pack_buf)
            self._added.append((packs, self.pack_id))
            self.stored_bytes += len(self.pack_buf)
            self.pack_id = None
            self.pack_buf = bytearray()
            self.store.open_pack = (0, self.pack_buf)

    def _store(self, data: bytes | memoryview,
               prepared: tuple[bytes, bytes] | None = None) -> bytes:
        """Keep a block once under its hash (in the current layer if it is new)."""
        key = prepared[0] if prepared else codec.digest(data)
        layer = self.pending.current
        if key in layer.blocks:
            return key
        # While a prune step is on its way to LMDB it may free a block it saw no
        # reference to: a block shared now is then kept again with this layer.
        if not self.pending.pruning and (self.pending.block(key) is not None
                                 or blocks.has(self.store, self.reader(), key)):
            return key
        stored = prepared[1] if prepared else codec.encode(data)
        layer.blocks[key] = stored
        self._added.append((layer.blocks, key))
        layer.nbytes += len(stored)
        self.stored_bytes += len(stored)
        return key

    def _write_piece(self, op: Op, ino: int, index: int, boff: int, piece: memoryview,
                     size: int, prepared: tuple[bytes, bytes] | None = None) -> int:
        """Write within one block; return the change in the inode's data blocks."""
        prefix = extent_prefix(ino, index)
        n = len(piece)
        existing = min(self.bs, max(0, size - index * self.bs))
        if boff == 0 and n >= existing:
            # A block past the end is a hole (truncate leaves none with data).
            had = existing > 0 and self.view.allocated(ino, index)
            if piece == self._zeros[:n]:
                op.put(T_EXTENT, prefix, HOLE)
                return -had
            op.put(T_EXTENT, prefix, full(self._store(piece, prepared), n))
            return 1 - had
        had, patches, patch_bytes = self.view.patches(ino, index)
        if patches + 1 > self.max_patches or patch_bytes + n > self.max_patch_bytes:
            length = max(existing, boff + n)
            buf = bytearray(self.view.block_range(ino, index, 0, length))
            buf[boff : boff + n] = piece
            op.put(T_EXTENT, prefix, full(self._store(buf), length))
        elif piece == self._zeros[:n]:
            if had and boff < existing:  # zeros over data; past EOF they are implied
                op.put(T_EXTENT, prefix, zero(boff, n))
            return 0
        else:
            pack, pack_off = self._append_piece(piece)
            op.put(T_EXTENT, prefix, patch(boff, codec.digest(piece), n, pack, pack_off))
        return 1 - had

    def _truncate(self, op: Op, ino: int, old: int, new: int) -> int:
        """Make every byte past ``new`` read as zeros should the file grow again;
        return the change in the inode's data blocks."""
        if new >= old:
            return 0
        freed = 0
        index, boff = divmod(new, self.bs)
        if boff:
            existing = min(self.bs, old - index * self.bs)
            if existing > boff:
                self._write_piece(op, ino, index, boff, memoryview(self._zeros[: existing - boff]),
                                  old)
            index += 1
        for j in list(self.view.block_indices(ino, index)):
            if self.view.allocated(ino, j):
                op.put(T_EXTENT, extent_prefix(ino, j), HOLE)
                freed += 1
        return -freed


def init_volume(path: str | os.PathLike[str], block_size: int = DEFAULT_BLOCK_SIZE,
                clock: Callable[[], int] = coarse_time_ns) -> Store:
    """Create a store holding an empty volume: its first record, stamped by
    ``clock``, makes the root."""
    store = Store.create(path, block_size=block_size)

    def body(op: Op) -> None:
        op.ino = ROOT_INO
        op.inode(ROOT_INO, Inode(stat.S_IFDIR | 0o755, 0, 0, 2, 0, op.ts, op.ts, op.ts))

    try:
        changes = Pending()
        with store.txn(write=True) as txn:
            m = Mutator(store, lambda: txn, changes, clock=clock)
            m.run("init", {}, body)
            m.seal()
            pending.write(store, txn, changes.current)
    except BaseException:
        store.close()
        for name in ("data.mdb", "lock.mdb"):  # leave no half-made store behind
            (store.path / name).unlink(missing_ok=True)
        raise
    return store
