"""Time-travel benchmarks (issue 3): what looking into the past costs, in time and space.

Every figure is measured through real FUSE mounts made with the ``cdpfs`` command
line next to the interpreter, and printed beside a baseline measured in the same
run, with their ratio and PASS/MISS where the issue names a target:

1. **listing**: a directory of 100,000 empty files; a moment T is recorded, then
   1,000 files are created and 1,000 deleted. After a remount and a page-cache
   drop, ``ls -l`` (listdir + lstat of every entry) of the live directory and of
   ``@T/dir``; also the first lookup of ``@T`` itself against the first lookup of
   the live directory. Target: past/live <= 2.0.
2. **read**: a 1 GiB file of real text (Python sources, each 4 KiB stamped so no
   two blocks dedupe), then 1% of its 128 KiB blocks overwritten; cold reads
   (remount + page-cache drop) of the live file and of ``@T/file`` in 1 MiB
   requests, MB/s and past/live (expected about 1.0). Both are checked afterwards.
3. **space**: a 1 GiB random file (incompressible), then 100 rounds each
   rewriting 1% of its 128 KiB blocks (82 ``pwrite`` s of fresh random data, an
   fsync, the round's last journal seq noted). The store's growth (``cdpfs stat``:
   stored bytes of blocks and packs, and the used store file) against 100 full
   copies (computed, not written). ``@#seq`` of rounds 1, 50 and 100 and the live
   file are read back cold and checked block by block against hashes kept here.
4. **prune**: on the store of 3, ``cdpfs retention --keep-all 1s`` (the other
   periods stay: one point per minute is still kept), 2 s later ``cdpfs prune``
   (unmounted), timed; removed versions and blocks per second, MB freed per second,
   ``cdpfs stat`` before and after; then a second prune with nothing to do. The
   live file is checked afterwards and ``cdpfs verify`` run on the store.

Usage: ``python bench/history.py [--quick] [--markdown FILE] [--dir DIR] [--keep]``
(root: FUSE mounts and ``/proc/sys/vm/drop_caches``). ``--quick`` divides the sizes
by about 10 (10,000 files, 128 MiB files, 10 rounds). Every mount is unmounted on
the way out, also on errors and SIGINT/SIGTERM; the work directory (a fresh one
under ``--dir``, default /var/tmp) is removed unless ``--keep``. Exit status 1 if
anything failed or read back wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import platform
import random
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import harness
from run import (
    MB,
    STDLIB,
    BenchError,
    MiB,
    drop_caches,
    fmt,
    fs_type,
    git_version,
    is_mounted,
    report_figures,
    settle_readahead,
    start_run,
    work_dir,
    write_all,
)
from run import Figure as Row  # one row of the figures table

from cdpfs.store.lmdb import Store

log = logging.getLogger("history")

BLOCK = 128 * 1024  # cdpfs block size (checked against each store)
IO = MiB  # read and write request size
PAGE = 4096
STAMP = 16  # bytes of stamp at the head of each 4 KiB of text


# --- configuration -----------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Sizes of the four measurements."""

    files: int  # entries in the listed directory
    churn: int  # files created and deleted after T
    text_size: int  # bytes of the text file read live and past
    rand_size: int  # bytes of the random file of 100 versions
    rounds: int  # versions of the random file
    change: float  # fraction of blocks rewritten per round / overwritten in 2
    repeat: int  # cold timings per side (best reported)
    quick: bool
    only: tuple[str, ...]


SECTIONS = ("list", "read", "versions")


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Benchmark cdpfs time travel: listing and "
                                "reading the past, space of versions, prune.")
    p.add_argument("--quick", action="store_true",
                   help="sizes divided by ~10: 10,000 files, 128 MiB files, 10 rounds")
    p.add_argument("--markdown", type=Path, help="also write the figures as markdown here")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where to make the temporary work directory (default /var/tmp; "
                   "not tmpfs)")
    p.add_argument("--repeat", type=int, default=2,
                   help="cold timings of each side, alternating order; best kept (default 2)")
    p.add_argument("--only", help=f"comma list of {','.join(SECTIONS)} (versions includes "
                   "the prune)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    only = tuple(a.only.split(",")) if a.only else SECTIONS
    for s in only:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}")
    cfg = Config(
        files=10_000 if a.quick else 100_000,
        churn=100 if a.quick else 1_000,
        text_size=(128 if a.quick else 1024) * MiB,
        rand_size=(128 if a.quick else 1024) * MiB,
        rounds=10 if a.quick else 100,
        change=0.01,
        repeat=max(1, a.repeat),
        quick=a.quick,
        only=only,
    )
    return cfg, a


