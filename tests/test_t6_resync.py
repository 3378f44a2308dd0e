"""Full resync: a replica whose records were pruned on the primary (or that joins a
volume whose early journal is gone) gets the retained history, blocks only where it
lacks them, and then continues with live records; a resync cut short starts again."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CLI, ReplicaServer, Volume, cdpfs, pair_stores, wait_until


@pytest.fixture
def pair(make_volume: type[Volume], tmp_path: Path) -> Iterator[tuple[Volume, ReplicaServer]]:
    vol = make_volume("primary").init()
    rstore = tmp_path / "replica.store"
    pair_stores(vol.store, rstore)
    server = ReplicaServer(rstore, tmp_path / "replica.log")
    try:
        server.start()
        yield vol, server
    finally:
        server.kill()


def _history(vol: Volume, rounds: int, size: int) -> None:
    vol.mount()
    try:
        for i in range(rounds):
            (vol.mnt / f"f{i % 5}").write_bytes(os.urandom(size))
            (vol.mnt / "log").open("a").write(f"{i}\n")
        vol.umount()
    finally:
        vol.cleanup()


def test_replica_of_a_pruned_volume_gets_a_full_resync(pair: tuple[Volume, ReplicaServer]) -> None:
    vol, server = pair
    _history(vol, 40, 200_000)
    cdpfs("bookmark", "early", "--at", "#5", "--volume", vol.store)
    cdpfs("retention", vol.store, "--keep-all", "1s")
    time.sleep(1.5)
    pruned = cdpfs("prune", vol.store).stdout
    assert re.search(r"[1-9]\d* journal records", pruned), pruned
    cdpfs("replicate", vol.store, "--to", server.address, "--name", "r1")
    assert "full resync" in server.log.read_text()
    assert "identical" in cdpfs("verify", "--compare", vol.store, server.store).stdout
    cdpfs("verify", server.store)
    # History came along: the kept point #5 (bookmarked) is the same on both.
    assert "identical at #5" in cdpfs("verify", "--compare", vol.store, server.store,
                                      "--at", "5").stdout
    # Then it continues live: the mount ships new records to the registered replica.
    _history(vol, 3, 1000)
    cdpfs("replicate", vol.store, "--name", "r1")  # whatever the mount had not sent yet
    assert "identical" in cdpfs("verify", "--compare", vol.store, server.store).stdout
    assert server.log.read_text().count("full resync to") == 2  # begins, done: only once


def test_cut_resync_starts_again_and_sends_only_missing_blocks(
        pair: tuple[Volume, ReplicaServer]) -> None:
    vol, server = pair
    _history(vol, 60, 1_000_000)
    cdpfs("retention", vol.store, "--keep-all", "1s")
    time.sleep(1.5)
    cdpfs("prune", vol.store)
    shipper = subprocess.Popen([*CLI, "replicate", str(vol.store), "--to", server.address,
                                "--name", "r1", "--attempts", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "full resync" in server.log.read_text(), what="the resync to start")
        time.sleep(0.3)
        server.kill()  # cut it short
        time.sleep(1)
        server.start()
        _, err = shipper.communicate(timeout=120)
    finally:
        shipper.kill()
    assert shipper.returncode == 0, err
    assert "was cut: it starts again" in server.log.read_text() or \
        server.log.read_text().count("full resync") >= 2
    assert "identical" in cdpfs("verify", "--compare", vol.store, server.store).stdout
    cdpfs("verify", server.store)


def test_resync_after_pruned_absence_sends_only_what_differs(
        pair: tuple[Volume, ReplicaServer]) -> None:
    vol, server = pair
    _history(vol, 20, 1_000_000)
    cdpfs("replicate", vol.store, "--to", server.address, "--name", "r1")
    server.kill()  # the replica goes away; the primary moves on and prunes past it
    _history(vol, 3, 1_000_000)
    cdpfs("retention", vol.store, "--keep-all", "1s", "--replica-max-lag", "1")
    time.sleep(1.5)
    cdpfs("prune", vol.store)
    server.start()
    out = cdpfs("replicate", vol.store, "--name", "r1").stdout
    assert "full resync" in server.log.read_text()
    sent = float(re.search(r"([\d.]+) MiB sent", out)[1])  # type: ignore[index]
    # 3 new 1 MB files must travel; the 5 MB of live data the replica had must not.
    assert 2.5 < sent < 4.5, out
    assert "identical" in cdpfs("verify", "--compare", vol.store, server.store).stdout
    cdpfs("verify", server.store)
