"""``cdpfs export`` of a replica store while it receives: no writer lock, no pause.

Real processes on loopback: the primary is mounted and ships (async) to ``cdpfs
replica serve``; a writer keeps changing the primary while the replica store is
exported at an earlier moment. The replica must go on applying records during
the export (its newest record moves the whole time), be resynced in full never,
and the archive, extracted by GNU tar, must be the primary's ``@`` tree of that
moment.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from conftest import Served
from harness import cdpfs, store_seq, wait_replicated
from test_t3_archive import need, same, tree

MIB = 1 << 20


def test_a_replica_exports_a_moment_while_it_receives(served: Served, tmp_path: Path) -> None:
    vol, replica, server = served
    m = vol.mnt
    (m / "dir").mkdir()
    for i in range(4):
        (m / "dir" / f"big{i}").write_bytes(os.urandom(48 * MIB))
    (m / "small").write_bytes(b"at the moment")
    os.setxattr(m / "small", "user.kept", b"yes")
    os.utime(m / "small", ns=(1_600_000_000_000_000_001,) * 2)
    seq = wait_replicated(vol, replica, timeout=120)

    stop = threading.Event()

    def writer() -> None:  # the primary changes all along
        n = 0
        while not stop.is_set():
            with open(m / "small", "wb") as f:
                f.write(b"later %d" % n)
                os.fsync(f.fileno())
            n += 1
            time.sleep(0.02)

    seen: list[tuple[float, int]] = []

    def watch() -> None:
        while not stop.is_set():
            seen.append((time.monotonic(), store_seq(replica)))
            time.sleep(0.05)

    threads = [threading.Thread(target=writer), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        archive = tmp_path / "replica.tar"
        started = time.monotonic()
        said = cdpfs("export", replica, "--at", f"#{seq}", "-o", archive).stdout
        ended = time.monotonic()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert f"exported #{seq}" in said
    during = [s for t, s in seen if started <= t <= ended]
    assert len(set(during)) >= 3, f"the replica did not move during the export: {during}"
    assert server.alive() and "full resync" not in server.text()
    out = tmp_path / "gnu"
    out.mkdir()
    proc = subprocess.run([need("tar"), "--xattrs", "--xattrs-include=*", "-xpf", str(archive),
                           "-C", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    same(tree(out), tree(m / f"@#{seq}"), "gnu")
    assert (out / "small").read_bytes() == b"at the moment"
    wait_replicated(vol, replica)
    assert "identical" in cdpfs("verify", "--compare", vol.store, replica).stdout
