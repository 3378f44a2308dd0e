"""Replication between two network namespaces joined by a veth pair: the replica is
another host as far as the network goes. A partition (the link set down) must not
stop writes on the primary, and ``cdpfs status`` names the replica's silence
instead of an ETA; once healed the replica converges and status says so. In sync
mode an fsync that returned is on the replica, even if the primary is then killed."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    CLI,
    HarnessError,
    Volume,
    can_make_netns,
    cdpfs,
    last_seq,
    pair_stores,
    settle,
    store_seq,
    wait_until,
)

from cdpfs.replication.registry import SILENT_AFTER

_ids = itertools.count(os.getpid() % 200)


@dataclass
class Link:
    """A namespace ``ns`` reached from the root namespace at ``peer`` over ``dev``."""

    ns: str
    dev: str
    peer: str

    def set(self, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.dev, "up" if up else "down"], check=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def link() -> Iterator[Link]:
    if not can_make_netns():
        pytest.skip("needs CAP_NET_ADMIN and ip(8) for network namespaces")
    n = next(_ids) % 250 + 1
    ns, dev, peer_dev = f"cdpfs-t{os.getpid()}-{n}", f"cdpa{n}", f"cdpb{n}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", dev, "type", "veth", "peer", "name", peer_dev)
        _ip("link", "set", peer_dev, "netns", ns)
        _ip("addr", "add", f"10.78.{n}.1/30", "dev", dev)
        _ip("link", "set", dev, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"10.78.{n}.2/30", "dev", peer_dev)
        _ip("netns", "exec", ns, "ip", "link", "set", peer_dev, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield Link(ns, dev, f"10.78.{n}.2")
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@dataclass
class Replica:
    store: Path
    address: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def replica(link: Link, make_volume: type[Volume], tmp_path: Path) -> Iterator[Replica]:
    """A primary volume (not mounted yet) trusted both ways with a replica served
    from inside the namespace."""
    vol = make_volume("primary").init()
    rstore = tmp_path / "replica.store"
    pair_stores(vol.store, rstore)
    address = f"{link.peer}:7400"
    log = tmp_path / "replica.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(["ip", "netns", "exec", link.ns, *CLI, "replica", "serve",
                                 str(rstore), "--listen", address], stderr=err)
    try:
        wait_until(lambda: "listening" in log.read_text(), what="the replica to listen")
        yield Replica(rstore, address, proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _status(vol: Volume) -> str:
    return next(line for line in cdpfs("status", vol.store).stdout.splitlines()
                if line.startswith("replica"))


def _await_status(vol: Volume, pattern: str, timeout: float, when: str) -> re.Match[str]:
    """The first replica line of ``cdpfs status`` that matches ``pattern`` (polled)."""
    found: list[re.Match[str] | str] = [""]

    def matches() -> bool:
        line = _status(vol)
        found[0] = re.search(pattern, line) or line
        return not isinstance(found[0], str)

    try:
        wait_until(matches, timeout=timeout)
    except HarnessError:
        raise AssertionError(f"status {when}: {found[0]}") from None
    assert isinstance(found[0], re.Match)
    return found[0]


def test_partition_keeps_writes_flowing_then_converges(replica: Replica, link: Link,
                                                       make_volume: type[Volume]) -> None:
    vol = make_volume("primary")
    cdpfs("replica", "add", vol.store, "r1", "--address", replica.address)
    vol.mount()
    try:
        (vol.mnt / "before").write_bytes(os.urandom(1 << 20))
        settle(vol.mnt)
        seq = last_seq(vol)
        wait_until(lambda: store_seq(replica.store) >= seq, timeout=30,
                   what="the replica to catch up before the partition")
        slowest = 0.0
        stop = threading.Event()
        written: list[str] = []

        def writer() -> None:
            nonlocal slowest
            for i in itertools.count():
                if stop.is_set():
                    return
                started = time.monotonic()
                with open(vol.mnt / f"w{i:04d}", "wb") as f:
                    f.write(os.urandom(64 << 10))
                    f.flush()
                    os.fsync(f.fileno())
                slowest = max(slowest, time.monotonic() - started)
                written.append(f"w{i:04d}")
                time.sleep(0.02)

        t = threading.Thread(target=writer)
        t.start()
        try:
            time.sleep(1)
            link.set(False)  # the partition
            time.sleep(4)
            during = len(written)
            queued = re.search(r"lag (\d+) records / ([\d.]+) MiB / ", _status(vol))
            assert queued, _status(vol)
            # what waits is reported: at least the 64 KiB files written since the cut
            assert int(queued[1]) > 20 and float(queued[2]) >= 1.0, _status(vol)
            # Nothing comes back: once longer than a live link is ever silent, status
            # says for how long, with no ETA and no rate (it kept showing "connected
            # ... ETA 3s, 45.4 MB/s lately" for a whole 20 s cut).
            silent = _await_status(vol, r": no answer for (\d+)s, acked #\d+, lag \d+ records",
                                   SILENT_AFTER + 10, "during the cut")
            assert int(silent[1]) >= SILENT_AFTER, silent.string
            assert "ETA" not in silent.string and "MB/s" not in silent.string, silent.string
            link.set(True)  # healed
            time.sleep(1)
        finally:
            stop.set()
            t.join()
        assert len(written) > during > 20, "writes stalled during the partition"
        assert slowest < 2.0, f"an async write+fsync took {slowest:.1f}s during the partition"
        settle(vol.mnt)
        seq = last_seq(vol)
        wait_until(lambda: store_seq(replica.store) >= seq, timeout=60,
                   what="the replica to converge after the partition")
        # and status says so: answering again, nothing behind
        _await_status(vol, r": connected, acked #\d+, lag 0 records", 30, "after the heal")
        vol.umount()
    finally:
        vol.cleanup()
    r = cdpfs("verify", "--compare", vol.store, replica.store, "--at", str(seq))
    assert "identical" in r.stdout
    # The TCP connection may survive the partition or be replaced; a new session
    # resumes where the replica was, never from the start.
    resumes = [int(n) for n in re.findall(r"resuming after #(\d+)", replica.log.read_text())]
    assert resumes[0] == 0 and all(n > 0 for n in resumes[1:]), resumes


def test_sync_mode_fsync_is_on_the_replica(replica: Replica, make_volume: type[Volume],
                                           tmp_path: Path) -> None:
    vol = make_volume("primary")
    cdpfs("replica", "add", vol.store, "r1", "--address", replica.address, "--mode", "sync")
    vol.mount()
    contents = {}
    try:
        wait_until(lambda: "connected" in _status(vol) and "not connected" not in _status(vol),
                   timeout=30, what="the sync replica to connect")
        for i in range(30):
            data = os.urandom(20_000 + i)
            with open(vol.mnt / f"s{i:02d}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                # Right after fsync returned, everything the primary committed is in the
                # replica's own store (durably: it acknowledges only after its commit).
                committed = store_seq(vol.store)
                assert store_seq(replica.store) >= committed, f"file {i}"
            contents[f"s{i:02d}"] = data
        vol.kill()  # the primary dies: everything fsynced must be on the replica
    finally:
        vol.cleanup()
    replica.proc.send_signal(signal.SIGKILL)
    replica.proc.wait()
    snap = tmp_path / "snap"
    snap.mkdir()
    cdpfs("mount", "--at", "now", replica.store, snap)
    try:
        for name, data in contents.items():
            assert (snap / name).read_bytes() == data, f"{name} missing on the replica"
    finally:
        cdpfs("umount", snap, check=False)
    cdpfs("verify", replica.store)


def test_replicate_command_across_namespaces(replica: Replica, make_volume: type[Volume]) -> None:
    vol = make_volume("primary")
    vol.mount()
    try:
        for i in range(20):
            (vol.mnt / f"f{i}").write_bytes(os.urandom(50_000))
        vol.umount()
    finally:
        vol.cleanup()
    out = cdpfs("replicate", vol.store, "--to", replica.address, "--name", "r1").stdout
    assert re.search(r"replica r1 at #\d+: \d+ records \(from #1\)", out), out
    assert "identical" in cdpfs("verify", "--compare", vol.store, replica.store).stdout
