"""The live volume's writer: requests on one thread, commits in another.

Operations run on the owner thread (the trio thread of a mount) one at a time,
each inside a short LMDB read transaction with the changes not yet committed
laid over it (``store.pending``), so a lookup, a read or a create is answered
without a hand-off to another thread. Changes are acknowledged as soon as they
are applied; a commit freezes them and writes them to LMDB in one synced
transaction on a worker thread while new operations go on into the next layer
(group commit): when a caller asks for durability (fsync), when the pending
changes reach ``max_dirty`` bytes, or ``interval`` seconds after the first
one. No transaction crosses an ``await``: a read transaction lives for one
synchronous call, the write transaction for one commit in its thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import lmdb
import trio

from ..counters import Counters
from ..errors import CdpfsError, NoSpace
from ..store import pending
from ..store.lmdb import Store
from ..store.pending import Job, Layer, Pending
from ..store.schema import MAX_SEQ
from ..store.view import View

log = logging.getLogger(__name__)
T = TypeVar("T")


class NeedsCommit(Exception):
    """Raised by an operation that can go on only after a commit (before it changed
    anything): the engine commits and runs it again."""


async def wait_future(fut: Future[Any]) -> None:
    """Sleep until a concurrent.futures future (a codec thread's work) is done."""
    if fut.done():
        return
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Future[Any]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    await done.wait()


class _Calls:
    """What both engines share: each call runs inside a read transaction of its own,
    begun for it and ended when it returns (``reader`` gives it to the call)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._txn: lmdb.Transaction | None = None

    def _bound(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` inside a read transaction of its own, or inside the one
        already bound (a call made by a call)."""
        if self._txn is not None:
            return fn(*args)
        self._txn = txn = self.store.begin()
        try:
            return fn(*args)
        finally:
            self._txn = None
            self.store.end(txn)

    def reader(self) -> lmdb.Transaction:
        """The current call's read transaction."""
        if self._txn is None:
            raise RuntimeError("the volume's state was read outside an engine call")
        return self._txn


class Engine(_Calls):
    """Runs operations over the store and the pending changes, and commits them.

    Attributes:
        store: the open store.
        pending: the changes applied and not yet committed.
        interval: seconds an applied change may wait before it is committed.
        max_dirty: bytes of pending changes after which a commit starts.
        reserve: free disk bytes kept back; changes are refused (NoSpace) below it.
        counters: where commits are counted (the volume's).
    """

    def __init__(self, store: Store, *, interval: float = 0.25, max_dirty: int = 64 << 20,
                 reserve: int = 64 << 20, counters: Counters | None = None) -> None:
        super().__init__(store)
        self.interval = interval
        self.max_dirty = max_dirty
        self.reserve = reserve
        self.counters = counters or Counters()
        self.pending = Pending()
        self._dirty = 0  # bytes applied to the current layer
        self._dirty_since = 0.0
        self._writing = 0  # bytes of the layer being committed
        self._free_checked = 0.0
        self._free = 0
        self._retry = False  # running an operation again after a NeedsCommit
        self._before_commit: list[Callable[[], None]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._broken: BaseException | None = None
        self._lock = trio.Lock()  # one commit at a time (trio)
        self._changed = trio.Event()  # the current layer holds something
        self._urgent = trio.Event()  # ... more than max_dirty bytes
        self._sync_lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.store.grow_if_needed(4 * self.max_dirty)

    def stop(self) -> None:
        """Commit what is pending (from the owner thread, with no trio task committing)."""
        self.commit_sync()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the owner thread after each commit that wrote something."""
        self._after_commit.append(fn)

    def before_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the owner thread before the changes are frozen for a commit."""
        self._before_commit.append(fn)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Commit pending changes ``interval`` after the first, or at once past
        ``max_dirty``, until cancelled."""
        task_status.started()
        while True:
            await self._changed.wait()
            with trio.move_on_at(trio.current_time() + self.interval
                                 - (time.monotonic() - self._dirty_since)):
                await self._urgent.wait()
            try:
                await self.commit()
            except CdpfsError:
                pass  # logged by commit; callers get it from their own requests
            if not self._dirty:
                self._changed = trio.Event()
            if self._dirty <= self.max_dirty:
                self._urgent = trio.Event()

    # --- running operations -----------------------------------------------------------

    def view(self, seq: int = MAX_SEQ) -> View:
        """The volume as of ``seq``, pending changes included."""
        return View(self.store, self.reader(), seq, self.pending)

    def _check(self) -> None:
        if self._broken is not None:
            raise CdpfsError(f"store stopped after an error: {self._broken}")

    def run_sync(self, fn: Callable[..., T], *args: Any, durable: bool = False) -> T:
        """Run ``fn(*args)`` here, from plain code (tools, tests); with ``durable``,
        commit before returning."""
        done, result = self._attempt(fn, args)
        while not done:
            self.commit_sync()
            self._retry = True
            done, result = self._attempt(fn, args)
        if durable:
            self.commit_sync()
        return result  # type: ignore[return-value]

    async def call(self, fn: Callable[..., T], *args: Any, durable: bool = False) -> T:
        """Run ``fn(*args)`` on this (the trio) thread; with ``durable``, return once
        it and everything before it is committed."""
        done, result = self._attempt(fn, args)
        while not done:
            await self.commit()
            self._retry = True
            done, result = self._attempt(fn, args)
        if durable:
            await self.commit()
        return result  # type: ignore[return-value]

    def _attempt(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[bool, T | None]:
        """One try of a call: (True, its result), or (False, None) when it asked for a
        commit first (NeedsCommit, raised before it changed anything)."""
        self._check()
        try:
            return True, self._bound(fn, args)
        except NeedsCommit:
            return False, None
        finally:
            self._retry = False

    def job(self, fn: Job) -> list[Any]:
        """Run ``fn(txn)`` in the write transaction of the next commit, after the
        changes applied before it; its result is appended to the list returned."""
        box: list[Any] = []
        self.pending.current.jobs.append((fn, box))
        self.note_dirty(64)
        return box

    async def in_writer(self, fn: Job) -> Any:
        """Run ``fn(txn)`` in a write transaction after everything applied so far."""
        box = self.job(fn)
        await self.commit()
        self._check()
        return box[-1]

    def settle(self) -> None:
        """For an operation that reads what only committed state has (the journal
        by time, bookmarks): commit first if anything is pending."""
        if self.pending:
            raise NeedsCommit()

    # --- used by operations ------------------------------------------------------------

    def need_space(self, nbytes: int) -> None:
        """Refuse (NoSpace) a change of ``nbytes`` the store may not be able to hold: the
        disk's free bytes and the pages inside the store that earlier commits freed.
        Past ``2 * max_dirty`` pending bytes, wait for a commit first (NeedsCommit)."""
        if self._dirty + nbytes > 2 * self.max_dirty and self._dirty and not self._retry:
            raise NeedsCommit()
        now = time.monotonic()
        if now - self._free_checked > 0.1 or self._free < nbytes + self.reserve:
            self._free = self._room()
            self._free_checked = now
        needed = 2 * (self._dirty + self._writing + nbytes) + self.reserve
        if self._free < needed:
            if (self._dirty or self._writing) and not self._retry:
                raise NeedsCommit()  # committed, what is pending no longer counts twice
            self._free = self._room()
            if self._free < 2 * nbytes + self.reserve:
                raise NoSpace(f"{self.store.path}: not enough free disk space for the store")

    def _room(self) -> int:
        """Bytes the store can still take: free on the disk, and free inside it."""
        inside = self.store.reusable_bytes(self._txn) if self._txn is not None else 0
        return self.store.disk_free() + inside

    def note_dirty(self, nbytes: int) -> None:
        """Record that an operation added to the pending changes (``nbytes`` > 0)."""
        if self._dirty == 0:
            self._dirty_since = time.monotonic()
            self._changed.set()
        self._dirty += max(1, nbytes)
        self.counters.pending_bytes = self._dirty + self._writing
        if self._dirty >= self.max_dirty:
            self._urgent.set()

    # --- committing ------------------------------------------------------------------

    def _freeze(self) -> Layer | None:
        for fn in self._before_commit:
            fn()
        layer = self.pending.freeze()
        self._writing, self._dirty = self._dirty, 0
        return layer

    def _write(self, layer: Layer) -> None:
        """Put ``layer`` into LMDB in one synced transaction (any thread)."""
        for attempt in (1, 2):
            self.store.grow_if_needed(4 * self.max_dirty + 2 * layer.nbytes * attempt)
            try:
                with self.store.txn(write=True) as txn:
                    pending.write(self.store, txn, layer)
                return
            except lmdb.MapFullError:
                if attempt == 2:
                    raise NoSpace("store map full") from None

    def _committed(self, layer: Layer) -> None:
        self.pending.drop(layer)
        self._writing = 0
        self.counters.pending_bytes = self._dirty
        self.counters.commits += 1
        for fn in self._after_commit:
            fn()

    def _failed(self, exc: BaseException) -> CdpfsError:
        self._broken = exc
        log.critical("commit to %s failed, uncommitted changes lost: %s", self.store.path, exc)
        return CdpfsError(f"commit failed: {exc}")

    async def commit(self) -> None:
        """Commit everything applied before this call (one commit at a time; a caller
        that finds one under way waits for it, then commits what came since)."""
        async with self._lock:
            self._check()
            layer = self._freeze()
            if layer is None:
                return
            try:
                await trio.to_thread.run_sync(self._write, layer)
            except NoSpace as exc:
                raise self._failed(exc) from None
            except (lmdb.Error, OSError) as exc:
                raise self._failed(exc) from None
            self._committed(layer)

    def commit_sync(self) -> None:
        """``commit`` from plain code on the owner thread."""
        with self._sync_lock:
            self._check()
            layer = self._freeze()
            if layer is None:
                return
            try:
                self._write(layer)
            except (NoSpace, lmdb.Error, OSError) as exc:
                raise self._failed(exc) from None
            self._committed(layer)


class ReadEngine(_Calls):
    """The engine of a read-only (snapshot, follow) volume: each call runs on the
    caller's thread (the trio thread of a mount), one at a time, inside a read
    transaction of its own that ends with the call, so the filesystem layer is
    only ever used by one thread and sees one consistent state per request; file
    data is fetched and decompressed in reader threads (``ReadPlan``). Nothing is
    ever written."""

    @property
    def txn(self) -> lmdb.Transaction:
        return self.reader()

    async def call(self, fn: Callable[..., T], *args: Any, durable: bool = False) -> T:
        return self._bound(fn, args)
