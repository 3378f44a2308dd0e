"""The archive commands: ``export`` a past state as a tar, ``import`` a tar as a new volume.

``export`` reads the store (a store directory, a replica's while it receives, or
the store of a live mount, which first commits what it has) without taking its
writer lock; the moment is held while it reads. An archive written to a file
goes to a temporary name beside it and is renamed into place once complete, so
no half archive is ever left under the name asked for.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

import click

from cdpfs import system
from cdpfs.errors import CdpfsError
from cdpfs.history.moments import parse as parse_moment
from cdpfs.names import shown

from .locate import locate

TMP_INFIX = ".export-"  # .NAME.export-PID.tmp: an archive being written

PROGRESS = click.option(
    "--progress", type=click.Choice(["auto", "json", "none"]), default="auto",
    show_default=True,
    help="auto: a bar (bytes/s, ETA) when standard error is a terminal, nothing "
         "otherwise; json: one line of JSON a second on standard error, then a last "
         "one with \"done\"; none: nothing.")


def _when(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts / 1e9).isoformat(sep=" ", timespec="milliseconds")


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the command as an error does: what it made is taken back."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise CdpfsError(f"stopped by {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Output:
    """Where an archive goes: standard output; a FIFO or device written in place
    (with --force); or a regular file, written under a temporary name beside it and
    renamed over the name asked for once complete (never over an existing file
    without --force)."""

    def __init__(self, spec: str, force: bool) -> None:
        self.force = force
        self.path: Path | None = None if spec == "-" else Path(spec)
        self.tmp: Path | None = None
        self.in_place = False
        self.file: IO[bytes] | None = None
        if self.path is None:
            if sys.stdout.isatty():
                raise CdpfsError("will not write an archive to a terminal (-o FILE, or "
                                 "redirect standard output)")
            return
        try:
            os.lstat(self.path)  # a link to nothing, or to a link loop, is something
        except FileNotFoundError:
            exists = False
        except OSError as exc:
            raise CdpfsError(f"{shown(self.path)}: {exc.strerror}") from None
        else:
            exists = True
        if exists:
            if not force:
                raise CdpfsError(f"{shown(self.path)}: exists (--force replaces it)")
            try:
                st = os.stat(self.path)
            except OSError:  # a link that leads nowhere: replaced like a file
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise CdpfsError(f"{shown(self.path)}: is a directory")
            self.in_place = st is not None and not stat.S_ISREG(st.st_mode)
        parent = self.path.parent
        if not parent.is_dir():
            raise CdpfsError(f"{shown(parent)}: no such directory")

    @property
    def name(self) -> str:
        return "standard output" if self.path is None else shown(self.path)

    def __enter__(self) -> IO[bytes]:
        if self.path is None:
            self.file = sys.stdout.buffer
        elif self.in_place:
            self.file = open(self.path, "wb")
        else:
            _clear_leftovers(self.path)
            self.tmp = self.path.parent / f".{self.path.name}{TMP_INFIX}{os.getpid()}.tmp"
            try:
                self.file = open(self.tmp, "xb")
            except OSError as exc:
                raise CdpfsError(f"{shown(self.tmp)}: {exc.strerror}") from None
        return self.file

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        assert self.file is not None
        if self.path is None:
            if kind is None:
                self.file.flush()
            return
        try:
            if kind is None:
                self.file.flush()
                if not self.in_place:
                    os.fsync(self.file.fileno())
        finally:
            self.file.close()
            if kind is not None and self.tmp is not None:
                self.tmp.unlink(missing_ok=True)
        if kind is None and self.tmp is not None:
            self._put_in_place(self.tmp, self.path)

    def _put_in_place(self, tmp: Path, path: Path) -> None:
        try:
            if self.force:
                os.replace(tmp, path)
            else:
                try:  # a link is made only where nothing is: no race with another writer
                    os.link(tmp, path)
                except FileExistsError:
                    raise CdpfsError(f"{shown(path)}: appeared during the export; the "
                                     "archive is not kept (--force replaces it)") from None
                except OSError:  # a filesystem without hard links
                    if os.path.lexists(path):
                        raise CdpfsError(f"{shown(path)}: appeared during the export; the "
                                         "archive is not kept") from None
                    os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        system.fsync_dir(path.parent)


def _clear_leftovers(path: Path) -> None:
    """Remove temporary archives killed exports to ``path`` left beside it."""
    prefix = f".{path.name}{TMP_INFIX}"
    try:
        names = [e.name for e in os.scandir(path.parent)
                 if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not system.pid_alive(int(pid)):
            (path.parent / name).unlink(missing_ok=True)


@click.command("export")
@click.argument("volume", type=click.Path(path_type=Path), metavar="STORE|MOUNTPOINT")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--at", "at", required=True, metavar="MOMENT",
              help="The state to export: a time, -15m, #seq, bookmark or now.")
@click.option("-o", "--output", required=True, metavar="FILE|-",
              help="Write the archive to FILE (or - for standard output).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@PROGRESS
def export_cmd(volume: Path, paths: tuple[str, ...], at: str, output: str,
               force: bool, progress: str) -> None:
    """Write the volume as it was AT as a PAX tar archive: all of it, or the PATHs
    (relative to the volume's root, or paths in its mount). Owners, modes, times to the nanosecond,
    extended attributes, hard links, sparse files (holes stay holes), symlinks,
    FIFOs and devices are kept; GNU tar (--xattrs --xattrs-include='*' -xpf) and
    bsdtar (-xpf) restore them. The moment is held while the export reads it.
    Works on a replica store while it receives."""
    from cdpfs.history.export import export_volume
    from cdpfs.progress import Progress

    target = locate(volume)
    if target.rel:
        raise CdpfsError(f"{shown(volume)}: give the store or the mount point, not a path "
                         "inside it; PATHs (relative to the volume root) say what to export")
    parse_moment(at)  # a malformed moment fails before anything is opened
    if target.mount is not None:  # a path in the mount names the same path in the volume
        mnt = os.fsencode(target.mount)
        paths = tuple(os.fsdecode(os.path.relpath(p, mnt))
                      if os.path.abspath(p).startswith(mnt + b"/") else p
                      for p in map(os.fsencode, paths))
    out = _Output(output, force)
    started = time.monotonic()
    with _stop_on_sigterm():
        target.settle()  # a live mount commits what it has first
        try:
            with Progress(progress, "export") as bar:
                point, result = export_volume(target.store, at, out, paths, progress=bar)
        except BrokenPipeError:
            # Whoever read standard output went away: say so once, and let
            # nothing else write to the closed pipe on the way out.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise CdpfsError("the reader of the archive went away before it was "
                             "complete (broken pipe)") from None
    took = max(time.monotonic() - started, 1e-9)
    parts = [f"{result.entries} entries", f"{result.files} files"
             + (f" ({result.sparse} sparse)" if result.sparse else ""),
             f"{result.links} hard links",
             f"{result.data_bytes / 2**20:.1f} MiB of data in a {result.tar_bytes / 2**20:.1f} "
             f"MiB archive"]
    if result.skipped:
        parts.append(f"{result.skipped} sockets left out (tar cannot hold them)")
    rate = f" ({result.tar_bytes / took / 1e6:.0f} MB/s)" if result.tar_bytes >= 2**20 else ""
    click.echo(f"exported #{point.seq} ({_when(point.ts)}) to {out.name}: {', '.join(parts)} "
               f"in {took:.1f}s{rate}", err=out.path is None)


@click.command("import")
@click.argument("archive", metavar="FILE.tar|-")
@click.argument("store", type=click.Path(path_type=Path))
@PROGRESS
def import_cmd(archive: str, store: Path, progress: str) -> None:
    """Make a new volume in STORE (a missing or empty directory) from a tar archive
    (GNU, PAX or bsdtar's; gzip, bzip2 or xz compressed too; - for standard input).
    Owners (by number), modes, times, extended attributes, hard links, symlinks,
    sparse files, FIFOs and devices are kept. Names that would leave the volume
    (absolute, with '..', or through a symbolic link in the archive) are refused,
    and so is a truncated or damaged archive; STORE is then left as it was."""
    from cdpfs.fs.tarimport import import_tar
    from cdpfs.mount.control import check_source
    from cdpfs.progress import Progress

    check_source(Path(os.path.abspath(store)))  # a store that could never be mounted
    started = time.monotonic()
    with _stop_on_sigterm(), _input(archive) as source, Progress(progress, "import") as bar:
        result = import_tar(source, store, label="standard input" if archive == "-"
                            else archive, progress=bar.advance)
    took = time.monotonic() - started
    for line in result.warnings:
        click.echo(f"cdpfs: warning: {shown(line)}", err=True)
    if result.dropped:
        click.echo(f"cdpfs: warning: and {result.dropped} more (see the log with -v)",
                   err=True)
    click.echo(f"imported {shown(archive)} into {shown(result.path)}: {result.entries} "
               f"entries ({result.files} files, {result.dirs} directories, "
               f"{result.symlinks} symlinks, {result.links} hard links, {result.special} "
               f"FIFOs and devices), {result.data_bytes / 2**20:.1f} MiB of data in "
               f"{took:.1f}s")


@contextlib.contextmanager
def _input(archive: str, what: str = "an archive") -> Iterator[IO[bytes]]:
    if archive == "-":
        if sys.stdin.isatty():
            raise CdpfsError(f"will not read {what} from a terminal (give a file, or "
                             "redirect standard input)")
        yield sys.stdin.buffer
        return
    try:
        # Not blocking on a FIFO no one writes to (it then reads as empty); a pipe
        # that is written to (a shell's <(...)) reads as any file.
        fd = os.open(archive, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise CdpfsError(f"{shown(archive)}: {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise CdpfsError(f"{shown(archive)}: is a directory")
    os.set_blocking(fd, True)
    with open(fd, "rb") as f:
        yield f


COMMANDS = [export_cmd, import_cmd]
