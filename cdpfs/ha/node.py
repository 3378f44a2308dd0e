"""One node of a cluster: a replica until it wins the primary role, the primary while
it holds the role's lease, and a replica again once it has lost it.

As a **replica** the node serves its store to the primary (``Volume`` in replica
mode: the receiver on the node's address) and waits for the ``primary`` key to go
(a watch on etcd). When it has gone, a node may campaign if its store exists
and is caught up: in sync mode at least as far as every other replica reported,
in async mode also within ``max_lag`` records of what the primary last reported.
It takes a new lease and a new epoch and claims the key; one node wins.

The winner, as **primary**, makes its store the live one of the new epoch
(``epochs.begin``: no record of this epoch can be mistaken for one of another),
registers the other nodes as its replicas, serves the volume live with a
``Fence`` open until the lease's deadline, and then, every ``interval``, checks
that the store commits, that the front end's own check passes and that every
application check of the cluster's settings (a command: ``pg_isready``, a TCP
connect, a file read) exits 0 in time, and only then renews the lease and moves
the fence's deadline on. A check that fails, a renewal that does not reach etcd,
or a pause longer than the deadline leaves the lease to run out: the fence shuts
first (the deadline is earlier than etcd's expiry) and the volume goes on
serving reads, refusing every change, until etcd answers again and shows the
role taken by another node or free; then the volume stops, the store is marked a
replica again and the node goes back to waiting. A node that finds the key gone
never waits for an old lease: etcd removed the key only once that lease had
expired, and its holder's fence had shut before.

The front end (FUSE) takes part through ``serve``: called with the live volume
when the node becomes primary, it mounts it and runs until cancelled. A node
whose front end cannot serve never holds the role: as a replica it asks the
front end's ``can_serve`` (is the mount point an empty directory with nothing
mounted on it?) before it campaigns and every interval, does not campaign while
the answer is a reason, and reports that reason; if ``serve`` fails all the same
before it served (the mount point changed after the check, FUSE refused), the
new primary gives the role up at once (nothing was served, so nothing was
acknowledged: no drain), demoted and with its lease revoked, and holds back from
campaigning for a while that grows with each such failure. Each reason is logged
once, and once more when it clears.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from ..api.server import ApiOptions, serve_api
from ..errors import CdpfsError, ClusterError
from ..events import Events
from ..figures import cluster_lag
from ..replication import credentials
from ..replication.fanout import Connector, tls_connector
from ..scenario import Scenario
from ..store import epochs, journal
from ..store.lmdb import is_store
from ..system import boot_clock
from ..volume import Mode, Volume
from . import roles
from .cluster import Cluster, NodeSpec, NodeState, Primary, Settings
from .fence import Fence
from .handover import hand_over
from .lease import Lease

log = logging.getLogger(__name__)

Serve = Callable[[Volume], Awaitable[None]]
# Why the front end could not serve the volume now (None: it could). Cheap: a
# replica asks it every interval.
CanServe = Callable[[], Awaitable[str | None]]
HOLD_OFF_MAX = 300.0  # seconds at most a node whose serve failed stays out of campaigns


class Node:
    """The daemon of node ``name`` of ``cluster`` (``run`` in a nursery).

    Attributes:
        role: "starting", "replica", "primary" or "fenced".
        epoch: the epoch it is primary in (0 when it is not).
        volume: the volume it serves now (a replica or the live volume).
        fence: what the live volume's changes ask.
        changed: set (and replaced) whenever the role changes.
        cannot_serve: why the front end cannot serve the volume now (None: it can);
            while it is set, the node does not campaign.
    """

    def __init__(self, cluster: Cluster, name: str, *, serve: Serve | None = None,
                 check: Callable[[], Awaitable[bool]] | None = None,
                 drain: Callable[[], Awaitable[None]] | None = None,
                 can_serve: CanServe | None = None,
                 connector: Connector = tls_connector,
                 clock: Callable[[], float] = boot_clock,
                 api: ApiOptions | None = None) -> None:
        self.cluster = cluster
        self.name = name
        # how to serve the node API (None, or no address: on the address it joined with)
        self.api = api
        self.promotions = 0  # times it became primary
        self.actions = {"switchover": self._switchover}  # the node API's
        self.serve = serve
        self.check = check
        self.drain = drain  # the front end hands in what the kernel still holds
        self.can_serve = can_serve
        self.connector = connector
        self.clock = clock
        self.role = "starting"
        self.epoch = 0
        self.volume: Volume | None = None
        self.events = Events()  # of this node, whichever volume it serves
        self.fence = Fence(clock=clock)
        self.changed = trio.Event()
        self.spec: NodeSpec | None = None
        self.settings: Settings | None = None
        self._stopping = trio.Event()
        self._nudged = trio.Event()  # a primary's hold loop looks again at once
        self._report_lock = trio.Lock()
        self.lag: int | None = None  # records behind the newest position reported
        self._handing_over = False  # a switchover asked this primary to give the role up
        self.last_primary: Primary | None = None  # who held the role before this node
        self._served = trio.Event()  # the front end serves the live volume
        self.ready: bool | None = None  # the promote hooks passed (None: not yet run)
        self.scenario = Scenario("none")
        self.cannot_serve: str | None = None
        self._said: str | None = None  # the reason not to serve logged last
        self._failed: str | None = None  # why serve failed last, before it served
        self._failed_until = 0.0  # ... and until when (clock) that holds the node back
        self._failures = 0  # such failures in a row
        self._gave_up = False  # serve failed: this primary gives the role up
        self._did_serve = False  # the front end served in this term as primary

    def _set_role(self, role: str) -> None:
        if role != self.role:
            log.info("node %s: %s -> %s%s", self.name, self.role, role,
                     f" (epoch {self.epoch})" if role == "primary" else "")
            self.events.emit("role", node=self.name, role=role, was=self.role,
                             epoch=self.epoch)
            if role == "primary" and self.role != "fenced":
                self.promotions += 1
        self.role = role
        self.changed.set()
        self.changed = trio.Event()

    def stop(self) -> None:
        """A planned stop: a primary drains (every change committed and on the sync
        replicas, then refused), unmounts and hands the role on at once; ``run``
        returns once that is done."""
        self._stopping.set()
        self._nudged.set()

    @property
    def store_path(self) -> Path:
        assert self.spec is not None
        return Path(self.spec.store)

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        self.settings = await self.cluster.settings()
        self.spec = await self.cluster.node(self.name)
        self.scenario = self.settings.hooks(self.name, self.spec.vars)
        nodes = await self.cluster.nodes()
        await trio.to_thread.run_sync(self._trust, nodes)
        async with trio.open_nursery() as nursery:
            api = self.api
            if api is None or not api.address:  # on the address the node joined with
                api = replace(api or ApiOptions(""), address=self.spec.health) \
                    if self.spec.health else None
            if api is not None:
                await nursery.start(serve_api, api, self)
            task_status.started(self)
            await self._hooks("demote")  # whatever a crash left running or configured
            while not self._stopping.is_set():
                won = await self._as_replica()
                if won is None:
                    break
                lease, epoch = won
                try:
                    nodes = await self.cluster.nodes()  # a node may have joined meanwhile
                except ClusterError as exc:
                    log.warning("node %s: the nodes as they were: %s", self.name, exc)
                await trio.to_thread.run_sync(self._trust, nodes)
                await self._as_primary(lease, epoch, nodes)
            nursery.cancel_scope.cancel()

    @property
    def serving(self) -> bool:
        """The front end serves the live volume (it sets this once its mount is up)."""
        return self._served.is_set()

    @serving.setter
    def serving(self, value: bool) -> None:
        if value:
            self._served.set()
            self._did_serve = True
            self._failed, self._failures, self._said = None, 0, None
        elif self._served.is_set():
            self._served = trio.Event()

    def health(self) -> tuple[str, int | None, bool]:
        """What the health endpoint tells: role, lag in records, and whether it takes
        writes now (the fence open, the front end serving and the promote hooks
        done: a client sent here before the mount is there would write into the
        empty mount point, one sent before the application started would fail)."""
        return self.role, self.lag, self.fence.is_open() and self.serving and bool(self.ready)

    def about(self) -> dict[str, Any]:
        """What the node API's ``/api/v1/node`` tells of this node."""
        volume = self.volume
        return {"kind": "ha node", "name": self.name, "role": self.role,
                "epoch": self.epoch, "lag": self.lag, "writable": self.health()[2],
                "lease_left_seconds": round(max(0.0, self.fence.until - self.clock()), 3)
                if self.fence.is_open() else 0.0,
                "promotions": self.promotions, "cannot_serve": self.cannot_serve,
                "last_primary": None if self.last_primary is None
                else {"node": self.last_primary.node, "epoch": self.last_primary.epoch},
                "store": None if volume is None else str(volume.path),
                "mode": None if volume is None else volume.mode.value,
                "degraded": sorted(volume.fanout.degraded)
                if volume is not None and volume.fanout is not None else [],
                "events_run": self.events.run, "events_last_id": self.events.last_id}

    async def _switchover(self, body: dict[str, Any], caller: Any) -> dict[str, Any]:
        """The node API's switchover: ``{"node": NAME, "timeout": SECONDS}``."""
        target, timeout = body.get("node"), body.get("timeout", 30)
        if not isinstance(target, str) or not isinstance(timeout, int | float) \
                or not 0 < timeout <= 300:
            raise ClusterError("node: the node to hand the role to; timeout: 1 to 300 s")
        took = await hand_over(self.cluster, target, False, float(timeout))
        self.events.emit("switchover", node=target, caller=getattr(caller, "name", ""),
                         seconds=round(took, 3))
        return {"primary": target, "seconds": round(took, 3)}

    def _trust(self, nodes: dict[str, NodeSpec]) -> None:
        """Trust the certificate of every other node, as the cluster lists them."""
        for other in nodes.values():
            if other.name != self.name and other.cert:
                credentials.trust_pem(self.store_path, other.cert.encode(), other.name,
                                      f"node {other.name}'s certificate")

    # --- replica ------------------------------------------------------------------------

    async def _cancel_on_stop(self, scope: trio.CancelScope) -> None:
        await self._stopping.wait()
        scope.cancel()

    async def _as_replica(self) -> tuple[Lease, int] | None:
        assert self.spec is not None
        if is_store(self.store_path):
            # A primary that crashed left its role and its replicas in the store: as
            # a replica it must not ship to them (it would make itself their primary).
            await trio.to_thread.run_sync(self._demote)
        ctx = await trio.to_thread.run_sync(credentials.server_context, self.store_path)
        volume = Volume(self.store_path, Mode.REPLICA, listen=self.spec.address,
                        server_ctx=ctx, connector=self.connector, owner="ha replica",
                        failback=True, events=self.events)
        async with trio.open_nursery() as nursery:
            self.volume = await nursery.start(volume.run)
            self.epoch = 0
            self._set_role("replica")
            nursery.start_soon(self._report_loop)
            nursery.start_soon(self._cancel_on_stop, nursery.cancel_scope)
            won = await self._campaign()
            nursery.cancel_scope.cancel()
        self.volume = None
        return None if self._stopping.is_set() else won

    def _position(self) -> tuple[int, int] | None:
        """(newest seq, newest epoch seen) of this node's store; None without one."""
        if not is_store(self.store_path):
            return None
        volume = self.volume
        store = volume.store if volume is not None else None
        if store is None:
            return None
        with store.txn() as txn:
            return journal.last(store, txn)[0], epochs.seen(store, txn)

    async def _check_serve(self) -> str | None:
        """Why this node cannot serve the volume now (None: it can), kept in
        ``cannot_serve``: the front end's answer, else a failed serve that still
        holds the node back. A reason is logged once, and once when it clears."""
        reason = await self.can_serve() if self.can_serve is not None else None
        if reason is not None and reason == self._failed:
            self._failed = None  # the check sees it now, and will see it clear
        if reason is None and self._failed is not None and self.clock() < self._failed_until:
            reason = self._failed
        if reason is not None and reason != self._said:
            log.warning("node %s: cannot serve the volume, so it does not campaign for the "
                        "primary role: %s", self.name, reason)
            self._said = reason
        elif reason is None and self._said is not None and self._failed is None:
            log.info("node %s: can serve the volume again: it campaigns when the role is "
                        "free", self.name)
            self._said = None
        self.cannot_serve = reason
        return reason

    async def _request(self) -> dict[str, Any] | None:
        """The standing hand-over request, unless it names another node that reports
        it cannot serve: that one does not campaign, so obeying it would leave the
        role free until the request ran out."""
        request = await self.cluster.request()
        if request is None or request["node"] == self.name:
            return request
        target = (await self.cluster.states()).get(request["node"])
        return None if target is not None and target.cannot_serve else request

    async def _eligible(self, last: Primary | None) -> int | None:
        """The epoch this node's store has seen, if it may campaign now; else None."""
        assert self.settings is not None
        pos = self._position()
        if pos is None:
            return None
        seq, seen = pos
        request = await self._request()
        if request is not None:
            if request["node"] != self.name:
                return None  # the role is being handed to another node
            if request.get("force"):
                return seen  # promoted by hand, lag or not
        states = await self.cluster.states()
        for name, state in states.items():
            if name == self.name:
                continue
            if state.role in ("primary", "fenced", "stopped") or (
                    last is not None and name == last.node):
                if self.settings.mode == "async" and seq < state.seq - self.settings.max_lag:
                    return None  # the old primary's last report: more than max_lag ahead
                if (self.settings.mode == "sync" and state.synced is not None
                        and self.name not in state.synced):
                    return None  # fsyncs may have returned without this node
                continue  # sync: every acknowledged write is here already
            if state.role == "replica" and state.seq > seq and not state.cannot_serve:
                return None  # another replica has more: it should win (if it can serve)
        return seen

    async def _campaign(self) -> tuple[Lease, int]:
        """Wait until the role is free and this node wins it."""
        assert self.settings is not None
        last: Primary | None = None
        while True:
            try:
                # asked before the key is read: nothing slow between reading it free
                # and reading the request (a winner clears its request once it holds
                # the key; a node reading in between campaigns in vain, using an epoch)
                unfit = await self._check_serve()
                holder = await self.cluster.primary()
                if holder is not None:
                    last = self.last_primary = holder
                    await self._wait_gone(holder)
                    continue
                seen = None if unfit else await self._eligible(last)
                if seen is not None:
                    lease = await Lease.grant(self.cluster.etcd, self.settings.ttl, self.clock)
                    epoch = await self.cluster.next_epoch(seen)
                    body = json.dumps({"node": self.name, "epoch": epoch}).encode()
                    if await lease.claim(self.cluster.key("primary"), body) is None:
                        request = await self.cluster.request()
                        if request is not None and request["node"] == self.name:
                            await self.cluster.clear_request()
                        return lease, epoch
                    await lease.release()
            except ClusterError as exc:
                log.warning("node %s: %s", self.name, exc)
            await trio.sleep(self.settings.interval)

    async def _wait_gone(self, holder: Primary) -> None:
        """Return once the primary key has changed or gone (or after a while, to look
        again: a watch may end with its etcd member)."""
        assert self.settings is not None
        with trio.move_on_after(max(5.0, self.settings.ttl)):
            async for events in self.cluster.etcd.watch(self.cluster.key("primary"),
                                                       holder.revision + 1):
                if events:
                    return

    async def _report_loop(self) -> None:
        assert self.settings is not None
        while True:
            if self.role == "replica":
                await self._check_serve()
            try:
                await self._report()
            except ClusterError as exc:
                log.warning("node %s: report: %s", self.name, exc)
            await trio.sleep(self.settings.interval)

    def _synced(self) -> list[str] | None:
        volume = self.volume
        if self.role not in ("primary", "fenced") or volume is None or volume.fanout is None:
            return None
        return volume.fanout.in_sync()

    async def _report(self, role: str | None = None, synced: list[str] | None = None) -> None:
        """Report this node's state (as ``role``: a replica's has no in-sync list);
        one report at a time, its in-sync list taken under the lock, so an older
        list never lands after a newer one."""
        async with self._report_lock:
            pos = self._position()
            seq = pos[0] if pos else 0
            if synced is None and role in (None, "primary", "fenced"):
                synced = self._synced()
            await self.cluster.report(self.name, NodeState(
                role or self.role, self.epoch, seq, synced=synced,
                cannot_serve=self.cannot_serve))
        if self.role == "primary":
            self.lag = 0
        else:
            seqs = {n: s.seq for n, s in (await self.cluster.states()).items()}
            self.lag = cluster_lag({**seqs, self.name: seq})[self.name] if pos else None

    # --- primary ------------------------------------------------------------------------

    def _promote(self, epoch: int, nodes: dict[str, NodeSpec]) -> None:
        """Make the store the live one of ``epoch``, shipping to every other node."""
        assert self.settings is not None
        mode = self.settings.mode
        roles.promote(self.store_path, epoch, [(o.name, o.address, mode)
                                               for o in nodes.values() if o.name != self.name])

    def _demote(self) -> None:
        """The store is a replica again: no mount takes it live, it ships nowhere."""
        roles.demote(self.store_path)

    async def _as_primary(self, lease: Lease, epoch: int, nodes: dict[str, NodeSpec]) -> None:
        self.epoch = epoch
        self._gave_up = self._did_serve = False
        self.cannot_serve = None  # it could when it campaigned
        try:
            await trio.to_thread.run_sync(self._promote, epoch, nodes)
            self.fence.open_until(lease.valid_until)
            volume = Volume(self.store_path, Mode.LIVE, gate=self.fence.check,
                            connector=self.connector, owner="ha primary",
                            events=self.events)
            async with trio.open_nursery() as nursery:
                self.volume = await nursery.start(volume.run)
                if volume.fanout is not None and self.last_primary is not None:
                    # The node that lost the role is not waited for by fsync until it
                    # has rejoined and caught up: it cannot answer now.
                    top = self._position()
                    volume.fanout.degrade(self.last_primary.node, top[0] if top else 0)
                if volume.fanout is not None:
                    volume.fanout.before_degrade = self._record_in_sync
                self._set_role("primary")
                nursery.start_soon(self._report_loop)
                if self.serve is not None:
                    nursery.start_soon(self._serve, volume)  # it sets ``serving``
                else:
                    self.serving = True
                self._handing_over = False
                nursery.start_soon(self._promote_hooks)
                nursery.start_soon(self._watch_requests)
                await self._hold(lease, volume)
                if self._gave_up:
                    # Nothing was served, so nothing acknowledged: no drain, and no
                    # demote hooks (the promote hooks wait for the front end). The
                    # report goes before the lease, so the next node's campaign
                    # reads this one as a replica, not as a primary that had no
                    # replica in sync.
                    self.fence.shut("this node cannot serve the volume")
                    try:
                        await self._report("replica")
                    except ClusterError as exc:
                        log.warning("node %s: report: %s", self.name, exc)
                elif self._stopping.is_set() or self._handing_over:
                    await self._hooks("demote")  # the application stops, then the drain
                    await self._drain(volume)
                else:
                    self.fence.shut("this node lost the primary role's lease")
                    self._set_role("fenced")
                    await self._hooks("demote")
                    await self._until_replaced()  # reads go on meanwhile
                nursery.cancel_scope.cancel()
        except BaseException:
            self.fence.shut("this node stopped")  # a crash: the lease runs out
            raise
        finally:
            self.volume = None
            self.serving = False
            self.ready = None
        await trio.to_thread.run_sync(self._demote)
        if self._stopping.is_set() or self._handing_over or self._gave_up:
            try:
                await lease.release()  # committed, unmounted: the role goes at once
                log.info("node %s: the primary role is handed on", self.name)
            except ClusterError as exc:
                log.warning("node %s: the role goes when the lease runs out: %s", self.name,
                            exc)

    async def _serve(self, volume: Volume) -> None:
        """The front end serves ``volume``. If it fails before it served, this node
        gives the role up at once (``_hold`` returns) and stays out of campaigns for
        a while, twice the TTL and twice that at each failure in a row: another
        node takes the role meanwhile, and with none this one tries again slowly."""
        assert self.serve is not None and self.settings is not None
        try:
            await self.serve(volume)
        except Exception as exc:
            if self._did_serve:
                raise  # it served: a crash as before, the lease runs out
            reason = str(exc) or type(exc).__name__
            log.debug("node %s: the front end failed", self.name, exc_info=True)
            self._failures += 1
            hold_off = min(HOLD_OFF_MAX,
                           2.0 * self.settings.ttl * 2 ** min(self._failures - 1, 16))
            self._failed, self._failed_until = reason, self.clock() + hold_off
            self.cannot_serve = reason
            if reason != self._said:
                log.warning("node %s: cannot serve the volume, so it gives the primary role "
                            "up and does not campaign for it while this lasts: %s",
                            self.name, reason)
                self._said = reason
            self._gave_up = True
            self._nudged.set()

    async def _drain(self, volume: Volume) -> None:
        """Before a planned hand-over: what the kernel holds comes in, every change is
        committed and on every replica (async ones too, within twice the TTL), and
        from then on changes are refused."""
        assert self.settings is not None and volume.fs is not None
        with trio.move_on_after(self.settings.ttl * 2):
            if self.drain is not None:
                await self.drain()
            self.fence.shut("this node is handing the primary role on")
            seq = await volume.call(volume.fs.sync, durable=True)
            if volume.fanout is not None:
                await volume.fanout.synced(seq)
                for sender in list(volume.fanout.senders.values()):  # async ones too
                    await sender.wait_acked(seq)
        self.fence.shut("this node is handing the primary role on")
        if volume.fanout is not None:  # who has every change, for the next one's campaign
            pos = self._position()
            seq = pos[0] if pos else 0
            synced = sorted(n for n, s in volume.fanout.senders.items() if s.state.acked >= seq)
            try:
                await self._report("stopped", synced)
            except ClusterError as exc:
                log.warning("node %s: final report: %s", self.name, exc)

    async def _record_in_sync(self, synced: list[str]) -> bool:
        """Record in etcd, before an fsync returns without a sync replica, the ones it
        is on: a failover promotes only those (see ``Fanout.before_degrade``). Once
        the fence has shut, the fsync waiting for this fails (EROFS)."""
        assert self.settings is not None
        self.fence.check()
        try:
            with trio.fail_after(self.settings.ttl):
                await self._report(synced=synced)  # ``synced`` excludes the leaving one
            return True
        except (ClusterError, trio.TooSlowError) as exc:
            log.warning("node %s: could not record the sync replicas: %s", self.name, exc)
            return False

    # --- the scenario's hooks -------------------------------------------------------------

    def _hook_env(self) -> dict[str, str]:
        assert self.spec is not None
        return {"CDPFS_CLUSTER": self.cluster.name, "CDPFS_NODE": self.name,
                "CDPFS_STORE": self.spec.store, "CDPFS_MOUNT": self.spec.mount,
                "CDPFS_ADDRESS": self.spec.address.rpartition(":")[0],
                "CDPFS_EPOCH": str(self.epoch)}

    def _hook_dir(self) -> Path | None:
        """The mount point while the front end serves it (never a stat of it here: this
        thread answers the mount's requests)."""
        assert self.spec is not None
        return Path(self.spec.mount) if self.spec.mount and self.serving else None

    async def _hooks(self, phase: str) -> bool:
        """Run the scenario's ``phase`` commands; False (logged) if one failed."""
        if not self.scenario.steps(phase):
            return True
        try:
            await self.scenario.arun(phase, self._hook_dir(), self._hook_env())
            return True
        except CdpfsError as exc:
            log.warning("node %s: %s", self.name, exc)
            return False

    async def _promote_hooks(self) -> None:
        """Once the front end serves the volume: the promote hooks (the application
        starts, a virtual IP moves); only then does /primary send clients. One that
        fails leaves the lease to run out, as a failing check does."""
        await self._served.wait()
        self.ready = await self._hooks("promote")

    async def _until_replaced(self) -> None:
        """Return once etcd can be asked again and the role is another node's or free:
        until then the fenced volume goes on serving reads."""
        assert self.settings is not None
        while True:
            try:
                holder = await self.cluster.primary()
                if holder is None or holder.node != self.name:
                    return
            except ClusterError as exc:
                log.info("node %s: fenced, etcd not reachable: %s", self.name, exc)
            await trio.sleep(self.settings.interval)

    async def _hold(self, lease: Lease, volume: Volume) -> None:
        """Renew the lease while the checks pass; return once it has been lost.

        A renewal that does not reach etcd before the lease's deadline leaves the
        fence shut (``fenced``: reads go on, changes are refused) but the node goes
        on trying: if etcd then shows the lease alive and the role still this
        node's, no other node can have held it, and the node resumes (an etcd
        leader election can take longer than a short TTL's margin). It returns
        when etcd says the lease is gone, or when a check fails past the deadline.
        """
        assert self.settings is not None and volume.fs is not None
        fs = volume.fs
        while True:
            with trio.move_on_after(min(self.settings.interval, max(0.0, lease.left() / 2))):
                await self._nudged.wait()
            if self._stopping.is_set() or self._gave_up:
                return
            if self._nudged.is_set():
                self._nudged = trio.Event()
            fenced = not lease.valid()
            if fenced and self.role == "primary":
                log.warning("node %s: the lease's deadline passed: fenced until etcd shows "
                            "the lease still held", self.name)
                self.fence.shut("this node could not renew the primary role's lease in time")
                self._set_role("fenced")
            budget = self.settings.ttl if fenced else max(0.05, lease.left())
            healthy = False
            with trio.move_on_after(budget):
                await volume.call(fs.sync, durable=True)  # the store commits
                # while the promote hooks run, the application is starting: only the
                # store and the front end are checked
                healthy = (self.ready is not False
                           and (self.check is None or await self.check())
                           and (self.ready is None or await self._hooks("check")))
            if not healthy:
                log.warning("node %s: a check failed: the lease is left to run out", self.name)
                if fenced:
                    return
                continue
            try:
                with trio.fail_after(budget):
                    if not await lease.renew():
                        log.warning("node %s: etcd let the lease go: fenced", self.name)
                        return
                    if fenced and not await self._still_holder(lease):
                        return
            except (ClusterError, trio.TooSlowError) as exc:
                log.warning("node %s: renewal failed: %s", self.name,
                            exc or f"no answer in {budget:.1f} s")
                continue
            self.fence.open_until(lease.valid_until)
            if fenced:
                log.warning("node %s: etcd shows the lease still held: writes resume", self.name)
                self._set_role("primary")
            try:
                request = await self._request()
            except ClusterError:
                continue
            if request is not None and request["node"] != self.name:
                log.info("node %s: asked to hand the role to %s", self.name, request["node"])
                self._handing_over = True
                return

    async def _watch_requests(self) -> None:
        """Wake the hold loop when a hand-over is asked for: a switchover then waits
        for one renewal, not for the next interval."""
        assert self.settings is not None
        while True:
            try:
                async for events in self.cluster.etcd.watch(self.cluster.key("request")):
                    if any(not e.deleted for e in events):
                        self._nudged.set()
            except ClusterError as exc:
                log.info("node %s: watching for hand-over requests: %s", self.name, exc)
            await trio.sleep(self.settings.interval)

    async def _still_holder(self, lease: Lease) -> bool:
        holder = await self.cluster.primary()
        return holder is not None and holder.node == self.name and holder.lease == lease.id
