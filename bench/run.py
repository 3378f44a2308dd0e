"""The cdpfs benchmark suite: every workload on cdpfs, a Python pass-through and the disk.

One command runs each workload, in the same invocation, on

* **cdpfs**: a fresh store mounted with ``cdpfs mount`` (background daemon);
* **passthrough**: ``bench/passthrough.py``, a minimal pyfuse3 + trio pass-through
  with the same kernel-cache settings as cdpfs: the ceiling of a Python FUSE fs;
* **native**: a plain directory on the same filesystem as the store,

and prints one table: the figure of each target, the cdpfs/passthrough and
cdpfs/native speed ratios, the store growth of cdpfs (LMDB used bytes added per
byte written; history is kept) and the performance targets with PASS/MISS.

Workloads (all data is generated or read before timing starts):

* sequential write of ``--size-mb`` (1 MiB writes, fsync at the end), then a cold
  read (unmount, drop the page cache, mount) and a warm read, in MB/s, for
  compressible text (Python sources, each 4 KiB stamped with a counter so no two
  blocks dedupe) and incompressible ``os.urandom`` data;
* random 4 KiB writes into a preallocated file, fsync every 256 writes, in MB/s;
* creation of many 4 KiB files in one directory, then a sync, in files/s;
* ``tar -xf`` of the Python standard library sources, then a sync, in s and MB/s;
* the compressor ceiling: ``cdpfs.codec.encode`` alone on 128 KiB blocks of the
  same text, one thread (cdpfs compresses whole blocks on two codec threads).

Usage: ``python bench/run.py [--quick] [--size-mb N] [--markdown FILE]``
(root needed: FUSE mounts and ``/proc/sys/vm/drop_caches``). Every mount made
here is unmounted on the way out, also on errors and SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the harness
from harness import HarnessError, Volume, settle  # one harness for the tests and benchmarks

from cdpfs.store import codec
from cdpfs.store.lmdb import Store
from cdpfs.store.lock import holder

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
MB = 1e6  # throughput is reported in MB/s (10^6 bytes per second)
IO_SIZE = MiB  # sequential read/write request size
SMALL = 4 * KiB  # random write and small file size
BLOCK = 128 * KiB  # cdpfs block size (checked against the store after init)
STAMP = 16  # bytes of counter stamped at the head of each 4 KiB of text
BENCH_DIR = Path(__file__).resolve().parent
PASSTHROUGH = BENCH_DIR / "passthrough.py"
MEMFS = BENCH_DIR / "memfs.py"
STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
WORKLOADS = ("zstd", "seq-text", "seq-random", "rand", "files", "tar", "fio", "stat", "git",
             "latency")
TICK = os.sysconf("SC_CLK_TCK")
BACKENDS = ("cdpfs", "passthrough", "native", "memfs")


# A benchmark's own failure, and the harness's (a command or process that failed).
BenchError = HarnessError


# --- configuration and inputs ------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """What to run and how big."""

    size: int  # bytes of each sequential file
    files: int  # number of small files
    rand_file: int  # size of the preallocated random-write file
    rand_writes: int  # number of random 4 KiB writes
    rand_sync_every: int  # fsync after this many random writes
    stat_files: int  # entries of the directory listed with ls -l
    repeat: int  # runs per workload and target; the best is reported
    tar_excludes: tuple[str, ...]  # tar --exclude patterns for the stdlib tree
    base: Path  # directory for the temporary work directory
    workloads: tuple[str, ...]
    backends: tuple[str, ...]
    verify: bool
    keep: bool
    profile_dir: Path | None
    profile_mode: str
    quick: bool


@dataclass
class Inputs:
    """Data generated before any timing."""

    text: bytes = b""
    rand: bytes = b""
    rand_src: bytes = b""  # payload of the random 4 KiB writes
    rand_offsets: list[int] = field(default_factory=list)
    corpus_bytes: int = 0
    corpus_files: int = 0
    tar: Path | None = None
    tar_files: int = 0
    tar_bytes: int = 0


def make_text(size: int) -> tuple[bytes, int, int]:
    """``size`` bytes of real Python source, each 4 KiB led by a 16-byte counter stamp.

    The sources are streamed in order; the stamps make every 4 KiB (hence every
    block) unique, so nothing dedupes although the corpus repeats.
    Returns (data, corpus bytes, corpus files).
    """
    paths = sorted(p for p in STDLIB.rglob("*.py")
                   if "site-packages" not in p.parts and p.is_file())
    corpus = b"".join(p.read_bytes() for p in paths)
    body = SMALL - STAMP
    ring = corpus + corpus[:body]
    out = bytearray(size)
    pos = 0
    for i in range(size // SMALL):
        o = i * SMALL
        out[o : o + STAMP] = b"#%014d\n" % i
        out[o + STAMP : o + SMALL] = ring[pos : pos + body]
        pos = (pos + body) % len(corpus)
    tail = size % SMALL
    if tail:
        out[size - tail :] = ring[:tail]
    return bytes(out), len(corpus), len(paths)


def make_tar(dest: Path, excludes: tuple[str, ...]) -> tuple[int, int]:
    """Tar the stdlib sources into ``dest``; return (regular files, their bytes)."""
    cmd = ["tar", "-cf", str(dest), "-C", str(STDLIB.parent)]
    cmd += [f"--exclude={e}" for e in excludes]
    cmd.append(STDLIB.name)
    subprocess.run(cmd, check=True)
    files = nbytes = 0
    with tarfile.open(dest) as tf:
        for m in tf:
            if m.isreg():
                files += 1
                nbytes += m.size
    return files, nbytes


# --- system helpers ----------------------------------------------------------------------

def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path`` (also a dead FUSE mount, which
    ``os.path.ismount`` misses because stat fails with ENOTCONN)."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if "\\" in mnt:  # octal escapes such as \040 for a space
                mnt = mnt.encode().decode("unicode_escape")
            if mnt == target:
                return True
    return False


def fs_type(path: Path) -> str:
    """The filesystem type /proc/mounts gives for the mount holding ``path``."""
    path = path.resolve()
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) \
                    and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind


def bdi_readahead(mountpoint: Path) -> Path | None:
    """The read_ahead_kb knob of the mount on ``mountpoint``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb")
    return None


