"""DR tests on a live replica (``cdpfs replica test``): real processes on loopback.

A mounted primary ships (async) to ``cdpfs replica serve`` while a writer keeps
committing rows to a SQLite database on it. The DR test clones the replica,
mounts the clone, runs the SQLite scenario's test steps on it and compares tree
hashes with the primary; the replica keeps applying the whole time. A test cleans
up after itself when a step hangs, when it fails and when it is told to stop; what
a test killed outright leaves, ``replica test --cleanup`` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio
from conftest import HAVE_FUSE, Served
from harness import (
    Procs,
    ReplicaServer,
    Volume,
    cdpfs,
    force_unmount,
    free_port,
    pair_stores,
    wait_replicated,
    wait_until,
)
from test_t3_history import one_line_error
from test_t4_apps import Postgres

from cdpfs.errors import CdpfsError
from cdpfs.history.bookmarks import all_points
from cdpfs.mount.control import holder_pid, live_mount_of
from cdpfs.scenario import Scenario
from cdpfs.store.lmdb import Store
from cdpfs.system import pid_alive

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
    # --json: the result as a document, whether it passed or not (exit status 1)
    proc = cdpfs("replica", "test", replica, "--scenario", SQLITE, "--set", "DB=app.db",
                 "--set", "TEST_QUERY=select * from no_such_table", "--json", check=False)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["passed"] is False and "step 2 of 2" in doc["failed"]
    assert doc["seq"] >= 1 and doc["time"].endswith("Z") and doc["clone_kept"]
    cdpfs("clone", "--delete", doc["clone_kept"])


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


# --- cleaning up: hung steps, killed and stopped tests, failed tests' clones -----------


def _marker() -> str:
    """A command no other process runs: a sleep of a unique length (in seconds)."""
    return f"sleep 9{secrets.randbelow(10**6):06d}.{os.getpid()}"


def _running(marker: str) -> list[int]:
    """The live processes whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmd and state != "Z":
            found.append(int(pid))
    return found


