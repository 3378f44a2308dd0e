"""DR tests on a live replica (``cdpfs replica test``): real processes on loopback.

A mounted primary ships (async) to ``cdpfs replica serve`` while a writer keeps
committing rows to a SQLite database on it. The DR test clones the replica,
mounts the clone, runs the SQLite scenario's test steps on it and compares tree
hashes with the primary; the replica keeps applying the whole time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import HAVE_FUSE, Served
from harness import (
    ReplicaServer,
    Volume,
    cdpfs,
    free_port,
    pair_stores,
    wait_replicated,
    wait_until,
)
from test_t3_history import one_line_error
from test_t4_apps import Postgres

from cdpfs.store.lmdb import Store

SQLITE = Path(__file__).parent.parent / "contrib" / "scenarios" / "sqlite.toml"


@pytest.fixture
def served(served: Served) -> Served:
    """A mounted primary with a SQLite database, shipping (async) to a replica server."""
    vol = served[0]
    subprocess.run(["sqlite3", str(vol.mnt / "app.db"),
                    "PRAGMA journal_mode=WAL; create table t(x integer);"],
                   check=True, capture_output=True)
    return served


class Writer(threading.Thread):
    """Commits a row a time to the primary's database until stopped."""

    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.rows = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            subprocess.run(["sqlite3", str(self.db), f"insert into t values ({self.rows})"],
                           check=True, capture_output=True)
            self.rows += 1


def _bookmarks(store: Path) -> list[str]:
    return cdpfs("bookmarks", "--volume", store).stdout.split()


def test_a_dr_test_passes_on_a_replica_that_keeps_receiving(
        served: Served, tmp_path: Path) -> None:
    vol, replica, server = served
    writer = Writer(vol.mnt / "app.db")
    writer.start()
    try:
        wait_until(lambda: writer.rows > 20, what="the first rows")
        before = wait_replicated(vol, replica)
        out = cdpfs("replica", "test", replica, "--scenario", SQLITE, "--set", "DB=app.db",
                    "--set", "TEST_QUERY=select count(*) from t", "--primary", vol.store).stdout
        rows_during = writer.rows
        after = wait_replicated(vol, replica)
    finally:
        writer.stop.set()
        writer.join()
    assert "passed" in out and "matches the primary" in out, out
    assert out.count("ok:") == 2, out
    assert after > before, "the replica applied nothing while the test ran"
    assert rows_during > 20
    tested = [b for b in _bookmarks(replica) if b.startswith("tested-")]
    assert len(tested) == 1, _bookmarks(replica)
    # The clone and its mount are gone; the replica holds no clone's hold.
    assert not list(tmp_path.glob("replica.store.drtest-*"))
    with Store(replica, readonly=True) as st, st.txn() as txn:
        holds = [bytes(k) for k, _ in txn.cursor(db=st.db["bookmarks"])]
    assert not [h for h in holds if b"clone" in h], holds
    assert "full resync" not in server.text()
    # The bookmark stays through more shipping (the primary's bookmarks are mirrored).
    (vol.mnt / "more").write_text("more")
    wait_replicated(vol, replica)
    cdpfs("bookmark", "after-test", "--volume", vol.mnt)
    wait_until(lambda: "after-test" in _bookmarks(replica), what="the primary's bookmark")
    assert tested[0] in _bookmarks(replica)
    status = cdpfs("status", replica).stdout
    assert "dr test" in status and "passed" in status and tested[0] in status, status


def test_a_failing_dr_test_names_its_step_and_keeps_the_clone(
        served: Served, tmp_path: Path) -> None:
    vol, replica, _ = served
    wait_replicated(vol, replica)
    proc = cdpfs("replica", "test", replica, "--scenario", SQLITE, "--set", "DB=app.db",
                 "--set", "TEST_QUERY=select * from no_such_table", check=False)
    line = one_line_error(proc)
    assert "step 2 of 2" in line and "no_such_table" in line, line
    kept = list(tmp_path.glob("replica.store.drtest-*"))
    assert len(kept) == 1 and str(kept[0]) in line, (kept, line)
    assert not [b for b in _bookmarks(replica) if b.startswith("tested-")]
    assert "FAILED" in cdpfs("status", replica).stdout
    # The kept clone is an ordinary clone: mountable, then deleted.
    probe = Volume(tmp_path, "probe")
    probe.store = kept[0]
    try:
        probe.mount()
        assert (probe.mnt / "app.db").exists()
        probe.umount()
    finally:
        probe.cleanup()
    cdpfs("clone", "--delete", kept[0])


def test_a_corrupt_database_on_the_replica_fails_the_integrity_step(
        served: Served, tmp_path: Path) -> None:
    """A database damaged on the primary (and so on the replica) fails the check."""
    vol, replica, _ = served
    subprocess.run(["sqlite3", str(vol.mnt / "app.db"),
                    "PRAGMA journal_mode=DELETE; insert into t select value from "
                    "generate_series(1, 20000); create index ix on t(x);"],
                   check=True, capture_output=True)
    with open(vol.mnt / "app.db", "r+b") as f:  # scribble over pages of the table
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        f.write(os.urandom(16384))
        os.fsync(f.fileno())
    wait_replicated(vol, replica)
    proc = cdpfs("replica", "test", replica, "--scenario", SQLITE, "--set", "DB=app.db",
                 "--no-keep-failed", check=False)
    line = one_line_error(proc)
    assert "step 1 of 2" in line and "integrity_check" in line, line
    assert not list(tmp_path.glob("replica.store.drtest-*"))