def settle_readahead(mountpoint: Path, timeout: float = 2.0) -> int | None:
    """Wait until the FUSE daemon has widened the mount's readahead; return it (KiB).

    Both daemons set it a moment after FUSE INIT; a file opened before that
    would keep the kernel's default 128 KiB window for its whole life.
    """
    knob = bdi_readahead(mountpoint)
    if knob is None:
        return None
    deadline = time.monotonic() + timeout
    kb = int(knob.read_text())
    while kb == 128 and time.monotonic() < deadline:
        time.sleep(0.02)
        kb = int(knob.read_text())
    return kb


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds; 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def drop_caches() -> bool:
    """Write back and drop the page cache; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        log.warning("cannot drop the page cache (%s): cold reads are not cold", exc)
        return False
    return True


def sync_dir(path: Path) -> None:
    """Make a tree durable: fsync its directory (cdpfs commits) and sync(2) the disk."""
    settle(path)
    os.sync()



def lazy_unmount(path: Path) -> None:
    if is_mounted(path):
        log.warning("lazy unmount of %s", path)
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def git_version() -> str:
    """The commit of the cdpfs checkout, and whether its code has uncommitted changes."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h %cs"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "cdpfs", "mount"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown version"
    return f"commit {head}" + (" + uncommitted changes in cdpfs/ or mount/" if dirty else "")


def cdpfs_command() -> str:
    exe = Path(sys.executable).with_name("cdpfs")
    if exe.exists():
        return str(exe)
    found = shutil.which("cdpfs")
    if found is None:
        raise BenchError("the cdpfs command is not installed")
    return found


# --- the three targets -------------------------------------------------------------------

