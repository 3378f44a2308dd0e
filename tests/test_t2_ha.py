"""High availability at the level of the volume service: real nodes, a real etcd.

Two or three ``ha.node.Node`` daemons run in this process on their own stores,
each with its own etcd client, its replica server on a loopback port and real
TLS between them, against the session's 3-member etcd cluster with TLS. No FUSE:
the live volume is driven through the volume service, as the mount would. A
primary that dies is replaced within the lease's TTL and a second or two, with
every fsynced write; a primary cut off from etcd shuts its fence before another
node takes the role, and comes back as a replica of the new primary without a
resync. A node whose front end fails to serve gives the role up at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import etcdcluster
import httpx
import pytest
import trio

from cdpfs.errors import Fenced, StoreError
from cdpfs.fs.mutate import init_volume
from cdpfs.ha.cluster import Cluster, NodeSpec, Settings
from cdpfs.ha.etcd import Etcd
from cdpfs.ha.node import Node
from cdpfs.replication import credentials
from cdpfs.replication.receiver import ROLE_REPLICA
from cdpfs.store import epochs, journal
from cdpfs.store.lmdb import Store
from cdpfs.volume import Volume

TTL = 2
INTERVAL = 0.2


def _uuid(path: Path) -> str:
    with Store(path) as store:
        return store.uuid


async def _until(what: str, cond: Callable[[], bool], timeout: float = 30) -> float:
    """Wait (polling every 20 ms) until ``cond()``; the trio time it became true."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.02)
        return trio.current_time()
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def _cluster(tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster, name: str,
                   nodes: tuple[str, ...] = ("a", "b"), mode: str = "sync",
                   checks: tuple[str, ...] = (), scenario: str = "", ttl: int = TTL,
                   fronts: dict[str, dict[str, Any]] | None = None,
                   ) -> AsyncIterator[dict[str, tuple[Node, trio.CancelScope]]]:
    """A cluster ``name`` whose first node holds the volume; every node's daemon
    running (each in a cancel scope of its own: cancelling one is its crash), with
    the front-end callables of ``fronts[node]`` (serve, check, can_serve, ...)."""
    stores = {n: tmp_path / n for n in nodes}
    init_volume(stores[nodes[0]]).close()
    for n, store in stores.items():
        credentials.keygen(store, n)
    async with Etcd(etcd_cluster.endpoints, etcd_cluster.client) as admin:
        cluster = Cluster(admin, name)
        await cluster.create(Settings(_uuid(stores[nodes[0]]), ttl=ttl, interval=INTERVAL,
                                      mode=mode, checks=list(checks), check_timeout=1.0,
                                      scenario=scenario))
        for n, store in stores.items():
            cert = (credentials.tls_dir(store) / "node.crt").read_text()
            await cluster.join(NodeSpec(n, str(store), f"127.0.0.1:{etcdcluster.free_port()}",
                                        cert=cert,
                                        health=f"127.0.0.1:{etcdcluster.free_port()}"))
        running: dict[str, tuple[Node, trio.CancelScope]] = {}
        clients = []
        try:
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    etcd = Etcd(etcd_cluster.endpoints, etcd_cluster.client, timeout=1)
                    clients.append(etcd)
                    node = Node(Cluster(etcd, name), n, **(fronts or {}).get(n, {}))
                    scope = trio.CancelScope()

                    async def run(node: Node = node, scope: trio.CancelScope = scope) -> None:
                        with scope:
                            await node.run()

                    running[n] = (node, scope)
                    nursery.start_soon(run)
                yield running
                nursery.cancel_scope.cancel()
        finally:
            for etcd in clients:
                await etcd.aclose()


async def _health(node: Node, path: str) -> tuple[int, dict]:
    """GET ``path`` from the node's health endpoint: (status, body)."""
    assert node.spec is not None
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://{node.spec.health}{path}", timeout=5)
    return resp.status_code, resp.json()


