"""``cdpfs send`` and ``cdpfs receive`` as a user runs them: the real command line on
stores made in this process (no FUSE), through pipes and files.

A full stream piped into a new store and an incremental one after it give a store
with the sender's points and tree; a send to a file is complete under its name or
not there at all. Every bad input is one line and exit status 1: an existing file
without ``--force``, a pruned moment, a truncated or damaged stream, another
volume's, an incremental without its base, a garbled token. A receive or a send
SIGKILLed midway leaves the target as it was or partial and resumable: the token
status shows continues it. ``--progress json`` reports on standard error only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import lmdb
import pytest
from harness import CLI, cdpfs, one_line_error, wait_until

from cdpfs.errors import StoreError
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, LiveStore

MIB = 1 << 20
S = 10**9



def fill(path: Path, files: int, size: int, seed: int, clock: FakeClock | None = None,
         existing: bool = False) -> None:
    """``files`` files of ``size`` random bytes each, one a second."""
    rnd = random.Random(seed)
    clock = clock or FakeClock(1_800_000_000 * S + seed * 10**6 * S)
    with LiveStore(path, clock=clock, existing=existing) as live:
        for n in range(files):
            clock.advance(1)
            fh, _ = live.create(b"s%d-%d" % (seed, n))
            live(live.fs.write, fh, 0, rnd.randbytes(size))
            live(live.fs.release, fh)
        live.sync()


def points(path: Path) -> dict[int, str]:
    """{seq: ""} of every point, with the tree hash of the newest (hashing each point
    of these volumes would take a minute; t1_stream compares every one)."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        seqs = [r.seq for r in journal.records(store, txn)
                if journal.indexed(store, txn, r.seq, r.ts)]
        return {**dict.fromkeys(seqs, ""),
                **({seqs[-1]: tree_hash(store, txn, seqs[-1])[0]} if seqs else {})}


def top(path: Path) -> int:
    with Store(path, readonly=True) as store, store.txn() as txn:
        return journal.top(store, txn)


def _arrived(path: Path) -> bool:
    """Whether a store being received holds records yet (False while it is made)."""
    try:
        return (path / "data.mdb").exists() and top(path) > 0
    except (StoreError, lmdb.Error):
        return False


def sound(path: Path) -> None:
    with Store(path, readonly=True) as store:
        assert verify(store) == []


