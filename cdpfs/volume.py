"""The volume service: the one object that serves a store, for every front end and tool.

A ``Volume`` puts a running volume together: it opens the store, takes the
writer lock and checks the store's role, recovers what a crash left, starts the
engine and the filesystem layers, keeps holds on the past points it shows, runs
the periodic prune, ships to the registered replicas and makes fsync wait for the
sync ones. It runs in a trio nursery: ``await nursery.start(volume.run)`` returns
once it serves, and cancelling the nursery stops it, committing first.

Modes (``Mode``):

* ``live``: the volume read-write with its history (``cdpfs mount``);
* ``snapshot``: one past point, read-only, held while served (``mount --at``);
* ``follow``: the newest state of a store another process writes, read-only
  (``mount --follow`` of a replica);
* ``replica``: receive a primary's records (``cdpfs replica serve``), prune by the
  replica's own policy, ship on to the replicas registered here (a chain), and
  answer a rebuild's FETCH with a send stream of the store (``cdpfs.rebuild``);
* ``source``: read a store beside whoever serves it, to ship to one replica
  (``cdpfs replicate``).

Front ends call the request methods (``call`` for most, ``read``, ``write``,
``flush``, ``fsync``, ``fsyncdir``) with the functions of ``fs`` (a ``TimeFS``), catch the
``cdpfs.errors`` classes and map them to their own codes. ``counters`` holds what
a metrics endpoint reports.
"""

from __future__ import annotations

import enum
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import noticed
from .counters import Counters
from .errors import CdpfsError, Corrupt, StoreError, first_error
from .events import Events
from .figures import Lag, replica_lag
from .fs.engine import Engine, ReadEngine, wait_future
from .fs.timefs import TimeFS
from .fs.vfs import FileSystem
from .history import bookmarks
from .history.points import resolve
from .history.prune import Pruner, PruneResult, prune_store
from .rebuild import answer as answer_fetch
from .replication import registry
from .replication.fanout import Connector, Fanout, tls_connector
from .replication.receiver import ROLE_REPLICA, Receiver
from .replication.registry import ReplicaState
from .replication.sender import Connect, Sender
from .store.bookmarks import Bookmark
from .store.lmdb import Store
from .store.view import View

log = logging.getLogger(__name__)

HISTORY_SETTING = "history"  # config.history: "visible" lists @ entries at the root
SETTINGS = {HISTORY_SETTING: ("hidden", "visible")}  # cdpfs config: allowed values, default first
DEFAULT_PRUNE_INTERVAL = 3600  # seconds, when config.prune_interval is unset
# LMDB tells no process of another's commits (a bookmark or 'replica add' made by a
# tool, records written by the mount 'cdpfs replicate' ships beside): one watcher
# per volume looks at the environment's newest transaction id this often. Changes
# made in this process wake what waits on them at once.
WATCH_INTERVAL = 0.2


class Mode(enum.Enum):
    LIVE = "live"
    SNAPSHOT = "snapshot"
    FOLLOW = "follow"
    REPLICA = "replica"
    SOURCE = "source"


