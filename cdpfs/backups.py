"""Backups of a volume into a directory, each checked against its point before it counts.

A backup (``make``) is the volume as of its newest point, written beside the others
in a directory: as a send stream of its whole kept history (``send``:
``replication.stream``, the tree hash of the point in its END) or as a tar of the
point (``tar``: ``history.export``; sockets, which a tar cannot hold, are left
out). It goes first to a temporary file there (``.cdpfs-backup-<pid>-...``),
synced; then it is **verified**: read back into a scratch store made in a
temporary directory there (a stream received, a tar imported), whose tree hash at
the point must be the volume's; the scratch store is removed. Only then is the
file renamed to its backup name, ``<volume id, 8 characters>-<UTC time of the
point>.cdpfs`` (or ``.tar``; the point's record time to the nanosecond: one name
per point), with its record beside it in
``NAME.json`` (``Backup``: volume, point, format, size, tree hash, whether it
verified, when it was made and how long it took, the blake3 of the file as read
back). A backup that fails at any step leaves no file under a backup name: what it
made is removed (a killed one's, by the next backup in that directory), it is
logged, and the store records it as failed.

With ``keep`` N, the oldest verified backups of the volume beyond the newest N are
deleted once a new one has verified; unverified files (no record beside them, or
changed since) are never counted nor deleted. The store keeps, in its settings,
the last backup made or failed (``config.backup``) and the newest verified one
(``config.backup_verified``), with the period of the schedule that made them
(``replica serve --backup-every``), for ``cdpfs status`` and the next scheduled
run. ``listing`` is what ``cdpfs backups DIR`` shows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, get_type_hints

import blake3

from . import system
from .errors import CdpfsError
from .fs.tarimport import import_tar
from .history.export import export_tar, held
from .history.treehash import tree_hash
from .replication import stream
from .store import journal
from .store.lmdb import Store

log = logging.getLogger(__name__)

FORMATS = ("send", "tar")
SUFFIX = {"send": ".cdpfs", "tar": ".tar"}
RECORD = ".json"  # a backup's record: NAME + RECORD beside it
TEMP = ".cdpfs-backup-"  # what a backup under way makes in the directory: TEMP<pid>-...
SETTING = "backup"  # the last backup made or failed, in the store's settings
VERIFIED = "backup_verified"  # the newest verified backup, likewise
_NAME = re.compile(r"([0-9a-f]{8})-(\d{8}T\d{6})\.(\d{9})Z(\.[a-z]+)")
_READ = 1 << 20


class BackupError(CdpfsError):
    """A backup that cannot be made, or a backup directory that cannot be read (one line)."""


@dataclass(slots=True)
class Backup:
    """One backup: its record beside the file, and what the store keeps of its last.

    Attributes:
        volume: the volume's id.
        seq, point_ts: the point backed up (its record and that record's time, ns).
        format: ``send`` or ``tar``.
        made_at: when the backup started (ns since the epoch).
        seconds: how long it took, writing and verifying.
        size: the file's size in bytes.
        tree: the tree hash of the volume at the point (a tar's without sockets).
        verified: read back, it gave that tree at that point.
        path: the backup file ("" for a failed one).
        file_hash: blake3 of the file as read back to verify it.
        failed: why it failed ("" if it did not).
        every: seconds between scheduled backups (``replica serve --backup-every``), or 0.
    """

    volume: str
    seq: int
    point_ts: int
    format: str
    made_at: int
    seconds: float = 0.0
    size: int = 0
    tree: str = ""
    verified: bool = False
    path: str = ""
    file_hash: str = ""
    failed: str = ""
    every: int = 0
    left_out: int = 0  # sockets, which a tar cannot hold

    @classmethod
    def of(cls, raw: Any) -> Backup:
        """From a record as saved (keys this version does not know are left out);
        ValueError if it is not one (a record damaged or made by hand)."""
        if not isinstance(raw, dict):
            raise ValueError("a backup's record is a JSON object")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        for name, value in values.items():
            want = _TYPES[name]
            if not isinstance(value, want) or isinstance(value, bool) != (want is bool) or \
                    (isinstance(value, int | float) and not 0 <= value < 2**63):
                raise ValueError(f"a backup's record with {name}={value!r}")
        try:
            return cls(**values)
        except TypeError:
            raise ValueError("a backup's record without its point") from None


_TYPES: dict[str, type | tuple[type, ...]] = {
    name: (int, float) if kind is float else kind
    for name, kind in get_type_hints(Backup).items()}


@dataclass(frozen=True, slots=True)
class Listed:
    """A backup file in a directory, with its record (None if it has none)."""

    path: Path
    record: Backup | None
    size: int  # on disk now

    @property
    def verified(self) -> bool:
        """Verified when made, and the same size now."""
        return self.record is not None and self.record.verified and \
            self.size == self.record.size

    def state(self) -> str:
        """Whether it verified, in words."""
        if self.record is None:
            return "not verified (no record beside it)"
        if not self.record.verified:
            return "not verified"
        if self.size != self.record.size:
            return f"CHANGED since it verified ({self.size} bytes, {self.record.size} then)"
        return "verified"


@dataclass(frozen=True, slots=True)
class Schedule:
    """What a store keeps of its backups: the last one made or failed, the newest
    verified one."""

    last: Backup | None
    verified: Backup | None

    @property
    def every(self) -> int:
        return self.last.every if self.last is not None else 0

    def overdue(self, now_ns: int) -> bool:
        """Whether two scheduled backups have been missed: no verified backup made
        within two periods (counted from the last attempt when none verified yet)."""
        since = self.verified or self.last
        return bool(self.every) and since is not None and \
            now_ns - since.made_at > 2 * self.every * 10**9


def point_stamp(ts: int) -> str:
    """A point's record time in a file name: UTC to the nanosecond, no colons."""
    when = dt.datetime.fromtimestamp(ts // 10**9, dt.UTC)
    return f"{when.strftime('%Y%m%dT%H%M%S')}.{ts % 10**9:09d}Z"


def name_of(volume: str, point_ts: int, fmt: str) -> str:
    """The file name of a backup of ``volume`` at the point stamped ``point_ts``."""
    return f"{volume[:8]}-{point_stamp(point_ts)}{SUFFIX[fmt]}"


# --- making one -----------------------------------------------------------------------


def backup(path: Path, directory: Path, *, fmt: str = "send", keep: int = 0,
           every: int = 0) -> Backup:
    """``make`` a backup of the store at ``path`` (a replica being served, a primary
    being mounted: read beside them) into ``directory``; BackupError (one line) if
    it failed."""
    _check_directory(directory)
    with Store(path) as store:
        if store.clone_of is not None:
            raise BackupError(f"{path} is a clone: back up its base (a clone's history "
                              "below its point is its base's)")
        made = make(store, directory, fmt=fmt, keep=keep, every=every)
    if not made.verified:
        raise BackupError(f"backup of {path} failed: {made.failed}")
    return made


def make(store: Store, directory: Path, *, fmt: str = "send", keep: int = 0, every: int = 0,
         on_written: Callable[[Path], None] | None = None) -> Backup:
    """Back ``store`` up into ``directory`` as of its newest point, verify it, keep the
    newest ``keep`` verified ones (0: all), record it in the store; the backup, with
    ``failed`` set if it failed (logged; no file of it is left). ``on_written`` is
    called with the temporary file before it is verified (a test damages it there)."""
    if fmt not in FORMATS:
        raise BackupError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    directory = Path(os.path.abspath(directory))
    made = Backup(store.uuid, 0, 0, fmt, time.time_ns(), every=every)
    t0 = time.monotonic()
    token = secrets.token_hex(4)
    tmp = directory / f"{TEMP}{os.getpid()}-{token}{SUFFIX[fmt]}"
    try:
        _check_directory(directory)
        sweep(directory)
        with open(tmp, "xb") as out:
            _WRITERS[fmt](store, out, made)
            out.flush()
            os.fsync(out.fileno())
        made.size = tmp.stat().st_size
        if on_written is not None:
            on_written(tmp)
        made.file_hash = verify(tmp, made, directory / f"{TEMP}{os.getpid()}-{token}.verify",
                                f"the backup of #{made.seq}")
        made.verified = True
        made.seconds = time.monotonic() - t0
        final = directory / name_of(made.volume, made.point_ts, fmt)
        made.path = str(final)
        try:
            _publish(tmp, final, made)
        except BaseException:
            made.verified = False
            raise
        gone = prune_kept(directory, made.volume, keep) if keep else []
        log.info("backup of %s at #%d verified: %s, %.1f MiB in %.1fs%s", store.path,
                 made.seq, final, made.size / 2**20, made.seconds,
                 f"; deleted {len(gone)} older" if gone else "")
    except (CdpfsError, OSError) as exc:  # the caller says so (the scheduler logs it)
        made.failed = _why(exc)
        log.info("backup of %s into %s failed: %s", store.path, directory, made.failed)
    except KeyboardInterrupt:
        made.failed = "interrupted"
        log.info("backup of %s into %s interrupted", store.path, directory)
        raise
    finally:
        if not made.verified:
            made.seconds, made.path = time.monotonic() - t0, ""
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        record(store, made)
    return made


def _write_send(store: Store, out: BinaryIO, made: Backup) -> None:
    """A send stream of the whole kept history up to the newest point, its END
    carrying the tree hash there."""
    p = stream.plan(store, tree=True)
    made.seq, made.point_ts = p.ident.to_seq, p.ident.to_ts
    made.tree = stream.send_store(store, out, p).tree


def _write_tar(store: Store, out: BinaryIO, made: Backup) -> None:
    """A PAX tar of the tree at the newest point (held meanwhile), and the tree hash
    there of what a tar holds."""
    with held(store, "now") as point:
        made.seq, made.point_ts = point.seq, point.ts
        made.left_out = export_tar(store, point.seq, out).skipped
        with store.txn() as txn:
            made.tree = tree_hash(store, txn, point.seq, sockets=False)[0]


_WRITERS: dict[str, Callable[[Store, BinaryIO, Backup], None]] = {
    "send": _write_send, "tar": _write_tar}


def verify(path: Path, want: Backup, scratch: Path, what: str = "") -> str:
    """Check the backup file ``path`` against ``want`` (its format, volume, point and
    tree hash): made into a scratch store at ``scratch`` (removed after), it must
    give that tree. A send stream is received (its volume and point must be
    ``want``'s, and nothing may follow its end); a tar is imported, and the tree
    of the new volume compared. The blake3 of the file; BackupError saying why
    ``what`` (default: the file's name) does not verify."""
    what = what or path.name
    scratch.mkdir()
    try:
        with open(path, "rb") as f:
            reading = _Hashing(f)
            try:
                if want.format == "tar":
                    got = _import_tar(reading, scratch / "store", what)
                    _tar_end(path)
                else:
                    got = _receive(reading, scratch / "store", want, what)
            except CdpfsError as exc:
                raise BackupError(f"{what} does not verify: {exc}") from None
        if got != want.tree:
            raise BackupError(f"{what} does not verify: its tree hash at #{want.seq} "
                              f"is {got[:16] or 'missing'}, the volume's {want.tree[:16]}")
        return reading.digest()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _receive(reading: _Hashing, scratch: Path, want: Backup, what: str) -> str:
    """Receive a send stream into a scratch store: the tree hash at its point."""
    got = stream.receive_file(scratch, reading)
    if reading.rest():
        raise BackupError("bytes after the stream's end")
    with Store(scratch, readonly=True) as copy:
        volume = copy.uuid
    if volume != want.volume or got.to_seq != want.seq:
        raise BackupError(f"it holds volume {volume} at #{got.to_seq}, not {want.volume} "
                          f"at #{want.seq}")
    return got.tree


def _tar_end(path: Path) -> None:
    """BackupError unless what follows the tar's end marker is zeros (the padding of
    its last record, which an import reads past without looking)."""
    with tarfile.open(path, "r:") as tar:  # headers only: the data is sought past
        for _ in tar:
            pass
        end = tar.offset
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(_READ).strip(b"\0") or f.read(1):
            raise BackupError("bytes that are not zeros after the archive's end marker")


def _import_tar(reading: _Hashing, scratch: Path, what: str) -> str:
    """Import a tar into a scratch volume: the tree hash of what it holds."""
    import_tar(reading, scratch, label=what)
    reading.rest()  # the padding of its last record: hashed too
    with Store(scratch, readonly=True) as copy, copy.txn() as txn:
        return tree_hash(copy, txn, journal.last(copy, txn)[0], sockets=False)[0]


class _Hashing:
    """A file read through, hashed as it is read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hash = blake3.blake3()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def rest(self) -> int:
        """Read what is left; how many bytes that was."""
        n = 0
        while data := self.read(_READ):
            n += len(data)
        return n

    def digest(self) -> str:
        return self.hash.hexdigest()


def _publish(tmp: Path, final: Path, made: Backup) -> None:
    """Give the verified file its backup name, then its record (both durable)."""
    side = tmp.with_name(tmp.name + RECORD)
    try:
        with open(side, "w") as f:
            json.dump(asdict(made), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        os.replace(side, final.with_name(final.name + RECORD))
    finally:
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
    system.fsync_dir(final.parent)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise BackupError(f"{directory}: no such directory (backups go into an existing "
                          "directory)")
    try:
        os.fsencode(directory).decode()
    except UnicodeDecodeError:
        raise BackupError(f"{directory}: backups go into a directory whose path is valid "
                          "UTF-8 (each is checked in a scratch store made there)") from None


def sweep(directory: Path) -> list[Path]:
    """Remove what backups killed while under way left in ``directory`` (their
    temporary files and scratch stores: those of processes no longer running)."""
    gone = []
    for entry in os.scandir(directory):
        if not entry.name.startswith(TEMP):
            continue
        pid = entry.name[len(TEMP):].split("-", 1)[0]
        if not pid.isdigit() or system.pid_alive(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("removed %s, left by a backup that did not finish", path)
        gone.append(path)
    return gone


def prune_kept(directory: Path, volume: str, keep: int) -> list[Path]:
    """Delete the oldest verified backups of ``volume`` in ``directory`` beyond the
    newest ``keep`` (at least one is always kept); those deleted."""
    mine = [b for b in listing(directory) if b.verified and b.record is not None and
            b.record.volume == volume]
    gone = []
    for old in mine[:-max(1, keep)]:
        with contextlib.suppress(FileNotFoundError):
            old.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            old.path.with_name(old.path.name + RECORD).unlink()
        gone.append(old.path)
    if gone:
        system.fsync_dir(directory)
    return gone


# --- what is there ----------------------------------------------------------------------


def listing(directory: Path) -> list[Listed]:
    """The backup files in ``directory`` with their records, oldest point first;
    BackupError (one line) if it cannot be read."""
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise BackupError(f"{directory}: {exc.strerror or exc} (not a directory of "
                          "backups)") from None
    out = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(tuple(SUFFIX.values())) \
                or not entry.is_file():
            continue
        path = Path(entry.path)
        out.append(Listed(path, _read_record(path), entry.stat().st_size))
    return sorted(out, key=_order)


def _read_record(path: Path) -> Backup | None:
    try:
        return Backup.of(json.loads(system.read_small_file(path.with_name(path.name + RECORD),
                                                           1 << 16)))
    except (OSError, ValueError):  # none, or not one: the file counts as unverified
        return None


def _order(b: Listed) -> tuple[int, int, str]:
    if b.record is not None:
        return b.record.point_ts, b.record.made_at, b.path.name
    m = _NAME.fullmatch(b.path.name)
    if m is None:
        return 0, 0, b.path.name
    when = dt.datetime.strptime(m[2], "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 10**9 + int(m[3]), 0, b.path.name


# --- the store's record -----------------------------------------------------------------


def record(store: Store, made: Backup) -> None:
    """Note ``made`` in the store's settings as its last backup (and newest verified)."""
    with store.txn(write=True) as txn:
        store.set_config(txn, SETTING, asdict(made))
        if made.verified:
            store.set_config(txn, VERIFIED, asdict(made))


def schedule(store: Store) -> Schedule:
    """What ``store`` keeps of its backups."""
    with store.txn() as txn:
        last, good = store.config(txn, SETTING), store.config(txn, VERIFIED)
    return Schedule(_of(last), _of(good))


def _of(raw: Any) -> Backup | None:
    try:
        return None if raw is None else Backup.of(raw)
    except ValueError:
        log.warning("a backup's record in the store's settings is damaged: ignored")
        return None
