"""fsx-style random operations against a model, on a real mount.

The single-file tests drive a file on a fresh volume through 100,000 seeded
random operations (the two-file test 50,000; see ``tests/fsx.py``): buffered
and O_DIRECT writes and reads at random offsets and lengths, across 128 KiB
block boundaries, holes, zero writes, posix_fallocate, truncate and ftruncate
down and up, mmap reads and MAP_SHARED writes with msync (FUSE with the
writeback cache supports them), fsync, dropped page caches, close/reopen and
sparse excursions past 4 GiB. The whole file is compared with the model
periodically, at the end and after a remount; the ``volume`` fixture then
runs ``cdpfs verify``.

One test uses a fixed seed, one a fresh random seed (printed, and named in
every failure). Replay a failure with ``CDPFS_FSX_SEED=<seed>``; shorten or
lengthen runs with ``CDPFS_FSX_OPS=<n>``.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque

import pytest
from fsx import FileExerciser, run
from harness import Volume

FIXED_SEED = 20_240_611
NOPS = int(os.environ.get("CDPFS_FSX_OPS", "100000"))

pytestmark = pytest.mark.slow


def random_seed() -> int:
    env = os.environ.get("CDPFS_FSX_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def exercise(volume: Volume, seed: int, names: list[str], nops: int) -> None:
    """Run ``nops`` operations over files ``names``, then compare before and after remount."""
    print(f"fsx seed {seed}, {nops} operations on {names}")
    rng = random.Random(seed)
    history: deque[str] = deque(maxlen=40)
    files = [FileExerciser(volume.mnt / name, rng, seed, history=history) for name in names]
    t0 = time.monotonic()
    try:
        run(files, nops)
        for f in files:
            f.check_all("at the end")
            f.check_all("at the end", direct=True)
    finally:
        for f in files:
            f.close()
    print(f"{nops} operations in {time.monotonic() - t0:.1f}s;",
          {k: sum(f.counts.get(k, 0) for f in files)
           for k in sorted({k for f in files for k in f.counts})})
    volume.remount()
    try:
        for f in files:
            f.open()
            f.check_all("after remount", direct=True)
            f.check_all("after remount")
    finally:
        for f in files:
            f.close()


def test_fsx_fixed_seed(volume: Volume) -> None:
    exercise(volume, FIXED_SEED, ["fsx"], NOPS)


def test_fsx_random_seed(volume: Volume) -> None:
    exercise(volume, random_seed(), ["fsx"], NOPS)


def test_fsx_two_files_alternately(volume: Volume) -> None:
    exercise(volume, random_seed(), ["one", "two"], NOPS // 2)