# --- volumes -----------------------------------------------------------------------------



def cli(*args: str | os.PathLike[str], timeout: float = 1800) -> str:
    """Run the real ``cdpfs`` command; its stdout (BenchError on failure)."""
    return harness.cdpfs(*args, timeout=timeout).stdout


class Volume(harness.Volume):
    """The harness's volume, with what the benchmarks add: readahead, cold mounts,
    space figures and named log problems.

    Attributes:
        readahead_kb: the mount's readahead once the daemon widened it.
    """

    def __init__(self, work: Path, name: str) -> None:
        super().__init__(work, name)
        self.readahead_kb: int | None = None

    def init(self, *args: str) -> Volume:
        super().init(*args)
        with Store(self.store, readonly=True) as s:
            if s.block_size != BLOCK:
                raise BenchError(f"store block size {s.block_size}, the bench assumes {BLOCK}")
        return self

    def mount(self, *args: str) -> Volume:
        super().mount(*args)
        self.readahead_kb = settle_readahead(self.mnt)
        return self

    def cold(self) -> None:
        """Unmount (flushes and forgets every kernel cache of the mount), drop the
        page cache (the store file's pages too), mount again."""
        if is_mounted(self.mnt):
            self.umount()
        if not drop_caches():
            raise BenchError("cannot drop the page cache: run as root")
        self.mount()

    def stat(self) -> dict[str, float]:
        """``cdpfs stat STORE``, in bytes: stored, store file, live stored, history."""
        out = cli("stat", self.store)

        def mib(pattern: str) -> float:
            m = re.search(pattern, out)
            if m is None:
                raise BenchError(f"cannot parse cdpfs stat output:\n{out}")
            return float(m[1].replace(",", "")) * MiB

        return {"stored": mib(r"stored\s+([\d,.]+) MiB of blocks"),
                "file": mib(r"; ([\d,.]+) MiB store file"),
                "live": mib(r"files \(([\d,.]+) MiB stored\)"),
                "history": mib(r"history\s+([\d,.]+) MiB stored")}

    def log_problems(self) -> list[str]:
        """Errors and tracebacks the mount logged."""
        return [f"{self.store.name}/cdpfs.log: {line}" for line in self.problems()]

    def cleanup(self) -> None:
        """Last resort: never raises, leaves nothing mounted."""
        with contextlib.suppress(Exception):
            if is_mounted(self.mnt):
                self.umount()
        with contextlib.suppress(Exception):
            super().cleanup()


