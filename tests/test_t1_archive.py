"""Export and import in this process: a tar of a past point and a volume made from one.

A volume with every kind of entry (sparse files, hard links, symlinks, FIFOs,
devices, sockets, xattrs with binary values, odd and long names, nanosecond and
pre-1970 times, large owners) is changed after a moment; the export of that moment
is imported into a new store, which must show exactly the tree the first showed
at the moment: attributes, content, hard-link groups and which blocks are holes.
Then the refusals: paths that leave the volume or do not exist, a held moment
that prune must keep, a damaged block, and archives whose names escape the root
or that are truncated or garbage. Real stores, the real engine; no FUSE.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import stat
import tarfile
from pathlib import Path
from typing import Any

import lmdb
import pytest

from cdpfs.errors import Corrupt
from cdpfs.fs.tarimport import ImportRefused, import_tar
from cdpfs.history.export import CHUNK, ExportError, export_tar, held
from cdpfs.history.moments import BadMoment
from cdpfs.history.prune import prune_store
from cdpfs.history.retention import Policy, save_policy
from cdpfs.store import codec
from cdpfs.store.lmdb import Store
from cdpfs.store.schema import ROOT_INO
from cdpfs.store.view import open_view
from cdpfs.testing import FakeClock, LiveStore

BS = 128 * 1024
MIB = 1 << 20
S = 10**9


# --- building a volume ----------------------------------------------------------------


class Builder:
    """Entries made by path through a LiveStore's filesystem layer."""

    def __init__(self, live: LiveStore) -> None:
        self.live = live
        self.fs = live.fs

    def ino(self, path: bytes) -> int:
        ino = ROOT_INO
        for part in (p for p in path.split(b"/") if p):
            ino = self.live(lambda i=ino, p=part: self.fs.view.lookup(i, p))
            assert ino is not None, path
        return ino

    def _split(self, path: bytes) -> tuple[int, bytes]:
        parent, _, name = path.rpartition(b"/")
        return self.ino(parent), name

    def dir(self, path: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0) -> int:
        parent, name = self._split(path)
        ino = self.live(self.fs.mknod, parent, name, stat.S_IFDIR | mode, uid, gid).ino
        self.live(self.fs.setattr, ino, mode=mode)
        return int(ino)

    def file(self, path: bytes, data: bytes = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0, writes: list[tuple[int, bytes]] | None = None,
             size: int | None = None) -> int:
        parent, name = self._split(path)
        fh, entry = self.live(self.fs.create, parent, name, mode, os.O_RDWR, uid, gid)
        for off, piece in ([(0, data)] if data else []) + (writes or []):
            self.live(self.fs.write, fh, off, piece)
        if size is not None:
            self.live(self.fs.setattr, entry.ino, size=size)
        self.live(self.fs.release, fh)
        return int(entry.ino)

    def node(self, path: bytes, kind: int, mode: int = 0o644, rdev: int = 0,
             target: bytes = b"", uid: int = 0, gid: int = 0) -> int:
        parent, name = self._split(path)
        return int(self.live(self.fs.mknod, parent, name, kind | mode, uid, gid, rdev,
                             target).ino)

    def link(self, existing: bytes, path: bytes) -> None:
        parent, name = self._split(path)
        self.live(self.fs.link, self.ino(existing), parent, name)

    def xattr(self, path: bytes, name: bytes, value: bytes) -> None:
        self.live(self.fs.setxattr, self.ino(path), name, value)

    def times(self, path: bytes, mtime: int, atime: int | None = None) -> None:
        self.live(self.fs.setattr, self.ino(path), mtime=mtime, atime=atime)


ODD = [b"new\nline", b"\xff\xfe-not-utf8", "é-utf8 ünï".encode(), b"x" * 255,
       b"with = and spaces", b"-dash", b"tab\there"]
LONG_DIR = b"/".join([b"d" * 100] * 3)  # a path over 300 bytes


