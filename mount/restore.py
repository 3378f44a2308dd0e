"""Make a destination tree equal to a source tree, by plain filesystem operations.

``cdpfs restore`` copies a past view of the volume (``MOUNT/@<moment>/...``,
read-only) onto the live volume; this module is that engine and knows nothing
of cdpfs. :func:`restore_tree` makes ``dst`` equal to ``src``: type, content,
symlink target, mode, owner, times (ns), extended attributes and hard links,
changing only what differs. A regular file that exists on both sides keeps its
inode and only its differing 1 MiB chunks are rewritten.

Safety rule: nothing is ever written outside ``dst``. Every destination
operation is made relative to a directory descriptor opened with
``O_DIRECTORY | O_NOFOLLOW``, files are opened with ``O_NOFOLLOW`` and every
call by name uses ``follow_symlinks=False``: a symlink found in ``dst`` is an
entry to replace or remove, never a way through. Symlinks in ``src`` are
recreated as symlinks, never followed. ``src`` and ``dst`` are reached from a
root directory each (the caller's, opened as given; by default their parents)
one component at a time in the same way, never by ``..``; every destination
directory and entry must be on the root's device: another filesystem mounted
inside ``dst`` is left alone (a warning), never written, emptied or removed.
So a tree that changes under a restore cannot lead it out of its root.

An ``OSError`` on one entry becomes a warning ``"<relative path>: <strerror>"``
in the returned :class:`Summary`, and the restore goes on with the rest.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdpfs.errors import CdpfsError
from cdpfs.system import fd_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_NOXATTR = (errno.EOPNOTSUPP, errno.ENOTSUP)
_ACL = "system.posix_acl_"
_GONE = {errno.ENOTCONN, errno.ENODEV, errno.ESHUTDOWN}  # the filesystem itself is gone

Key = tuple[int, int]


@dataclass
class Summary:
    files_written: int = 0      # regular files whose content had to change (or were created)
    bytes_written: int = 0      # bytes actually written
    unchanged: int = 0          # entries already equal (content and attributes)
    created: int = 0            # entries that did not exist in dst and were made
    replaced: int = 0           # entries whose type differed and were replaced
    removed: int = 0            # extra entries removed (delete=True), every entry of a subtree
    extras_kept: int = 0        # extra entries in dst left alone (delete=False)
    attrs_set: int = 0          # entries whose mode/owner/times/xattrs were changed
    warnings: list[str] = field(default_factory=list)


def measure(src: Path, *, root: Path | None = None) -> tuple[int, int]:
    """(number of entries, total bytes of regular files) under src (src included).

    For a progress total: src is reached from ``root`` as :func:`restore_tree`
    reaches it (CdpfsError if it cannot be), symlinks are not followed, a
    hard-linked file's bytes count once, unreadable entries are passed over.
    """
    fd, name, _dev = _reach(src, root)
    try:
        return _count(fd, name, set())
    finally:
        os.close(fd)


def _count(fd: int, name: str, seen: set[Key]) -> tuple[int, int]:
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return 0, 0
    entries, size = 1, 0
    if stat.S_ISREG(st.st_mode) and _key(st) not in seen:
        seen.add(_key(st))
        size = st.st_size
    elif stat.S_ISDIR(st.st_mode):
        try:
            below = _open(name, _DIR, fd)
        except OSError:
            return entries, size
        try:
            for child in os.listdir(below):
                more, nbytes = _count(below, child, seen)
                entries, size = entries + more, size + nbytes
        except OSError:
            pass
        finally:
            os.close(below)
    return entries, size


def restore_tree(src: Path, dst: Path, *, src_root: Path | None = None,
                 dst_root: Path | None = None, dst_dev: int | None = None,
                 delete: bool = False, skip_root: Callable[[str], bool] | None = None,
                 progress: Callable[[int], None] | None = None) -> Summary:
    """Make ``dst`` equal to ``src`` (see the module docstring); returns what was done.

    ``src`` lies in ``src_root`` and ``dst`` in ``dst_root`` (each by default its
    own parent; a path may be its root): the roots are opened as given, every
    directory below them one component at a time, never through a symlink or
    ``..``, never onto another device than the root's (``dst_dev``, if given, is
    the device dst_root must be on). ``delete`` removes entries of dst that src
    lacks; ``skip_root(name)`` names entries directly inside the top directories
    to ignore on both sides; ``progress(n)`` is told of every n bytes of file
    content processed. Raises :class:`CdpfsError` only if src or dst cannot be
    reached that way.
    """
    sfd, sname, _sdev = _reach(src, src_root)
    try:
        dfd, dname, ddev = _reach(dst, dst_root, dst_dev)
    except BaseException:
        os.close(sfd)
        raise
    try:
        os.stat(sname, dir_fd=sfd, follow_symlinks=False)
    except OSError as exc:
        os.close(sfd)
        os.close(dfd)
        raise CdpfsError(f"{src}: {exc.strerror}") from exc
    try:
        run = _Restore(dfd, ddev, delete, skip_root, progress)
        run.entry(sfd, sname, dfd, [dname], top=True)
    finally:
        os.close(sfd)
        os.close(dfd)
    log.info("restored %s onto %s: %s", src, dst, run.s)
    return run.s


def _reach(path: Path, root: Path | None, dev: int | None = None) -> tuple[int, str, int]:
    """(fd of the directory holding ``path``, the name of path in it, root's device).

    ``root`` (by default path's parent) is opened as given and must be on ``dev``
    if that is given; each directory below it is opened from the one above with
    ``O_NOFOLLOW`` and must be on root's device. ``path`` equal to ``root`` gives
    root's fd and ``"."``.
    """
    path = _absolute(path)  # '..' kept as it is (a Path collapses only '.')
    if root is None:
        if not path.name or path.name == "..":
            raise CdpfsError(f"{path}: not a path to restore (a filesystem root, or ending "
                             "in '..')")
        root = path.parent
    root = _absolute(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise CdpfsError(f"{path}: is not inside {root}") from None
    if ".." in parts:
        raise CdpfsError(f"{path}: '..' leads out of {root}; not followed")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CdpfsError(f"{root}: {exc.strerror}") from exc
    try:
        have = os.fstat(fd).st_dev
        if dev is not None and have != dev:
            raise CdpfsError(f"{root}: is no longer the filesystem it was (unmounted?); "
                             "nothing was changed")
        at = root
        for name in parts[:-1]:
            at = at / name
            try:
                below = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_link(fd, name):
                    raise CdpfsError(f"{at}: is a symbolic link; not followed") from exc
                raise CdpfsError(f"{at}: {exc.strerror}") from exc
            os.close(fd)
            fd = below
            if os.fstat(fd).st_dev != have:
                raise CdpfsError(f"{at}: another filesystem is mounted there; not entered")
        return fd, parts[-1] if parts else ".", have
    except BaseException:
        os.close(fd)
        raise


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving anything in it."""
    if path.is_absolute():
        return path
    try:
        return Path.cwd() / path
    except OSError as exc:
        raise CdpfsError(f"{path}: the current directory: {exc.strerror}") from None


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class _Restore:
    def __init__(self, root: int, dev: int, delete: bool,
                 skip_root: Callable[[str], bool] | None,
                 progress: Callable[[int], None] | None) -> None:
        self.s = Summary()
        # the directory dst is in (dst itself, dst being '.' in it, if dst is its root):
        # paths below are parts from here
        self.root = root
        self.dev = dev                        # the device every dst entry must be on
        self.delete, self.skip_root = delete, skip_root
        self.progress = progress or (lambda n: None)
        self.links: dict[Key, tuple[list[str], Key]] = {}  # src inode -> first dst path, inode
        self.holds: dict[Key, Key] = {}       # dst inode -> src inode whose content it got

    def warn(self, parts: list[str], exc: OSError) -> None:
        """One entry failed: a warning, and the restore goes on; unless the
        filesystem itself went away (a FUSE mount whose process died), which every
        later entry would only repeat: then it stops, with that one error."""
        if exc.errno in _GONE:
            raise CdpfsError(f"{_rel(parts)}: {exc.strerror}: the mount went away; the "
                             "restore stopped there (what it did before stays, journaled)")
        line = f"{_rel(parts)}: {exc.strerror or exc}"
        log.debug("restore: %s", line)
        self.s.warnings.append(line)

    def attempt(self, parts: list[str], fn: Callable[..., Any], *args: Any, **kw: Any) -> bool:
        try:
            fn(*args, **kw)
            return True
        except OSError as exc:
            self.warn(parts, exc)
            return False

    def entry(self, sfd: int, sname: str, dfd: int, parts: list[str], top: bool = False) -> None:
        try:
            sst = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
            try:
                dst_st: os.stat_result | None = os.stat(parts[-1], dir_fd=dfd,
                                                        follow_symlinks=False)
            except FileNotFoundError:
                dst_st = None
            if dst_st is not None:
                self.same_device(dst_st)
            if stat.S_ISDIR(sst.st_mode):
                self.directory(sfd, sname, sst, dfd, parts, dst_st, top)
            elif stat.S_ISREG(sst.st_mode):
                self.file(sfd, sname, sst, dfd, parts, dst_st)
            else:
                self.node(sfd, sname, sst, dfd, parts, dst_st)
        except OSError as exc:
            self.warn(parts, exc)

    def directory(self, sfd: int, sname: str, sst: os.stat_result, dfd: int, parts: list[str],
                  dst_st: os.stat_result | None, top: bool) -> None:
        self.progress(0)
        fresh = dst_st is None or not stat.S_ISDIR(dst_st.st_mode)
        if fresh:
            self.clear(dfd, parts[-1], dst_st)
            os.mkdir(parts[-1], 0o700, dir_fd=dfd)
        sd = _open(sname, _DIR, sfd)
        try:
            dd = _open(parts[-1], _DIR, dfd)
            try:
                self.same_device(os.fstat(dd))  # swapped for a mount point since the stat
                names, have = set(os.listdir(sd)), set(os.listdir(dd))
                if top and self.skip_root:
                    names = {n for n in names if not self.skip_root(n)}
                    have = {n for n in have if not self.skip_root(n)}
                for name in sorted(names):
                    self.entry(sd, name, dd, [*parts, name])
                for name in sorted(have - names):
                    if not self.delete:
                        self.s.extras_kept += 1
                        continue
                    try:
                        self.remove(dd, name, count=True)
                    except OSError as exc:
                        self.warn([*parts, name], exc)
                self.finish(sd, sst, dd, dfd, parts, dst_st, fresh, False)
            finally:
                os.close(dd)
        finally:
            os.close(sd)

    def file(self, sfd: int, sname: str, sst: os.stat_result, dfd: int, parts: list[str],
             dst_st: os.stat_result | None) -> None:
        key = (sst.st_dev, sst.st_ino)
        if key in self.links:
            self.hardlink(dfd, parts, dst_st, key)
            return
        # Keep dst's inode unless it already holds another src file (a link to break).
        keep = (dst_st is not None and stat.S_ISREG(dst_st.st_mode)
                and self.holds.get(_key(dst_st), key) == key)
        sh = _open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, sfd)
        try:
            if not keep:
                self.clear(dfd, parts[-1], dst_st)
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            dh = _open(parts[-1], flags if keep else flags | os.O_CREAT | os.O_EXCL, dfd)
            try:
                self.same_device(os.fstat(dh))
                changed = self.copy(sh, dh) or not keep
                dkey = _key(os.fstat(dh))
                self.holds[dkey] = key
                if sst.st_nlink > 1:
                    self.links[key] = (parts, dkey)
                self.s.files_written += changed
                self.finish(sh, sst, dh, dfd, parts, dst_st, not keep, changed)
            finally:
                os.close(dh)
        finally:
            os.close(sh)

    def copy(self, sh: int, dh: int) -> bool:
        """Make dh's content sh's, writing only the chunks that differ; True if it changed."""
        old_size = os.fstat(dh).st_size
        off, changed = 0, False
        while chunk := _pread(sh, CHUNK, off):
            n = len(chunk)
            have = _pread(dh, n, off) if off < old_size else b""
            # Zeros past dst's end need no write: the final ftruncate makes them (sparsely).
            if chunk != have and (have or chunk.count(0) != n):
                _pwrite(dh, chunk, off)
                self.s.bytes_written += n
                changed = True
            off += n
            self.progress(n)
        if os.fstat(dh).st_size != off:
            os.ftruncate(dh, off)
            changed = True
        return changed

    def hardlink(self, dfd: int, parts: list[str], dst_st: os.stat_result | None,
                 key: Key) -> None:
        first, dkey = self.links[key]
        self.progress(0)
        if dst_st is not None and stat.S_ISREG(dst_st.st_mode) and _key(dst_st) == dkey:
            self.s.unchanged += 1
            return
        self.clear(dfd, parts[-1], dst_st)
        fd = os.dup(self.root)
        for name in first[:-1]:  # walk to the first link's directory, never following
            try:
                below = os.open(name, _DIR, dir_fd=fd)
            finally:
                os.close(fd)
            fd = below
            try:
                self.same_device(os.fstat(fd))
            except OSError:
                os.close(fd)
                raise
        try:
            os.link(first[-1], parts[-1], src_dir_fd=fd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(fd)
        if dst_st is None:
            self.s.created += 1
        else:
            self.s.replaced += 1

    def node(self, sfd: int, sname: str, sst: os.stat_result, dfd: int, parts: list[str],
             dst_st: os.stat_result | None) -> None:
        """A symlink, FIFO, socket or device node."""
        self.progress(0)
        dname, kind = parts[-1], stat.S_IFMT(sst.st_mode)
        same = dst_st is not None and stat.S_IFMT(dst_st.st_mode) == kind
        if kind == stat.S_IFLNK:
            target = os.readlink(sname, dir_fd=sfd)
            same = same and os.readlink(dname, dir_fd=dfd) == target
        else:
            same = same and dst_st is not None and dst_st.st_rdev == sst.st_rdev
        if not same:
            self.clear(dfd, dname, dst_st)
            if kind == stat.S_IFLNK:
                os.symlink(target, dname, dir_fd=dfd)
            else:
                os.mknod(dname, kind | 0o600, sst.st_rdev, dir_fd=dfd)
        sh = os.open(sname, _NODE, dir_fd=sfd)
        try:
            dh = os.open(dname, _NODE, dir_fd=dfd)
            try:
                self.finish(sh, sst, dh, dfd, parts, dst_st, not same, False,
                            before=dst_st if same else None)
            finally:
                os.close(dh)
        finally:
            os.close(sh)

    def finish(self, sh: int, sst: os.stat_result, dh: int, dfd: int, parts: list[str],
               dst_st: os.stat_result | None, fresh: bool, changed: bool,
               before: os.stat_result | None = None) -> None:
        """Set dst's attributes from src's, then count the entry."""
        attrs = self.attrs(sh, sst, dh, dfd, parts, before)
        self.s.attrs_set += attrs
        if fresh:
            if dst_st is None:
                self.s.created += 1
            else:
                self.s.replaced += 1
        elif not changed and not attrs:
            self.s.unchanged += 1

    def attrs(self, sh: int, sst: os.stat_result, dh: int, dfd: int, parts: list[str],
              before: os.stat_result | None) -> bool:
        """Owner, then mode (chown may clear setuid), xattrs, times last; True if any changed.

        ``before`` is dst's stat from before our own readlink, which may have moved its
        atime: that is put back but is not a difference.
        """
        dname, kind, changed = parts[-1], stat.S_IFMT(sst.st_mode), False
        st = os.fstat(dh)
        if (st.st_uid, st.st_gid) != (sst.st_uid, sst.st_gid):
            changed |= self.attempt(parts, os.chown, dname, sst.st_uid, sst.st_gid,
                                    dir_fd=dfd, follow_symlinks=False)
            st = os.fstat(dh)
        mode = stat.S_IMODE(sst.st_mode)
        if kind != stat.S_IFLNK and stat.S_IMODE(st.st_mode) != mode:
            changed |= self.attempt(parts, os.chmod, _handle(dh, kind), mode)
        changed |= self.xattrs(_handle(sh, kind), _handle(dh, kind), parts)
        st = os.fstat(dh)
        times = (sst.st_atime_ns, sst.st_mtime_ns)
        if (st.st_atime_ns, st.st_mtime_ns) != times:
            done = self.attempt(parts, os.utime, dname, ns=times, dir_fd=dfd,
                                follow_symlinks=False)
            changed |= done and (before is None
                                 or (before.st_atime_ns, before.st_mtime_ns) != times)
        return changed

    def xattrs(self, sh: int | str, dh: int | str, parts: list[str]) -> bool:
        try:
            want = _xattrs(sh)
        except OSError as exc:
            if exc.errno not in _NOXATTR:  # no xattrs at the source: leave dst's alone
                self.warn(parts, exc)
            return False
        try:
            have = _xattrs(dh)
        except OSError as exc:
            if want or exc.errno not in _NOXATTR:
                self.warn(parts, exc)
            return False
        changed = False
        for name, value in want.items():
            if have.get(name) != value:
                changed |= self.attempt(parts, os.setxattr, dh, name, value)
        for name in have.keys() - want.keys():
            changed |= self.attempt(parts, os.removexattr, dh, name)
        return changed

    def same_device(self, st: os.stat_result) -> None:
        """Refuse (as this entry's error) an entry on another filesystem: one mounted
        inside dst is not dst's to change."""
        if st.st_dev != self.dev:
            raise OSError(errno.EXDEV, "another filesystem is mounted there; left alone")

    def clear(self, dfd: int, name: str, dst_st: os.stat_result | None) -> None:
        """Make room for a new entry (a replacement is not counted as removed)."""
        if dst_st is not None:
            self.remove(dfd, name, count=False)

    def remove(self, dfd: int, name: str, count: bool) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        self.same_device(st)  # a mount point: never emptied, never removed
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR, dir_fd=dfd)
            try:
                self.same_device(os.fstat(fd))
                for child in os.listdir(fd):
                    self.remove(fd, child, count)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        self.s.removed += count


def _rel(parts: list[str]) -> str:
    return "/".join(parts[1:]) or "."


def _key(st: os.stat_result) -> Key:
    return st.st_dev, st.st_ino


def _open(name: str, flags: int, dir_fd: int) -> int:
    """Open without touching atime when allowed (owner or root), else plainly."""
    try:
        return os.open(name, flags | os.O_NOATIME, 0o600, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


def _handle(fd: int, kind: int) -> int | str:
    """What xattr and chmod calls take: the fd, or for an O_PATH fd its /proc name."""
    return fd if kind in (stat.S_IFREG, stat.S_IFDIR) else fd_path(fd)


def _xattrs(handle: int | str) -> dict[str, bytes]:
    return {name: os.getxattr(handle, name) for name in os.listxattr(handle)
            if not name.startswith(_ACL)}


def _pread(fd: int, n: int, off: int) -> bytes:
    data = os.pread(fd, n, off)
    while len(data) < n and (more := os.pread(fd, n - len(data), off + len(data))):
        data += more
    return data


def _pwrite(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, off)
        view, off = view[done:], off + done
