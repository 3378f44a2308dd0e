"""Replication benchmarks (issue 4): how fast, how far behind, how many bytes, how quick to resume.

Every figure is measured on loopback through the real ``cdpfs`` command line next to
the interpreter (mounts, ``cdpfs replica serve``, ``cdpfs replicate``), and printed
beside a baseline measured in the same run, with their ratio and PASS/MISS where the
issue names a target:

1. **throughput**: a 1 GiB incompressible file written into a mounted volume with no
   replica (1 MiB writes, MB/s including the final fsync; the better of two fresh
   volumes): the baseline. Then that store is shipped with ``cdpfs replicate`` to a
   fresh replica (page cache dropped first: the store is read from disk), MB/s of file
   data over the wall time of the command. Target: replication >= 0.8 x local write.
   The same once more to another fresh replica right after (the store in the page
   cache). Then a second volume, mounted with a replica registered in async mode, gets
   the same 1 GiB while shipping live: the writer's MB/s, the time from the writer's
   fsync until the replica acknowledged the last seq (catch-up) and the effective
   throughput (write start to last ack).
2. **lag at half load**: on that mount, a writer appends 128 KiB writes at half the
   local write rate of 1 with an fsync every ~50 ms, for 30 s. After each fsync (time
   t) it reads the newest seq S (``journal.last``); a thread polls the primary's
   replica state (``replicas.load_states``) every 5 ms and notes the first time the
   replica's acknowledged seq is >= S: lag = that time - t. p50/p99/max in ms, beside
   the writer's own fsync latency. Target: p99 < 1000 ms. The lag measured by
   polling the replica store's own journal is given in a note. For comparison, the
   same for 20 s (10 s with --quick) at half the rate ``cdpfs replicate`` reached in 1 (a
   load replication can follow), without a target.
3. **bytes for a 1% change**: the 1 GiB file of 1, already replicated whole, gets 82
   random 128 KiB blocks rewritten (``pwrite`` of fresh random data, 1%) in the mounted
   primary while the replica is down; then ``cdpfs replicate`` ships the change
   through a counting TCP proxy (bytes in both directions, TLS included). The same
   change between two plain copies of the file (before, after) is sent by ``rsync
   --no-whole-file --ignore-times`` to an rsync daemon (module holding "before")
   through the same kind of proxy. Target: cdpfs bytes <= rsync bytes.
4. **resume after a disconnect under load**: on the mount of 1 and 2, the replica
   server is stopped (SIGTERM) for ``--disconnect`` seconds (default 300; 30 with
   ``--quick``) while a writer writes 2 MB/s of mixed data (random and text appends
   of 80,000 bytes, ten 4 KiB text files every 0.1 s, an fsync every second). The
   server is restarted (the writer goes on): time from restart until the replica has
   acknowledged the seq that was the primary's last at restart, against the time
   ``cdpfs replicate`` would take for the queued data at the rate measured in 1;
   records and MiB queued.

Usage: ``python bench/replication.py [--quick] [--markdown FILE] [--dir DIR]
[--disconnect SECONDS] [--keep]`` (root: FUSE mounts and ``/proc/sys/vm/drop_caches``).
``--quick`` divides the sizes by 8 (128 MiB files, 15 s of half load, 30 s disconnect).
Every mount is unmounted, every server and proxy stopped and the work directory (a
fresh one under ``--dir``, default /var/tmp) removed on the way out, also on errors
and SIGINT/SIGTERM. ``cdpfs verify --compare`` checks each primary against its
replica afterwards. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import filecmp
import logging
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import Proxy, percentile
from history import Volume, cli
from run import (
    MB,
    BenchError,
    MiB,
    cdpfs_command,
    cpu_seconds,
    drop_caches,
    fmt,
    fs_type,
    git_version,
    make_text,
    report_figures,
    seq_write,
    start_run,
    work_dir,
)
from run import Figure as Row  # one row of the figures table

from cdpfs.replication.registry import ReplicaState, load_states
from cdpfs.store import journal
from cdpfs.store.lmdb import Store

log = logging.getLogger("replication")

BLOCK = 128 * 1024  # cdpfs block size (checked by Volume.init)
CDPFS = cdpfs_command()
LOG_BAD = (" ERROR ", " CRITICAL ", "Traceback")
POLL = 0.005  # seconds between samples of the replica state


# --- configuration -----------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Sizes and durations of the four measurements."""

    size: int  # bytes of the big file (1, 3)
    change: float  # fraction of its blocks rewritten in 3
    lag_seconds: float  # duration of the half-load writer (2)
    fsync_every: float  # seconds between the half-load writer's fsyncs
    disconnect: float  # seconds the replica is away in 4
    mixed_rate: float  # bytes per second of the writer in 4
    quick: bool


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Benchmark cdpfs replication on loopback: "
                                "throughput, lag, bytes of a small change, resume.")
    p.add_argument("--quick", action="store_true",
                   help="sizes divided by 8: 128 MiB file, 15 s of half load, 30 s away")
    p.add_argument("--markdown", type=Path, help="also write the figures as markdown here")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where to make the temporary work directory (default /var/tmp; "
                   "not tmpfs)")
    p.add_argument("--disconnect", type=float,
                   help="seconds the replica is stopped in 4 (default 300, 30 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    cfg = Config(
        size=(128 if a.quick else 1024) * MiB,
        change=0.01,
        lag_seconds=15.0 if a.quick else 30.0,
        fsync_every=0.05,
        disconnect=a.disconnect if a.disconnect is not None else (30.0 if a.quick else 300.0),
        mixed_rate=2e6,
        quick=a.quick,
    )
    return cfg, a


