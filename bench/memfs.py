"""An in-memory pyfuse3 filesystem: the ceiling of pyfuse3 itself on this machine.

It answers every request from Python dicts (no disk, no store, no journal),
with the kernel-cache settings and the worker counts of the cdpfs mount, as
``bench/passthrough.py`` does: what it costs per request is what pyfuse3, trio
and the kernel's FUSE round trip cost, and no Python filesystem here can do
better. Extended attributes are not supported (ENOSYS), as in the pass-through.

Usage: ``python bench/memfs.py MNT`` (foreground); SIGTERM, SIGINT or
``fusermount3 -u MNT`` ends it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio
from passthrough import TIMEOUT, _serve

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Node:
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    target: bytes = b""
    atime: int = 0
    mtime: int = 0
    ctime: int = 0


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class MemFs(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self) -> None:
        super().__init__()
        now = time.time_ns()
        self.nodes: dict[int, Node] = {
            pyfuse3.ROOT_INODE: Node(stat.S_IFDIR | 0o755, nlink=2, atime=now, mtime=now,
                                     ctime=now)}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.listings: dict[int, list[tuple[bytes, int]]] = {}
        self.next_fh = 1

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self._node(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = n.mode, n.nlink, n.uid, n.gid
        a.st_size = len(n.target) if stat.S_ISLNK(n.mode) else len(n.data)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = n.atime, n.mtime, n.ctime
        return a

    def _new(self, parent: int, name: bytes, mode: int, ctx: Any, target: bytes = b"") -> int:
        p = self._node(parent)
        if name in p.children:
            raise _fail(errno.EEXIST)
        now = time.time_ns()
        ino = self.next_ino
        self.next_ino += 1
        is_dir = stat.S_ISDIR(mode)
        self.nodes[ino] = Node(mode, ctx.uid, ctx.gid, 2 if is_dir else 1, target=target,
                               atime=now, mtime=now, ctime=now)
        p.children[name] = ino
        p.nlink += is_dir
        p.mtime = p.ctime = now
        return ino

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        ino = self._node(parent_inode).children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._attrs(ino)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        n = self._node(inode)
        if fields.update_size:
            size = attr.st_size
            del n.data[size:]
            n.data.extend(bytes(size - len(n.data)))
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = time.time_ns()
        return self._attrs(inode)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self._node(inode).target

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | mode, ctx))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return self._attrs(self._new(parent_inode, name, mode, ctx))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return self._attrs(self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        p = self._node(new_parent_inode)
        if new_name in p.children:
            raise _fail(errno.EEXIST)
        p.children[new_name] = inode
        self._node(inode).nlink += 1
        return self._attrs(inode)

    def _remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        p = self._node(parent)
        ino = p.children.get(name)
        if ino is None:
            raise _fail(errno.ENOENT)
        n = self._node(ino)
        if is_dir and n.children:
            raise _fail(errno.ENOTEMPTY)
        del p.children[name]
        n.nlink -= 2 if is_dir else 1
        p.nlink -= is_dir
        if n.nlink <= 0:
            del self.nodes[ino]

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._remove(parent_inode, name, False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._remove(parent_inode, name, True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags:
            raise _fail(errno.EINVAL)
        old, new = self._node(parent_inode_old), self._node(parent_inode_new)
        ino = old.children.get(name_old)
        if ino is None:
            raise _fail(errno.ENOENT)
        if name_new in new.children:
            self._remove(parent_inode_new, name_new,
                         stat.S_ISDIR(self._node(new.children[name_new]).mode))
        del old.children[name_old]
        new.children[name_new] = ino

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        self._node(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        ino = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return pyfuse3.FileInfo(fh=ino, keep_cache=True), self._attrs(ino)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self._node(fh).data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self._node(fh).data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def opendir(self, inode: int, ctx: Any) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.listings[fh] = list(self._node(inode).children.items())
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, ino = listing[i]
            if ino in self.nodes and not pyfuse3.readdir_reply(token, name, self._attrs(ino),
                                                               i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: Any) -> Any:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 24
        out.f_files = out.f_ffree = out.f_favail = 1 << 24
        out.f_namemax = 255
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s memfs %(levelname)s %(message)s")
    mnt = Path(args.mountpoint).resolve()
    pyfuse3.init(MemFs(), str(mnt), {"fsname=memfs", "subtype=memfs", "default_permissions",
                                     "noatime"})
    try:
        trio.run(_serve, mnt)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    main()
