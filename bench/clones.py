"""Clone benchmarks (issue 13): how long ``cdpfs clone`` takes as the volume grows,
and how fast a clone reads against the same moment through ``@M`` and the live file.

1. **create**: volumes of growing size (default 1 and 10 GiB of incompressible
   data in 1 GiB files, written through a real mount); after each, ``cdpfs clone``
   of the newest moment is timed, command start to exit, beside the mount running.
   Target: under 1 s, and the largest no slower than 2x the smallest.
2. **read**: a 1 GiB file; a moment M; 1% of its blocks overwritten. Cold reads
   (page cache dropped, the clone freshly mounted) of the file in 1 MiB requests:
   through the clone of M, through ``@#M`` of the live mount and the live file.
   Ratios clone/@M and clone/live (expected about 1.0).

Usage: ``python bench/clones.py [--sizes 1,10] [--markdown FILE] [--dir DIR]``
(root). Everything mounted is unmounted on the way out; the work directory is
removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import harness
from run import Figure, MiB, drop_caches, report_figures, start_run, work_dir, write_all

log = logging.getLogger("clones")
GiB = 1 << 30


def fill(path: Path, size: int, seed: int) -> None:
    """Write ``size`` bytes of random data in 1 MiB requests, then fsync."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            write_all(fd, memoryview(rng.randbytes(MiB)))
        os.fsync(fd)
    finally:
        os.close(fd)


def cold_read(path: Path) -> float:
    """MB/s of reading ``path`` whole in 1 MiB requests after dropping the page cache."""
    drop_caches()
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e6


def timed_clone(store: Path, clone: Path) -> float:
    t0 = time.perf_counter()
    harness.cdpfs("clone", store, clone)
    return time.perf_counter() - t0


def run(work: Path, sizes: list[int], rows: list[Figure]) -> None:
    vol = harness.Volume(work, "base").init()
    mounts = [vol]
    try:
        vol.mount()
        written = 0
        times = []
        for i, gib in enumerate(sizes):
            while written < gib * GiB:
                fill(vol.mnt / f"data{written // GiB}", GiB, written // GiB)
                written += GiB
            vol.sync()
            seconds = timed_clone(vol.store, work / f"clone{i}")
            times.append(seconds)
            log.info("clone of a %d GiB volume: %.3f s", gib, seconds)
            harness.cdpfs("clone", "--delete", work / f"clone{i}")
        for gib, seconds in zip(sizes, times, strict=True):
            rows.append(Figure("create", f"cdpfs clone, {gib} GiB volume", "s", seconds,
                               times[0], f"{sizes[0]} GiB", "x smallest", value_below=1.0))
        rows[-1].ratio_max = 2.0

        # Reads: the first 1 GiB file at M, then 1% of its blocks rewritten live.
        target = vol.mnt / "data0"
        m = vol.last_seq()
        rng = random.Random(99)
        with open(target, "r+b") as f:
            for _ in range(GiB // (128 * 1024) // 100):
                f.seek(rng.randrange(GiB // (128 * 1024)) * 128 * 1024)
                f.write(rng.randbytes(128 * 1024))
            os.fsync(f.fileno())
        clone = harness.Volume(work, "clone")
        mounts.append(clone)
        harness.cdpfs("clone", vol.store, clone.store, "--at", f"#{m}")
        clone.mount()
        via_clone = cold_read(clone.mnt / "data0")
        via_at = cold_read(vol.mnt / f"@#{m}" / "data0")
        live = cold_read(target)
        rows.append(Figure("read", "cold 1 GiB read, clone of M", "MB/s", via_clone, via_at,
                           "@M", "clone/@M"))
        rows.append(Figure("read", "cold 1 GiB read, clone of M", "MB/s", via_clone, live,
                           "live", "clone/live"))
        clone.umount()
        harness.cdpfs("clone", "--delete", clone.store)
        vol.umount()
    finally:
        for m_ in mounts:
            m_.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10", help="volume sizes in GiB (default 1,10)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    start_run(args.verbose, args.dir)
    rows: list[Figure] = []
    errors: list[str] = []
    with work_dir(args.dir, args.keep, "cdpfs-clones-") as work:
        try:
            run(work, sizes, rows)
        except (harness.HarnessError, OSError, subprocess.SubprocessError) as exc:
            log.exception("bench failed")
            errors.append(f"bench failed: {exc}")
    report_figures(f"clones: volumes of {args.sizes} GiB", rows, [], errors, args.markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