def moment_name(ns: int) -> str:
    """An ``@`` name for wall-clock time ``ns``: local ISO time with nanoseconds."""
    local = dt.datetime.fromtimestamp(ns // 10**9)
    return f"@{local:%Y-%m-%dT%H:%M:%S}.{ns % 10**9:09d}"


def take_moment(vol: Volume) -> str:
    """Commit, then note the wall clock between two short sleeps (records are stamped by
    the coarse clock, up to ~4 ms behind), so nothing lands on the wrong side."""
    vol.sync()
    time.sleep(0.05)
    ns = time.time_ns()
    time.sleep(0.05)
    return moment_name(ns)


# --- results -----------------------------------------------------------------------------

def fmt_small(v: float | None) -> str:
    if v is not None and 0 < abs(v) < 0.1:
        return f"{v:.4f}"
    return fmt(v)


# --- data --------------------------------------------------------------------------------

class Text:
    """Real text in 128 KiB blocks: the stdlib Python sources streamed in order, each
    4 KiB led by a stamp (version, page) so no two blocks dedupe; ``version`` 1 starts
    elsewhere in the sources, so an overwrite is new text, not a copy."""

    def __init__(self) -> None:
        paths = sorted(p for p in STDLIB.rglob("*.py")
                       if "site-packages" not in p.parts and p.is_file())
        corpus = b"".join(p.read_bytes() for p in paths)
        self.body = PAGE - STAMP
        self.size = len(corpus)
        self.ring = corpus + corpus[: BLOCK]
        self.files = len(paths)

    def block(self, index: int, version: int = 0) -> bytes:
        out = bytearray(BLOCK)
        per = BLOCK // PAGE
        for k in range(per):
            page = index * per + k
            pos = (page + version * 7919) * self.body % self.size
            o = k * PAGE
            out[o : o + STAMP] = b"#%02d%012d\n" % (version, page)
            out[o + STAMP : o + PAGE] = self.ring[pos : pos + self.body]
        return bytes(out)


def chosen_blocks(rng: random.Random, nblocks: int, fraction: float) -> list[int]:
    """``fraction`` of the block indexes (at least one), distinct, at random."""
    return sorted(rng.sample(range(nblocks), max(1, round(nblocks * fraction))))


def read_file(path: Path, size: int, check: Callable[[int, memoryview], None] | None = None
              ) -> float:
    """Read ``path`` in 1 MiB requests (``check(offset, data)`` on each); seconds."""
    buf = bytearray(IO)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            if check is not None:
                check(total, mv[:n])
            total += n
    finally:
        os.close(fd)
    took = time.perf_counter() - t0
    if total != size:
        raise BenchError(f"{path}: read {total} bytes, expected {size}")
    return took


def file_hash(path: Path, size: int) -> str:
    h = blake3.blake3()
    read_file(path, size, lambda _off, data: h.update(data))
    return h.hexdigest()


def block_checker(path: Path, expected: list[bytes]) -> Callable[[int, memoryview], None]:
    """A ``read_file`` check comparing each 128 KiB block with its expected blake3."""

    def check(off: int, data: memoryview) -> None:
        for o in range(0, len(data), BLOCK):
            i = (off + o) // BLOCK
            if blake3.blake3(data[o : o + BLOCK]).digest() != expected[i]:
                raise BenchError(f"{path}: block {i} (offset {i * BLOCK}) has the wrong "
                                 "content")

    return check


def list_long(path: Path) -> tuple[set[str], float]:
    """``ls -l``: list the directory, lstat every entry in it; (names, seconds)."""
    t0 = time.perf_counter()
    names = os.listdir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.lstat(name, dir_fd=fd)
    finally:
        os.close(fd)
    return set(names), time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def progress(what: str, i: int, n: int, started: float, every: int) -> None:
    if i % every == 0 or i == n:
        rate = i / max(time.perf_counter() - started, 1e-9)
        log.info("%s: %d / %d (%.0f/s)", what, i, n, rate)


# --- the bench ---------------------------------------------------------------------------

@dataclass
class Bench:
    cfg: Config
    work: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    text_files: int = 0

    def volume(self, name: str) -> Volume:
        vol = Volume(self.work, name)
        self.volumes.append(vol)
        return vol.init()

    def finish(self, vol: Volume, remove: bool = True) -> None:
        """Unmount, collect log problems, and (to save disk) delete the store."""
        if is_mounted(vol.mnt):
            vol.umount()
        self.errors += vol.log_problems()
        if remove:
            shutil.rmtree(vol.store, ignore_errors=True)

    def alternate(self, vol: Volume, sides: dict[str, Callable[[], float]]) -> dict[str, float]:
        """Time each side ``repeat`` times, each after ``vol.cold()``, the order reversed
        every round (so neither side always goes first); the best time of each side."""
        best: dict[str, float] = {}
        order = list(sides)
        for n in range(self.cfg.repeat):
            for name in (order if n % 2 == 0 else order[::-1]):
                vol.cold()
                took = sides[name]()
                log.info("  %-28s %8.3f s", name, took)
                best[name] = min(best.get(name, took), took)
        return best

    # --- 1: listing ---------------------------------------------------------------

    def bench_list(self) -> None:
        cfg = self.cfg
        vol = self.volume("list")
        vol.mount()
        d = vol.mnt / "dir"
        d.mkdir()
        log.info("creating %d empty files in one directory", cfg.files)
        names = [f"f{i:06d}" for i in range(cfg.files)]
        mode = stat.S_IFREG | 0o644
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        t0 = time.perf_counter()
        try:
            for i, name in enumerate(names, 1):
                os.mknod(name, mode, dir_fd=fd)
                progress("  created", i, cfg.files, t0, 10_000)
            os.fsync(fd)
        finally:
            os.close(fd)
        create_rate = cfg.files / (time.perf_counter() - t0)
        moment = take_moment(vol)
        log.info("moment T = %s; now creating %d files and deleting %d", moment, cfg.churn,
                 cfg.churn)
        step = cfg.files // cfg.churn
        deleted = {names[i] for i in range(0, cfg.files, step)}
        added = {f"g{i:06d}" for i in range(cfg.churn)}
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in sorted(added):
                os.mknod(name, mode, dir_fd=fd)
            for name in sorted(deleted):
                os.unlink(name, dir_fd=fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        past_names = set(names)
        live_names = (past_names - deleted) | added
        past_dir = vol.mnt / moment / "dir"
        lookups: dict[str, list[float]] = {"live": [], "past": []}

        def live() -> float:
            _, t_open = timed(lambda: os.lstat(d))  # first lookup after the mount
            lookups["live"].append(t_open)
            got, took = list_long(d)
            if got != live_names:
                raise BenchError(f"live listing: {len(got)} names, expected {len(live_names)}"
                                 f" ({len(got ^ live_names)} differ)")
            return took

        def past() -> float:
            _, t_open = timed(lambda: os.lstat(vol.mnt / moment))  # resolves the moment
            lookups["past"].append(t_open)
            got, took = list_long(past_dir)
            if got != past_names:
                raise BenchError(f"{moment}/dir listing: {len(got)} names, expected "
                                 f"{len(past_names)} ({len(got ^ past_names)} differ)")
            return took

        log.info("timing ls -l of %d entries, live and at T, each cold", cfg.files)
        best = self.alternate(vol, {"ls -l live dir": live, f"ls -l {moment}/dir": past})
        t_live, t_past = best["ls -l live dir"], best[f"ls -l {moment}/dir"]
        sec = "1 listing"
        n = f"{cfg.files:,}"
        self.rows.append(Row(sec, f"ls -l of a {n}-entry dir, cold", "s", t_past, t_live,
                             "live", "past/live", ratio_max=2.0,
                             note=f"listdir + lstat of each entry after umount, drop_caches, "
                                  f"mount; past = {moment}/dir (T before {cfg.churn:,} creates "
                                  f"and {cfg.churn:,} deletes); best of {cfg.repeat}"))
        self.rows.append(Row(sec, "entries listed per second, cold", "entries/s",
                             cfg.files / t_past, len(live_names) / t_live, "live",
                             "past/live"))
        self.rows.append(Row(sec, "open @T: first lookup after mount", "ms",
                             min(lookups["past"]) * 1e3, min(lookups["live"]) * 1e3,
                             "first lookup of live dir", "past/live",
                             note="lstat(MNT/@T) resolves the moment (one seek in the time "
                                  "index); baseline lstat(MNT/dir); best of "
                                  f"{cfg.repeat}"))
        self.rows.append(Row(sec, "setup: mknod of empty files", "files/s", create_rate,
                             note="not a target; one directory, one thread"))
        self.finish(vol)

    # --- 2: read ------------------------------------------------------------------

    def bench_read(self) -> None:
        cfg = self.cfg
        text = Text()
        self.text_files = text.files
        nblocks = cfg.text_size // BLOCK
        vol = self.volume("read")
        vol.mount()
        path = vol.mnt / "big.txt"
        log.info("writing %d MiB of text", cfg.text_size // MiB)
        past_hash = blake3.blake3()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            per = IO // BLOCK
            for i in range(0, nblocks, per):
                chunk = b"".join(text.block(j) for j in range(i, min(i + per, nblocks)))
                past_hash.update(chunk)
                write_all(fd, memoryview(chunk))
                progress("  MiB written", (i + per) * BLOCK // MiB, cfg.text_size // MiB,
                         t0, 256)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_mbs = cfg.text_size / MB / (time.perf_counter() - t0)
        moment = take_moment(vol)
        changed = chosen_blocks(random.Random(2), nblocks, cfg.change)
        log.info("T = %s; overwriting %d of %d blocks with other text", moment, len(changed),
                 nblocks)
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in changed:
                os.pwrite(fd, text.block(i, version=1), i * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        live_hash = blake3.blake3()
        changed_set = set(changed)
        for i in range(nblocks):
            live_hash.update(text.block(i, 1 if i in changed_set else 0))
        past = vol.mnt / moment / "big.txt"
        log.info("timing cold reads of the live file and of %s/big.txt", moment)
        best = self.alternate(vol, {"read live": lambda: read_file(path, cfg.text_size),
                                    "read past": lambda: read_file(past, cfg.text_size)})
        log.info("checking both files' content")
        if file_hash(path, cfg.text_size) != live_hash.hexdigest():
            raise BenchError(f"{path}: live content differs from what was written")
        if file_hash(past, cfg.text_size) != past_hash.hexdigest():
            raise BenchError(f"{past}: content differs from the file at T")
        size_mb = cfg.text_size / MB
        self.rows.append(Row("2 read", f"cold read of a {cfg.text_size // MiB} MiB text file",
                             "MB/s", size_mb / best["read past"], size_mb / best["read live"],
                             "live", "past/live",
                             note=f"1 MiB reads after umount, drop_caches, mount; past = "
                                  f"{moment}/big.txt, then {len(changed)} of {nblocks} blocks "
                                  f"were overwritten; expected ~1.0; best of {cfg.repeat}"))
        self.rows.append(Row("2 read", "setup: sequential write of the text", "MB/s",
                             write_mbs, note="1 MiB writes, fsync"))
        self.finish(vol)

    # --- 3 and 4: versions and prune ------------------------------------------------

    def bench_versions(self) -> None:
        cfg = self.cfg
        nblocks = cfg.rand_size // BLOCK
        vol = self.volume("versions")
        vol.mount()
        path = vol.mnt / "random.bin"
        digests: list[bytes] = []
        log.info("writing %d MiB of random data", cfg.rand_size // MiB)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            per = IO // BLOCK
            for i in range(0, nblocks, per):
                chunk = os.urandom(min(per, nblocks - i) * BLOCK)
                digests += [blake3.blake3(chunk[o : o + BLOCK]).digest()
                            for o in range(0, len(chunk), BLOCK)]
                write_all(fd, memoryview(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        vol.umount()
        before = vol.stat()
        log.info("base file stored: %.1f MiB stored, %.1f MiB store file",
                 before["stored"] / MiB, before["file"] / MiB)
        vol.mount()
        spots = sorted({1, max(1, cfg.rounds // 2), cfg.rounds})
        kept: dict[int, tuple[int, list[bytes]]] = {}  # round -> (seq, block digests)
        rng = random.Random(3)
        per_round = max(1, round(nblocks * cfg.change))
        log.info("%d rounds, each rewriting %d of %d blocks", cfg.rounds, per_round, nblocks)
        t0 = time.perf_counter()
        for r in range(1, cfg.rounds + 1):
            fd = os.open(path, os.O_WRONLY)
            try:
                for i in chosen_blocks(rng, nblocks, cfg.change):
                    data = os.urandom(BLOCK)
                    digests[i] = blake3.blake3(data).digest()
                    os.pwrite(fd, data, i * BLOCK)
                os.fsync(fd)
            finally:
                os.close(fd)
            if r in spots:
                kept[r] = (vol.last_seq(), list(digests))
            progress("  rounds", r, cfg.rounds, t0, 10)
        rounds_s = time.perf_counter() - t0
        written = cfg.rounds * per_round * BLOCK
        vol.umount()
        after = vol.stat()
        copies = cfg.rounds * cfg.rand_size
        grown = after["stored"] - before["stored"]
        file_grown = after["file"] - before["file"]
        sec = "3 space"
        what = f"{cfg.rounds} versions x {per_round} blocks of 128 KiB"
        self.rows.append(Row(sec, "stored growth (blocks and packs)", "MiB", grown / MiB,
                             copies / MiB, f"{cfg.rounds} full copies", "stored/copies",
                             note=f"{what} rewritten with random data in a "
                                  f"{cfg.rand_size // MiB} MiB file; cdpfs stat before and "
                                  "after the rounds"))
        self.rows.append(Row(sec, "store file growth", "MiB", file_grown / MiB, copies / MiB,
                             f"{cfg.rounds} full copies", "file/copies",
                             note="used pages of the LMDB file (journal, indexes, versions "
                                  "included)"))
        self.rows.append(Row(sec, "store file growth per byte changed", "MiB",
                             file_grown / MiB, written / MiB, "bytes rewritten",
                             "file/written"))
        self.rows.append(Row(sec, "setup: rounds of 1% rewrites", "MB/s", written / MB / rounds_s,
                             note=f"{per_round} pwrites of 128 KiB, fsync, per round"))
        log.info("reading back the live file and @#seq of rounds %s, each cold", spots)
        size = cfg.rand_size

        def reader(p: Path, expect: list[bytes]) -> Callable[[], float]:
            return lambda: read_file(p, size, block_checker(p, expect))

        sides = {"live": reader(path, digests)}
        for r in spots:
            seq, expect = kept[r]
            sides[f"round {r} (@#{seq})"] = reader(vol.mnt / f"@#{seq}" / "random.bin", expect)
        best = self.alternate(vol, sides)
        live_s = best.pop("live")
        for name, took in best.items():
            self.rows.append(Row(sec, f"cold read + check of {name}", "MB/s", size / MB / took,
                                 size / MB / live_s, "live", "past/live",
                                 note="1 MiB reads, blake3 of each block compared (in the "
                                      f"timing, both sides); best of {cfg.repeat}"
                                      if name.startswith("round 1 ") else ""))
        self.notes.append(f"3: @#seq of rounds {', '.join(map(str, spots))} and the live file "
                          "read back block by block equal to what was written")
        self.bench_prune(vol, digests)
        self.finish(vol, remove=False)

    def bench_prune(self, vol: Volume, digests: list[bytes]) -> None:
        if is_mounted(vol.mnt):
            vol.umount()
        log.info("%s", cli("retention", vol.store, "--keep-all", "1s").strip())
        time.sleep(2)
        before = vol.stat()
        out, wall = timed(lambda: cli("prune", vol.store).strip())
        log.info("%s (%.1f s wall)", out, wall)
        m = re.search(r": (\d+) versions, (\d+) journal records, (\d+) blocks and (\d+) packs "
                      r"\(([\d.,]+) MiB of data\) in ([\d.]+)s; (\d+) older points kept", out)
        if m is None:
            raise BenchError(f"cannot parse cdpfs prune output: {out}")
        versions, records, blocks, packs = (int(m[i]) for i in range(1, 5))
        freed_reported = float(m[5].replace(",", "")) * MiB
        inner, points = float(m[6]), int(m[7])
        after = vol.stat()
        out2, wall2 = timed(lambda: cli("prune", vol.store).strip())
        log.info("%s (%.1f s wall)", out2, wall2)
        m2 = re.search(r": (\d+) versions, (\d+) journal records, (\d+) blocks", out2)
        if m2 is None or any(int(m2[i]) for i in (1, 2, 3)):
            self.errors.append(f"a second prune still removed something: {out2}")
        freed = before["stored"] - after["stored"]
        sec = "4 prune"
        self.rows.append(Row(sec, "cdpfs prune (keep-all 1s), wall", "s", wall,
                             note=f"{versions:,} versions, {records:,} journal records, "
                                  f"{blocks:,} blocks, {packs:,} packs, "
                                  f"{freed_reported / MiB:,.1f} MiB of data freed; "
                                  f"prune's own time {inner:.1f} s; {points} older points "
                                  "kept (the last of each minute)"))
        self.rows.append(Row(sec, "versions removed per second", "versions/s", versions / wall))
        self.rows.append(Row(sec, "blocks removed per second", "blocks/s", blocks / wall))
        self.rows.append(Row(sec, "data freed per second", "MB/s", freed / MB / wall,
                             note="cdpfs stat stored before - after, / wall time"))
        self.rows.append(Row(sec, "stored after prune", "MiB", after["stored"] / MiB,
                             before["stored"] / MiB, "before", "after/before"))
        self.rows.append(Row(sec, "history after prune", "MiB", after["history"] / MiB,
                             before["history"] / MiB, "before", "after/before"))
        self.rows.append(Row(sec, "store file after prune", "MiB", after["file"] / MiB,
                             before["file"] / MiB, "before", "after/before",
                             note="LMDB keeps freed pages for reuse: the file does not shrink"))
        self.rows.append(Row(sec, "second prune (nothing to do), wall", "s", wall2))
        log.info("checking the live file after the prune, and cdpfs verify")
        vol.cold()
        path = vol.mnt / "random.bin"
        read_file(path, len(digests) * BLOCK, block_checker(path, digests))
        vol.umount()
        self.notes.append("4: after the prune the live file reads back right")
        proc, verify_s = timed(lambda: harness.cdpfs("verify", vol.store, check=False,
                                                     timeout=3600))
        if proc.returncode == 0:
            self.notes.append(f"4: cdpfs verify after the prune: ok ({verify_s:.1f} s)")
        else:
            said = " / ".join((proc.stdout + proc.stderr).strip().splitlines())
            self.errors.append(f"cdpfs verify after the prune failed: {said}")

    # --- running ------------------------------------------------------------------

    def run(self) -> None:
        for section in SECTIONS:
            if section not in self.cfg.only:
                continue
            log.info("=== %s", section)
            t0 = time.perf_counter()
            try:
                getattr(self, f"bench_{section}")()
            except BenchError as exc:
                log.error("%s failed: %s", section, exc)
                self.errors.append(f"{section}: {exc}")
            log.info("=== %s took %.0f s", section, time.perf_counter() - t0)

    def cleanup(self) -> None:
        for vol in self.volumes:
            vol.cleanup()

    def description(self) -> str:
        cfg = self.cfg
        cpu = "?"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), "?")
        ra = sorted({v.readahead_kb for v in self.volumes if v.readahead_kb})
        return "\n".join([
            f"date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"machine: {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, "
            f"Python {platform.python_version()}",
            f"work dir: {self.work} ({fs_type(self.work)})",
            f"mode: {'--quick' if cfg.quick else 'full'}; {cfg.files:,} entries; text file "
            f"{cfg.text_size // MiB} MiB; random file {cfg.rand_size // MiB} MiB x "
            f"{cfg.rounds} versions, {cfg.change:.0%} of blocks each; cold timings best of "
            f"{cfg.repeat}",
            f"cdpfs: {git_version()}",
            *([f"text: {self.text_files} stdlib .py files from {STDLIB}, streamed, each 4 KiB "
               "stamped"] if self.text_files else []),
            *([f"FUSE readahead: {', '.join(map(str, ra))} KiB"] if ra else []),
        ])


def report(bench: Bench, markdown: Path | None) -> None:
    report_figures(bench.description(), bench.rows, bench.notes, bench.errors, markdown,
                   fmt_small)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    start_run(args.verbose, args.dir)
    started = time.perf_counter()
    with work_dir(args.dir, args.keep, "cdpfs-history-") as work:
        bench = Bench(cfg, work)
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
            for vol in bench.volumes:  # those not checked by finish(): a section failed
                bench.errors += vol.log_problems()
    log.info("total %.0f s", time.perf_counter() - started)
    report(bench, args.markdown)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
