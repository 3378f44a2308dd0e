"""A minimal pass-through FUSE filesystem: the ceiling for a Python FUSE fs here.

It mirrors a backing directory with plain ``os.*`` calls (file handles are real
file descriptors, inode numbers are the backing files' own, mapped to paths)
and runs with exactly the kernel-cache settings of the cdpfs mount (see
``mount/fuse.py`` and ``mount/runner.py``, whose constants it imports): writeback
cache, 5 s entry and attribute timeouts, negative lookups cached as long, page
cache kept across opens, 1 MiB readahead, ``default_permissions,noatime``, and
``pyfuse3.main(min_tasks=4, max_tasks=32)``. Whatever cdpfs adds on top of this
(journal, hashing, compression, LMDB) is its own cost; the bench compares the two.

Usage: ``python bench/passthrough.py BACKING MNT`` (foreground). SIGTERM,
SIGINT or ``fusermount3 -u MNT`` ends it. Extended attributes, ``mknod`` and
rename flags are not supported (ENOSYS/EINVAL), as a minimal pass-through.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from cdpfs.mount import fuse as cdpfs_fuse
from cdpfs.mount import runner as cdpfs_runner

log = logging.getLogger(__name__)

# The kernel-cache settings of cdpfs, taken from its mount code when it has them.
TIMEOUT: float = getattr(cdpfs_fuse, "TIMEOUT", 5.0)  # entry/attr/negative cache, s
READ_AHEAD_KB: int | None = getattr(cdpfs_runner, "READ_AHEAD_KB", None)
MIN_TASKS = 4
MAX_TASKS = 32
T = TypeVar("T")


def _oserror(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Call ``fn``; turn an OSError into the FUSEError the kernel expects."""
    try:
        return fn(*args, **kw)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