def _kill(marker: str) -> None:
    """Teardown: no process of ``marker`` left, whatever the test found."""
    for pid in _running(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _scenario(path: Path, test: str, stop: str = "true", timeout: float = 600) -> Path:
    path.write_text(f'[[test]]\nrun = """{test}"""\ntimeout = {timeout}\n'
                    f'[[test_stop]]\nrun = """{stop}"""\n')
    return path


def _holds_naming(store: Path, path: Path) -> list[str]:
    with Store(store, readonly=True) as st, st.txn() as txn:
        return [b.name for b in all_points(st, txn) if str(path) in b.name]


def _drtest_clones(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("replica.store.drtest-*"))


async def test_a_step_past_its_timeout_or_cancelled_leaves_no_process_behind(
        tmp_path: Path) -> None:
    """A step's processes end with it: what it started in the background too, when it
    times out (``run``, as DR tests and bookmarks run steps; ``arun``, as HA hooks
    run) and when an HA node cancels it."""
    marker = _marker()
    hang = Scenario.parse(f'[[check]]\nrun = "{marker} & {marker}"\ntimeout = 1\n', "hang")
    try:
        started = time.monotonic()
        with pytest.raises(CdpfsError, match="timed out after 1s"):
            hang.run("check", tmp_path, {})
        assert not _running(marker)
        with pytest.raises(CdpfsError, match="timed out after 1s"):
            await hang.arun("check", tmp_path, {})
        assert not _running(marker)
        with trio.move_on_after(1) as scope:
            await hang.arun("check", tmp_path, {})
        assert scope.cancelled_caught and not _running(marker)
        assert time.monotonic() - started < 30  # SIGTERM was enough: no grace waited out
    finally:
        _kill(marker)


def test_a_dr_test_whose_step_hangs_leaves_no_process_behind(
        served: Served, tmp_path: Path) -> None:
    _, replica, _ = served
    marker = _marker()
    scen = _scenario(tmp_path / "hang.toml", f"{marker} & {marker}", timeout=2)
    try:
        line = one_line_error(cdpfs("replica", "test", replica, "--scenario", scen,
                                    "--no-keep-failed", check=False, timeout=120))
        assert "step 1 of 1" in line and "timed out after 2s" in line, line
        assert not _running(marker)
        assert not _drtest_clones(tmp_path)
    finally:
        _kill(marker)


class _Test:
    """A DR test running in the background (``proc``: ``cdpfs replica test``, or the
    replica server that started it), waiting in its step: its clone, the clone's
    mount and mount process, all found while it runs."""

    def __init__(self, proc: subprocess.Popen[bytes], replica: Path, marker: str) -> None:
        self.proc = proc
        wait_until(lambda: _running(marker), timeout=60, what="the DR test's step")
        (self.clone,) = _drtest_clones(replica.parent)
        mnt = live_mount_of(self.clone)
        assert mnt is not None and mnt.is_dir()
        self.mnt = mnt
        daemon = holder_pid(self.clone)
        assert daemon is not None
        self.daemon = daemon

    def gone(self) -> list[str]:
        """What of the test is still there (nothing, if it cleaned up)."""
        there = {"mount": live_mount_of(self.clone) is not None,
                 "mount process": pid_alive(self.daemon),
                 "clone": os.path.lexists(self.clone),
                 "directory": os.path.lexists(self.mnt),
                 "hold": bool(_holds_naming(self.clone.parent / "replica.store",
                                            self.clone))}
        return [what for what, yes in there.items() if yes]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        force_unmount(self.mnt)
        with contextlib.suppress(OSError):
            self.mnt.rmdir()


def _start(procs: Procs, replica: Path, scenario: Path, log: Path, marker: str) -> _Test:
    return _Test(procs.start(["replica", "test", replica, "--scenario", scenario], log),
                 replica, marker)


def test_a_killed_dr_test_is_reported_and_cleaned_up(
        served: Served, tmp_path: Path, procs: Procs) -> None:
    """kill -9 of ``replica test`` in its step: ``status`` names what it left, and
    ``--cleanup`` removes the step's process, the mount and its process, the
    directory, the clone and its hold on the replica."""
    vol, replica, _ = served
    wait_replicated(vol, replica)
    marker = _marker()
    scen = _scenario(tmp_path / "wait.toml", marker)
    test = None
    try:
        test = _start(procs, replica, scen, tmp_path / "test.log", marker)
        status = cdpfs("status", replica).stdout
        assert "running since" in status and f"(pid {test.proc.pid})" in status, status
        out = cdpfs("replica", "test", replica, "--cleanup").stdout
        assert out.strip().endswith(f"is running (pid {test.proc.pid}): left alone"), out
        assert test.gone() == ["mount", "mount process", "clone", "directory", "hold"]
        test.proc.kill()
        test.proc.wait(timeout=30)
        assert test.gone() == ["mount", "mount process", "clone", "directory", "hold"]
        status = cdpfs("status", replica).stdout
        assert "killed" in status and f"replica test {replica} --cleanup" in status, status
        assert str(test.clone) in status and str(test.mnt) in status, status
        assert "its steps started" in status, status

        out = cdpfs("replica", "test", replica, "--cleanup").stdout.splitlines()
        assert len(out) == 5, out
        assert out[0].startswith("stopped 1 process the killed test's"), out
        assert out[1].startswith(f"unmounted the clone from {test.mnt}"), out
        assert out[2] == f"removed directory {test.mnt}", out
        assert out[3].startswith(f"deleted clone {test.clone}"), out
        assert "recorded the DR test killed" in out[4], out
        assert test.gone() == [] and not _running(marker)
        status = cdpfs("status", replica).stdout
        assert "--cleanup" not in status and "killed before it finished" in status, status
        assert "no DR test" in cdpfs("replica", "test", replica, "--cleanup").stdout
        cdpfs("verify", replica)
    finally:
        _kill(marker)
        if test is not None:
            test.cleanup()


def test_a_dr_test_told_to_stop_cleans_up_by_itself(
        served: Served, tmp_path: Path, procs: Procs) -> None:
    """SIGTERM (a service stopping) or SIGINT (Ctrl-C) in a step: the test stops the
    step, runs the stop steps, unmounts, deletes the clone, and records itself as
    failed."""
    vol, replica, _ = served
    wait_replicated(vol, replica)
    for sig in (signal.SIGTERM, signal.SIGINT):
        marker = _marker()
        stopped = tmp_path / f"stopped-{sig}"
        scen = _scenario(tmp_path / "wait.toml", marker, stop=f"touch {stopped}")
        test = None
        try:
            log = tmp_path / f"test-{sig}.log"
            test = _start(procs, replica, scen, log, marker)
            test.proc.send_signal(sig)
            assert test.proc.wait(timeout=60) == 1
            err = log.read_text().strip().splitlines()[-1]
            assert err.startswith("cdpfs: error: ") and \
                f"interrupted by signal {int(sig)} ({sig.name})" in err, err
            assert stopped.exists(), "the stop steps did not run"
            assert test.gone() == [] and not _running(marker)
            status = cdpfs("status", replica).stdout
            assert f"FAILED: interrupted by signal {int(sig)}" in status, status
            assert "--cleanup" not in status, status
        finally:
            _kill(marker)
            if test is not None:
                test.cleanup()
    cdpfs("verify", replica)


def test_a_scheduled_dr_test_cleans_up_when_the_server_stops(
        served: Served, tmp_path: Path) -> None:
    """``replica serve`` stopping (SIGTERM) stops its scheduled test the same way."""
    vol, replica, server = served
    wait_replicated(vol, replica)
    marker = _marker()
    stopped = tmp_path / "stopped"
    scen = _scenario(tmp_path / "wait.toml", marker, stop=f"touch {stopped}")
    server.kill()
    test = None
    try:
        server.start("--test-every", "1h", "--test-scenario", str(scen))
        assert server.proc is not None
        test = _Test(server.proc, replica, marker)
        server.stop()
        assert stopped.exists(), "the stop steps did not run"
        assert test.gone() == [] and not _running(marker)
        status = cdpfs("status", replica).stdout
        assert "FAILED: interrupted by signal 15" in status and "--cleanup" not in status, \
            status
    finally:
        _kill(marker)
        if test is not None:
            test.cleanup()


def test_failed_dr_tests_keep_the_newest_failures_clone_only(
        served: Served, tmp_path: Path) -> None:
    """Each failed test keeps its clone and deletes the one kept before; a pass keeps
    it (the evidence of the last failure) until the next failure replaces it."""
    _, replica, _ = served
    fail = _scenario(tmp_path / "fail.toml", "echo broken >&2; exit 1")
    ok = _scenario(tmp_path / "ok.toml", "true")

    def failing() -> tuple[Path, str]:
        proc = cdpfs("replica", "test", replica, "--scenario", fail, check=False)
        clone = re.search(r"the clone is kept at (\S+)", one_line_error(proc))
        assert clone is not None, proc.stderr
        return Path(clone[1]), proc.stdout

    first, _ = failing()
    second, out = failing()
    assert f"deleted clone {first} of an older failed test" in out, out
    assert _drtest_clones(tmp_path) == [second]
    cdpfs("replica", "test", replica, "--scenario", ok)
    assert _drtest_clones(tmp_path) == [second]
    status = cdpfs("status", replica).stdout
    assert "passed" in status and f"the last failed test is kept: {second}" in status, status
    third, _ = failing()
    assert _drtest_clones(tmp_path) == [third]
    for gone in (first, second):
        assert not _holds_naming(replica, gone)
    assert _holds_naming(replica, third)
    cdpfs("clone", "--delete", third)


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