def build(live: LiveStore) -> dict[str, Any]:
    """Every kind of entry; returns what tests look up later."""
    rng = random.Random(20)
    b = Builder(live)
    b.live(b.fs.setattr, ROOT_INO, mode=0o751, uid=10, gid=20)
    b.xattr(b"", b"user.root", b"on the root")
    b.dir(b"docs", 0o2775, 1000, 1000)
    b.file(b"docs/readme.txt", b"read me\n" * 100, 0o640, 1000, 1001)
    big = rng.randbytes(3 * MIB) + b"text " * (3 * MIB // 5) + bytes(BS) + rng.randbytes(77)
    b.file(b"big.bin", big, 0o600, 4_000_000_000, 4_000_000_001)  # owners past ustar
    # sparse: data at the start and in the middle, ending in a hole
    b.file(b"sparse", writes=[(0, b"head" * 1024), (50 * MIB, rng.randbytes(200 * 1024))],
           size=100 * MIB)
    b.file(b"sparse-data-last", writes=[(30 * MIB + 5, b"tail data")])
    b.file(b"all-hole", size=10 * MIB)
    b.file(b"empty")
    b.file(b"setuid", b"#!/bin/sh\n", 0o4755)
    b.dir(b"a")
    b.dir(b"b")
    b.file(b"a/one", b"linked three times\n", 0o664, 7, 8)
    b.link(b"a/one", b"a/two")
    b.link(b"a/one", b"b/three")
    b.xattr(b"a/one", b"user.shared", b"by all names")
    b.node(b"link", stat.S_IFLNK, 0o777, target=b"docs/readme.txt", uid=5, gid=6)
    b.node(b"long-link", stat.S_IFLNK, 0o777, target=b"/".join([b"t" * 60] * 5))
    b.node(b"odd-link", stat.S_IFLNK, 0o777, target=b"\xff\n target")
    b.node(b"fifo", stat.S_IFIFO, 0o620, uid=33, gid=33)
    b.node(b"null", stat.S_IFCHR, 0o666, rdev=os.makedev(1, 3))
    b.node(b"disk", stat.S_IFBLK, 0o660, rdev=os.makedev(259, 70000), gid=6)
    b.dir(b"sticky", 0o1777)
    for name in ODD:
        b.file(b"sticky/" + name, name * 3)
    b.dir(b"d" * 100)
    b.dir(b"d" * 100 + b"/" + b"d" * 100)
    b.dir(LONG_DIR)
    b.file(LONG_DIR + b"/" + b"f" * 200, b"deep")
    b.dir(b"many")
    for i in range(600):  # more than a listing page
        b.file(b"many/%04d" % i, b"%d" % i)
    b.xattr(b"big.bin", b"user.bin", b"\x00\xff\n=value")
    b.xattr(b"big.bin", b"user.big", bytes(range(256)) * 16)
    b.xattr(b"docs", b"user.dir", b"on a directory")
    b.xattr(b"link", b"trusted.on-link", b"on a symlink")
    b.times(b"docs/readme.txt", 1_600_000_000_123_456_789, 1_600_000_001_000_000_001)
    b.times(b"big.bin", -1_234_567_891)  # before 1970
    b.times(b"link", 1_500_000_000_999_999_999)
    b.times(b"docs", 1_400_000_000_000_000_007)
    b.times(b"", 1_300_000_000_000_000_003)
    return {"big": big}


def change(live: LiveStore) -> None:
    """Changes after the moment: none may show in its export."""
    b = Builder(live)
    fh = b.live(b.fs.open, b.ino(b"big.bin"), os.O_RDWR)
    b.live(b.fs.write, fh, 100, b"CHANGED")
    b.live(b.fs.release, fh)
    b.live(b.fs.unlink, b.ino(b"docs"), b"readme.txt")
    b.live(b.fs.unlink, b.ino(b"a"), b"two")
    b.live(b.fs.setattr, b.ino(b"fifo"), mode=0o600, uid=0)
    b.live(b.fs.rename, ROOT_INO, b"sparse", ROOT_INO, b"sparse-renamed", 0)
    b.file(b"new-after", b"not at the moment")
    b.live(b.fs.setxattr, b.ino(b"a/one"), b"user.shared", b"changed")


# --- what a tree shows ------------------------------------------------------------------


def tree(store: Store, seq: int | None = None) -> dict[bytes, tuple[Any, ...]]:
    """path -> everything exported and imported: kind and mode, owner, size, times,
    device, target, xattrs, nlink, content hash, blocks that are not holes, and the
    other names of the same inode."""
    out: dict[bytes, tuple[Any, ...]] = {}
    names: dict[int, list[bytes]] = {}
    with open_view(store, seq=seq) as view:
        todo = [(ROOT_INO, b".")]
        while todo:
            ino, path = todo.pop()
            node = view.inode(ino)
            assert node is not None
            names.setdefault(ino, []).append(path)
            digest = held_blocks = None
            if node.is_reg:
                digest = hashlib.sha256(view.read(ino, 0, node.size, node.size)).hexdigest()
                held_blocks = tuple(i for i in view.block_indices(ino)
                                    if i * store.block_size < node.size
                                    and view.allocated(ino, i))
            xattrs = tuple((x, view.xattr(ino, x)) for x in view.xattrs(ino))
            out[path] = (node.mode, node.uid, node.gid, node.size, node.mtime, node.atime,
                         node.rdev, node.target, xattrs, node.nlink, digest, held_blocks, ino)
            if node.is_dir:
                todo += [(child, path + b"/" + name) for name, child in view.listdir(ino)]
    return {p: (*v[:-1], tuple(sorted(names[v[-1]]))) for p, v in out.items()}


def export_bytes(store: Store, moment: str, paths: tuple[str, ...] = ()) -> tuple[bytes, int]:
    out = io.BytesIO()
    with held(store, moment) as point:
        export_tar(store, point.seq, out, paths)
    return out.getvalue(), point.seq


def import_bytes(data: bytes, target: Path) -> Store:
    import_tar(io.BytesIO(data), target)
    return Store(target)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, int, dict[str, Any]]:
    """A store built, then changed after the moment it returns."""
    path = tmp_path / "vol.store"
    with LiveStore(path) as live:
        info = build(live)
        b = Builder(live)
        b.node(b"socket", stat.S_IFSOCK, 0o755)  # tar cannot hold it
        live.sync()
        seq = live.seq()
        change(live)
        live.sync()
    return path, seq, info


