"""Damage: corrupt stored data, a full disk, and bad command lines.

* A byte flipped in a stored block (raw or zstd payload, or its codec tag) or
  in a pack of small writes, written straight into the LMDB store while it is
  unmounted: reading the affected range fails with EIO, never returns wrong
  data; other ranges and files still read correctly; the store's log names
  the file and the block; ``cdpfs verify`` exits non-zero and lists it.
* A really full disk (a 200 MiB tmpfs holding the store): writing fails with
  a clean ENOSPC, without hanging; the mount keeps serving reads, unmounts,
  remounts, every file fsynced before the error is intact and the store
  verifies.
* Command-line mistakes not covered in test_t3_posix.py get a one-line error
  and exit status 1, with nothing mounted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest
from conftest import HAVE_FUSE
from harness import Volume, cdpfs, live_names, one_line_error

from cdpfs.mount.control import holder_pid
from cdpfs.store import codec

BLOCK = 128 * 1024


def mounts_under(base: Path) -> list[tuple[str, str, str]]:
    """(source, mount point, type) of every mount at or below ``base``, deepest first."""
    with open("/proc/mounts") as f:
        rows = [tuple(line.split()[:3]) for line in f]
    return sorted((r for r in rows if r[1] == str(base) or r[1].startswith(f"{base}/")),
                  key=lambda r: -len(r[1]))  # type: ignore[return-value]


def clear_mounts(base: Path) -> None:
    """Kill mount daemons and detach every mount below ``base``, also dead ones.

    ``Volume.cleanup()`` stats the mount point, which fails (ENOTCONN) on a
    mount whose daemon died; this reads /proc/mounts instead.
    """
    for src, mnt, fstype in mounts_under(base):
        if fstype == "fuse.cdpfs":
            pid = holder_pid(Path(src))
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
        else:
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)


@pytest.fixture(autouse=True)
def _no_mounts_left(tmp_path: Path) -> Iterator[None]:
    yield
    clear_mounts(tmp_path)


def open_env(store: Path) -> lmdb.Environment:
    """The store's LMDB environment, opened directly for writing (store unmounted)."""
    size = (store / "data.mdb").stat().st_size
    return lmdb.open(str(store), map_size=max(1 << 30, 2 * size), max_dbs=32)


def flip_stored(store: Path, table: bytes, key: bytes, where: Callable[[bytes], int]) -> None:
    """Flip every bit of one byte of the value stored under ``key`` (same length)."""
    env = open_env(store)
    try:
        db = env.open_db(table, create=False)
        with env.begin(write=True) as txn:
            value = txn.get(key, db=db)
            assert value is not None, f"{key.hex()} is not in table {table!r}"
            i = where(value)
            damaged = value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1 :]
            assert len(damaged) == len(value) and damaged != value
            txn.put(key, damaged, db=db)
    finally:
        env.close()


def stored_value(store: Path, table: bytes, key: bytes) -> bytes | None:
    env = open_env(store)
    try:
        db = env.open_db(table, create=False)
        with env.begin() as txn:
            value = txn.get(key, db=db)
            return None if value is None else bytes(value)
    finally:
        env.close()


