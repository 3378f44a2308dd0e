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
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
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
        """Start a and b; return once a is mounted (the primary) and b a replica."""
        self.start("a")
        self.start("b")
        wait_until(lambda: mounted(self.mnt("a")), what="a's mount")
        wait_until(lambda: self.status()["nodes"]["b"]["role"] == "replica",
                   what="b a replica")

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
    for n, address in nodes.health.items():
        try:
            with urllib.request.urlopen(f"http://{address}/primary", timeout=0.2) as r:
                if r.status == 200:
                    return n
        except OSError:
            continue
    return None


@dataclass
class Writer:
    """Writes ``w<i>`` files through the primary, each fsynced; notes every ack."""

    nodes: HaNodes
    acks: list[tuple[int, str, float]] = field(default_factory=list)  # (i, node, time)
    stop: threading.Event = field(default_factory=threading.Event)

    def _one(self, i: int, node: str) -> None:
        path = self.nodes.mnt(node) / f"w{i}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"write %d\n" % i)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.acks.append((i, node, time.monotonic()))

    def run(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(16)  # a write may hang on a stopped node
        i = 0
        while not self.stop.is_set():
            node = writable(self.nodes)
            if node is None:
                time.sleep(0.02)
                continue
            i += 1
            future = pool.submit(self._one, i, node)
            try:
                future.result(timeout=1.0)
            except (OSError, concurrent.futures.TimeoutError):
                pass
            time.sleep(0.02)
        pool.shutdown(wait=False, cancel_futures=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def missing(self, mnt: Path) -> list[int]:
        """The acknowledged writes not in ``mnt`` as they were written."""
        def held(i: int) -> bool:
            f = mnt / f"w{i}"
            return f.exists() and f.read_bytes() == b"write %d\n" % i

        return [i for i, _, _ in self.acks if not held(i)]
