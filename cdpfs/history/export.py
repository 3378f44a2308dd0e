"""Export the volume as of one point as a PAX tar stream, read by ordered seeks.

``held`` resolves a moment to a kept point and holds it (a hold of this process)
while the export reads it, so prune cannot take it away; ``export_tar`` writes the
tree (or subtrees) as of that point to a binary stream: owners, modes, times to
the nanosecond, xattrs, hard links, sparse files (holes taken from the block map),
symlinks, FIFOs and devices. Nothing is copied aside: listings are read a page at
a time and file data a chunk at a time, each in a short read transaction of its
own, and blocks are checked and decompressed on worker threads as they are
written out, a bounded window ahead. A damaged block ends the export
(``Corrupt``) before any of its bytes are written. ``export_volume`` is the whole
of ``cdpfs export``'s work on a store: open it, hold the moment, write it.

The headers are written here rather than with ``tarfile``, which can neither
write sparse files nor times to the nanosecond: a ustar header, preceded by a
PAX extended header (``x``) whenever a field does not fit ustar. Encoding:

* names and link targets up to 100 bytes as they are (raw bytes) in the ustar
  fields, longer ones in ``path``/``linkpath`` records, with ``hdrcharset=BINARY``
  when such a name is not UTF-8 (bsdtar needs it to take the bytes as they are;
  GNU tar 1.34 does so anyway, with a warning that it ignores the keyword);
* ``mtime``, ``atime``, ``ctime`` as seconds with a nine-digit fraction;
* ``uid``, ``gid``, ``size`` records when a number does not fit its octal field;
  owner names are left empty (extraction then uses the numbers);
* ``SCHILY.xattr.NAME=VALUE`` per extended attribute (GNU tar ``--xattrs``, bsdtar);
* hard links: the first name of an inode carries its data, every later name is a
  link entry (``1``) to it;
* sparse files (a block that is a hole in the store's block map): PAX sparse
  format 1.0 (``GNU.sparse.major=1``, ``minor=0``, ``name``, ``realsize``; the
  map of data regions heads the entry's data, then the regions' bytes);
* sockets cannot be put in a tar: they are skipped and counted.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import CdpfsError, NotFound
from ..names import shown
from ..progress import Progress
from ..store.lmdb import Store
from ..store.schema import ROOT_INO, Inode
from ..store.view import ReadPlan, View, open_view
from . import bookmarks
from .points import Point, resolve

log = logging.getLogger(__name__)

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default record: the archive is padded to a multiple of it
CHUNK = 1 << 20  # file data read (and checked and decompressed) per task, about
WINDOW = 16  # batches of reads under way ahead of the writer: what bounds memory
BATCH = 64  # small files' reads done in one task
QUEUED = 4 << 20  # bytes of headers waiting behind chunks under way, at most
PAGE = 256  # directory entries read per transaction
INDICES = 4096  # block-map entries read per transaction
_ids = itertools.count(1)
_ZEROS = bytes(BLOCK)


class ExportError(CdpfsError):
    """A path to export that does not exist at the point, or leaves the volume."""


@dataclass(slots=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        seq: the point exported.
        entries: archive entries (every name, hard links included).
        files: regular files with their data (first names).
        sparse: of those, written in the sparse format.
        links: hard-link entries.
        data_bytes: bytes of file content written (holes not counted).
        tar_bytes: bytes of the whole archive.
        skipped: sockets left out (tar cannot hold them).
    """

    seq: int
    entries: int = 0
    files: int = 0
    sparse: int = 0
    links: int = 0
    data_bytes: int = 0
    tar_bytes: int = 0
    skipped: int = 0


@contextmanager
def held(store: Store, moment: str, now_ns: int | None = None) -> Iterator[Point]:
    """The kept point ``moment`` names, held for this process until the block ends
    (BadMoment, one line, if none). A process killed meanwhile holds nothing: a hold
    of a dead process is ignored and dropped by prune."""
    tag = f"export.{next(_ids)}"
    with store.txn(write=True) as txn:
        point = resolve(store, txn, moment, now_ns)
        bookmarks.hold(store, txn, tag, point.seq)
    try:
        yield point
    finally:
        with store.txn(write=True) as txn:
            bookmarks.release(store, txn, tag)