async def _write(vol: Volume, name: bytes, data: bytes) -> None:
    """Create ``name`` at the root, write ``data``, fsync (acknowledged), close."""
    fs = vol.fs
    assert fs is not None
    fh, _ = await vol.call(fs.create, 1, name, 0o644, os.O_RDWR, 0, 0)
    await vol.write(fh, 0, data)
    await vol.fsync(fh)
    await vol.call(fs.release, fh)


async def _read(vol: Volume, name: bytes) -> bytes:
    fs = vol.fs
    assert fs is not None
    entry = await vol.call(fs.lookup, 1, name)
    fh = await vol.call(fs.open, entry.ino, os.O_RDONLY)
    try:
        return await vol.read(fh, 0, 1 << 20)
    finally:
        await vol.call(fs.release, fh)


def _journal(node: Node) -> tuple[int, list[tuple[int, int]]]:
    vol = node.volume
    assert vol is not None and vol.store is not None
    with vol.store.txn() as txn:
        return journal.last(vol.store, txn)[0], epochs.lineage(vol.store, txn)


async def test_a_replica_takes_over_within_the_ttl_when_the_primary_dies(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster) -> None:
    with trio.fail_after(60):
        async with _cluster(tmp_path, etcd_cluster, "failover") as nodes:
            (a, crash_a), (b, _) = nodes["a"], nodes["b"]
            await _until("a primary", lambda: a.role == "primary" and b.role == "replica")
            assert a.epoch == 1
            assert a.volume is not None
            await _until("b caught up", lambda: b.lag == 0)  # not just known: 1 at first, often
            assert await _health(a, "/primary") == (200, {"role": "primary", "lag": 0})
            assert (await _health(b, "/primary"))[0] == 503
            assert (await _health(b, "/replica?lag=0"))[0] == 200
            assert (await _health(a, "/replica"))[0] == 503
            assert (await _health(a, "/nothing"))[0] == 404
            data = os.urandom(300_000)
            await _write(a.volume, b"acknowledged", data)  # sync mode: on b when it returns
            crashed = trio.current_time()
            crash_a.cancel()  # no lease released: as a SIGKILL leaves it
            took = await _until("b primary", lambda: b.role == "primary") - crashed
            assert TTL * 0.5 < took < TTL + 2.5, f"failover took {took:.1f} s"
            assert b.epoch == 2 and b.volume is not None
            assert await _read(b.volume, b"acknowledged") == data
            top, line = _journal(b)
            assert line[-1] == (2, line[-1][1]) and line[-1][1] <= top + 1
            await _write(b.volume, b"after", b"written by the new primary")
            assert (await _health(b, "/primary"))[0] == 200


async def test_a_primary_cut_off_from_etcd_is_fenced_before_another_takes_over(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster) -> None:
    """The zombie primary: its renewals stop reaching etcd, so it shuts its fence
    before its lease can run out; the replica is promoted only after; the old
    primary, reconnected, follows the new one as a replica without a resync."""
    with trio.fail_after(60):
        async with _cluster(tmp_path, etcd_cluster, "zombie") as nodes:
            (a, _), (b, _) = nodes["a"], nodes["b"]
            await _until("a primary", lambda: a.role == "primary" and b.role == "replica")
            assert a.volume is not None
            await _write(a.volume, b"before", b"x" * 10_000)
            vol = a.volume
            endpoints = a.cluster.etcd.endpoints
            a.cluster.etcd.endpoints = [f"https://127.0.0.1:{etcdcluster.free_port()}"]
            fenced = await _until("a fenced", lambda: not a.fence.is_open())
            with pytest.raises(Fenced):
                await _write(vol, b"zombie write", b"must be refused")
            assert (await _health(a, "/primary"))[0] == 503  # a balancer moves away
            promoted = await _until("b primary", lambda: b.role == "primary")
            assert promoted - fenced > 0.2, "the role moved while the old primary could write"
            a.cluster.etcd.endpoints = endpoints  # the partition heals
            assert b.volume is not None
            await _write(b.volume, b"after", b"written by the new primary")
            await _until("a a replica", lambda: a.role == "replica")
            top_b, line_b = _journal(b)
            await _until("a caught up", lambda: a.volume is not None
                         and a.volume.store is not None and _journal(a)[0] == top_b)
            assert _journal(a)[1] == line_b
            assert a.volume.receiver is not None
            assert a.volume.receiver.counters.records_applied == top_b - line_b[-1][1] + 1


