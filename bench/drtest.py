"""DR test benchmark (issue 13): a replica's lag while DR tests run on it, against
its lag without.

A mounted primary ships (async) to ``cdpfs replica serve`` on the same machine;
a writer commits a row to a SQLite database on the primary every 10 ms (each
commit an fsync). The replica's lag is sampled every 50 ms, from the stores
themselves: records the replica lacks, and the age of the oldest of them
(0 when it has everything). First for ``--seconds`` with nothing else running,
then for as long while ``cdpfs replica test`` (the SQLite scenario: a clone,
a mount, ``PRAGMA integrity_check``, a query, removal) runs back to back at
``--nice 0``, then as long at ``--nice N`` (the command's default, 10).
Target: lag p99 during tests (at the default priority) within 10% of (or below)
the p99 without.

Usage: ``python bench/drtest.py [--seconds 30] [--nice 10] [--markdown FILE] [--dir DIR]``
(root).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness
from run import Figure, report_figures, start_run, work_dir

from cdpfs.store import journal
from cdpfs.store.lmdb import Store

log = logging.getLogger("drtest")
SQLITE = Path(__file__).parent.parent / "contrib" / "scenarios" / "sqlite.toml"


class Writer(threading.Thread):
    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db, self.rows, self.stop = db, 0, threading.Event()

    def run(self) -> None:
        con = sqlite3.connect(self.db)
        con.execute("create table if not exists t(x integer, ts integer)")
        while not self.stop.is_set():
            con.execute("insert into t values (?, ?)", (self.rows, time.time_ns()))
            con.commit()
            self.rows += 1
            time.sleep(0.01)
        con.close()


def sample(primary: Store, replica: Path, seconds: float) -> list[tuple[int, float]]:
    """(records behind, seconds behind) every 50 ms for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        have = harness.store_seq(replica)
        with primary.txn() as txn:
            last = journal.last(primary, txn)[0]
            missing = journal.after(primary, txn, have) if last > have else None
        age = (time.time_ns() - missing[1]) / 1e9 if missing else 0.0
        out.append((max(0, last - have), max(0.0, age)))
        time.sleep(0.05)
    return out


def under_tests(primary: Store, replica: Path, seconds: float,
                nice: int) -> tuple[list[float], list[tuple[int, float]]]:
    """Sample the lag while ``cdpfs replica test --nice NICE`` runs back to back:
    (each test's seconds, the samples)."""
    took: list[float] = []
    stop = threading.Event()

    def tester() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            harness.cdpfs("replica", "test", replica, "--scenario", SQLITE, "--set", "DB=app.db",
                          "--set", "TEST_QUERY=select count(*) from t", "--no-keep-failed",
                          "--nice", str(nice))
            took.append(time.perf_counter() - t0)

    t = threading.Thread(target=tester, daemon=True)
    t.start()
    try:
        return took, sample(primary, replica, seconds)
    finally:
        stop.set()
        t.join()


def run(work: Path, seconds: float, nice: int, rows: list[Figure], notes: list[str]) -> None:
    vol = harness.Volume(work, "primary").init()
    replica = work / "replica.store"
    harness.pair_stores(vol.store, replica)
    server = harness.ReplicaServer(replica, work / "serve.log")
    writer = None
    try:
        server.start()
        harness.cdpfs("replica", "add", vol.store, "r1", "--address", server.address)
        vol.mount()
        writer = Writer(vol.mnt / "app.db")
        writer.start()
        harness.wait_until(lambda: harness.store_seq(replica) > 10, what="replication")
        with Store(vol.store, readonly=True) as primary:
            quiet = sample(primary, replica, seconds)
            busy: dict[int, list[tuple[int, float]]] = {}
            tests: dict[int, list[float]] = {}
            for n in (0, nice):
                tests[n], busy[n] = under_tests(primary, replica, seconds, n)
        writer.stop.set()
        writer.join()
        for n, label in ((nice, "during DR tests"), (0, "during DR tests at --nice 0")):
            for i, what in ((1, "s"), (0, "records")):
                for q, name in ((0.5, "p50"), (0.99, "p99")):
                    a = harness.percentile([s[i] for s in busy[n]], q)
                    b = harness.percentile([s[i] for s in quiet], q)
                    row = Figure("lag", f"replica lag {name} {label}", what, a, b,
                                 "without", "with/without")
                    if name == "p99" and what == "s" and n == nice:
                        row.ratio_max = 1.1
                    rows.append(row)
        for n, took in tests.items():
            notes.append(f"--nice {n}: {len(took)} DR tests back to back, "
                         f"{sum(took) / max(1, len(took)):.1f} s each")
        notes.append(f"{writer.rows} rows committed (an fsync each) in {3 * seconds:.0f} s")
        vol.umount()
    finally:
        if writer is not None:
            writer.stop.set()
        server.kill()
        vol.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--nice", type=int, default=10,
                   help="the priority of the tests measured against the target")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    start_run(args.verbose, args.dir)
    rows: list[Figure] = []
    notes: list[str] = []
    errors: list[str] = []
    with work_dir(args.dir, args.keep, "cdpfs-drtest-") as work:
        try:
            run(work, args.seconds, args.nice, rows, notes)
        except (harness.HarnessError, OSError, subprocess.SubprocessError) as exc:
            log.exception("bench failed")
            errors.append(f"bench failed: {exc}")
    report_figures("replica lag during DR tests", rows, notes, errors, args.markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