def export_volume(path: Path, moment: str, output: AbstractContextManager[BinaryIO],
                  paths: Sequence[str | bytes] = (), *,
                  progress: Progress | None = None) -> tuple[Point, ExportResult]:
    """``cdpfs export``: the store at ``path`` opened, the point ``moment`` names held
    (``held``) and ``export_tar`` of it (or of ``paths``) written to the stream that
    ``output`` opens. ``output`` is entered only once the point is held and the paths
    found, so a bad moment or path makes nothing, and left with the error if the
    export fails (it may then take back what it made). ``progress`` is advanced by
    the file data written; when it shows anything and has no total, its total is
    the data the export will write (``data_size``). The point and what was written."""
    with Store(path) as store, held(store, moment) as point:
        starts = _starts(store, point.seq, paths)
        if progress is not None and progress.shown and progress.total is None:
            progress.total = _Walker(store, point.seq).measure(starts)
        with output as out:
            return point, export_tar(store, point.seq, out, paths,
                                     progress=None if progress is None else progress.advance)


def data_size(store: Store, seq: int, paths: Sequence[str | bytes] = ()) -> int:
    """About the bytes of file data ``export_tar`` of ``paths`` at ``seq`` writes: a
    walk of the tree's inodes, none of its data (a hard-linked file counted once, a
    sparse file by the blocks that hold data). A progress total: it costs a part of
    what the export's own walk does, nothing on large files."""
    return _Walker(store, seq).measure(_starts(store, seq, paths))


def export_tar(store: Store, seq: int, out: BinaryIO, paths: Sequence[str | bytes] = (), *,
               progress: Callable[[int], None] | None = None,
               workers: int | None = None) -> ExportResult:
    """Write the volume as of ``seq`` (or the subtrees ``paths``, relative to its
    root) to ``out`` as a PAX tar. ``progress(n)`` is called with each amount of
    file data written. ExportError for a path that is missing at ``seq`` or leaves
    the volume; Corrupt for a damaged block (the stream then ends short: what was
    written before it is correct, and no end-of-archive marker follows)."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="cdpfs-export") as pool:
        tar = _TarWriter(out, lambda plans: pool.submit(_read_all, store, plans), progress)
        exporter = _Exporter(store, seq, tar)
        try:
            exporter.run(_starts(store, seq, paths))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return exporter.result


# --- what to export ------------------------------------------------------------------------


def _starts(store: Store, seq: int, paths: Sequence[str | bytes]) -> list[tuple[bytes, int]]:
    """(archive name, inode) of each subtree to export: the root alone by default.
    A path is relative to the volume root; ``..`` may not climb above it, and a
    directory on the way may not be a symbolic link (nothing is followed). A path
    inside another one given is left out (its entries would come twice)."""
    if not paths:
        return [(b".", ROOT_INO)]
    wanted: list[tuple[bytes, list[bytes]]] = []
    for path in paths:
        raw = os.fsencode(path)
        parts: list[bytes] = []
        for part in raw.split(b"/"):
            if part == b"..":
                if not parts:
                    raise ExportError(f"{shown(raw)}: leads out of the volume")
                parts.pop()
            elif part not in (b"", b"."):
                parts.append(part)
        wanted.append((raw, parts))
    out = []
    for i, (raw, parts) in enumerate(wanted):
        inside = any(len(o) < len(parts) and parts[: len(o)] == o for _, o in wanted)
        if inside or any(o == parts for _, o in wanted[:i]):
            continue  # inside another path given, or given before
        with open_view(store, seq=seq) as view:
            out.append((b"/".join(parts) or b".", _lookup(view, raw, parts, seq)))
    return out


def _lookup(view: View, raw: bytes, parts: list[bytes], seq: int) -> int:
    ino = ROOT_INO
    for i, part in enumerate(parts):
        child = view.lookup(ino, part)
        node = None if child is None else view.inode(child)
        if child is None or node is None:
            raise ExportError(f"{shown(raw)}: no such file or directory at #{seq}")
        if i < len(parts) - 1 and not node.is_dir:
            what = "a symbolic link" if node.is_lnk else "not a directory"
            raise ExportError(f"{shown(raw)}: {shown(b'/'.join(parts[: i + 1]))} is {what} "
                              f"at #{seq} (nothing is followed)")
        ino = child
    return ino


@dataclass(frozen=True, slots=True)
class _Layout:
    """A sparse file's map: regions (the final empty one included), data bytes,
    whether it ends in a hole, and the map's length in bytes."""

    count: int
    data: int
    tail: bool
    map_len: int