async def test_a_failing_application_check_moves_the_role(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster) -> None:
    """The primary renews only while the application's check passes: when it fails
    on a (here a file the check looks for, per node), b takes over."""
    flags = tmp_path / "flags"
    flags.mkdir()
    check = f'test ! -e {flags}/broken-"$CDPFS_NODE"'
    with trio.fail_after(60):
        async with _cluster(tmp_path, etcd_cluster, "appcheck", checks=(check,)) as nodes:
            (a, _), (b, _) = nodes["a"], nodes["b"]
            await _until("a primary", lambda: a.role == "primary" and b.role == "replica")
            assert a.volume is not None
            await _write(a.volume, b"f", b"before the application failed")
            (flags / "broken-a").touch()
            await _until("b primary", lambda: b.role == "primary")
            assert b.volume is not None
            assert await _read(b.volume, b"f") == b"before the application failed"
            await _until("a a replica", lambda: a.role == "replica")
            await trio.sleep(TTL * 1.5)  # b's own check passes: it keeps the role
            assert b.role == "primary" and a.role == "replica"


async def test_the_scenario_starts_the_application_on_the_primary_only(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster) -> None:
    """The cluster's scenario: every node runs its demote hooks when it starts (what
    a crash left behind goes), the primary its promote hooks, and /primary sends
    clients only once they are done; a failing [[check]] moves the role, the node
    that lost it runs its demote hooks and the new primary its promote hooks."""
    log, flags = tmp_path / "hooks.log", tmp_path / "flags"
    flags.mkdir()
    scenario = f"""
[vars]
LOG = "{log}"
[[check]]
run = 'test ! -e {flags}/broken-"$CDPFS_NODE"'
[[promote]]
run = 'sleep 1; echo "promote $CDPFS_NODE $CDPFS_EPOCH" >> "$LOG"'
[[demote]]
run = 'echo "demote $CDPFS_NODE" >> "$LOG"'
"""

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    with trio.fail_after(60):
        async with _cluster(tmp_path, etcd_cluster, "hooks", scenario=scenario) as nodes:
            (a, _), (b, _) = nodes["a"], nodes["b"]
            await _until("a primary", lambda: a.role == "primary")
            epoch = a.epoch
            assert not any(line.startswith("promote") for line in lines())
            assert (await _health(a, "/primary"))[0] == 503  # the application not up
            await _until("a promoted", lambda: f"promote a {epoch}" in lines())
            assert sorted(lines()[:2]) == ["demote a", "demote b"]
            await _until("/primary", lambda: a.health()[2])
            assert (await _health(a, "/primary"))[0] == 200
            (flags / "broken-a").touch()
            await _until("b promoted", lambda: f"promote b {b.epoch}" in lines())
            assert b.epoch > epoch
            said = lines()
            assert said.index("demote a", 2) < said.index(f"promote b {b.epoch}")
            assert said.count("promote a " + str(epoch)) == 1


