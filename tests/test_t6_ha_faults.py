"""Failover under faults: three hosts in network namespaces, a 3-member etcd, a writer.

Each node (``cdpfs ha run``) runs in a network namespace of its own joined to a
bridge (``bench/hanet.py``); etcd's three members listen on the bridge's address in
the root namespace, as dedicated etcd hosts would. A writer in the root namespace
writes and fsyncs a numbered file every 20 ms through whichever node's ``/primary``
answers 200, all the time. Faults hit the primary: SIGKILL of its daemon (its
mount dies with it), SIGSTOP for twice the TTL, a partition from everything, an
asymmetric partition (it reaches etcd but no other node), the loss of one etcd
member (no failover may happen), a restart of the whole cluster. After each the
cluster must settle: one primary, the two others replicas back in sync.

The checker, at the end: no acknowledged write is missing (sync mode); every store
shows one lineage of epochs, each starting after the one before (no two primaries
wrote in one range); no node was resynced in full after a rejoin; all three stores
hold the same tree (``verify --compare``).

PostgreSQL runs on the volume through the shipped scenario (its promote steps
start it on the new primary and move a virtual IP, its demote steps stop it),
with pgbench and a stream of single-row commits through ``/primary``, while the
primary's host crashes, the role is switched over and the primary is cut off.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from etcdcluster import EtcdCluster
from hacluster import HaNodes, Writer, mounted, writable
from hanet import Net
from harness import Procs, can_make_netns, can_mount, cdpfs, force_unmount, wait_until

from cdpfs.store import epochs
from cdpfs.store.lmdb import Store

pytestmark = pytest.mark.skipif(not (can_mount() and can_make_netns()),
                                reason="needs FUSE and network namespaces (root)")

HOSTS = ("a", "b", "c")
TTL = 2
FAULTS = int(os.environ.get("CDPFS_HA_FAULTS", "20"))


class Faults:
    """The cluster, the writer, and the faults applied to it."""

    def __init__(self, base: Path, procs: Procs) -> None:
        self.net = Net(HOSTS)
        self.etcd = EtcdCluster(base / "etcd", ip=self.net.gateway)
        self.nodes: HaNodes | None = None
        self.writer: Writer | None = None
        self.done: list[str] = []
        try:
            self.etcd.start()
            self.nodes = HaNodes(base, self.etcd, procs, names=HOSTS, ttl=TTL, net=self.net,
                                 cluster="faults")
            for n in HOSTS:
                self.nodes.start(n)
            self.settle()
            self.writer = Writer(self.nodes).start()
        except BaseException:
            self.close()
            raise

    # --- the cluster's state ----------------------------------------------------------

    def primary(self) -> tuple[str, int] | None:
        assert self.nodes is not None
        status = self.nodes.status()
        return (status["primary"], status["epoch"]) if status["primary"] else None

    def settled(self) -> bool:
        """One primary that takes writes, every other node a replica it has in sync."""
        assert self.nodes is not None
        status = self.nodes.status()
        p = status["primary"]
        if p is None or status["nodes"][p].get("role") != "primary":
            return False
        others = [n for n in HOSTS if n != p]
        if any(status["nodes"][n].get("role") != "replica" for n in others):
            return False
        if sorted(status["nodes"][p].get("synced") or []) != others:
            return False
        return self.writer is None or self._writable() == p

    def _writable(self) -> str | None:
        assert self.nodes is not None
        return writable(self.nodes)

    def settle(self, timeout: float = 90) -> None:
        wait_until(self.settled, timeout=timeout,
                   what=f"the cluster settled after {self.done}")

    def acked_by(self, node: str, after: float) -> int:
        assert self.writer is not None
        return sum(1 for _, n, t in self.writer.acks if n == node and t > after)

    # --- faults -------------------------------------------------------------------------

    def _restart(self, n: str) -> None:
        assert self.nodes is not None
        proc = self.nodes.daemons[n]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        force_unmount(self.nodes.mnt(n))
        self.nodes.start(n)

    def _moved_from(self, old: tuple[str, int]) -> Callable[[], bool]:
        def moved() -> bool:
            now = self.primary()
            return now is not None and now[0] != old[0] and now[1] > old[1]
        return moved

    def _current(self) -> tuple[tuple[str, int], subprocess.Popen[bytes]]:
        """The primary (node, epoch) and its daemon."""
        assert self.nodes is not None
        old = self.primary()
        assert old is not None
        return old, self.nodes.daemons[old[0]]

    def _until_replaced(self, old: tuple[str, int], since: float, what: str) -> None:
        """Return once another node holds the role, and twice the TTL after ``since``."""
        wait_until(self._moved_from(old), timeout=30, what=f"a new primary after {what}")
        time.sleep(max(0.0, since + 2 * TTL - time.monotonic()))

    def kill(self) -> None:
        """SIGKILL of the primary's daemon; another node takes over; it comes back."""
        assert self.nodes is not None
        old, proc = self._current()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        force_unmount(self.nodes.mnt(old[0]))
        wait_until(self._moved_from(old), timeout=30, what="a new primary after SIGKILL")
        self.nodes.start(old[0])

    def stop(self) -> None:
        """SIGSTOP of the primary for twice the TTL: on waking it acknowledges nothing."""
        assert self.nodes is not None
        old, proc = self._current()
        proc.send_signal(signal.SIGSTOP)
        try:
            self._until_replaced(old, time.monotonic(), "SIGSTOP")
        finally:
            proc.send_signal(signal.SIGCONT)
        woke = time.monotonic()
        wait_until(lambda: not mounted(self.nodes.mnt(old[0])), timeout=30,  # type: ignore[union-attr]
                   what="the woken old primary unmounted")
        assert self.acked_by(old[0], woke) == 0, "a woken zombie acknowledged a write"

    def partition(self) -> None:
        """The primary's link down (it reaches nothing) for twice the TTL and more."""
        old, _ = self._current()
        self.net.partition(old[0])
        cut = time.monotonic()
        try:
            self._until_replaced(old, cut, "a partition")
        finally:
            self.net.heal(old[0])
        assert self.acked_by(old[0], cut + TTL) == 0, "a cut-off primary acknowledged a write"

    def asymmetric(self) -> None:
        """The primary reaches etcd but no other node: it keeps the role (its lease is
        fine) and, once etcd records that they are out of sync, writes without them;
        healed, they catch up."""
        old, _ = self._current()
        self.net.isolate_peers(old[0])
        try:
            time.sleep(3 * TTL)
            assert self.primary() == old, "the role moved although the primary held its lease"
        finally:
            self.net.heal(old[0])

    def etcd_member(self) -> None:
        """One etcd member killed: the quorum stands, the primary keeps the role."""
        old = self.primary()
        i = random.randrange(len(self.etcd.members))
        self.etcd.stop(i)
        try:
            time.sleep(3 * TTL)
            assert self.primary() == old, "the loss of one etcd member moved the role"
        finally:
            self.etcd.start_member(i)

    def restart_all(self) -> None:
        """Every daemon killed at once, then all started again."""
        assert self.nodes is not None
        for n in HOSTS:
            proc = self.nodes.daemons[n]
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for n in HOSTS:
            self._restart(n)

    KINDS = ("kill", "stop", "partition", "asymmetric", "etcd_member", "restart_all")

    def apply(self, kind: str) -> None:
        self.done.append(kind)
        getattr(self, kind)()
        self.settle()

    # --- the checker --------------------------------------------------------------------

    def check(self) -> None:
        assert self.nodes is not None and self.writer is not None
        time.sleep(0.5)
        self.writer.finish()
        self.settle()
        p = self.primary()
        assert p is not None
        acked = len(self.writer.acks)
        assert acked > 100, f"only {acked} writes acknowledged"
        missing = self.writer.missing(self.nodes.mnt(p[0]))
        assert not missing, f"acknowledged writes lost after {self.done}: {missing[:20]}"
        for n in HOSTS:  # replicas have what the primary had when they settled
            wait_until(lambda n=n: self.nodes.status()["nodes"][n]["lag"] == 0,  # type: ignore[union-attr]
                       timeout=30, what=f"{n} caught up")
        for proc in self.nodes.daemons.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        for n in HOSTS:
            force_unmount(self.nodes.mnt(n))
        lines = {}
        for n in HOSTS:
            with Store(self.nodes.store(n), readonly=True) as store, store.txn() as txn:
                lines[n] = epochs.lineage(store, txn)
            log = (self.nodes.base / f"{n}.log").read_text(errors="replace")
            assert "full resync" not in log, f"node {n} was resynced in full"
            assert "Traceback" not in log, f"node {n} logged a traceback"
        line = lines[HOSTS[0]]
        assert all(lines[n] == line for n in HOSTS), lines
        assert all(e1 < e2 and s1 <= s2 for (e1, s1), (e2, s2) in itertools.pairwise(line)), line
        for n in HOSTS[1:]:
            cdpfs("verify", "--compare", self.nodes.store(HOSTS[0]), self.nodes.store(n))
        kept = sorted(p.name for p in self.nodes.base.glob("*.diverged-*"))
        print(f"faults {self.done}: {acked} writes acknowledged, none lost; epochs {line}; "
              f"diverged copies kept: {kept or 'none'}")

    def close(self) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.finish()
        if self.nodes is not None:
            for proc in self.nodes.daemons.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
            self.nodes.cleanup()
        self.etcd.close()
        self.net.close()


