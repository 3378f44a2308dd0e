"""Real applications on a real cdpfs mount, checked the way their users would.

Each test runs an unmodified application (SQLite, git, GNU tar, rsync,
PostgreSQL, stress-ng) against a mounted volume and then checks what a user
of that application would: the database's own integrity check and its rows,
``git fsck`` and the checked-out files, byte-for-byte and metadata-for-metadata
comparison of copied trees, pgbench's report and the bank invariant of its
tables, stress-ng's verdict. Most checks are repeated after a remount, so what
was read back came from the store and not from the kernel's caches. Every
mount, server and process a test starts is stopped again, also when it fails.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import HAVE_FUSE
from harness import Volume, free_port

Row = tuple[str, bytes, int]
Tree = dict[str, tuple[object, ...]]


# --- helpers -------------------------------------------------------------------------------


def log_tail(vol: Volume, lines: int = 40) -> str:
    """The end of the mount daemon's log, for failure messages."""
    try:
        text = (vol.store / "cdpfs.log").read_text(errors="replace")
    except OSError:
        return "(no cdpfs.log)"
    return "\n".join(text.splitlines()[-lines:])


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a child started with ``start_new_session=True``."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 120, check: bool = True,
        vol: Volume | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure say what it printed (and the daemon log).

    The command gets a process group of its own, killed whole if it overruns
    ``timeout`` (or the test is interrupted), so no helper process outlives it.
    """
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    if check and proc.returncode != 0:
        extra = f"\n--- cdpfs.log ---\n{log_tail(vol)}" if vol is not None else ""
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}{extra}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def assert_log_clean(vol: Volume) -> None:
    """The mount daemon logged no internal error (those become EIO, which apps may hide)."""
    text = (vol.store / "cdpfs.log").read_text(errors="replace")
    bad = [line for line in text.splitlines()
           if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    assert not bad, "cdpfs logged errors:\n" + "\n".join(bad[:20])


def snapshot(root: Path) -> Tree:
    """Every entry under ``root`` (itself included as ``.``) with what must survive a copy.

    Type, permission bits, owner, group, size, mtime in nanoseconds, link count,
    symlink target and the sha256 of a regular file's bytes.
    """
    out: Tree = {}

    def record(path: Path, rel: str) -> None:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        extra: object = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                extra = hashlib.file_digest(f, "sha256").hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        links = st.st_nlink if not stat.S_ISLNK(st.st_mode) else None
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        out[rel] = (stat.filemode(st.st_mode), kind, st.st_uid, st.st_gid, size,
                    st.st_mtime_ns, links, extra)

    record(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            record(path, str(path.relative_to(root)))
    return out


FIELDS = ("mode", "type", "uid", "gid", "size", "mtime_ns", "nlink", "content")


def assert_same_tree(expected: Tree, actual: Tree, what: str) -> None:
    """Equal snapshots, or a readable list of the first differences."""
    if expected == actual:
        return
    problems: list[str] = []
    for rel in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing: {rel}")
    for rel in sorted(actual.keys() - expected.keys()):
        problems.append(f"unexpected: {rel}")
    for rel in sorted(expected.keys() & actual.keys()):
        a, b = expected[rel], actual[rel]
        if a != b:
            diffs = [f"{f} {x!r} != {y!r}" for f, x, y in zip(FIELDS, a, b, strict=True)
                     if x != y]
            problems.append(f"differs: {rel}: {'; '.join(diffs)}")
    raise AssertionError(f"{what}: {len(problems)} difference(s):\n" + "\n".join(problems[:40]))


# --- SQLite ------------------------------------------------------------------------------------


def sqlite_workload(db: Path, journal_mode: str, model: dict[int, Row], *, seed: int,
                    transactions: int = 300) -> int:
    """Random inserts, updates and deletes in many transactions, some rolled back.

    ``model`` is updated to what the table must hold; returns how many
    statements ran.
    """
    rng = random.Random(seed)
    con = sqlite3.connect(db, isolation_level=None, timeout=60)
    try:
        mode = con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert mode == journal_mode.lower(), f"journal_mode={journal_mode} gave {mode}"
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA cache_size=20")  # a small cache spills pages mid-transaction
        if journal_mode.lower() == "wal":
            con.execute("PRAGMA wal_autocheckpoint=64")  # checkpoint often
        con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, k TEXT NOT NULL, "
                    "v BLOB NOT NULL, n INTEGER NOT NULL)")
        con.execute("CREATE INDEX IF NOT EXISTS t_k ON t (k)")
        con.execute("CREATE INDEX IF NOT EXISTS t_n ON t (n)")
        statements = 0
        for txn in range(transactions):
            pending = dict(model)
            con.execute("BEGIN IMMEDIATE")
            for _ in range(rng.randint(1, 20)):
                statements += 1
                r = rng.random()
                size = rng.randint(0, 400) if rng.random() < 0.9 else rng.randint(4000, 30000)
                if r < 0.5 or not pending:
                    row = (f"key-{txn}-{rng.randrange(10**9)}", rng.randbytes(size),
                           rng.randrange(-10**12, 10**12))
                    cur = con.execute("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", row)
                    assert cur.lastrowid is not None
                    pending[cur.lastrowid] = row
                elif r < 0.8:
                    rid = rng.choice(list(pending))
                    k, _, n = pending[rid]
                    row = (k, rng.randbytes(size), n + rng.randint(1, 1000))
                    con.execute("UPDATE t SET v = ?, n = ? WHERE id = ?", (row[1], row[2], rid))
                    pending[rid] = row
                else:
                    rid = rng.choice(list(pending))
                    con.execute("DELETE FROM t WHERE id = ?", (rid,))
                    del pending[rid]
            if rng.random() < 0.1:
                con.execute("ROLLBACK")
            else:
                con.execute("COMMIT")
                model.clear()
                model.update(pending)
        return statements
    finally:
        con.close()


def check_sqlite(db: Path, model: dict[int, Row], what: str) -> None:
    """SQLite's own integrity check passes and the table holds exactly ``model``."""
    con = sqlite3.connect(db, isolation_level=None, timeout=60)
    try:
        con.execute("PRAGMA mmap_size=268435456")  # read through mmap; the CLI below uses read()
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], what
        rows = {rid: (k, v, n) for rid, k, v, n in con.execute("SELECT id, k, v, n FROM t")}
        by_index = con.execute("SELECT count(*) FROM t INDEXED BY t_k WHERE k >= ''").fetchone()
    finally:
        con.close()
    if rows != model:
        missing = sorted(model.keys() - rows.keys())
        extra = sorted(rows.keys() - model.keys())
        wrong = sorted(r for r in model.keys() & rows.keys() if model[r] != rows[r])
        raise AssertionError(f"{what}: {len(rows)} rows, expected {len(model)}; missing ids "
                             f"{missing[:10]}, unexpected ids {extra[:10]}, wrong rows "
                             f"{wrong[:10]}")
    assert by_index == (len(model),), what
    cli = run(["sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;"])
    assert cli.stdout.split() == ["ok", str(len(model))], (what, cli.stdout)


