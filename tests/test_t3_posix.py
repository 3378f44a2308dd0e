"""POSIX semantics on a real mount: what applications rely on."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from harness import Volume, live_names


def test_regular_file_roundtrip_and_remount(volume: Volume) -> None:
    p = volume.mnt / "f"
    data = os.urandom(300_000) + b"text" * 10_000
    p.write_bytes(data)
    assert p.read_bytes() == data
    volume.remount()
    assert p.read_bytes() == data


def test_directories_and_listing(volume: Volume) -> None:
    d = volume.mnt / "a" / "b" / "c"
    d.mkdir(parents=True)
    for i in range(50):
        (d / f"file{i:03d}").write_text(str(i))
    assert sorted(os.listdir(d)) == [f"file{i:03d}" for i in range(50)]
    assert os.stat(volume.mnt / "a").st_nlink == 3
    with pytest.raises(OSError) as exc:
        os.rmdir(volume.mnt / "a")
    assert exc.value.errno == errno.ENOTEMPTY
    for i in range(50):
        (d / f"file{i:03d}").unlink()
    os.removedirs(d)
    assert live_names(volume.mnt) == []


def test_symlink_and_hardlink(volume: Volume) -> None:
    m = volume.mnt
    (m / "target").write_text("payload")
    os.symlink("target", m / "sym")
    assert os.readlink(m / "sym") == "target"
    assert (m / "sym").read_text() == "payload"
    os.link(m / "target", m / "hard")
    assert os.stat(m / "target").st_nlink == 2
    assert os.stat(m / "hard").st_ino == os.stat(m / "target").st_ino
    (m / "target").unlink()
    assert (m / "hard").read_text() == "payload"
    assert os.stat(m / "hard").st_nlink == 1
    with pytest.raises(FileNotFoundError):
        (m / "sym").read_text()


def test_rename_atomic_over_target_and_across_dirs(volume: Volume) -> None:
    m = volume.mnt
    (m / "d1").mkdir()
    (m / "d2").mkdir()
    (m / "d1" / "x").write_text("new")
    (m / "d2" / "y").write_text("old")
    os.rename(m / "d1" / "x", m / "d2" / "y")
    assert (m / "d2" / "y").read_text() == "new"
    assert not (m / "d1" / "x").exists()
    (m / "d1" / "sub").mkdir()
    os.rename(m / "d1" / "sub", m / "d2" / "sub")
    assert os.stat(m / "d1").st_nlink == 2
    assert os.stat(m / "d2").st_nlink == 3
    (m / "d1" / "empty").mkdir()
    os.rename(m / "d2" / "sub", m / "d1" / "empty")  # over an empty directory
    assert sorted(os.listdir(m / "d1")) == ["empty"]
    volume.remount()
    assert (m / "d2" / "y").read_text() == "new"
    assert sorted(os.listdir(m / "d2")) == ["y"]


def test_unlinked_open_file_stays_readable(volume: Volume) -> None:
    p = volume.mnt / "tmp"
    p.write_bytes(b"still here" * 1000)
    with open(p, "rb") as f:
        p.unlink()
        assert not p.exists()
        assert f.read() == b"still here" * 1000
    with open(volume.mnt / "w", "w+b") as f:
        os.unlink(volume.mnt / "w")
        f.write(b"written after unlink")
        f.flush()
        f.seek(0)
        assert f.read() == b"written after unlink"


def test_chmod_chown_utimens_nanoseconds(volume: Volume) -> None:
    p = volume.mnt / "f"
    p.write_text("x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    volume.remount()
    st = os.stat(p)
    assert st.st_atime_ns == 1_600_000_000_123_456_789
    assert st.st_mtime_ns == 1_700_000_000_987_654_321


def test_truncate_and_ftruncate(volume: Volume) -> None:
    p = volume.mnt / "t"
    p.write_bytes(b"a" * 500_000)
    os.truncate(p, 1000)
    assert p.read_bytes() == b"a" * 1000
    os.truncate(p, 300_000)
    assert p.read_bytes() == b"a" * 1000 + bytes(299_000)
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 10)
    assert p.read_bytes() == b"a" * 10
    volume.remount()
    assert p.read_bytes() == b"a" * 10


def test_append_and_sparse_and_large(volume: Volume) -> None:
    p = volume.mnt / "log"
    for i in range(100):
        with open(p, "a") as f:
            f.write(f"line {i}\n")
    assert p.read_text().splitlines() == [f"line {i}" for i in range(100)]
    s = volume.mnt / "sparse"
    with open(s, "wb") as f:
        f.seek(5 * 2**30)  # past 4 GiB
        f.write(b"end")
    assert os.stat(s).st_size == 5 * 2**30 + 3
    assert os.stat(s).st_blocks * 512 <= 128 * 1024  # du counts the data, not the hole
    with open(s, "rb") as f:
        f.seek(4 * 2**30 + 17)
        assert f.read(4096) == bytes(4096)
        f.seek(5 * 2**30)
        assert f.read() == b"end"
    volume.remount()
    with open(s, "rb") as f:
        f.seek(5 * 2**30 - 2)
        assert f.read() == b"\0\0end"
    du = subprocess.run(["du", "-k", str(s)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 128


def test_posix_fallocate(volume: Volume) -> None:
    p = volume.mnt / "alloc"
    with open(p, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1_000_000)
    assert os.stat(p).st_size == 1_000_000
    assert p.read_bytes() == bytes(1_000_000)


def test_xattrs(volume: Volume) -> None:
    p = volume.mnt / "x"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.color", "user.empty"]
    os.removexattr(p, "user.color")
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.color")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(p, "user.empty", b"v", os.XATTR_CREATE)
    assert exc.value.errno == errno.EEXIST
    volume.remount()
    assert os.listxattr(p) == ["user.empty"]


def test_fifo_and_device_nodes(volume: Volume) -> None:
    m = volume.mnt
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    os.mknod(m / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(m / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    proc = subprocess.Popen(["sh", "-c", f"echo through-fifo > {m / 'fifo'}"])
    with open(m / "fifo") as f:
        assert f.read() == "through-fifo\n"
    proc.wait()


def test_statfs(volume: Volume) -> None:
    st = os.statvfs(volume.mnt)
    assert st.f_blocks > 0 and st.f_bavail > 0
    assert st.f_namemax == 255


def test_permissions_are_checked(volume: Volume) -> None:
    p = volume.mnt / "secret"
    p.write_text("s")
    os.chmod(p, 0o600)
    os.chmod(volume.mnt, 0o755)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_fsync_is_durable_against_kill(volume: Volume) -> None:
    p = volume.mnt / "durable"
    with open(p, "wb") as f:
        f.write(b"must survive" * 1000)
        f.flush()
        os.fsync(f.fileno())
    d = os.open(volume.mnt, os.O_RDONLY)
    os.fsync(d)
    os.close(d)
    volume.kill()
    volume.mount()
    assert p.read_bytes() == b"must survive" * 1000


def test_second_mount_missing_mountpoint_and_non_store_refused(volume: Volume,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    from harness import cdpfs

    r = cdpfs("mount", volume.store, other, check=False)
    assert r.returncode == 1 and "in use" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cdpfs("mount", volume.store, tmp_path / "missing", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = cdpfs("mount", tmp_path / "other", tmp_path / "vol.mnt", check=False)
    assert r.returncode == 1 and "not a cdpfs store" in r.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    r = cdpfs("init", tmp_path / "junk", check=False)
    assert r.returncode == 1 and "not empty" in r.stderr
    assert not os.path.ismount(other)
    time.sleep(0)