# --- processes and sockets ---------------------------------------------------------------

def listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (read from /proc: no probe connection,
    which a TLS server would log as a refused handshake)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}) before listening on {port}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} does not listen on {port} after {timeout:.0f} s")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes] | None, what: str) -> int | None:
    """SIGTERM, then SIGKILL after 30 s; the exit status (None if never started)."""
    rc = harness.stop_process(proc)
    if proc is not None and rc not in (0, -signal.SIGTERM):
        log.warning("%s (pid %d) exited %s", what, proc.pid, rc)
    return rc


class ReplicaServer(harness.ReplicaServer):
    """The harness's replica server; its problems are reported with its log's name
    and an exit status other than 0 on SIGTERM."""

    def __init__(self, store: Path) -> None:
        super().__init__(store, store.with_suffix(".serve.log"))
        self.exits: list[str] = []

    def stop(self) -> int | None:
        rc = super().stop()
        if rc not in (None, 0):
            self.exits.append(f"cdpfs replica serve {self.store.name} exited {rc} on SIGTERM")
        return rc

    def log_problems(self) -> list[str]:
        return self.exits + [f"{self.log.name}: {line}" for line in self.problems()]


# --- the primary's view of its replica ---------------------------------------------------

class Watch:
    """Reads a mounted primary's journal and replica state from this process.

    Attributes:
        store: the primary store, opened read-only (LMDB readers never block the mount).
        name: the replica watched.
    """

    def __init__(self, store: Path, name: str) -> None:
        self.store = Store(store, readonly=True)
        self.name = name

    def close(self) -> None:
        self.store.close()

    def last(self) -> int:
        with self.store.txn() as txn:
            return journal.last(self.store, txn)[0]

    def state(self) -> ReplicaState:
        for s in load_states(self.store):
            if s.name == self.name:
                return s
        raise BenchError(f"{self.store.path}: no replica {self.name} registered")

    def wait_acked(self, seq: int, timeout: float) -> float:
        """Poll until the replica acknowledged ``seq``; the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            now = time.monotonic()
            if st.acked >= seq:
                return now
            if now > deadline:
                raise BenchError(f"replica {self.name} at #{st.acked}, not #{seq}, after "
                                 f"{timeout:.0f} s (connected: {st.connected}, last error: "
                                 f"{st.last_error or '-'})")
            time.sleep(POLL)


def replica_last(store: Store) -> int:
    with store.txn() as txn:
        return journal.last(store, txn)[0]


class LagSampler:
    """A thread noting when each (seq, time) the writer reports is acknowledged.

    The primary's replica state gives ``lag`` (what ``cdpfs status`` shows); the
    replica store's own journal gives ``lag_replica`` (when the record is durable there).
    """

    def __init__(self, watch: Watch, replica: Path) -> None:
        self.watch = watch
        self.replica = Store(replica, readonly=True)
        self.pending: list[tuple[int, float]] = []
        self.pending_replica: list[tuple[int, float]] = []
        self.lag: list[float] = []
        self.lag_replica: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lag", daemon=True)
        self._thread.start()

    def note(self, seq: int, t: float) -> None:
        with self._lock:
            self.pending.append((seq, t))
            self.pending_replica.append((seq, t))

    @staticmethod
    def _settle(pending: list[tuple[int, float]], acked: int, now: float,
                out: list[float]) -> list[tuple[int, float]]:
        left = []
        for seq, t in pending:
            if seq <= acked:
                out.append(now - t)
            else:
                left.append((seq, t))
        return left

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                acked = self.watch.state().acked
                now = time.monotonic()
                there = replica_last(self.replica)
                now2 = time.monotonic()
                with self._lock:
                    self.pending = self._settle(self.pending, acked, now, self.lag)
                    self.pending_replica = self._settle(self.pending_replica, there, now2,
                                                        self.lag_replica)
                time.sleep(POLL)
        except BaseException as exc:
            self.error = exc

    def drain(self, timeout: float) -> int:
        """Wait until every noted seq is acknowledged (at most ``timeout`` s); how many
        were still not (their lag so far is counted, a lower bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None:
            with self._lock:
                if not self.pending and not self.pending_replica:
                    break
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(5)
        if self.error is not None:
            raise BenchError(f"lag sampler failed: {self.error}")
        now = time.monotonic()
        with self._lock:
            late = len(self.pending)
            self.lag += [now - t for _, t in self.pending]
            self.lag_replica += [now - t for _, t in self.pending_replica]
            self.pending, self.pending_replica = [], []
        return late

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.replica.close()


# --- writers -----------------------------------------------------------------------------

class Stamped:
    """Incompressible 128 KiB blocks that never repeat: a random pool, each block led by
    a 16-byte stamp (so cdpfs cannot deduplicate them)."""

    def __init__(self, pool_size: int = 16 * MiB) -> None:
        self.pool = memoryview(os.urandom(pool_size + BLOCK))
        self.n = 0

    def block(self) -> list[bytes | memoryview]:
        self.n += 1
        off = (self.n * 7919 * 16) % (len(self.pool) - 2 * BLOCK)
        return [b"~%014d\n" % self.n, self.pool[off + 16 : off + BLOCK]]


def paced_writer(path: Path, rate: float, seconds: float, fsync_every: float, watch: Watch,
                 sampler: LagSampler, wrap: int) -> tuple[int, list[float]]:
    """Write 128 KiB blocks at ``rate`` bytes/s for ``seconds``, fsync every
    ``fsync_every`` s and report each fsync's (seq, time) to ``sampler``; wrap around
    at ``wrap`` bytes. Returns (bytes written, fsync latencies)."""
    data = Stamped()
    fsyncs: list[float] = []
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = last_sync = time.monotonic()
        end = t0 + seconds
        while (now := time.monotonic()) < end:
            due = t0 + written / rate
            if now < due:
                time.sleep(min(due - now, end - now))
            os.pwritev(fd, data.block(), written % wrap)
            written += BLOCK
            now = time.monotonic()
            if now - last_sync >= fsync_every:
                os.fsync(fd)
                done = time.monotonic()
                fsyncs.append(done - now)
                sampler.note(watch.last(), done)
                last_sync = done
        t = time.monotonic()
        os.fsync(fd)
        done = time.monotonic()
        fsyncs.append(done - t)
        sampler.note(watch.last(), done)
    finally:
        os.close(fd)
    return written, fsyncs


class MixedWriter:
    """A thread writing ``rate`` bytes/s of mixed data into a mount until stopped: every
    0.1 s an 80,000-byte random append, an 80,000-byte text append (unaligned: partial
    blocks, packs) and ten 4 KiB text files; an fsync every second.

    Attributes:
        written: bytes of file data written so far; files: small files made.
    """

    TICK = 0.1

    def __init__(self, root: Path, rate: float) -> None:
        self.root = root / "mixed"
        self.root.mkdir(exist_ok=True)
        per_tick = rate * self.TICK
        self.small = 4096
        self.nsmall = 10
        self.chunk = int((per_tick - self.small * self.nsmall) / 2)
        self.text, _, _ = make_text(16 * MiB)
        self.rand = os.urandom(16 * MiB)
        self.written = 0
        self.files = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _piece(self, src: bytes, i: int, n: int) -> bytes:
        off = (i * 104_729) % (len(src) - n)
        return b"%015d\n" % i + src[off + 16 : off + n]

    def _run(self) -> None:
        try:
            rand_fd = os.open(self.root / "random.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            text_fd = os.open(self.root / "text.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                t0 = last_sync = time.monotonic()
                tick = 0
                while not self._stop.is_set():
                    due = t0 + tick * self.TICK
                    if (wait := due - time.monotonic()) > 0:
                        self._stop.wait(wait)
                    os.write(rand_fd, self._piece(self.rand, tick, self.chunk))
                    os.write(text_fd, self._piece(self.text, tick, self.chunk))
                    n = 2 * self.chunk
                    for k in range(self.nsmall):
                        i = self.files + k
                        d = self.root / f"d{i // 1000:04d}"
                        if i % 1000 == 0:
                            d.mkdir(exist_ok=True)
                        (d / f"f{i:07d}.txt").write_bytes(
                            self._piece(self.text, tick * 31 + k, self.small))
                        n += self.small
                    with self._lock:
                        self.files += self.nsmall
                        self.written += n
                    tick += 1
                    if time.monotonic() - last_sync >= 1.0:
                        os.fsync(text_fd)
                        last_sync = time.monotonic()
                os.fsync(rand_fd)
                os.fsync(text_fd)
            finally:
                os.close(rand_fd)
                os.close(text_fd)
        except BaseException as exc:
            self.error = exc

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.written, self.files

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
        if self.error is not None:
            raise BenchError(f"mixed writer failed: {self.error}")


# --- results -----------------------------------------------------------------------------

# --- the bench ---------------------------------------------------------------------------

@dataclass
class Pair:
    """A primary volume and its replica server, with trust both ways."""

    vol: Volume
    server: ReplicaServer
    name: str


@dataclass
class Bench:
    """The four measurements and what they leave to clean up."""

    cfg: Config
    work: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    servers: list[ReplicaServer] = field(default_factory=list)
    scratch: list[Volume] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    keep: bool = False  # keep the stores (and the work directory)
    local_rate: float | None = None  # bytes/s of the local write (1)
    local_cpu: float | None = None  # CPU s/GiB of the mount for that write
    repl_rate: float | None = None  # bytes/s of cdpfs replicate (1)

    def row(self, *args: Any, **kw: Any) -> Row:
        r = Row(*args, **kw)
        self.rows.append(r)
        log.info("%s, %s: %s %s%s", r.section, r.figure, fmt(r.value), r.unit,
                 f"  [{r.verdict()}]" if r.has_target else "")
        return r

    def pair(self, n: int) -> Pair:
        vol = Volume(self.work, f"p{n}").init()
        cli("replica", "keygen", vol.store, "--name", vol.store.stem)
        p = Pair(vol, self.replica_of(vol, f"r{n}"), f"r{n}")
        self.pairs.append(p)
        return p

    def replica_of(self, vol: Volume, name: str) -> ReplicaServer:
        """A future replica of ``vol``: its identity, trusted both ways; not started."""
        rstore = self.work / f"{name}.store"
        server = ReplicaServer(rstore)
        self.servers.append(server)
        cli("replica", "keygen", rstore, "--name", name)
        cli("replica", "trust", vol.store, rstore / "tls" / "node.crt", "--name", name)
        cli("replica", "trust", rstore, vol.store / "tls" / "node.crt", "--name",
            vol.store.stem)
        return server

    def compare(self, primary: Path, replica: Path) -> None:
        """``cdpfs verify --compare`` of the two stores, and ``cdpfs verify`` of the replica."""
        out = cli("verify", "--compare", primary, replica).strip()
        log.info("%s vs %s: %s", primary.name, replica.name, out)
        if not out.startswith("identical"):
            raise BenchError(f"cdpfs verify --compare: {out}")
        cli("verify", replica, timeout=3600)

    def retire(self, p: Pair) -> None:
        """Unmount, stop, check the logs, delete both stores (disk space)."""
        p.vol.cleanup()
        p.server.stop()
        self.errors += p.vol.log_problems() + p.server.log_problems()
        if not self.keep:
            shutil.rmtree(p.vol.store, ignore_errors=True)
            shutil.rmtree(p.server.store, ignore_errors=True)

    # --- 1 and 3: replicate an unmounted store ------------------------------------------

    def throughput_and_change(self) -> None:
        cfg = self.cfg
        size = cfg.size
        label = f"{size // MiB} MiB random"
        log.info("generating %d MiB of random data", size // MiB)
        data = os.urandom(size)
        # the baseline is the better of two fresh volumes (the first is thrown away)
        scratch = Volume(self.work, "p0").init()
        self.scratch.append(scratch)
        scratch.mount()
        first = size / seq_write(scratch.mnt / "big.bin", data)
        scratch.umount()
        self.errors += scratch.log_problems()
        shutil.rmtree(scratch.store)
        os.sync()
        p = self.pair(1)
        p.vol.mount()
        pid = harness.holder_pid(p.vol.store)
        cpu = cpu_seconds(pid)
        second = size / seq_write(p.vol.mnt / "big.bin", data)
        self.local_cpu = (cpu_seconds(pid) - cpu) / (size / (1 << 30))
        self.local_rate = max(first, second)
        self.row("1 throughput", f"local write, {label}, 1 MiB writes + fsync, no replica "
                 "(best of 2)", "MB/s", self.local_rate / MB)
        self.notes.append(f"1, local write: {first / MB:.1f} and {second / MB:.1f} MB/s on two "
                          "fresh volumes")
        p.vol.umount()
        # the plain copy for rsync (3), outside any timing
        dst = self.work / "rsync_dst"
        dst.mkdir()
        (dst / "big.bin").write_bytes(data)
        del data

        p.server.start()
        if not drop_caches():
            self.notes.append("page cache not dropped before cdpfs replicate")
        t0 = time.monotonic()
        out = cli("replicate", p.vol.store, "--to", p.server.address, "--name", p.name).strip()
        took = time.monotonic() - t0
        log.info("%s", out)
        self.repl_rate = size / took
        self.row("1 throughput", "cdpfs replicate of it to a fresh replica (cold cache)",
                 "MB/s", self.repl_rate / MB, self.local_rate / MB, "local write",
                 "repl/local", ratio_min=0.8)
        self.notes.append(f"1, cdpfs replicate printed: {out!r} (wall time of the command "
                          f"{took:.1f} s, used above)")
        p.server.stop()
        self.compare(p.vol.store, p.server.store)

        # the same again to a second fresh replica, the store now in the page cache
        warm = self.replica_of(p.vol, "r1w")
        warm.start()
        t0 = time.monotonic()
        out = cli("replicate", p.vol.store, "--to", warm.address, "--name", "r1w").strip()
        took = time.monotonic() - t0
        log.info("%s", out)
        self.row("1 throughput", "cdpfs replicate of it to another fresh replica (warm cache)",
                 "MB/s", size / took / MB, self.local_rate / MB, "local write", "repl/local",
                 ratio_min=0.8)
        warm.stop()
        self.compare(p.vol.store, warm.store)
        self.errors += warm.log_problems()
        if not self.keep:
            shutil.rmtree(warm.store, ignore_errors=True)
        self.one_percent(p, dst)
        self.retire(p)

    def one_percent(self, p: Pair, dst: Path) -> None:
        cfg = self.cfg
        nblocks = cfg.size // BLOCK
        rng = random.Random(4)
        chosen = sorted(rng.sample(range(nblocks), max(1, round(nblocks * cfg.change))))
        fresh = os.urandom(len(chosen) * BLOCK)
        changed = len(chosen) * BLOCK
        label = f"{len(chosen)} x 128 KiB of {cfg.size // MiB} MiB"

        def apply(path: Path) -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                for k, b in enumerate(chosen):
                    os.pwrite(fd, fresh[k * BLOCK : (k + 1) * BLOCK], b * BLOCK)
                os.fsync(fd)
            finally:
                os.close(fd)

        # the replica server is down: the mount (which ships to r1 since cdpfs
        # replicate registered it) cannot send the change itself
        p.vol.mount()
        apply(p.vol.mnt / "big.bin")
        p.vol.umount()
        src = self.work / "rsync_src"
        src.mkdir()
        shutil.copyfile(dst / "big.bin", src / "big.bin")
        apply(src / "big.bin")

        p.server.start()
        with Store(p.vol.store, readonly=True) as st:
            before = next(s for s in load_states(st) if s.name == p.name)
        proxy = Proxy(p.server.port)
        self.closers.append(proxy.close)
        t0 = time.monotonic()
        out = cli("replicate", p.vol.store, "--to", f"127.0.0.1:{proxy.port}", "--name",
                  p.name).strip()
        took = time.monotonic() - t0
        proxy.close()
        with Store(p.vol.store, readonly=True) as st:
            after = next(s for s in load_states(st) if s.name == p.name)
        cdpfs_bytes = proxy.total
        log.info("%s; %d bytes on the wire", out, cdpfs_bytes)
        p.server.stop()
        self.compare(p.vol.store, p.server.store)

        rsync_bytes, rsync_stats, rsync_took = self.rsync(src, dst)
        if not filecmp.cmp(src / "big.bin", dst / "big.bin", shallow=False):
            raise BenchError("rsync: the daemon's copy differs from the source afterwards")
        self.row("3 bytes of a 1% change", f"cdpfs replicate, {label} rewritten "
                 "(TCP bytes both ways, TLS included)", "MiB", cdpfs_bytes / MiB,
                 rsync_bytes / MiB if rsync_bytes else None, "rsync",
                 "cdpfs/rsync", ratio_max=1.0)
        self.row("3 bytes of a 1% change", "changed data itself", "MiB", changed / MiB)
        self.notes.append(
            f"3, cdpfs: {after.records_sent - before.records_sent} records, frames of "
            f"{(after.bytes_sent - before.bytes_sent) / MiB:.2f} MiB sent by the shipper "
            f"(bytes_sent), {proxy.up / MiB:.2f} MiB up + {proxy.down / MiB:.3f} MiB down "
            f"on the wire in {proxy.connections} connection(s), {took:.1f} s; "
            f"printed {out!r}")
        self.notes.append(
            f"3, rsync: daemon on loopback behind the same counting proxy, "
            f"'rsync --no-whole-file --ignore-times --stats' to rsync://; its stats: "
            f"{rsync_stats}; {rsync_took:.1f} s")
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)

    def rsync(self, src: Path, dst: Path) -> tuple[int, str, float]:
        """Send src/big.bin to an rsync daemon holding dst/big.bin, through a counting
        proxy; (bytes on the wire, rsync's own totals, seconds)."""
        exe = shutil.which("rsync")
        if exe is None:
            raise BenchError("rsync is not installed")
        port = harness.free_port()
        conf = self.work / "rsyncd.conf"
        conf.write_text(f"pid file = {self.work / 'rsyncd.pid'}\nuse chroot = no\n"
                        f"log file = {self.work / 'rsyncd.log'}\n"
                        f"[bench]\n    path = {dst}\n    read only = no\n"
                        "    uid = 0\n    gid = 0\n")
        daemon = subprocess.Popen([exe, "--daemon", "--no-detach", f"--config={conf}",
                                   f"--port={port}", "--address=127.0.0.1"],
                                  stdin=subprocess.DEVNULL)
        self.closers.append(lambda: stop_process(daemon, "rsync daemon"))
        proxy = Proxy(port)
        self.closers.append(proxy.close)
        try:
            wait_listening(daemon, port, "rsync --daemon")
            t0 = time.monotonic()
            proc = subprocess.run([exe, "--no-whole-file", "--ignore-times", "--stats",
                                   str(src / "big.bin"),
                                   f"rsync://127.0.0.1:{proxy.port}/bench/big.bin"],
                                  capture_output=True, text=True, timeout=3600)
            took = time.monotonic() - t0
            if proc.returncode != 0:
                raise BenchError(f"rsync failed ({proc.returncode}): {proc.stderr.strip()}")
        finally:
            proxy.close()
            stop_process(daemon, "rsync daemon")
        stats = "; ".join(m.group(0) for m in re.finditer(
            r"(Total bytes sent|Total bytes received|Matched data|Literal data): [\d,]+ ?\w*",
            proc.stdout))
        return proxy.total, stats, took

    # --- 1 (live), 2 and 4: a mounted primary shipping async ---------------------------

    def live(self) -> None:
        cfg = self.cfg
        p = self.pair(2)
        p.server.start()
        cli("replica", "add", p.vol.store, p.name, "--address", p.server.address,
            "--mode", "async")
        watch = Watch(p.vol.store, p.name)
        self.closers.append(watch.close)
        p.vol.mount()
        # 1, live: the same amount of data while shipping
        size = cfg.size
        data = os.urandom(size)
        mount_pid = harness.holder_pid(p.vol.store)
        server_pid = p.server.proc.pid if p.server.proc else None
        cpu0 = cpu_seconds(mount_pid), cpu_seconds(server_pid)
        t0 = time.monotonic()
        took = seq_write(p.vol.mnt / "big.bin", data)
        done = t0 + took
        del data
        last = watch.last()
        acked_at = watch.wait_acked(last, timeout=600)
        cpu1 = cpu_seconds(mount_pid), cpu_seconds(server_pid)
        local = self.local_rate
        self.row("1 throughput", "live async: writer, same file, replica shipping", "MB/s",
                 size / took / MB, local / MB if local else None, "no replica",
                 "with/without")
        self.row("1 throughput", "live async: replica acked last seq after writer's fsync",
                 "s", acked_at - done, took, "writer's time", "catch-up/write")
        self.row("1 throughput", "live async: effective (write start -> last seq acked)",
                 "MB/s", size / (acked_at - t0) / MB, local / MB if local else None,
                 "local write", "eff/local", ratio_min=0.8)
        # Where the time goes: CPU seconds per GiB of file data, from /proc, beside the
        # mount's own CPU for the same write without a replica (both processes and the
        # bench share this machine's CPUs).
        gib = size / (1 << 30)
        mount_cpu, server_cpu = ((b - a) / gib for a, b in zip(cpu0, cpu1, strict=True))
        self.row("1 throughput", "live async: CPU of the mount process", "s/GiB", mount_cpu,
                 self.local_cpu, "no replica", "with/without")
        self.row("1 throughput", "live async: CPU of the replica server", "s/GiB", server_cpu)
        self.row("1 throughput", "live async: CPUs busy with both, write start -> last ack",
                 "CPUs", (mount_cpu + server_cpu) * gib / (acked_at - t0),
                 float(os.cpu_count() or 1), "CPUs in the machine", "busy/all")
        for section in (self.lag, self.lag_sustainable, self.resume):
            try:
                section(p, watch)
            except BenchError as exc:
                log.error("%s: %s", section.__name__, exc)
                self.errors.append(f"{section.__name__}: {exc}")
        p.vol.umount()
        # whatever the mount committed on the way out (it ships no more once unmounted)
        out = cli("replicate", p.vol.store, "--to", p.server.address, "--name", p.name)
        log.info("final replicate: %s", out.strip())
        p.server.stop()
        self.compare(p.vol.store, p.server.store)
        self.retire(p)

    def lag(self, p: Pair, watch: Watch) -> None:
        """2: half the local write rate, the target."""
        if not self.local_rate:
            raise BenchError("no local write rate to take half of")
        self.paced_lag(p, watch, "2 lag at half load", self.local_rate / 2,
                       "half of the local write of 1", self.cfg.lag_seconds, target=True)

    def lag_sustainable(self, p: Pair, watch: Watch) -> None:
        """2, for comparison: half the rate of cdpfs replicate, a load it can follow."""
        if not self.repl_rate:
            raise BenchError("no replicate rate to take half of")
        self.paced_lag(p, watch, "2 lag at half replicate rate", self.repl_rate / 2,
                       "half of the cdpfs replicate rate of 1", self.cfg.lag_seconds * 2 / 3,
                       target=False)

    def paced_lag(self, p: Pair, watch: Watch, section: str, rate: float, what: str,
                  seconds: float, target: bool) -> None:
        cfg = self.cfg
        p.vol.sync()
        watch.wait_acked(watch.last(), timeout=600)  # start from a replica that is level
        os.sync()  # the dirty pages of what came before are not written back meanwhile
        sampler = LagSampler(watch, p.server.store)
        self.closers.append(sampler.close)
        log.info("%s: %.0f MB/s for %.0f s", section, rate / MB, seconds)
        t0 = time.monotonic()
        written, fsyncs = paced_writer(p.vol.mnt / f"paced{len(self.rows)}.bin", rate,
                                       seconds, cfg.fsync_every, watch, sampler, cfg.size)
        took = time.monotonic() - t0
        late = sampler.drain(120)
        sampler.close()
        lags = [x * 1000 for x in sampler.lag]
        there = [x * 1000 for x in sampler.lag_replica]
        fs = [x * 1000 for x in fsyncs]
        label = f"{rate / MB:.0f} MB/s asked"
        for q, name in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
            self.row(section, f"lag {name}, {label}", "ms", percentile(lags, q),
                     percentile(fs, q), f"fsync {name}", "lag/fsync",
                     value_below=1000.0 if target and name == "p99" else None)
        short = section.split(" ", 1)[1]
        self.notes.append(
            f"2, {short}, writer: {written / took / MB:.1f} MB/s achieved of "
            f"{rate / MB:.1f} MB/s asked ({what}), {len(fsyncs)} fsyncs in {took:.1f} s; "
            f"lag mean {statistics.fmean(lags):.0f} ms"
            + (f"; {late} fsyncs still unacknowledged after 120 s (counted as lower bounds)"
               if late else ""))
        self.notes.append(
            f"2, {short}, lag by the replica store's own journal (record durable there): "
            f"p50 {percentile(there, 0.5):.0f} ms, p99 {percentile(there, 0.99):.0f} ms, "
            f"max {max(there):.0f} ms")

    def resume(self, p: Pair, watch: Watch) -> None:
        cfg = self.cfg
        p.vol.sync()
        watch.wait_acked(watch.last(), timeout=600)
        before = watch.state()
        writer = MixedWriter(p.vol.mnt, cfg.mixed_rate)
        self.closers.append(writer.stop)
        writer.start()
        try:
            time.sleep(2)  # the writer is running and shipped before the server goes away
            p.server.stop()
            stopped = time.monotonic()
            start_bytes, _ = writer.snapshot()
            log.info("replica stopped for %.0f s under %.1f MB/s of mixed writes", cfg.disconnect,
                     cfg.mixed_rate / MB)
            while (left := stopped + cfg.disconnect - time.monotonic()) > 0:
                time.sleep(min(left, 10))
                if writer.error is not None:
                    break
                w, n = writer.snapshot()
                log.info("  %.0f s left; %.0f MiB written, %d files", left, w / MiB, n)
            p.vol.sync()
            queued_bytes = writer.snapshot()[0] - start_bytes
            target = watch.last()
            away = watch.state()
            queued = target - away.acked
            t0 = time.monotonic()
            p.server.start()
            ready = time.monotonic() - t0
            connected_at = None
            deadline = t0 + max(600, cfg.disconnect * 2)
            while True:
                st = watch.state()
                now = time.monotonic()
                if connected_at is None and st.connected:
                    connected_at = now
                if st.acked >= target:
                    acked_at = now
                    break
                if now > deadline:
                    raise BenchError(f"replica {p.name} at #{st.acked}, not #{target}, "
                                     f"{now - t0:.0f} s after its restart")
                time.sleep(POLL)
        except BenchError:  # leave the replica running for what follows
            if p.server.proc is None:
                p.server.start()
            raise
        finally:  # on failure too: stop writing
            with contextlib.suppress(BenchError):
                writer.stop()
        catch_up = acked_at - t0
        during = watch.state()
        writer.stop()  # raises if it failed
        p.vol.sync()
        final = watch.last()
        watch.wait_acked(final, timeout=600)
        end = watch.state()
        expected = queued_bytes / self.repl_rate if self.repl_rate else None
        label = f"{cfg.disconnect:.0f} s away"
        self.row("4 resume", f"records queued, {label}", "records", queued)
        self.row("4 resume", f"file data queued, {label}", "MiB", queued_bytes / MiB)
        self.row("4 resume", "catch-up: server restart -> seq at restart acked (load on)", "s",
                 catch_up, expected, "queued MiB at replicate rate", "actual/expected")
        self.row("4 resume", "  of which: server restart -> shipper connected again", "s",
                 (connected_at or acked_at) - t0, catch_up, "catch-up", "share")
        self.notes.append(
            f"4, writer {cfg.mixed_rate / MB:.1f} MB/s of mixed data ({writer.files} small "
            f"files in all); the server listened {ready:.2f} s after its start; shipper "
            f"state when away: connected={away.connected}, last error {away.last_error!r}; "
            f"{(during.bytes_sent - away.bytes_sent) / MiB:.1f} MiB sent from restart to "
            f"catch-up; seqs #{before.acked} before, #{target} at restart, #{final} at the "
            f"end (acked #{end.acked})")

    # --- all ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.throughput_and_change()
        except BenchError as exc:
            log.error("1/3: %s", exc)
            self.errors.append(f"throughput / 1% change: {exc}")
        self.live()

    def cleanup(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        for vol in [p.vol for p in self.pairs] + self.scratch:
            with contextlib.suppress(Exception):
                vol.cleanup()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()

    def description(self) -> str:
        cfg = self.cfg
        return "\n".join([
            "cdpfs replication benchmark" + (" (--quick)" if cfg.quick else ""),
            f"date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Linux {platform.release()}, Python {platform.python_version()}",
            f"work directory: {self.work} ({fs_type(self.work)}); everything on loopback, "
            "primary, replica and bench on the same CPUs and disk",
            f"cdpfs: {git_version()}",
            f"big file: {cfg.size // MiB} MiB of os.urandom; half load for "
            f"{cfg.lag_seconds:.0f} s, fsync every {cfg.fsync_every * 1000:.0f} ms; disconnect "
            f"{cfg.disconnect:.0f} s at {cfg.mixed_rate / MB:.0f} MB/s",
        ])


def report(bench: Bench, markdown: Path | None) -> None:
    rows = sorted(bench.rows, key=lambda r: r.section[0])  # stable: in order within each
    report_figures(bench.description(), rows, bench.notes, bench.errors, markdown)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    start_run(args.verbose, args.dir)
    started = time.monotonic()
    with work_dir(args.dir, args.keep, "cdpfs-replication-") as work:
        bench = Bench(cfg, work, keep=args.keep)
        try:
            bench.run()
        except KeyboardInterrupt:
            log.error("interrupted")
            bench.errors.append("interrupted")
        except Exception as exc:
            log.exception("bench failed")
            bench.errors.append(f"bench failed: {exc}")
        finally:
            bench.cleanup()
            for p in bench.pairs:
                bench.errors += p.vol.log_problems()
            for server in bench.servers:
                bench.errors += server.log_problems()
    log.info("total %.0f s", time.monotonic() - started)
    report(bench, args.markdown)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