# --- the round trip -----------------------------------------------------------------------


def test_an_export_imported_shows_the_tree_of_its_moment(
        built: tuple[Path, int, dict[str, Any]], tmp_path: Path) -> None:
    path, seq, _ = built
    with Store(path) as store:
        data, got = export_bytes(store, f"#{seq}")
        want = tree(store, seq)
        assert tree(store) != want  # the changes after the moment are there now
    assert got == seq
    del want[b"./socket"]
    with import_bytes(data, tmp_path / "copy.store") as copy:
        have = tree(copy)
    assert set(have) == set(want)
    for p in want:
        assert have[p] == want[p], p
    # an export is a function of the point: the same bytes each time, and the same
    # again from the imported copy (ctime aside, which a copy cannot keep)
    with Store(path) as store:
        assert export_bytes(store, f"#{seq}")[0] == data


def test_the_archive_is_pax_with_sparse_maps_exact_times_and_binary_xattrs(
        built: tuple[Path, int, dict[str, Any]]) -> None:
    path, seq, info = built
    with Store(path) as store:
        data, _ = export_bytes(store, f"#{seq}")
    assert len(data) % (20 * 512) == 0 and data[-1024:] == bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as tar:
        members = {m.name.encode("utf-8", "surrogateescape"): m for m in tar}
        assert b"socket" not in members
        sparse = members[b"sparse"]
        assert sparse.size == 100 * MIB
        assert sparse.sparse == [(0, BS), (50 * MIB, 2 * BS), (100 * MIB, 0)]
        assert sparse.pax_headers["GNU.sparse.major"] == "1"
        assert members[b"all-hole"].sparse == [(10 * MIB, 0)]
        assert members[b"sparse-data-last"].sparse == [(30 * MIB, 30 * MIB + 14 - 30 * MIB)]
        readme = members[b"docs/readme.txt"].pax_headers
        assert (readme["mtime"], readme["atime"]) == ("1600000000.123456789",
                                                      "1600000001.000000001")
        assert members[b"big.bin"].pax_headers["mtime"] == "-1.234567891"
        assert members[b"big.bin"].uid == 4_000_000_000
        assert members[b"big.bin"].pax_headers["SCHILY.xattr.user.bin"].encode(
            "utf-8", "surrogateescape") == b"\x00\xff\n=value"
        f = tar.extractfile(members[b"big.bin"])
        assert f is not None and f.read() == info["big"]
        links = [m for m in members.values() if m.islnk()]
        assert sorted((m.name, m.linkname) for m in links) == [("a/two", "a/one"),
                                                               ("b/three", "a/one")]
        assert members[b"disk"].devmajor == 259 and members[b"disk"].devminor == 70000
        assert members[b"./"].isdir() if b"./" in members else members[b"."].isdir()
        assert members[b"long-link"].linkname == "/".join(["t" * 60] * 5)
        assert LONG_DIR + b"/" + b"f" * 200 in members