@pytest.fixture
def faults(tmp_path: Path, procs: Procs) -> Iterator[Faults]:
    f = Faults(tmp_path, procs)  # it cleans up after itself if it fails to start
    try:
        yield f
    finally:
        f.close()


def test_each_kind_of_fault_loses_no_acknowledged_write(faults: Faults) -> None:
    for kind in Faults.KINDS:
        faults.apply(kind)
    faults.check()


def test_random_faults_lose_no_acknowledged_write(faults: Faults) -> None:
    seed = os.environ.get("CDPFS_HA_SEED", str(time.time_ns()))
    rng = random.Random(seed)
    faults.done.append(f"seed {seed}")
    for _ in range(FAULTS):
        faults.apply(rng.choice(Faults.KINDS))
    faults.check()


# --- PostgreSQL under pgbench, through the HA scenario -----------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCENARIO = Path(__file__).resolve().parents[1] / "contrib" / "scenarios" / "postgresql.toml"


class Postgres:
    """PostgreSQL on the cluster's volume, as its clients see it: psql and pgbench in
    the root namespace, connecting over TCP to whichever node's /primary is 200."""

    def __init__(self, base: Path, procs: Procs) -> None:
        self.base = base
        self.net = Net(HOSTS)
        self.etcd = EtcdCluster(base / "etcd", ip=self.net.gateway)
        self.vip = f"{self.net.gateway.rsplit('.', 1)[0]}.100"
        self.nodes: HaNodes | None = None
        self.acked: list[int] = []
        self.runs = 0  # pgbench runs that completed
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        try:
            self._prepare(base / "a.store")
            self.etcd.start()
            self.nodes = HaNodes(
                base, self.etcd, procs, names=HOSTS, ttl=TTL, net=self.net, cluster="pg",
                create=("--scenario", str(SCENARIO), "--set", "PGDATA=pgdata",
                        "--set", f"VIP={self.vip}/24", "--set", f"PGBIN={PG_BIN}"),
                join={n: ("--set", f"LISTEN={self.net.ip(n)}",
                          "--set", f"PGHOST={base / ('sock-' + n)}") for n in HOSTS})
            for n in HOSTS:
                self.nodes.start(n, "--allow-other")
            wait_until(lambda: self.primary() is not None, timeout=120,
                       what="PostgreSQL up on a primary")
        except BaseException:
            self.close()
            raise

    def _prepare(self, store: Path) -> None:
        """A volume holding an initialized data directory, before the cluster exists."""
        cdpfs("init", store)
        mnt = self.base / "prepare"
        mnt.mkdir()
        cdpfs("mount", store, mnt, "--allow-other")
        try:
            os.chmod(mnt, 0o755)
            data = mnt / "pgdata"
            data.mkdir(mode=0o700)
            shutil.chown(data, "postgres", "postgres")
            subprocess.run(["runuser", "-u", "postgres", "--", PG_BIN / "initdb", "-D", data,
                            "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                            "--no-instructions"], check=True, capture_output=True,
                           cwd="/", timeout=300)
            with open(data / "pg_hba.conf", "a") as f:
                f.write("host all all 10.81.0.0/16 trust\n")
        finally:
            cdpfs("umount", mnt)

    def primary(self) -> str | None:
        assert self.nodes is not None
        return writable(self.nodes)

    def sql(self, node: str, query: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.net.ip(node),
             "-U", "postgres", "-d", "postgres", "-c", query], capture_output=True, text=True,
            timeout=timeout, env={**os.environ, "PGCONNECT_TIMEOUT": "2"})

    def _inserts(self) -> None:
        """One committed row per INSERT that returned: the acknowledged writes."""
        k = 0
        while not self.stop.is_set():
            node = self.primary()
            if node is None:
                time.sleep(0.05)
                continue
            k += 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.sql(node, f"INSERT INTO acked VALUES ({k})", timeout=10).returncode == 0:
                    self.acked.append(k)

    def _pgbench(self) -> None:
        while not self.stop.is_set():
            node = self.primary()
            if node is None:
                time.sleep(0.05)
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = subprocess.run(["pgbench", "-h", self.net.ip(node), "-U", "postgres",
                                       "-c", "2", "-j", "1", "-T", "2", "-n", "postgres"],
                                      capture_output=True, timeout=30)
                self.runs += done.returncode == 0

    def load(self) -> None:
        node = self.primary()
        assert node is not None
        for query in ("CREATE TABLE acked (k int PRIMARY KEY)",):
            assert self.sql(node, query).returncode == 0
        init = subprocess.run(["pgbench", "-h", self.net.ip(node), "-U", "postgres", "-i",
                               "-s", "1", "-q", "postgres"], capture_output=True, text=True,
                              timeout=300)
        assert init.returncode == 0, init.stderr
        for target in (self._inserts, self._pgbench):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)

    def wait_moved(self, old: str) -> str:
        wait_until(lambda: self.primary() not in (None, old), timeout=120,
                   what=f"PostgreSQL up on a node other than {old}")
        new = self.primary()
        assert new is not None
        time.sleep(3)  # the load runs on the new primary for a while
        return new

    def crash(self, n: str) -> None:
        """Node ``n``'s host dies: its daemon (so its mount) and its PostgreSQL."""
        assert self.nodes is not None
        pid_file = self.nodes.mnt(n) / "pgdata" / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        self.nodes.daemons[n].send_signal(signal.SIGKILL)
        self.nodes.daemons[n].wait(timeout=10)
        if pid is not None:
            subprocess.run(["pkill", "-9", "-P", str(pid)], capture_output=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        force_unmount(self.nodes.mnt(n))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=40)
        subprocess.run(["pkill", "-9", "-f", f"{self.base}/"], capture_output=True)
        if self.nodes is not None:
            self.nodes.cleanup()
        self.etcd.close()
        self.net.close()