# A process that changes the database without committing and then dies: with a
# tiny page cache the uncommitted pages have already been written into the
# database file, so only the hot journal can undo them.
DIE_MID_TRANSACTION = r"""
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=10")
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE t SET n = n + 1")
for i in range(1500):
    con.execute("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", (f"doomed-{i}", os.urandom(900), i))
con.execute("DELETE FROM t WHERE id % 3 = 0")
os._exit(0)
"""

# A process that commits into the WAL (never checkpointing) and dies without
# closing: the committed transactions exist only in the -wal file.
DIE_AFTER_WAL_COMMITS = r"""
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA wal_autocheckpoint=0")
con.execute("PRAGMA synchronous=FULL")
for i in range(int(sys.argv[2])):
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t (id, k, v, n) VALUES (?, ?, ?, ?)",
                (10_000_000 + i, f"wal-{i}", bytes([i % 256]) * (i * 37 % 5000), i))
    con.execute("UPDATE t SET n = n + 1 WHERE id = ?", (10_000_000 + i // 2,))
    con.execute("COMMIT")
os._exit(0)
"""

# A second process reading while the writer works: every read transaction
# must see one consistent snapshot, whatever the writer does meanwhile.
WAL_READER = r"""
import os, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
con = sqlite3.connect(db, isolation_level=None, timeout=60)
con.execute("PRAGMA mmap_size=268435456")  # pages through mmap, the writer uses write()
snapshots = 0
while not os.path.exists(stop):
    con.execute("BEGIN")
    first = con.execute("SELECT count(*), total(n), total(length(v)) FROM t").fetchone()
    time.sleep(0.01)
    again = con.execute("SELECT count(*), total(n), total(length(v)) FROM t").fetchone()
    con.execute("COMMIT")
    if first != again:
        print(f"snapshot changed inside a read transaction: {first} -> {again}")
        sys.exit(1)
    snapshots += 1
print(snapshots)
"""


