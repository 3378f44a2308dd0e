"""Time travel on a real mount: ``@`` trees, snapshot mounts, and every history tool.

Each test mounts a fresh store through the real CLI and checks what a user would
see: past trees through ``MNT/@<moment>``, and the output and effect of ``cdpfs log``,
``diff``, ``restore``, ``rewind``, ``bookmark(s)``, ``prune``, ``stat``/``df`` and
``retention``. Moments are taken by wall clock with a short pause on both sides
(records are stamped with the coarse clock), so no operation lands on the wrong side.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HAVE_FUSE
from harness import CLI, Volume, cdpfs, force_unmount, last_seq, one_line_error, settle, store_seq

from cdpfs.history.points import resolve
from cdpfs.store.lmdb import Store

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# --- helpers -------------------------------------------------------------------------


def moment() -> int:
    """Now (ns), with a pause on both sides so no record is stamped near it."""
    time.sleep(0.025)
    t = time.time_ns()
    time.sleep(0.025)
    return t


def local_ns(t: int) -> str:
    """ISO local time with a nanosecond fraction: ``2026-11-25T10:00:00.123456789``."""
    sec = dt.datetime.fromtimestamp(t // 10**9).isoformat(timespec="seconds")
    return f"{sec}.{t % 10**9:09d}"


def utc_ms(t: int) -> str:
    """ISO UTC time with milliseconds: ``2026-11-25T09:00:00.123Z``."""
    sec = dt.datetime.fromtimestamp(t // 10**9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{sec}.{t % 10**9 // 10**6:03d}Z"


def windows_safe(second: int) -> str:
    """The Windows-safe local form at second precision: ``2026-11-25T10-00-00``."""
    return dt.datetime.fromtimestamp(second).strftime("%Y-%m-%dT%H-%M-%S")


def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def put(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def errno_of(fn: Callable[..., object], *args: object, **kw: object) -> int:
    """The errno ``fn`` fails with (0 if it succeeds)."""
    try:
        fn(*args, **kw)
    except OSError as exc:
        return exc.errno or -1
    return 0



Tree = dict[str, tuple[object, ...]]


def tree_state(root: Path, *, skip_at: bool = False, times: bool = True) -> Tree:
    """Everything a copy must reproduce under ``root`` (root included, as ``.``):
    type, mode, owner, mtime (ns), content hash or symlink target, xattrs, and
    which names are hard links of one file."""
    out: Tree = {}
    inodes: dict[int, list[str]] = {}

    def attrs(path: Path, st: os.stat_result) -> tuple[object, ...]:
        mtime = st.st_mtime_ns if times else 0
        base = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime)
        if stat.S_ISLNK(st.st_mode):
            return base
        names = sorted(os.listxattr(path, follow_symlinks=False))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        return (*base, xattrs)

    def walk(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", *attrs(path, st))
            for name in sorted(os.listdir(path)):
                if skip_at and rel == "." and name.startswith("@"):
                    continue
                walk(path / name, name if rel == "." else f"{rel}/{name}")
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(path), *attrs(path, st))
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("f", st.st_size, digest, *attrs(path, st))
            inodes.setdefault(st.st_ino, []).append(rel)
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode), st.st_rdev, *attrs(path, st))

    walk(root, ".")
    for names in inodes.values():
        for rel in names:
            out[rel] = (*out[rel], tuple(sorted(names)))
    return out


def assert_same(got: Tree, want: Tree) -> None:
    """Trees equal; else fail listing each differing entry in full."""
    diffs = [f"{k}:\n  got  {got.get(k)}\n  want {want.get(k)}"
             for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:20])


def subtree(tree: Tree, name: str) -> Tree:
    """The part of ``tree`` under its entry ``name``, as tree_state of that directory."""
    def rel(k: str) -> str:
        return "." if k == name else k.removeprefix(name + "/")

    return {rel(k): (*v[:-1], tuple(rel(n) for n in v[-1])) if v[0] == "f" else v
            for k, v in tree.items() if k == name or k.startswith(name + "/")}


def contents(root: Path) -> dict[str, bytes]:
    """Regular files under ``root`` (relative path -> content), ``@`` names skipped."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if not d.startswith("@")]
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def log_rows(stdout: str) -> list[tuple[int, str, int | None]]:
    """(seq, op, size) of each row of ``cdpfs log`` (size None for "(gone)")."""
    lines = stdout.splitlines()
    assert lines and lines[0].split()[:3] == ["seq", "time", "op"], stdout
    rows = []
    for line in lines[1:]:
        seq, _day, _clock, op, size, *_ = line.split()
        rows.append((int(seq), op, None if size == "(gone)" else int(size)))
    return rows


