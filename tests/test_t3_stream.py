"""Send and receive around real mounts and a real full disk.

A mounted volume is sent by its mount point while it is written to, and the copy,
mounted read-only, shows the tree the mount showed at the point (GNU ``diff -r``
against the ``@`` directory of that point). A receive into a mounted store is
refused in one line. A receive onto a filesystem that fills keeps what it
applied, says so in one line with the token, and completes once there is room;
nothing received before is lost and ``verify`` passes throughout.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Volume, cdpfs

from cdpfs.store import journal
from cdpfs.store.lmdb import Store

MIB = 1 << 20


def newest(store: Path) -> tuple[int, int]:
    with Store(store, readonly=True) as st, st.txn() as txn:
        return journal.last(st, txn)


def test_a_mounted_volume_sent_while_written_to(volume: Volume, make_volume: type[Volume],
                                                tmp_path: Path) -> None:
    for n in range(20):
        (volume.mnt / f"f{n}").write_bytes(os.urandom(300_000))
    (volume.mnt / "d").mkdir()
    os.symlink("../f1", volume.mnt / "d" / "link")
    stop = threading.Event()

    def writer() -> None:  # the volume changes while it is sent
        n = 0
        while not stop.is_set():
            (volume.mnt / f"w{n % 50}").write_bytes(os.urandom(50_000))
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        stream = tmp_path / "vol.stream"
        proc = cdpfs("send", volume.mnt, "-o", stream)
    finally:
        stop.set()
        thread.join()
    seq = int(proc.stdout.split("sent #")[1].split()[0])
    copy = make_volume("copy")
    cdpfs("receive", copy.store, "-i", stream)
    cdpfs("verify", copy.store)
    # a receive never writes under a live mount: the mounted store refuses
    volume.sync()
    more = tmp_path / "more.stream"
    cdpfs("send", volume.store, "--from", f"#{seq}", "-o", more)
    proc = cdpfs("receive", volume.store, "-i", more, check=False)
    assert proc.returncode == 1 and "in use by mount" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # the copy shows what the mount showed at the point (named by its seq: records
    # stamped within one tick of the coarse clock share a time, and a time names
    # the newest of them, which the writer may have made after the send's point)
    assert newest(copy.store)[0] == seq
    at = volume.mnt / f"@#{seq}"
    copy.mount("--follow")
    try:
        diff = subprocess.run(["diff", "-r", "--no-dereference", str(at), str(copy.mnt)],
                              capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout[:2000]
    finally:
        copy.umount()
    cdpfs("receive", copy.store, "-i", more)
    assert newest(copy.store)[0] > seq


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs at tmp_path/small (made larger by the test), unmounted after."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_keeps_what_arrived_and_resumes_once_there_is_room(
        tmp_path: Path, small_fs: Path) -> None:
    from test_t2_stream import fill, points  # the same volumes as the command line tests

    src = tmp_path / "src"
    fill(src, 24, 4 * MIB, seed=11)  # 96 MiB that does not compress: twice the room
    stream = tmp_path / "s"
    cdpfs("send", src, "-o", stream)
    target = small_fs / "copy"
    proc = cdpfs("receive", target, "-i", stream, check=False)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cdpfs send --resume" in lines[0], proc.stderr
    assert "space" in lines[0].lower(), lines[0]
    token = lines[0].split("--resume ")[1].split()[0]
    cdpfs("verify", target)
    applied = newest(target)[0]
    assert 0 < applied < newest(src)[0]
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_fs)], check=True)
    resumed = tmp_path / "resumed"
    cdpfs("send", src, "--resume", token, "-o", resumed)
    cdpfs("receive", target, "-i", resumed)
    cdpfs("verify", target)
    assert points(target) == points(src)
