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

2. **send**: a volume of ~1 GiB with 10,000 points: the tree of ``export`` with
   1,000 small files instead of an eighth of it (the incompressible files take
   the rest), imported (a record for each entry made, MiB written and attribute
   set), then small changes made through the library in-process
   (``cdpfs.testing.LiveStore``, as a mount makes them: writes of 16-511 random
   bytes into small files and renames, each a record of its own) until the
   journal holds 10,000 records, every one a point; the same changes are made to
   the native tree. Then ``cdpfs send STORE -o FILE`` (a full stream; it fsyncs
   before its rename) and ``cdpfs receive NEW -i FILE`` (synced transactions)
   against ``cp data.mdb X && sync X``: MB/s of the store's used bytes, and the
   stream's size against them. Then 1% of the tree's bytes is overwritten with
   new random bytes (256 KiB ranges, block-aligned, in the large files) through
   the library and in the native tree, and ``cdpfs send STORE --from #SEQ -o
   INC`` is measured against the stored size of the blocks and packs the new
   records reference that the store did not hold before (target: <= 1.1x) and
   against ``rsync -a --no-whole-file --stats`` from the changed tree to a copy
   of the old one ("Total bytes sent": what rsync sends over a network; its
   local default, whole files, is a note). For information, the same for the
   small changes alone (an increment from the import's last record): records
   weigh more there against the few bytes written. Checked, untimed: the
   increment received into the received copy gives the source's tree hash, and
   ``cdpfs export`` of the source matches the native tree (``tar --compare``,
   modification times aside: the library stamps its own).

3. **rebuild**: the tree of ``export`` imported, sent into a replica's store
   (``cdpfs send | cdpfs receive``), which ``cdpfs replica serve`` serves on
   loopback (mutual TLS); ``cdpfs rebuild NEW --from 127.0.0.1:PORT`` makes the
   volume again in an empty store (with only its TLS identity), against ``rsync -a``
   of the native tree from an rsync daemon on loopback into an empty directory,
   followed by ``sync -f`` (the rebuild commits durably): seconds (target: the
   rebuild within 1.2x of rsync's time) and bytes over the connection (the
   rebuild's as it reports them; rsync's "Total bytes received"; target: fewer).
   Checked, untimed: the rebuilt store's tree hash is the source's (the rebuild
   checks it against the sender's too), and rsync's copy matches the tree.

More sections add a function to ``SECTIONS``.

Usage: ``python bench/backup.py [--quick] [--repeat N] [--only export,send,rebuild]
[--markdown FILE] [--dir DIR] [--keep] [-v]``. ``--quick``: a 128 MiB tree (and
1,000 points). Needs GNU tar and rsync. The work directory (under ``--dir``,
default /var/tmp: not tmpfs) is removed unless ``--keep``. Exit status 1 if
anything failed or read back wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import free_port, stop_process, wait_until
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

from cdpfs.replication.stream import hash_at
from cdpfs.store import blocks, journal
from cdpfs.store.lmdb import Store
from cdpfs.store.refs import Refs
from cdpfs.store.schema import ROOT_INO, U64
from cdpfs.testing import LiveStore

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
        """Each section in a directory of its own, removed after it."""
        root = self.work
        try:
            for name in self.cfg.only:
                log.info("section %s", name)
                self.work = root / name
                self.work.mkdir()
                try:
                    SECTIONS[name](self)
                finally:
                    shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self.work = root


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


def make_tree(root: Path, size: int, small_files: int | None = None) -> tuple[int, int]:
    """About ``size`` bytes of files under ``root``: (files, bytes). Half of it text
    in 8 MiB files, three eighths incompressible files of 24 MiB, an eighth small
    files of 1-16 KiB; with ``small_files``, that many small files instead, and the
    incompressible files take what is left (the same tree otherwise)."""
    rng = random.Random(20)
    text, _, _ = make_text(size // 2)
    files = total = 0
    if small_files is None:
        media = [24 * MiB] * (size * 3 // 8 // (24 * MiB))
    else:
        rest = size - len(text) - small_files * 8704  # the small files' mean size
        media = [24 * MiB] * (rest // (24 * MiB)) + [rest % (24 * MiB)] * bool(rest % (24 * MiB))

    def put(path: Path, data: bytes) -> None:
        nonlocal files, total
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files += 1
        total += len(data)

    chunk = 8 * MiB
    for i in range(len(text) // chunk):  # half of it text in 8 MiB files
        put(root / "text" / f"part{i:03d}.py", text[i * chunk:(i + 1) * chunk])
    for i, n in enumerate(media):  # incompressible
        put(root / "media" / f"blob{i:02d}.bin", rng.randbytes(n))
    small = size // 8
    i = 0
    while (small > 0) if small_files is None else (i < small_files):  # 100 to a directory
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


class Mirror:
    """Changes made through the library to a store (in-process, as a mount makes
    them: each call a journal record) and the same bytes and names changed in the
    native tree beside it."""

    def __init__(self, store: Path, tree: Path) -> None:
        self.live = LiveStore(store, existing=True)
        self.tree = tree
        self.dirs: dict[Path, int] = {Path("."): ROOT_INO}

    def _lookup(self, parent: int, name: bytes) -> int:
        ino = self.live.fs.view.lookup(parent, name)
        if ino is None:
            raise BenchError(f"{name!r} is not in the store")
        return int(ino)

    def _dir(self, rel: Path) -> int:
        ino = self.dirs.get(rel)
        if ino is None:
            ino = self.dirs[rel] = self.live(self._lookup, self._dir(rel.parent),
                                             os.fsencode(rel.name))
        return ino

    def write(self, rel: Path, off: int, data: bytes) -> None:
        live = self.live
        ino = live(self._lookup, self._dir(rel.parent), os.fsencode(rel.name))
        fh = live(live.fs.open, ino, os.O_RDWR)
        live(live.fs.write, fh, off, data)
        live(live.fs.release, fh)
        with open(self.tree / rel, "r+b") as f:
            f.seek(off)
            f.write(data)

    def rename(self, rel: Path, new: Path) -> None:
        parent = self._dir(rel.parent)
        self.live(self.live.fs.rename, parent, os.fsencode(rel.name), parent,
                  os.fsencode(new.name), 0)
        os.rename(self.tree / rel, self.tree / new)

    def close(self) -> None:
        self.live.sync()
        self.live.close()


def churn(mirror: Mirror, count: int, rng: random.Random) -> None:
    """``count`` small changes to the small files (each a record): writes of 16-511
    random bytes inside a file, and every fourth a rename within its directory."""
    tree = mirror.tree
    names = sorted(p.relative_to(tree) for p in (tree / "src").rglob("*.py"))
    for i in range(count):
        k = rng.randrange(len(names))
        rel = names[k]
        if i % 4 == 3:
            new = rel.with_name(f"{rel.stem.split('-')[0]}-{i}.py")
            mirror.rename(rel, new)
            names[k] = new
        else:
            n = rng.randrange(16, 512)
            size = (tree / rel).stat().st_size
            mirror.write(rel, rng.randrange(0, max(1, size - n)), rng.randbytes(n))
        if i % 1000 == 999:
            mirror.live.sync()


def change_share(mirror: Mirror, share: float, total: int, rng: random.Random) -> int:
    """Overwrite ``share`` of ``total`` bytes with new random bytes: ranges of two
    blocks, block-aligned, none twice, in the large files (text and media), each
    range one write; the bytes written."""
    tree, bs = mirror.tree, mirror.live.store.block_size
    big = sorted(p.relative_to(tree) for d in ("text", "media") for p in (tree / d).iterdir())
    nblocks = {rel: (tree / rel).stat().st_size // bs for rel in big}
    taken: set[tuple[Path, int]] = set()
    done = 0
    while done < share * total:
        rel = rng.choice(big)
        if nblocks[rel] < 2:
            continue
        b = rng.randrange(nblocks[rel] - 1)
        if (rel, b) in taken or (rel, b + 1) in taken:
            continue
        taken.update({(rel, b), (rel, b + 1)})
        mirror.write(rel, b * bs, rng.randbytes(2 * bs))
        done += 2 * bs
    return done


def store_counts(path: Path) -> tuple[int, int, int, int]:
    """(journal records, points, the newest record, used bytes) of the store at ``path``."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        return (journal.count(store, txn), int(txn.stat(store.db["timeidx"])["entries"]),
                journal.top(store, txn), store.used_bytes())


def stored_keys(path: Path) -> tuple[set[bytes], set[int]]:
    """The hashes of the blocks and the ids of the packs the store at ``path`` holds."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        have = set(txn.cursor(db=store.db["blocks"]).iternext(values=False))
        packs = {U64.unpack(k)[0] for k in
                 txn.cursor(db=store.db["packs"]).iternext(values=False)}
        return have, packs


def new_stored(path: Path, after: int, had: tuple[set[bytes], set[int]]) -> tuple[int, int, int]:
    """(stored bytes, blocks, packs) of what the records after ``after`` reference that
    is not in ``had`` (``stored_keys`` before them): as the store keeps it, compressed."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        refs = Refs()
        refs.add_records(journal.records(store, txn, after + 1))
        sizes = [blocks.stored(store, txn, k) for k in refs.blocks if k not in had[0]]
        packs = [blocks.stored_pack(store, txn, p) for p in refs.packs if p not in had[1]]
        if any(v is None for v in sizes + packs):
            raise BenchError("a block or pack a new record references is not stored")
        return (sum(len(v) for v in sizes + packs if v is not None), len(sizes), len(packs))


def rsync_bytes(src: Path, dst: Path, *options: str) -> tuple[int, int]:
    """``rsync -a --stats OPTIONS src/ dst/``: (total bytes sent, received)."""
    proc = subprocess.run(["rsync", "-a", "--stats", *options, f"{src}/", f"{dst}/"],
                          capture_output=True, text=True)
    sent = re.search(r"Total bytes sent: ([\d,]+)", proc.stdout)
    got = re.search(r"Total bytes received: ([\d,]+)", proc.stdout)
    if proc.returncode != 0 or sent is None or got is None:
        raise BenchError(f"rsync failed ({proc.returncode}): {proc.stderr[-500:]}")
    return int(sent.group(1).replace(",", "")), int(got.group(1).replace(",", ""))


def send_section(bench: Bench) -> None:
    """Full send and receive of a ~1 GiB volume with 10,000 points against ``cp`` of
    its store file, and an incremental send after a 1% change against the changed
    blocks' stored size and ``rsync`` (see the module docstring)."""
    cfg, work = bench.cfg, bench.work
    want_points = 1_000 if cfg.quick else 10_000
    tree = work / "tree"
    files, nbytes = make_tree(tree, cfg.size, small_files=want_points // 10)
    source = work / "source.tar"
    sh("tar", "--format=posix", "-cf", source, "-C", tree, ".")
    store = work / "vol.store"
    sh(CLI, "import", "-", store, stdin=source)
    source.unlink()
    imported, _, import_top, _ = store_counts(store)
    had = stored_keys(store)
    rng = random.Random(21)
    started = time.perf_counter()
    mirror = Mirror(store, tree)
    try:
        churn(mirror, want_points - imported, rng)
    finally:
        mirror.close()
    churned = time.perf_counter() - started
    records, points, base, used = store_counts(store)
    # the small changes alone as an increment: their records weigh against their bytes
    small = work / "small.stream"
    sh(CLI, "send", store, "--from", f"#{import_top}", "-o", small)
    small_bytes = small.stat().st_size
    small.unlink()
    small_new, small_blocks, small_packs = new_stored(store, import_top, had)
    data_mdb = store / "data.mdb"
    log.info("volume: %d files, %.0f MiB; %d records, %d points; %.0f MiB used", files,
             nbytes / MiB, records, points, used / MiB)

    stream, copy, copied = work / "full.stream", work / "copy.store", work / "cp.mdb"

    def send_full() -> float:
        stream.unlink(missing_ok=True)
        return sh(CLI, "send", store, "-o", stream)

    def receive_full() -> float:
        sh("rm", "-rf", copy)
        return sh(CLI, "receive", copy, "-i", stream)

    def cp_store() -> float:
        copied.unlink(missing_ok=True)
        return sh("cp", data_mdb, copied) + sh("sync", copied)

    t_send, t_receive, t_cp = best(cfg, send_full, receive_full, cp_store)
    stream_bytes = stream.stat().st_size
    bench.rows.append(Figure("send", "full send to a file, fsynced (MB/s of store used)",
                             "MB/s", used / t_send / MB, used / t_cp / MB, "cp + sync",
                             "send/cp"))
    bench.rows.append(Figure("send", "full receive from the file (MB/s of store used)",
                             "MB/s", used / t_receive / MB, used / t_cp / MB, "cp + sync",
                             "receive/cp"))
    bench.rows.append(Figure("send", "full stream's size against the store's used bytes",
                             "MiB", stream_bytes / MiB, used / MiB, "store used",
                             "stream/store"))
    bench.rows.append(Figure("send", "incremental send of the small changes, against their "
                             "stored size", "MB", small_bytes / MB, small_new / MB,
                             "their blocks and packs", "inc/changed"))
    cpu = {name: min(CPU[name]) for name in ("send_full", "receive_full", "cp_store")}
    bench.notes.append(
        f"send: a volume of {files} files, {nbytes / MiB:.0f} MiB, {records} records "
        f"({imported} of the import, {records - imported} small changes made in-process "
        f"in {churned:.1f}s), {points} of them points; the store uses {used / MiB:.0f} MiB "
        f"(data.mdb {data_mdb.stat().st_size / MiB:.0f} MiB); the full stream "
        f"{stream_bytes / MiB:.0f} MiB. Seconds (best of {cfg.repeat}): send {t_send:.1f}, "
        f"receive {t_receive:.1f}, cp + sync {t_cp:.1f}; CPU seconds (user + system, least "
        f"of the runs): send {cpu['send_full']:.1f}, receive {cpu['receive_full']:.1f}, cp + "
        f"sync {cpu['cp_store']:.1f}. The small changes' increment (#{import_top} to "
        f"#{base}): {small_bytes:,} bytes against {small_blocks} new blocks and "
        f"{small_packs} new packs, {small_new:,} bytes stored")
    copied.unlink()
    stream.unlink()

    # --- incremental: 1% of the tree's bytes changed ---
    old, old_whole = work / "old", work / "old-whole"
    for dest in (old, old_whole):
        sh("cp", "-a", tree, dest)
    had = stored_keys(store)
    mirror = Mirror(store, tree)
    try:
        changed = change_share(mirror, 0.01, nbytes, rng)
    finally:
        mirror.close()
    _, _, after, _ = store_counts(store)
    inc = work / "inc.stream"
    t_inc = sh(CLI, "send", store, "--from", f"#{base}", "-o", inc)
    inc_bytes = inc.stat().st_size
    new_bytes, new_blocks, new_packs = new_stored(store, base, had)
    sent, received = rsync_bytes(tree, old, "--no-whole-file")
    sent_whole, _ = rsync_bytes(tree, old_whole)
    bench.rows.append(Figure("send", "incremental send after a 1% change, against the "
                             "changed blocks' stored size", "MB", inc_bytes / MB,
                             new_bytes / MB, "changed blocks", "inc/changed", ratio_max=1.1))
    bench.rows.append(Figure("send", "incremental send after a 1% change, against rsync",
                             "MB", inc_bytes / MB, sent / MB, "rsync --no-whole-file",
                             "inc/rsync"))
    t_inc_receive = sh(CLI, "receive", copy, "-i", inc)
    bench.notes.append(
        f"send: the 1% change: {changed / MiB:.1f} MiB of new random bytes in "
        f"{after - base} writes (records #{base + 1} to #{after}); they reference "
        f"{new_blocks} new blocks and {new_packs} new packs, {new_bytes:,} bytes stored; the "
        f"incremental stream {inc_bytes:,} bytes (sent in {t_inc:.1f}s, received into the "
        f"copy in {t_inc_receive:.1f}s). rsync -a --no-whole-file: {sent:,} bytes sent, "
        f"{received:,} received; rsync -a (whole files, its local default): {sent_whole:,} "
        f"bytes sent")
    # checked, untimed: the copy is the volume; the volume is the native tree
    with Store(store, readonly=True) as a, Store(copy, readonly=True) as b:
        if hash_at(a, after) != hash_at(b, after):
            bench.errors.append("send: the copy's tree hash differs from the source's")
    inc.unlink()
    for path in (copy, old, old_whole):
        sh("rm", "-rf", path)
    export = work / "export.tar"
    sh(CLI, "export", store, "--at", "now", "-o", export)
    proc = subprocess.run(["tar", "--compare", "-f", str(export), "-C", str(tree)],
                          capture_output=True, text=True)
    differ = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.strip() and "Mod time differs" not in line]
    if proc.returncode not in (0, 1) or differ:
        bench.errors.append(f"send: the volume differs from the native tree: "
                            f"{' / '.join(differ[:5])[-500:]}")
    export.unlink()


def rebuild_section(bench: Bench) -> None:
    """A rebuild of a ~1 GiB volume from its replica's server over loopback against
    ``rsync -a`` of the native tree from an rsync daemon (see the module docstring)."""
    cfg, work = bench.cfg, bench.work
    tree = work / "tree"
    files, nbytes = make_tree(tree, cfg.size)
    source = work / "source.tar"
    sh("tar", "--format=posix", "-cf", source, "-C", tree, ".")
    store, replica, target = work / "vol.store", work / "replica.store", work / "new.store"
    sh(CLI, "import", "-", store, stdin=source)
    source.unlink()
    stream = work / "full.stream"
    sh(CLI, "send", store, "-o", stream)
    sh(CLI, "receive", replica, "-i", stream)
    stream.unlink()
    identity = work / "identity"  # the new machine's TLS identity, kept for each run
    sh(CLI, "replica", "keygen", identity, "--name", "primary")
    sh(CLI, "replica", "keygen", replica, "--name", "r1")
    sh(CLI, "replica", "trust", identity, replica / "tls" / "node.crt", "--name", "r1")
    sh(CLI, "replica", "trust", replica, identity / "tls" / "node.crt", "--name", "primary")
    port, rport = free_port(), free_port()
    server_log, rsyncd_log = work / "serve.log", work / "rsyncd.log"
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nlog file = {rsyncd_log}\npid file = {work}/rsyncd.pid\n"
                    f"[tree]\n  path = {tree}\n  read only = yes\n  uid = root\n"
                    "  gid = root\n")
    with open(server_log, "wb") as out:
        server = subprocess.Popen([CLI, "replica", "serve", str(replica), "--listen",
                                   f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=out)
    rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                               "--address=127.0.0.1", f"--port={rport}"],
                              stdin=subprocess.DEVNULL)
    native = work / "native"
    got: dict[str, int] = {}
    try:
        wait_until(lambda: b" listening on " in server_log.read_bytes() or
                   server.poll() is not None, timeout=60, what="the replica server")
        if server.poll() is not None:
            raise BenchError(f"replica serve failed: {server_log.read_text()[-500:]}")

        def rebuild() -> float:
            sh("rm", "-rf", target)
            sh("cp", "-a", identity, target)
            sh("sync")  # untimed: neither side flushes what came before it
            started = time.perf_counter()
            proc = subprocess.run([CLI, "rebuild", str(target), "--from",
                                   f"127.0.0.1:{port}", "--progress", "none"],
                                  capture_output=True, text=True)
            took = time.perf_counter() - started
            moved = re.search(r"received \d+ records, ([\d.]+) MiB", proc.stdout)
            if proc.returncode != 0 or not moved:
                raise BenchError(f"rebuild failed: {proc.stdout}{proc.stderr}"[-500:])
            got["rebuild"] = int(float(moved[1]) * MiB)
            return took

        def rsync() -> float:
            sh("rm", "-rf", native)
            native.mkdir()
            sh("sync")
            started = time.perf_counter()
            proc = subprocess.run(["rsync", "-a", "--stats", f"rsync://127.0.0.1:{rport}/tree/",
                                   f"{native}/"], capture_output=True, text=True)
            sh("sync", "-f", native)
            took = time.perf_counter() - started
            moved = re.search(r"Total bytes received: ([\d,]+)", proc.stdout)
            if proc.returncode != 0 or not moved:
                raise BenchError(f"rsync failed: {proc.stdout}{proc.stderr}"[-500:])
            got["rsync"] = int(moved[1].replace(",", ""))
            return took

        wait_until(lambda: subprocess.run(["rsync", f"rsync://127.0.0.1:{rport}/"],
                                          capture_output=True).returncode == 0,
                   timeout=30, what="the rsync daemon")
        t_rebuild, t_rsync = best(cfg, rebuild, rsync)
    finally:
        stop_process(server)
        stop_process(rsyncd)
    bench.rows.append(Figure("rebuild", "rebuild from the replica over loopback, seconds",
                             "s", t_rebuild, t_rsync, "rsync -a + sync", "rebuild/rsync",
                             ratio_max=1.2))
    bench.rows.append(Figure("rebuild", "bytes over the connection", "MB",
                             got["rebuild"] / MB, got["rsync"] / MB, "rsync -a",
                             "rebuild/rsync", ratio_max=1.0))
    cpu = {name: min(CPU[name]) for name in ("rebuild", "rsync")}
    bench.notes.append(
        f"rebuild: a tree of {files} files, {nbytes / MiB:.0f} MiB; seconds (best of "
        f"{cfg.repeat}): rebuild {t_rebuild:.1f}, rsync -a + sync {t_rsync:.1f}; CPU seconds "
        f"of the command (user + system, least of the runs; not the servers'): rebuild "
        f"{cpu['rebuild']:.1f}, rsync {cpu['rsync']:.1f}")
    # checked, untimed: the rebuilt volume is the source; rsync's copy is the tree
    with Store(store, readonly=True) as a, Store(target, readonly=True) as b:
        with a.txn() as ta, b.txn() as tb:
            top, rebuilt_top = journal.top(a, ta), journal.top(b, tb)
        if rebuilt_top != top or hash_at(a, top) != hash_at(b, top):
            bench.errors.append("rebuild: the rebuilt store is not the source's volume")
    proc = subprocess.run(["diff", "-r", "-q", str(tree), str(native)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        bench.errors.append(f"rebuild: rsync's copy differs: {proc.stdout[-300:]}")
    for path in (target, replica, native, store):
        sh("rm", "-rf", path)


SECTIONS: dict[str, Callable[[Bench], None]] = {"export": export_section,
                                                "send": send_section,
                                                "rebuild": rebuild_section}


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Benchmark cdpfs backups: export of a state, "
                                "send and receive.")
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