class Backend:
    """A place to run workloads; ``start`` makes ``root`` usable, ``stop`` flushes it."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.root = work
        self.running = False
        self.readahead_kb: int | None = None

    def setup(self) -> None:
        pass

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def reset(self) -> None:
        """Start over with an empty volume (stopped backends only)."""

    def used_bytes(self) -> int | None:
        """Store size (stopped backends only); None when there is no store."""
        return None

    def pid(self) -> int | None:
        return None

    def cleanup(self) -> None:
        """Last-resort teardown: never raises, leaves nothing mounted."""
        with contextlib.suppress(Exception):
            if self.running:
                self.stop()


class Native(Backend):
    name = "native"

    def setup(self) -> None:
        self.root = self.work / "native"
        self.root.mkdir()

    def stop(self) -> None:
        os.sync()
        self.running = False

    def reset(self) -> None:
        shutil.rmtree(self.root)
        self.root.mkdir()


class PassthroughFs(Backend):
    name = "passthrough"

    def setup(self) -> None:
        self.backing = self.work / "pt-backing"
        self.root = self.work / "pt-mnt"
        self.logfile = self.work / "passthrough.log"
        self.backing.mkdir()
        self.root.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        lazy_unmount(self.root)  # a dead mount left by a crashed daemon
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf)
        deadline = time.monotonic() + 20
        while not is_mounted(self.root):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}; "
                                 f"see {self.logfile}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not mount in 20 s")
            time.sleep(0.02)
        self.running = True
        self.readahead_kb = settle_readahead(self.root)

    def command(self) -> list[str]:
        return [sys.executable, str(PASSTHROUGH), str(self.backing), str(self.root)]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        self.running = False
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log.error("passthrough pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.wait()
        lazy_unmount(self.root)

    def reset(self) -> None:
        shutil.rmtree(self.backing)
        self.backing.mkdir()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            lazy_unmount(self.root)


class MemFs(PassthroughFs):
    """``bench/memfs.py``: pyfuse3 answering from dicts, the ceiling of pyfuse3 itself.
    Its files live as long as its process, so ``stop`` keeps the process and empties
    the kernel's caches of it instead (what a remount does to the others); ``reset``
    ends the process: the next ``start`` is empty."""

    name = "memfs"

    def setup(self) -> None:
        self.root = self.work / "mem-mnt"
        self.logfile = self.work / "memfs.log"
        self.root.mkdir()
        self.proc = None

    def command(self) -> list[str]:
        return [sys.executable, str(MEMFS), str(self.root)]

    def start(self) -> None:
        if self.proc is None:
            super().start()
        self.running = True

    def stop(self) -> None:
        os.sync()
        drop_caches()
        self.running = False

    def reset(self) -> None:
        super().stop()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            super().stop()
        with contextlib.suppress(Exception):
            lazy_unmount(self.root)


class Cdpfs(Backend):
    name = "cdpfs"

    def setup(self) -> None:
        self.vol = Volume(self.work, "cdpfs")
        self.store = self.vol.store
        self.root = self.vol.mnt
        self.reset()

    def reset(self) -> None:
        if self.store.exists():
            shutil.rmtree(self.store)
        self.vol.init()
        s = Store(self.store, readonly=True)
        try:
            if s.block_size != BLOCK:
                log.warning("store block size is %d, the bench assumes %d", s.block_size, BLOCK)
        finally:
            s.close()

    def start(self) -> None:
        lazy_unmount(self.root)  # a dead mount left by a crashed daemon
        self.vol.mount()
        self.running = True
        self.readahead_kb = settle_readahead(self.root)

    def stop(self) -> None:
        self.running = False
        try:
            self.vol.umount()
        except HarnessError:
            lazy_unmount(self.root)
            raise

    def used_bytes(self) -> int:
        s = Store(self.store, readonly=True)
        try:
            return s.used_bytes()
        finally:
            s.close()

    def pid(self) -> int | None:
        """The mount daemon's pid (the holder of the store's writer lock)."""
        who = holder(self.store)
        return who.pid if who is not None and who.pid else None

    def cleanup(self) -> None:
        if is_mounted(self.root):
            with contextlib.suppress(Exception):
                self.vol.umount()
        self.vol.cleanup()
        self.running = False


# --- the I/O of the workloads ------------------------------------------------------------

def write_all(fd: int, mv: memoryview) -> None:
    while mv:
        mv = mv[os.write(fd, mv):]


def seq_write(path: Path, data: bytes) -> float:
    """Write ``data`` in 1 MiB requests, fsync, close; return seconds."""
    mv = memoryview(data)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), IO_SIZE):
            write_all(fd, mv[off : off + IO_SIZE])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_read(path: Path, size: int) -> float:
    """Read the file in 1 MiB requests; return seconds."""
    buf = bytearray(IO_SIZE)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    if total != size:
        raise BenchError(f"{path}: read {total} bytes, expected {size}")
    return dt


def verify_file(path: Path, expected: bytes | bytearray) -> None:
    """Raise BenchError unless ``path`` holds exactly ``expected``."""
    mv = memoryview(expected)
    buf = bytearray(IO_SIZE)
    off = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if buf[:n] != mv[off : off + n]:
                bad = next(i for i in range(n) if buf[i] != mv[off + i])
                raise BenchError(f"{path}: wrong data at offset {off + bad}")
            off += n
    if off != len(expected):
        raise BenchError(f"{path}: size {off}, expected {len(expected)}")


def random_writes(path: Path, offsets: list[int], src: bytes, sync_every: int) -> float:
    """pwrite 4 KiB of ``src`` at each offset, fsync every ``sync_every``; return seconds."""
    mv = memoryview(src)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, off in enumerate(offsets):
            os.pwrite(fd, mv[i * SMALL : (i + 1) * SMALL], off)
            if (i + 1) % sync_every == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def small_file(text: bytes, i: int) -> bytes:
    n = len(text) // SMALL
    j = i % n
    return text[j * SMALL : (j + 1) * SMALL]


def create_files(dirpath: Path, n: int, text: bytes) -> float:
    """Create ``n`` 4 KiB files in ``dirpath``, then sync; return seconds."""
    os.mkdir(dirpath)
    d = str(dirpath)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(d, f"f{i:06d}"), flags, 0o644)
        try:
            write_all(fd, memoryview(small_file(text, i)))
        finally:
            os.close(fd)
    sync_dir(dirpath)
    return time.perf_counter() - t0


def verify_files(dirpath: Path, n: int, text: bytes) -> None:
    names = os.listdir(dirpath)
    if len(names) != n:
        raise BenchError(f"{dirpath}: {len(names)} files listed, expected {n}")
    for i in range(n):
        p = dirpath / f"f{i:06d}"
        if p.read_bytes() != small_file(text, i):
            raise BenchError(f"{p}: wrong content")


def extract_tar(tar: Path, dest: Path) -> float:
    """``tar -xf`` into ``dest`` (created), then sync; return seconds."""
    os.mkdir(dest)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
    sync_dir(dest)
    return time.perf_counter() - t0


def verify_tar(tar: Path, dest: Path) -> None:
    with tarfile.open(tar) as tf:
        for m in tf:
            p = dest / m.name
            if m.isreg():
                src = tf.extractfile(m)
                assert src is not None
                if p.read_bytes() != src.read():
                    raise BenchError(f"{p}: content differs from the archive")
            elif m.issym():
                if os.readlink(p) != m.linkname:
                    raise BenchError(f"{p}: symlink target differs")
            elif m.isdir() and not p.is_dir():
                raise BenchError(f"{p}: directory missing")


def compressor_ceiling(data: bytes) -> tuple[float, float, float]:
    """Single-thread ``codec.encode`` on 128 KiB blocks of ``data``.

    Returns (encode seconds, stored/raw size ratio, digest+encode seconds).
    """
    mv = memoryview(data)
    stored = 0
    t0 = time.perf_counter()
    for off in range(0, len(data), BLOCK):
        stored += len(codec.encode(mv[off : off + BLOCK]))
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for off in range(0, len(data), BLOCK):
        block = mv[off : off + BLOCK]
        codec.digest(block)
        codec.encode(block)
    t_both = time.perf_counter() - t0
    return t_enc, stored / len(data), t_both


# --- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """cdpfs must reach ``minimum`` × the ``ref`` figure (a backend name or "zstd")."""

    ref: str
    minimum: float


@dataclass
class Row:
    """One line of the table."""

    workload: str
    data: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)
    higher_better: bool = True
    growth: float | None = None
    target: Target | None = None
    ref_value: float | None = None  # the zstd ceiling, for a "zstd" target
    note: str = ""

    def speed_ratio(self, other: str) -> float | None:
        a, b = self.values.get("cdpfs"), self.values.get(other)
        if a is None or b is None or a <= 0 or b <= 0:
            return None
        return a / b if self.higher_better else b / a

    def target_ratio(self) -> float | None:
        if self.target is None:
            return None
        if self.target.ref == "zstd":
            a = self.values.get("cdpfs")
            if a is None or not self.ref_value:
                return None
            return a / self.ref_value
        return self.speed_ratio(self.target.ref)

    def verdict(self) -> str:
        if self.target is None:
            return ""
        short = {"passthrough": "pt", "native": "native", "zstd": "zstd",
                 "memfs": "memfs"}[self.target.ref]
        r = self.target_ratio()
        head = f"cdpfs/{short} >= {self.target.minimum:.2f}"
        if r is None:
            return f"{head}: n/a"
        return f"{head}: {'PASS' if r >= self.target.minimum else 'MISS'} ({r:.2f})"


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


HEADER = ("workload", "data", "unit", "cdpfs", "passthrough", "native", "memfs", "cdpfs/pt",
          "cdpfs/native", "cdpfs/memfs", "store growth", "target")


def table_cells(rows: list[Row]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        out.append((r.workload, r.data, r.unit, fmt(r.values.get("cdpfs")),
                    fmt(r.values.get("passthrough")), fmt(r.values.get("native")),
                    fmt(r.values.get("memfs")),
                    fmt(r.speed_ratio("passthrough")), fmt(r.speed_ratio("native")),
                    fmt(r.speed_ratio("memfs")), fmt(r.growth), r.verdict()))
    return out


def format_text(header: Sequence[str], cells: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    table = [header, *cells]
    widths = [max(len(c[i]) for c in table) for i in range(len(header))]
    lines = []
    for n, c in enumerate(table):
        lines.append("  ".join(s.rjust(w) if i in right else s.ljust(w)
                               for i, (s, w) in enumerate(zip(c, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(header: Sequence[str], cells: Sequence[Sequence[str]],
                    right: set[int]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


_RIGHT = set(range(3, 11))


def text_table(rows: list[Row]) -> str:
    return format_text(HEADER, table_cells(rows), _RIGHT)


def markdown_table(rows: list[Row]) -> str:
    return format_markdown(HEADER, table_cells(rows), _RIGHT)


# --- figures beside a baseline (history.py, replication.py) ------------------------------

@dataclass
class Figure:
    """One figure, its baseline from the same run, their ratio and the target."""

    section: str
    figure: str
    unit: str
    value: float | None
    baseline: float | None = None
    baseline_name: str = ""
    ratio_name: str = ""  # what value/baseline means, e.g. "repl/local"
    ratio_min: float | None = None  # PASS when ratio >= this
    ratio_max: float | None = None  # PASS when ratio <= this
    value_below: float | None = None  # PASS when value < this (an absolute target)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def has_target(self) -> bool:
        return any(t is not None for t in (self.ratio_min, self.ratio_max, self.value_below))

    def verdict(self) -> str:
        r = self.ratio
        if self.value_below is not None:
            head = f"{self.figure} < {self.value_below:g} {self.unit}"
            if self.value is None:
                return f"{head}: n/a"
            return f"{head}: {'PASS' if self.value < self.value_below else 'MISS'} " \
                   f"({fmt(self.value)})"
        if self.ratio_min is not None:
            head = f"{self.ratio_name} >= {self.ratio_min:g}"
            ok = r is not None and r >= self.ratio_min
        elif self.ratio_max is not None:
            head = f"{self.ratio_name} <= {self.ratio_max:g}"
            ok = r is not None and r <= self.ratio_max
        else:
            return ""
        if r is None:
            return f"{head}: n/a"
        return f"{head}: {'PASS' if ok else 'MISS'} ({r:.2f})"


FIGURE_HEADER = ("measurement", "figure", "unit", "value", "baseline", "ratio", "target")
_FIGURE_RIGHT = {3, 4, 5}


def figure_cells(rows: list[Figure], value: Callable[[float | None], str] = fmt,
                 ) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        base = f"{fmt(r.baseline)} ({r.baseline_name})" if r.baseline is not None else "-"
        ratio = f"{value(r.ratio)} {r.ratio_name}" if r.ratio is not None else "-"
        out.append((r.section, r.figure, r.unit, value(r.value), base, ratio, r.verdict()))
    return out


def report_figures(desc: str, rows: list[Figure], notes: list[str], errors: list[str],
                   markdown: Path | None, value: Callable[[float | None], str] = fmt) -> None:
    """Print the figures with their notes (each row's, then ``notes``), targets and
    errors; also as markdown to ``markdown`` if given."""
    notes = [f"{r.section}, {r.figure}: {r.note}" for r in rows if r.note] + notes
    verdicts = [f"{r.section}, {r.figure}: {r.verdict()}" for r in rows if r.has_target]
    cells = figure_cells(rows, value)
    print_report(desc, format_text(FIGURE_HEADER, cells, _FIGURE_RIGHT), notes, verdicts,
                 errors)
    if markdown is not None:
        write_markdown(markdown, desc, format_markdown(FIGURE_HEADER, cells, _FIGURE_RIGHT),
                       notes, verdicts, errors)


# --- profiling ---------------------------------------------------------------------------

PROFILE_MODES = {
    "wall": ["--idle"],  # every sample, waiting included: where the wall-clock time goes
    "cpu": [],  # py-spy's default: threads it does not see as idle
    "gil": ["--gil"],  # only the thread holding the GIL: where Python CPU time goes
}


class Profiler:
    """py-spy on the cdpfs daemon during timed sections (``--profile DIR``).

    Each section leaves DIR/LABEL.txt (py-spy raw, collapsed stacks) and
    DIR/LABEL-top.txt (per thread: top functions by self and inclusive samples).
    """

    def __init__(self, outdir: Path, mode: str = "wall") -> None:
        self.outdir = outdir
        self.mode = mode
        outdir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("py-spy")
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")
        if self.exe is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")

    @contextlib.contextmanager
    def record(self, pid: int | None, label: str) -> Iterator[None]:
        if pid is None:
            yield
            return
        raw = self.outdir / f"{label}.txt"
        proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
             "--threads", "--nolineno", "--format", "raw", "--output", str(raw),
             *PROFILE_MODES[self.mode]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let py-spy attach before the clock starts
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if raw.exists():
                summary = summarize_profile(raw, mode=self.mode)
                (self.outdir / f"{label}-top.txt").write_text(summary)
                log.info("profile of cdpfs during %s:\n%s", label, summary)


def summarize_profile(raw: Path, top: int = 15, mode: str = "wall") -> str:
    """Per thread: samples, and the functions with most self and inclusive samples."""
    threads: Counter[str] = Counter()
    self_t: dict[str, Counter[str]] = defaultdict(Counter)
    incl_t: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread")), "?")
        funcs = [f for f in frames if not f.startswith(("thread", "process"))]
        threads[thread] += n
        if funcs:
            self_t[thread][funcs[-1]] += n
        for f in set(funcs):
            incl_t[thread][f] += n
    total = sum(threads.values()) or 1
    out = [f"{total} samples ({mode} mode, 200 Hz)"]
    for thread, n in threads.most_common():
        out.append(f"\n{thread}: {n} samples ({100 * n / total:.0f}% of all)")
        out.append("  self:")
        for f, c in self_t[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
        out.append("  inclusive:")
        for f, c in incl_t[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
    return "\n".join(out) + "\n"


# --- the bench ---------------------------------------------------------------------------

class Bench:
    """Runs the workloads over the backends and collects the rows."""

    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.inputs = Inputs()
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.cold_ok = True
        kinds: dict[str, type[Backend]] = {"cdpfs": Cdpfs, "passthrough": PassthroughFs,
                                           "native": Native, "memfs": MemFs}
        self.backends = [kinds[name](work) for name in cfg.backends]
        self.profiler = (Profiler(cfg.profile_dir, cfg.profile_mode) if cfg.profile_dir
                         else None)

    # --- set-up --------------------------------------------------------------------

    def prepare(self) -> None:
        cfg, inp = self.cfg, self.inputs
        wl = set(cfg.workloads)
        t0 = time.perf_counter()
        if wl & {"zstd", "seq-text", "files"}:
            inp.text, inp.corpus_bytes, inp.corpus_files = make_text(
                max(cfg.size, cfg.files * SMALL) if "files" in wl else cfg.size)
        if wl & {"seq-random", "rand"}:
            inp.rand = os.urandom(max(cfg.size, cfg.rand_file))
        if "rand" in wl:
            inp.rand_src = os.urandom(cfg.rand_writes * SMALL)
            rng = random.Random(20240601)
            pages = cfg.rand_file // SMALL
            inp.rand_offsets = [rng.randrange(pages) * SMALL for _ in range(cfg.rand_writes)]
        if "tar" in wl:
            inp.tar = self.work / "stdlib.tar"
            inp.tar_files, inp.tar_bytes = make_tar(inp.tar, cfg.tar_excludes)
        log.info("inputs ready in %.1f s", time.perf_counter() - t0)
        for b in self.backends:
            b.setup()

    def cleanup(self) -> None:
        for b in self.backends:
            b.cleanup()

    # --- helpers -------------------------------------------------------------------

    def _cold(self) -> None:
        self.cold_ok = drop_caches() and self.cold_ok

    @contextlib.contextmanager
    def _timed_section(self, b: Backend, label: str) -> Iterator[None]:
        if self.profiler is not None and isinstance(b, Cdpfs):
            with self.profiler.record(b.pid(), label):
                yield
        else:
            yield

    def _timed(self, b: Backend, label: str, fn: Callable[[], float]) -> float:
        """Run a timed section; its daemon CPU seconds are left in ``self.cpu``."""
        pid = b.pid()
        cpu = cpu_seconds(pid)
        with self._timed_section(b, label):
            dt = fn()
        self.cpu = cpu_seconds(pid) - cpu
        log.info("%-12s %-22s %8.2f s", b.name, label, dt)
        return dt

    def _cpu_row(self, res: dict[str, dict[str, float]], workload: str, data: str,
                 note: str = "") -> None:
        """The daemon's CPU time per operation of a workload (from /proc)."""
        daemons = {name: m for name, m in res.items() if name != "native"}
        row = self._row(daemons, "cpu", workload=workload, data=data, unit="CPU ms/op",
                        with_growth=False, higher_better=False, note=note)
        if row.values:
            self.rows.append(row)

    def _each(self, workload: str, fn: Callable[[Backend], dict[str, float]]
              ) -> dict[str, dict[str, float]]:
        """Run ``fn`` on each backend, ``--repeat`` times, each on a fresh empty volume.

        Returns the best figure of each metric per backend (the least disturbed run
        on a shared machine); seconds ("s") keep the minimum, growth the first run.
        """
        runs: dict[str, list[dict[str, float]]] = {b.name: [] for b in self.backends}
        failed: set[str] = set()
        for rep in range(self.cfg.repeat):
            for b in self.backends:
                if b.name in failed:
                    continue
                try:
                    b.reset()
                    if self.cfg.repeat > 1:
                        log.info("%s on %s, run %d of %d", workload, b.name, rep + 1,
                                 self.cfg.repeat)
                    runs[b.name].append(fn(b))
                except Exception as exc:
                    log.exception("%s on %s failed", workload, b.name)
                    self.errors.append(f"{workload} on {b.name}: {exc}")
                    failed.add(b.name)
                    with contextlib.suppress(Exception):
                        if b.running:
                            b.stop()
        out: dict[str, dict[str, float]] = {}
        for name, ms in runs.items():
            best: dict[str, float] = {}
            for m in ms:
                for k, v in m.items():
                    if k not in best:
                        best[k] = v
                    elif k == "s" or k.startswith("cpu") or k.startswith("lat"):
                        best[k] = min(best[k], v)
                    elif k != "growth":
                        best[k] = max(best[k], v)
            out[name] = best
        return out

    def _row(self, res: dict[str, dict[str, float]], metric: str, *, with_growth: bool = True,
             **kw: Any) -> Row:
        row = Row(**kw)
        row.values = {name: m[metric] for name, m in res.items() if metric in m}
        if with_growth:
            row.growth = res.get("cdpfs", {}).get("growth")
        return row

    def _growth(self, b: Backend, before: int | None, written: int) -> dict[str, float]:
        after = b.used_bytes()
        if before is None or after is None:
            return {}
        log.info("%s store grew by %.1f MiB for %.1f MiB written", b.name,
                 (after - before) / MiB, written / MiB)
        return {"growth": (after - before) / written}

    # --- workloads -----------------------------------------------------------------

    def run(self) -> None:
        for wl in self.cfg.workloads:
            log.info("=== %s", wl)
            getattr(self, "wl_" + wl.replace("-", "_"))()

    def wl_zstd(self) -> None:
        text = self.inputs.text[: self.cfg.size]
        t_enc, ratio, t_both = compressor_ceiling(text)
        self.zstd_mbs = len(text) / MB / t_enc
        self.rows.append(Row("zstd-1 encode ceiling", "text", "MB/s",
                             {"cdpfs": self.zstd_mbs},
                             note=f"stored/raw {ratio:.3f}"))
        self.rows.append(Row("blake3+zstd ceiling", "text", "MB/s",
                             {"cdpfs": len(text) / MB / t_both}))
        self.text_ratio = ratio
        log.info("zstd-1 on text: %.0f MB/s, stored/raw %.3f; with blake3 %.0f MB/s",
                 self.zstd_mbs, ratio, len(text) / MB / t_both)

    def _seq(self, kind: str, data: bytes) -> None:
        size = len(data)

        def one(b: Backend) -> dict[str, float]:
            path = b.root / f"seq-{kind}.bin"
            before = b.used_bytes()
            b.start()
            w = self._timed(b, f"seq-write-{kind}", lambda: seq_write(path, data))
            b.stop()
            m = {"write": size / MB / w, **self._growth(b, before, size)}
            self._cold()
            b.start()
            try:
                m["cold"] = size / MB / self._timed(b, f"seq-read-cold-{kind}",
                                                    lambda: seq_read(path, size))
                m["warm"] = size / MB / self._timed(b, f"seq-read-warm-{kind}",
                                                    lambda: seq_read(path, size))
                if self.cfg.verify:
                    verify_file(path, data)
            finally:
                b.stop()
            return m

        res = self._each(f"seq-{kind}", one)
        mib = f"{size // MiB} MiB"
        write_target = Target("zstd", 0.8) if kind == "text" else Target("passthrough", 0.8)
        zstd = getattr(self, "zstd_mbs", None) if kind == "text" else None
        note = f"1 MiB writes, fsync at end; {mib}"
        self.rows.append(self._row(res, "write", workload="seq write", data=kind, unit="MB/s",
                                   target=write_target, ref_value=zstd, note=note))
        cold_note = "" if self.cold_ok else "page cache NOT dropped"
        self.rows.append(self._row(res, "cold", workload="seq read cold", data=kind,
                                   unit="MB/s", with_growth=False,
                                   target=Target("passthrough", 0.8), note=cold_note))
        self.rows.append(self._row(res, "warm", workload="seq read warm", data=kind,
                                   unit="MB/s", with_growth=False))

    def wl_seq_text(self) -> None:
        self._seq("text", self.inputs.text[: self.cfg.size])

    def wl_seq_random(self) -> None:
        self._seq("random", self.inputs.rand[: self.cfg.size])

    def wl_rand(self) -> None:
        cfg, inp = self.cfg, self.inputs
        base = inp.rand[: cfg.rand_file]
        written = len(inp.rand_offsets) * SMALL

        def one(b: Backend) -> dict[str, float]:
            path = b.root / "rand.bin"
            b.start()
            try:
                seq_write(path, base)
            finally:
                b.stop()
            before = b.used_bytes()
            self._cold()
            b.start()
            dt = self._timed(b, "rand-write", lambda: random_writes(
                path, inp.rand_offsets, inp.rand_src, cfg.rand_sync_every))
            b.stop()
            m = {"write": written / MB / dt, "iops": len(inp.rand_offsets) / dt,
                 "cpu": 1000 * self.cpu / len(inp.rand_offsets),
                 **self._growth(b, before, written)}
            if cfg.verify:
                expected = bytearray(base)
                src = memoryview(inp.rand_src)
                for i, off in enumerate(inp.rand_offsets):
                    expected[off : off + SMALL] = src[i * SMALL : (i + 1) * SMALL]
                b.start()
                try:
                    verify_file(path, expected)
                finally:
                    b.stop()
            return m

        res = self._each("rand", one)
        note = (f"{cfg.rand_writes} x 4 KiB into {cfg.rand_file // MiB} MiB, "
                f"fsync every {cfg.rand_sync_every}")
        self.rows.append(self._row(res, "write", workload="random 4 KiB write", data="random",
                                   unit="MB/s", target=Target("passthrough", 0.6), note=note))
        self.rows.append(self._row(res, "iops", workload="random 4 KiB write", data="random",
                                   unit="writes/s", with_growth=False))
        self._cpu_row(res, "random 4 KiB write", "random", "per write")

    def wl_files(self) -> None:
        cfg, text = self.cfg, self.inputs.text

        def one(b: Backend) -> dict[str, float]:
            d = b.root / "files"
            before = b.used_bytes()
            b.start()
            dt = self._timed(b, "create-files", lambda: create_files(d, cfg.files, text))
            b.stop()
            m = {"rate": cfg.files / dt, "cpu": 1000 * self.cpu / cfg.files,
                 **self._growth(b, before, cfg.files * SMALL)}
            if cfg.verify:
                b.start()
                try:
                    verify_files(d, cfg.files, text)
                finally:
                    b.stop()
            return m

        res = self._each("files", one)
        self.rows.append(self._row(res, "rate", workload=f"create {cfg.files} 4 KiB files",
                                   data="text", unit="files/s", target=Target("passthrough", 0.9),
                                   note="one directory, then fsync(dir) + sync"))
        self._cpu_row(res, f"create {cfg.files} 4 KiB files", "text", "per file")

    def wl_tar(self) -> None:
        inp, cfg = self.inputs, self.cfg
        assert inp.tar is not None
        tar = inp.tar

        def one(b: Backend) -> dict[str, float]:
            d = b.root / "tar"
            before = b.used_bytes()
            tar.read_bytes()  # the archive comes from the page cache for every target
            b.start()
            dt = self._timed(b, "tar-extract", lambda: extract_tar(tar, d))
            b.stop()
            m = {"s": dt, "mbs": inp.tar_bytes / MB / dt, "cpu": 1000 * self.cpu / inp.tar_files,
                 **self._growth(b, before, inp.tar_bytes)}
            if cfg.verify:
                b.start()
                try:
                    verify_tar(tar, d)
                finally:
                    b.stop()
            return m

        res = self._each("tar", one)
        what = f"{inp.tar_files} files, {inp.tar_bytes / MB:.0f} MB"
        self.rows.append(self._row(res, "s", workload="tar -xf stdlib", data="source",
                                   unit="s", higher_better=False, note=what))
        self.rows.append(self._row(res, "mbs", workload="tar -xf stdlib", data="source",
                                   unit="MB/s", with_growth=False,
                                   target=Target("passthrough", 0.8)))
        self._cpu_row(res, "tar -xf stdlib", "source", "per file")

    def wl_fio(self) -> None:
        """fio (Debian's): random 4 KiB writes with an fsync every 256, random 4 KiB reads
        of that file after a remount, and 4 jobs writing at once."""
        cfg = self.cfg
        n = cfg.rand_writes
        size = cfg.rand_file

        def job(b: Backend, label: str, *args: str) -> dict[str, Any]:
            d = b.root / "fio"
            d.mkdir(exist_ok=True)
            out: dict[str, Any] = {}

            def run() -> float:
                t = time.perf_counter()
                proc = subprocess.run(
                    ["fio", "--output-format=json", f"--directory={d}", "--bs=4k",
                     "--ioengine=psync", "--randrepeat=1", "--norandommap", *args],
                    capture_output=True, text=True)
                if proc.returncode:
                    raise BenchError(f"fio {label}: {proc.stderr.strip()[-300:]}")
                out.update(json.loads(proc.stdout))
                return time.perf_counter() - t

            self._timed(b, label, run)
            return out

        def iops(result: dict[str, Any], kind: str) -> float:
            return float(sum(j[kind]["iops"] for j in result["jobs"]))

        def one(b: Backend) -> dict[str, float]:
            b.start()
            try:  # the files are laid out first (untimed), then written at random
                one_file, four = (f"--size={size}", "--filename=one"), \
                    (f"--size={size // 4}", "--numjobs=4")
                job(b, "fio-layout", "--name=one", "--rw=write", *one_file, "--end_fsync=1")
                job(b, "fio-layout", "--name=four", "--rw=write", *four, "--end_fsync=1")
                w = job(b, "fio-randwrite", "--name=one", "--rw=randwrite", *one_file,
                        f"--number_ios={n}", "--fsync=256")
                m = {"w": iops(w, "write"), "cpu_w": 1000 * self.cpu / n}
                j4 = job(b, "fio-4jobs", "--name=four", "--rw=randwrite", *four,
                         f"--number_ios={n // 4}", "--fsync=256")
                m.update(j4=iops(j4, "write"), cpu_j4=1000 * self.cpu / n)
            finally:
                b.stop()
            self._cold()
            b.start()
            try:
                r = job(b, "fio-randread", "--name=one", "--rw=randread", f"--size={size}",
                        "--filename=one", f"--number_ios={n}")
                m.update(r=iops(r, "read"), cpu_r=1000 * self.cpu / n)
            finally:
                b.stop()
            return m

        res = self._each("fio", one)
        note = f"{n} x 4 KiB in {size // MiB} MiB"
        for key, name, target in (("w", "fio random 4 KiB write, fsync 256", 0.6),
                                  ("r", "fio random 4 KiB read, cold", None),
                                  ("j4", "fio 4 jobs random 4 KiB write", 0.7)):
            self.rows.append(self._row(res, key, workload=name, data="random", unit="IOPS",
                                       with_growth=False, note=note,
                                       target=Target("passthrough", target) if target else None))
            res_cpu = {k: {"cpu": v["cpu_" + key]} for k, v in res.items() if "cpu_" + key in v}
            self._cpu_row(res_cpu, name, "random", "per I/O")

    def wl_stat(self) -> None:
        """ls -l of a directory of many files: listdir and lstat of each, after a remount."""
        cfg = self.cfg
        n = cfg.stat_files

        def one(b: Backend) -> dict[str, float]:
            d = b.root / "many"
            b.start()
            try:
                d.mkdir()
                for i in range(n):
                    os.close(os.open(d / f"e{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
            finally:
                b.stop()
            self._cold()
            b.start()

            def listing() -> float:
                t = time.perf_counter()
                names = os.listdir(d)
                for name in names:
                    os.lstat(d / name)
                if len(names) != n:
                    raise BenchError(f"{b.name}: listed {len(names)} of {n}")
                return time.perf_counter() - t

            try:
                dt = self._timed(b, "ls-l", listing)
                return {"rate": n / dt, "cpu": 1000 * self.cpu / n}
            finally:
                b.stop()

        res = self._each("stat", one)
        name = f"ls -l of {n:,} files"
        self.rows.append(self._row(res, "rate", workload=name, data="empty", unit="entries/s",
                                   with_growth=False, target=Target("passthrough", 0.9),
                                   note="listdir + lstat of each, after a remount"))
        self._cpu_row(res, name, "empty", "per entry")

    def wl_git(self) -> None:
        """git status in a checkout of a real repository (this one), after a remount."""
        source = BENCH_DIR.parent

        def one(b: Backend) -> dict[str, float]:
            d = b.root / "repo"
            b.start()
            try:
                subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(source), str(d)],
                               check=True, capture_output=True)
                files = int(subprocess.run(["git", "-C", str(d), "ls-files", "-z"], check=True,
                                           capture_output=True).stdout.count(b"\0"))
            finally:
                b.stop()
            self._cold()
            b.start()

            def status() -> float:
                t = time.perf_counter()
                subprocess.run(["git", "-C", str(d), "status", "--porcelain"], check=True,
                               capture_output=True)
                return time.perf_counter() - t

            try:
                dt = self._timed(b, "git-status", status)
                return {"s": dt, "cpu": 1000 * self.cpu / max(1, files)}
            finally:
                b.stop()

        res = self._each("git", one)
        self.rows.append(self._row(res, "s", workload="git status, cold", data="checkout",
                                   unit="s", higher_better=False, with_growth=False,
                                   note="a clone of this repository, after a remount"))
        self._cpu_row(res, "git status, cold", "checkout", "per file in the checkout")

    def wl_latency(self) -> None:
        """p50/p99 of a 4 KiB write + fsync while another process writes sequentially."""
        count = 400 if self.cfg.quick else 2000

        def one(b: Backend) -> dict[str, float]:
            b.start()
            stop = threading.Event()
            big = b.root / "stream.bin"
            chunk = os.urandom(1 << 20)

            def stream() -> None:
                with open(big, "wb") as f:
                    while not stop.is_set():
                        f.write(chunk)
                        if f.tell() > 2 << 30:
                            f.seek(0)

            streamer = threading.Thread(target=stream, daemon=True)
            lat: list[float] = []

            def probe() -> float:
                t0 = time.perf_counter()
                fd = os.open(b.root / "probe", os.O_CREAT | os.O_WRONLY, 0o644)
                try:
                    data = os.urandom(4096)
                    for i in range(count):
                        t = time.perf_counter()
                        os.pwrite(fd, data, (i % 256) * 4096)
                        os.fsync(fd)
                        lat.append(time.perf_counter() - t)
                finally:
                    os.close(fd)
                return time.perf_counter() - t0

            try:
                streamer.start()
                time.sleep(0.5)  # the stream is under way
                self._timed(b, "fsync-latency", probe)
            finally:
                stop.set()
                streamer.join()
                b.stop()
            lat.sort()
            return {"lat50": 1000 * lat[len(lat) // 2],
                    "lat99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}

        res = self._each("latency", one)
        for key, what in (("lat50", "p50"), ("lat99", "p99")):
            self.rows.append(self._row(res, key, workload=f"4 KiB write+fsync {what}",
                                       data="random", unit="ms", higher_better=False,
                                       with_growth=False,
                                       note="while another writer streams 1 MiB writes"))

    # --- report --------------------------------------------------------------------

    def verdicts(self) -> list[str]:
        return [f"{r.workload} ({r.data}): {r.verdict()}" for r in self.rows if r.target]

    def description(self) -> str:
        cfg, inp = self.cfg, self.inputs
        cpu = "?"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), "?")
        lines = [
            f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"machine: {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, "
            f"Python {platform.python_version()}",
            f"work dir: {self.work} ({fs_type(self.work)})",
            f"mode: {'--quick' if cfg.quick else 'full'}; seq files {cfg.size // MiB} MiB; "
            f"{cfg.files} small files; {cfg.rand_writes} random writes into "
            f"{cfg.rand_file // MiB} MiB; zstd level {codec.DEFAULT_LEVEL}; "
            f"best of {cfg.repeat} run(s), each on a fresh volume",
            f"cdpfs: {git_version()}",
        ]
        ra = [f"{b.name} {b.readahead_kb} KiB" for b in self.backends if b.readahead_kb]
        if ra:
            lines.append("FUSE readahead: " + ", ".join(ra))
        if inp.corpus_bytes:
            lines.append(f"text: {inp.corpus_files} stdlib .py files ({inp.corpus_bytes / MB:.1f}"
                         f" MB) streamed, each 4 KiB stamped with a counter"
                         + (f"; zstd-1 stored/raw {self.text_ratio:.3f} on 128 KiB blocks"
                            if hasattr(self, "text_ratio") else ""))
        if inp.tar is not None:
            lines.append(f"tar: {STDLIB} sources ({inp.tar_files} files, "
                         f"{inp.tar_bytes / MB:.1f} MB; excluded {', '.join(cfg.tar_excludes)})")
        if not self.cold_ok:
            lines.append("WARNING: the page cache could not be dropped; cold reads are warm")
        return "\n".join(lines)

    def notes(self) -> list[str]:
        return [f"{r.workload} ({r.data}, {r.unit}): {r.note}" for r in self.rows if r.note]


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Benchmark cdpfs against a Python pass-through "
                                "FUSE fs and the native disk.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a fast check (128 MiB, 2000 files, 4000 writes)")
    p.add_argument("--size-mb", type=int, help="MiB per sequential file (default 1024)")
    p.add_argument("--files", type=int, help="number of 4 KiB files (default 10000)")
    p.add_argument("--rand-writes", type=int, help="random 4 KiB writes (default 20000)")
    p.add_argument("--rand-file-mb", type=int, help="random-write file MiB (default 256)")
    p.add_argument("--stat-files", type=int, help="entries listed by ls -l (default 100000)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each workload N times per target and report the best (default 1)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where to make the temporary work directory (not tmpfs)")
    p.add_argument("--only", help=f"comma list of workloads: {','.join(WORKLOADS)}")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of targets (default all: cdpfs,passthrough,native,memfs)")
    p.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy the cdpfs daemon during timed sections (perturbs figures)")
    p.add_argument("--profile-mode", choices=sorted(PROFILE_MODES), default="wall",
                   help="wall: all samples incl. waiting (default); cpu: py-spy default; "
                   "gil: only the GIL holder")
    p.add_argument("--no-verify", action="store_true", help="skip reading data back")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    workloads = tuple(a.only.split(",")) if a.only else WORKLOADS
    backends = tuple(a.backends.split(","))
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}")
    if "seq-text" in workloads and "zstd" not in workloads:
        workloads = ("zstd", *workloads)  # the compressible write target needs the ceiling
    excludes = ("python3.11/site-packages", "__pycache__", "python3.11/config-*")
    if a.quick:
        excludes += ("python3.11/test",)
    excludes = tuple(e.replace("python3.11", STDLIB.name) for e in excludes)
    size = (a.size_mb or (128 if a.quick else 1024)) * MiB
    rand_file = (a.rand_file_mb or (64 if a.quick else 256)) * MiB
    cfg = Config(
        size=size,
        files=a.files or (2000 if a.quick else 10000),
        rand_file=rand_file,
        rand_writes=a.rand_writes or (4000 if a.quick else 20000),
        rand_sync_every=256,
        stat_files=a.stat_files or (10000 if a.quick else 100000),
        repeat=max(1, a.repeat),
        tar_excludes=excludes,
        base=a.dir,
        workloads=tuple(w for w in WORKLOADS if w in workloads),
        backends=tuple(b for b in BACKENDS if b in backends),
        verify=not a.no_verify,
        keep=a.keep,
        profile_dir=a.profile.resolve() if a.profile else None,
        profile_mode=a.profile_mode,
        quick=a.quick,
    )
    return cfg, a


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C, so every benchmark cleans up."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def work_dir(base: Path, keep: bool, prefix: str) -> Iterator[Path]:
    """A fresh work directory under ``base``, removed at the end unless ``keep``."""
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()
    log.info("work directory %s", work)
    try:
        yield work
    finally:
        if keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def start_run(verbose: bool, base: Path) -> None:
    """Logging, warnings about the environment, and a SIGTERM that cleans up."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.warning("not root: mounting and dropping the page cache will fail")
    if fs_type(base) in ("tmpfs", "ramfs"):
        log.warning("%s is on %s: figures will not reflect a disk", base, fs_type(base))
    signal.signal(signal.SIGTERM, raise_interrupt)


def print_report(desc: str, table: str, notes: list[str], verdicts: list[str],
                 errors: list[str]) -> None:
    """The report of a benchmark run on standard output."""
    print(f"\n{desc}\n\n{table}\n")
    for n in notes:
        print(f"  {n}")
    if verdicts:
        print("\ntargets:")
        for v in verdicts:
            print(f"  {v}")
    if errors:
        print("\nERRORS:")
        for e in dict.fromkeys(errors):  # a log read twice says its lines once
            print(f"  {e}")


def write_markdown(path: Path, desc: str, table: str, notes: list[str], verdicts: list[str],
                   errors: list[str]) -> None:
    """The report of a benchmark run: setup, table, notes, targets, errors."""
    md = ["```", desc, "```", "", table, ""]
    md += [f"- {n}" for n in notes]
    if verdicts:
        md += ["", "Targets:", ""] + [f"- {v}" for v in verdicts]
    if errors:
        md += ["", "Errors:", ""] + [f"- {e}" for e in dict.fromkeys(errors)]
    path.write_text("\n".join(md) + "\n")
    log.info("markdown written to %s", path)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    start_run(args.verbose, cfg.base)
    work = Path(tempfile.mkdtemp(prefix="cdpfs-bench-", dir=cfg.base)).resolve()
    log.info("work directory %s", work)
    bench = Bench(cfg, work)
    try:
        bench.prepare()
        bench.run()
    except KeyboardInterrupt:
        log.error("interrupted")
        bench.errors.append("interrupted")
    except Exception as exc:
        log.exception("bench failed")
        bench.errors.append(f"bench failed: {exc}")
    finally:
        bench.cleanup()
        if cfg.keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(bench, args.markdown)
    return 1 if bench.errors else 0


def report(bench: Bench, markdown: Path | None) -> None:
    desc = bench.description()
    print()
    print(desc)
    print()
    print(text_table(bench.rows))
    print()
    print("ratios are speed ratios (1.00 = as fast); store growth = LMDB used bytes added "
          "per byte written")
    for n in bench.notes():
        print(f"  {n}")
    print()
    print("targets:")
    for v in bench.verdicts():
        print(f"  {v}")
    if bench.errors:
        print()
        print("ERRORS:")
        for e in bench.errors:
            print(f"  {e}")
    if markdown is not None:
        md = ["```", desc, "```", "", markdown_table(bench.rows), "",
              "Ratios are speed ratios (1.00 = as fast as the other target). Store growth is "
              "the LMDB used size added per byte written.", ""]
        md += [f"- {n}" for n in bench.notes()]
        md += ["", "Targets:", ""] + [f"- {v}" for v in bench.verdicts()]
        if bench.errors:
            md += ["", "Errors:", ""] + [f"- {e}" for e in bench.errors]
        markdown.write_text("\n".join(md) + "\n")
        log.info("markdown table written to %s", markdown)


if __name__ == "__main__":
    sys.exit(main())
