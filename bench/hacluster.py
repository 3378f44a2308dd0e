"""An HA cluster of ``cdpfs ha run`` daemons on this machine, for tests and benchmarks.

``HaNodes(base, etcd, procs)`` makes a volume in node a's store, a cluster for it
(``cdpfs ha create``) and joins nodes a, b, ... (their stores, mount points,
replication ports and health ports under ``base``; with ``net``, each node is a
host of that ``hanet.Net`` and its daemon runs in its namespace); ``start(n)`` runs a node's
daemon as a process (its log in ``base/n.log``), ``status()`` is ``cdpfs ha status
--json``; ``cleanup()`` kills every daemon and clears every mount.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from etcdcluster import EtcdCluster
from hanet import Net
from harness import CLI, Procs, cdpfs, force_unmount, free_port, wait_until


def mounted(mnt: Path) -> bool:
    return os.path.ismount(mnt)


class HaNodes:
    """A cluster of nodes with their stores, mounts and daemons."""

    def __init__(self, base: Path, etcd: EtcdCluster, procs: Procs,
                 names: tuple[str, ...] = ("a", "b"), ttl: int = 2, interval: float = 0.3,
                 mode: str = "sync", cluster: str | None = None, net: Net | None = None,
                 create: tuple[str, ...] = (),
                 join: dict[str, tuple[str, ...]] | None = None) -> None:
        self.base, self.procs, self.names, self.net = base, procs, names, net
        self.env = {**os.environ, "CDPFS_ETCD": ",".join(etcd.endpoints),
                    "CDPFS_ETCD_CA": str(etcd.client.ca),
                    "CDPFS_ETCD_CERT": str(etcd.client.cert),
                    "CDPFS_ETCD_KEY": str(etcd.client.key)}
        self.cluster = cluster or base.name.replace("_", "-")[-60:]
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.health: dict[str, str] = {}
        first = self.store(names[0])
        if not first.exists():  # a test may have made it, with data, before
            cdpfs("init", first)
        cdpfs("ha", "create", self.cluster, "--volume", first, "--ttl", str(ttl),
              "--interval", str(interval), "--mode", mode, *create, env=self.env)
        for n in names:
            self.mnt(n).mkdir()
            ip = net.ip(n) if net is not None else "127.0.0.1"
            self.health[n] = f"{ip}:{free_port()}"
            cdpfs("ha", "join", self.cluster, n, "--store", self.store(n), "--address",
                  f"{ip}:{free_port()}", "--mount", self.mnt(n),
                  "--health", self.health[n], *(join or {}).get(n, ()), env=self.env)

    def store(self, n: str) -> Path:
        return self.base / f"{n}.store"

    def mnt(self, n: str) -> Path:
        return self.base / f"{n}.mnt"

    def start(self, n: str, *args: str) -> None:
        log = self.base / f"{n}.log"
        prefix = self.net.prefix(n) if self.net is not None else []
        with open(log, "ab") as out:
            proc = subprocess.Popen([*prefix, *CLI, "-v", "ha", "run", self.cluster, n, *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=self.env)
        self.procs.all.append(proc)
        self.daemons[n] = proc

    def start_primary_and_replica(self) -> None:
        """Start every node; return once the first is mounted (the primary) and each
        other a replica."""
        first, *others = self.names
        for n in self.names:
            self.start(n)
        wait_until(lambda: mounted(self.mnt(first)), what=f"{first}'s mount")
        for n in others:
            wait_until(lambda n=n: self.status()["nodes"][n]["role"] == "replica",
                       what=f"{n} a replica")

    def status(self) -> dict[str, Any]:
        return json.loads(cdpfs("ha", "status", self.cluster, "--json", env=self.env).stdout)

    def primary(self) -> str | None:
        return self.status()["primary"]

    def cleanup(self) -> None:
        self.procs.kill_all()
        for n in self.names:
            force_unmount(self.mnt(n))


def writable(nodes: HaNodes) -> str | None:
    """The node whose health endpoint says it is the primary that may write."""
    return _writable(nodes.health)


def _writable(health: dict[str, str]) -> str | None:
    for n, address in health.items():
        try:
            with urllib.request.urlopen(f"http://{address}/primary", timeout=0.2) as r:
                if r.status == 200:
                    return n
        except OSError:
            continue
    return None


class Writer:
    """Writes ``w<i>`` files through the primary every 20 ms, each fsynced, and notes
    every acknowledgement (``acks``: (i, node, CLOCK_MONOTONIC time)).

    It runs as a process of its own: a process that holds files open on a mount
    must not fork (a child closing its inherited copy of a file on a stopped
    node's mount blocks in FLUSH, and the parent's fork with it), and a test forks
    all the time.
    """

    def __init__(self, nodes: HaNodes) -> None:
        self.nodes = nodes
        self.log = nodes.base / "writer.acks"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Writer:
        spec = json.dumps({"health": self.nodes.health, "log": str(self.log),
                           "mounts": {n: str(self.nodes.mnt(n)) for n in self.nodes.names}})
        with open(self.nodes.base / "writer.log", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, __file__, "write", spec],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.nodes.procs.all.append(self.proc)
        return self

    def finish(self) -> None:
        """Stop writing (and wait for the process)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    @property
    def acks(self) -> list[tuple[int, str, float]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            i, node, t = line.split()
            out.append((int(i), node, float(t)))
        return out

    def missing(self, mnt: Path) -> list[int]:
        """The acknowledged writes not in ``mnt`` as they were written."""
        def held(i: int) -> bool:
            f = mnt / f"w{i}"
            return f.exists() and f.read_bytes() == b"write %d\n" % i

        return [i for i, _, _ in self.acks if not held(i)]


def _write(spec: dict[str, Any]) -> None:
    """The writer process: until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mounts = {n: Path(m) for n, m in spec["mounts"].items()}
    lock = threading.Lock()
    with open(spec["log"], "a") as log:

        def one(i: int, node: str) -> None:
            fd = os.open(mounts[node] / f"w{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"write %d\n" % i)
                os.fsync(fd)
                acked = time.monotonic()  # the fsync's answer: close's FLUSH may wait on
            finally:
                os.close(fd)
            with lock:
                log.write(f"{i} {node} {acked}\n")
                log.flush()

        pool = concurrent.futures.ThreadPoolExecutor(16)  # a write may hang on a stopped node
        i = 0
        while not stop.is_set():
            node = _writable(spec["health"])
            if node is None:
                time.sleep(0.02)
                continue
            i += 1
            future = pool.submit(one, i, node)
            try:
                future.result(timeout=1.0)
            except (OSError, concurrent.futures.TimeoutError):
                pass
            time.sleep(0.02)
        with lock:
            log.flush()
        os._exit(0)  # threads stuck on a stopped mount must not hold the exit


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        _write(json.loads(sys.argv[2]))
