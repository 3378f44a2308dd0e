"""Replication topologies and wire budgets on loopback: fan-out from a mount to two
replicas, a chain through a replica, a bandwidth limit, and the assessment's
prediction against the bytes counted on the wire."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    Proxy,
    ReplicaServer,
    Volume,
    cdpfs,
    last_seq,
    pair_stores,
    store_seq,
    wait_until,
)


class Servers:
    """``cdpfs replica serve`` processes, all killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[ReplicaServer] = []

    def start(self, store: Path) -> str:
        self.all.append(ReplicaServer(store, self.tmp / f"{store.name}.log").start())
        return self.all[-1].address

    def stop(self) -> None:
        for server in self.all:
            server.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def _identical(a: Path, b: Path) -> None:
    assert "identical" in cdpfs("verify", "--compare", a, b).stdout


def test_fan_out_and_chain(make_volume: type[Volume], servers: Servers,
                           tmp_path: Path) -> None:
    vol = make_volume("primary").init()
    r1, r2, r3 = (tmp_path / f"r{i}.store" for i in (1, 2, 3))
    pair_stores(vol.store, r1, "r1", "primary")
    pair_stores(vol.store, r2, "r2", "primary")
    pair_stores(r1, r3, "r3", "r1")  # r1 forwards to r3: a chain
    a1, a2, a3 = servers.start(r1), servers.start(r2), servers.start(r3)
    cdpfs("replica", "add", vol.store, "r1", "--address", a1)
    cdpfs("replica", "add", vol.store, "r2", "--address", a2, "--mode", "sync")
    vol.mount()
    try:
        for i in range(30):
            (vol.mnt / f"f{i}").write_bytes(os.urandom(30_000 + i))
        wait_until(lambda: (store_seq(r1) > 0 and store_seq(r1) == store_seq(r2)), timeout=30,
                   what="both replicas to start receiving")
        cdpfs("replica", "add", r1, "r3", "--address", a3)  # the chain's next link
        for i in range(30):
            with open(vol.mnt / f"g{i}", "wb") as f:
                f.write(os.urandom(10_000))
                f.flush()
                os.fsync(f.fileno())
        last = last_seq(vol)
        for r in (r1, r2, r3):
            wait_until(lambda r=r: store_seq(r) >= last, timeout=60, what=f"{r.name} to converge")
        vol.umount()
    finally:
        vol.cleanup()
    for r in (r1, r2, r3):
        _identical(vol.store, r)
        cdpfs("verify", r)


def test_assessment_predicts_the_wire_and_the_limit_holds(make_volume: type[Volume],
                                                          servers: Servers,
                                                          tmp_path: Path) -> None:
    vol = make_volume("primary").init()
    vol.mount()
    try:
        for i in range(12):
            (vol.mnt / f"bin{i}").write_bytes(os.urandom(500_000))
            (vol.mnt / f"text{i}").write_text(f"line {i}\n" * 20_000)
        vol.umount()
    finally:
        vol.cleanup()
    out = cdpfs("assess", vol.store, "--since", "1h", "--lag", "5s").stdout
    predicted = float(re.search(r"([\d.,]+) MB on the wire", out)[1].replace(",", ""))  # type: ignore[index]
    assert re.search(r"per minute \(wire\): median", out) and "Mbit/s" in out, out
    replica = tmp_path / "r.store"
    pair_stores(vol.store, replica, "r1", "primary")
    proxy = Proxy(int(servers.start(replica).rsplit(":", 1)[1]))
    try:
        limit = 2_000_000
        cdpfs("replica", "add", vol.store, "r1", "--address", proxy.address, "--mode",
              "manual", "--limit", str(limit))
        started = time.monotonic()
        cdpfs("replicate", vol.store, "--name", "r1")
        took = time.monotonic() - started
    finally:
        proxy.close()
    measured = proxy.up / 1e6
    assert abs(measured - predicted) <= 0.1 * predicted, (measured, predicted)
    # The limit: the bytes could not have crossed faster than 2 MB/s (with a little slack
    # for the first burst before the pacing starts).
    assert took >= 0.8 * (proxy.up / limit), (took, proxy.up)
    _identical(vol.store, replica)
