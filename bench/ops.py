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

from run import Backend, Cdpfs, PassthroughFs, git_version

log = logging.getLogger("bench.ops")
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("create", "mkdir", "stat", "read", "randwrite")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
            backend.stop()
            backend.start()
            if "stat" in kinds:
                out["stat"] = measure(backend, "stat", n,
                                      lambda i: os.lstat(files / f"f{i:06d}"))
            if "read" in kinds:
                backend.stop()
                backend.start()

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


def table(results: dict[str, dict[str, Result]], markdown: bool) -> str:
    head = ["operation", "cdpfs CPU ms/op", "pt CPU ms/op", "CPU cdpfs/pt",
            "cdpfs p50 / p99 ms", "pt p50 / p99 ms", "cdpfs ops/s", "pt ops/s"]
    rows = []
    for kind in KINDS:
        c, p = results.get("cdpfs", {}).get(kind), results.get("passthrough", {}).get(kind)
        if c is None and p is None:
            continue

        def lat(r: Result | None) -> str:
            if r is None:
                return "-"
            return f"{1000 * statistics.median(r.lat):.3f} / {1000 * percentile(r.lat, 0.99):.3f}"

        rows.append([kind, f"{c.cpu_ms:.3f}" if c else "-", f"{p.cpu_ms:.3f}" if p else "-",
                     f"{c.cpu_ms / p.cpu_ms:.2f}" if c and p and p.cpu_ms else "-",
                     lat(c), lat(p), f"{c.rate:,.0f}" if c else "-",
                     f"{p.rate:,.0f}" if p else "-"])
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
    ap.add_argument("--backends", default="cdpfs,passthrough")
    ap.add_argument("--dir", default="/var/tmp", help="work directory (not tmpfs)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = args.only.split(",") if args.only else list(KINDS)
    results: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="cdpfs-ops-", dir=args.dir) as work:
        for name in args.backends.split(","):
            cls = {"cdpfs": Cdpfs, "passthrough": PassthroughFs}[name]
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