def pipe(send_args: list[str], receive_args: list[str]) -> tuple[int, int, str]:
    """``cdpfs send ... | cdpfs receive ...``: both exit codes, receive's stderr."""
    sender = subprocess.Popen([*CLI, "send", *send_args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    receiver = subprocess.run([*CLI, "receive", *receive_args], stdin=sender.stdout,
                              capture_output=True, text=True, timeout=300)
    assert sender.stdout is not None
    sender.stdout.close()
    return sender.wait(timeout=60), receiver.returncode, receiver.stderr


def test_piped_full_and_incremental_streams(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    fill(src, 20, 300_000, seed=1)
    base = top(src)
    assert pipe([str(src)], [str(dst)])[:2] == (0, 0)
    fill(src, 10, 300_000, seed=2, existing=True)
    rc = pipe([str(src), "--from", f"#{base}"], [str(dst)])
    assert rc[:2] == (0, 0), rc
    assert points(dst) == points(src)
    sound(dst)
    # to a file: complete under its name, refused over an existing one without --force
    out = tmp_path / "full.stream"
    cdpfs("send", src, "-o", out)
    one_line_error(cdpfs("send", src, "-o", out, check=False), "exists", "--force")
    cdpfs("send", src, "-o", out, "--force")
    proc = cdpfs("receive", tmp_path / "again", "-i", out)
    assert "tree hash" in proc.stdout
    assert points(tmp_path / "again") == points(src)
    # progress as JSON on standard error; the stream on standard output unchanged
    proc = subprocess.run([*CLI, "send", str(src), "--progress", "json"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0
    lines = proc.stderr.decode().strip().splitlines()
    reports = [json.loads(line) for line in lines[:-1]]
    assert reports and reports[-1]["done"] is True and reports[-1]["op"] == "send"
    assert reports[-1]["bytes"] == len(proc.stdout) or reports[-1]["bytes"] <= len(proc.stdout)
    got = subprocess.run([*CLI, "receive", str(tmp_path / "third")], input=proc.stdout,
                         capture_output=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert points(tmp_path / "third") == points(src)


def test_bad_streams_and_arguments_are_one_line(tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    fill(src, 12, 2 * MIB, seed=3)
    fill(other, 3, 1000, seed=4)
    stream = tmp_path / "s"
    cdpfs("send", src, "-o", stream)
    data = stream.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) * 2 // 3])
    proc = cdpfs("receive", tmp_path / "t1", "-i", cut, check=False)
    one_line_error(proc, "receive stopped", "cut short", "kept what arrived",
                   "cdpfs send --resume cdpfs-resume-")
    token = proc.stderr.split("--resume ")[1].split()[0]
    status = cdpfs("status", tmp_path / "t1").stdout
    assert "INCOMPLETE" in status and token in status
    resumed = tmp_path / "resumed"
    cdpfs("send", src, "--resume", token, "-o", resumed)
    assert resumed.stat().st_size < len(data)
    cdpfs("receive", tmp_path / "t1", "-i", resumed)
    assert points(tmp_path / "t1") == points(src)
    assert "INCOMPLETE" not in cdpfs("status", tmp_path / "t1").stdout

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (tmp_path / "flipped").write_bytes(flipped)
    one_line_error(cdpfs("receive", tmp_path / "t2", "-i", tmp_path / "flipped",
                         check=False), "receive stopped")
    one_line_error(cdpfs("receive", other, "-i", stream, check=False), "the stream is of volume")
    incremental = tmp_path / "inc"
    cdpfs("send", src, "--from", f"#{top(src) - 2}", "-o", incremental)
    one_line_error(cdpfs("receive", tmp_path / "t3", "-i", incremental, check=False),
                   "is not a store", f"#{top(src) - 2}")
    assert not (tmp_path / "t3").exists()
    one_line_error(cdpfs("send", src, "--from", "#999999", check=False), "#999999")
    one_line_error(cdpfs("send", src, "--from", "yesterday-ish", check=False))
    one_line_error(cdpfs("send", src, "--resume", token[:-4] + "AAAA", check=False),
                   "not a resume token")
    one_line_error(cdpfs("send", other, "--resume", token, check=False), "of volume")
    one_line_error(cdpfs("send", src, "--resume", token, "--from", "#1", check=False),
                   "--resume")
    one_line_error(cdpfs("receive", tmp_path / "t4", "-i", tmp_path / "missing",
                         check=False), "missing")
    one_line_error(cdpfs("receive", tmp_path / "t5", "-i", src / "data.mdb", check=False),
                   "not a cdpfs send stream")


@pytest.mark.parametrize("who", ["send", "receive"])
def test_a_killed_send_or_receive_leaves_a_resumable_target(tmp_path: Path, who: str) -> None:
    src = tmp_path / "src"
    fill(src, 40, 4 * MIB, seed=5)
    want = points(src)
    rnd = random.Random(6 if who == "send" else 7)
    resumed = 0
    for n in range(2):
        dst = tmp_path / f"dst{n}"
        sender = subprocess.Popen([*CLI, "send", str(src)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        receiver = subprocess.Popen([*CLI, "receive", str(dst)], stdin=sender.stdout,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert sender.stdout is not None
        sender.stdout.close()
        wait_until(lambda d=dst, r=receiver: r.poll() is not None or  # type: ignore[misc]
                   _arrived(d), timeout=60)
        time.sleep(rnd.uniform(0.0, 0.3))  # records arrive for about a second
        (sender if who == "send" else receiver).send_signal(signal.SIGKILL)
        sender.wait(timeout=60)
        receiver.wait(timeout=60)
        if receiver.returncode == 0:  # it was quicker than the kill: nothing to resume
            assert points(dst) == want
            continue
        if not dst.exists() or not os.listdir(dst):
            continue  # killed before its first records: nothing was made
        if top(dst):  # (a store made and killed before its first records has no root)
            sound(dst)
        kept = points(dst)
        assert set(kept) <= set(want)
        if kept:  # the newest point it holds is the sender's
            with Store(src, readonly=True) as store, store.txn() as txn:
                assert tree_hash(store, txn, max(kept))[0] == kept[max(kept)]
        status = cdpfs("status", dst).stdout
        token = status.split("--resume ")[1].split()[0]
        rc = pipe([str(src), "--resume", token], [str(dst)])
        assert rc[:2] == (0, 0), rc
        assert points(dst) == want
        sound(dst)
        resumed += 1
    assert resumed  # (the kills are timed to land while records arrive)
