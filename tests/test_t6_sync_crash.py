"""Sync replication under crashes: the primary mount (and in some rounds the replica
too) is SIGKILLed at random moments, 20 times. Every write whose fsync returned must
be on the replica, byte for byte, and every restart resumes where the replica was
(no full resync)."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

from harness import ReplicaServer, Volume, cdpfs, pair_stores

ROUNDS = 20


def test_every_fsynced_write_survives_primary_crashes(make_volume: type[Volume],
                                                      tmp_path: Path) -> None:
    rng = random.Random(20261125)
    vol = make_volume("primary").init()
    rstore, log = tmp_path / "replica.store", tmp_path / "replica.log"
    pair_stores(vol.store, rstore)
    server = ReplicaServer(rstore, log)
    cdpfs("replica", "add", vol.store, "r1", "--address", server.address, "--mode", "sync")
    synced: dict[str, bytes] = {}  # name -> content, for every write whose fsync returned
    try:
        server.start()
        for rnd in range(ROUNDS):
            vol.mount()
            stop = threading.Event()

            def writer(rnd: int = rnd, stop: threading.Event = stop) -> None:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    name = f"r{rnd:02d}-{i:04d}"
                    data = os.urandom(rng.choice((100, 5000, 70_000, 200_000)))
                    try:
                        with open(vol.mnt / name, "wb") as f:
                            f.write(data)
                            f.flush()
                            os.fsync(f.fileno())
                    except OSError:
                        return  # the mount died under it: this write was not confirmed
                    synced[name] = data

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.3, 1.2))
            both = rng.random() < 0.3
            vol.kill()  # SIGKILL of the primary, mid-write
            stop.set()
            t.join()
            if both:
                server.kill()
                server.start()
        assert len(synced) > 5 * ROUNDS, f"only {len(synced)} confirmed writes"
        vol.mount()  # the last state reaches the replica before the check
        fd = os.open(vol.mnt, os.O_RDONLY)
        os.fsync(fd)  # sync mode: returns once the replica has everything
        os.close(fd)
        vol.umount()
    finally:
        vol.cleanup()
        server.kill()
    snap = tmp_path / "snap"
    snap.mkdir()
    cdpfs("mount", "--at", "now", rstore, snap)
    try:
        missing = [n for n, data in synced.items()
                   if not (snap / n).exists() or (snap / n).read_bytes() != data]
    finally:
        cdpfs("umount", snap, check=False)
    assert not missing, f"{len(missing)} fsynced writes missing on the replica: {missing[:5]}"
    text = log.read_text()
    assert "full resync" not in text
    resumes = [int(n) for n in re.findall(r"resuming after #(\d+)", text)]
    assert resumes[0] == 0 and all(n > 0 for n in resumes[1:]), resumes
    assert "identical" in cdpfs("verify", "--compare", vol.store, rstore).stdout
    cdpfs("verify", rstore)