def test_subtrees_export_alone_and_paths_that_leave_or_miss_are_refused(
        built: tuple[Path, int, dict[str, Any]]) -> None:
    path, seq, _ = built
    with Store(path) as store:
        data, _ = export_bytes(store, f"#{seq}", ("b", "docs/../a/", "a/one", "./b/three"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            got = [(m.name, m.type) for m in tar]
        # a/one is inside a, given too; b/three's first name here carries the data
        assert got == [("b", tarfile.DIRTYPE), ("b/three", tarfile.REGTYPE),
                       ("a", tarfile.DIRTYPE), ("a/one", tarfile.LNKTYPE),
                       ("a/two", tarfile.LNKTYPE)]
        for bad, why in (("..", "leads out of the volume"),
                         ("a/../../etc", "leads out of the volume"),
                         ("docs/readme.txt/x", "not a directory"),
                         ("link/x", "a symbolic link"),
                         ("new-after", "no such file or directory at"),
                         ("nothing", "no such file")):
            with held(store, f"#{seq}") as point, pytest.raises(ExportError, match=why):
                export_tar(store, point.seq, io.BytesIO(), (bad,))


def test_a_held_moment_survives_a_prune_that_would_thin_it(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "vol.store"
    with LiveStore(path, clock=clock) as live:
        save = Builder(live)
        save.file(b"f", b"first")
        live.sync()
        first = live.seq()
        clock.advance(10)
        fh = live(live.fs.open, save.ino(b"f"), os.O_RDWR)
        live(live.fs.write, fh, 0, b"later")
        live(live.fs.release, fh)
        live.sync()
    with Store(path) as store:
        with store.txn(write=True) as txn:  # keep every write 1 minute, then nothing
            save_policy(store, txn, Policy(keep_all=60, minutely=60, hourly=60, daily=60))
        later = clock.now + 3600 * S
        with held(store, f"#{first}", now_ns=clock.now) as point:
            prune_store(store, keep_after=None, now_ns=later)
            out = io.BytesIO()
            export_tar(store, point.seq, out)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            f = tar.extractfile("f")
            assert f is not None and f.read() == b"first"
        prune_store(store, keep_after=None, now_ns=later)  # the hold is gone now
        with open_view(store, seq=first) as view:  # and so is what it kept
            ino = view.lookup(ROOT_INO, b"f")
            assert ino is None or view.inode(ino) is None
        with pytest.raises(BadMoment, match="not kept"), \
                held(store, f"#{first}", now_ns=later):
            pass


def flip_block(path: Path, key: bytes) -> None:
    """Flip one byte in the middle of stored block ``key`` (store closed)."""
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=32)
    try:
        db = env.open_db(b"blocks", create=False)
        with env.begin(write=True) as txn:
            value = txn.get(key, db=db)
            assert value is not None
            i = len(value) // 2
            txn.put(key, value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1:], db=db)
    finally:
        env.close()


def test_a_damaged_block_ends_the_export_before_any_wrong_byte(tmp_path: Path) -> None:
    path = tmp_path / "vol.store"
    content = random.Random(5).randbytes(40 * BS)  # incompressible: each block stored raw
    with LiveStore(path) as live:
        b = Builder(live)
        b.file(b"a-before", b"intact")
        b.file(b"victim", content)
        live.sync()
    bad = 30  # a block a few chunks in: the chunks before it are written
    flip_block(path, codec.digest(content[bad * BS:(bad + 1) * BS]))
    out = io.BytesIO()
    with Store(path) as store, held(store, "now") as point, pytest.raises(Corrupt) as exc:
        export_tar(store, point.seq, out)
    assert "file block 30" in str(exc.value)
    data = out.getvalue()
    start = data.index(content[:BS])  # where the victim's data begins
    written = data[start:]
    assert 0 < len(written) <= bad * BS // CHUNK * CHUNK  # not one byte of the bad chunk
    assert written == content[:len(written)]
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            if m.isreg():
                tar.extractfile(m).read()  # type: ignore[union-attr]


# --- import -------------------------------------------------------------------------------


def make_tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT,
             ) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


