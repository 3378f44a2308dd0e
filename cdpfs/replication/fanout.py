"""Shipping from a served store: one sender per registered replica, and sync-mode waits.

The volume service runs a ``Fanout`` beside a live volume (and beside a replica
server, whose own registered replicas make a chain). It ships to every replica
in the registry (``cdpfs replica add``) except ``manual`` ones (fed only by
``cdpfs replicate``), each in ``async`` mode (writes never wait: records queue in
the journal, on disk, while a replica is slow or away) or ``sync`` mode (an
fsync returns only once every sync replica has acknowledged everything committed
before it). A sync replica that does not answer within ``config.sync_timeout``
seconds is reported and, by ``config.sync_dead`` ("degrade", the default, or
"block"), either stops being waited for until it catches up or keeps fsync
waiting. A degraded replica that answers again and is close behind is waited
for again (a replica always a round trip behind a steady stream of fsyncs would
otherwise never get back), and is in sync again once it has acknowledged every
fsync that returned without it. Whoever commits calls ``committed()``; whoever
sees the registry change calls ``rediscover()``: nothing here polls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ..counters import Counters
from ..errors import CdpfsError, root_cause
from ..store.lmdb import Store
from . import credentials
from .registry import ReplicaState, load_states
from .sender import Connect, Sender, tls_connect

# A degraded sync replica is waited for again once it answered within REJOIN_HEARD
# seconds and has every record older than REJOIN_BEHIND seconds.
REJOIN_HEARD = 2.0
REJOIN_BEHIND = 1.0

log = logging.getLogger(__name__)

Connector = Callable[[Store, ReplicaState], Connect]


def tls_connector(store: Store, state: ReplicaState) -> Connect:
    """Connect to a registered replica over TLS, pinned to the certificate trusted
    under its name."""
    return tls_connect(state.address, credentials.client_context(store.path, state.name))


class Fanout:
    """The senders of one served store.

    Attributes:
        senders: by replica name.
        degraded: sync replicas fsync no longer waits for (until they catch up).
    """

    def __init__(self, store: Store, counters: Counters | None = None,
                 connector: Connector = tls_connector) -> None:
        self.store = store
        self.counters = counters or Counters()
        self.connector = connector
        self.senders: dict[str, Sender] = {}
        self.degraded: set[str] = set()
        self.sync_timeout = 10.0
        self.block_when_dead = False
        # By degraded replica: the newest seq an fsync returned for without it. It is
        # back in sync once it has acknowledged that, every fsync since having waited.
        self._owed: dict[str, int] = {}
        self._rejoining: set[str] = set()  # degraded ones fsync waits for again
        self._retry_at: dict[str, float] = {}  # no new try before (one that failed)
        self._degraded_now: dict[str, trio.Event] = {}  # set when one is degraded
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # a running sender's, by name
        # Asked, with the sync replicas fsync will wait for, before one is dropped;
        # True once that is recorded where a failover looks (an HA primary: etcd).
        # Until it is, fsync goes on waiting: a failover must never promote a
        # replica an fsync returned without.
        self.before_degrade: Callable[[list[str]], Awaitable[bool]] | None = None
        self._leaving: set[str] = set()  # being recorded out of sync: not in in_sync()
        # Known before the volume serves its first request, so an fsync in the first
        # moments already waits for the sync replicas.
        self._new: list[Sender] = []
        self._apply(*self._discover())

    def _discover(self) -> tuple[list[Sender], list[str]]:
        """What the registry says now (read in a thread, changing nothing here): senders
        to start (a replica added, or given a new address) and the names of those to
        stop (removed, made manual, or readdressed); the sync settings."""
        with self.store.txn() as txn:
            self.sync_timeout = float(self.store.config(txn, "sync_timeout") or 10.0)
            self.block_when_dead = self.store.config(txn, "sync_dead") == "block"
        registered = {s.name: s for s in load_states(self.store) if s.mode != "manual"}
        stop = [name for name, sender in self.senders.items()
                if name not in registered or registered[name].address != sender.address]
        start = []
        for name, state in registered.items():
            running = self.senders.get(name)
            if running is not None and name not in stop:  # settings change while it runs
                running.state.mode, running.state.limit = state.mode, state.limit
                continue
            try:
                connect = self.connector(self.store, state)
            except CdpfsError as exc:
                log.error("cannot ship to replica %s: %s", name, exc)
                continue
            start.append(Sender(self.store, name, state.address, connect, self.counters))
        return start, stop

    def _apply(self, start: list[Sender], stop: list[str]) -> None:
        """Stop and start senders as ``_discover`` found (on the trio thread)."""
        for name in stop:
            sender = self.senders.pop(name)
            scope = self._scopes.pop(name, None)
            log.info("no longer shipping to replica %s at %s (%s)", name, sender.address,
                     "removed or made manual" if all(s.state.name != name for s in start)
                     else "its address changed")
            if scope is not None:
                scope.cancel()
        for sender in start:
            self.senders[sender.state.name] = sender
            if self._nursery is not None:
                log.info("shipping to replica %s at %s (%s)", sender.state.name,
                         sender.state.address, sender.state.mode)
                scope = self._scopes[sender.state.name] = trio.CancelScope()
                self._nursery.start_soon(self._ship, sender, scope)
            else:
                self._new.append(sender)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Run a sender for each registered replica, now and as they are added."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            new, self._new = self._new, []
            self._apply(new, [])
            task_status.started()
            await trio.sleep_forever()

    async def rediscover(self) -> None:
        """The registry may have changed: start senders for new replicas (and new
        addresses), stop those removed, take new settings."""
        self._apply(*await trio.to_thread.run_sync(self._discover))

    async def _ship(self, sender: Sender, scope: trio.CancelScope) -> None:
        name = sender.state.name
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take_back, sender)
                try:
                    await sender.run(follow=True, attempts=0)
                except CdpfsError as exc:  # refused, or the journal it needs is gone
                    log.error("replication to %s stopped: %s", name, exc)
                except Exception as exc:  # never the volume's end: it goes on serving
                    log.error("replication to %s stopped: internal error: %s", name,
                              root_cause(exc))
                    log.debug("the internal error", exc_info=True)
                nursery.cancel_scope.cancel()
        if self._scopes.get(name) is scope:
            del self._scopes[name]

    async def _take_back(self, sender: Sender) -> None:
        """Put sync replica ``sender`` back in sync as soon as, degraded, it has
        acknowledged every fsync that returned without it, whether more fsyncs
        come or not (writes may have stopped)."""
        name = sender.state.name
        while True:
            if name not in self.degraded:
                await self._degraded_now.setdefault(name, trio.Event()).wait()
            elif sender.state.acked < self._owed.get(name, 0):
                await sender.wait_acked(self._owed.get(name, 0))
            else:
                self._back(name)

    def committed(self) -> None:
        """New records are committed (or bookmarks changed): wake the senders."""
        for sender in self.senders.values():
            sender.poke()

    def degrade(self, name: str, upto: int) -> None:
        """Let fsync not wait for sync replica ``name`` until it has acknowledged
        ``upto``: it is known not to answer now (a node that just lost the primary
        role), so waiting ``sync_timeout`` for it first would only stall writes."""
        self._owes(name, upto)

    def _owes(self, name: str, seq: int) -> None:
        """An fsync of ``seq`` returns without sync replica ``name`` (degraded)."""
        if name not in self.degraded:
            self.counters.events.emit("sync-degraded", replica=name, seq=seq)
        self.degraded.add(name)
        self._owed[name] = max(self._owed.get(name, 0), seq)
        woken = self._degraded_now.pop(name, None)
        if woken is not None:
            woken.set()

    def _back(self, name: str) -> None:
        """Degraded ``name`` has every fsync that returned without it: in sync again."""
        self.degraded.discard(name)
        self._rejoining.discard(name)
        self._owed.pop(name, None)
        self._retry_at.pop(name, None)
        log.warning("sync replica %s caught up: fsync waits for it again", name)
        self.counters.events.emit("sync-restored", replica=name)

    def _rejoin(self, sync: list[Sender]) -> None:
        """Take back degraded sync replicas that have every fsync that returned without
        them; have fsync wait again for those close behind (connected, heard from
        lately, less than REJOIN_BEHIND behind), so that one following a steady
        stream of writes, always a round trip behind the newest fsync, gets back in."""
        now, wall = trio.current_time(), time.time_ns()
        for sender in sync:
            name = sender.state.name
            if name not in self.degraded:
                continue
            if sender.state.acked >= self._owed.get(name, 0):
                self._back(name)
            elif (name not in self._rejoining and sender.state.connected
                  and now - sender.heard_at < REJOIN_HEARD
                  and wall - sender.state.acked_ts < REJOIN_BEHIND * 1e9
                  and now >= self._retry_at.get(name, 0.0)):
                self._rejoining.add(name)

    async def synced(self, seq: int) -> None:
        """Return once every sync replica has acknowledged ``seq`` (see the module doc)."""
        sync = [s for s in self.senders.values() if s.state.mode == "sync"]
        self._rejoin(sync)
        waited: set[str] = set()
        while True:  # again for any taken back while this fsync waited for others
            waiting = [s for s in sync if s.state.acked < seq and s.state.name not in waited
                       and (s.state.name not in self.degraded
                            or s.state.name in self._rejoining or self.block_when_dead)]
            if not waiting:
                break
            self.committed()
            deadline = trio.current_time() + self.sync_timeout
            trying = {s.state.name for s in waiting if s.state.name in self.degraded}
            for sender in waiting:
                name = sender.state.name
                waited.add(name)
                with trio.move_on_at(float("inf") if self.block_when_dead else deadline):
                    await sender.wait_acked(seq)
                if sender.state.acked >= seq:
                    continue
                if name in trying and name in self._rejoining:  # fsync stops waiting again
                    self._rejoining.discard(name)
                    self._retry_at[name] = trio.current_time() + 3 * self.sync_timeout
                    log.warning("sync replica %s did not acknowledge #%d within %gs (%s): "
                                "still out of sync", name, seq, self.sync_timeout,
                                sender.state.last_error or "no answer")
                if name in self.degraded:  # (or another fsync found it out meanwhile)
                    continue
                await self._record_degraded(sender, seq)
                if sender.state.acked < seq:
                    self._owes(name, seq)
                    log.warning("sync replica %s did not acknowledge #%d within %gs (%s): "
                                "fsync no longer waits for it until it catches up",
                                name, seq, self.sync_timeout,
                                sender.state.last_error or "no answer")
        for sender in sync:  # this fsync returns without these: they owe it
            if sender.state.name in self.degraded and sender.state.acked < seq:
                self._owes(sender.state.name, seq)

    def in_sync(self) -> list[str]:
        """The sync replicas every fsync that returned is on."""
        return sorted(name for name, s in self.senders.items()
                      if s.state.mode == "sync" and name not in self.degraded
                      and name not in self._leaving)

    async def _record_degraded(self, sender: Sender, seq: int) -> None:
        """Have ``before_degrade`` record that fsync stops waiting for ``sender``;
        until it has, or the replica acknowledges ``seq``, wait on."""
        if self.before_degrade is None:
            return
        name = sender.state.name
        self._leaving.add(name)  # from now on no report may list it again
        try:
            while not await self.before_degrade(self.in_sync()):
                log.warning("sync replica %s: its loss could not be recorded: fsync waits on",
                            name)
                with trio.move_on_after(1.0):
                    await sender.wait_acked(seq)
                if sender.state.acked >= seq:
                    return
            self._owes(name, seq)
        finally:
            self._leaving.discard(name)

    def acked(self) -> dict[str, int]:
        """The record each replica has acknowledged (its lag: ``figures.replica_lag``)."""
        return {name: s.state.acked for name, s in self.senders.items()}
