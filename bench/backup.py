"""Backup benchmarks (issue 20): exporting a state, measured against the native tools.

Each section builds what it needs in a fresh work directory and returns figures
with a baseline measured in the same run (best of ``--repeat``, the two sides
alternating, so a machine shared with other work disturbs both alike):

1. **export**: a ~1 GiB tree on the native disk (real Python sources cut into
   files of 8 MiB and 1-16 KiB, stamped so no two blocks dedupe, and
   incompressible files), imported into a store (``tar -c | cdpfs import -``,
   timed against ``tar -x`` of the same archive into a native directory). Then
   ``cdpfs export STORE --at now -o FILE`` against ``tar -cf FILE -C tree .``,
   both writing their archive to the same disk: MB/s of tree bytes, with the
   archive made durable (the export fsyncs before its rename; ``tar`` is followed
   by ``sync FILE``), and without (the export to standard output redirected to a
   file; ``tar`` alone). Target: export/tar >= 0.8. The export is checked with
   ``tar --compare`` against the tree (contents, sizes, modes, owners, mtimes).

More sections (send, receive, rebuild) add a function to ``SECTIONS``.

Usage: ``python bench/backup.py [--quick] [--repeat N] [--only export] [--markdown
FILE] [--dir DIR] [--keep] [-v]``. ``--quick``: a 128 MiB tree. Needs GNU tar. The
work directory (under ``--dir``, default /var/tmp: not tmpfs) is removed unless
``--keep``. Exit status 1 if anything failed or read back wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from run import (
    MB,
    BenchError,
    Figure,
    MiB,
    fs_type,
    git_version,
    make_text,
    report_figures,
    start_run,
    work_dir,
)

log = logging.getLogger("backup")
CLI = str(Path(sys.executable).with_name("cdpfs"))


@dataclass(frozen=True)
class Config:
    """What to run and how big."""

    size: int  # bytes of the tree, about
    repeat: int
    only: tuple[str, ...]
    quick: bool


@dataclass
class Bench:
    """One run: its configuration, work directory, figures, notes and errors."""

    cfg: Config
    work: Path
    rows: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def description(self) -> str:
        return (f"cdpfs backup benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
                f"{git_version()}\n{platform.node()}: {os.cpu_count()} CPUs, "
                f"{platform.release()}, Python {platform.python_version()}; work directory "
                f"on {fs_type(self.work)}; load average {os.getloadavg()[0]:.1f} at the end; "
                f"best of {self.cfg.repeat}")

    def run(self) -> None:
        for name in self.cfg.only:
            log.info("section %s", name)
            SECTIONS[name](self)


# --- helpers ---------------------------------------------------------------------------------


CPU: dict[str, list[float]] = {}  # CPU seconds (user + system) of each timed side


def sh(*argv: str | os.PathLike[str], stdout: Path | None = None,
       stdin: Path | None = None) -> float:
    """Run a command (its stdout to a file if given); the seconds it took."""
    cmd = [str(a) for a in argv]
    started = time.perf_counter()
    with open(stdout, "wb") if stdout else open(os.devnull, "wb") as out, \
            open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
        proc = subprocess.run(cmd, stdout=out, stdin=inp, stderr=subprocess.PIPE)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return took


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def best(cfg: Config, *sides: Callable[[], float]) -> list[float]:
    """The best time of each side over ``cfg.repeat`` rounds, the sides alternating
    (and their order swapped each round); the CPU seconds of each run of a side go
    to ``CPU`` under its function's name."""
    times: list[list[float]] = [[] for _ in sides]
    for r in range(cfg.repeat):
        order = list(range(len(sides)))
        if r % 2:
            order.reverse()
        for i in order:
            before = cpu_seconds()
            times[i].append(sides[i]())
            CPU.setdefault(sides[i].__name__, []).append(cpu_seconds() - before)
    return [min(t) for t in times]