def expect_eio(path: Path, off: int, n: int, direct: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        with pytest.raises(OSError) as exc:
            data = os.pread(fd, n, off)
            pytest.fail(f"read of {path.name} at {off}+{n} returned {len(data)} bytes "
                        f"(first {data[:16].hex()}) instead of failing")
        assert exc.value.errno == errno.EIO, exc.value
    finally:
        os.close(fd)


def read_at(path: Path, off: int, n: int, direct: bool = False) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def log_lines(store: Path) -> list[str]:
    return (store / "cdpfs.log").read_text(errors="replace").splitlines()


def log_problems(store: Path, n: int = 12) -> str:
    """The daemon's last error lines (with the line after each, often the cause)."""
    lines = log_lines(store)
    picked = [ln for i, ln in enumerate(lines)
              if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("lmdb.")
              or (i and " ERROR " in lines[i - 1])]
    if len(picked) > n:
        picked = [*picked[: n // 2], f"... ({len(picked) - n} more)", *picked[-n // 2 :]]
    return "\n".join(picked)


def verify_output(vol: Volume) -> tuple[int, list[str], str]:
    r = cdpfs("verify", vol.store, check=False)
    return r.returncode, r.stdout.splitlines(), r.stderr


# --- corrupt blocks --------------------------------------------------------------------


def _content(kind: str) -> bytes:
    if kind == "zstd":  # compressible, each block unique: stored zstd-compressed
        return b"".join(os.urandom(64) * (BLOCK // 64) for _ in range(3)) + os.urandom(1000)
    return os.urandom(3 * BLOCK + 1000)  # incompressible: stored raw


@pytest.mark.parametrize("kind", ["raw", "zstd", "tag"])
def test_corrupt_block_reads_eio_and_verify_names_it(make_volume: Callable[[str], Volume],
                                                     kind: str) -> None:
    vol = make_volume("dmg").init()
    vol.mount()
    content = _content("zstd" if kind == "zstd" else "raw")
    other = os.urandom(200_000)
    (vol.mnt / "dir").mkdir()
    victim = vol.mnt / "dir" / "victim"
    victim.write_bytes(content)
    (vol.mnt / "bystander").write_bytes(other)
    vol.umount()

    key = codec.digest(content[:BLOCK])
    stored = stored_value(vol.store, b"blocks", key)
    assert stored is not None, "the file's first block is not stored under its blake3 hash"
    assert stored[0] == (1 if kind == "zstd" else 0), f"unexpected codec tag {stored[0]}"
    flip_stored(vol.store, b"blocks", key, lambda v: 0 if kind == "tag" else len(v) // 2)

    vol.mount()
    for direct in (True, False):
        for off, n in ((0, 4096), (5000, 10), (BLOCK - 1, 2), (0, len(content))):
            expect_eio(victim, off, n, direct)
    with pytest.raises(OSError) as exc:
        victim.read_bytes()
    assert exc.value.errno == errno.EIO
    # The other blocks of the file and other files are unharmed.
    assert read_at(victim, BLOCK, 2 * BLOCK + 1000, direct=True) == content[BLOCK:]
    assert read_at(victim, BLOCK, 2 * BLOCK + 1000) == content[BLOCK:]
    assert (vol.mnt / "bystander").read_bytes() == other
    vol.umount()

    hexkey = key.hex()
    named = [ln for ln in log_lines(vol.store) if hexkey in ln and "/dir/victim" in ln]
    assert named, (f"no log line names /dir/victim and block {hexkey}:\n"
                   + "\n".join(log_lines(vol.store)[-20:]))

    code, lines, err = verify_output(vol)
    assert code != 0, "verify passed a store with a corrupt block"
    assert any(hexkey in ln and "corrupt" in ln for ln in lines), \
        f"verify does not name block {hexkey}:\n" + "\n".join(lines)
    assert "problem" in err and len(err.splitlines()) == 1, err
    assert all(hexkey in ln for ln in lines), \
        "verify lists problems beyond the one corrupt block:\n" + "\n".join(lines)


def test_corrupt_pack_of_small_writes_reads_eio(make_volume: Callable[[str], Volume]) -> None:
    vol = make_volume("pack").init()
    vol.mount()
    base = os.urandom(2 * BLOCK)
    small = b"SMALL-WRITE-" + os.urandom(500)  # stored as a patch in a pack
    p = vol.mnt / "patched"
    p.write_bytes(base)
    with open(p, "r+b") as f:
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, small, 3000) == len(small)
    finally:
        os.close(fd)
    vol.umount()

    expected = base[:3000] + small + base[3000 + len(small) :]
    env = open_env(vol.store)
    try:
        packs = env.open_db(b"packs", create=False)
        with env.begin() as txn:
            holding = [bytes(k) for k, v in txn.cursor(db=packs)
                       if small in codec.decode_pack(v, int.from_bytes(k, "big"))]
    finally:
        env.close()
    assert len(holding) == 1, f"the small write is in {len(holding)} packs, expected one"
    flip_stored(vol.store, b"packs", holding[0], lambda v: len(v) - 3)

    vol.mount()
    expect_eio(p, 0, 4096, direct=True)
    expect_eio(p, 3000, 10, direct=False)
    assert read_at(p, BLOCK, BLOCK, direct=True) == expected[BLOCK:]
    vol.umount()
    assert any("/patched" in ln and "I/O error" in ln for ln in log_lines(vol.store)), \
        "\n".join(log_lines(vol.store)[-20:])
    code, lines, _ = verify_output(vol)
    pack_id = int.from_bytes(holding[0], "big")
    assert code != 0 and any(f"pack {pack_id}" in ln for ln in lines), "\n".join(lines)


# --- a full disk ---------------------------------------------------------------------

FILLER = textwrap.dedent("""
    import hashlib, json, os, sys
    mnt = sys.argv[1]
    done, failure = [], None
    for i in range(10_000):
        # First 100 MiB in one go (about half the free space dirty before one
        # fsync), then 3 MiB files, each fsynced, until the disk is full.
        name = f"fill{i:04d}"
        data = os.urandom((100 if i == 0 else 3) << 20)
        step = "create"
        try:
            fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for off in range(0, len(data), 1 << 20):
                    step = "write"
                    os.pwrite(fd, data[off:off + (1 << 20)], off)
                step = "fsync"
                os.fsync(fd)
            except OSError:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            step = "close"
            os.close(fd)
        except OSError as exc:
            failure = [name, step, exc.errno, str(exc)]
            break
        done.append([name, hashlib.sha256(data).hexdigest()])
    print(json.dumps({"done": done, "failure": failure}))
""")


def test_full_disk_gives_clean_enospc(tmp_path: Path) -> None:
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(small)], check=True)
    vol = Volume(small, "full")
    try:
        vol.init()
        vol.mount()
        spare = os.urandom(100_000)
        with open(vol.mnt / "spare", "wb") as f:  # appended to once the disk is full
            f.write(spare)
            f.flush()
            os.fsync(f.fileno())
        r = subprocess.run([sys.executable, "-c", FILLER, str(vol.mnt)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        done: list[list[str]] = result["done"]
        failure = result["failure"]
        print(f"{len(done)} files fsynced, then {failure}")
        assert failure is not None, "the 200 MiB disk never filled up"
        assert failure[2] == errno.ENOSPC, (f"filling the disk failed with {failure}, not ENOSPC; "
                                            f"daemon log:\n{log_problems(vol.store)}")
        assert len(done) > 1, f"not even the first 3 MiB file fitted (failure: {failure})"

        # Still serving: reads of everything fsynced, listing, statfs.
        def check_files(when: str) -> None:
            for name, digest in done:
                data = (vol.mnt / name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == digest, (
                    f"{when}: {name} (size {len(data)}) differs from what was written and "
                    f"fsynced before the disk filled; daemon log:\n{log_problems(vol.store)}")

        check_files("with the disk full")
        assert {n for n, _ in done} <= set(live_names(vol.mnt))
        os.statvfs(vol.mnt)
        # Still full: appending to an existing file is refused cleanly too.
        fd = os.open(vol.mnt / "spare", os.O_WRONLY | os.O_APPEND)
        step = "write"
        try:
            with pytest.raises(OSError) as exc:
                os.write(fd, os.urandom(8 << 20))
                step = "fsync"
                os.fsync(fd)
                step = "close"
                os.close(fd)
                fd = -1
            print(f"append to spare: {step} failed with {exc.value}")
            assert exc.value.errno == errno.ENOSPC, \
                f"{step}: {exc.value}; daemon log:\n{log_problems(vol.store)}"
        finally:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        vol.umount()
        vol.mount()
        check_files("after a remount")
        assert (vol.mnt / "spare").read_bytes()[: len(spare)] == spare
        vol.umount()
        vol.verify()
    finally:
        clear_mounts(small)  # the FUSE mount, then the tmpfs itself


def test_space_freed_by_prune_takes_new_writes(tmp_path: Path) -> None:
    """A full volume: delete its files and prune them out of history, and the space
    the store freed inside its file takes new writes, also after a remount (the
    disk still shows it full: the store file does not shrink)."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(small)], check=True)
    vol = Volume(small, "full")
    try:
        vol.init()
        cdpfs("retention", vol.store, "--keep-all", "1s", "--minutely", "1s", "--hourly", "1s",
              "--daily", "1s")
        vol.mount()
        r = subprocess.run([sys.executable, "-c", FILLER, str(vol.mnt)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["failure"] and result["failure"][2] == errno.ENOSPC, result["failure"]
        for name, _digest in result["done"]:
            os.unlink(vol.mnt / name)
        (vol.mnt / result["failure"][0]).unlink(missing_ok=True)  # made before it failed?

        time.sleep(1.5)  # out of the keep-everything second
        cdpfs("prune", vol.mnt)
        freed = cdpfs("stat", vol.mnt).stdout
        inside = float(re.search(r"free\s+([\d,.]+) MiB inside", freed)[1].replace(",", ""))
        assert inside > 50, freed
        vol.remount()
        data = os.urandom(20 << 20)
        with open(vol.mnt / "after", "wb") as f:  # ENOSPC here was the bug
            for off in range(0, len(data), 1 << 20):
                f.write(data[off:off + (1 << 20)])
            f.flush()
            os.fsync(f.fileno())
        vol.remount()
        assert (vol.mnt / "after").read_bytes() == data
        vol.umount()
        vol.verify()
    finally:
        clear_mounts(small)


# --- command-line mistakes ---------------------------------------------------------------



def test_missing_store_and_wrong_mountpoint_one_line_errors(volume: Volume,
                                                             tmp_path: Path) -> None:
    missing = tmp_path / "no-such-store"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    one_line_error(cdpfs("mount", missing, mnt, check=False), str(missing))
    one_line_error(cdpfs("verify", missing, check=False), str(missing))
    assert not missing.exists()
    plain = tmp_path / "plain-file"
    plain.write_text("not a directory")
    one_line_error(cdpfs("mount", volume.store, plain, check=False), str(plain))
    # The store is mounted by the fixture: a second mount is refused, also on its own mount.
    one_line_error(cdpfs("mount", volume.store, volume.mnt, check=False))
    one_line_error(cdpfs("umount", mnt, check=False), str(mnt))
    one_line_error(cdpfs("verify", plain, check=False), str(plain))
    assert not os.path.ismount(mnt) and os.path.ismount(volume.mnt)
    (volume.mnt / "still").write_text("works")
    assert (volume.mnt / "still").read_text() == "works"


def test_damaged_store_file_gives_one_line_error(make_volume: Callable[[str], Volume],
                                                 tmp_path: Path) -> None:
    vol = make_volume("broken").init()
    data = vol.store / "data.mdb"
    with open(data, "r+b") as f:  # wipe both LMDB meta pages
        f.write(os.urandom(2 * 4096))
    one_line_error(cdpfs("mount", vol.store, vol.mnt, check=False), str(vol.store))
    one_line_error(cdpfs("verify", vol.store, check=False), str(vol.store))
    assert not os.path.ismount(vol.mnt)