def check_log(vol: Volume) -> None:
    log = vol.store / "cdpfs.log"
    bad = [line for line in (log.read_text().splitlines() if log.exists() else [])
           if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    assert not bad, "the mount logged errors:\n" + "\n".join(bad)


@pytest.fixture
def shared_volume(tmp_path: Path) -> Iterator[Volume]:
    """A fresh volume mounted with ``--allow-other`` on a mount point other users can
    reach (pytest's tmp dirs are private); unmounted, verified, log-checked after."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    base = Path(tempfile.mkdtemp(prefix="cdpfs-shared-"))
    os.chmod(base, 0o755)
    vol = Volume(tmp_path)
    vol.mnt.rmdir()
    vol.mnt = base / "mnt"
    vol.mnt.mkdir()
    vol.init()
    try:
        vol.mount("--allow-other")
        yield vol
        vol.umount()
    finally:
        vol.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    vol.verify()
    check_log(vol)


# --- 1. every @ form ----------------------------------------------------------------


def test_every_moment_form_shows_the_right_content(volume: Volume) -> None:
    m = volume.mnt
    f = m / "f"
    put(f, b"v0")
    # v1 a third into a second, v2 just after the next second starts: then a
    # second-precision name of that boundary falls between them.
    sleep_until(int(time.time()) + 1.3)
    put(f, b"version 1")
    t1 = moment()
    seq1 = last_seq(volume)
    boundary = t1 // 10**9 + 1
    assert time.time() < boundary - 0.1, "the machine is too slow for this test's timing"
    sleep_until(boundary + 0.05)
    put(f, b"version 2, longer")
    # @-1s at boundary+0.6 names boundary-0.4: after v1 (~boundary-0.65), before v2.
    sleep_until(boundary + 0.6)
    assert (m / "@-1s" / "f").read_bytes() == b"version 1"
    assert time.time() < boundary + 1.0, "@-1s was looked up too late"

    assert f.read_bytes() == b"version 2, longer"
    for name in (local_ns(t1), utc_ms(t1), windows_safe(boundary), f"#{seq1}"):
        assert (m / f"@{name}" / "f").read_bytes() == b"version 1", name
    cdpfs("bookmark", "first", "--at", f"#{seq1}", "--volume", m)
    assert (m / "@first" / "f").read_bytes() == b"version 1"
    # A second-precision name of the second before v1 shows what was there then.
    assert (m / f"@{windows_safe(boundary - 1)}" / "f").read_bytes() == b"v0"
    assert f.read_bytes() == b"version 2, longer"

    reasons = {"2026-13-45": "not a valid time", "yesterday-ish": "no such bookmark",
               "2099-01-01": "in the future", "nosuchmark": "no such bookmark"}
    for name in reasons:
        with pytest.raises(FileNotFoundError):
            os.stat(m / f"@{name}")
        with pytest.raises(FileNotFoundError):
            (m / f"@{name}" / "f").read_bytes()
    log = (volume.store / "cdpfs.log").read_text().splitlines()
    for name, reason in reasons.items():
        assert any(" WARNING " in line and f"@{name}" in line and reason in line
                   for line in log), f"no WARNING naming @{name}: {reason}"


# --- 2. one consistent moment across the volume ---------------------------------------


def test_a_moment_is_consistent_across_directories(volume: Volume) -> None:
    m = volume.mnt
    for d in ("a", "b"):
        (m / d).mkdir()
        put(m / d / "x", f"{d} old".encode())
        put(m / d / "y", f"{d} y".encode())
    put(m / "a" / "x", b"a new")
    (m / "a" / "added").write_bytes(b"added in a")
    (m / "a" / "y").unlink()
    settle(m)
    # (times=False: the mtime of a freshly written file may differ by one clock tick
    # between the live view and the store, see test_mtime_seen_live_is_kept.)
    want = tree_state(m, skip_at=True, times=False)
    t = moment()
    put(m / "b" / "x", b"b new")
    (m / "b" / "added").write_bytes(b"added in b")
    (m / "b" / "y").unlink()
    past = m / f"@{local_ns(t)}"
    assert_same(tree_state(past, times=False), want)
    assert sorted(os.listdir(past / "a")) == ["added", "x"]
    assert sorted(os.listdir(past / "b")) == ["x", "y"]
    assert (past / "b" / "x").read_bytes() == b"b old"
    assert (m / "b" / "x").read_bytes() == b"b new"


def test_mtime_seen_live_is_kept(volume: Volume) -> None:
    """The mtime a writer sees after closing a new file is the one the volume keeps:
    the same in history and after a remount."""
    m = volume.mnt
    seen = {}
    for i in range(60):
        put(m / f"f{i}", os.urandom(100_000))
        seen[f"f{i}"] = os.stat(m / f"f{i}").st_mtime_ns
    t = moment()
    past = {n: os.stat(m / f"@{local_ns(t)}" / n).st_mtime_ns for n in seen}
    volume.remount()
    after = {n: os.stat(m / n).st_mtime_ns for n in seen}
    changed = {n: f"{seen[n]} -> {after[n]} ({after[n] - seen[n]:+} ns)"
               for n in seen if seen[n] != after[n]}
    assert not changed, f"{len(changed)} of {len(seen)} mtimes changed: {changed}"
    assert past == after


# --- 3. @ entries in the root listing -------------------------------------------------


AUTO = re.compile(r"@\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z")  # the one name of a point


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_root_lists_moments_unless_hidden(volume: Volume) -> None:
    m = volume.mnt
    put(m / "f", b"marked")
    cdpfs("bookmark", "mark", "--volume", m)
    put(m / "f", b"later")
    names = os.listdir(m)
    assert "f" in names and "@mark" in names
    auto = [n for n in names if AUTO.fullmatch(n)]
    assert auto, names
    assert (m / auto[0] / "f").read_bytes() == b"later"  # the latest change of this hour
    assert (m / "@mark" / "f").read_bytes() == b"marked"

    volume.umount()
    volume.mount("--history", "hidden")
    assert os.listdir(m) == ["f"]
    assert (m / "@mark" / "f").read_bytes() == b"marked"
    assert (m / auto[0] / "f").read_bytes() == b"later"  # the same name, hidden or not
    assert os.listdir(m) == ["f"]

    # The store's own setting (like zfs set snapdir=visible) is the default of a
    # mount; --history overrides it.
    volume.umount()
    assert "history=visible" in cdpfs("config", volume.store, "history=visible").stdout
    volume.mount()
    assert "@mark" in os.listdir(m)
    volume.umount()
    volume.mount("--history", "hidden")
    assert os.listdir(m) == ["f"]
    volume.umount()
    cdpfs("config", volume.store, "history=hidden")
    volume.mount()
    assert os.listdir(m) == ["f"]


def test_tools_that_walk_the_volume_see_no_history(volume: Volume) -> None:
    """By default the root lists no @ entries: find, du and checksums over find give
    the volume's own answer, the same after a remount; every @ name still works."""
    m = volume.mnt
    (m / "d").mkdir()
    put(m / "d" / "a", b"a" * 5000)
    cdpfs("bookmark", "mark", "--volume", m)
    put(m / "b", b"b" * 3000)

    def walk() -> tuple[list[str], str]:
        found = subprocess.run(["find", str(m)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        du = subprocess.run(["du", "-sb", "--apparent-size", str(m)], capture_output=True,
                            text=True, check=True).stdout.split()[0]
        return sorted(found), du

    first = walk()
    assert not [p for p in first[0] if "/@" in p], first[0]
    assert sorted(os.path.relpath(p, m) for p in first[0]) == [".", "b", "d", "d/a"]
    volume.remount()
    assert walk() == first
    assert (m / "@mark" / "d" / "a").read_bytes() == b"a" * 5000  # named, it is there
    assert not (m / "@mark" / "b").exists()
    assert sorted(os.listdir(m / "@now")) == ["b", "d"]


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_listed_moment_names_resolve_at_once(volume: Volume) -> None:
    """A name the root listing shows must name a moment as soon as it is listed."""
    m = volume.mnt
    sleep_until(int(time.time()) + 1.02)  # the start of a fresh second
    put(m / "f", b"content")
    auto = [n for n in os.listdir(m) if AUTO.fullmatch(n)]
    assert len(auto) == 1, auto
    settle(m)
    st = Store(volume.store, readonly=True)
    try:
        with st.txn() as txn:
            seq = resolve(st, txn, auto[0]).seq  # BadMoment here is the bug
            assert seq == resolve(st, txn, "now").seq

    finally:
        st.close()


# --- 4. history is read-only ---------------------------------------------------------


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_everything_under_a_moment_is_read_only(volume: Volume) -> None:
    m = volume.mnt
    put(m / "f", b"past content")
    os.setxattr(m / "f", "user.k", b"v")
    (m / "d").mkdir()
    put(m / "d" / "inner", b"inner content")
    (m / "empty").mkdir()
    os.symlink("f", m / "sym")
    t = moment()
    put(m / "f", b"live content")
    p = m / f"@{local_ns(t)}"
    want = tree_state(p)
    f = p / "f"

    def opener(flags: int, path: Path = f) -> Callable[[], None]:
        return lambda: os.close(os.open(path, flags, 0o644))

    attempts: dict[str, Callable[[], object]] = {
        "open for write": opener(os.O_WRONLY),
        "open read-write": opener(os.O_RDWR),
        "open for append": opener(os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": opener(os.O_WRONLY | os.O_TRUNC),
        "open O_RDONLY|O_TRUNC": opener(os.O_RDONLY | os.O_TRUNC),
        "create": opener(os.O_WRONLY | os.O_CREAT, p / "new"),
        "create in subdir": opener(os.O_WRONLY | os.O_CREAT | os.O_EXCL, p / "d" / "new"),
        "mkdir": lambda: os.mkdir(p / "d" / "sub"),
        "mknod": lambda: os.mknod(p / "node", stat.S_IFREG | 0o644),
        "mkfifo": lambda: os.mkfifo(p / "fifo"),
        "symlink": lambda: os.symlink("f", p / "l2"),
        "unlink": lambda: os.unlink(f),
        "unlink symlink": lambda: os.unlink(p / "sym"),
        "rmdir": lambda: os.rmdir(p / "empty"),
        "rename": lambda: os.rename(f, p / "g"),
        "rename into subdir": lambda: os.rename(f, p / "d" / "f"),
        "chmod": lambda: os.chmod(f, 0o600),
        "chown": lambda: os.chown(f, 1000, 1000),
        "utime": lambda: os.utime(f, ns=(1, 2)),
        "truncate": lambda: os.truncate(f, 0),
        "setxattr": lambda: os.setxattr(f, "user.k", b"w"),
        "new xattr": lambda: os.setxattr(f, "user.other", b"w"),
        "removexattr": lambda: os.removexattr(f, "user.k"),
        "chmod of the @ root": lambda: os.chmod(p, 0o700),
        "rmdir of the @ name": lambda: os.rmdir(p),
    }
    got = {what: errno_of(fn) for what, fn in attempts.items()}
    assert got == dict.fromkeys(attempts, errno.EROFS)
    assert_same(tree_state(p), want)

    # History to live (and back) is another filesystem for link and rename.
    assert errno_of(os.link, f, m / "linked") == errno.EXDEV
    assert errno_of(os.rename, f, m / "moved") == errno.EXDEV
    assert errno_of(os.rename, p / "d", m / "moved") == errno.EXDEV
    assert errno_of(os.link, m / "f", p / "linked") == errno.EXDEV
    assert errno_of(os.rename, m / "f", p / "moved") == errno.EXDEV

    # rm -rf of everything: the live tree goes, history stays whole.
    cdpfs("bookmark", "keep", "--at", local_ns(t), "--volume", m)
    assert "@keep" in os.listdir(m)
    rm = subprocess.run(["bash", "-c", f"rm -rf {m}/*"], capture_output=True, text=True)
    assert rm.returncode != 0 and "Read-only file system" in rm.stderr
    assert [n for n in os.listdir(m) if not n.startswith("@")] == []
    assert_same(tree_state(p), want)
    assert_same(tree_state(m / "@keep"), want)
    assert (p / "f").read_bytes() == b"past content"
    assert (p / "d" / "inner").read_bytes() == b"inner content"


# --- 5. @ names at the root are reserved -------------------------------------------------


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_root_names_starting_with_at_are_reserved(volume: Volume) -> None:
    m = volume.mnt
    put(m / "live", b"x")
    attempts: dict[str, Callable[[], object]] = {
        "mkdir": lambda: os.mkdir(m / "@x"),
        "create": lambda: os.close(os.open(m / "@file", os.O_WRONLY | os.O_CREAT, 0o644)),
        "mknod": lambda: os.mkfifo(m / "@fifo"),
        "symlink": lambda: os.symlink("live", m / "@l"),
        "rename": lambda: os.rename(m / "live", m / "@r"),
        "link": lambda: os.link(m / "live", m / "@h"),
    }
    got = {what: errno_of(fn) for what, fn in attempts.items()}
    assert got == dict.fromkeys(attempts, errno.EPERM)
    assert [n for n in os.listdir(m) if not AUTO.fullmatch(n)] == ["live"]
    assert (m / "live").read_bytes() == b"x"
    # Below the root, @ is an ordinary first character.
    (m / "d").mkdir()
    put(m / "d" / "@fine", b"ok")
    assert (m / "d" / "@fine").read_bytes() == b"ok"


# --- 6. permissions under @T -----------------------------------------------------------


def as_nobody(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *map(str, cmd)], capture_output=True, text=True,
                          timeout=30)


def test_past_permissions_are_checked_then_and_now(shared_volume: Volume) -> None:
    m = shared_volume.mnt
    os.chmod(m, 0o755)
    for name, mode in (("a", 0o644), ("b", 0o600), ("c", 0o644), ("d", 0o644)):
        put(m / name, f"content {name}".encode())
        os.chmod(m / name, mode)
    t = moment()
    os.chmod(m / "a", 0o600)
    os.chmod(m / "b", 0o644)
    (m / "d").unlink()
    past = m / f"@{local_ns(t)}"
    assert stat.S_IMODE(os.stat(past / "a").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(past / "b").st_mode) == 0o600

    def nobody_reads(path: Path) -> str:
        r = as_nobody("cat", path)
        return r.stdout if r.returncode == 0 else r.stderr.rsplit(": ", 1)[-1].strip()

    denied = "Permission denied"
    got = {str(p.relative_to(m)): nobody_reads(p) for p in (
        past / "a", m / "a", past / "b", m / "b", past / "c", m / "c", past / "d")}
    assert got == {
        f"{past.name}/a": denied, "a": denied,       # (a) open then, closed now
        f"{past.name}/b": denied, "b": "content b",  # (b) closed then, open now
        f"{past.name}/c": "content c", "c": "content c",  # (c) open both times
        f"{past.name}/d": "content d",               # open then, deleted since
    }
    r = as_nobody("ls", past)
    assert r.returncode == 0 and r.stdout.split() == ["a", "b", "c", "d"], r
    # root reads everything, in history too
    assert (past / "a").read_bytes() == b"content a"
    assert (past / "b").read_bytes() == b"content b"


# --- 7. drag and drop out of history ---------------------------------------------------


def test_copy_a_past_tree_back_equals_the_tree_then(volume: Volume) -> None:
    m = volume.mnt
    tree = m / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty").mkdir()
    big = os.urandom(3 * 2**20)
    put(tree / "big", big)
    put(tree / "small.txt", b"small text\n" * 100)
    put(tree / "sub" / "deeper" / "leaf", b"leaf")
    os.chmod(tree / "sub" / "deeper" / "leaf", 0o640)
    os.symlink("small.txt", tree / "link")
    os.symlink("../big", tree / "sub" / "up")
    os.link(tree / "sub" / "deeper" / "leaf", tree / "hard")
    os.setxattr(tree / "small.txt", "user.color", b"blue")
    os.setxattr(tree / "sub", "user.kind", b"directory")
    stamp = 1_700_000_000_123_456_789
    for i, rel in enumerate(["big", "small.txt", "sub/deeper/leaf", "link", "sub/up",
                             "sub/deeper", "sub", "empty", "."]):
        os.utime(tree / rel, ns=(stamp, stamp + i * 1_000_001), follow_symlinks=False)
    settle(m)
    want = tree_state(tree)
    t = moment()

    with open(tree / "big", "r+b") as fh:
        fh.seek(2**20)
        fh.write(b"changed" * 1000)
    (tree / "small.txt").unlink()
    os.rename(tree / "sub", tree / "moved")
    os.setxattr(tree / "moved", "user.kind", b"changed")
    put(tree / "new", b"new")
    os.chmod(tree / "hard", 0o600)

    past = m / f"@{local_ns(t)}" / "tree"
    assert_same(tree_state(past), want)
    r = subprocess.run(["cp", "-a", past, m / "back"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same(tree_state(m / "back"), want)
    assert (m / "back" / "big").read_bytes() == big
    assert os.stat(m / "back" / "hard").st_ino == os.stat(m / "back/sub/deeper/leaf").st_ino


# --- 8. a snapshot mount beside the live one --------------------------------------------


def test_snapshot_mount_stays_put_while_live_changes(volume: Volume, tmp_path: Path) -> None:
    m = volume.mnt
    (m / "early").mkdir()
    (m / "late").mkdir()
    for i in range(4):
        put(m / "early" / f"f{i}", os.urandom(100_000))
        put(m / "late" / f"f{i}", os.urandom(300_000))
    put(m / "late" / "small", b"small file")
    settle(m)
    # (times=False: see test_mtime_seen_live_is_kept; mtimes are compared between
    # the snapshot and history below.)
    want = tree_state(m, skip_at=True, times=False)
    t = moment()
    snap = tmp_path / "snap"
    snap.mkdir()
    stop = threading.Event()
    failures: list[BaseException] = []
    written: list[tuple[Path, bytes]] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                d = "early" if i % 2 else "late"
                put(m / d / f"f{i % 4}", os.urandom(100_000 + i))
                put(m / d / f"new{i}", b"new %d" % i)
                if i % 5 == 4:
                    (m / d / f"new{i - 2}").unlink()
                written.append((m / d / f"new{i}", b"new %d" % i))
                i += 1
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=writer)
    try:
        out = cdpfs("mount", "--at", local_ns(t), volume.store, snap).stdout
        assert "read-only" in out
        assert os.path.ismount(snap)
        thread.start()
        first = tree_state(snap / "early")
        deadline = time.monotonic() + 3
        rounds = 0
        while time.monotonic() < deadline:
            assert_same(tree_state(snap / "early"), first)
            rounds += 1
        assert rounds >= 3 and len(written) >= 10, (rounds, len(written))
        assert_same(tree_state(snap / "early", times=False), subtree(want, "early"))

        attempts: dict[str, Callable[[], object]] = {
            "write": lambda: os.close(os.open(snap / "early" / "f0", os.O_WRONLY)),
            "create": lambda: os.close(os.open(snap / "x", os.O_WRONLY | os.O_CREAT)),
            "mkdir": lambda: os.mkdir(snap / "d"),
            "unlink": lambda: os.unlink(snap / "early" / "f1"),
            "rename": lambda: os.rename(snap / "early", snap / "e2"),
            "chmod": lambda: os.chmod(snap / "early", 0o700),
            "truncate": lambda: os.truncate(snap / "late" / "small", 0),
            "setxattr": lambda: os.setxattr(snap / "late" / "small", "user.a", b"b"),
        }
        assert {k: errno_of(fn) for k, fn in attempts.items()} == dict.fromkeys(
            attempts, errno.EROFS)

        r = cdpfs("retention", volume.store, "--keep-all", "1s")
        assert "every write for 1s" in r.stdout
        time.sleep(1.2)
        r = cdpfs("prune", volume.store)
        assert r.stdout.startswith("pruned "), r.stdout
        stop.set()
        thread.join(timeout=30)
        assert not failures, failures
        # "late" was never read through the snapshot before the prune: its old
        # versions are needed only by the snapshot's point, which it holds.
        got = tree_state(snap)
        assert_same(tree_state(snap, times=False), want)
        assert_same(subtree(got, "early"), first)
        assert_same(tree_state(m / f"@{local_ns(t)}"), got)  # the same point, held
        assert cdpfs("umount", snap).returncode == 0
        assert not os.path.ismount(snap)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=30)
        force_unmount(snap)
    put(m / "after", b"still live")
    assert (m / "after").read_bytes() == b"still live"
    path, data = written[-1]
    assert path.read_bytes() == data

    bad = cdpfs("mount", "--at", "@nonsense", volume.store, snap, check=False)
    line = one_line_error(bad)
    assert "nonsense" in line
    assert not os.path.ismount(snap)


def test_verify_accepts_a_pruned_store(volume: Volume) -> None:
    """After prune has thinned history, ``cdpfs verify`` finds the store sound."""
    m = volume.mnt
    (m / "d").mkdir()
    for i in range(3):
        put(m / "d" / f"f{i}", b"%d" % i)
    cdpfs("retention", m, "--keep-all", "1s")
    time.sleep(1.2)
    put(m / "d" / "f0", b"new")
    r = cdpfs("prune", m)
    assert not r.stdout.startswith("pruned 0 versions"), r.stdout
    assert contents(m) == {"d/f0": b"new", "d/f1": b"1", "d/f2": b"2"}
    volume.umount()
    proc = cdpfs("verify", volume.store, check=False)
    volume.mount()
    assert contents(m) == {"d/f0": b"new", "d/f1": b"1", "d/f2": b"2"}
    assert proc.returncode == 0, f"verify after prune:\n{proc.stdout}{proc.stderr}"


# --- 9. cdpfs log -----------------------------------------------------------------------


def test_log_lists_versions_newest_first(volume: Volume) -> None:
    m = volume.mnt
    f = m / "f"
    for i in range(1, 4):
        with open(f, "ab") as fh:
            fh.write(bytes([i]) * 1000)
    t = moment()
    f.unlink()
    put(f, b"a different file at the same path")

    rows = log_rows(cdpfs("log", f).stdout)
    assert rows[0][2] == 33 and all(size in (0, 33) for _s, _o, size in rows)
    rows = log_rows(cdpfs("log", f, "--at", local_ns(t)).stdout)
    seqs = [seq for seq, _op, _size in rows]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
    sizes = [size for _seq, _op, size in rows]
    assert sizes == sorted(sizes, reverse=True), rows
    writes = [size for _seq, op, size in rows if op == "write"]
    assert writes == [3000, 2000, 1000], rows
    assert rows[-1][1] == "mknod"

    f.unlink()
    rows_gone = log_rows(cdpfs("log", f, "--at", local_ns(t)).stdout)
    assert rows_gone == rows  # --at finds a path that no longer exists
    limited = log_rows(cdpfs("log", f, "--at", local_ns(t), "-n", "2").stdout)
    assert limited == rows[:2]
    r = cdpfs("log", f, check=False)
    one_line_error(r)


# --- 10. cdpfs diff ---------------------------------------------------------------------


def test_diff_reports_added_changed_deleted_renamed(volume: Volume) -> None:
    m = volume.mnt
    (m / "d" / "sub").mkdir(parents=True)
    for rel in ("d/a", "d/b", "d/sub/c", "x", "y", "keep"):
        put(m / rel, rel.encode())
    t1 = moment()
    put(m / "z", b"new")
    put(m / "x", b"changed")
    (m / "y").unlink()
    os.rename(m / "d", m / "e")
    t2 = moment()

    r = cdpfs("diff", local_ns(t1), local_ns(t2), m)
    assert r.stdout.splitlines() == ["R  d -> e", "M  x", "D  y", "A  z"]
    assert "1 added, 1 changed, 1 removed, 1 renamed" in r.stderr
    r = cdpfs("diff", local_ns(t1), local_ns(t2), m / "e")  # a directory that is new by name
    assert r.stdout.splitlines() == ["A  e", "A  e/a", "A  e/b", "A  e/sub", "A  e/sub/c"]

    put(m / "e" / "a", b"changed after t2")
    (m / "keep").unlink()
    r = cdpfs("diff", local_ns(t2), "now", m)
    assert r.stdout.splitlines() == ["M  e/a", "D  keep"]
    r = cdpfs("diff", utc_ms(t2), "now", "e", "--store", volume.store)
    assert r.stdout.splitlines() == ["M  e/a"]
    assert cdpfs("diff", "now", "now", m).stdout == ""


# --- 11. cdpfs restore ------------------------------------------------------------------


def test_restore_files_and_directories(volume: Volume, tmp_path: Path) -> None:
    m = volume.mnt
    (m / "d").mkdir()
    put(m / "f", b"old content of f")
    put(m / "d" / "a", b"old a")
    put(m / "d" / "b", b"old b")
    put(m / "g", b"g will be deleted")
    t = moment()
    put(m / "f", b"new content of f, longer")
    put(m / "d" / "a", b"new a")
    put(m / "d" / "extra", b"extra")
    (m / "g").unlink()
    put(m / "h", b"born after t")
    ino = os.stat(m / "f").st_ino

    r = cdpfs("restore", m / "f", "--at", local_ns(t))
    assert r.stdout.startswith("restored f to #"), r.stdout
    assert (m / "f").read_bytes() == b"old content of f"
    assert os.stat(m / "f").st_ino == ino  # rewritten in place

    r = cdpfs("restore", m / "d", "--at", local_ns(t))
    assert "1 entries that did not exist then were kept (use --delete" in r.stdout
    assert contents(m / "d") == {"a": b"old a", "b": b"old b", "extra": b"extra"}
    r = cdpfs("restore", m / "d", "--at", local_ns(t), "--delete")
    assert "1 removed" in r.stdout
    assert contents(m / "d") == {"a": b"old a", "b": b"old b"}

    cdpfs("restore", m / "g", "--at", local_ns(t))
    assert (m / "g").read_bytes() == b"g will be deleted"

    # A restore is an ordinary change: restoring to just before it undoes it.
    put(m / "f", b"overwritten")
    undo_to = moment()
    cdpfs("restore", m / "f", "--at", local_ns(t))
    assert (m / "f").read_bytes() == b"old content of f"
    cdpfs("restore", m / "f", "--at", local_ns(undo_to))
    assert (m / "f").read_bytes() == b"overwritten"
    put(m / "d" / "extra2", b"extra again")
    undo_to = moment()
    cdpfs("restore", m / "d", "--at", local_ns(t), "--delete")
    assert contents(m / "d") == {"a": b"old a", "b": b"old b"}
    cdpfs("restore", m / "d", "--at", local_ns(undo_to))
    assert contents(m / "d") == {"a": b"old a", "b": b"old b", "extra2": b"extra again"}

    line = one_line_error(cdpfs("restore", m / "h", "--at", local_ns(t), check=False))
    assert "did not exist" in line
    assert (m / "h").read_bytes() == b"born after t"
    outside = tmp_path / "outside"
    outside.write_text("not in a volume")
    line = one_line_error(cdpfs("restore", outside, "--at", "-1s", check=False))
    assert "not inside a mounted cdpfs volume" in line
    line = one_line_error(cdpfs("restore", m / f"@{local_ns(t)}" / "f", "--at",
                                local_ns(t), check=False))
    assert "history" in line


# --- 12. cdpfs rewind -------------------------------------------------------------------


def test_rewind_makes_the_volume_equal_to_the_past(volume: Volume) -> None:
    m = volume.mnt
    (m / "docs" / "old").mkdir(parents=True)
    put(m / "docs" / "a.txt", b"alpha")
    put(m / "docs" / "old" / "b.txt", b"beta" * 10_000)
    os.symlink("docs/a.txt", m / "shortcut")
    os.setxattr(m / "docs" / "a.txt", "user.tag", b"one")
    put(m / "big", os.urandom(1_500_000))
    os.chmod(m / "big", 0o600)
    t = moment()
    past = m / f"@{local_ns(t)}"
    want = tree_state(past)

    put(m / "docs" / "a.txt", b"alpha, edited")
    os.setxattr(m / "docs" / "a.txt", "user.tag", b"two")
    os.rename(m / "docs" / "old", m / "docs" / "renamed")
    (m / "shortcut").unlink()
    os.symlink("big", m / "shortcut")
    (m / "new").mkdir()
    put(m / "new" / "file", b"new")
    with open(m / "big", "r+b") as fh:
        fh.write(b"\0" * 5000)
    os.chmod(m / "big", 0o644)
    t2 = moment()
    changed = tree_state(m, skip_at=True)
    changed_past = tree_state(m / f"@{local_ns(t2)}", skip_at=True)

    r = cdpfs("rewind", m, "--at", local_ns(t), input="n\n", check=False)
    assert r.returncode == 1 and "cancelled" in r.stderr, r
    assert "Rewind everything" in r.stderr
    assert_same(tree_state(m, skip_at=True), changed)

    r = cdpfs("rewind", m, "--at", local_ns(t), "--yes")
    assert r.stdout.startswith("restored volume to #"), r.stdout
    now = tree_state(m, skip_at=True)
    assert_same({k: v for k, v in now.items() if k != "."},
                {k: v for k, v in want.items() if k != "."})
    assert now["."][:4] == want["."][:4]  # type, mode, owner of the root
    # History is kept: both moments still show what they showed.
    assert_same(tree_state(m / f"@{local_ns(t)}"), want)
    assert_same(tree_state(m / f"@{local_ns(t2)}", skip_at=True), changed_past)
    # ... and the rewind can be undone like any change.
    cdpfs("rewind", m, "--at", local_ns(t2), "--yes")
    again = tree_state(m, skip_at=True)
    assert_same({k: v for k, v in again.items() if k != "."},
                {k: v for k, v in changed_past.items() if k != "."})
    assert_same(tree_state(m, skip_at=True, times=False), tree_state(
        m / f"@{local_ns(t2)}", skip_at=True, times=False))


def test_restore_refuses_a_path_through_a_symlink(volume: Volume) -> None:
    m = volume.mnt
    (m / "d").mkdir()
    put(m / "d" / "f", b"then")
    t = moment()
    put(m / "d" / "f", b"now")
    os.symlink("d", m / "link")
    r = cdpfs("restore", m / "link" / "f", "--at", local_ns(t), check=False)
    assert r.returncode == 1 and "symbolic link" in one_line_error(r), r
    assert (m / "d" / "f").read_bytes() == b"now"  # nothing restored through it
    cdpfs("restore", m / "d" / "f", "--at", local_ns(t))  # the real path works
    assert (m / "d" / "f").read_bytes() == b"then"


def test_a_rewind_whose_mount_dies_stops_with_one_line(volume: Volume) -> None:
    m = volume.mnt
    t = moment()  # an empty volume
    (m / "many").mkdir()
    for i in range(3000):
        (m / "many" / f"f{i}").write_bytes(b"x")
    settle(m)
    before = store_seq(volume.store)
    proc = subprocess.Popen([*CLI, "rewind", str(m), "--at", local_ns(t), "--yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # until some of its removals are committed (a rewind does not fsync each one:
        # what was applied and not yet committed is lost with the mount, as it should)
        while store_seq(volume.store) < before + 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(volume.pid, signal.SIGKILL)  # the mount dies under the rewind
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "restored volume" not in out, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "mount went away" in lines[0], err[-2000:]
    force_unmount(m)
    volume.mount()  # the store is sound; what the rewind did before stays
    assert len(os.listdir(m / "many")) < 3000


# --- 13. bookmarks ----------------------------------------------------------------------


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_bookmarks(volume: Volume) -> None:
    m = volume.mnt
    put(m / "f", b"first")
    t1 = moment()
    put(m / "f", b"second")

    r = cdpfs("bookmark", "release-1.0", "--volume", m)
    assert re.fullmatch(r"bookmark release-1\.0 -> #\d+ \(.+\)\n", r.stdout), r.stdout
    assert (m / "@release-1.0" / "f").read_bytes() == b"second"  # at once
    assert "@release-1.0" in os.listdir(m)
    cdpfs("bookmark", "early", "--at", local_ns(t1), "--volume", m)
    assert (m / "@early" / "f").read_bytes() == b"first"
    cdpfs("bookmark", "by_store", "--volume", volume.store)
    listed = cdpfs("bookmarks", "--volume", m).stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["by_store", "early", "release-1.0"]

    line = one_line_error(cdpfs("bookmark", "early", "--volume", m, check=False))
    assert "exists" in line
    for bad in ("2026-01-01", "#5", "-3m", "a/b", "with space", ".hidden"):
        r = cdpfs("bookmark", "--volume", m, "--", bad, check=False)
        one_line_error(r)
    line = one_line_error(cdpfs("bookmark", "later", "--at", "2099-01-01", "--volume", m,
                                check=False))
    assert "future" in line
    assert [x.split()[0] for x in cdpfs("bookmarks", "--volume", m).stdout.splitlines()] == [
        "by_store", "early", "release-1.0"]

    r = cdpfs("bookmark", "--delete", "early", "--volume", m)
    assert "deleted bookmark early" in r.stdout
    assert "early" not in cdpfs("bookmarks", "--volume", m).stdout
    line = one_line_error(cdpfs("bookmark", "--delete", "early", "--volume", m, check=False))
    assert "no such bookmark" in line
    time.sleep(1.1)  # the kernel may cache an @ name for 1 s
    assert not os.path.exists(m / "@early")
    assert "@early" not in os.listdir(m)


def test_bookmark_visible_soon_after_a_failed_lookup(volume: Volume) -> None:
    """Looking for a bookmark before it exists must not hide it for long afterwards.

    Three rounds: the kernel sometimes drops cached names early, which would hide
    the problem in one round, hardly in three."""
    m = volume.mnt
    put(m / "f", b"x")
    hidden = []
    for name in ("soon0", "soon1", "soon2"):
        assert not os.path.exists(m / f"@{name}")
        cdpfs("bookmark", name, "--volume", m)
        time.sleep(1.1)  # @ names are cached for 1 s
        if not os.path.exists(m / f"@{name}"):
            hidden.append(name)
    assert not hidden, f"bookmarks made 1 s ago, but MNT/@<name> not found for {hidden}"


def test_bookmark_cannot_take_a_hold_name(volume: Volume) -> None:
    """Names of retention holds (``.hold.<pid>.<tag>``) are not bookmark names: a user
    must not be able to make an unlisted entry that pins history."""
    m = volume.mnt
    put(m / "f", b"x")
    one_line_error(cdpfs("bookmark", ".hold.1.mine", "--volume", m, check=False))


@pytest.mark.mount("--history", "visible")  # the root lists @ entries
def test_bookmark_name_with_at_is_usable_or_refused(volume: Volume) -> None:
    """`cdpfs bookmark @x` (the way the mount spells it): either refused, or usable
    as ``MNT/@x`` and ``--at @x`` like any other bookmark."""
    m = volume.mnt
    put(m / "f", b"x")
    r = cdpfs("bookmark", "@tagged", "--volume", m, check=False)
    if r.returncode != 0:
        one_line_error(r)
        return
    assert "@tagged" in os.listdir(m), os.listdir(m)
    assert (m / "@tagged" / "f").read_bytes() == b"x"
    cdpfs("diff", "@tagged", "now", m)


# --- 14. stat, df and retention ---------------------------------------------------------


def test_stat_df_and_retention(volume: Volume) -> None:
    m = volume.mnt
    data = os.urandom(2**20)
    for name in ("one", "two", "three"):
        put(m / name, data)
    put(m / "one", data)  # rewritten: history, no new unique data

    out = cdpfs("stat", m).stdout
    assert cdpfs("df", volume.store).stdout.splitlines()[:3] == out.splitlines()[:3]
    fields = dict(re.findall(r"^(\w[\w ]*?)\s{2,}(.*)$", out, re.M))
    assert set(fields) >= {"live data", "history", "stored", "dedup", "compression",
                           "oldest point", "journal", "retention"}, out
    assert fields["live data"].startswith("3.0 MiB in 3 files"), out
    dedup = float(re.match(r"([\d.]+)x", fields["dedup"])[1])  # type: ignore[index]
    assert 2.8 <= dedup <= 3.2, out
    compression = float(re.match(r"([\d.]+)x", fields["compression"])[1])  # type: ignore[index]
    assert 0.9 <= compression <= 1.1, out  # random data does not compress
    stored = float(re.match(r"([\d.]+) MiB", fields["stored"])[1])  # type: ignore[index]
    assert 0.9 <= stored <= 1.3, out  # 3 MiB of files, 1 MiB unique
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \(#1\)", fields["oldest point"])
    assert re.match(r"\d+ records, newest #\d+ at ", fields["journal"])

    default = ("every write for 1d, then one point per minute to 7d, per hour to 30d, "
               "per day to 1y; bookmarks until deleted")
    assert cdpfs("retention", m).stdout.strip() == (
        f"retention: {default}; a mount prunes every 3600s")
    assert fields["retention"] == default
    r = cdpfs("retention", volume.store, "--keep-all", "2h", "--minutely", "2d",
              "--prune-interval", "30m")
    assert r.stdout.strip() == ("retention: every write for 2h, then one point per minute to "
                                "2d, per hour to 30d, per day to 1y; bookmarks until deleted; "
                                "a mount prunes every 1800s")
    for args in (["--keep-all", "5x"], ["--hourly", "soon"], ["--daily", "-1d"],
                 ["--keep-all", "3d"], ["--hourly", "1d"], ["--daily", "10d", "--hourly", "20d"],
                 ["--prune-interval", "often"]):
        line = one_line_error(cdpfs("retention", m, *args, check=False))
        assert "duration" in line or "must not shrink" in line, (args, line)
    assert cdpfs("retention", m).stdout == r.stdout  # refused changes changed nothing
    assert cdpfs("stat", m).stdout.splitlines()[-1] == (
        "retention        every write for 2h, then one point per minute to 2d, per hour to "
        "30d, per day to 1y; bookmarks until deleted")