def test_sqlite_rollback_journal(volume: Volume) -> None:
    db = volume.mnt / "app" / "rollback.db"
    db.parent.mkdir()
    model: dict[int, Row] = {}
    statements = sqlite_workload(db, "DELETE", model, seed=1, transactions=300)
    assert statements > 2500 and len(model) > 500
    assert not Path(f"{db}-journal").exists()
    check_sqlite(db, model, "after the workload")

    # Die in the middle of a big transaction: a hot journal is left behind.
    with open(db, "rb") as f:
        before = hashlib.file_digest(f, "sha256").hexdigest()
    run([sys.executable, "-c", DIE_MID_TRANSACTION, db], timeout=120, vol=volume)
    journal = Path(f"{db}-journal")
    assert journal.exists() and journal.stat().st_size > 0
    with open(db, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() != before, \
            "uncommitted pages never reached the database file; nothing to roll back"

    volume.remount()
    assert journal.stat().st_size > 0  # the hot journal survived the remount
    check_sqlite(db, model, "after rolling back the hot journal, after remount")
    assert not journal.exists()

    sqlite_workload(db, "DELETE", model, seed=2, transactions=50)
    volume.remount()
    check_sqlite(db, model, "after more transactions and another remount")
    assert_log_clean(volume)


def test_sqlite_wal(volume: Volume, tmp_path: Path) -> None:
    db = volume.mnt / "app" / "wal.db"
    db.parent.mkdir()
    stop = tmp_path / "stop-reader"
    model: dict[int, Row] = {}
    sqlite_workload(db, "WAL", model, seed=3, transactions=20)
    reader = subprocess.Popen([sys.executable, "-c", WAL_READER, os.fspath(db), os.fspath(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        statements = sqlite_workload(db, "WAL", model, seed=4, transactions=300)
    finally:
        stop.touch()
        try:
            out, err = reader.communicate(timeout=60)
        finally:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, f"reader failed: {out}{err}"
    assert int(out.strip()) > 0
    assert statements > 2500 and len(model) > 500
    check_sqlite(db, model, "after the workload")

    # Commit into the WAL and die without a checkpoint: the WAL must survive.
    commits = 200
    run([sys.executable, "-c", DIE_AFTER_WAL_COMMITS, db, str(commits)], timeout=120,
        vol=volume)
    for i in range(commits):
        model[10_000_000 + i] = (f"wal-{i}", bytes([i % 256]) * (i * 37 % 5000), i)
    for i in range(commits):
        k, v, n = model[10_000_000 + i // 2]
        model[10_000_000 + i // 2] = (k, v, n + 1)
    wal = Path(f"{db}-wal")
    wal_size = wal.stat().st_size
    assert wal_size > 100_000

    volume.remount()
    assert wal.stat().st_size == wal_size
    check_sqlite(db, model, "after recovering the WAL, after remount")
    sqlite_workload(db, "WAL", model, seed=5, transactions=30)
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        con.close()
    assert not wal.exists() or wal.stat().st_size == 0  # the last close removes it
    volume.remount()
    check_sqlite(db, model, "after a checkpoint and another remount")
    assert_log_clean(volume)


# --- git -----------------------------------------------------------------------------------------


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=os.fspath(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
               GIT_AUTHOR_NAME="cdpfs test", GIT_AUTHOR_EMAIL="test@cdpfs.invalid",
               GIT_COMMITTER_NAME="cdpfs test", GIT_COMMITTER_EMAIL="test@cdpfs.invalid",
               LC_ALL="C", GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="gc.autoDetach",
               GIT_CONFIG_VALUE_0="false")  # no background gc may outlive a git command
    return env


def worktree(root: Path) -> dict[str, tuple[str, object]]:
    """What git tracks of a working tree: each file's bytes and exec bit, each symlink."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = (oct(os.stat(path).st_mode & 0o111), path.read_bytes())
    return out


def test_git_commit_clone_fsck(volume: Volume, tmp_path: Path) -> None:
    env = git_env(tmp_path)
    repo = volume.mnt / "repo"

    def git(*args: str | os.PathLike[str], cwd: Path = repo) -> str:
        return run(["git", *args], cwd=cwd, env=env, vol=volume).stdout

    git("init", "-q", "-b", "main", repo, cwd=volume.mnt)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("email", "json", "asyncio", "xml", "logging", "unittest", "multiprocessing",
                "importlib", "http", "urllib", "concurrent", "idlelib", "lib2to3"):
        if (stdlib() / pkg).is_dir():  # Debian packages idlelib and lib2to3 separately
            shutil.copytree(stdlib() / pkg, repo / pkg, ignore=ignore)
    git("add", "-A")
    git("commit", "-q", "-m", "import some of the standard library")

    # A second commit: edits, deletions, renames, an executable and a symlink.
    git("rm", "-q", "-r", "xml/dom")
    git("mv", "json/tool.py", "json/tool_renamed.py")
    git("mv", "logging", "log_pkg")
    rng = random.Random(7)
    untouched = {repo / "email" / "__init__.py", repo / "json" / "tool_renamed.py"}
    files = sorted(p for p in repo.rglob("*.py") if ".git" not in p.parts and p not in untouched)
    for p in rng.sample(files, 25):
        with open(p, "a") as f:
            f.write(f"\n# edited on cdpfs: {rng.random()}\n")
    (repo / "run.sh").write_text("#!/bin/sh\necho hello\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("email/__init__.py", repo / "email_init_link")
    git("add", "-A")
    git("commit", "-q", "-m", "edit, delete, rename, add")

    git("gc", "-q")  # pack everything: temporary files, renames, fsyncs
    (repo / "after_gc.txt").write_text("a loose object after the pack\n")
    git("add", "after_gc.txt")
    git("commit", "-q", "-m", "third")
    assert git("status", "--porcelain") == ""
    git("fsck", "--full", "--strict")
    head = git("rev-parse", "HEAD").strip()
    expected = worktree(repo)
    assert len(expected) > 200
    assert expected["run.sh"][0] == oct(0o111)
    assert expected["email_init_link"] == ("link", "email/__init__.py")
    assert expected["email/__init__.py"][1] == (stdlib() / "email" / "__init__.py").read_bytes()
    assert expected["json/tool_renamed.py"][1] == (stdlib() / "json" / "tool.py").read_bytes()

    # A local clone hard-links the objects; --no-local goes through the pack protocol.
    git("clone", "-q", repo, volume.mnt / "clone-local", cwd=volume.mnt)
    git("clone", "-q", "--no-local", repo, volume.mnt / "clone-pack", cwd=volume.mnt)
    for name in ("clone-local", "clone-pack"):
        clone = volume.mnt / name
        git("fsck", "--full", "--strict", cwd=clone)
        assert git("rev-parse", "HEAD", cwd=clone).strip() == head
        assert git("status", "--porcelain", cwd=clone) == ""
        assert len(git("log", "--format=%H", cwd=clone).split()) == 3
        assert worktree(clone) == expected, f"{name}: checked-out files differ"

    volume.remount()
    for path in (repo, volume.mnt / "clone-local", volume.mnt / "clone-pack"):
        git("fsck", "--full", "--strict", cwd=path)
        assert git("status", "--porcelain", cwd=path) == ""
        assert worktree(path) == expected, f"{path.name}: files differ after remount"
    assert_log_clean(volume)


# --- tar and rsync -------------------------------------------------------------------------------


def test_tar_extract_source_tree(volume: Volume, tmp_path: Path) -> None:
    src = stdlib()
    tarball = tmp_path / "tree.tar"
    # POSIX format keeps nanosecond mtimes; zoneinfo brings hundreds of symlinks.
    run(["tar", "--format=posix", "-cf", tarball,
         "--exclude=__pycache__", "--exclude=site-packages", "--exclude=dist-packages",
         "-C", src.parent, src.name, "-C", "/usr/share", "zoneinfo"], timeout=300)
    ref = tmp_path / "ref"
    ref.mkdir()
    run(["tar", "-xpf", tarball, "-C", ref], timeout=300)
    dest = volume.mnt / "x"
    dest.mkdir()
    run(["tar", "-xpf", tarball, "-C", dest], timeout=300, vol=volume)

    expected = snapshot(ref)
    assert sum(1 for rec in expected.values() if rec[1] == stat.S_IFLNK) > 100
    assert sum(1 for rec in expected.values() if rec[1] == stat.S_IFREG) > 500
    # Directory mtimes are set by tar after their contents; the top one is ours.
    expected.pop(".")
    actual = snapshot(dest)
    actual.pop(".")
    assert_same_tree(expected, actual, "extracted on cdpfs vs. extracted on local disk")
    run(["tar", "--compare", "-f", tarball, "-C", dest], vol=volume)

    volume.remount()
    actual = snapshot(dest)
    actual.pop(".")
    assert_same_tree(expected, actual, "after remount")
    run(["tar", "--compare", "-f", tarball, "-C", dest], vol=volume)
    assert_log_clean(volume)


def test_rsync_roundtrip(volume: Volume, tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    sources = [p for p in (Path("/usr/share/zoneinfo"), Path("/usr/lib/postgresql"),
                           stdlib() / "email") if p.is_dir()]
    run(["rsync", "-a", *sources, stage], timeout=300)
    # Hard links and odd permissions, so that rsync -aH has something to keep.
    files = sorted(p for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
    rng = random.Random(11)
    for i, p in enumerate(rng.sample(files, 20)):
        os.link(p, stage / f"hardlink-{i}")
    for p, mode in zip(rng.sample(files, 4), (0o600, 0o4755, 0o2711, 0o444), strict=True):
        os.chmod(p, mode)
    os.chown(files[0], 1234, 5678)

    # rsync does not set the mtime of a directory changed during the second it
    # runs in (on any filesystem): let the changes to the stage age first.
    time.sleep(2)
    copy = volume.mnt / "copy"
    out = tmp_path / "out"
    run(["rsync", "-aH", f"{stage}/", f"{copy}/"], timeout=300, vol=volume)
    run(["rsync", "-aH", f"{copy}/", f"{out}/"], timeout=300, vol=volume)
    expected = snapshot(stage)
    assert_same_tree(expected, snapshot(copy), "stage vs. cdpfs copy")
    assert_same_tree(expected, snapshot(out), "stage vs. copied back out")
    changes = run(["rsync", "-aH", "--checksum", "--dry-run", "--itemize-changes",
                   f"{stage}/", f"{copy}/"], vol=volume).stdout
    assert changes == "", f"rsync --checksum still finds differences:\n{changes[:2000]}"

    # Change the source and sync again with the delta algorithm (basis files read
    # from the mount), deletions and a renamed directory.
    for p in rng.sample([p for p in files if p.stat().st_size > 3000], 20):
        data = bytearray(p.read_bytes())
        data[len(data) // 2: len(data) // 2 + 100] = rng.randbytes(100)
        p.write_bytes(bytes(data) + b"appended")
    for p in rng.sample(files, 10):
        if p.exists():
            p.unlink()
    (stage / "new-dir").mkdir()
    (stage / "new-dir" / "new-file").write_bytes(rng.randbytes(200_000))
    os.rename(stage / "zoneinfo" / "Europe", stage / "zoneinfo" / "Europa")
    time.sleep(2)
    run(["rsync", "-aH", "--delete", "--no-whole-file", f"{stage}/", f"{copy}/"],
        timeout=300, vol=volume)
    run(["rsync", "-aH", "--delete", f"{copy}/", f"{out}/"], timeout=300, vol=volume)
    expected = snapshot(stage)
    assert_same_tree(expected, snapshot(copy), "after the second sync: stage vs. cdpfs copy")
    assert_same_tree(expected, snapshot(out), "after the second sync: copied back out")

    volume.remount()
    assert_same_tree(expected, snapshot(copy), "after remount")
    assert_log_clean(volume)


# --- PostgreSQL ---------------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")




class Postgres:
    """One PostgreSQL server as the postgres user, data on the mount, socket on local disk."""

    def __init__(self, data: Path, sockdir: Path, logfile: Path, vol: Volume) -> None:
        self.data = data
        self.sockdir = sockdir
        self.logfile = logfile
        self.vol = vol
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def as_postgres(self, *cmd: str | os.PathLike[str], timeout: float = 120,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "HOME": os.fspath(self.sockdir), "PGHOST": os.fspath(self.sockdir),
               "PGPORT": str(self.port), "PGUSER": "postgres", "PGDATABASE": "postgres"}
        program = PG_BIN / cmd[0]
        return run(["runuser", "-u", "postgres", "--",
                    program if program.exists() else cmd[0], *cmd[1:]],
                   timeout=timeout, check=check, env=env, cwd=self.sockdir, vol=self.vol)

    def log(self) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return "(no server log)"

    def start(self) -> None:
        assert self.proc is None
        with open(self.logfile, "ab") as log:
            # Exec'd directly as postgres (no runuser in between): self.proc is the postmaster.
            self.proc = subprocess.Popen(
                [PG_BIN / "postgres", "-D", self.data, "-k", self.sockdir, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_wal_size=64MB",
                 "-c", "checkpoint_timeout=30s", "-c", "logging_collector=off"],
                user="postgres", group="postgres", extra_groups=[], cwd=self.sockdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited {self.proc.returncode}:\n{self.log()}")
            if self.as_postgres("pg_isready", "-q", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"postgres did not become ready:\n{self.log()}")
            time.sleep(0.2)

    def sql(self, query: str) -> list[str]:
        out = self.as_postgres("psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query)
        return out.stdout.split()

    def stop(self, mode: str = "fast") -> None:
        """Shut down through pg_ctl; after a clean (fast) shutdown the postmaster exits 0."""
        assert self.proc is not None
        self.as_postgres("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "120",
                         timeout=150)
        code = self.proc.wait(timeout=30)
        assert mode != "fast" or code == 0, self.log()
        self.proc = None

    def bench_in_background(self, seconds: int) -> subprocess.Popen[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "PGHOST": os.fspath(self.sockdir), "PGPORT": str(self.port),
               "PGUSER": "postgres", "PGDATABASE": "postgres"}
        return subprocess.Popen(["runuser", "-u", "postgres", "--", PG_BIN / "pgbench",
                                 "-c", "4", "-j", "2", "-T", str(seconds), "-n"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=self.sockdir, start_new_session=True)

    def kill(self) -> None:
        """Make sure the server is gone (fast, then immediate shutdown, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, 60), (signal.SIGQUIT, 20), (signal.SIGKILL, 20)):
            if proc.poll() is not None:
                break
            if sig == signal.SIGKILL:
                kill_group(proc, sig)
            else:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        # Backends notice the postmaster's death and exit; wait for the group to empty.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        kill_group(proc)


@pytest.fixture
def pg_volume() -> Iterator[Volume]:
    """A volume mounted with --allow-other under a directory the postgres user can reach.

    pytest's tmp_path lives in a root-only directory, so this one makes its own
    (and removes it); the volume is unmounted and verified like ``volume``.
    """
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    base = Path(tempfile.mkdtemp(prefix="cdpfs-t4-pg-"))
    os.chmod(base, 0o755)
    vol = Volume(base, "pg")
    try:
        vol.init().mount("--allow-other")
        yield vol
        if os.path.ismount(vol.mnt):
            vol.umount()
        vol.verify()
    finally:
        vol.cleanup()
        if not os.path.ismount(vol.mnt):
            shutil.rmtree(base, ignore_errors=True)


# Errors PostgreSQL logs when its files misbehave (not the expected chatter of
# connections ended by a shutdown).
PG_IO_ERRORS = re.compile(r"PANIC|could not (read|write|fsync|extend|truncate|open file|create|"
                          r"rename|link|stat|seek|access)|invalid page|checksum")


def test_postgresql_pgbench(pg_volume: Volume) -> None:
    vol = pg_volume
    os.chmod(vol.mnt, 0o755)
    data = vol.mnt / "pgdata"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    sockdir = vol.store.parent / "sock"
    sockdir.mkdir()
    shutil.chown(sockdir, "postgres", "postgres")
    pg = Postgres(data, sockdir, vol.store.parent / "postgres.log", vol)
    bench: subprocess.Popen[str] | None = None

    def check_tables() -> int:
        """pgbench's bank: every transaction adds one delta to an account, its teller,
        its branch and the history, so all four sums agree; returns the history count."""
        sums = pg.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || "
                      "(SELECT sum(bbalance) FROM pgbench_branches) || ' ' || "
                      "(SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || "
                      "(SELECT sum(delta) FROM pgbench_history)")
        assert len(sums) == 4 and len(set(sums)) == 1, f"balances disagree: {sums}"
        accounts, history = pg.sql("SELECT (SELECT count(*) FROM pgbench_accounts) || ' ' || "
                                   "(SELECT count(*) FROM pgbench_history)")
        assert accounts == "200000"
        return int(history)

    try:
        pg.as_postgres("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-instructions", timeout=300)
        pg.start()
        pg.as_postgres("pgbench", "-q", "-i", "-s", "2", timeout=300)
        report = pg.as_postgres("pgbench", "-c", "4", "-j", "2", "-t", "500", "-n",
                                timeout=300).stdout
        assert "number of transactions actually processed: 2000/2000" in report, report
        failed = re.search(r"number of failed transactions: (\d+)", report)
        assert failed is not None and failed.group(1) == "0", report
        assert check_tables() == 2000

        # Crash the server in the middle of a run: recovery replays the WAL from the mount.
        bench = pg.bench_in_background(60)
        time.sleep(6)
        pg.stop("immediate")
        bench.communicate(timeout=60)
        bench = None
        pg.start()
        assert "automatic recovery in progress" in pg.logfile.read_text(errors="replace")
        assert check_tables() > 2000
        pg.stop()
        control = pg.as_postgres("pg_controldata", "-D", data).stdout
        assert re.search(r"Database cluster state:\s+shut down\n", control), control

        # Everything again from the store: remount, restart, check the indexes too.
        vol.umount()
        vol.mount("--allow-other")
        pg.start()
        history = check_tables()
        assert history > 2000
        pg.as_postgres("pg_amcheck", "--install-missing", "--heapallindexed", "--all",
                       timeout=300)
        pg.stop()
        errors = [line for line in pg.logfile.read_text(errors="replace").splitlines()
                  if PG_IO_ERRORS.search(line)]
        assert not errors, "\n".join(errors[:20])
        assert_log_clean(vol)
    except BaseException:
        print(f"--- postgres log ---\n{pg.log()}\n--- cdpfs.log ---\n{log_tail(vol)}")
        raise
    finally:
        if bench is not None:
            kill_group(bench)
            bench.wait()
        pg.kill()


# --- stress-ng ----------------------------------------------------------------------------------

# Metadata stressors that need nothing FUSE lacks (no fiemap, inode flags,
# fallocate, O_DIRECT); one instance each on this small machine.
STRESSORS = ("dir", "dirmany", "dentry", "rename", "link", "symlink", "chmod", "chown",
             "utime", "touch", "getdent", "xattr", "mknod", "filename", "flock", "lockf")


def test_stress_ng_metadata(volume: Volume) -> None:
    available = set(run(["stress-ng", "--stressors"]).stdout.split())
    chosen = [s for s in STRESSORS if s in available]
    assert len(chosen) >= 10, f"stress-ng lacks most stressors: {sorted(available)}"
    work = volume.mnt / "stress"
    work.mkdir()
    cmd = ["stress-ng", "--temp-path", os.fspath(work), "--timeout", "15s", "--verify",
           "--metrics-brief"]
    for s in chosen:
        cmd += [f"--{s}", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
        proc.wait()
    # Every chosen stressor must really run: a skip means a missing feature.
    problems = [line for line in out.splitlines()
                if re.search(r"\b(fail|failed|error|errors|skipping|skipped)\b|not supported|"
                             r"not implemented", line, re.I)
                and not re.search(r"\b(failed|errors?|skipped): 0\b", line)]
    assert proc.returncode == 0, f"stress-ng exited {proc.returncode}:\n{out}\n{log_tail(volume)}"
    assert "successful run completed" in out, out
    assert not problems, "\n".join(problems)
    assert os.listdir(work) == [], "stress-ng left files behind"
    volume.remount()
    assert os.listdir(work) == []
    (work / "after").write_text("still works")
    assert (work / "after").read_text() == "still works"
    assert_log_clean(volume)