async def test_a_sync_replica_is_dropped_only_once_etcd_knows(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster) -> None:
    """When a sync replica stops answering, the primary's fsync stops waiting for it
    only once etcd records that it is no longer in sync (a failover promotes only
    the replicas recorded in sync): a primary that cannot tell etcd never returns
    that fsync, it is fenced first."""
    with trio.fail_after(90):
        async with _cluster(tmp_path, etcd_cluster, "insync", nodes=("a", "b", "c")) as nodes:
            (a, _), (b, b_scope), (c, _) = nodes["a"], nodes["b"], nodes["c"]
            await _until("a primary", lambda: a.role == "primary" and b.role == "replica"
                         and c.role == "replica")
            vol = a.volume
            assert vol is not None and vol.fanout is not None
            vol.fanout.sync_timeout = 1.0
            await _write(vol, b"one", b"on all three")
            await _until("in sync", lambda: vol.fanout is not None
                         and vol.fanout.in_sync() == ["b", "c"])
            b_scope.cancel()  # b crashes
            await _write(vol, b"two", b"on a and c")  # returns once etcd knows
            async with Etcd(etcd_cluster.endpoints, etcd_cluster.client) as etcd:
                states = await Cluster(etcd, "insync").states()
            assert states["a"].role == "primary" and states["a"].synced == ["c"]
            c_scope = nodes["c"][1]
            a.cluster.etcd.endpoints = [f"https://127.0.0.1:{etcdcluster.free_port()}"]
            c_scope.cancel()  # c crashes too, and a cannot tell etcd
            with pytest.raises(Fenced):
                await _write(vol, b"three", b"on a alone: must never be acknowledged")


async def test_a_node_whose_front_end_fails_to_serve_gives_the_role_up_at_once(
        tmp_path: Path, etcd_cluster: etcdcluster.EtcdCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    """b wins the role (a switchover to it) but its front end fails before it serves
    (as a mount on a mount point that changed after the check would): b shuts its
    fence, is a replica again, its store demoted, and revokes its lease, so another
    node holds the role long before the lease could have run out; b says why once
    and runs on, not campaigning again for a while; nothing fsynced is lost."""
    ttl = 6  # a lease left to run out would show: the role moves in well under it
    why = "b.mnt: is not empty (the front end failed, as this test has it)"
    tries = []

    async def fail_to_serve(volume: Volume) -> None:
        tries.append(trio.current_time())
        raise StoreError(why)

    with trio.fail_after(60), caplog.at_level(logging.INFO, "cdpfs.ha"):
        async with _cluster(tmp_path, etcd_cluster, "cannotserve", nodes=("a", "b", "c"),
                            ttl=ttl, fronts={"b": {"serve": fail_to_serve}}) as nodes:
            (a, _), (b, _), (c, _) = nodes["a"], nodes["b"], nodes["c"]
            await _until("a primary", lambda: a.role == "primary" and b.role == "replica"
                         and c.role == "replica")
            assert a.volume is not None and a.volume.fanout is not None
            await _write(a.volume, b"acknowledged", b"fsynced on a")
            fanout = a.volume.fanout
            await _until("in sync", lambda: fanout.in_sync() == ["b", "c"])
            epoch = a.epoch
            await a.cluster.ask("b")  # as 'cdpfs ha switchover b'
            await _until("b tried to serve", lambda: bool(tries))
            moved = await _until("a new primary", lambda: any(
                n.role == "primary" and n.volume is not None for n in (a, c)))
            assert moved - tries[0] < ttl / 2, "b left its lease to run out"
            new = a if a.role == "primary" else c
            assert new.epoch == epoch + 2  # b took one and gave it up
            assert new.volume is not None
            assert await _read(new.volume, b"acknowledged") == b"fsynced on a"
            await _until("b a replica", lambda: b.role == "replica")
            assert b.cannot_serve == why
            await _until("b serving as a replica", lambda: b.volume is not None
                         and b.volume.store is not None)
            store = b.volume.store  # type: ignore[union-attr]
            with store.txn() as txn:
                assert store.config(txn, "role") == ROLE_REPLICA  # demoted
            states = await new.cluster.states()
            assert states["b"].role == "replica" and states["b"].cannot_serve == why
            await trio.sleep(2 * INTERVAL * 5)
            said = [r.getMessage() for r in caplog.records if why in r.getMessage()]
            assert len(said) == 1 and "gives the primary role up" in said[0], said
            assert len(tries) == 1 and b.role == "replica"
