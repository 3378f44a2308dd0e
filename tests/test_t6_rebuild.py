"""Bare-metal rebuild: a lost primary made again from its replica's host, or from a
send stream in a file, with real FUSE mounts, real TLS and real processes.

Two hosts are network namespaces on a bridge (``bench/hanet.py``): the primary's
mount ships to a replica server on the other. The primary's store is deleted; on
its host a new identity is made, both sides trust it, and ``cdpfs rebuild``
fetches the replica's store (one run SIGKILLed midway: the rerun takes it up where
it was, it does not start again). The rebuilt store mounts as the primary of a new
epoch with the volume's id and lineage; its old replica, added again, follows it
from where it is (no full resync) while writes go on, and ``verify --compare``
finds both identical. Bad input (nothing listening, a replica that does not trust
the new store) gets one line and exit status 1. A rebuild from a file is killed
and rerun the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hanet import Net
from harness import (
    CLI,
    HarnessError,
    Volume,
    can_make_netns,
    can_mount,
    cdpfs,
    force_unmount,
    log_problems,
    settle,
    stop_process,
    store_seq,
    wait_until,
)

from cdpfs.replication import stream
from cdpfs.store import epochs, journal
from cdpfs.store.lmdb import Store

pytestmark = [
    pytest.mark.skipif(not can_mount(), reason="needs /dev/fuse and CAP_SYS_ADMIN"),
    pytest.mark.skipif(not can_make_netns(), reason="needs CAP_NET_ADMIN and ip(8)"),
]

PORT = 7400


def _run(net: Net, host: str, *args: str | os.PathLike[str],
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """``cdpfs ARGS`` on ``host`` (its network only: mounts are seen everywhere)."""
    proc = subprocess.run([*net.prefix(host), *CLI, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise HarnessError(f"cdpfs {' '.join(map(str, args))} on {host} failed "
                           f"({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def _error(net: Net, host: str, *args: str | os.PathLike[str]) -> str:
    """The one error line of a command that must fail with exit status 1."""
    proc = _run(net, host, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("cdpfs: error: ") and "Traceback" not in proc.stderr
    return lines[0]


class Server:
    """``cdpfs replica serve`` on a host of ``net``; its log kept across restarts."""

    def __init__(self, net: Net, host: str, store: Path, log: Path) -> None:
        self.net, self.host, self.store, self.log = net, host, store, log
        self.address = f"{net.ip(host)}:{PORT}"
        self.proc: subprocess.Popen[bytes] | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> None:
        before = self.text().count(" listening on ")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.net.prefix(self.host), *CLI, "replica", "serve", str(self.store),
                 "--listen", self.address], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait_until(lambda: self.text().count(" listening on ") > before or
                   self.proc is None or self.proc.poll() is not None,
                   what="the replica server to listen")
        assert self.proc.poll() is None, self.text()[-2000:]

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@pytest.fixture
def net() -> Iterator[Net]:
    hosts = Net(("primary", "replica"))
    try:
        yield hosts
    finally:
        hosts.close()


def _fill(mnt: Path, n: int, size: int, prefix: str) -> dict[str, bytes]:
    files = {f"{prefix}{i:03d}": os.urandom(size) for i in range(n)}
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    settle(mnt)
    return files


def _identity(path: Path) -> tuple[str, list[tuple[int, int]], int]:
    """(volume id, lineage, newest seq) of a store nothing serves right now, or one a
    replica server serves (read-only beside it)."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        return store.uuid, epochs.lineage(store, txn), journal.top(store, txn)


def _kill_midway(args: list[str], target: Path) -> int:
    """Start ``args`` (a rebuild into ``target``), SIGKILL it once it has applied
    records and before it is done; the newest record the target holds then."""
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_until(lambda: store_seq(target) > 0 or proc.poll() is not None, timeout=120,
                   what="the rebuild to apply its first records")
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"it ended before the kill: {err!r}"
    return store_seq(target)


