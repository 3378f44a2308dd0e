"""Scheduled backups from a replica (``replica serve --backup-every``): real processes.

A mounted primary ships (async) to ``cdpfs replica serve ... --backup-every 2s
--backup-to DIR --keep 2`` while a writer appends and fsyncs. The server makes a
backup every period in a process of its own (``cdpfs backup``, niced), each
verified before it gets its name; at most two are kept. Meanwhile the replica
keeps applying (sampled while a backup's temporary files exist) and is never
resynced in full. A backup received (``cdpfs receive``) gives the primary's tree at
its point. ``cdpfs status`` of the replica shows the last backup, and OVERDUE once
the server has been stopped for two periods.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from conftest import Served
from harness import cdpfs, store_seq, wait_replicated, wait_until
from test_t3_history import one_line_error

from cdpfs import backups
from cdpfs.history.treehash import hash_of


class Appender(threading.Thread):
    """Appends 4 KiB and fsyncs, every 20 ms, until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.writes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with open(self.path, "ab") as f:
            while not self.stop.wait(0.02):
                f.write(os.urandom(4096))
                f.flush()
                os.fsync(f.fileno())
                self.writes += 1


class Sampler(threading.Thread):
    """Notes the replica's newest record, and whether a backup is under way (its
    temporary files are in the directory), every 50 ms until stopped."""

    def __init__(self, replica: Path, directory: Path) -> None:
        super().__init__(daemon=True)
        self.replica = replica
        self.directory = directory
        self.samples: list[tuple[int, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            busy = any(n.startswith(backups.TEMP) for n in os.listdir(self.directory))
            self.samples.append((store_seq(self.replica), busy))


def _moved_while_busy(samples: list[tuple[int, bool]]) -> list[int]:
    """Records applied during each stretch of samples taken while a backup ran."""
    moved: list[int] = []
    first: int | None = None
    last = 0
    for seq, busy in [*samples, (0, False)]:
        if busy:
            first = seq if first is None else first
            last = seq
        elif first is not None:
            moved.append(last - first)
            first = None
    return moved


def test_a_replica_server_backs_up_on_a_schedule_while_it_receives(
        served: Served, tmp_path: Path) -> None:
    vol, replica, server = served
    (vol.mnt / "big").write_bytes(os.urandom(4 << 20))  # a backup takes a while
    wait_replicated(vol, replica)
    out = tmp_path / "backups"
    out.mkdir()
    server.kill()
    server.start("--backup-every", "2s", "--backup-to", str(out), "--keep", "2")
    writer = Appender(vol.mnt / "log")
    sampler = Sampler(replica, out)
    writer.start()
    sampler.start()
    try:
        wait_until(lambda: server.text().count("scheduled backup: backup of") >= 3,
                   timeout=120, what="three scheduled backups")
    finally:
        writer.stop.set()
        sampler.stop.set()
        writer.join()
        sampler.join()
    last = wait_replicated(vol, replica)
    # Receiving never paused: the replica applied records while each backup ran.
    moved = _moved_while_busy(sampler.samples)
    assert len([m for m in moved if m > 0]) >= 2, (moved, sampler.samples)
    assert "full resync" not in server.text()
    # At most two kept, all verified; listed by cdpfs backups.
    listed = backups.listing(out)
    assert 1 <= len(listed) <= 3 and all(b.verified for b in listed), listed
    lines = cdpfs("backups", out).stdout.splitlines()
    assert len(lines) == len(listed) and all(" verified  send  " in ln for ln in lines), lines
    newest = listed[-1].record
    assert newest is not None and newest.every == 2
    # A backup received into a new store gives the primary's tree at its point.
    cdpfs("receive", tmp_path / "restored", "-i", listed[-1].path)
    assert store_seq(tmp_path / "restored") == newest.seq
    assert hash_of(tmp_path / "restored", newest.seq) == hash_of(vol.store, newest.seq) == \
        newest.tree
    # Status right after a backup (a period is about as long as a backup here).
    done = server.text().count("scheduled backup: backup of")
    wait_until(lambda: server.text().count("scheduled backup: backup of") > done,
               timeout=30, what="one more backup")
    status = cdpfs("status", replica).stdout
    assert "backup       last " in status and "every 2s" in status, status
    assert "verified" in status and "MiB, send)" in status, status
    # Stopped: a backup under way removes what it wrote; two periods later, OVERDUE.
    assert server.stop() == 0
    assert not [n for n in os.listdir(out) if n.startswith(backups.TEMP)]
    assert len(backups.listing(out)) <= 2
    wait_until(lambda: "OVERDUE" in cdpfs("status", replica).stdout, timeout=30,
               what="status to say OVERDUE")
    assert not server.problems(), server.problems()
    assert last >= newest.seq and writer.writes > 50


def test_a_tar_backup_of_a_receiving_replica_imports_as_the_primarys_tree(
        served: Served, tmp_path: Path) -> None:
    """``cdpfs backup REPLICA --format tar`` beside the replica server, while the
    primary is written: verified, and ``cdpfs import`` of it is the primary's tree
    at its point."""
    vol, replica, server = served
    (vol.mnt / "big").write_bytes(os.urandom(4 << 20))
    (vol.mnt / "dir").mkdir()
    os.symlink("../big", vol.mnt / "dir" / "link")
    wait_replicated(vol, replica)
    shown = cdpfs("status", replica).stdout.splitlines()  # no backup made: nothing said
    assert not [line for line in shown if line.startswith("backup")], shown
    out = tmp_path / "backups"
    out.mkdir()
    writer = Appender(vol.mnt / "log")
    writer.start()
    try:
        wait_until(lambda: writer.writes > 10, what="the first writes")
        before = store_seq(replica)
        said = cdpfs("backup", replica, "--to", out, "--format", "tar").stdout
        during = store_seq(replica) - before
    finally:
        writer.stop.set()
        writer.join()
    assert " verified: " in said and said.strip().endswith("s"), said
    assert during > 0, "the replica applied nothing while the backup ran"
    (made,) = backups.listing(out)
    assert made.verified and made.record is not None and made.record.format == "tar"
    cdpfs("import", made.path, tmp_path / "imported")
    seq = made.record.seq
    assert hash_of(tmp_path / "imported", store_seq(tmp_path / "imported")) == \
        hash_of(vol.store, seq) == made.record.tree
    assert "full resync" not in server.text()
    assert f"#{seq}, verified" in cdpfs("status", replica).stdout


def test_a_bad_backup_schedule_is_refused_before_serving(served: Served,
                                                         tmp_path: Path) -> None:
    _, replica, _ = served
    for args, words in ((["--backup-every", "1d"], "go together"),
                        (["--keep", "2"], "go together"),
                        (["--backup-every", "soon", "--backup-to", str(tmp_path)], "soon"),
                        (["--backup-every", "0s", "--backup-to", str(tmp_path)], "longer"),
                        (["--backup-every", "1d", "--backup-to", str(tmp_path / "no")],
                         "no such directory"),
                        (["--backup-every", "1d", "--backup-to", str(tmp_path), "--format",
                          "zip"], "zip")):
        proc = cdpfs("replica", "serve", replica, "--listen", "127.0.0.1:1", *args,
                     check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode in (1, 2) and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("cdpfs: error: ") and words in lines[0], (args, lines)
    proc = cdpfs("backups", tmp_path / "no", check=False)
    assert "not a directory of backups" in one_line_error(proc)
