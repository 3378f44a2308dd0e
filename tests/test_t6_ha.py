"""High availability through the command line, with real mounts and a real etcd.

``cdpfs ha create/join/status/run`` as a user runs them: two node daemons as
processes on this machine (loopback ports, their own stores and mount points)
against the session's 3-member etcd with TLS. The primary's daemon is killed
with SIGKILL while an application's fsynced file is on its mount; the replica's
daemon mounts the volume at its own mount point with the file there; the killed
node comes back as a replica. A SIGTERM hands the role on at once. A node whose
mount point has a stray file in it does not take the role (it would fail to
mount): it runs on as a replica, says why once, and takes part again once the
file is gone. Bad input gets one line. Every mount is unmounted and every
process killed afterwards.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import etcdcluster
import pytest
from hacluster import HaNodes as Nodes
from hacluster import mounted as _mounted
from harness import Procs, can_mount, cdpfs, force_unmount, wait_until

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs /dev/fuse and CAP_SYS_ADMIN")


TTL = 2  # Nodes' default


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path,
          etcd_cluster: etcdcluster.EtcdCluster, procs: Procs) -> Iterator[Nodes]:
    """Nodes a and b (or the names a test gives as its indirect parameter)."""
    n = Nodes(tmp_path, etcd_cluster, procs, names=getattr(request, "param", ("a", "b")))
    try:
        yield n
    finally:
        n.cleanup()


def test_the_replica_mounts_the_volume_when_the_primary_is_killed(nodes: Nodes) -> None:
    nodes.start_primary_and_replica()
    data = os.urandom(200_000)
    path = nodes.mnt("a") / "acknowledged.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # sync mode: on b when this returns
    killed = time.monotonic()
    nodes.daemons["a"].send_signal(signal.SIGKILL)
    nodes.daemons["a"].wait(timeout=10)
    force_unmount(nodes.mnt("a"))
    wait_until(lambda: _mounted(nodes.mnt("b")), timeout=30, what="b's mount")
    took = time.monotonic() - killed
    assert (nodes.mnt("b") / "acknowledged.bin").read_bytes() == data
    status = nodes.status()
    assert status["primary"] == "b" and status["epoch"] == 2
    assert took < 2 + 4, f"failover took {took:.1f} s"
    # The old primary comes back: a replica of b, with b's newer writes.
    (nodes.mnt("b") / "after.txt").write_text("written on b")
    with open(nodes.mnt("b") / "after.txt") as f:
        os.fsync(f.fileno())
    nodes.start("a")
    wait_until(lambda: nodes.status()["nodes"]["a"]["role"] == "replica", what="a rejoined")
    wait_until(lambda: nodes.status()["nodes"]["a"]["lag"] == 0, what="a caught up")
    assert not _mounted(nodes.mnt("a"))


def test_a_primary_paused_past_its_lease_acknowledges_nothing_on_waking(nodes: Nodes) -> None:
    """SIGSTOP of the primary's daemon for twice the TTL: b takes over meanwhile; a
    write+fsync an application started on a's mount before the pause never succeeds
    (a checks its deadline on waking, before it acknowledges anything); a then gives
    up its mount and rejoins as a replica of b without the write."""
    nodes.start_primary_and_replica()
    with open(nodes.mnt("a") / "before.txt", "w") as f:
        f.write("before the pause")
        f.flush()
        os.fsync(f.fileno())
    result: list[object] = []

    def zombie_write() -> None:
        try:
            fd = os.open(nodes.mnt("a") / "zombie.txt", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, b"written by a paused primary")
                os.fsync(fd)
                result.append("acknowledged")
            finally:
                os.close(fd)
        except OSError as exc:
            result.append(exc.errno)

    daemon = nodes.daemons["a"]
    daemon.send_signal(signal.SIGSTOP)
    try:
        writer = threading.Thread(target=zombie_write, daemon=True)
        writer.start()
        wait_until(lambda: _mounted(nodes.mnt("b")), timeout=30, what="b's mount")
        assert (nodes.mnt("b") / "before.txt").read_text() == "before the pause"
        (nodes.mnt("b") / "after.txt").write_text("written on b")
        time.sleep(2)  # paused for about twice the TTL in all
    finally:
        daemon.send_signal(signal.SIGCONT)
    writer.join(timeout=30)
    # refused by the fence, before anything changed: not a write lost later at unmount
    assert result == [errno.EROFS], f"the paused primary answered {result}"
    wait_until(lambda: nodes.status()["nodes"]["a"]["role"] == "replica", timeout=30,
               what="a a replica")
    wait_until(lambda: not _mounted(nodes.mnt("a")), what="a's mount gone")
    assert not (nodes.mnt("b") / "zombie.txt").exists()
    wait_until(lambda: nodes.status()["nodes"]["a"]["lag"] == 0, what="a caught up")


def test_a_sigterm_hands_the_role_on_at_once(nodes: Nodes) -> None:
    nodes.start_primary_and_replica()
    (nodes.mnt("a") / "f").write_text("before the handover")
    stopped = time.monotonic()
    nodes.daemons["a"].send_signal(signal.SIGTERM)
    assert nodes.daemons["a"].wait(timeout=20) == 0
    assert not _mounted(nodes.mnt("a"))
    wait_until(lambda: _mounted(nodes.mnt("b")), timeout=30, what="b's mount")
    took = time.monotonic() - stopped
    assert (nodes.mnt("b") / "f").read_text() == "before the handover"
    assert took < 2, f"a planned stop still waited for the lease: {took:.1f} s"


def test_a_switchover_moves_the_role_and_back_with_nothing_lost(nodes: Nodes) -> None:
    nodes.start_primary_and_replica()
    (nodes.mnt("a") / "from-a.txt").write_text("written on a, never fsynced")
    out = cdpfs("ha", "switchover", nodes.cluster, "b", env=nodes.env).stdout
    assert "node b is the primary" in out
    wait_until(lambda: _mounted(nodes.mnt("b")), what="b's mount")
    assert not _mounted(nodes.mnt("a"))
    assert (nodes.mnt("b") / "from-a.txt").read_text() == "written on a, never fsynced"
    (nodes.mnt("b") / "from-b.txt").write_text("written on b")
    wait_until(lambda: nodes.status()["nodes"]["a"]["role"] == "replica", what="a a replica")
    cdpfs("ha", "switchover", nodes.cluster, "a", env=nodes.env)
    wait_until(lambda: _mounted(nodes.mnt("a")), what="a's mount again")
    assert (nodes.mnt("a") / "from-b.txt").read_text() == "written on b"
    assert (nodes.mnt("a") / "from-a.txt").read_text() == "written on a, never fsynced"
    status = nodes.status()
    assert status["primary"] == "a" and status["epoch"] == 3
    proc = cdpfs("ha", "promote", nodes.cluster, "a", check=False, env=nodes.env)
    assert proc.returncode == 1 and "primary already" in proc.stderr


def test_bad_input_is_one_line(nodes: Nodes, tmp_path: Path) -> None:
    env = nodes.env
    cases = [
        ["ha", "status", "no-such-cluster"],
        ["ha", "create", nodes.cluster, "--volume", nodes.store("a")],  # exists already
        ["ha", "run", nodes.cluster, "nobody"],
        ["ha", "join", nodes.cluster, "c", "--store", tmp_path / "c", "--address", "nowhere"],
        ["ha", "create", "bad/name", "--volume", nodes.store("a")],
        ["ha", "status", nodes.cluster, "--etcd", "https://127.0.0.1:1"],
        ["ha", "switchover", nodes.cluster, "nobody"],
        ["ha", "switchover", nodes.cluster, "b"],  # its daemon is not running
        ["ha", "promote", nodes.cluster, "b", "--force"],
    ]
    for args in cases:
        proc = cdpfs(*args, check=False, env=env, timeout=60)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cdpfs: error: "), (args, proc.stderr)
    # nothing changed: the cluster still has its two nodes and no primary
    status = nodes.status()
    assert sorted(status["nodes"]) == ["a", "b"] and status["primary"] is None


# --- a node that cannot mount ------------------------------------------------------------

STRAY = "is not empty"  # what check_mountpoint says of a mount point with a file in it


def _write_fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _kill(nodes: Nodes, n: str) -> None:
    nodes.daemons[n].send_signal(signal.SIGKILL)
    nodes.daemons[n].wait(timeout=10)
    force_unmount(nodes.mnt(n))


def _said(nodes: Nodes, n: str, what: str) -> int:
    """How many lines of node ``n``'s log say ``what``."""
    log = (nodes.base / f"{n}.log").read_text(errors="replace")
    return sum(what in line for line in log.splitlines())