@pytest.mark.parametrize(("members", "why"), [
    ([entry("../evil")], "with '..'"),
    ([entry("ok/../../evil")], "with '..'"),
    ([entry("/etc/passwd")], "an absolute name"),
    ([entry("etc", tarfile.SYMTYPE, "/etc"), entry("etc/passwd")],
     "goes through the symbolic link etc"),
    ([entry("d", tarfile.DIRTYPE), entry("d/l", tarfile.SYMTYPE, ".."),
      entry("d/l/x", tarfile.DIRTYPE)], "goes through the symbolic link d/l"),
    ([entry("h", tarfile.LNKTYPE, "../outside")], "hard link target with '..'"),
    ([entry("h", tarfile.LNKTYPE, "/etc/shadow")], "absolute hard link target"),
    ([entry("h", tarfile.LNKTYPE, "missing")], "not in the archive before it"),
    ([entry("l", tarfile.SYMTYPE, "/etc"), entry("h", tarfile.LNKTYPE, "l/shadow")],
     "symbolic link l"),
    ([entry("@-1h")], "reserved for history"),
    ([entry("./@now/x")], "reserved for history"),
])
def test_names_that_escape_the_root_are_refused_and_nothing_is_kept(
        tmp_path: Path, members: list[tarfile.TarInfo], why: str) -> None:
    data = make_tar(*[(m, b"x") for m in members])
    target = tmp_path / "new.store"
    with pytest.raises(ImportRefused, match=why) as exc:
        import_tar(io.BytesIO(data), target)
    assert "\n" not in str(exc.value)
    assert os.listdir(tmp_path) == []  # no store, nothing left beside it


def good_tar() -> bytes:
    big = entry("big")
    return make_tar((entry("dir", tarfile.DIRTYPE), b""), (entry("dir/a"), b"a" * 5000),
                    (big, random.Random(3).randbytes(3 * 10240)), (entry("z"), b"z"))


@pytest.mark.parametrize("cut", ["header", "data", "marker", "garbage-after", "garbage",
                                 "empty", "gzip-truncated"])
