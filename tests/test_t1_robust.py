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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio
from harness import cdpfs

from cdpfs.errors import NameTooLong, NotFound
from cdpfs.fs.mutate import init_volume
from cdpfs.history import bookmarks
from cdpfs.history.moments import BadMoment
from cdpfs.history.versions import diff
from cdpfs.replication import registry
from cdpfs.replication.receiver import Receiver
from cdpfs.replication.registry import ReplicaState
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, MemoryLinks, served
from cdpfs.volume import Volume

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
            await vol.call(fs.count_lookups, [ino for _n, ino in listed])  # as the kernel
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


# --- the registry of a live volume -----------------------------------------------------------


async def _registry_write(vol: Volume, change: Callable[[Store, Any], object]) -> None:
    """A change to the replicas table, as 'cdpfs replica add/remove' makes it."""
    store = vol.store
    assert store is not None

    def write() -> None:
        with store.txn(write=True) as txn:
            change(store, txn)

    await trio.to_thread.run_sync(write)


def _replica_seq(receiver: Receiver) -> int:
    if receiver.store is None:
        return 0
    with receiver.store.txn() as txn:
        return int(journal.last(receiver.store, txn)[0])


async def _until(what: str, cond: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not cond():
            await trio.sleep(0.02)
    assert what


async def _write_file(vol: Volume, name: bytes, data: bytes) -> int:
    assert vol.fs is not None
    fh, _e = await vol.call(vol.fs.create, ROOT, name, 0o644, os.O_RDWR, 0, 0)
    await vol.write(fh, 0, data)
    await vol.fsync(fh)
    await vol.call(vol.fs.release, fh)
    return int(await vol.call(lambda: vol.live.m.last_seq))  # type: ignore[union-attr]


async def test_a_new_address_takes_effect_on_a_live_volume(tmp_path: Path) -> None:
    """'replica add' with a new address while the volume ships: the sender moves to
    it, and never writes the old address back."""
    path = _store(tmp_path)
    with Store(path) as store, store.txn(write=True) as txn:
        registry.put(store, txn, ReplicaState("r1", "addr-a"))
    old, new = Receiver(tmp_path / "ra"), Receiver(tmp_path / "rb")
    try:
        async with trio.open_nursery() as nursery:
            links = MemoryLinks(nursery)
            links.add("addr-a", old)
            links.add("addr-b", new)
            async with served(path, connector=lambda st, s: links.connect(s.address)) as vol:
                first = await _write_file(vol, b"f1", b"one")
                await _until("the first replica", lambda: _replica_seq(old) >= first)

                def readdress(store: Store, txn: Any) -> None:
                    state = registry.get(store, txn, "r1")
                    assert state is not None
                    state.address = "addr-b"
                    registry.put(store, txn, state)

                await _registry_write(vol, readdress)
                assert vol.fanout is not None
                fanout = vol.fanout
                await _until("the change to take effect",  # within a second or so
                             lambda: fanout.senders["r1"].address == "addr-b", 2)
                second = await _write_file(vol, b"f2", b"two")
                await _until("the new address", lambda: _replica_seq(new) >= second)
                await trio.sleep(0.5)  # senders save their progress meanwhile
                assert vol.store is not None
                with vol.store.txn() as txn:
                    state = registry.get(vol.store, txn, "r1")
                assert state is not None and state.address == "addr-b"
                assert _replica_seq(old) < second  # the old address got nothing new
            nursery.cancel_scope.cancel()
    finally:
        old.close()
        new.close()


async def test_a_removed_replica_is_no_longer_shipped_to_nor_held(tmp_path: Path) -> None:
    path = _store(tmp_path)
    with Store(path) as store, store.txn(write=True) as txn:
        registry.put(store, txn, ReplicaState("r1", "addr-a"))
    receiver = Receiver(tmp_path / "ra")
    try:
        async with trio.open_nursery() as nursery:
            links = MemoryLinks(nursery)
            links.add("addr-a", receiver)
            async with served(path, connector=lambda st, s: links.connect(s.address)) as vol:
                assert vol.fanout is not None and vol.store is not None
                first = await _write_file(vol, b"f1", b"one")
                await _until("the replica", lambda: _replica_seq(receiver) >= first)
                await _registry_write(vol, lambda store, txn: registry.delete(store, txn, "r1"))
                fanout = vol.fanout
                await _until("the sender to stop", lambda: "r1" not in fanout.senders, 2)

                second = await _write_file(vol, b"f2", b"two")
                await trio.sleep(0.5)
                assert _replica_seq(receiver) < second
                with vol.store.txn() as txn:
                    assert registry.get(vol.store, txn, "r1") is None  # not written back
                    assert registry.needed_after(vol.store, txn) is None  # no journal held
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()


def test_replica_remove(tmp_path: Path) -> None:
    store = _store(tmp_path)
    cdpfs("replica", "add", store, "r1", "--address", "h:1")
    proc = cdpfs("replica", "remove", store, "r2", check=False)
    assert proc.returncode == 1 and "no replica 'r2'" in proc.stderr and "r1" in proc.stderr
    assert "removed" in cdpfs("replica", "remove", store, "r1").stdout
    assert "replica " not in cdpfs("status", store).stdout.replace("replicas", "")


async def test_a_listing_holds_no_point_the_kernel_did_not_take(tmp_path: Path) -> None:
    """The kernel's readdir buffer can fill before the @ entries: it then knows none of
    their inodes, so no point may stay held once the listing is closed (else prune
    beside the mount keeps what the same prune frees after unmounting)."""
    async with served(_store(tmp_path), show_history=True) as vol:
        fs = vol.fs
        assert fs is not None and vol.store is not None
        await _write_file(vol, b"f", b"x")
        fh = await vol.call(fs.opendir, ROOT)
        batch = await vol.call(fs.readdir, fh, 0)
        assert any(name.startswith(b"@") for _, name, _ in batch)
        taken = [e.ino for _, name, e in batch if not name.startswith(b"@")]
        await vol.call(fs.count_lookups, taken)  # the kernel took only the live entries
        await vol.call(fs.releasedir, fh)
        await vol.call(fs.forget, [(ino, 1) for ino in taken])
        await vol.fsyncdir()
        with vol.store.txn() as txn:
            holds = [b.name for b in bookmarks.all_points(vol.store, txn) if b.is_hold]
        assert holds == []
        # one the kernel did take stays held until it forgets it
        fh = await vol.call(fs.opendir, ROOT)
        batch = await vol.call(fs.readdir, fh, 0)
        point = next(e.ino for _, name, e in batch if name.startswith(b"@"))
        await vol.call(fs.count_lookups, [point])
        await vol.call(fs.releasedir, fh)
        await vol.fsyncdir()
        with vol.store.txn() as txn:
            assert [b for b in bookmarks.all_points(vol.store, txn) if b.is_hold]
        await vol.call(fs.forget, [(point, 1)])
