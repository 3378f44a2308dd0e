"""Make a new volume from a tar archive, through the live volume's own write path.

``import_tar`` reads a tar stream (GNU, PAX or bsdtar's; compressed or not: Python's
``tarfile`` reads them all, sparse formats included) one member at a time and
makes each entry with the ``FileSystem`` a mount uses (create, write, mknod,
link, setxattr, setattr), so every change is a journal record as if written
through a mount. The volume is built in a directory beside the target and moved
into place only once complete, so a failed or killed import leaves no half
volume under the target's name.

Refused, with one line, before anything is kept: a name that is absolute, holds
a ``..`` or goes through a symbolic link made by the archive, a hard link to such
a name or to nothing before it, a root name starting with ``@`` (reserved for
history), a truncated or damaged archive (one that ends without its end marker
too), and a target that exists and is not an empty directory.

What the archive says is kept: owners (the numbers; names are not looked up),
modes, times to the nanosecond (PAX ``mtime``/``atime``), extended attributes
(``SCHILY.xattr.*``, or bsdtar's ``LIBARCHIVE.xattr.*``), hard links, symlinks,
FIFOs and devices; holes of sparse members stay holes (only their data regions
are written), and so do all-zero blocks of any file. POSIX ACLs are not
(the volume refuses them): each is counted and named in the warnings.
"""

from __future__ import annotations

import base64
import logging
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from .. import system
from ..errors import CdpfsError, StoreError
from ..names import shown
from ..store.lmdb import is_store
from ..store.schema import ROOT_INO, Inode
from .engine import Engine
from .mutate import init_volume
from .vfs import FileSystem

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes of a member read and written at a time
AHEAD = 4  # chunks hashed and compressed ahead of the one being applied
MAX_WARNINGS = 20  # warnings kept in the result (all are logged)
_U32 = 2**32
_NS = 2**63  # the store keeps times as signed 64-bit nanoseconds


class ImportRefused(CdpfsError):
    """An archive the import will not make a volume of (a name that escapes the
    root, a damaged or truncated archive, a target in the way)."""


@dataclass(slots=True)
class ImportResult:
    """What an import made.

    Attributes:
        path: the store made.
        entries: archive members applied (the root's included).
        files, dirs, symlinks, links, special: of those, by kind (special: FIFOs
            and devices).
        data_bytes: bytes of file data written (holes not counted).
        warnings: what could not be kept (at most MAX_WARNINGS; ``dropped`` more).
    """

    path: Path
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    links: int = 0
    special: int = 0
    data_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    dropped: int = 0


def import_tar(source: IO[bytes], target: str | os.PathLike[str], *, label: str = "-",
               progress: Callable[[int], None] | None = None) -> ImportResult:
    """Make a new volume at ``target`` (missing, or an empty directory) holding the
    tree of the tar archive read from ``source`` (``label`` names it in errors).
    ImportRefused (one line) for what the module docstring lists; the target is
    then left as it was."""
    final = Path(os.path.abspath(target))
    _check_target(final)
    work = final.parent / f".{final.name}.import-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImportRefused(f"{shown(final.parent)}: {exc.strerror}") from None
    _clear_leftovers(final)
    try:
        store = init_volume(work)
    except StoreError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ImportRefused(str(exc)) from None
    result = ImportResult(final)
    try:
        engine = Engine(store, max_dirty=32 << 20)
        try:
            store.lock("cdpfs import")
            engine.start()
            fs = FileSystem(store, engine)
            _Importer(fs, engine, result, label, progress).run(source)
            engine.run_sync(fs.sync, durable=True)
        finally:
            store.close()
        _check_target(final)  # nothing came in the way meanwhile
        os.rename(work, final)  # over an empty directory too
        system.fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.path = final
    return result