def test_a_lost_primary_is_rebuilt_from_its_replicas_host(net: Net, tmp_path: Path) -> None:
    vol = Volume(tmp_path, "primary")
    rstore = tmp_path / "replica.store"
    server = Server(net, "replica", rstore, tmp_path / "replica.log")
    try:
        _run(net, "primary", "init", vol.store)
        for store, name in ((vol.store, "primary"), (rstore, "r1")):
            _run(net, "primary", "replica", "keygen", store, "--name", name)
        _run(net, "primary", "replica", "trust", vol.store, rstore / "tls" / "node.crt",
             "--name", "r1")
        _run(net, "primary", "replica", "trust", rstore, vol.store / "tls" / "node.crt",
             "--name", "primary")
        server.start()
        _run(net, "primary", "replica", "add", vol.store, "r1", "--address", server.address)
        _run(net, "primary", "mount", vol.store, vol.mnt)
        files = _fill(vol.mnt, 24, 2 << 20, "big")  # a stream of several frames
        files |= _fill(vol.mnt, 40, 3000, "small")
        _run(net, "primary", "bookmark", "before-loss", "--volume", vol.mnt)
        files |= _fill(vol.mnt, 3, 1000, "late")
        top = store_seq(vol.store)
        wait_until(lambda: store_seq(rstore) >= top, timeout=120, what="the replica at #top")
        uuid, line, _ = _identity(vol.store)
        vol.kill()  # the primary's machine is lost, and its disk with it
        shutil.rmtree(vol.store)

        # The new machine: an identity; the replica is not told of it yet.
        _run(net, "primary", "replica", "keygen", vol.store, "--name", "primary")
        _run(net, "primary", "replica", "trust", vol.store, rstore / "tls" / "node.crt",
             "--name", "r1")
        nothing = f"{net.ip('replica')}:{PORT + 1}"
        line1 = _error(net, "primary", "rebuild", vol.store, "--from", nothing)
        assert f"{nothing}: cannot connect" in line1, line1
        line1 = _error(net, "primary", "rebuild", vol.store, "--from", server.address)
        assert "does not trust" in line1 and "replica trust" in line1, line1
        assert sorted(os.listdir(vol.store)) == ["tls"]  # nothing made
        # The replica trusts the new certificate (read when its server starts).
        _run(net, "replica", "replica", "trust", rstore, vol.store / "tls" / "node.crt",
             "--name", "primary")
        server.stop()
        server.start()

        rebuild = [*net.prefix("primary"), *CLI, "rebuild", str(vol.store), "--from",
                   server.address]
        at = _kill_midway(rebuild, vol.store)
        assert 0 < at < top
        assert stream.pending(vol.store)  # a partial receive: resumable
        cdpfs("verify", vol.store)  # and sound
        assert "is a replica" in _error(net, "primary", "mount", vol.store, vol.mnt)
        out = _run(net, "primary", "rebuild", vol.store, "--from", server.address).stdout
        assert re.search(rf"volume {uuid} up to #{top}, tree hash \w+ \(checked against "
                         r"the sender's\), primary of epoch 1", out), out
        got = re.search(r"received (\d+) records, [\d.]+ MiB in [\d.]+s, taking up the "
                        rf"rebuild left at #{at}\b", out)
        assert got and int(got[1]) == top - at, out  # the rest, not all again
        assert f"cdpfs replica add {vol.store} r1 --address {server.address}" in out, out
        assert "sending a stream of this replica's history after #" in server.text()

        new_uuid, new_line, new_top = _identity(vol.store)
        assert (new_uuid, new_top) == (uuid, top)
        assert new_line == [*line, (line[-1][0] + 1, top + 1)]
        cdpfs("verify", vol.store)

        # The rebuilt store is the primary; its old replica follows it, no resync.
        _run(net, "primary", "mount", vol.store, vol.mnt)
        for name, data in files.items():
            assert (vol.mnt / name).read_bytes() == data, name
        assert (vol.mnt / "@before-loss" / "big000").read_bytes() == files["big000"]
        _run(net, "primary", "replica", "add", vol.store, "r1", "--address", server.address)
        _fill(vol.mnt, 10, 100_000, "after")  # writes go on
        last = store_seq(vol.store)
        wait_until(lambda: store_seq(rstore) >= last, timeout=60,
                   what="the replica to follow the rebuilt primary")
        cdpfs("umount", vol.mnt)
        server.stop()
        assert f"resuming after #{top}" in server.text()
        assert "full resync" not in server.text()
        assert not log_problems(server.log)  # a rebuild killed midway costs its link only
        assert _identity(rstore)[1] == _identity(vol.store)[1]
        assert "identical" in cdpfs("verify", "--compare", vol.store, rstore).stdout
    finally:
        server.stop()
        force_unmount(vol.mnt)


def test_a_primary_is_rebuilt_from_a_send_stream_in_a_file(tmp_path: Path) -> None:
    vol = Volume(tmp_path, "vol")
    try:
        vol.init()
        vol.mount()
        files = _fill(vol.mnt, 16, 2 << 20, "f")
        vol.umount()
        uuid, line, top = _identity(vol.store)
        sent = tmp_path / "vol.stream"
        with open(sent, "wb") as f:
            stream.send_file(vol.store, f)
        shutil.rmtree(vol.store)  # lost; the stream is kept elsewhere

        rebuild = [*CLI, "rebuild", str(vol.store), "--from", str(sent)]
        at = _kill_midway(rebuild, vol.store)
        assert 0 < at < top
        cdpfs("verify", vol.store)
        out = cdpfs("rebuild", vol.store, "--from", sent).stdout
        got = re.search(rf"volume {uuid} up to #{top}, tree hash \w+ \(checked against the "
                        r"sender's\).*received (\d+) records, .* taking up the rebuild left at "
                        rf"#{at}\b", out, re.S)
        assert got and int(got[1]) == top - at, out  # the same file, what it lacked applied
        assert _identity(vol.store) == (uuid, [*line, (line[-1][0] + 1, top + 1)], top)
        line1 = cdpfs("rebuild", vol.store, "--from", sent, check=False).stderr
        assert "holds volume" in line1 and "already" in line1, line1
        vol.mount()
        for name, data in files.items():
            assert (vol.mnt / name).read_bytes() == data, name
        (vol.mnt / "new").write_bytes(b"written on the rebuilt primary")
        vol.umount()
        vol.verify()
    finally:
        with contextlib.suppress(Exception):
            vol.cleanup()
