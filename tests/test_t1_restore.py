"""The restore engine on real directories: make a destination tree equal to a source tree."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import privileged

from cdpfs.errors import CdpfsError
from cdpfs.mount.restore import CHUNK, Summary, measure, restore_tree

T0 = 1_600_000_000_123_456_789  # an mtime with nanoseconds that matter
# atimes an hour ahead: under relatime no read (nor readlink, which has no O_NOATIME) moves them
FUTURE = time.time_ns() + 3600 * 10**9

needs_root = pytest.mark.skipif(not privileged(), reason="needs root (chown, mknod)")


def _has_user_xattrs(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def xattrs(tmp_path: Path) -> None:
    if not _has_user_xattrs(tmp_path):
        pytest.skip("the tmp filesystem has no user.* xattrs")


def _times(path: Path, i: int) -> None:
    os.utime(path, ns=(FUTURE + 7 * i + 1, T0 + 11 * i), follow_symlinks=False)


def _settle(root: Path) -> Path:
    """Give every entry its own ns times, children before their directory."""
    paths = sorted(root.rglob("*"), key=lambda p: -len(p.parts)) if root.is_dir() else []
    for i, path in enumerate([*paths, root]):
        _times(path, i)
    return root


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything restore must reproduce, by relative path; reads without touching atimes."""
    out: dict[str, tuple[object, ...]] = {}

    def walk(path: Path, rel: str) -> None:
        st = os.lstat(path)
        xattrs: dict[str, bytes] = {}
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path)}
        body: object = None
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
            try:
                body = b"".join(iter(lambda: os.read(fd, CHUNK), b""))
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            body = st.st_rdev
        mode = st.st_mode if not stat.S_ISLNK(st.st_mode) else stat.S_IFLNK
        out[rel] = (mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns, body, xattrs)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for name in names:
                walk(path / name, f"{rel}/{name}")

    walk(root, ".")
    return out


def _same(src: Path, dst: Path) -> None:
    want, have = _snapshot(src), _snapshot(dst)
    assert have.keys() == want.keys()
    for rel, attrs in want.items():
        assert have[rel] == attrs, rel


