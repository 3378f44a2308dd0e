"""The etcd client and leases against a real 3-member etcd cluster with TLS.

The cluster (``bench/etcdcluster.py``) runs Debian's etcd on loopback with
client-certificate authentication; these tests are what high availability
stands on: a lease held by renewals and lost without them, a role key only one
lease can hold, a deadline that passes before etcd lets the lease go, a member
lost without losing the lease, and a client nobody vouched for refused.
"""

from __future__ import annotations

from pathlib import Path

import etcdcluster
import pytest
import trio

from cdpfs.errors import ClusterError
from cdpfs.ha.etcd import Etcd
from cdpfs.ha.lease import Lease


@pytest.fixture
def cluster(etcd_cluster: etcdcluster.EtcdCluster) -> etcdcluster.EtcdCluster:
    return etcd_cluster


def client(cluster: etcdcluster.EtcdCluster, **kw: object) -> Etcd:
    return Etcd(cluster.endpoints, cluster.client, **kw)  # type: ignore[arg-type]


async def test_a_role_key_is_held_by_one_lease_and_freed_by_its_release(cluster) -> None:
    async with client(cluster) as etcd:
        await etcd.delete("/t/role")
        a = await Lease.grant(etcd, 5)
        b = await Lease.grant(etcd, 5)
        assert await a.claim("/t/role", b"a") is None
        holder = await b.claim("/t/role", b"b")
        assert holder is not None and holder.value == b"a" and holder.lease == a.id
        await a.release()
        assert not a.valid()
        assert await b.claim("/t/role", b"b") is None
        assert (await etcd.get("/t/role")).value == b"b"
        await b.release()
        assert await etcd.get("/t/role") is None


async def test_renewals_keep_a_lease_past_its_ttl(cluster) -> None:
    async with client(cluster) as etcd:
        lease = await Lease.grant(etcd, 2)
        assert await lease.claim("/t/kept", b"x") is None
        for _ in range(8):  # 4 s: twice the TTL
            await trio.sleep(0.5)
            assert await lease.renew()
            assert lease.valid()
        assert (await etcd.get("/t/kept")).value == b"x"
        await lease.release()


async def test_the_deadline_passes_before_etcd_lets_the_lease_go(cluster) -> None:
    """The fencing property: a holder that stops renewing stops acting (valid()
    is False) before any other node could see the role free."""
    async with client(cluster) as etcd:
        await etcd.delete("/t/fence")
        lease = await Lease.grant(etcd, 2)
        assert await lease.claim("/t/fence", b"x") is None
        invalid_at = freed_at = None
        while freed_at is None:
            now = trio.current_time()
            if invalid_at is None and not lease.valid():
                invalid_at = now
            if await etcd.get("/t/fence") is None:
                freed_at = trio.current_time()
                break
            await trio.sleep(0.02)
        assert invalid_at is not None, "the role was free while the holder still thought it valid"
        assert freed_at - invalid_at >= 0.2
        assert not await lease.renew(), "a lease etcd has let go cannot be renewed"
        assert not lease.valid()


async def test_a_stopped_clock_jump_ends_validity_without_a_request() -> None:
    """After a pause (SIGSTOP, a frozen VM) the boot clock has moved on: the holder
    knows before it asks anyone that it may no longer act."""
    now = [100.0]
    lease = Lease(None, 1, ttl=5, sent=now[0], clock=lambda: now[0])  # type: ignore[arg-type]
    assert lease.valid() and 4.0 < lease.left() <= 5.0
    now[0] += 4.5
    assert not lease.valid()


async def test_a_watch_sees_puts_and_deletes(cluster) -> None:
    async with client(cluster) as etcd:
        await etcd.delete("/t/w/", prefix=True)
        seen = []
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for events in etcd.watch("/t/w/"):
                    seen.extend((e.deleted, e.kv.key, e.kv.value) for e in events)
                    if len(seen) >= 2:
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await trio.sleep(0.3)
            await etcd.put("/t/w/a", b"1")
            await etcd.delete("/t/w/a")
            with trio.fail_after(10):
                await trio.sleep_forever()
        assert seen == [(False, "/t/w/a", b"1"), (True, "/t/w/a", b"")]


async def test_a_lease_outlives_the_loss_of_one_member(cluster) -> None:
    async with client(cluster) as etcd:
        lease = await Lease.grant(etcd, 3)
        assert await lease.claim("/t/member", b"x") is None
        cluster.stop(0)  # the member the client talks to first
        try:
            for _ in range(10):  # 5 s: longer than the TTL
                await trio.sleep(0.5)
                assert await lease.renew()
            assert (await etcd.get("/t/member")).value == b"x"
            assert etcd.endpoints[etcd._first] != cluster.members[0].endpoint
        finally:
            # on this thread: the member dies with the thread that started it
            cluster.start_member(0)
        await lease.release()


async def test_a_client_nobody_vouched_for_is_refused(cluster) -> None:
    async with Etcd(cluster.endpoints, cluster.stranger, timeout=2) as etcd:
        with pytest.raises(ClusterError) as info:
            await etcd.get("/t/anything")
    message = str(info.value)
    assert "\n" not in message and "no etcd member answered" in message


async def test_no_member_answering_is_one_line(tmp_path: Path, cluster) -> None:
    dead = [f"https://127.0.0.1:{etcdcluster.free_port()}" for _ in range(3)]
    with trio.fail_after(10):
        async with Etcd(dead, cluster.client, timeout=1) as etcd:
            with pytest.raises(ClusterError) as info:
                await Lease.grant(etcd, 5)
    assert "\n" not in str(info.value)