class Passthrough(pyfuse3.Operations):
    """pyfuse3 operations mirroring ``source``.

    Attributes:
        source: the backing directory (bytes path).
        paths: inode number -> one current path of it in the backing directory.
        lookups: kernel lookup count of each known inode.
        listings: open directory handle -> its snapshot listing.
        dir_paths: open directory handle -> the directory's backing path.
    """

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, source: bytes) -> None:
        super().__init__()
        self.source = source
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: source}
        self.lookups: dict[int, int] = defaultdict(int)
        self.listings: dict[int, list[tuple[bytes, os.stat_result]]] = {}
        self.dir_paths: dict[int, bytes] = {}
        self._next_dh = 1

    # --- helpers ------------------------------------------------------------------

    def _path(self, ino: int) -> bytes:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _remember(self, path: bytes, st: os.stat_result) -> int:
        ino = st.st_ino
        self.paths[ino] = path
        self.lookups[ino] += 1
        return ino

    @staticmethod
    def _attrs(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        st = _oserror(os.lstat, path)
        return self._attrs(self._remember(path, st), st)

    @staticmethod
    def _chown(path: bytes, ctx: Any) -> None:
        if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
            _oserror(os.chown, path, ctx.uid, ctx.gid, follow_symlinks=False)

    @staticmethod
    def _fix_flags(flags: int) -> int:
        # With the writeback cache the kernel reads pages of files opened write-only
        # and handles O_APPEND itself (as libfuse's passthrough_ll does).
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def _attr_of(self, ino: int) -> pyfuse3.EntryAttributes:
        return self._attrs(ino, _oserror(os.lstat, self._path(ino)))

    # --- names ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        try:
            return self._entry(os.path.join(self._path(parent_inode), name))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self.paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr_of(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        path = self._path(inode)
        if fields.update_size:
            if fh is not None:
                _oserror(os.ftruncate, fh, attr.st_size)
            else:
                _oserror(os.truncate, path, attr.st_size)
        if fields.update_mode:
            _oserror(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _oserror(os.chown, path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = _oserror(os.lstat, path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _oserror(os.utime, path, ns=(atime, mtime), follow_symlinks=False)
        return self._attr_of(inode)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return _oserror(os.readlink, self._path(inode))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = os.path.join(self._path(parent_inode), name)
        _oserror(os.mkdir, path, stat.S_IMODE(mode))
        self._chown(path, ctx)
        return self._entry(path)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = os.path.join(self._path(parent_inode), name)
        _oserror(os.symlink, target, path)
        self._chown(path, ctx)
        return self._entry(path)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        path = os.path.join(self._path(new_parent_inode), new_name)
        _oserror(os.link, self._path(inode), path, follow_symlinks=False)
        return self._entry(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _oserror(os.unlink, os.path.join(self._path(parent_inode), name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _oserror(os.rmdir, os.path.join(self._path(parent_inode), name))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = os.path.join(self._path(parent_inode_old), name_old)
        new = os.path.join(self._path(parent_inode_new), name_new)
        st = _oserror(os.lstat, old)
        _oserror(os.rename, old, new)
        if st.st_ino in self.paths:
            self.paths[st.st_ino] = new
        if stat.S_ISDIR(st.st_mode):  # move the known paths below the directory too
            prefix = old + b"/"
            for ino, path in list(self.paths.items()):
                if path.startswith(prefix):
                    self.paths[ino] = new + path[len(old):]

    # --- files ------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fd = _oserror(os.open, self._path(inode), self._fix_flags(flags) & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        path = os.path.join(self._path(parent_inode), name)
        fd = _oserror(os.open, path, self._fix_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))
        try:
            if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
                _oserror(os.fchown, fd, ctx.uid, ctx.gid)
            st = _oserror(os.fstat, fd)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._attrs(self._remember(path, st), st)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return _oserror(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return _oserror(os.pwrite, fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        _oserror(os.close, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        _oserror(os.fdatasync if datasync else os.fsync, fh)

    # --- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        listing: list[tuple[bytes, os.stat_result]] = []
        with _oserror(os.scandir, path) as it:
            for e in it:
                try:
                    listing.append((e.name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        dh = self._next_dh
        self._next_dh += 1
        self.listings[dh] = listing
        self.dir_paths[dh] = path
        return dh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.listings[fh]
        parent = self.dir_paths[fh]
        for i in range(start_id, len(listing)):
            name, st = listing[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(st.st_ino, st), i + 1):
                return
            self._remember(os.path.join(parent, name), st)

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)
        self.dir_paths.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = _oserror(os.open, self.dir_paths[fh], os.O_RDONLY | os.O_DIRECTORY)
        try:
            _oserror(os.fsync, fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: Any) -> Any:
        st = _oserror(os.statvfs, self.source)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = st.f_namemax
        return out


# --- running ---------------------------------------------------------------------------

def fuse_options() -> set[str]:
    """The options of a cdpfs mount (mount/runner.py), under another fs name."""
    return {"fsname=passthrough", "subtype=passthrough", "default_permissions", "noatime"}


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Set the readahead of the mount as cdpfs does (its own function)."""
    cdpfs_runner.set_readahead(mountpoint, kb)


async def _tune_after_init(mountpoint: Path) -> None:
    # The kernel resets readahead when FUSE INIT is answered (once main() runs).
    if READ_AHEAD_KB:
        await trio.sleep(0.2)
        await trio.to_thread.run_sync(set_readahead, mountpoint, READ_AHEAD_KB)


async def _serve(mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cdpfs_runner.stop_on_signal)
        nursery.start_soon(_tune_after_init, mountpoint)
        await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def serve(backing: str, mountpoint: str) -> None:
    """Mount the pass-through of ``backing`` on ``mountpoint`` and serve until unmounted."""
    source = os.fsencode(os.path.realpath(backing))
    mnt = Path(mountpoint).resolve()
    if not os.path.isdir(source):
        raise SystemExit(f"{backing}: not a directory")
    ops = Passthrough(source)
    pyfuse3.init(ops, str(mnt), fuse_options())
    try:
        log.info("pass-through of %s mounted on %s", backing, mountpoint)
        trio.run(_serve, mnt)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", help="directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s passthrough %(levelname)s %(message)s",
                        stream=sys.stderr)
    serve(args.backing, args.mountpoint)


if __name__ == "__main__":
    main()
