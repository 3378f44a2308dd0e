"""The store thread: every LMDB access of a mounted volume, with group commit.

All operations run one at a time on one thread that owns the writer
transaction, so each sees the effect of every earlier one. Operations are
acknowledged as soon as they are applied to that transaction; it is
committed (and synced) when a caller asks for durability (fsync), when it
holds ``max_dirty`` bytes, or ``interval`` seconds after its first change, so
many operations share one synced commit. No transaction ever crosses an
``await``: trio tasks hand work to this thread and sleep until it is done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import lmdb
import outcome
import trio

from ..counters import Counters
from ..errors import CdpfsError, NoSpace
from ..store.lmdb import Store

log = logging.getLogger(__name__)

Done = Callable[[outcome.Outcome], None]
_STOP = object()


class Engine:
    """Runs functions on the store thread inside the open writer transaction.

    Attributes:
        store: the open store.
        txn: the writer transaction, or None between commits.
        interval: seconds an applied change may wait before it is committed.
        max_dirty: bytes of new data after which a commit is forced.
        reserve: free disk bytes kept back; changes are refused (NoSpace) below it.
        counters: where commits and queued bytes are counted (the volume's).
    """

    def __init__(self, store: Store, *, interval: float = 0.25, max_dirty: int = 64 << 20,
                 reserve: int = 64 << 20, counters: Counters | None = None) -> None:
        self.store = store
        self.interval = interval
        self.max_dirty = max_dirty
        self.reserve = reserve
        self.max_posted = 256 << 20
        # counters.queued_bytes: bytes posted by trio tasks, not yet applied (trio thread only)
        self.counters = counters or Counters()
        self._drained: trio.Event | None = None
        self.txn: lmdb.Transaction | None = None
        self._dirty = 0  # bytes applied since the last commit (0: nothing to commit)
        self._dirty_since = 0.0
        self._free_checked = 0.0
        self._free = 0
        self._rebase: list[Callable[[lmdb.Transaction], None]] = []
        self._before_commit: list[Callable[[], None]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="cdpfs-store", daemon=True)
        self._broken: BaseException | None = None

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.store.grow_if_needed(4 * self.max_dirty)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is pending and end the thread."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()

    def on_txn(self, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Call ``fn(txn)`` (on the store thread) whenever a new writer txn begins."""
        self._rebase.append(fn)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (on the store thread, no transaction open) after each commit
        that wrote something."""
        self._after_commit.append(fn)

    def before_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (on the store thread, in the writer txn) before each commit."""
        self._before_commit.append(fn)

    # --- calling in ------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        """Run ``fn(*args)`` on the store thread; with ``durable``, return after commit."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._q.put((fn, args, durable, done))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    async def post(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> None:
        """Queue ``fn(*args)`` and return at once (write-behind); its errors are the
        caller's to record. Waits while more than ``max_posted`` bytes are queued."""
        counters = self.counters
        while counters.queued_bytes > self.max_posted:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
        token = trio.lowlevel.current_trio_token()
        counters.queued_bytes += nbytes

        def applied() -> None:
            counters.queued_bytes -= nbytes
            if self._drained is not None and counters.queued_bytes <= self.max_posted // 2:
                self._drained.set()
                self._drained = None

        def done(result: outcome.Outcome) -> None:
            if isinstance(result, outcome.Error):
                log.error("write-behind %s failed: %s", getattr(fn, "__name__", fn),
                          result.error)
            token.run_sync_soon(applied)

        self._q.put((fn, args, False, done))

    @property
    def posted(self) -> int:
        """Bytes of write-behind work queued and not yet applied."""
        return self.counters.queued_bytes

    def call_sync(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        """The same from a plain thread (tools, tests)."""
        ready = threading.Event()
        box: list[outcome.Outcome] = []

        def done(result: outcome.Outcome) -> None:
            box.append(result)
            ready.set()

        self._q.put((fn, args, durable, done))
        ready.wait()
        return box[0].unwrap()

    # --- used by operations running on the store thread ---------------------------

    def ensure_txn(self) -> lmdb.Transaction:
        if self.txn is None:
            self.txn = self.store.env.begin(write=True)
            for fn in self._rebase:
                fn(self.txn)
        return self.txn

    def need_space(self, nbytes: int) -> None:
        """Refuse (NoSpace) a change of ``nbytes`` the store may not be able to hold: the
        disk's free bytes and the pages inside the store that earlier commits freed."""
        now = time.monotonic()
        if now - self._free_checked > 0.1 or self._free < nbytes + self.reserve:
            self._free = self._room()
            self._free_checked = now
        needed = 2 * (self._dirty + nbytes) + self.reserve
        if self._free < needed:
            self.commit()
            self.ensure_txn()  # the caller goes on in a fresh writer transaction
            self._free = self._room()
            if self._free < 2 * nbytes + self.reserve:
                raise NoSpace(f"{self.store.path}: not enough free disk space for the store")

    def _room(self) -> int:
        """Bytes the store can still take: free on the disk, and free inside it."""
        inside = self.store.reusable_bytes(self.txn) if self.txn is not None else 0
        return self.store.disk_free() + inside

    def note_dirty(self, nbytes: int) -> None:
        """Record that an operation changed the writer transaction (``nbytes`` > 0)."""
        if self._dirty == 0:
            self._dirty_since = time.monotonic()
        self._dirty += max(1, nbytes)

    # --- the thread ------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            if self.txn is not None:  # never leave LMDB's writer lock behind
                try:
                    self.commit()
                except Exception:
                    log.exception("final commit failed")

    @staticmethod
    def _reply(done: Done, result: outcome.Outcome) -> None:
        try:
            done(result)
        except Exception:  # the caller is gone (trio run ended): nothing to tell
            log.debug("reply dropped", exc_info=True)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            timeout = None
            if self._dirty:
                timeout = max(0.0, self._dirty_since + self.interval - time.monotonic())
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                self._commit_logged()
                continue
            batch = [item]
            while len(batch) < 256:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            waiting: list[tuple[Done, outcome.Outcome]] = []
            for item in batch:
                if item is _STOP:
                    stopping = True
                    continue
                fn, args, durable, done = item
                result = self._execute(fn, args)
                if durable:
                    waiting.append((done, result))
                else:
                    self._reply(done, result)
            due = self._dirty >= self.max_dirty or (
                self._dirty and time.monotonic() - self._dirty_since >= self.interval)
            if waiting or due or stopping or not self._dirty:
                # Without changes the commit only ends the transaction (no sync),
                # so an idle mount never holds LMDB's writer lock.
                err = self._commit_logged()
                for done, result in waiting:
                    self._reply(done, outcome.Error(err) if err else result)

    def _execute(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> outcome.Outcome:
        if self._broken is not None:
            return outcome.Error(CdpfsError(f"store stopped after an error: {self._broken}"))
        for attempt in (1, 2):
            try:
                self.ensure_txn()
                return outcome.Value(fn(*args))
            except lmdb.MapFullError:
                if attempt == 2:
                    return outcome.Error(NoSpace("store map full"))
                self.commit()
                self.store.grow_if_needed(4 * self.max_dirty)
            except CdpfsError as exc:
                return outcome.Error(exc)
            except Exception as exc:  # a bug: report it, keep serving
                log.exception("operation %s failed", getattr(fn, "__name__", fn))
                return outcome.Error(exc)
        raise AssertionError("unreachable")

    def commit(self) -> None:
        """Commit (synced) the writer transaction, then grow the map if it is filling up."""
        if self.txn is None:
            return
        txn, self.txn = self.txn, None
        dirty, self._dirty = self._dirty, 0
        try:
            for fn in self._before_commit:
                fn()
            txn.commit()
        except lmdb.Error as exc:
            self._broken = exc
            log.critical("commit to %s failed, uncommitted changes lost: %s", self.store.path, exc)
            raise CdpfsError(f"commit failed: {exc}") from exc
        if dirty:
            self.counters.commits += 1

            self.store.grow_if_needed(4 * self.max_dirty)
            for fn in self._after_commit:
                fn()

    def _commit_logged(self) -> BaseException | None:
        try:
            self.commit()
        except Exception as exc:
            return exc
        return None


class ReadEngine:
    """The engine of a read-only (snapshot) mount: each call runs in a worker
    thread inside a fresh read transaction (``txn`` in that thread), so reads run
    in parallel and no transaction outlives a request. Nothing is ever written."""

    posted = 0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._local = threading.local()

    @property
    def txn(self) -> lmdb.Transaction:
        return self._local.txn

    async def call(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        return await trio.to_thread.run_sync(self._run, fn, args)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self.store.txn() as txn:
            self._local.txn = txn
            try:
                return fn(*args)
            finally:
                self._local.txn = None

    async def post(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> None:
        await self.call(fn, *args)
