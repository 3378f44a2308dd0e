"""An HA cluster of ``cdpfs ha run`` daemons on this machine, for tests and benchmarks.

``HaNodes(base, etcd, procs)`` makes a volume in node a's store, a cluster for it
(``cdpfs ha create``) and joins nodes a, b, ... (their stores, mount points,
replication ports and health ports under ``base``); ``start(n)`` runs a node's
daemon as a process (its log in ``base/n.log``), ``status()`` is ``cdpfs ha status
--json``; ``cleanup()`` kills every daemon and clears every mount.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from etcdcluster import EtcdCluster
from harness import CLI, Procs, cdpfs, force_unmount, free_port, wait_until


def mounted(mnt: Path) -> bool:
    return os.path.ismount(mnt)


class HaNodes:
    """A cluster of nodes with their stores, mounts and daemons."""

    def __init__(self, base: Path, etcd: EtcdCluster, procs: Procs,
                 names: tuple[str, ...] = ("a", "b"), ttl: int = 2, interval: float = 0.3,
                 mode: str = "sync", cluster: str | None = None) -> None:
        self.base, self.procs, self.names = base, procs, names
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
              "--interval", str(interval), "--mode", mode, env=self.env)
        for n in names:
            self.mnt(n).mkdir()
            self.health[n] = f"127.0.0.1:{free_port()}"
            cdpfs("ha", "join", self.cluster, n, "--store", self.store(n), "--address",
                  f"127.0.0.1:{free_port()}", "--mount", self.mnt(n),
                  "--health", self.health[n], env=self.env)

    def store(self, n: str) -> Path:
        return self.base / f"{n}.store"

    def mnt(self, n: str) -> Path:
        return self.base / f"{n}.mnt"

    def start(self, n: str) -> None:
        log = self.base / f"{n}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([*CLI, "-v", "ha", "run", self.cluster, n],
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