@pytest.mark.parametrize("nodes", [("a", "b", "c")], indirect=True)
def test_a_replica_with_a_stray_file_in_its_mount_point_leaves_the_role_to_another(
        nodes: Nodes) -> None:
    """A stray file in b's mount point: when the primary dies, c takes over (b would
    win and fail to mount); b runs on as a replica and says why once; a switchover
    to b is refused with the reason; once the file is gone b takes the role."""
    nodes.start_primary_and_replica()
    stray = nodes.mnt("b") / "stray.txt"
    stray.write_text("left in the mount point")
    _write_fsynced(nodes.mnt("a") / "acknowledged.bin", data := os.urandom(100_000))
    _kill(nodes, "a")
    wait_until(lambda: _mounted(nodes.mnt("c")), timeout=30, what="c's mount")
    assert nodes.daemons["b"].poll() is None, "b's daemon exited"
    assert _said(nodes, "b", "cannot serve") == _said(nodes, "b", STRAY) == 1
    assert nodes.primary() == "c"
    assert (nodes.mnt("c") / "acknowledged.bin").read_bytes() == data
    status = nodes.status()["nodes"]["b"]
    assert status["role"] == "replica" and STRAY in status["cannot_serve"]
    assert not _mounted(nodes.mnt("b")) and stray.exists()
    shown = cdpfs("ha", "status", nodes.cluster, env=nodes.env).stdout
    assert f"cannot serve, so it does not campaign: {nodes.mnt('b')}: {STRAY}" in shown
    refused = cdpfs("ha", "switchover", nodes.cluster, "b", check=False, env=nodes.env)
    assert refused.returncode == 1 and STRAY in refused.stderr
    assert nodes.primary() == "c"
    stray.unlink()
    wait_until(lambda: nodes.status()["nodes"]["b"]["cannot_serve"] is None,
               what="b eligible again")
    cdpfs("ha", "switchover", nodes.cluster, "b", env=nodes.env)
    wait_until(lambda: _mounted(nodes.mnt("b")), what="b's mount")
    assert (nodes.mnt("b") / "acknowledged.bin").read_bytes() == data
    assert _said(nodes, "b", "cannot serve") == _said(nodes, "b", STRAY) == 1
    assert _said(nodes, "b", "can serve the volume again") == 1