def _check_target(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ImportRefused(f"{shown(path)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ImportRefused(f"{shown(path)}: exists and is not a directory")
    if is_store(path):
        raise ImportRefused(f"{shown(path)}: is a cdpfs store already (import makes a new "
                            "volume)")
    if any(os.scandir(path)):
        raise ImportRefused(f"{shown(path)}: exists and is not empty")


def _clear_leftovers(final: Path) -> None:
    """Remove what imports to ``final`` killed before they finished left beside it."""
    prefix = f".{final.name}.import-"
    try:
        names = [e.name for e in os.scandir(final.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not system.pid_alive(int(pid)):
            log.info("removing %s, left by an import that did not finish", name)
            shutil.rmtree(final.parent / name, ignore_errors=True)


class _Member(tarfile.TarInfo):
    """A member that notes on its archive why reading headers stopped: only a zero
    block is a proper end (``tarfile`` takes a truncated or garbled header after
    the first one for the end as well)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.cdpfs_end = None  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as exc:
            tarfile_.cdpfs_end = str(exc) or type(exc).__name__  # type: ignore[attr-defined]
            raise


class _Importer:
    """One import: members applied in order through ``fs``."""

    def __init__(self, fs: FileSystem, engine: Engine, result: ImportResult, label: str,
                 progress: Callable[[int], None] | None) -> None:
        self.fs = fs
        self.engine = engine
        self.result = result
        self.label = label
        self.progress = progress
        self.dir_times: dict[int, tuple[int | None, int]] = {}  # set last: children touch them
        self._parent: tuple[tuple[bytes, ...], int] | None = None  # the last one looked up
        self.where = shown(label)  # the member being applied, for messages

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` through the engine (a refusal names the member)."""
        try:
            return self.engine.run_sync(lambda: fn(*args, **kw))
        except ImportRefused:
            raise
        except CdpfsError as exc:
            raise ImportRefused(f"{self.where}: {exc}") from None

    def run(self, source: IO[bytes]) -> None:
        try:
            tar = tarfile.open(fileobj=source, mode="r|*", tarinfo=_Member,  # noqa: SIM115
                               encoding="utf-8", errors="surrogateescape")
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ImportRefused(f"{shown(self.label)}: not a tar archive ({exc})") from None
        tar.cdpfs_end = "no end marker"  # type: ignore[attr-defined]
        with tar:
            self._members(tar)
        end = tar.cdpfs_end  # type: ignore[attr-defined]
        if end is not None:
            raise ImportRefused(f"{shown(self.label)}: the archive is truncated or damaged "
                                f"after {self.result.entries} entries ({end})")
        for ino, (atime, mtime) in self.dir_times.items():
            self.call(self.fs.setattr, ino, atime=atime, mtime=mtime)

    def _members(self, tar: tarfile.TarFile) -> None:
        try:
            while True:
                member = tar.next()
                if member is None:
                    return
                tar.members.clear()  # a stream is read once: keep no list of members
                self.where = f"{shown(self.label)}: {shown(_raw(member.name))}"
                self._member(tar, member)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ImportRefused(f"{self.where}: the archive is truncated or damaged "
                                f"({exc})") from None
        except OSError as exc:
            raise ImportRefused(f"{self.where}: reading the archive: "
                                f"{exc.strerror or exc}") from None

    # --- names ----------------------------------------------------------------------

    def _parts(self, name: str, what: str = "name") -> list[bytes]:
        raw = _raw(name)
        if raw.startswith(b"/"):
            raise ImportRefused(f"{self.where}: an absolute {what} (refused: every name must "
                                "stay inside the volume)")
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise ImportRefused(f"{self.where}: a {what} with '..' (refused: every name must "
                                "stay inside the volume)")
        return parts

    def _lookup(self, parent: int, name: bytes) -> tuple[int, Inode] | None:
        def find() -> tuple[int, Inode] | None:
            view = self.fs.view
            ino = view.lookup(parent, name)
            node = None if ino is None else view.inode(ino)
            return None if ino is None or node is None else (ino, node)

        return self.call(find)  # type: ignore[no-any-return]

    def _dirs(self, parts: list[bytes], make: bool = True) -> int:
        """The directory at ``parts``; missing ones are made (0755, root) if ``make``.
        A symbolic link on the way is refused: nothing is followed."""
        key = tuple(parts)
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        ino = ROOT_INO
        for i, part in enumerate(parts):
            found = self._lookup(ino, part)
            shown_at = shown(b"/".join(parts[: i + 1]))
            if found is None:
                if not make:
                    raise ImportRefused(f"{self.where}: {shown_at} is not in the archive "
                                        "before it")
                self._check_root(i, part)
                ino = self._made(self.call(self.fs.mknod, ino, part, stat.S_IFDIR | 0o755,
                                           0, 0).ino)
                continue
            child, node = found
            if node.is_lnk:
                raise ImportRefused(f"{self.where}: goes through the symbolic link {shown_at} "
                                    "(refused: a name through a link could lead anywhere)")
            if not node.is_dir:
                raise ImportRefused(f"{self.where}: {shown_at} is not a directory")
            ino = child
        self._parent = (key, ino)
        return ino

    def _check_root(self, depth: int, name: bytes) -> None:
        if depth == 0 and name.startswith(b"@"):
            raise ImportRefused(f"{self.where}: names starting with '@' at the volume root "
                                "are reserved for history")

    def _made(self, ino: int) -> int:
        """A new inode's reference from mknod/create/link is not a kernel's: let it go."""
        self.call(self.fs.forget, [(ino, 1)])
        return ino

    # --- members --------------------------------------------------------------------

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self._parts(m.name)
        if not m.isdir() and not (m.isreg() or m.islnk() or m.issym() or m.ischr()
                                  or m.isblk() or m.isfifo()):
            self._warn(f"{self.where}: a member of type {m.type!r} that is not a file, "
                       "left out")
            return
        uid, gid = m.uid, m.gid
        if not (0 <= uid < _U32 and 0 <= gid < _U32):
            raise ImportRefused(f"{self.where}: owner {uid}:{gid} out of range")
        mode = stat.S_IMODE(m.mode)
        mtime = _time(m.pax_headers.get("mtime"), int(m.mtime * 10**9))
        atime = _time(m.pax_headers.get("atime"), None)
        if not parts:  # the root itself ("./")
            if not m.isdir():
                raise ImportRefused(f"{self.where}: the volume root must be a directory")
            self._xattrs(ROOT_INO, m)
            self.call(self.fs.setattr, ROOT_INO, mode=mode, uid=uid, gid=gid)
            self.dir_times[ROOT_INO] = (atime, mtime)
            self.result.entries += 1
            self.result.dirs += 1
            return
        self._check_root(len(parts) - 1, parts[0])
        parent = self._dirs(parts[:-1])
        name = parts[-1]
        found = self._lookup(parent, name)
        if found is not None:
            if m.isdir() and found[1].is_dir:
                ino = found[0]
                self._xattrs(ino, m)
                self.call(self.fs.setattr, ino, mode=mode, uid=uid, gid=gid)
                self.dir_times[ino] = (atime, mtime)
                self.result.entries += 1
                return
            self._replace(parent, name, *found)
        if m.islnk():
            self._hard_link(m, parent, name)
            return
        ino = self._make(tar, m, parent, name, mode, uid, gid)
        self._xattrs(ino, m)
        if m.isdir():
            self.call(self.fs.setattr, ino, mode=mode, uid=uid, gid=gid)
            self.dir_times[ino] = (atime, mtime)
        else:
            self.call(self.fs.setattr, ino, mode=None if m.issym() else mode, uid=uid, gid=gid,
                      atime=atime, mtime=mtime)
        self.result.entries += 1

    def _replace(self, parent: int, name: bytes, ino: int, node: Inode) -> None:
        """A later member of the same name replaces an earlier one (as tar extracts)."""
        self._parent = None
        if node.is_dir:
            self.call(self.fs.rmdir, parent, name)  # ImportRefused if not empty
            self.dir_times.pop(ino, None)
        else:
            self.call(self.fs.unlink, parent, name)

    def _make(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parent: int, name: bytes,
              mode: int, uid: int, gid: int) -> int:
        fs, res = self.fs, self.result
        if m.isreg():
            fh, entry = self.call(fs.create, parent, name, mode, os.O_WRONLY, uid, gid)
            try:
                self._data(tar, m, fh, entry.ino)
            finally:
                self.call(fs.release, fh)
            res.files += 1
            return self._made(entry.ino)
        if m.isdir():
            kind, target, rdev = stat.S_IFDIR, b"", 0
            res.dirs += 1
        elif m.issym():
            kind, target, rdev = stat.S_IFLNK, _raw(m.linkname), 0
            mode = 0o777
            res.symlinks += 1
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            target, rdev = b"", os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
            res.special += 1
        return self._made(self.call(fs.mknod, parent, name, kind | mode, uid, gid, rdev,
                                    target).ino)

    def _hard_link(self, m: tarfile.TarInfo, parent: int, name: bytes) -> None:
        parts = self._parts(m.linkname, "hard link target")
        if not parts:
            raise ImportRefused(f"{self.where}: a hard link to the volume root")
        directory = self._dirs(parts[:-1], make=False)
        found = self._lookup(directory, parts[-1])
        if found is None:
            raise ImportRefused(f"{self.where}: a hard link to {shown(b'/'.join(parts))}, "
                                "which is not in the archive before it")
        if found[1].is_dir:
            raise ImportRefused(f"{self.where}: a hard link to the directory "
                                f"{shown(b'/'.join(parts))}")
        self._made(self.call(self.fs.link, found[0], parent, name).ino)
        self.result.entries += 1
        self.result.links += 1

    def _data(self, tar: tarfile.TarFile, m: tarfile.TarInfo, fh: int, ino: int) -> None:
        """Write the member's data regions (all of it, unless it is sparse), hashing
        and compressing AHEAD chunks on the codec threads while one is applied; then
        the size, should the file end in a hole."""
        # The stored data is the regions' bytes one after the other (all of the file
        # for a member that is not sparse): read in order from the archive stream,
        # as tarfile's own reader does, which cannot skip a hole in a stream.
        src = tar.fileobj
        assert src is not None
        src.seek(m.offset_data)
        regions = m.sparse if m.sparse is not None else [(0, m.size)]
        queue: deque[tuple[int, bytes, Any]] = deque()
        end = 0
        for off, length in regions:
            pos, stop = off, off + length
            while pos < stop:
                n = min(CHUNK - pos % CHUNK, stop - pos)
                data = src.read(n)
                if len(data) != n:
                    raise tarfile.ReadError("unexpected end of data")
                queue.append((pos, data, self.fs.prepare_write(pos, data)))
                if len(queue) > AHEAD:
                    self._write(fh, *queue.popleft())
                pos += n
            if length:
                end = max(end, stop)
        while queue:
            self._write(fh, *queue.popleft())
        if m.size > end:
            self.call(self.fs.setattr, ino, size=m.size)

    def _write(self, fh: int, off: int, data: bytes, prepared: Any) -> None:
        self.call(self.fs.write, fh, off, data, prepared)
        self.result.data_bytes += len(data)
        if self.progress is not None:
            self.progress(len(data))

    def _xattrs(self, ino: int, m: tarfile.TarInfo) -> None:
        for name, value in _xattrs_of(m.pax_headers):
            if name.startswith(b"system.posix_acl_"):
                self._warn(f"{self.where}: POSIX ACL {shown(name)} left out (the volume "
                           "does not support ACLs)")
                continue
            self.call(self.fs.setxattr, ino, name, value)
        if any(k.startswith("SCHILY.acl.") for k in m.pax_headers):
            self._warn(f"{self.where}: POSIX ACLs left out (the volume does not support ACLs)")

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        if len(self.result.warnings) < MAX_WARNINGS:
            self.result.warnings.append(text)
        else:
            self.result.dropped += 1


def _raw(name: str) -> bytes:
    """A name as ``tarfile`` read it (UTF-8, other bytes as surrogates): its bytes."""
    return name.encode("utf-8", "surrogateescape")


def _time(text: str | None, default: int | None) -> int | None:
    """Nanoseconds of a PAX time (``-?SECONDS[.FRACTION]``), exactly; ``default``
    if there is none or it is malformed or out of the store's range."""
    if text is None:
        return default
    body = text[1:] if text[:1] in "+-" else text
    sec, _, frac = body.partition(".")
    if not (sec.isdigit() or (not sec and frac)) or (frac and not frac.isdigit()):
        return default
    ns = int(sec or 0) * 10**9 + int((frac + "0" * 9)[:9])
    ns = -ns if text.startswith("-") else ns
    return ns if -_NS <= ns < _NS else default


def _xattrs_of(headers: dict[str, str]) -> Iterator[tuple[bytes, bytes]]:
    """(name, value) of each extended attribute a member's PAX headers hold: GNU
    tar's and star's ``SCHILY.xattr.NAME`` (raw bytes), or bsdtar's
    ``LIBARCHIVE.xattr.URL-ENCODED-NAME`` (base64) where no SCHILY record names it."""
    seen = set()
    for key, value in headers.items():
        if key.startswith("SCHILY.xattr."):
            name = _raw(key[len("SCHILY.xattr."):])
            seen.add(name)
            yield name, _raw(value)
    for key, value in headers.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            if name not in seen:
                try:
                    yield name, base64.b64decode(value + "=" * (-len(value) % 4))
                except ValueError:
                    continue