@pytest.fixture
def postgres(procs: Procs, tmp_path: Path) -> Iterator[Postgres]:
    if not PG_BIN.exists():
        pytest.skip("needs PostgreSQL 15")
    base = Path(tempfile.mkdtemp(prefix="cdpfs-t6-pg-"))
    os.chmod(base, 0o755)
    pg = None
    try:
        pg = Postgres(base, procs)
        yield pg
    finally:
        if pg is not None:
            pg.close()
        for log in [*base.glob("*.log"), *base.glob("sock-*/*.log")]:  # kept for a look
            shutil.copy(log, tmp_path / f"{log.parent.name}-{log.name}")
        if not any(os.path.ismount(p) for p in base.glob("*.mnt")):
            shutil.rmtree(base, ignore_errors=True)


def test_postgresql_fails_over_with_every_committed_transaction(postgres: Postgres) -> None:
    """pgbench and a stream of single-row commits run through /primary while the
    primary's host dies, the role is switched over, and the primary is cut off:
    PostgreSQL comes up on the new primary each time (the scenario's promote
    steps), no committed row is missing, pgbench's bank still balances, and the
    virtual IP is on the primary alone."""
    pg = postgres
    assert pg.nodes is not None
    pg.load()
    time.sleep(3)
    first = pg.primary()
    assert first is not None
    pg.crash(first)
    second = pg.wait_moved(first)
    pg.nodes.start(first, "--allow-other")
    wait_until(lambda: pg.nodes.status()["nodes"][first]["role"] == "replica",  # type: ignore[union-attr]
               timeout=60, what=f"{first} back as a replica")
    target = next(n for n in HOSTS if n not in (first, second))
    cdpfs("ha", "switchover", "pg", target, env=pg.nodes.env, timeout=120)
    third = pg.wait_moved(second)
    assert third == target
    pg.net.partition(third)
    try:
        fourth = pg.wait_moved(third)
    finally:
        pg.net.heal(third)
    wait_until(lambda: pg.nodes.status()["nodes"][third]["role"] == "replica",  # type: ignore[union-attr]
               timeout=120, what=f"{third} back as a replica")
    pg.stop.set()
    for thread in pg.threads:
        thread.join(timeout=40)
    assert pg.primary() == fourth
    rows = pg.sql(fourth, "SELECT k FROM acked")
    assert rows.returncode == 0, rows.stderr
    have = {int(k) for k in rows.stdout.split()}
    missing = sorted(set(pg.acked) - have)
    assert len(pg.acked) > 50 and not missing, \
        f"{len(missing)} of {len(pg.acked)} committed rows missing: {missing[:20]}"
    sums = pg.sql(fourth, "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || "
                          "(SELECT sum(bbalance) FROM pgbench_branches) || ' ' || "
                          "(SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || "
                          "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)").stdout.split()
    assert len(sums) == 4 and len(set(sums)) == 1, f"pgbench's bank does not balance: {sums}"
    assert pg.runs > 0
    held = [n for n in HOSTS if f" {pg.vip}/24 " in pg.net.addresses(n)]
    assert held == [fourth], f"the virtual IP is on {held}, the primary is {fourth}"
    print(f"PostgreSQL: primaries {first} -> {second} -> {third} -> {fourth}; "
          f"{len(pg.acked)} commits acknowledged, none missing; {pg.runs} pgbench runs")