def test_a_dr_test_of_a_primary_store_is_refused(served: Served) -> None:
    vol, _, _ = served
    line = one_line_error(cdpfs("replica", "test", vol.store, "--scenario", SQLITE,
                                "--set", "DB=app.db", check=False))
    assert "not a replica store" in line, line


def test_a_dr_test_runs_below_the_replica_servers_cpu_priority(
        served: Served, tmp_path: Path) -> None:
    """The test's steps and the clone's mount daemon run niced (--nice, 10 by default),
    so that on a busy machine the test waits rather than replication."""
    _, replica, _ = served
    probe = tmp_path / "nice.toml"
    probe.write_text('description = "report priorities"\n[[test]]\nrun = """'
                     'd=$(pgrep -f -- "cli mount $CDPFS_CLONE" | head -1); '
                     'echo "steps $(nice) daemon $(ps -o ni= -p $d)" >&2; exit 1"""\n')
    for args, want in (([], "steps 10 daemon 10"), (["--nice", "3"], "steps 3 daemon 3")):
        line = one_line_error(cdpfs("replica", "test", replica, "--scenario", probe, *args,
                                    "--no-keep-failed", check=False))
        assert want in re.sub(r"\s+", " ", line), line
    proc = cdpfs("replica", "test", replica, "--scenario", probe, "--nice", "20", check=False)
    assert proc.returncode == 2 and "'--nice': 20 is not in the range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("replica.store.drtest-*"))


def test_replica_serve_runs_dr_tests_on_a_schedule(served: Served) -> None:
    vol, replica, server = served
    wait_replicated(vol, replica)
    server.kill()
    server.start("--test-every", "1s", "--test-scenario", str(SQLITE),
                 "--test-set", "DB=app.db")
    (vol.mnt / "while-serving").write_text("x")

    def tested() -> list[str]:
        return [b for b in _bookmarks(replica) if b.startswith("tested-")]

    wait_until(lambda: len(tested()) >= 2, timeout=90, what="two scheduled DR tests")
    wait_replicated(vol, replica)
    status = cdpfs("status", replica).stdout
    assert "passed" in status and "every 1s" in status, status
    assert "scheduled DR test" in server.text()


def test_a_bad_schedule_is_refused_before_serving(served: Served) -> None:
    _, replica, _ = served
    for args, words in ((["--test-every", "1d"], "go together"),
                        (["--test-every", "soon", "--test-scenario", str(SQLITE),
                          "--test-set", "DB=x"], "soon"),
                        (["--test-every", "1d", "--test-scenario", str(SQLITE)], "DB")):
        proc = cdpfs("replica", "serve", replica, "--listen", "127.0.0.1:1", *args,
                     check=False)
        assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


POSTGRESQL = Path(__file__).parent.parent / "contrib" / "scenarios" / "postgresql.toml"


@pytest.mark.slow
def test_a_dr_test_starts_postgresql_on_a_clone_while_pgbench_runs() -> None:
    """The primary runs pgbench on its mount and ships to the replica; the DR test
    starts a second server on a clone of the replica, which recovers, answers the
    query and passes pg_amcheck; the primary's load goes on meanwhile."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    base = Path(tempfile.mkdtemp(prefix="cdpfs-drtest-pg-"))  # reachable by postgres
    os.chmod(base, 0o755)
    vol = Volume(base, "pg").init()
    replica = base / "replica.store"
    pair_stores(vol.store, replica)
    server = ReplicaServer(replica, base / "serve.log")
    sock = base / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    pg = Postgres(vol.mnt / "pgdata", sock, base / "pg.log", vol)
    load = None
    try:
        server.start()
        cdpfs("replica", "add", vol.store, "r1", "--address", server.address)
        vol.mount("--allow-other")
        pg.data.mkdir(mode=0o700)
        shutil.chown(pg.data, "postgres", "postgres")
        pg.as_postgres("initdb", "-D", pg.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-instructions", timeout=300)
        pg.start()
        pg.as_postgres("pgbench", "-q", "-i", "-s", "2", timeout=300)
        load = pg.bench_in_background(40)
        time.sleep(3)
        wait_replicated(vol, replica)
        out = cdpfs("replica", "test", replica, "--scenario", POSTGRESQL,
                    "--set", "PGDATA=pgdata", "--set", f"TEST_SOCKETS={sock}",
                    "--set", f"TEST_PORT={free_port()}", "--set",
                    "TEST_QUERY=select count(*) from pgbench_accounts", "--allow-other",
                    "--primary", vol.store, timeout=900).stdout
        assert load.poll() is None, "pgbench stopped while the DR test ran"
        report, _ = load.communicate(timeout=120)
        load = None
        assert out.count(": ok:") == 4 and "passed" in out, out
        assert "matches the primary" in out, out
        failed = re.search(r"number of failed transactions: (\d+)", report)
        assert failed is not None and failed.group(1) == "0", report
        assert [b for b in _bookmarks(replica) if b.startswith("tested-")]
        assert not list(base.glob("replica.store.drtest-*"))
        pg.stop()
        vol.umount()
    finally:
        if load is not None:
            load.kill()
        pg.kill()
        server.kill()
        vol.cleanup()
        if not os.path.ismount(vol.mnt):
            shutil.rmtree(base, ignore_errors=True)