def test_a_truncated_or_garbled_archive_is_refused(tmp_path: Path, cut: str) -> None:
    data = good_tar()
    first_data = 1024  # the dir's header, then dir/a's: its data starts here
    damaged = {
        "header": data[:512 * 3 + 100],  # inside a header
        "data": data[:first_data + 700],  # inside dir/a's data
        "marker": data.rstrip(b"\0") + bytes(-len(data.rstrip(b"\0")) % 512),  # no end
        "garbage-after": data[:2048] + random.Random(1).randbytes(2048),
        "garbage": random.Random(2).randbytes(8192),
        "empty": b"",
        "gzip-truncated": gzip.compress(data)[:-200],
    }[cut]
    target = tmp_path / "new.store"
    with pytest.raises(ImportRefused, match=r"truncated or damaged|not a tar archive"):
        import_tar(io.BytesIO(damaged), target)
    assert os.listdir(tmp_path) == []


def test_the_target_must_be_missing_or_an_empty_directory(tmp_path: Path) -> None:
    data = good_tar()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("in the way")
    with pytest.raises(ImportRefused, match="exists and is not empty"):
        import_tar(io.BytesIO(data), full)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ImportRefused, match="not a directory"):
        import_tar(io.BytesIO(data), afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_tar(io.BytesIO(data), empty).path == empty  # an empty directory is fine
    with pytest.raises(ImportRefused, match="is a cdpfs store already"):
        import_tar(io.BytesIO(data), empty)
    with Store(empty) as store, open_view(store) as view:
        assert view.read_file("dir/a") == b"a" * 5000
    assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "full"]


def test_gnu_and_compressed_archives_with_long_names_import(tmp_path: Path) -> None:
    long = "L" * 150 + "/" + "n" * 200
    members = [(entry("L" * 150, tarfile.DIRTYPE), b""), (entry(long), b"long"),
               (entry("s", tarfile.SYMTYPE, "t" * 150), b""),
               (entry("h", tarfile.LNKTYPE, long), b"")]
    for i, fmt in enumerate((tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)):
        for j, pack in enumerate((lambda d: d, gzip.compress)):
            target = tmp_path / f"s{i}{j}"
            result = import_tar(io.BytesIO(pack(make_tar(*members, fmt=fmt))), target)
            assert (result.files, result.dirs, result.symlinks, result.links) == (1, 1, 1, 1)
            with Store(target) as store, open_view(store) as view:
                assert view.read_file(long) == b"long"
                assert view.read_file("h") == b"long"
                assert view.readlink(view.resolve("s")) == b"t" * 150
                node = view.inode(view.resolve("h"))
                assert node is not None and node.nlink == 2


def test_bsdtar_xattrs_and_acls_are_read_and_acls_reported(tmp_path: Path) -> None:
    info = entry("f")
    info.pax_headers = {"LIBARCHIVE.xattr.user.caf%C3%A9%3D": "AP8K",  # base64 of 00 ff 0a
                        "SCHILY.xattr.user.plain": "v",
                        "SCHILY.xattr.system.posix_acl_access": "\x02\x00\x00\x00"}
    result = import_tar(io.BytesIO(make_tar((info, b"data"))), tmp_path / "s")
    assert len(result.warnings) == 1 and "POSIX ACL" in result.warnings[0]
    with Store(tmp_path / "s") as store, open_view(store) as view:
        ino = view.resolve("f")
        assert view.xattr(ino, "user.café=".encode()) == b"\x00\xff\n"
        assert view.xattr(ino, b"user.plain") == b"v"
        assert view.xattr(ino, b"system.posix_acl_access") is None


def test_a_later_member_of_the_same_name_replaces_the_earlier(tmp_path: Path) -> None:
    first, second = entry("x"), entry("x", tarfile.DIRTYPE)
    data = make_tar((first, b"file first"), (second, b""), (entry("x/in"), b"inside"),
                    (entry("y"), b"one"), (entry("y"), b"two"))
    import_tar(io.BytesIO(data), tmp_path / "s")
    with Store(tmp_path / "s") as store, open_view(store) as view:
        assert view.read_file("x/in") == b"inside"
        assert view.read_file("y") == b"two"
