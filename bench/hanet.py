"""Hosts as network namespaces joined by a bridge, for HA tests and benchmarks.

``Net(hosts)`` makes a bridge in the root namespace (its address, ``gateway``, is
where etcd and the test's clients live) and one namespace per host with an
``eth0`` on the bridge at ``ip(host)``. Processes run in a host with
``prefix(host)`` (``nsenter --net``: the network namespace only, so mounts made
there are seen by the test). Faults:

- ``partition(host)``: the host's link down: it reaches nothing, nothing reaches it;
- ``isolate_peers(host)``: blackhole routes in the host to every other host: it
  still reaches the gateway (etcd) but no other node, and they cannot reach it;
- ``heal(host)`` undoes both.

``close()`` removes the namespaces and links (and so every route and address).
"""

from __future__ import annotations

import itertools
import os
import subprocess

_nets = itertools.count(os.getpid() % 50)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Net:
    """A bridge and one namespace per host."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.id = next(_nets) % 200 + 20
        self.bridge = f"cdpbr{self.id}"
        self.gateway = f"10.81.{self.id}.254"
        self.hosts = hosts
        self._ns = {h: f"cdpfs-{os.getpid()}-{self.id}-{h}" for h in hosts}
        self._dev = {h: f"cdv{self.id}x{i}" for i, h in enumerate(hosts)}
        self._ips = {h: f"10.81.{self.id}.{i + 1}" for i, h in enumerate(hosts)}
        self._cut: set[str] = set()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for h in hosts:
                ns, dev = self._ns[h], self._dev[h]
                _ip("netns", "add", ns)
                _ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
                _ip("link", "set", f"{dev}p", "netns", ns)
                _ip("-n", ns, "link", "set", f"{dev}p", "name", "eth0")
                _ip("link", "set", dev, "master", self.bridge)
                _ip("link", "set", dev, "up")
                _ip("-n", ns, "addr", "add", f"{self._ips[h]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def ip(self, host: str) -> str:
        return self._ips[host]

    def addresses(self, host: str) -> str:
        """``ip -o addr show eth0`` in ``host``: the addresses it holds now."""
        return subprocess.run(["ip", "-n", self._ns[host], "-o", "addr", "show", "eth0"],
                              capture_output=True, text=True, check=True).stdout

    def prefix(self, host: str) -> list[str]:
        """What runs a command in ``host``'s network (and only its network)."""
        return ["nsenter", f"--net=/run/netns/{self._ns[host]}"]

    def partition(self, host: str) -> None:
        _ip("link", "set", self._dev[host], "down")

    def isolate_peers(self, host: str) -> None:
        for other in self.hosts:
            if other != host:
                _ip("-n", self._ns[host], "route", "add", "blackhole", f"{self._ips[other]}/32")
        self._cut.add(host)

    def heal(self, host: str) -> None:
        _ip("link", "set", self._dev[host], "up")
        if host in self._cut:
            for other in self.hosts:
                if other != host:
                    subprocess.run(["ip", "-n", self._ns[host], "route", "del", "blackhole",
                                    f"{self._ips[other]}/32"], capture_output=True)
            self._cut.discard(host)

    def close(self) -> None:
        for h in self.hosts:
            subprocess.run(["ip", "link", "del", self._dev[h]], capture_output=True)
            subprocess.run(["ip", "netns", "del", self._ns[h]], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
