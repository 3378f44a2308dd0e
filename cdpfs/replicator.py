"""Replication from a running mount: one shipper per registered replica, and sync mode.

The mount starts a ``Replicator`` beside its FUSE loop. It ships to every replica
registered in the store (``cdpfs replica add``), picking up new ones as they are
added (except ``manual`` ones, fed only by ``cdpfs replicate``), each in
``async`` mode (writes never wait: records queue in the journal, on disk, while
a replica is slow or away) or ``sync`` mode (an fsync returns only once every
sync replica has acknowledged everything committed before it).
A sync replica that does not answer within ``config.sync_timeout`` seconds is
reported and, by ``config.sync_dead`` ("degrade", the default, or "block"),
either stops being waited for until it catches up or keeps fsync waiting.
"""

from __future__ import annotations

import logging
import time

import trio

from . import credentials
from .errors import CdpfsError
from .replicas import load_states
from .shipper import Shipper
from .store import Store

log = logging.getLogger(__name__)


class Replicator:
    """The shippers of one mounted store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.shippers: dict[str, Shipper] = {}
        self.degraded: set[str] = set()
        self.sync_timeout = 10.0
        self.block_when_dead = False
        # Known before the mount serves its first request, so an fsync in the first
        # moments already waits for the sync replicas.
        self._new = self._discover()

    def _discover(self) -> list[Shipper]:
        """Shippers for the replicas registered since the last look (and settings)."""
        self._load_config()
        found = []
        for state in load_states(self.store):
            if state.mode == "manual":  # shipped only by 'cdpfs replicate'
                continue
            if state.name in self.shippers:  # settings may change while it runs
                current = self.shippers[state.name].state
                current.mode, current.limit = state.mode, state.limit
                continue
            try:
                ctx = credentials.client_context(self.store.path, state.name)
            except CdpfsError as exc:
                log.error("cannot ship to replica %s: %s", state.name, exc)
                continue
            shipper = self.shippers[state.name] = Shipper(self.store, state.name,
                                                          state.address, ctx)
            found.append(shipper)
        return found

    async def run(self, check_every: float = 2.0) -> None:
        """Run a shipper for each registered replica, now and as they are added."""
        async with trio.open_nursery() as nursery:
            while True:
                for shipper in self._new:
                    log.info("shipping to replica %s at %s (%s)", shipper.state.name,
                             shipper.state.address, shipper.state.mode)
                    nursery.start_soon(self._ship, shipper)
                await trio.sleep(check_every)
                self._new = await trio.to_thread.run_sync(self._discover)

    def _load_config(self) -> None:
        with self.store.txn() as txn:
            self.sync_timeout = float(self.store.config(txn, "sync_timeout") or 10.0)
            self.block_when_dead = self.store.config(txn, "sync_dead") == "block"

    async def _ship(self, shipper: Shipper) -> None:
        try:
            await shipper.run(follow=True, attempts=0)
        except CdpfsError as exc:  # refused, or the journal it needs is gone
            log.error("replication to %s stopped: %s", shipper.state.name, exc)

    def committed(self) -> None:
        """New records are committed: wake the shippers."""
        for shipper in self.shippers.values():
            shipper.poke()

    async def synced(self, seq: int) -> None:
        """Return once every sync replica has acknowledged ``seq`` (see the module doc)."""
        waiting = [s for s in self.shippers.values()
                   if s.state.mode == "sync" and s.state.acked < seq]
        if not waiting:
            return
        self.committed()
        deadline = time.monotonic() + self.sync_timeout
        for shipper in waiting:
            name = shipper.state.name
            if name in self.degraded and not self.block_when_dead:
                if shipper.state.acked >= seq:
                    self.degraded.discard(name)
                    log.warning("sync replica %s caught up: fsync waits for it again", name)
                continue
            while shipper.state.acked < seq:
                if time.monotonic() > deadline and not self.block_when_dead:
                    self.degraded.add(name)
                    log.warning("sync replica %s did not acknowledge #%d within %.0fs (%s): "
                                "fsync no longer waits for it until it catches up", name, seq,
                                self.sync_timeout, shipper.state.last_error or "no answer")
                    break
                await trio.sleep(0.002)
