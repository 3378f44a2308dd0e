"""Robustness of the library in-process: the defects of issue 10 that need no mount.

Long names get NameTooLong from every request, a moment with an impossible UTC
offset is a bad moment (ENOENT in a mount, not EIO), a diff of a path that
existed at neither point is refused, a damaged ``data.mdb`` (truncated, zeroed,
foreign) is one line naming the file instead of a SIGBUS, an automatic point
has one name in every session, and ``mount`` refuses a directory with files in
it. Real stores, the real volume service; no root, no FUSE.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from harness import cdpfs

from cdpfs.errors import NameTooLong, NotFound
from cdpfs.fs.mutate import init_volume
from cdpfs.history.moments import BadMoment
from cdpfs.history.versions import diff
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, served

ROOT = 1
LONG = b"n" * 256


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    init_volume(path).close()
    return path


async def test_every_request_refuses_a_name_over_255_bytes(tmp_path: Path) -> None:
    async with served(_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        fh, f = await vol.call(fs.create, ROOT, b"f", 0o644, os.O_RDWR, 0, 0)
        await vol.call(fs.mknod, ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)
        ok = b"n" * 255
        await vol.call(fs.mknod, ROOT, ok, stat.S_IFREG | 0o644, 0, 0)  # 255 is fine
        calls = {
            "lookup": (fs.lookup, ROOT, LONG),
            "lookup in history": (fs.lookup, (await vol.call(fs.lookup, ROOT, b"@now")).ino,
                                  LONG),
            "create": (fs.create, ROOT, LONG, 0o644, os.O_RDWR, 0, 0),
            "mkdir": (fs.mknod, ROOT, LONG, stat.S_IFDIR | 0o755, 0, 0),
            "unlink": (fs.unlink, ROOT, LONG),
            "rmdir": (fs.rmdir, ROOT, LONG),
            "rename from": (fs.rename, ROOT, LONG, ROOT, b"g", 0),
            "rename to": (fs.rename, ROOT, b"f", ROOT, LONG, 0),
            "link": (fs.link, f.ino, ROOT, LONG),
        }
        for what, (fn, *args) in calls.items():
            with pytest.raises(NameTooLong):
                await vol.call(fn, *args)
            assert what
        assert (await vol.call(fs.lookup, ROOT, b"f")).ino == f.ino  # nothing changed
        await vol.call(fs.release, fh)


async def test_an_impossible_utc_offset_is_a_bad_moment(tmp_path: Path) -> None:
    async with served(_store(tmp_path)) as vol:
        assert vol.fs is not None
        for name in (b"@2026-12-01T10:00+25:00", b"@2026-12-01T10:00-24:00",
                     b"@9999-12-31T23:59:59+00:00"):
            with pytest.raises(BadMoment):
                await vol.call(vol.fs.lookup, ROOT, name)


async def test_a_diff_of_a_path_that_never_existed_is_refused(tmp_path: Path) -> None:
    path = _store(tmp_path)
    async with served(path) as vol:
        assert vol.fs is not None
        await vol.call(vol.fs.mknod, ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)
        await vol.fsyncdir()
    with Store(path) as store, store.txn() as txn:
        assert [c.kind for c in diff(store, txn, 1, 2, "d")] == ["A"]
        with pytest.raises(NotFound, match="no/such"):
            diff(store, txn, 1, 2, "no/such")


def _damaged(tmp_path: Path) -> dict[str, Path]:
    good = _store(tmp_path)
    out = {}
    for name in ("truncated", "zeroed", "short"):
        shutil.copytree(good, tmp_path / name)
        data = tmp_path / name / "data.mdb"
        size = data.stat().st_size
        if name == "truncated":
            os.truncate(data, size - 4096)
        elif name == "zeroed":
            data.write_bytes(bytes(size))
        else:
            os.truncate(data, 100)
        out[name] = tmp_path / name
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    out["foreign"] = foreign
    return out


def test_a_damaged_store_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """Opened in a process of its own: LMDB maps a truncated file and dies of SIGBUS
    on its first read, so a check that failed would kill the test runner."""
    for name, path in _damaged(tmp_path).items():
        proc = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom cdpfs.errors import StoreError\n"
             "from cdpfs.store.lmdb import Store\n"
             "try:\n    Store(sys.argv[1]).close()\n"
             "except StoreError as exc:\n    print(exc)\n", str(path)],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (name, proc.returncode, proc.stderr)
        said = proc.stdout.strip()
        assert len(said.splitlines()) == 1 and str(path) in said, (name, said)
        assert ("damaged" in said or "another version" in said), (name, said)


async def test_an_automatic_point_has_one_name_in_every_session(tmp_path: Path) -> None:
    """Listed right after its change and again in a later session (a remount), the
    point has the same name, and the name shows that point."""
    path = _store(tmp_path)
    clock = FakeClock()
    names = []
    for session in range(2):
        async with served(path, clock=clock, show_history=True) as vol:
            fs = vol.fs
            assert fs is not None
            if session == 0:
                fh, _e = await vol.call(fs.create, ROOT, b"f", 0o644, os.O_RDWR, 0, 0)
                await vol.write(fh, 0, b"content")
                await vol.fsync(fh)
                await vol.call(fs.release, fh)
            fh = await vol.call(fs.opendir, ROOT)
            listed = [(n, e.ino) for _i, n, e in await vol.call(fs.readdir, fh, 0)
                      if n.startswith(b"@")]
            await vol.call(fs.releasedir, fh)
            assert listed, "no automatic point listed"
            for name, ino in listed:
                assert (await vol.call(fs.lookup, ROOT, name)).ino == ino
            names.append(sorted(n for n, _ in listed))
        clock.advance(5)
    assert names[0] == names[1]


def test_mount_refuses_a_directory_with_files_in_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("would be hidden")
    proc = cdpfs("mount", store, mnt, check=False)
    assert proc.returncode == 1, proc
    assert "is not empty" in proc.stderr and "--nonempty" in proc.stderr, proc.stderr
    assert (mnt / "mine.txt").read_text() == "would be hidden"
