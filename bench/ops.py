"""What each kind of request costs the mount daemon: CPU time and latency per operation.

For cdpfs and the pass-through (``bench/passthrough.py``), in the same run, on fresh
mounts: the daemon's own CPU time (utime + stime of its process from
``/proc/PID/stat``, all threads) over N operations of each kind, divided by N, and
the latency of each operation as the application sees it (p50, p99), with the
rate. The kinds:

* ``create``: open(O_CREAT|O_EXCL) + one 4 KiB write + close, N files in one dir;
* ``mkdir``: N directories;
* ``stat``: after a remount (the kernel's caches empty), lstat of each file: one
  LOOKUP each;
* ``read``: after a remount, open + read + close of each 4 KiB file;
* ``randwrite``: 4 KiB pwrites at random aligned offsets of a 64 MiB file, fsync
  every 256 (the fsyncs are in the time and the CPU).

    python bench/ops.py [--n 3000] [--only create,stat] [--markdown FILE]

Run it with another checkout's interpreter (its venv) to measure that code: the
targets come from ``bench/run.py`` and the cdpfs command beside the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import percentile
from run import Backend, Cdpfs, MemFs, PassthroughFs, cpu_seconds, git_version

log = logging.getLogger("bench.ops")
KINDS = ("create", "mkdir", "stat", "read", "randwrite")


class Result:
    def __init__(self, kind: str, n: int, cpu: float, lat: list[float], wall: float) -> None:
        self.kind, self.n, self.cpu, self.lat, self.wall = kind, n, cpu, lat, wall

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.n

    @property
    def rate(self) -> float:
        return self.n / self.wall


def measure(backend: Backend, kind: str, n: int, body: Callable[[int], None]) -> Result:
    pid = backend.pid()
    assert pid is not None, f"{backend.name}: no daemon"
    lat = []
    start_cpu = cpu_seconds(pid)
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        body(i)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return Result(kind, n, cpu_seconds(pid) - start_cpu, lat, wall)


def cold(backend: Backend) -> None:
    """Empty the kernel's caches of the mount (a remount; the in-memory fs drops
    the kernel's caches instead, see run.MemFs)."""
    backend.stop()
    backend.start()


def run_kinds(backend: Backend, kinds: list[str], n: int) -> dict[str, Result]:
    out: dict[str, Result] = {}
    text = b"".join(b"line %06d of a small file\n" % i for i in range(160))[:4096]
    backend.reset()
    backend.start()
    try:
        root = backend.root
        files = root / "files"
        files.mkdir()

        def create(i: int) -> None:
            fd = os.open(files / f"f{i:06d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, text)
            os.close(fd)

        out["create"] = measure(backend, "create", n, create)
        if "mkdir" in kinds:
            (root / "dirs").mkdir()
            out["mkdir"] = measure(backend, "mkdir", n,
                                   lambda i: os.mkdir(root / "dirs" / f"d{i:06d}"))
        if "stat" in kinds or "read" in kinds:
            cold(backend)
            if "stat" in kinds:
                out["stat"] = measure(backend, "stat", n,
                                      lambda i: os.lstat(files / f"f{i:06d}"))
            if "read" in kinds:
                cold(backend)

                def read(i: int) -> None:
                    fd = os.open(files / f"f{i:06d}", os.O_RDONLY)
                    assert os.read(fd, 8192) == text
                    os.close(fd)

                out["read"] = measure(backend, "read", n, read)
        if "randwrite" in kinds:
            size = 64 << 20
            path = root / "rand"
            with open(path, "wb") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
            rng = random.Random(5)
            offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
            data = os.urandom(4096)
            fd = os.open(path, os.O_WRONLY)
            try:
                def write(i: int) -> None:
                    os.pwrite(fd, data, offsets[i])
                    if i % 256 == 255:
                        os.fsync(fd)

                out["randwrite"] = measure(backend, "randwrite", n, write)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        backend.stop()
    if "create" not in kinds:
        del out["create"]
    return out


SHORT = {"cdpfs": "cdpfs", "passthrough": "pt", "memfs": "mem"}


def table(results: dict[str, dict[str, Result]], markdown: bool) -> str:
    names = list(results)
    head = ["operation"] + [f"{SHORT[b]} CPU ms/op" for b in names]
    if "cdpfs" in results and "passthrough" in results:
        head.append("CPU cdpfs/pt")
    head += [f"{SHORT[b]} p50 / p99 ms" for b in names] + [f"{SHORT[b]} ops/s" for b in names]
    rows = []
    for kind in KINDS:
        got = [results[b].get(kind) for b in names]
        if all(r is None for r in got):
            continue
        row = [kind] + [f"{r.cpu_ms:.3f}" if r else "-" for r in got]
        if "CPU cdpfs/pt" in head:
            c, p = results["cdpfs"].get(kind), results["passthrough"].get(kind)
            row.append(f"{c.cpu_ms / p.cpu_ms:.2f}" if c and p and p.cpu_ms else "-")
        row += [f"{1000 * statistics.median(r.lat):.3f} / {1000 * percentile(r.lat, 0.99):.3f}"
                if r else "-" for r in got]
        row += [f"{r.rate:,.0f}" if r else "-" for r in got]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True))
                     for r in [head, *rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="operations of each kind")
    ap.add_argument("--only", help="comma-separated kinds (" + ",".join(KINDS) + ")")
    ap.add_argument("--backends", default="cdpfs,passthrough,memfs")
    ap.add_argument("--dir", default="/var/tmp", help="work directory (not tmpfs)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = args.only.split(",") if args.only else list(KINDS)
    results: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="cdpfs-ops-", dir=args.dir) as work:
        for name in args.backends.split(","):
            cls = {"cdpfs": Cdpfs, "passthrough": PassthroughFs, "memfs": MemFs}[name]
            backend = cls(Path(work) / name)
            backend.work.mkdir()
            try:
                backend.setup()
                results[name] = run_kinds(backend, kinds, args.n)
            finally:
                with contextlib.suppress(Exception):
                    backend.cleanup()
    out = (f"cdpfs {git_version()}, {args.n} operations of each kind, "
           f"{sys.executable}\n\n" + table(results, markdown=False))
    print(out)
    if args.markdown:
        Path(args.markdown).write_text(table(results, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
