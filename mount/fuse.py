"""FUSE adapter: translates pyfuse3 requests into calls of the volume service.

Nothing here knows filesystem rules; it converts arguments, hands each request
to the volume (``cdpfs.volume.Volume``: its ``fs`` is a ``TimeFS``), and turns
cdpfs errors into errno (``errnos.py``).
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3

from cdpfs.errors import CdpfsError
from cdpfs.fs.timefs import Caller
from cdpfs.fs.vfs import Entry
from cdpfs.store.schema import Inode
from cdpfs.system import DiskStats
from cdpfs.volume import Volume

from .errnos import QUIET, errno_of

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # kernel attribute and entry cache, seconds


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 operations over one volume and its history (or one past state)."""

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        assert volume.fs is not None, "the volume is not served as a filesystem"
        self.volume = volume
        self.fs = volume.fs
        self.block_size = self.fs.store.block_size

    async def _call(self, fn: Callable[..., Any], *args: Any, durable: bool = False,
                    **kw: Any) -> Any:
        what = getattr(fn, "__name__", "op")
        try:
            if kw:
                return await self.volume.call(lambda: fn(*args, **kw), durable=durable)
            return await self.volume.call(fn, *args, durable=durable)
        except CdpfsError as exc:
            raise self._error(what, exc) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s", what)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _request(self, what: str, coro: Any) -> Any:
        """Await one of the volume's own request methods, errors mapped."""
        try:
            return await coro
        except CdpfsError as exc:
            raise self._error(what, exc) from None
        except Exception:
            log.exception("internal error in %s", what)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @staticmethod
    def _error(what: str, exc: CdpfsError) -> pyfuse3.FUSEError:
        if not isinstance(exc, QUIET):
            log.info("%s: %s", what, exc)
        return pyfuse3.FUSEError(errno_of(exc))

    def _attrs(self, ino: int, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        ttl = self.fs.attr_ttl(ino)
        a.entry_timeout = a.attr_timeout = TIMEOUT if ttl is None else ttl
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = self.block_size
        a.st_blocks = node.st_blocks(self.block_size)
        a.st_atime_ns = node.atime
        a.st_mtime_ns = node.mtime
        a.st_ctime_ns = node.ctime
        return a

    def _entry(self, e: Entry) -> pyfuse3.EntryAttributes:
        a = self._attrs(e.ino, e.attr)
        if e.ttl is not None:
            a.entry_timeout = e.ttl
        return a

    @staticmethod
    def _caller(ctx: Any) -> Caller | None:
        return None if ctx is None else Caller(ctx.uid, ctx.gid, ctx.pid)

    # --- names ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        try:
            return self._entry(await self._call(self.fs.lookup, parent_inode, name,
                                                self._caller(ctx)))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
            negative.st_ino = 0
            ttl = self.fs.miss_ttl(parent_inode, name)
            negative.entry_timeout = TIMEOUT if ttl is None else ttl
            return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        await self._call(self.fs.forget, list(inode_list))

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode, await self._call(self.fs.getattr, inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        kw: dict[str, int] = {}
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime"] = attr.st_ctime_ns
        return self._attrs(inode, await self._call(self.fs.setattr, inode, **kw))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self._call(self.fs.readlink, inode)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return self._entry(await self._call(self.fs.mknod, parent_inode, name, mode,
                                            ctx.uid, ctx.gid, rdev))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._entry(await self._call(self.fs.mknod, parent_inode, name,
                                            stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return self._entry(await self._call(self.fs.mknod, parent_inode, name,
                                            stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, 0, target))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return self._entry(await self._call(self.fs.link, inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._call(self.fs.unlink, parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._call(self.fs.rmdir, parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self._call(self.fs.rename, parent_inode_old, name_old, parent_inode_new,
                         name_new, flags)

    # --- files ------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fh = await self._call(self.fs.open, inode, flags, self._caller(ctx))
        # Every change to live data passes through the kernel, so its page cache
        # stays valid across opens (changes made behind its back invalidate it);
        # not so in a following mount, whose store another process writes.
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.fs.keep_cache(inode))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        fh, entry = await self._call(self.fs.create, parent_inode, name, mode, flags,
                                     ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(entry)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._request("read", self.volume.read(fh, off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._request("write", self.volume.write(fh, off, buf))

    async def flush(self, fh: int) -> None:
        # close() reports a failed write-behind: wait for queued writes, if any.
        await self._request("flush", self.volume.flush(fh))

    async def release(self, fh: int) -> None:
        await self._call(self.fs.release, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._request("fsync", self.volume.fsync(fh))

    # --- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self._call(self.fs.opendir, inode, self._caller(ctx))

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        while True:
            batch = await self._call(self.fs.readdir, fh, start_id)
            if not batch:
                return
            taken = []
            for next_id, name, entry in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(entry), next_id):
                    break
                taken.append(entry.ino)
            else:
                start_id = batch[-1][0]
                await self._call(self.fs.count_lookups, taken)
                continue
            await self._call(self.fs.count_lookups, taken)
            return

    async def releasedir(self, fh: int) -> None:
        await self._call(self.fs.releasedir, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._request("fsyncdir", self.volume.fsyncdir())

    async def statfs(self, ctx: Any) -> Any:
        st: DiskStats = await self._call(self.fs.statfs)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.frsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.favail
        out.f_namemax = 255
        return out

    # --- extended attributes --------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self._call(self.fs.setxattr, inode, name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if self.fs.xattr_absent(name):  # e.g. security.capability before every write
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._call(self.fs.getxattr, inode, name)

    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return await self._call(self.fs.listxattr, inode)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self._call(self.fs.removexattr, inode, name)