def test_the_only_replica_with_a_stray_file_takes_the_role_once_it_is_gone(
        nodes: Nodes) -> None:
    """Two nodes, a stray file in b's mount point, a killed: no node holds the role,
    b's daemon runs on (no exit, no restart loop) and says why once; the file
    removed, b takes over within a few TTLs with every fsynced write."""
    nodes.start_primary_and_replica()
    stray = nodes.mnt("b") / "stray.txt"
    stray.write_text("left in the mount point")
    data = {f"f{i}": os.urandom(20_000) for i in range(5)}
    for name, content in data.items():
        _write_fsynced(nodes.mnt("a") / name, content)
    _kill(nodes, "a")
    wait_until(lambda: nodes.primary() is None, timeout=3 * TTL, what="a's lease gone")
    until = time.monotonic() + 2 * TTL  # b would have won and failed by then
    while time.monotonic() < until:
        assert nodes.daemons["b"].poll() is None, "b's daemon exited"
        assert nodes.primary() is None and not _mounted(nodes.mnt("b"))
        time.sleep(0.2)
    status = nodes.status()["nodes"]["b"]
    assert status["role"] == "replica" and STRAY in status["cannot_serve"]
    assert _said(nodes, "b", "cannot serve") == _said(nodes, "b", STRAY) == 1
    stray.unlink()
    removed = time.monotonic()
    wait_until(lambda: _mounted(nodes.mnt("b")), timeout=30, what="b's mount")
    took = time.monotonic() - removed
    assert took < 3 * TTL, f"b took {took:.1f} s to take over"
    for name, content in data.items():
        assert (nodes.mnt("b") / name).read_bytes() == content
    assert nodes.primary() == "b" and nodes.daemons["b"].poll() is None
    assert _said(nodes, "b", "cannot serve") == _said(nodes, "b", STRAY) == 1
    assert _said(nodes, "b", "can serve the volume again") == 1