@dataclass(slots=True)
class _Entry:
    name: bytes  # the archive name (b"." for the root)
    ino: int
    node: Inode
    xattrs: list[tuple[bytes, bytes]]
    plan: ReadPlan | None = None  # a small file's data, planned in the walk's transaction


class _Walker:
    """The tree (or subtrees) as of one point, walked in pre-order."""

    def __init__(self, store: Store, seq: int) -> None:
        self.store = store
        self.seq = seq
        self.bs = store.block_size

    def measure(self, starts: list[tuple[bytes, int]]) -> int:
        """The bytes of file data under ``starts``, from their inodes (``data_size``)."""
        total = 0
        seen: set[int] = set()
        for name, ino in starts:
            for e in self._walk(name, ino, light=True):
                node = e.node
                if not node.is_reg or (node.nlink > 1 and e.ino in seen):
                    continue
                seen.add(e.ino)
                total += min(node.size, node.blocks * self.bs)
        return total

    # --- the walk: pre-order, a page of a directory per transaction --------------------

    def _read_entry(self, view: View, name: bytes, ino: int,
                    light: bool = False) -> _Entry | None:
        """The entry ``name`` is (``light``: its inode alone)."""
        node = view.inode(ino)
        if node is None:
            return None
        if light:
            return _Entry(name, ino, node, [])
        xattrs = [(x, view.xattr(ino, x) or b"") for x in view.xattrs(ino)]
        entry = _Entry(name, ino, node, xattrs)
        if node.is_reg and 0 < node.size <= CHUNK and node.blocks >= -(-node.size // self.bs):
            entry.plan = view.plan(ino, 0, node.size, node.size)  # no hole: read it all
        return entry

    def _walk(self, name: bytes, ino: int, light: bool = False) -> Iterator[_Entry]:
        with open_view(self.store, seq=self.seq) as view:
            top = self._read_entry(view, name, ino, light)
        if top is None:
            raise NotFound(f"{shown(name)}: no inode {ino} at #{self.seq}")
        yield top
        if not top.node.is_dir:
            return
        prefix = b"" if name == b"." else name + b"/"
        stack: list[tuple[int, bytes, bytes | None]] = [(ino, prefix, None)]
        while stack:
            dino, dprefix, after = stack.pop()
            page: list[_Entry] = []
            more = False
            with open_view(self.store, seq=self.seq) as view:
                for child_name, child in view.listdir(dino, after):
                    entry = self._read_entry(view, dprefix + child_name, child, light)
                    after = child_name
                    if entry is None:
                        continue
                    page.append(entry)
                    if entry.node.is_dir or len(page) >= PAGE:
                        more = True
                        break
            if more:  # the rest of this directory after what a child holds
                stack.append((dino, dprefix, after))
            for entry in page:
                yield entry
            last = page[-1] if page else None
            if last is not None and last.node.is_dir:
                stack.append((last.ino, last.name + b"/", None))


class _Exporter(_Walker):
    """One export: the walk, the data pipeline and the tally."""

    def __init__(self, store: Store, seq: int, tar: _TarWriter) -> None:
        super().__init__(store, seq)
        self.tar = tar
        self.first: dict[int, bytes] = {}  # inode with more names -> its first archive name
        self.result = ExportResult(seq)

    def run(self, starts: list[tuple[bytes, int]]) -> None:
        for name, ino in starts:
            for entry in self._walk(name, ino):
                self._entry(entry)
        self.tar.finish()
        self.result.tar_bytes = self.tar.written
        self.result.data_bytes = self.tar.data_bytes

    # --- entries --------------------------------------------------------------------------

    def _entry(self, e: _Entry) -> None:
        node, mode = e.node, e.node.mode
        tar, res = self.tar, self.result
        if not stat.S_ISDIR(mode) and node.nlink > 1:
            first = self.first.get(e.ino)
            if first is not None:
                tar.header(e.name, b"1", node, 0, [], linkname=first)
                res.entries += 1
                res.links += 1
                return
            self.first[e.ino] = e.name
        if stat.S_ISREG(mode):
            self._file(e)
        elif stat.S_ISDIR(mode):
            tar.header(b"./" if e.name == b"." else e.name + b"/", b"5", node, 0, e.xattrs)
        elif stat.S_ISLNK(mode):
            tar.header(e.name, b"2", node, 0, e.xattrs, linkname=node.target)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            kind = b"3" if stat.S_ISCHR(mode) else b"4" if stat.S_ISBLK(mode) else b"6"
            tar.header(e.name, kind, node, 0, e.xattrs)
        else:
            log.warning("%s: a socket (or an unknown kind, mode %o): tar cannot hold it, "
                        "skipped", shown(e.name), mode)
            res.skipped += 1
            return
        res.entries += 1

    def _file(self, e: _Entry) -> None:
        size = e.node.size
        layout = None
        if e.node.blocks < -(-size // self.bs):  # the block map may have holes
            layout = self._layout(e.ino, size)
            if layout.data == size:
                layout = None
        if layout is None:
            self.tar.header(e.name, b"0", e.node, size, e.xattrs)
            if e.plan is not None:
                self.tar.data(e.plan, size)
            else:
                self._data(e.ino, size, [(0, size)] if size else [])
            self.tar.pad(size)
        else:
            self._sparse(e, layout)
        self.result.files += 1

    def _layout(self, ino: int, size: int) -> _Layout:
        """One pass over the block map: what the sparse map of the file will be."""
        count = data = end = 0
        map_len = 0
        for off, length in self._regions(ino, size):
            count += 1
            data += length
            end = off + length
            map_len += len(b"%d\n%d\n" % (off, length))
        tail = end < size or count == 0  # a final empty region says where the file ends
        if tail:
            count += 1
            map_len += len(b"%d\n0\n" % size)
        map_len += len(b"%d\n" % count)
        return _Layout(count, data, tail, map_len)

    def _sparse(self, e: _Entry, layout: _Layout) -> None:
        """PAX sparse format 1.0: the map (decimal lines: the number of regions,
        then offset and length of each; a final empty region at the size if the
        file ends in a hole), padded to a block, then the regions' bytes. The
        block map is read again for the map and for the data: the point is held,
        so it is the same each time, and nothing of it is kept in memory."""
        size = e.node.size
        map_size = -(-layout.map_len // BLOCK) * BLOCK
        tar = self.tar
        tar.header(e.name, b"0", e.node, map_size + layout.data, e.xattrs, sparse=size)
        written = tar.written
        tar.write(b"%d\n" % layout.count)
        for region in self._regions(e.ino, size):
            tar.write(b"%d\n%d\n" % region)
        if layout.tail:
            tar.write(b"%d\n0\n" % size)
        if tar.written - written != layout.map_len:
            raise CdpfsError(f"{shown(e.name)}: its block map changed during the export")
        tar.write(bytes(map_size - layout.map_len))
        if self._data(e.ino, size, self._regions(e.ino, size)) != layout.data:
            raise CdpfsError(f"{shown(e.name)}: its block map changed during the export")
        tar.pad(map_size + layout.data)
        self.result.sparse += 1

    def _regions(self, ino: int, size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of each run of blocks that hold data as of the point,
        from the block map (blocks with no version, or a hole, are holes)."""
        bs = self.bs
        nblocks = -(-size // bs)
        start = end = -1  # the run being built: blocks [start, end)
        first = 0
        while first < nblocks:
            with open_view(self.store, seq=self.seq) as view:
                batch = list(itertools.islice(view.block_indices(ino, first), INDICES))
                held = [i for i in batch if i < nblocks and view.allocated(ino, i)]
            for i in held:
                if i == end:
                    end += 1
                    continue
                if start >= 0:
                    yield start * bs, min(end * bs, size) - start * bs
                start, end = i, i + 1
            if len(batch) < INDICES or batch[-1] >= nblocks:
                break
            first = batch[-1] + 1
        if start >= 0:
            yield start * bs, min(end * bs, size) - start * bs

    def _data(self, ino: int, size: int, regions: Iterable[tuple[int, int]]) -> int:
        """The bytes of ``regions``, in order: read plans are made here (a short
        transaction for a batch), blocks fetched, checked and decompressed on the
        pool's threads; the writer keeps at most WINDOW batches under way. The
        number of bytes."""
        total = 0
        # A plan per block: a plan of several would join their bytes, a copy more.
        for piece in _batches(_pieces(regions, self.bs), BATCH):
            with open_view(self.store, seq=self.seq) as view:
                plans = [(view.plan(ino, off, n, size), n) for off, n in piece]
            for plan, n in plans:
                self.tar.data(plan, n)
                total += n
        return total


def _pieces(regions: Iterable[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the regions cut at multiples of ``size``."""
    for off, length in regions:
        end = off + length
        while off < end:
            n = min(size - off % size, end - off)
            yield off, n
            off += n


def _batches(items: Iterator[tuple[int, int]], n: int) -> Iterator[list[tuple[int, int]]]:
    while batch := list(itertools.islice(items, n)):
        yield batch


# --- the tar format ------------------------------------------------------------------------


def _time(ns: int) -> bytes:
    """A PAX time: seconds with a nine-digit fraction (a time before 1970 too)."""
    sign = b"-" if ns < 0 else b""
    sec, frac = divmod(abs(ns), 10**9)
    return b"%s%d.%09d" % (sign, sec, frac)


_MAX7 = 8**7 - 1  # the largest number of a 7-digit octal field (uid, gid, mode)
_MAX11 = 8**11 - 1  # ... of an 11-digit one (size, mtime)
_MAGIC = b"ustar\x0000"
_NO_OWNER = bytes(64)  # uname and gname left empty: extraction uses the numbers
_TAIL = bytes(BLOCK - 345)


def _ustar(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           linkname: bytes, rdev: int) -> bytes:
    """One ustar header block; every number fits its field (the caller saw to it)."""
    head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.ljust(100, b"\0"), mode, uid, gid, size, mtime)
    tail = b"%s%s%s%s%07o\0%07o\0%s" % (
        kind, linkname.ljust(100, b"\0"), _MAGIC, _NO_OWNER,
        os.major(rdev) & _MAX7, os.minor(rdev) & _MAX7, _TAIL)
    checksum = sum(head) + sum(tail) + 8 * 32  # the checksum field counts as spaces
    return head + b"%06o\0 " % checksum + tail


def _record(key: bytes, value: bytes) -> bytes:
    """One PAX record, ``LEN KEY=VALUE\\n``, LEN counting itself."""
    body = b" %s=%s\n" % (key, value)
    n = len(body) + len(str(len(body)))
    if len(str(n)) > len(str(len(body))):
        n += 1
    return b"%d%s" % (n, body)


def _ascii(name: bytes, limit: int) -> bytes:
    """A ustar-safe stand-in for a name given in full by a PAX record."""
    safe = bytes(c if 32 <= c < 127 else 0x5F for c in name)
    return safe[-limit:] if len(safe) > limit else safe


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Batch:
    """Reads of file data done in one task on the pool, in one read transaction."""

    __slots__ = ("future", "plans", "size")

    def __init__(self) -> None:
        self.plans: list[ReadPlan] = []
        self.size = 0
        self.future: Future[list[bytes]] | None = None


def _read_all(store: Store, plans: list[ReadPlan]) -> list[bytes]:
    with store.txn() as txn:
        return [plan.run(txn) for plan in plans]


class _TarWriter:
    """The archive in order: headers and padding (bytes) and file data (read on the
    pool's threads, a batch of small reads per task), each written out as soon as
    everything before it is. A damaged block fails its batch when its turn comes:
    nothing from there on is written.

    Attributes:
        written: bytes of the archive so far, those under way included.
        data_bytes: bytes of file data written out.
    """

    def __init__(self, out: BinaryIO, submit: Callable[[list[ReadPlan]], Future[list[bytes]]],
                 progress: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.submit = submit
        self.progress = progress
        self.written = 0
        self.data_bytes = 0
        self._queue: deque[bytes | tuple[_Batch, int, int]] = deque()
        self._open: _Batch | None = None  # the batch taking reads, not sent yet
        self._sent = 0  # batches sent whose data is not all written out
        self._queued = 0  # bytes of headers waiting in the queue

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written += len(data)
        if not self._queue:
            self.out.write(data)
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > QUEUED:
            self._drain(wait=True)

    def data(self, plan: ReadPlan, n: int) -> None:
        """``n`` bytes of file data, which ``plan`` reads: read with the next few (up
        to BATCH plans or CHUNK bytes) in one task."""
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
        batch.plans.append(plan)
        batch.size += n
        self.written += n
        self._queue.append((batch, len(batch.plans) - 1, n))
        if len(batch.plans) >= BATCH or batch.size >= CHUNK:
            self._send()
            self._drain(wait=self._sent > WINDOW)

    def _send(self) -> None:
        batch, self._open = self._open, None
        assert batch is not None
        batch.future = self.submit(batch.plans)
        self._sent += 1

    def _drain(self, wait: bool = False, everything: bool = False) -> None:
        queue = self._queue
        while queue:
            item = queue[0]
            if isinstance(item, tuple):
                batch, i, n = item
                if batch.future is None:
                    if not (wait or everything):
                        return
                    self._send()
                assert batch.future is not None
                if not batch.future.done() and not (wait or everything):
                    return
                data = batch.future.result()[i]
                if len(data) != n:
                    raise CdpfsError(f"a read returned {len(data)} bytes instead of {n}")
                if i == len(batch.plans) - 1:
                    self._sent -= 1
                self.data_bytes += n
                if self.progress is not None:
                    self.progress(n)
                wait = False
            else:
                data = item
                self._queued -= len(data)
            queue.popleft()
            self.out.write(data)

    def pad(self, size: int) -> None:
        self.write(_ZEROS[: -size % BLOCK])

    def header(self, name: bytes, kind: bytes, node: Inode, size: int,
               xattrs: list[tuple[bytes, bytes]], *, linkname: bytes = b"",
               sparse: int | None = None) -> None:
        """The PAX and ustar headers of one entry whose data is ``size`` bytes (every
        entry has a PAX header: its times have nanoseconds)."""
        records = [_record(b"mtime", _time(node.mtime)), _record(b"atime", _time(node.atime)),
                   _record(b"ctime", _time(node.ctime))]
        names: list[bytes] = []  # values hdrcharset speaks of
        if sparse is not None:  # the real name goes in the sparse records alone
            ustar_name = b"GNUSparseFile.0/" + _ascii(name.rsplit(b"/", 1)[-1], 100 - 16)
            records += [_record(b"GNU.sparse.major", b"1"), _record(b"GNU.sparse.minor", b"0"),
                        _record(b"GNU.sparse.name", name),
                        _record(b"GNU.sparse.realsize", b"%d" % sparse)]
            names.append(name)
        elif len(name) > 100:
            records.append(_record(b"path", name))
            names.append(name)
            ustar_name = _ascii(name, 100)
        else:
            ustar_name = name
        if len(linkname) > 100:
            records.append(_record(b"linkpath", linkname))
            names.append(linkname)
            linkname = _ascii(linkname, 100)
        uid, gid = node.uid, node.gid
        if uid > _MAX7:
            records.append(_record(b"uid", b"%d" % uid))
            uid = 0
        if gid > _MAX7:
            records.append(_record(b"gid", b"%d" % gid))
            gid = 0
        ustar_size = size
        if size > _MAX11:
            records.append(_record(b"size", b"%d" % size))
            ustar_size = 0
        for xname, value in xattrs:
            if b"=" in xname:
                log.warning("%s: extended attribute %s: a name with '=' cannot be put in "
                            "a PAX header, left out", shown(name), shown(xname))
                continue
            records.append(_record(b"SCHILY.xattr." + xname, value))
        if names and not all(_utf8(n) for n in names):
            records.insert(0, _record(b"hdrcharset", b"BINARY"))
        body = b"".join(records)
        mtime = min(max(node.mtime // 10**9, 0), _MAX11)
        rdev = node.rdev if kind in (b"3", b"4") else 0
        pax = _ustar(b"././@PaxHeader", b"x", 0o644, 0, 0, len(body), mtime, b"", 0)
        self.write(pax + body + _ZEROS[: -len(body) % BLOCK]
                   + _ustar(ustar_name, kind, stat.S_IMODE(node.mode), uid, gid, ustar_size,
                            mtime, linkname, rdev))

    def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record; then
        everything still under way, written out."""
        self.write(bytes(2 * BLOCK))
        self.write(bytes(-self.written % RECORD))
        self._drain(everything=True)