class Volume:
    """A store being served (see the module docstring).

    Attributes:
        path: the store directory.
        mode: how it is served.
        store: the open store (a replica's: None until its first primary made it).
        fs: the filesystem front ends talk to (live, snapshot and follow modes).
        seq: the point a snapshot shows.
        counters: commits, queued bytes, shipped, applied, lag.
        fanout: the senders to registered replicas (live and replica modes).
        receiver: the receiving side (replica mode).
    """

    def __init__(self, path: str | Path, mode: Mode = Mode.LIVE, *, at: str | None = None,
                 show_history: bool | None = True, kernel_mtime: bool = False,
                 owner: str = "mount",
                 listen: str | None = None, server_ctx: ssl.SSLContext | None = None,
                 connector: Connector = tls_connector,
                 clock: Callable[[], int] | None = None, gate: Callable[[], None] | None = None,
                 failback: bool = False, events: Events | None = None) -> None:
        if (mode is Mode.SNAPSHOT) != (at is not None):
            raise ValueError("a snapshot volume, and only one, needs a moment")
        if mode is Mode.REPLICA and (listen is None or server_ctx is None):
            raise ValueError("a replica volume needs an address and a TLS context")
        self.path = Path(path)
        self.mode = mode
        self.at = at
        self.show_history = show_history
        self.kernel_mtime = kernel_mtime
        self.owner = owner
        self.listen = listen
        self.server_ctx = server_ctx
        self.connector = connector
        self.clock = clock
        # High availability: asked before every change and before an fsync returns,
        # raises to refuse (a fence: changes only while the role's lease holds).
        self.gate = gate
        self.failback = failback  # a replica keeps, then takes out, what a parted history wrote
        # what it reports; the events are the process's (an HA node's outlive its volumes)
        self.counters = Counters(events=events or Events())
        self.store: Store | None = None
        self.fs: TimeFS | None = None
        self.seq: int | None = None
        self.engine: Engine | ReadEngine | None = None
        self.live: FileSystem | None = None
        self.fanout: Fanout | None = None
        self.receiver: Receiver | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Volume] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Serve until cancelled; ``task_status.started(self)`` once serving."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            await self._open()
            async with trio.open_nursery() as nursery:
                await self._start_services(nursery)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _open(self) -> None:
        if self.mode is Mode.REPLICA:
            self.receiver = await trio.to_thread.run_sync(
                lambda: Receiver(self.path, self.counters, failback=self.failback))
            self.receiver.on_fetch = answer_fetch  # a rebuild's stream, beside the primary
            self.store = self.receiver.store
            return
        self.store = store = await trio.to_thread.run_sync(Store, self.path)
        if self.show_history is None:  # as the store is configured (cdpfs config)
            with store.txn() as txn:
                self.show_history = store.config(txn, HISTORY_SETTING) == "visible"
        if self.mode is Mode.LIVE:
            await self._open_live(store)
        elif self.mode in (Mode.SNAPSHOT, Mode.FOLLOW):
            if self.mode is Mode.SNAPSHOT:
                self.seq = await trio.to_thread.run_sync(self._hold_snapshot, store)
            reader = self.engine = ReadEngine(store)
            self.fs = TimeFS(store, lambda s: View(store, reader.txn, s), base_seq=self.seq,
                             follow=self.mode is Mode.FOLLOW, show_history=self.show_history,
                             **self._clocked())

    async def _open_live(self, store: Store) -> None:
        """Lock, check the role, start the engine, recover; the history and the
        senders, which every commit wakes."""
        await trio.to_thread.run_sync(self._lock_live, store)
        engine = self.engine = Engine(store, counters=self.counters)
        fs = self.live = FileSystem(store, engine, kernel_mtime=self.kernel_mtime,
                                    **self._clocked())
        await trio.to_thread.run_sync(engine.start)
        # Nothing else runs yet: the recovery may run, and commit, in a worker thread.
        await trio.to_thread.run_sync(lambda: engine.run_sync(fs.recover, durable=True))
        if self.gate is not None:  # what a crash left is cleaned up, role or not
            fs.gate = self.gate
        self.fs = TimeFS(store, engine.view, live=fs, show_history=self.show_history,
                         on_slot=self._hold, settle=engine.settle, **self._clocked())
        fanout = self.fanout = await trio.to_thread.run_sync(
            lambda: Fanout(store, self.counters, self.connector))
        engine.after_commit(fanout.committed)


    def _clocked(self) -> dict[str, Callable[[], int]]:
        """The clock option of the layers below: a fake clock a test gave, or their own."""
        return {} if self.clock is None else {"clock": self.clock}

    def _now(self) -> int | None:
        return None if self.clock is None else self.clock()

    def _lock_live(self, store: Store) -> None:
        store.lock(self.owner)
        with store.txn() as txn:
            if store.config(txn, "role") == ROLE_REPLICA:
                raise StoreError(f"{store.path} is a replica: mount it with --follow or --at "
                                 "to read it (writing would part its history from the "
                                 "primary's; to make it the primary: 'cdpfs replica "
                                 "promote', or a cluster: 'cdpfs ha')")

    def _hold_snapshot(self, store: Store) -> int:
        assert self.at is not None
        with store.txn(write=True) as txn:
            seq = resolve(store, txn, self.at, self._now()).seq
            bookmarks.hold(store, txn, "snapshot", seq)
        return seq

    async def _start_services(self, nursery: trio.Nursery) -> None:
        if self.mode is Mode.LIVE:
            assert self.fanout is not None and self.store is not None
            assert isinstance(self.engine, Engine)
            await nursery.start(self.engine.serve)
            await nursery.start(self.fanout.run)
            nursery.start_soon(self._prune_loop)
            nursery.start_soon(self._watch, self.store)
        elif self.mode is Mode.REPLICA:
            assert self.receiver is not None and self.listen and self.server_ctx
            await nursery.start(self.receiver.listen, self.listen, self.server_ctx)
            nursery.start_soon(self._replica_services, nursery)

    async def _replica_services(self, nursery: trio.Nursery) -> None:
        """Once the replica store exists: its prune, and shipping on (a chain)."""
        receiver = self.receiver
        assert receiver is not None
        await receiver.store_ready.wait()
        store = self.store = receiver.store
        assert store is not None
        fanout = self.fanout = await trio.to_thread.run_sync(
            lambda: Fanout(store, self.counters, self.connector))
        receiver.on_applied = fanout.committed
        await nursery.start(fanout.run)
        nursery.start_soon(self._prune_loop)
        nursery.start_soon(self._watch, store)

    async def _close(self) -> None:
        if isinstance(self.engine, Engine):
            engine = self.engine
            try:
                if self.live is not None and self.live.mutator is not None:
                    await engine.call(self._drop_holds, durable=True)
            finally:
                await trio.to_thread.run_sync(engine.stop)  # nothing else runs now
            log.info("%s: %d commits", self.path, self.counters.commits)
        if self.seq is not None and self.store is not None:
            store = self.store

            def release() -> None:
                with store.txn(write=True) as txn:
                    bookmarks.release(store, txn, "snapshot")

            await trio.to_thread.run_sync(release)
        if self.receiver is not None:
            self.receiver.close()
        elif self.store is not None:
            self.store.close()

    # --- history holds (live mode: written with the next commit) ------------------------

    def _hold(self, slot: int, seq: int | None) -> None:
        """Keep a hold on each past point the volume shows (``TimeFS``'s on_slot)."""
        assert self.live is not None and self.store is not None
        store, name = self.store, f"slot{slot}"
        if seq is None:
            self.live.engine.job(lambda txn: bookmarks.release(store, txn, name))
        else:
            self.live.engine.job(lambda txn: bookmarks.hold(store, txn, name, seq))

    def _drop_holds(self) -> None:
        assert self.live is not None and self.store is not None
        store = self.store
        self.live.engine.job(lambda txn: bookmarks.release_all(store, txn))

    # --- background work ---------------------------------------------------------------

    async def _prune_loop(self) -> None:
        """Apply the retention policy every ``config.prune_interval``: in small steps in
        the commits of a live volume; in transactions of its own on a replica."""
        store = self.store
        assert store is not None
        while True:
            every = await trio.to_thread.run_sync(self._config, store, "prune_interval")
            await trio.sleep(max(1, DEFAULT_PRUNE_INTERVAL if every is None else every))
            try:
                if isinstance(self.engine, Engine):
                    result = await self._prune_live(self.engine, store)
                elif self.receiver is not None and (
                        await trio.to_thread.run_sync(self.receiver.position))[1]:
                    continue  # a full resync under way
                else:
                    result = await trio.to_thread.run_sync(prune, store, self._now())
                log.info("pruned: %d versions, %d records, %d blocks, %d packs, %.1f MiB "
                         "freed in %.1fs", result.versions, result.records, result.blocks,
                         result.packs, result.bytes_freed / 2**20, result.seconds)
                if result.records or result.versions:
                    self.counters.events.emit("prune", records=result.records,
                                              versions=result.versions,
                                              bytes_freed=result.bytes_freed)
            except CdpfsError as exc:
                log.error("prune of %s failed: %s", store.path, exc)
                self.counters.events.emit("error", message=f"prune failed: {exc}")
            except Exception:
                log.exception("periodic prune failed")

    async def _prune_live(self, engine: Engine, store: Store) -> PruneResult:
        def start(txn: Any) -> Pruner:
            return Pruner(store, txn, keep_after=registry.needed_after(store, txn),
                          now_ns=self._now())

        pruner: Pruner = await engine.in_writer(start)
        while True:
            # Until its commit is done, a step may free a block no committed state
            # uses: writes meanwhile keep the blocks they share (pending.pruning).
            engine.pending.pruning += 1
            try:
                if await engine.in_writer(pruner.step):
                    return pruner.result
            finally:
                engine.pending.pruning -= 1
            await trio.sleep(0)

    @staticmethod
    def _config(store: Store, name: str) -> Any:
        with store.txn() as txn:
            return store.config(txn, name)

    async def _watch(self, store: Store, *on_change: Callable[[], None]) -> None:
        """Wake what depends on other processes' writes when the store changed
        (see WATCH_INTERVAL): the registry, bookmarks, the journal."""
        seen = store.last_txnid()
        recorded = await trio.to_thread.run_sync(noticed.look, store)
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = store.last_txnid()
            if now == seen:
                continue
            seen = now
            if self.fanout is not None:
                await self.fanout.rediscover()
                self.fanout.committed()
            for fn in on_change:
                fn()
            before, recorded = recorded, await trio.to_thread.run_sync(noticed.look, store)
            if recorded != before:
                for kind, fields in noticed.changes(store, before, recorded):
                    self.counters.events.emit(kind, **fields)

    # --- requests (front ends) ---------------------------------------------------------

    def _engine(self) -> Engine | ReadEngine:
        if self.engine is None:
            raise CdpfsError(f"{self.path}: not served as a filesystem ({self.mode.value})")
        return self.engine

    async def call(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        """Run ``fn(*args)`` (a method of ``fs``) where the volume's state is valid: on
        this thread over the live volume's pending changes, in a reader thread of a
        read-only one. With ``durable``, return after everything before it is
        committed."""
        return await self._engine().call(fn, *args, durable=durable)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Read ``size`` bytes at ``off`` of the open file ``fh``: the extents are found
        here; blocks not in the cache are fetched, checked and decompressed in a
        reader thread (several reads at once run in parallel)."""
        fs = self.fs
        assert fs is not None
        plan = await self.call(fs.read_plan, fh, off, size)
        try:
            if plan.cached():
                return plan.run()
            return await trio.to_thread.run_sync(plan.run)
        except Corrupt as exc:
            await self.call(fs.read_failed, fh, off, exc)
            raise

    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write ``data`` at ``off`` of the open file ``fh``: its whole blocks are hashed
        and compressed on the codec threads (other requests go on meanwhile), then
        it is applied; acknowledged once applied, durable once committed."""
        fs = self.fs
        assert fs is not None
        prepared = fs.prepare_write(off, data)
        if prepared is not None:
            await wait_future(prepared)
        written = int(await self.call(fs.write, fh, off, data, prepared))
        self.counters.bytes_written += written
        return written

    async def flush(self, fh: int) -> None:
        """A close of ``fh``: nothing is left to report (writes are applied before
        they are acknowledged)."""

    async def fsync(self, fh: int) -> None:
        """Everything written before is durable (and on the sync replicas) on return."""
        assert self.fs is not None
        with self.counters.fsyncs.time():
            seq = await self.call(self.fs.fsync, fh, durable=True)
            await self._synced(seq)

    async def fsyncdir(self) -> None:
        assert self.fs is not None
        with self.counters.fsyncs.time():
            seq = await self.call(self.fs.sync, durable=True)
            await self._synced(seq)

    async def _synced(self, seq: int) -> None:
        """The end of an fsync: wait for the sync replicas, then acknowledge it only if
        this node still holds the primary role (a fence that closed during the
        commit fails the fsync: the data is on disk here, but not acknowledged)."""
        if self.fanout is not None:
            await self.fanout.synced(seq)
        if self.gate is not None:
            self.gate()

    # --- shipping (source mode) ----------------------------------------------------------

    async def ship(self, name: str, address: str, connect: Connect, *, follow: bool = False,
                   attempts: int = 0,
                   on_batch: Callable[[ReplicaState], None] | None = None) -> Sender:
        """Ship to replica ``name`` until it has everything (``follow``: until
        cancelled); the sender, with its final state."""
        store = self.store
        assert store is not None
        sender = await trio.to_thread.run_sync(
            lambda: Sender(store, name, address, connect, self.counters))
        sender.on_batch = on_batch
        try:
            async with trio.open_nursery() as nursery:
                if follow:
                    nursery.start_soon(self._watch, store, sender.poke)
                await sender.run(follow, attempts)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return sender

    async def point(self, moment: str) -> tuple[int, int]:
        """The kept point ``moment`` names (BadMoment if none): its seq and time."""
        store = self.store
        if store is None:
            raise CdpfsError(f"{self.path}: no store yet")

        def find() -> tuple[int, int]:
            with store.txn() as txn:
                point = resolve(store, txn, moment, self._now())
                return point.seq, point.ts

        return await trio.to_thread.run_sync(find)

    async def bookmark(self, name: str, at: str | None = None) -> tuple[Bookmark, int]:
        """Bookmark the point moment ``at`` names (default: the newest, once everything
        written before is committed) as ``name``: the bookmark and its record's time.
        BadMoment for a bad name or moment, Exists for a name taken."""
        store = self.store
        if self.mode is not Mode.LIVE or store is None or self.fs is None:
            raise CdpfsError(f"{self.path}: bookmarks are made on the live volume")
        await self.call(self.fs.sync, durable=True)

        def put() -> tuple[Bookmark, int]:
            with store.txn(write=True) as txn:
                point = resolve(store, txn, "now" if at is None else at, self._now())
                return bookmarks.put(store, txn, name, point.seq), point.ts

        made = await trio.to_thread.run_sync(put)
        if self.fanout is not None:
            self.fanout.committed()  # the replicas get it
        return made

    def lag(self, count_bytes: bool = False) -> dict[str, Lag]:
        """How far each replica is behind this volume's newest committed record, as
        its sender last heard (``figures.replica_lag``; ``count_bytes``: the bytes
        still to send too, which reads the records it lacks)."""
        if self.fanout is None or self.store is None:
            return {}
        now = time.time_ns()
        with self.store.txn() as txn:
            lags = {name: replica_lag(self.store, txn, acked, now, count_bytes=count_bytes)
                    for name, acked in self.fanout.acked().items()}
        self.counters.lag = {name: lag.records for name, lag in lags.items()}
        return lags


def prune(store: Store, now_ns: int | None = None) -> PruneResult:
    """Prune ``store`` by its retention policy beside whatever serves it, keeping
    the journal its replicas still need (``cdpfs prune``, a replica's own prune)."""
    with store.txn() as txn:
        keep_after = registry.needed_after(store, txn)
    return prune_store(store, keep_after=keep_after, now_ns=now_ns)


def prune_volume(path: Path) -> PruneResult:
    """``prune`` of the store at ``path`` (``cdpfs prune``, beside a mount)."""
    with Store(path) as store:
        return prune(store)


def preflight(path: Path, at: str | None = None) -> str | None:
    """What a mount finds out before it starts serving, said at once: the store opens
    (StoreError: not a store, damaged, of another format), and the moment ``at``
    names a kept point (BadMoment). Who holds the store's writer lock now (None:
    nobody)."""
    with Store(path, readonly=True) as store:
        who = store.holder()
        if at is not None:
            with store.txn() as txn:
                resolve(store, txn, at)  # a bad moment fails here, with its reason
    return str(who) if who else None


def check_settings(changes: dict[str, str]) -> None:
    """ValueError unless each of ``changes`` names one of ``SETTINGS`` and one of its
    values."""
    for name, value in changes.items():
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r} (known: {', '.join(SETTINGS)})")
        if value not in SETTINGS[name]:
            raise ValueError(f"{name} must be one of {', '.join(SETTINGS[name])}, "
                             f"not {value!r}")


def configure(path: Path, changes: dict[str, str]) -> dict[str, str]:
    """Set ``changes`` (``check_settings``: ValueError, nothing changed, for a bad one)
    in the store at ``path``; every setting as it is now. A mount reads them when it
    starts (``cdpfs config``)."""
    check_settings(changes)
    with Store(path) as store, store.txn(write=bool(changes)) as txn:
        for name, value in changes.items():
            store.set_config(txn, name, value)
        return {name: store.config(txn, name) or values[0]
                for name, values in SETTINGS.items()}