def make_tree(root: Path, size: int) -> tuple[int, int]:
    """About ``size`` bytes of files under ``root``: (files, bytes)."""
    rng = random.Random(20)
    text, _, _ = make_text(size // 2)
    files = total = 0

    def put(path: Path, data: bytes) -> None:
        nonlocal files, total
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files += 1
        total += len(data)

    chunk = 8 * MiB
    for i in range(len(text) // chunk):  # half of it text in 8 MiB files
        put(root / "text" / f"part{i:03d}.py", text[i * chunk:(i + 1) * chunk])
    for i in range(size * 3 // 8 // (24 * MiB)):  # incompressible
        put(root / "media" / f"blob{i:02d}.bin", rng.randbytes(24 * MiB))
    small = size // 8
    i = 0
    while small > 0:  # the rest small files, 100 to a directory
        n = rng.randrange(1024, 16 * 1024)
        off = rng.randrange(0, len(text) - n)
        put(root / "src" / f"d{i // 100:03d}" / f"f{i:05d}.py", text[off:off + n])
        small -= n
        i += 1
    return files, total


# --- sections ---------------------------------------------------------------------------------


def export_section(bench: Bench) -> None:
    """Export of a ~1 GiB state against ``tar -c`` of the same tree (see the module
    docstring), and the import of the tree against ``tar -x``."""
    cfg, work = bench.cfg, bench.work
    tree = work / "tree"
    files, nbytes = make_tree(tree, cfg.size)
    log.info("tree: %d files, %.0f MiB", files, nbytes / MiB)
    source = work / "source.tar"
    sh("tar", "--format=posix", "-cf", source, "-C", tree, ".")  # times to the ns
    store = work / "vol.store"
    native = work / "native-x"

    def import_() -> float:
        sh("rm", "-rf", store)
        return sh(CLI, "import", "-", store, stdin=source)

    def untar() -> float:
        sh("rm", "-rf", native)
        native.mkdir()
        return sh("tar", "-xf", source, "-C", native)

    t_import, t_untar = best(cfg, import_, untar)
    sh("rm", "-rf", native)
    bench.rows.append(Figure("export", "import of the tree (tar from a file)", "MB/s",
                             nbytes / t_import / MB, nbytes / t_untar / MB, "tar -x",
                             "import/tar -x"))
    out_cdpfs, out_tar = work / "export.tar", work / "native.tar"

    def export_durable() -> float:
        out_cdpfs.unlink(missing_ok=True)
        return sh(CLI, "export", store, "--at", "now", "-o", out_cdpfs)

    def tar_durable() -> float:
        out_tar.unlink(missing_ok=True)
        return sh("tar", "-cf", out_tar, "-C", tree, ".") + sh("sync", out_tar)

    def export_plain() -> float:
        return sh(CLI, "export", store, "--at", "now", "-o", "-", stdout=out_cdpfs)

    def tar_plain() -> float:
        out_tar.unlink(missing_ok=True)
        return sh("tar", "-cf", out_tar, "-C", tree, ".")

    t_exp, t_tar = best(cfg, export_durable, tar_durable)
    bench.rows.append(Figure("export", "export of the state to a file, fsynced", "MB/s",
                             nbytes / t_exp / MB, nbytes / t_tar / MB, "tar -c + sync",
                             "export/tar", ratio_min=0.8))
    t_exp2, t_tar2 = best(cfg, export_plain, tar_plain)
    bench.rows.append(Figure("export", "export of the state, no fsync (stdout to a file)",
                             "MB/s", nbytes / t_exp2 / MB, nbytes / t_tar2 / MB, "tar -c",
                             "export/tar", ratio_min=0.8))
    cpu = {name: min(v) for name, v in CPU.items()}
    bench.notes.append(
        f"export: CPU seconds (user + system, least of the runs): export "
        f"{cpu['export_durable']:.1f} and tar -c {cpu['tar_durable']:.1f} (fsynced), export "
        f"{cpu['export_plain']:.1f} and tar -c {cpu['tar_plain']:.1f}; import "
        f"{cpu['import_']:.1f} and tar -x {cpu['untar']:.1f}")
    size_cdpfs, size_tar = out_cdpfs.stat().st_size, out_tar.stat().st_size
    bench.notes.append(f"export: a tree of {files} files, {nbytes / MiB:.0f} MiB; archives "
                       f"{size_cdpfs / MiB:.0f} MiB (cdpfs, PAX headers with ns times) and "
                       f"{size_tar / MiB:.0f} MiB (GNU tar)")
    # checked, untimed: the archive holds the tree (tar --compare reports any difference)
    proc = subprocess.run(["tar", "--compare", "-f", str(out_cdpfs), "-C", str(tree)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        bench.errors.append(f"export: tar --compare found differences: {proc.stdout[-500:]}"
                            f"{proc.stderr[-500:]}")
    for path in (out_cdpfs, out_tar, source):
        path.unlink(missing_ok=True)


SECTIONS: dict[str, Callable[[Bench], None]] = {"export": export_section}


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Benchmark cdpfs backups: export of a state.")
    p.add_argument("--quick", action="store_true", help="a 128 MiB tree instead of 1 GiB")
    p.add_argument("--repeat", type=int, default=3,
                   help="timings of each side, alternating; the best kept (default 3)")
    p.add_argument("--only", help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--markdown", type=Path, help="also write the figures as markdown here")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where to make the temporary work directory (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    only = tuple(a.only.split(",")) if a.only else tuple(SECTIONS)
    for s in only:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}")
    return Config(size=(128 if a.quick else 1024) * MiB, repeat=max(1, a.repeat), only=only,
                  quick=a.quick), a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    start_run(args.verbose, args.dir)
    with work_dir(args.dir, args.keep, "cdpfs-backup-") as work:
        bench = Bench(cfg, work)
        try:
            bench.run()
        except KeyboardInterrupt:
            log.error("interrupted")
            bench.errors.append("interrupted")
        except Exception as exc:
            log.exception("bench failed")
            bench.errors.append(f"bench failed: {exc}")
    report_figures(bench.description(), bench.rows, bench.notes, bench.errors, args.markdown)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
