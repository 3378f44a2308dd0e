"""The volume with its history: the live tree plus read-only ``@<moment>`` trees.

``TimeFS`` is what front ends talk to. Requests on the live tree go to
``vfs.FileSystem``; at the volume root, a name starting with ``@`` resolves
(history.points.resolve) to a kept point of history, shown as a read-only tree.
Each past point a mount shows gets a *slot*; an inode number seen by the kernel is
``slot << 40 | store inode`` (slot 0 is the live tree, or, in a snapshot mount,
the one point mounted), so the same file at two moments is two kernel inodes.
A slot is held (bookmarks.HOLD) while the kernel knows any of its inodes, so
retention keeps its point.

Every change under a past tree fails with EROFS, and names starting with ``@``
at the live root are reserved: creating one fails with EPERM. Permissions in a
past tree are those of the moment, checked by the kernel, and in addition a
caller must have the same access to the file as it is now, if it still exists:
history never opens what the owner has since closed.

A *following* mount (``follow``: a read-only mount of a store another process
writes, typically a replica receiving) shows as slot 0 the newest state, which
moves: the kernel may cache its names and attributes for FOLLOW_TTL only, a file
opened reads the version of its open (one consistent state), and ``@`` names at
its root show history as in a live mount.

Methods run where the caller's ``view_at`` is valid: in an engine call for a
live mount, in a thread holding a read transaction for a snapshot mount.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from .. import system
from ..errors import (
    AccessDenied,
    BadHandle,
    Corrupt,
    CrossDevice,
    InvalidArgument,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotFound,
    ReadOnly,
    Reserved,
    Stale,
)
from ..history import bookmarks
from ..history.moments import BadMoment
from ..history.points import Points, point_name, resolve
from ..store import journal
from ..store.lmdb import Store
from ..store.schema import MAX_SEQ, NAME_MAX, ROOT_INO, Inode
from ..store.view import ReadPlan, View
from .vfs import Entry, FileSystem, Prepared

log = logging.getLogger(__name__)

SLOT_SHIFT = 40
INO_MASK = (1 << SLOT_SHIFT) - 1
PAST_FH = 1 << 62  # file handle numbers of past trees
MOMENT_TTL = 1.0  # seconds the kernel may cache an @ name (what it names can move)
FOLLOW_TTL = 1.0  # seconds the kernel may cache names and attributes of a following mount


def split(kino: int) -> tuple[int, int]:
    """(slot, store inode) of a kernel inode number."""
    return kino >> SLOT_SHIFT, kino & INO_MASK


def join(slot: int, ino: int) -> int:
    assert ino <= INO_MASK, "inode number beyond the slot layout"
    return slot << SLOT_SHIFT | ino


@dataclass(frozen=True)
class Caller:
    """Who makes a request: ids as the kernel reports them."""

    uid: int
    gid: int
    pid: int = 0

    @cached_property
    def groups(self) -> frozenset[int]:
        return system.process_groups(self.pid)



ROOT = Caller(0, 0)


def permitted(node: Inode, who: Caller, want: int) -> bool:
    """Whether ``who`` has the ``want`` bits (4 read, 2 write, 1 search) on ``node``."""
    if who.uid == 0:
        return True
    if who.uid == node.uid:
        bits = node.mode >> 6
    elif who.gid == node.gid or node.gid in who.groups:
        bits = node.mode >> 3
    else:
        bits = node.mode
    return bits & want == want


@dataclass(slots=True)
class PastHandle:
    """An open file or directory of a past tree."""

    slot: int
    ino: int
    size: int
    names: list[tuple[bytes, int]] = field(default_factory=list)
    seq: int | None = None  # the point read, when not the slot's (a following mount)


def _reserved(name: bytes) -> Reserved:
    return Reserved(f"{name.decode(errors='replace')}: names starting with @ "
                    "at the volume root are reserved for history")


def _readonly() -> ReadOnly:
    return ReadOnly("history is read-only")


class TimeFS:
    """The live volume (optional) and its past states, as one filesystem.

    Attributes:
        store: the open store.
        live: the live filesystem, or None for a snapshot mount.
        base_seq: the point shown as slot 0 when there is no live tree.
        show_history: list @ entries in the root directory.
        follow: slot 0 is the newest state of a store written elsewhere (base_seq
            is then MAX_SEQ).
        settle: called before reading what only committed state holds (the
            journal by time, bookmarks); the live engine's ``settle``.
        clock: the wall clock moments are read against (ns since the epoch).
    """


    def __init__(self, store: Store, view_at: Callable[[int], View], *,
                 live: FileSystem | None = None, base_seq: int | None = None,
                 show_history: bool = True, follow: bool = False,
                 on_slot: Callable[[int, int | None], None] | None = None,
                 settle: Callable[[], None] = lambda: None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if follow:
            base_seq = MAX_SEQ
        assert (live is None) != (base_seq is None)
        self.store = store
        self.live = live
        self.follow = follow
        self.base_seq = base_seq
        self.show_history = show_history
        self._view_at = view_at
        self._on_slot = on_slot
        self._settle = settle
        self.clock = clock
        self._seqs: dict[int, int] = {} if base_seq is None else {0: base_seq}
        self._slots: dict[int, int] = {}  # seq -> slot
        self._refs: dict[int, int] = {}  # slot -> kernel references and open handles
        self._next_slot = itertools.count(1)
        self._next_fh = itertools.count(1)
        self._handles: dict[int, PastHandle] = {}
        self._moments: dict[int, list[tuple[bytes, int]]] = {}  # root fh -> @ entries
        self._listed_slots: dict[int, set[int]] = {}  # root fh -> slots its listing made

    # --- slots -----------------------------------------------------------------------

    def _past(self, kino: int) -> tuple[int, int] | None:
        """(slot, ino) when ``kino`` is in a past tree, None when live."""
        slot, ino = split(kino)
        if slot == 0 and self.live is not None:
            return None
        return slot, ino

    def _view(self, slot: int) -> View:
        seq = self._seqs.get(slot)
        if seq is None:
            raise Stale(f"history slot {slot} is gone")
        return self._view_at(seq)

    def slot_for(self, seq: int) -> int:
        slot = self._slots.get(seq)
        if slot is None:
            slot = next(self._next_slot)
            self._slots[seq], self._seqs[slot], self._refs[slot] = slot, seq, 0
            if self._on_slot:
                self._on_slot(slot, seq)
        return slot

    def _ref(self, slot: int, n: int) -> None:
        if slot == 0:
            return
        left = self._refs.get(slot, 0) + n
        if left > 0 or slot not in self._seqs:
            self._refs[slot] = left
            return
        seq = self._seqs.pop(slot)
        self._slots.pop(seq, None)
        self._refs.pop(slot, None)
        if self._on_slot:
            self._on_slot(slot, None)

    @property
    def held(self) -> dict[int, int]:
        """slot -> seq of every past point shown now."""
        return dict(self._seqs)

    # --- names -----------------------------------------------------------------------

    def _moment(self, name: bytes) -> Entry:
        text = name.decode(errors="replace")
        self._settle()  # moments are found in the committed journal
        try:
            seq = resolve(self.store, self._view_at(MAX_SEQ).txn, text, self.clock()).seq
        except BadMoment as exc:
            log.warning("%s", exc)
            raise
        return self._past_root(seq)

    def _past_root(self, seq: int) -> Entry:
        slot = self.slot_for(seq)
        node = self._view_at(seq).inode(ROOT_INO)
        if node is None:
            raise NotFound(f"the volume has no root at #{seq}")
        return Entry(join(slot, ROOT_INO), node, MOMENT_TTL)

    def _check_now(self, ino: int, who: Caller | None, want: int) -> None:
        """The caller must have ``want`` on the file as it is now, too (if it exists)."""
        if who is None or who.uid == 0:
            return
        now = self._view_at(MAX_SEQ).inode(ino)
        if now is not None and not permitted(now, who, want):
            raise AccessDenied(f"inode {ino}: access denied by its current permissions")

    def lookup(self, parent: int, name: bytes, who: Caller | None = None) -> Entry:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        past = self._past(parent)
        if past is None:
            assert self.live is not None
            if parent == ROOT_INO and name[:1] == b"@":
                entry = self._moment(name)
            else:
                return self.live.lookup(parent, name)
        elif self._at_moving_root(parent, name):
            entry = self._moment(name)
        else:
            slot, ino = past
            view = self._view(slot)
            self._check_now(ino, who, os.X_OK)
            child = view.lookup(ino, name)
            if child is None:
                raise NotFound()
            node = view.inode(child)
            if node is None:
                raise NotFound()
            entry = Entry(join(slot, child), node)
        self._ref(split(entry.ino)[0], 1)
        return entry

    def _at_moving_root(self, parent: int, name: bytes) -> bool:
        """Whether ``name`` is an @ name at the root of the live or followed tree."""
        return parent == ROOT_INO and name[:1] == b"@" and (
            self._past(parent) is None or self.follow)

    def miss_ttl(self, parent: int, name: bytes) -> float | None:
        """How long the kernel may cache that ``name`` is missing (None: the default).
        An @ name can start to exist at any time (a new bookmark, time passing); any
        name of a following mount too."""
        if self._at_moving_root(parent, name):
            return MOMENT_TTL
        return self.attr_ttl(parent)

    def attr_ttl(self, kino: int) -> float | None:
        """How long the kernel may cache the attributes of ``kino`` and the names in
        it (None: the front end's default)."""
        return FOLLOW_TTL if self.follow and split(kino)[0] == 0 else None

    def keep_cache(self, kino: int) -> bool:
        """Whether the kernel may keep the pages of ``kino`` across opens (not when
        the file can change behind its back)."""
        return not (self.follow and split(kino)[0] == 0)

    def forget(self, items: list[tuple[int, int]]) -> None:
        live = []
        for kino, n in items:
            if self._past(kino) is None:
                live.append((kino, n))
            else:
                self._ref(split(kino)[0], -n)
        if live and self.live is not None:
            self.live.forget(live)

    def count_lookups(self, inos: list[int]) -> None:
        live = []
        for kino in inos:
            if self._past(kino) is None:
                live.append(kino)
            else:
                self._ref(split(kino)[0], 1)
        if live and self.live is not None:
            self.live.count_lookups(live)

    def getattr(self, kino: int) -> Inode:
        past = self._past(kino)
        if past is None:
            assert self.live is not None
            return self.live.getattr(kino)
        node = self._view(past[0]).inode(past[1])
        if node is None:
            raise NotFound()
        return node

    def readlink(self, kino: int) -> bytes:
        node = self.getattr(kino)
        if not node.is_lnk:
            raise InvalidArgument()
        return node.target

    # --- changes: live only ---------------------------------------------------------

    def _live_dir(self, parent: int, name: bytes | None = None) -> FileSystem:
        """The live filesystem, if ``name`` may change in ``parent``; else the error."""
        if self._past(parent) is not None or self.live is None:
            raise _readonly()
        if parent == ROOT_INO and name is not None and name[:1] == b"@":
            raise _reserved(name)
        return self.live

    def _live_ino(self, kino: int) -> FileSystem:
        if self._past(kino) is not None or self.live is None:
            raise _readonly()
        return self.live

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              target: bytes = b"") -> Entry:
        return self._live_dir(parent, name).mknod(parent, name, mode, uid, gid, rdev, target)

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
               gid: int) -> tuple[int, Entry]:
        return self._live_dir(parent, name).create(parent, name, mode, flags, uid, gid)

    def link(self, kino: int, parent: int, name: bytes) -> Entry:
        if (self._past(kino) is None) != (self._past(parent) is None):
            raise CrossDevice("cannot link between history and the live tree")
        self._live_ino(kino)
        return self._live_dir(parent, name).link(kino, parent, name)

    def unlink(self, parent: int, name: bytes) -> None:
        if parent == ROOT_INO and name[:1] == b"@" and self.live is not None:
            raise _readonly()
        self._live_dir(parent).unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        if parent == ROOT_INO and name[:1] == b"@" and self.live is not None:
            raise _readonly()
        self._live_dir(parent).rmdir(parent, name)

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        if (self._past(p1) is None) != (self._past(p2) is None):
            raise CrossDevice("cannot move between history and the live tree")
        if p1 == ROOT_INO and n1[:1] == b"@" and self.live is not None:
            raise _readonly()
        live = self._live_dir(p1)
        self._live_dir(p2, n2)
        live.rename(p1, n1, p2, n2, flags)

    def setattr(self, kino: int, **fields: int | None) -> Inode:
        return self._live_ino(kino).setattr(kino, **fields)

    def setxattr(self, kino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._live_ino(kino).setxattr(kino, name, value, flags)

    def removexattr(self, kino: int, name: bytes) -> None:
        self._live_ino(kino).removexattr(kino, name)

    # --- extended attributes ---------------------------------------------------------

    def xattr_absent(self, name: bytes) -> bool:
        return self.live is not None and self.live.xattr_absent(name)

    def getxattr(self, kino: int, name: bytes) -> bytes:
        past = self._past(kino)
        if past is None:
            assert self.live is not None
            return self.live.getxattr(kino, name)
        self.getattr(kino)
        value = self._view(past[0]).xattr(past[1], name)
        if value is None:
            raise NoAttribute()
        return value

    def listxattr(self, kino: int) -> list[bytes]:
        past = self._past(kino)
        if past is None:
            assert self.live is not None
            return self.live.listxattr(kino)
        self.getattr(kino)
        return self._view(past[0]).xattrs(past[1])

    # --- files ------------------------------------------------------------------------

    def _new_handle(self, h: PastHandle) -> int:
        fh = PAST_FH | next(self._next_fh)
        self._handles[fh] = h
        self._ref(h.slot, 1)
        return fh

    def _handle(self, fh: int) -> PastHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadHandle() from None

    def open(self, kino: int, flags: int, who: Caller | None = None) -> int:
        past = self._past(kino)
        if past is None:
            assert self.live is not None
            return self.live.open(kino, flags)
        if flags & system.O_ACCMODE != system.O_RDONLY or flags & system.O_TRUNC:
            raise _readonly()
        node = self.getattr(kino)
        self._check_now(past[1], who, os.R_OK)
        seq = None
        if self.follow and past[0] == 0:  # read the file as it is now, while open
            view = self._view(0)
            seq = journal.last(self.store, view.txn)[0]
            node = view.inode(past[1]) or node
        return self._new_handle(PastHandle(past[0], past[1], node.size, seq=seq))

    def read(self, fh: int, off: int, size: int) -> bytes:
        plan = self.read_plan(fh, off, size)
        try:
            return plan.run(self._view_at(MAX_SEQ).txn)
        except Corrupt as exc:
            self.read_failed(fh, off, exc)
            raise

    def read_plan(self, fh: int, off: int, size: int) -> ReadPlan:
        """What a read needs; ``ReadPlan.run`` fetches it, checked, on any thread."""
        if not fh & PAST_FH:
            assert self.live is not None
            return self.live.read_plan(fh, off, size)
        h = self._handle(fh)
        view = self._view(h.slot) if h.seq is None else self._view_at(h.seq)
        return view.plan(h.ino, off, size, h.size)

    def read_failed(self, fh: int, off: int, exc: Corrupt) -> None:
        """Log a read that found damage."""
        if not fh & PAST_FH:
            assert self.live is not None
            self.live.read_failed(fh, off, exc)
            return
        h = self._handle(fh)
        log.error("I/O error reading inode %d at #%d, offset %d: %s", h.ino,
                  self._seqs.get(h.slot, 0), off, exc)

    def release(self, fh: int) -> None:
        if not fh & PAST_FH:
            if self.live is not None:
                self.live.release(fh)
            return
        h = self._handles.pop(fh, None)
        if h is not None:
            self._ref(h.slot, -1)

    def prepare_write(self, off: int, data: bytes) -> Prepared | None:
        return self.live.prepare_write(off, data) if self.live is not None else None

    def write(self, fh: int, off: int, data: bytes, prepared: Prepared | None = None) -> int:
        return self._live_fh(fh).write(fh, off, data, prepared)

    def _live_fh(self, fh: int) -> FileSystem:
        if fh & PAST_FH or self.live is None:
            raise _readonly()
        return self.live

    def fsync(self, fh: int) -> int:
        if self.live is None or fh & PAST_FH:
            return 0
        return self.live.fsync(fh)

    def sync(self) -> int:
        """Run with ``durable=True`` (live mounts): everything before is committed."""
        return self.live.sync() if self.live is not None else 0

    def statfs(self) -> system.DiskStats:
        return system.disk_stats(self.store.path)


    # --- directories ------------------------------------------------------------------

    def opendir(self, kino: int, who: Caller | None = None) -> int:
        past = self._past(kino)
        if past is None:
            assert self.live is not None
            if kino == ROOT_INO and self.show_history:
                self._settle()  # before anything changed: it may ask for a commit first
            fh = self.live.opendir(kino)
            if kino == ROOT_INO and self.show_history:
                self._moments[fh] = self._listed_moments()
            return fh
        slot, ino = past
        node = self.getattr(kino)
        if not node.is_dir:
            raise NotADirectory()
        self._check_now(ino, who, os.R_OK)
        names = [(name, join(slot, child)) for name, child in self._view(slot).listdir(ino)]
        fh = self._new_handle(PastHandle(slot, ino, 0, names))
        if self.follow and kino == ROOT_INO and self.show_history:
            self._moments[fh] = self._listed_moments()
        return fh

    def _listed_moments(self) -> list[tuple[bytes, int]]:
        """The @ entries of the root: bookmarks, then the latest change of recent
        hours and days."""
        points = Points(self.store, self._view_at(MAX_SEQ).txn, self.clock())
        out: dict[bytes, int] = {}
        for mark in bookmarks.bookmarks(points.store, points.txn):
            out[b"@" + mark.name.encode()] = mark.seq
        for seq, ts in points.recent():
            out.setdefault(b"@" + point_name(ts).encode(), seq)
        return list(out.items())

    def readdir(self, fh: int, start: int, count: int = 256) -> list[tuple[int, bytes, Entry]]:
        moments = self._moments.get(fh)
        if fh & PAST_FH:
            h = self._handle(fh)
            view = self._view(h.slot)
            n = len(h.names)
            out = []
            for i, (name, kino) in enumerate(h.names[start : start + count], start + 1):
                node = view.inode(split(kino)[1])
                if node is not None:
                    out.append((i, name, Entry(kino, node)))
        else:
            assert self.live is not None
            n = self.live.listing_len(fh) if moments else 0
            out = self.live.readdir(fh, start, count)
        if moments and len(out) < count:
            first = max(start, n) - n
            listed = self._listed_slots.setdefault(fh, set())
            for i, (name, seq) in enumerate(moments[first : first + count - len(out)],
                                            n + first + 1):
                entry = self._past_root(seq)
                listed.add(split(entry.ino)[0])
                out.append((i, name, entry))
        return out

    def releasedir(self, fh: int) -> None:
        self._moments.pop(fh, None)
        # A point the listing showed but the kernel took no reference to (its buffer
        # filled first, say) is held no longer: it holds only while the kernel knows it.
        for slot in self._listed_slots.pop(fh, ()):
            if slot in self._seqs and not self._refs.get(slot):
                self._ref(slot, 0)

        self.release(fh)
