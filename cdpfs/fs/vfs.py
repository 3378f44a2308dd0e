"""Filesystem semantics over the live volume, for every front end.

``FileSystem`` turns kernel-style requests (lookup, create, open, write,
fsync, ...) into store operations: it keeps lookup counts and open handles,
frees an unlinked inode only when no name, handle or kernel reference is left,
and asks the engine for space and durability. Its methods run through the
engine, on its owner thread (see engine.py), and raise cdpfs errors; front ends
map them to errno or NTSTATUS and do nothing else.
"""

from __future__ import annotations

import logging
import stat
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import system
from ..errors import (
    BadHandle,
    Corrupt,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotFound,
    Unsupported,
)
from ..store import codec
from ..store.lmdb import Store
from ..store.schema import NAME_MAX, U64, Inode
from ..store.view import ReadPlan, View
from .engine import Engine
from .mutate import Mutator

log = logging.getLogger(__name__)

Prepared = Future[dict[int, tuple[bytes, bytes]]]


@dataclass(slots=True)
class Handle:
    """An open file or directory: its inode, open flags and (dirs) its listing."""

    ino: int
    flags: int
    names: list[tuple[bytes, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Entry:
    """A name resolved to an inode and its attributes."""

    ino: int
    attr: Inode
    ttl: float | None = None  # how long the kernel may cache the name (None: the default)


class FileSystem:
    """The live volume as a filesystem. Call its methods through ``engine``.

    Attributes:
        store: the open store.
        engine: the engine all methods run through (on its owner thread).
        mutator: applies journaled operations (valid inside the writer txn).
    """

    def __init__(self, store: Store, engine: Engine, *, kernel_mtime: bool = False,
                 clock: Callable[[], int] = system.coarse_time_ns,
                 gate: Callable[[], None] | None = None) -> None:
        self.store = store
        self.gate = gate  # asked before every change (a fence: ha.fence)
        self.engine = engine
        self.clock = clock
        # With FUSE's writeback cache the kernel stamps mtime on write(2) and sends
        # it in a setattr; stamping writes again here would make the stored mtime
        # differ from what the kernel showed (a WRITE arrives a clock tick later).
        self.kernel_mtime = kernel_mtime
        self.mutator: Mutator | None = None
        self._lookups: dict[int, int] = defaultdict(int)
        self._opens: dict[int, int] = defaultdict(int)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._codec = ThreadPoolExecutor(2, thread_name_prefix="cdpfs-codec")
        # Names of the extended attributes that exist anywhere in the volume (any
        # version). The kernel asks for security.capability before every write;
        # a name in no inode is answered without a look in the store.
        self._xattr_names: set[bytes] = set()
        engine.before_commit(self._seal)

    def _seal(self) -> None:
        if self.mutator is not None:
            self.mutator.seal()

    @property
    def m(self) -> Mutator:
        """The mutator (made in the first call: it reads where the journal ends)."""
        if self.mutator is None:
            self.mutator = Mutator(self.store, self.engine.reader, self.engine.pending,
                                   self.clock)
            self.mutator.gate = self._gate
            self._xattr_names = set(self.view.xattr_names())
        return self.mutator

    def _gate(self) -> None:
        if self.gate is not None:
            self.gate()

    @property
    def view(self) -> View:
        return self.m.view

    def _changed(self, nbytes: int = 0) -> None:
        self.engine.note_dirty(nbytes + 256)

    # --- startup -----------------------------------------------------------------

    def recover(self) -> int:
        """Free inodes a crash left unlinked but allocated; return how many."""
        inos = self.store.orphans(self.engine.reader())
        freed = 0
        for ino in inos:
            node = self.view.inode(ino)
            if node is not None and node.nlink == 0:
                self.m.free(ino)
                freed += 1
            else:
                self.m.put_plain("orphans", U64.pack(ino), None)
        if freed:
            self._changed()
            log.info("freed %d inodes left unlinked by an earlier crash", freed)
        return freed

    # --- names ------------------------------------------------------------------

    def _attr(self, ino: int) -> Inode:
        node = self.view.inode(ino)
        if node is None:
            raise NotFound()
        return node

    def getattr(self, ino: int) -> Inode:
        return self._attr(ino)

    def lookup(self, parent: int, name: bytes) -> Entry:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        ino = self.view.lookup(parent, name)
        if ino is None:
            raise NotFound()
        entry = Entry(ino, self._attr(ino))
        self._lookups[ino] += 1
        return entry

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._maybe_free(ino)

    def _maybe_free(self, ino: int) -> None:
        if self._lookups.get(ino) or self._opens.get(ino):
            return
        node = self.view.inode(ino)
        if node is not None and node.nlink == 0:
            self.m.free(ino)
            self._changed()

    def _unlinked(self, ino: int, node: Inode) -> None:
        if node.nlink > 0:
            return
        if self._lookups.get(ino) or self._opens.get(ino):
            self.m.put_plain("orphans", U64.pack(ino), b"")
        else:
            self.m.free(ino)

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              target: bytes = b"") -> Entry:
        self.engine.need_space(4096)
        ino, node = self.m.mknod(parent, name, mode, uid, gid, rdev, target)
        self._lookups[ino] += 1
        self._changed()
        return Entry(ino, node)

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
               gid: int) -> tuple[int, Entry]:
        entry = self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        return self._open_handle(entry.ino, flags), entry

    def link(self, ino: int, parent: int, name: bytes) -> Entry:
        self.engine.need_space(4096)
        node = self.m.link(ino, parent, name)
        self._lookups[ino] += 1
        self._changed()
        return Entry(ino, node)

    def unlink(self, parent: int, name: bytes) -> None:
        ino, node = self.m.remove(parent, name, is_dir=False)
        self._unlinked(ino, node)
        self._changed()

    def rmdir(self, parent: int, name: bytes) -> None:
        ino, node = self.m.remove(parent, name, is_dir=True)
        self._unlinked(ino, node)
        self._changed()

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        replaced = self.m.rename(p1, n1, p2, n2, flags)
        if replaced:
            self._unlinked(*replaced)
        self._changed()

    def readlink(self, ino: int) -> bytes:
        node = self._attr(ino)
        if not node.is_lnk:
            raise InvalidArgument()
        return node.target

    # --- attributes -------------------------------------------------------------

    def setattr(self, ino: int, **fields: int | None) -> Inode:
        self.engine.need_space(4096)
        node = self.m.setattr(ino, **fields)
        self._changed()
        return node

    def xattr_absent(self, name: bytes) -> bool:
        """True when no inode has xattr ``name``; safe to call from any thread."""
        return self.mutator is not None and name not in self._xattr_names

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._attr(ino)
        value = self.view.xattr(ino, name)
        if value is None:
            raise NoAttribute()
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        self._attr(ino)
        return self.view.xattrs(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if name.startswith(b"system.posix_acl_"):  # stored but not enforced would mislead
            raise Unsupported("POSIX ACLs are not supported")
        self.engine.need_space(len(value) + 4096)
        self.m.setxattr(ino, name, value, flags)
        self._xattr_names.add(name)
        self._changed(len(value))

    def removexattr(self, ino: int, name: bytes) -> None:
        self.m.removexattr(ino, name)
        self._changed()

    # --- files ------------------------------------------------------------------

    def _open_handle(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(ino, flags)
        self._opens[ino] += 1
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadHandle() from None

    def open(self, ino: int, flags: int) -> int:
        node = self._attr(ino)
        if node.is_dir and flags & system.O_ACCMODE != system.O_RDONLY:
            raise IsADirectory()
        if flags & system.O_TRUNC and node.is_reg and node.size:
            self.setattr(ino, size=0)
        return self._open_handle(ino, flags)

    def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return self.read_plan(fh, off, size).run(self.engine.reader())
        except Corrupt as exc:
            self.read_failed(fh, off, exc)
            raise

    def read_plan(self, fh: int, off: int, size: int) -> ReadPlan:
        """What a read needs (``ReadPlan.run`` fetches it, on any thread)."""
        h = self._handle(fh)
        node = self._attr(h.ino)
        return self.view.plan(h.ino, off, size, node.size)

    def read_failed(self, fh: int, off: int, exc: Corrupt) -> None:
        """Log a read that found damage, naming the file."""
        ino = self._handle(fh).ino
        log.error("I/O error reading %s (inode %d) at offset %d: %s", self.path_of(ino), ino,
                  off, exc)

    def path_of(self, ino: int) -> str:
        """A path of ``ino`` for messages (a search: use only on rare paths)."""
        todo = [(1, b"")]
        while todo:
            parent, path = todo.pop()
            for name, child in self.view.listdir(parent):
                if child == ino:
                    return (path + b"/" + name).decode(errors="replace")
                node = self.view.inode(child)
                if node is not None and node.is_dir:
                    todo.append((child, path + b"/" + name))
        return f"<unlinked inode {ino}>"

    def prepare_write(self, off: int, data: bytes) -> Prepared | None:
        """Start hashing and compressing the whole blocks of a write on the codec
        threads (safe to call from any thread); pass the result to ``write`` once it
        is done (``engine.wait_future``). Both release the GIL."""
        if len(data) < self.store.block_size // 2:
            return None
        return self._codec.submit(codec.prepare, data, off, self.store.block_size)

    def write(self, fh: int, off: int, data: bytes, prepared: Prepared | None = None) -> int:
        h = self._handle(fh)
        self.engine.need_space(len(data))
        before = self.m.stored_bytes
        self.m.write(h.ino, off, data, prepared.result() if prepared else None,
                     touch=not self.kernel_mtime)
        self._changed(self.m.stored_bytes - before)
        return len(data)

    def fsync(self, fh: int) -> int:
        """Run with ``durable=True``: everything before is committed when it returns.
        Returns the newest seq (committed by then: what sync replicas must have)."""
        return self.m.last_seq

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        left = self._opens[h.ino] - 1
        if left > 0:
            self._opens[h.ino] = left
        else:
            self._opens.pop(h.ino, None)
            self._maybe_free(h.ino)

    def sync(self) -> int:
        """Run with ``durable=True``: returns (the newest seq) once all prior work is
        committed."""
        return self.m.last_seq

    # --- directories --------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self._attr(ino)
        if not node.is_dir:
            raise NotADirectory()
        fh = self._open_handle(ino, system.O_RDONLY)
        self._handles[fh].names = list(self.view.listdir(ino))
        return fh

    def readdir(self, fh: int, start: int, count: int = 256) -> list[tuple[int, bytes, Entry]]:
        """Entries ``start`` .. ``start+count`` of the listing taken at opendir."""
        h = self._handle(fh)
        out = []
        for i, (name, ino) in enumerate(h.names[start : start + count], start + 1):
            node = self.view.inode(ino)
            if node is not None:
                out.append((i, name, Entry(ino, node)))
        return out

    def listing_len(self, fh: int) -> int:
        """Number of entries in the listing of directory handle ``fh``."""
        return len(self._handle(fh).names)

    def count_lookups(self, inos: list[int]) -> None:
        """The kernel took a reference to each of ``inos`` through readdirplus."""
        for ino in inos:
            self._lookups[ino] += 1

    def releasedir(self, fh: int) -> None:
        self.release(fh)

    def statfs(self) -> system.DiskStats:
        return system.disk_stats(self.store.path)