def _tree(root: Path, xattrs: bool = True) -> Path:
    """A small tree of every kind, with modes, owners, ns times and xattrs."""
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "big.bin").write_bytes(os.urandom(CHUNK * 2 + 12345))
    (root / "empty").touch()
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "deep" / "leaf").write_bytes(b"leaf")
    os.chmod(root / "sub" / "deep" / "leaf", 0o640)
    (root / "sub" / "sticky").mkdir()
    os.chmod(root / "sub" / "sticky", 0o1777)
    (root / "sub" / "sgid").mkdir()
    os.chmod(root / "sub" / "sgid", 0o2750)
    os.symlink("a.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    if privileged():  # other owners (without the powers of root, every owner is the caller)
        os.chown(root / "a.txt", 1234, 5678)
        os.chown(root / "sub" / "deep", 1234, 5678)
        os.chown(root / "dangling", 1234, 5678, follow_symlinks=False)

    if xattrs:
        os.setxattr(root / "a.txt", "user.note", b"hello")
        os.setxattr(root / "sub", "user.dir", b"\x00binary\xff")
    return _settle(root)


def _no_change(s: Summary) -> bool:
    return (s.files_written, s.bytes_written, s.created, s.replaced, s.removed, s.attrs_set,
            s.warnings) == (0, 0, 0, 0, 0, 0, [])


# --- regular files ---------------------------------------------------------------------------

def test_changed_file_keeps_inode_and_rewrites_one_chunk(tmp_path: Path) -> None:
    data = bytearray(os.urandom(8 * CHUNK))
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    data[5 * CHUNK + 3] ^= 0xFF
    dst.write_bytes(data)
    os.link(dst, tmp_path / "other-name")
    _times(src, 1)
    ino = os.stat(dst).st_ino
    handle = os.open(dst, os.O_RDONLY)
    seen: list[int] = []
    try:
        s = restore_tree(src, dst, progress=seen.append)
        assert os.pread(handle, 8 * CHUNK, 0) == src.read_bytes()  # an open handle sees it
    finally:
        os.close(handle)
    assert os.stat(dst).st_ino == ino
    assert (tmp_path / "other-name").read_bytes() == src.read_bytes()
    assert (s.files_written, s.bytes_written, s.warnings) == (1, CHUNK, [])
    assert sum(seen) == 8 * CHUNK and len(seen) == 8
    _same(src, dst)


@pytest.mark.parametrize("dst_size", [0, 100, 3 * CHUNK + 5, 5 * CHUNK])
def test_file_grows_and_shrinks(tmp_path: Path, dst_size: int) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(3 * CHUNK + 17))
    dst.write_bytes(src.read_bytes()[:dst_size] + b"x" * max(0, dst_size - src.stat().st_size))
    s = restore_tree(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert s.files_written == 1 and s.warnings == []


def test_sparse_zeros_past_the_end_are_not_written(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.write(b"head")
        f.truncate(4 * CHUNK)
    s = restore_tree(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert (s.created, s.files_written, s.bytes_written) == (1, 1, CHUNK)
    assert dst.stat().st_blocks * 512 < 2 * CHUNK


@needs_root
def test_only_attributes_differ(tmp_path: Path, xattrs: None) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"same")
    os.chown(src, 1234, 5678)
    os.chmod(src, 0o6750)
    os.setxattr(src, "user.keep", b"new")
    _times(src, 1)
    dst.write_bytes(b"same")
    os.chmod(dst, 0o6750)
    os.setxattr(dst, "user.keep", b"old")
    os.setxattr(dst, "user.gone", b"x")
    s = restore_tree(src, dst)
    assert (s.files_written, s.bytes_written, s.attrs_set, s.unchanged) == (0, 0, 1, 0)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o6750  # chown cleared the bits; set again after
    _same(src, dst)


# --- trees -----------------------------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("dst_exists", [False, True])
def test_deleted_tree_comes_back(tmp_path: Path, xattrs: None, dst_exists: bool) -> None:
    src = _tree(tmp_path / "src")
    dst = tmp_path / "dst"
    if dst_exists:
        dst.mkdir()
        (dst / "sub").mkdir()
        (dst / "a.txt").write_bytes(b"changed")
    s = restore_tree(src, dst)
    _same(src, dst)
    assert s.warnings == []
    assert s.created == measure(src)[0] - (3 if dst_exists else 0)
    assert dst.stat().st_uid == os.getuid()
    assert (dst / "a.txt").stat().st_uid == 1234 and (dst / "a.txt").stat().st_gid == 5678
    assert os.lstat(dst / "dangling").st_uid == 1234


@needs_root
def test_deleted_file_and_subtree_come_back(tmp_path: Path, xattrs: None) -> None:
    src = _tree(tmp_path / "src")
    dst = tmp_path / "dst"
    restore_tree(src, dst)
    (dst / "a.txt").unlink()
    shutil.rmtree(dst / "sub")
    s = restore_tree(src / "a.txt", dst / "a.txt")  # one file by its own path
    assert (s.created, s.files_written, s.bytes_written) == (1, 1, 6)
    s = restore_tree(src, dst)
    assert (s.created, s.files_written, s.warnings) == (5, 1, [])  # sub, deep, leaf, 2 dirs
    assert s.unchanged == measure(src)[0] - 5 - 1  # all but those and the root's mtime
    _same(src, dst)


def test_equal_tree_is_unchanged(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", xattrs=_has_user_xattrs(tmp_path))
    dst = tmp_path / "dst"
    restore_tree(src, dst)
    seen: list[int] = []
    s = restore_tree(src, dst, progress=seen.append)
    assert _no_change(s), s
    entries, size = measure(src)
    assert s.unchanged == entries
    assert sum(seen) == size
    _same(src, dst)


def test_extras_kept_without_delete_removed_with_it(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", xattrs=False)
    dst = tmp_path / "dst"
    restore_tree(src, dst)
    (dst / "extra.txt").write_bytes(b"x")
    (dst / "sub" / "extra-dir" / "inner").mkdir(parents=True)
    (dst / "sub" / "extra-dir" / "inner" / "f").write_bytes(b"y")
    s = restore_tree(src, dst)
    assert (s.extras_kept, s.removed) == (2, 0)
    assert (dst / "extra.txt").exists() and (dst / "sub" / "extra-dir" / "inner" / "f").exists()
    s = restore_tree(src, dst, delete=True)
    assert (s.extras_kept, s.removed, s.warnings) == (0, 4, [])
    _same(src, dst)


# --- types -----------------------------------------------------------------------------------

def _kind(path: Path) -> str:
    return stat.filemode(os.lstat(path).st_mode)[0]


def test_type_mismatches_both_ways(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "was-dir").write_bytes(b"now a file")
    (src / "was-file" / "x").mkdir(parents=True)
    (src / "was-link").mkdir()
    (src / "was-fifo").write_bytes(b"file")
    os.symlink("target", src / "now-link")
    _settle(src)
    dst.mkdir()
    (dst / "was-dir" / "deep").mkdir(parents=True)
    (dst / "was-dir" / "deep" / "f").write_bytes(b"old")
    (dst / "was-file").write_bytes(b"old")
    os.symlink(".", dst / "was-link")
    os.mkfifo(dst / "was-fifo")
    (dst / "now-link").write_bytes(b"old")
    s = restore_tree(src, dst)
    assert s.replaced == 5 and s.warnings == []
    assert [_kind(dst / n) for n in ("was-dir", "was-file", "was-link", "was-fifo", "now-link")] \
        == ["-", "d", "d", "-", "l"]
    _same(src, dst)


def test_top_level_type_mismatch(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"file")
    (dst / "x").mkdir(parents=True)
    s = restore_tree(src, dst)
    assert s.replaced == 1 and dst.read_bytes() == b"file"


def test_symlinks_are_restored_as_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "real").write_bytes(b"r")
    os.symlink("real", src / "rel")
    os.symlink("/nonexistent/nowhere", src / "dangling")
    os.symlink(str(tmp_path / "elsewhere"), src / "absolute-dir")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "big").write_bytes(b"not to be copied")
    _settle(src)
    dst.mkdir()
    os.symlink("other", dst / "rel")  # a different target: recreated
    s = restore_tree(src, dst)
    assert s.warnings == []
    for name in ("rel", "dangling", "absolute-dir"):
        assert os.readlink(dst / name) == os.readlink(src / name)
    _same(src, dst)
    # a symlink as the restored root is itself restored, not followed
    s = restore_tree(src / "absolute-dir", tmp_path / "link-copy")
    assert os.readlink(tmp_path / "link-copy") == str(tmp_path / "elsewhere")


def test_symlink_in_dst_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    os.chmod(outside / "victim", 0o600)
    before = _snapshot(outside)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "sub" / "inner").mkdir(parents=True)
    (src / "sub" / "victim").write_bytes(b"evil")
    (src / "sub" / "inner" / "f").write_bytes(b"evil")
    (src / "victim").write_bytes(b"evil")
    os.chmod(src / "victim", 0o777)
    _settle(src)
    dst.mkdir()
    os.symlink(outside, dst / "sub")
    os.symlink(outside / "victim", dst / "victim")
    os.symlink(outside, dst / "extra")
    s = restore_tree(src, dst, delete=True)
    assert s.warnings == []
    assert _snapshot(outside) == before
    assert _kind(dst / "sub") == "d" and _kind(dst / "victim") == "-"
    assert not os.path.lexists(dst / "extra")
    _same(src, dst)
    # the restored root itself a symlink pointing out
    dst2 = tmp_path / "dst2"
    os.symlink(outside, dst2)
    restore_tree(src / "sub", dst2, delete=True)
    assert _snapshot(outside) == before
    assert _kind(dst2) == "d"


def test_hard_links_are_preserved(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x").write_bytes(b"shared" * 1000)
    os.link(src / "a" / "x", src / "b" / "y")
    os.link(src / "a" / "x", src / "z")
    (src / "p").write_bytes(b"p")
    (src / "q").write_bytes(b"q")
    _settle(src)
    dst.mkdir()
    (dst / "p").write_bytes(b"old")
    os.link(dst / "p", dst / "q")  # linked in dst, separate in src: to be broken apart
    (dst / "z").write_bytes(b"stale")
    s = restore_tree(src, dst)
    assert s.warnings == []
    inos = {os.stat(dst / n).st_ino for n in ("a/x", "b/y", "z")}
    assert len(inos) == 1 and os.stat(dst / "z").st_nlink == 3
    assert os.stat(dst / "p").st_ino != os.stat(dst / "q").st_ino
    assert ((dst / "p").read_bytes(), (dst / "q").read_bytes()) == (b"p", b"q")
    _same(src, dst)
    s = restore_tree(src, dst)
    assert _no_change(s), s
    assert measure(src) == (8, 6000 + 2)


@needs_root
def test_fifo_and_device_nodes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o620)
    os.chown(src / "fifo", 1234, 5678)
    try:
        os.mknod(src / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("no CAP_MKNOD")
    dst.mkdir()
    (dst / "fifo").write_bytes(b"a file where a FIFO belongs")
    os.mknod(dst / "null", stat.S_IFCHR | 0o644, os.makedev(1, 5))
    _settle(src)
    s = restore_tree(src, dst)
    assert s.replaced == 2 and s.warnings == []
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    _same(src, dst)


# --- options and errors ------------------------------------------------------------------------

def test_skip_root_protects_names_on_both_sides(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "@old").mkdir(parents=True)
    (src / "@old" / "f").write_bytes(b"history")
    (src / "sub" / "@nested").mkdir(parents=True)  # only the top level is skipped
    (src / "keep").write_bytes(b"k")
    (dst / "@2026-01-01").mkdir(parents=True)
    (dst / "@2026-01-01" / "f").write_bytes(b"past")
    (dst / "extra").write_bytes(b"e")

    def skip(name: str) -> bool:
        return name.startswith("@")

    s = restore_tree(src, dst, delete=True, skip_root=skip)
    assert s.warnings == [] and s.removed == 1
    assert sorted(os.listdir(dst)) == ["@2026-01-01", "keep", "sub"]
    assert (dst / "@2026-01-01" / "f").read_bytes() == b"past"
    assert (dst / "sub" / "@nested").is_dir()


def test_measure(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", xattrs=False)
    assert measure(src) == (13, 6 + CHUNK * 2 + 12345 + 10 + 4)
    assert measure(src / "a.txt") == (1, 6)
    assert measure(src / "rel-link") == (1, 0)


def test_an_entry_error_is_a_warning_and_the_rest_goes_on(tmp_path: Path) -> None:
    if not shutil.which("chattr") or not privileged():
        pytest.skip("needs chattr and root")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(b"new " + name.encode())
    dst.mkdir()
    (dst / "b").write_bytes(b"old")
    if subprocess.run(["chattr", "+i", dst / "b"], capture_output=True).returncode:
        pytest.skip("chattr +i not supported here")
    try:
        s = restore_tree(src, dst)
    finally:
        subprocess.run(["chattr", "-i", dst / "b"], check=True)
    assert s.warnings == ["b: Operation not permitted"]
    assert (dst / "a").read_bytes() == b"new a" and (dst / "c").read_bytes() == b"new c"
    assert (dst / "b").read_bytes() == b"old"


def test_keyboard_interrupt_is_not_swallowed(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", xattrs=False)

    def stop(n: int) -> None:
        if n:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        restore_tree(src, tmp_path / "dst", progress=stop)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: Path("/")])
def test_unreachable_source_raises(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    with pytest.raises(CdpfsError):
        restore_tree(make(tmp_path), tmp_path / "dst")


# --- reaching src and dst from their roots ---------------------------------------------------


def _outside(tmp_path: Path) -> tuple[Path, dict[str, tuple[object, ...]]]:
    """A directory no restore may touch, and what it holds."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"precious")
    return outside, _snapshot(outside)


def test_dst_is_reached_from_its_root_never_through_a_link(tmp_path: Path) -> None:
    """A directory on the way from dst_root to dst swapped for a link that leads
    out (after the caller checked the path) is not followed: nothing is written."""
    outside, before = _outside(tmp_path)
    src = _tree(tmp_path / "src", xattrs=False)
    root = tmp_path / "vol"
    (root / "a").mkdir(parents=True)
    os.symlink(outside, root / "b")
    for dst in (root / "b" / "dst", root / "b" / "sentinel", root / "a" / ".." / "b" / "x"):
        with pytest.raises(CdpfsError) as caught:
            restore_tree(src, dst, dst_root=root, delete=True)
        assert "symbolic link" in str(caught.value) or "'..'" in str(caught.value)
    with pytest.raises(CdpfsError, match="symbolic link"):
        measure(root / "b" / "sentinel", root=root)
    assert _snapshot(outside) == before
    assert sorted(os.listdir(root)) == ["a", "b"] and os.listdir(root / "a") == []


def test_dst_ending_in_dotdot_is_refused(tmp_path: Path) -> None:
    """``dst/..`` names dst's parent: never made the destination (it once made a
    restore of MNT/.. write the volume's files next to the mount point)."""
    outside, _ = _outside(tmp_path)
    (outside / "vol").mkdir()
    before = _snapshot(outside)
    src = _tree(tmp_path / "src", xattrs=False)
    for dst, root in [(outside / "vol" / "..", None), (outside / "vol" / "..", outside / "vol"),
                      (outside / "vol" / "x" / ".." / "..", outside / "vol")]:
        with pytest.raises(CdpfsError, match=r"'\.\.'"):
            restore_tree(src, dst, delete=True, **({} if root is None else {"dst_root": root}))
    assert _snapshot(outside) == before


def test_a_root_is_restored_in_place(tmp_path: Path) -> None:
    """dst equal to dst_root (a rewind of a whole mount) is made equal to src
    through the root's own descriptor: never by its name in the directory above."""
    src = _tree(tmp_path / "src", xattrs=False)
    root = tmp_path / "root"
    root.mkdir()
    (root / "extra").write_bytes(b"extra")
    s = restore_tree(src, root, src_root=src, dst_root=root, delete=True)
    assert s.warnings == [] and s.removed == 1
    _same(src, root)
    assert _no_change(restore_tree(src, root, src_root=src, dst_root=root, delete=True))
    assert measure(src, root=src) == measure(src)


def test_dst_root_on_another_device_is_refused(tmp_path: Path) -> None:
    """``dst_dev``: the root must still be the filesystem the caller located (a
    mount point whose volume was unmounted meanwhile is a plain directory)."""
    src = _tree(tmp_path / "src", xattrs=False)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CdpfsError, match="no longer the filesystem"):
        restore_tree(src, root / "x", dst_root=root, dst_dev=os.stat(root).st_dev + 1)
    assert os.listdir(root) == []
    restore_tree(src, root / "x", dst_root=root, dst_dev=os.stat(root).st_dev)
    _same(src, root / "x")


def test_src_is_reached_from_its_root_never_through_a_link(tmp_path: Path) -> None:
    outside, _before = _outside(tmp_path)
    then = tmp_path / "then"
    then.mkdir()
    os.symlink(outside, then / "d")  # at that moment d was a link out of the volume
    dst = tmp_path / "dst"
    dst.mkdir()
    for path in (then / "d" / "sentinel", then / ".." / "outside" / "sentinel"):
        with pytest.raises(CdpfsError):
            measure(path, root=then)
        with pytest.raises(CdpfsError):
            restore_tree(path, dst / "sentinel", src_root=then, dst_root=dst)
    assert os.listdir(dst) == []
