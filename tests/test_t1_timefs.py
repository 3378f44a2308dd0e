"""TimeFS in process: the live tree plus the read-only ``@<moment>`` trees, without FUSE.

Each test serves a fresh store with the real volume service (``cdpfs.testing.served``:
real LMDB store in a temp dir, real engine) and calls ``TimeFS`` methods the way
the FUSE front end does, checking what a user of the mounted filesystem would see:

* every moment form (``#seq``, ``now``, a bookmark, ISO times to the nanosecond, local
  or UTC, relative times) names the right state, and a malformed, future or unknown
  moment is not found;
* history is read-only (ReadOnly), history and live are different devices
  (CrossDevice), ``@`` names at the live root are reserved (Reserved) and cannot be
  removed or moved;
* the same file at two moments is two kernel inodes; past content, attributes,
  xattrs, links and listings stay while the live tree changes;
* the root listing shows bookmarks and recent points unless history is hidden;
* holds on past points last exactly while the kernel references them and are gone
  when the volume stops;
* past files closed since to a caller are refused to that caller (not to root);
* snapshot and following volumes, statfs, and corrupt blocks (Corrupt, not a
  generic error).

Time-based moments use a ``FakeClock`` (records are stamped with it and moments
resolve against it), so no test sleeps. No root, FUSE or network is needed.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from cdpfs.errors import (
    AccessDenied,
    Corrupt,
    CrossDevice,
    InvalidArgument,
    NoAttribute,
    NotFound,
    ReadOnly,
    Reserved,
    Stale,
)
from cdpfs.fs.mutate import init_volume
from cdpfs.fs.timefs import FOLLOW_TTL, Caller, split
from cdpfs.fs.vfs import Entry
from cdpfs.history import bookmarks
from cdpfs.history.moments import BadMoment
from cdpfs.store import codec
from cdpfs.store.lmdb import Store
from cdpfs.system import DiskStats
from cdpfs.testing import FakeClock, served
from cdpfs.volume import Mode, Volume

ROOT = 1  # the root directory's inode (live, and in every past tree's slot)
SECOND = 10**9
MINUTE = 60 * SECOND
NOBODY = Caller(65534, 65534)


# --- helpers ---------------------------------------------------------------------------


def new_store(tmp_path: Path) -> Path:
    """A fresh, empty store (its first record stamped by the real clock)."""
    path = tmp_path / "s"
    init_volume(path).close()
    return path


def ahead_clock(seconds: int = 3600) -> FakeClock:
    """A fake clock on a whole minute ``seconds`` ahead of now: after the store's
    first record, so records stamped with it keep the times a test gives them."""
    return FakeClock((time.time_ns() + seconds * SECOND) // MINUTE * MINUTE)


def local_ns(t: int) -> str:
    """ISO local time with a nanosecond fraction: ``2026-11-25T10:00:00.123456789``."""
    sec = dt.datetime.fromtimestamp(t // SECOND).isoformat(timespec="seconds")
    return f"{sec}.{t % SECOND:09d}"


def utc_ns(t: int) -> str:
    """ISO UTC time with a nanosecond fraction and Z."""
    sec = dt.datetime.fromtimestamp(t // SECOND, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{sec}.{t % SECOND:09d}Z"


def at(moment: str | int) -> bytes:
    """The root name of a moment: ``at(5)`` is ``@#5``, ``at("now")`` is ``@now``."""
    return f"@#{moment}".encode() if isinstance(moment, int) else f"@{moment}".encode()


async def put(vol: Volume, name: bytes, data: bytes, parent: int = ROOT,
              mode: int = 0o644, uid: int = 0, gid: int = 0) -> int:
    """Create ``name`` or replace its content (O_TRUNC), write, fsync and close it, as
    a program would; returns the kernel inode. Leaves no kernel reference behind."""
    fs = vol.fs
    assert fs is not None
    try:
        entry = await vol.call(fs.lookup, parent, name)
        fh = await vol.call(fs.open, entry.ino, os.O_WRONLY | os.O_TRUNC)
    except NotFound:
        fh, entry = await vol.call(fs.create, parent, name, mode, os.O_RDWR, uid, gid)
    if data:
        await vol.write(fh, 0, data)
    await vol.fsync(fh)
    await vol.flush(fh)
    await vol.call(fs.release, fh)
    await vol.call(fs.forget, [(entry.ino, 1)])
    return entry.ino


async def mkdir(vol: Volume, name: bytes, parent: int = ROOT, mode: int = 0o755) -> int:
    fs = vol.fs
    assert fs is not None
    entry = await vol.call(fs.mknod, parent, name, stat.S_IFDIR | mode, 0, 0)
    await vol.call(fs.forget, [(entry.ino, 1)])
    return int(entry.ino)


async def set_attr(vol: Volume, kino: int, **fields: int) -> None:
    fs = vol.fs
    assert fs is not None
    await vol.call(lambda: fs.setattr(kino, **fields))


async def last_seq(vol: Volume) -> int:
    """The newest journal record of a live volume."""
    live = vol.live
    assert live is not None
    return int(await vol.call(lambda: live.m.last_seq))


async def lookup_path(vol: Volume, *names: bytes, who: Caller | None = None) -> list[Entry]:
    """Look each name up in the one before, from the root, as the kernel does (each
    lookup takes a kernel reference: give them back with ``forget``)."""
    fs = vol.fs
    assert fs is not None
    out: list[Entry] = []
    parent = ROOT
    for name in names:
        entry = await vol.call(fs.lookup, parent, name, who)
        out.append(entry)
        parent = entry.ino
    return out


async def forget(vol: Volume, entries: list[Entry]) -> None:
    fs = vol.fs
    assert fs is not None
    await vol.call(fs.forget, [(e.ino, 1) for e in entries])


async def read_ino(vol: Volume, kino: int, who: Caller | None = None) -> bytes:
    """The whole content of ``kino``: open read-only, read, close."""
    fs = vol.fs
    assert fs is not None
    fh = await vol.call(fs.open, kino, os.O_RDONLY, who)
    try:
        return bytes(await vol.call(fs.read, fh, 0, 1 << 22))
    finally:
        await vol.call(fs.release, fh)


async def read_path(vol: Volume, *names: bytes, who: Caller | None = None) -> bytes:
    """``cat /names...``: the content of the file at that path (references given back)."""
    entries = await lookup_path(vol, *names, who=who)
    try:
        return await read_ino(vol, entries[-1].ino, who)
    finally:
        await forget(vol, entries)


async def exists(vol: Volume, *names: bytes) -> bool:
    try:
        entries = await lookup_path(vol, *names)
    except NotFound:
        return False
    await forget(vol, entries)
    return True


async def listing(vol: Volume, kino: int, who: Caller | None = None, *,
                  keep: bool = False) -> list[tuple[int, bytes, Entry]]:
    """``ls``: every entry of directory ``kino``. Like the kernel with readdirplus, it
    takes a reference to each entry, and forgets them after (``keep``: the caller
    forgets them later)."""
    fs = vol.fs
    assert fs is not None
    fh = await vol.call(fs.opendir, kino, who)
    try:
        got = await vol.call(fs.readdir, fh, 0, 100_000)
        await vol.call(fs.count_lookups, [e.ino for _, _, e in got])
    finally:
        await vol.call(fs.releasedir, fh)
    if not keep:
        await forget(vol, [e for _, _, e in got])
    return list(got)


async def names_in(vol: Volume, kino: int, who: Caller | None = None) -> list[bytes]:
    return [name for _, name, _ in await listing(vol, kino, who)]


async def holds_now(vol: Volume) -> dict[str, int]:
    """Holds (name -> seq) as the volume itself sees them (a live volume writes them
    with its next commit: the one fsyncdir makes)."""
    store = vol.store
    assert store is not None
    if vol.live is not None:
        await vol.fsyncdir()
        engine = vol.live.engine
        marks = await vol.call(lambda: bookmarks.all_points(store, engine.reader()))
    else:
        engine = vol.engine
        assert engine is not None
        marks = await vol.call(lambda: bookmarks.all_points(store, engine.txn))
    return {m.name: m.seq for m in marks if m.is_hold}


async def committed_holds(vol: Volume) -> dict[str, int]:
    """Holds as any other reader (a prune run, another process) sees them: fsyncdir
    first (it commits), then read in a read transaction of its own."""
    store = vol.store
    assert store is not None
    await vol.fsyncdir()

    def read() -> dict[str, int]:
        with store.txn() as txn:
            return {m.name: m.seq for m in bookmarks.all_points(store, txn) if m.is_hold}

    return await trio.to_thread.run_sync(read)


def stored_holds(path: Path) -> dict[str, int]:
    """Holds in a store nobody serves."""
    with Store(path) as store, store.txn() as txn:
        return {m.name: m.seq for m in bookmarks.all_points(store, txn) if m.is_hold}


async def bookmark(vol: Volume, name: str, seq: int | None) -> None:
    """What ``cdpfs bookmark`` (``seq`` None: ``--delete``) does, in a write
    transaction after everything the volume applied."""
    live, store = vol.live, vol.store
    assert live is not None and store is not None
    if seq is None:
        await live.engine.in_writer(lambda txn: bookmarks.delete(store, txn, name))
    else:
        await live.engine.in_writer(lambda txn: bookmarks.put(store, txn, name, seq))


async def refused(vol: Volume, error: type[Exception], fn: Callable[..., Any],
                  *args: Any) -> bool:
    """Whether ``fn(*args)`` as a volume call fails with ``error``."""
    try:
        await vol.call(fn, *args)
    except error:
        return True
    return False


# --- every moment form ---------------------------------------------------------------------


async def test_seq_moment_shows_the_state_after_that_record(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        seqs = []
        for i in range(4):
            await put(vol, b"f", b"version %d" % i * (i + 1))
            seqs.append(await last_seq(vol))
        await mkdir(vol, b"later")
        for i, seq in enumerate(seqs):
            assert await read_path(vol, at(seq), b"f") == b"version %d" % i * (i + 1)
            assert not await exists(vol, at(seq), b"later")
        assert await exists(vol, at("now"), b"later")
        assert not await exists(vol, at(1), b"f")  # the empty volume of the first record


async def test_now_moves_and_an_earlier_now_stays(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        await put(vol, b"f", b"first")
        [old_root, old_f] = await lookup_path(vol, at("now"), b"f")
        await put(vol, b"f", b"second, longer")
        [new_root, new_f] = await lookup_path(vol, at("now"), b"f")
        assert new_root.ino != old_root.ino
        assert await read_ino(vol, new_f.ino) == b"second, longer"
        assert await read_ino(vol, old_f.ino) == b"first"  # the earlier @now is a past now
        assert old_root.ttl is not None and old_root.ttl <= 1.0  # the kernel re-asks soon
        await forget(vol, [old_root, old_f, new_root, new_f])


async def test_bookmark_moment_names_its_point(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        await put(vol, b"f", b"marked content")
        marked = await last_seq(vol)
        await put(vol, b"f", b"after the mark")
        await bookmark(vol, "release-1.0", marked)
        assert await read_path(vol, b"@release-1.0", b"f") == b"marked content"
        [by_mark] = await lookup_path(vol, b"@release-1.0")
        [by_seq] = await lookup_path(vol, at(marked))
        assert by_mark.ino == by_seq.ino  # one point, one tree
        await forget(vol, [by_mark, by_seq])
        await bookmark(vol, "release-1.0", None)
        with pytest.raises(BadMoment):
            await lookup_path(vol, b"@release-1.0")
        assert await read_path(vol, b"f") == b"after the mark"


async def test_iso_moment_at_nanosecond_precision(tmp_path: Path) -> None:
    clock = ahead_clock()
    t = clock.now + 123_456_789
    async with served(new_store(tmp_path), clock=clock) as vol:
        clock.now = t
        await put(vol, b"f", b"stamped at t")
        clock.now = t + 1  # one nanosecond later
        await put(vol, b"f", b"stamped 1 ns after t")
        clock.advance(5)
        for form in (local_ns, utc_ns):
            assert await read_path(vol, at(form(t)), b"f") == b"stamped at t", form(t)
            assert await read_path(vol, at(form(t + 1)), b"f") == b"stamped 1 ns after t"
            assert not await exists(vol, at(form(t - 1)), b"f"), form(t - 1)
        sec = dt.datetime.fromtimestamp(t // SECOND).isoformat(timespec="seconds")
        assert not await exists(vol, at(sec), b"f")  # the second starts before t
        safe = dt.datetime.fromtimestamp(t // SECOND + 1).strftime("%Y-%m-%dT%H-%M-%S")
        assert await read_path(vol, at(safe), b"f") == b"stamped 1 ns after t"


async def test_relative_moment_reads_the_volume_clock(tmp_path: Path) -> None:
    clock = ahead_clock()
    async with served(new_store(tmp_path), clock=clock) as vol:
        await put(vol, b"f", b"a minute ago")
        clock.advance(60)
        await put(vol, b"f", b"ten seconds ago")
        clock.advance(10)
        assert await read_path(vol, b"@-30s", b"f") == b"a minute ago"
        assert await read_path(vol, b"@-5s", b"f") == b"ten seconds ago"
        assert await read_path(vol, b"@-1m", b"f") == b"a minute ago"  # 70 s after it
        assert not await exists(vol, b"@-2m", b"f")  # before f was made
        with pytest.raises(BadMoment):  # the store was made an hour before the clock
            await lookup_path(vol, b"@-2h")


async def test_malformed_future_and_unknown_moments_are_not_found(tmp_path: Path) -> None:
    clock = ahead_clock()
    async with served(new_store(tmp_path), clock=clock) as vol:
        await put(vol, b"f", b"x")
        last = await last_seq(vol)
        bad = [b"@", b"@2026-13-45", b"@2026-02-30T10:00", b"@2099-01-01", b"@#0",
               at(last + 1), b"@#12x", b"@-5x", b"@nosuchmark", b"@yesterday-ish",
               at(local_ns(clock.now + 1)), b"@-3h", b"@.hidden"]
        for name in bad:
            with pytest.raises(BadMoment) as exc:
                await lookup_path(vol, name)
            assert isinstance(exc.value, NotFound), name
            assert str(exc.value) and "\n" not in str(exc.value), name
        assert await holds_now(vol) == {}  # nothing was shown, nothing is held
        assert await read_path(vol, at(last), b"f") == b"x"


# --- history is read-only ---------------------------------------------------------------


async def test_every_change_under_a_moment_is_read_only(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        f = await put(vol, b"f", b"past content")
        await vol.call(fs.setxattr, f, b"user.k", b"v")
        d = await mkdir(vol, b"d")
        await put(vol, b"inner", b"inner content", parent=d)
        await mkdir(vol, b"empty")
        seq = await last_seq(vol)
        await put(vol, b"f", b"live content")
        [p, pf] = await lookup_path(vol, at(seq), b"f")
        pd = await vol.call(fs.lookup, p.ino, b"d")
        pfh = await vol.call(fs.open, pf.ino, os.O_RDONLY)
        attempts: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "create": (fs.create, (p.ino, b"new", 0o644, os.O_WRONLY, 0, 0)),
            "create in subdir": (fs.create, (pd.ino, b"new", 0o644, os.O_WRONLY, 0, 0)),
            "create an @ name": (fs.create, (p.ino, b"@x", 0o644, os.O_WRONLY, 0, 0)),
            "mkdir": (fs.mknod, (pd.ino, b"sub", stat.S_IFDIR | 0o755, 0, 0)),
            "mknod": (fs.mknod, (p.ino, b"node", stat.S_IFREG | 0o644, 0, 0)),
            "mkfifo": (fs.mknod, (p.ino, b"fifo", stat.S_IFIFO | 0o644, 0, 0)),
            "symlink": (fs.mknod, (p.ino, b"l", stat.S_IFLNK | 0o777, 0, 0, 0, b"f")),
            "unlink": (fs.unlink, (p.ino, b"f")),
            "rmdir": (fs.rmdir, (p.ino, b"empty")),
            "rename": (fs.rename, (p.ino, b"f", p.ino, b"g", 0)),
            "rename into subdir": (fs.rename, (p.ino, b"f", pd.ino, b"f", 0)),
            "link": (fs.link, (pf.ino, pd.ino, b"hard")),
            "chmod": (lambda: fs.setattr(pf.ino, mode=0o600), ()),
            "chown": (lambda: fs.setattr(pf.ino, uid=1000, gid=1000), ()),
            "utime": (lambda: fs.setattr(pf.ino, atime=1, mtime=2), ()),
            "truncate": (lambda: fs.setattr(pf.ino, size=0), ()),
            "chmod of the @ root": (lambda: fs.setattr(p.ino, mode=0o700), ()),
            "setxattr": (fs.setxattr, (pf.ino, b"user.k", b"w")),
            "new xattr": (fs.setxattr, (pf.ino, b"user.other", b"w")),
            "removexattr": (fs.removexattr, (pf.ino, b"user.k")),
            "open for write": (fs.open, (pf.ino, os.O_WRONLY)),
            "open read-write": (fs.open, (pf.ino, os.O_RDWR)),
            "open for append": (fs.open, (pf.ino, os.O_WRONLY | os.O_APPEND)),
            "open O_TRUNC": (fs.open, (pf.ino, os.O_WRONLY | os.O_TRUNC)),
            "open O_RDONLY|O_TRUNC": (fs.open, (pf.ino, os.O_RDONLY | os.O_TRUNC)),
            "write to a read handle": (fs.write, (pfh, 0, b"w")),
        }
        got = {what: await refused(vol, ReadOnly, fn, *args)
               for what, (fn, args) in attempts.items()}
        assert got == dict.fromkeys(attempts, True)
        with pytest.raises(ReadOnly):
            await vol.write(pfh, 0, b"through the volume")
        assert await vol.call(fs.read, pfh, 0, 100) == b"past content"
        await vol.call(fs.release, pfh)
        assert sorted(await names_in(vol, p.ino)) == [b"d", b"empty", b"f"]
        assert await names_in(vol, pd.ino) == [b"inner"]
        assert await vol.call(fs.getxattr, pf.ino, b"user.k") == b"v"
        assert (await vol.call(fs.getattr, pf.ino)).mode == stat.S_IFREG | 0o644
        assert await read_path(vol, b"f") == b"live content"  # live untouched too
        await forget(vol, [p, pf, pd])


async def test_links_and_renames_between_history_and_live_are_cross_device(
        tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        f = await put(vol, b"f", b"content")
        d = await mkdir(vol, b"d")
        seq = await last_seq(vol)
        [p, pf] = await lookup_path(vol, at(seq), b"f")
        [_, pd] = await lookup_path(vol, at(seq), b"d")
        attempts: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "link past file into live": (fs.link, (pf.ino, ROOT, b"linked")),
            "link live file into past": (fs.link, (f, p.ino, b"linked")),
            "rename past file to live": (fs.rename, (p.ino, b"f", ROOT, b"moved", 0)),
            "rename past dir to live": (fs.rename, (p.ino, b"d", d, b"moved", 0)),
            "rename live file to past": (fs.rename, (ROOT, b"f", p.ino, b"moved", 0)),
            "rename live file into past dir": (fs.rename, (ROOT, b"f", pd.ino, b"f", 0)),
        }
        got = {what: await refused(vol, CrossDevice, fn, *args)
               for what, (fn, args) in attempts.items()}
        assert got == dict.fromkeys(attempts, True)
        live_names = [n for n in await names_in(vol, ROOT) if not n.startswith(b"@")]
        assert live_names == [b"d", b"f"]
        assert await names_in(vol, d) == []
        assert await read_path(vol, b"f") == b"content"
        assert sorted(await names_in(vol, p.ino)) == [b"d", b"f"]
        await forget(vol, [p, pf, pd])


# --- @ names at the live root -------------------------------------------------------------


async def test_root_names_starting_with_at_are_reserved(tmp_path: Path) -> None:
    async with served(new_store(tmp_path), show_history=False) as vol:
        fs = vol.fs
        assert fs is not None
        f = await put(vol, b"live", b"x")
        attempts: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "create": (fs.create, (ROOT, b"@file", 0o644, os.O_WRONLY, 0, 0)),
            "create @now": (fs.create, (ROOT, b"@now", 0o644, os.O_WRONLY, 0, 0)),
            "mkdir": (fs.mknod, (ROOT, b"@x", stat.S_IFDIR | 0o755, 0, 0)),
            "mkfifo": (fs.mknod, (ROOT, b"@fifo", stat.S_IFIFO | 0o644, 0, 0)),
            "symlink": (fs.mknod, (ROOT, b"@l", stat.S_IFLNK | 0o777, 0, 0, 0, b"live")),
            "link": (fs.link, (f, ROOT, b"@h")),
            "rename": (fs.rename, (ROOT, b"live", ROOT, b"@r", 0)),
        }
        got = {what: await refused(vol, Reserved, fn, *args)
               for what, (fn, args) in attempts.items()}
        assert got == dict.fromkeys(attempts, True)
        assert await names_in(vol, ROOT) == [b"live"]
        assert await read_path(vol, b"live") == b"x"
        # Below the root, @ is an ordinary first character.
        d = await mkdir(vol, b"d")
        await put(vol, b"@fine", b"ok", parent=d)
        assert await read_path(vol, b"d", b"@fine") == b"ok"
        assert await names_in(vol, d) == [b"@fine"]


async def test_at_names_at_the_live_root_cannot_be_removed_or_moved(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        await put(vol, b"f", b"kept")
        seq = await last_seq(vol)
        await bookmark(vol, "mark", seq)
        d = await mkdir(vol, b"d")
        attempts: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "unlink @mark": (fs.unlink, (ROOT, b"@mark")),
            "rmdir @mark": (fs.rmdir, (ROOT, b"@mark")),
            "rmdir @now": (fs.rmdir, (ROOT, b"@now")),
            "unlink @#seq": (fs.unlink, (ROOT, at(seq))),
            "rename @mark": (fs.rename, (ROOT, b"@mark", ROOT, b"renamed", 0)),
            "rename @now into a dir": (fs.rename, (ROOT, b"@now", d, b"x", 0)),
        }
        got = {what: await refused(vol, ReadOnly, fn, *args)
               for what, (fn, args) in attempts.items()}
        assert got == dict.fromkeys(attempts, True)
        assert await read_path(vol, b"@mark", b"f") == b"kept"
        assert not await exists(vol, b"renamed") and await names_in(vol, d) == []


# --- inode numbers and past content ---------------------------------------------------------


async def test_the_same_file_at_two_moments_is_two_kernel_inodes(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        live_ino = await put(vol, b"f", b"one")
        s1 = await last_seq(vol)
        await put(vol, b"f", b"two, longer")
        s2 = await last_seq(vol)
        await bookmark(vol, "first", s1)
        [r1, f1] = await lookup_path(vol, at(s1), b"f")
        [r2, f2] = await lookup_path(vol, at(s2), b"f")
        [rm, fm] = await lookup_path(vol, b"@first", b"f")
        [rn, fnow] = await lookup_path(vol, at("now"), b"f")
        assert len({f1.ino, f2.ino, live_ino}) == 3
        assert split(f1.ino)[1] == split(f2.ino)[1] == split(live_ino)[1]  # one store inode
        assert split(live_ino)[0] == 0 and 0 not in (split(f1.ino)[0], split(f2.ino)[0])
        assert (fm.ino, rm.ino) == (f1.ino, r1.ino)  # the same point: the same inodes
        assert (fnow.ino, rn.ino) == (f2.ino, r2.ino)
        assert (await vol.call(fs.getattr, f1.ino)).size == 3
        assert (await vol.call(fs.getattr, f2.ino)).size == 11
        assert await read_ino(vol, f1.ino) == b"one"
        assert await read_ino(vol, f2.ino) == b"two, longer"
        await forget(vol, [r1, f1, r2, f2, rm, fm, rn, fnow])


async def test_past_content_stays_while_the_live_file_changes(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        original = os.urandom(300_000)  # more than two blocks
        f = await put(vol, b"f", original)
        seq = await last_seq(vol)
        [p, pf] = await lookup_path(vol, at(seq), b"f")
        pfh = await vol.call(fs.open, pf.ino, os.O_RDONLY)

        async def past_unchanged() -> None:
            assert await vol.call(fs.read, pfh, 0, 1 << 20) == original
            assert await read_path(vol, at(seq), b"f") == original

        fh = await vol.call(fs.open, f, os.O_WRONLY)
        await vol.write(fh, 1000, b"overwritten in place")
        await vol.write(fh, len(original), b"appended")
        await vol.fsync(fh)
        await past_unchanged()
        await set_attr(vol, f, size=10)
        await past_unchanged()
        assert await read_path(vol, b"f") == original[:10]
        await vol.call(fs.release, fh)
        await vol.call(fs.unlink, ROOT, b"f")
        await vol.fsyncdir()
        await past_unchanged()
        assert not await exists(vol, b"f")
        assert await vol.call(fs.read, pfh, 200_000, 10) == original[200_000:200_010]
        await vol.call(fs.release, pfh)
        await forget(vol, [p, pf])


async def test_past_attributes_xattrs_and_symlinks_are_those_of_the_moment(
        tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        f = await put(vol, b"f", b"data", mode=0o640)
        await vol.call(fs.setxattr, f, b"user.k", b"old value")
        link = await vol.call(fs.mknod, ROOT, b"l", stat.S_IFLNK | 0o777, 0, 0, 0, b"f")
        seq = await last_seq(vol)
        await set_attr(vol, f, mode=0o600, uid=1000, mtime=12345)
        await vol.call(fs.setxattr, f, b"user.k", b"new value")
        await vol.call(fs.setxattr, f, b"user.added", b"later")
        await vol.call(fs.unlink, ROOT, b"l")
        await vol.call(fs.forget, [(link.ino, 1)])
        await vol.call(fs.mknod, ROOT, b"l", stat.S_IFLNK | 0o777, 0, 0, 0, b"elsewhere")

        [p, pf] = await lookup_path(vol, at(seq), b"f")
        [_, pl] = await lookup_path(vol, at(seq), b"l")
        then = await vol.call(fs.getattr, pf.ino)
        assert (stat.S_IMODE(then.mode), then.uid) == (0o640, 0)
        assert then.mtime != 12345 and pf.attr == then
        assert await vol.call(fs.getxattr, pf.ino, b"user.k") == b"old value"
        assert await vol.call(fs.listxattr, pf.ino) == [b"user.k"]
        with pytest.raises(NoAttribute):
            await vol.call(fs.getxattr, pf.ino, b"user.added")
        assert await vol.call(fs.readlink, pl.ino) == b"f"
        with pytest.raises(InvalidArgument):
            await vol.call(fs.readlink, pf.ino)
        # ... while the live tree shows the changes.
        now = await vol.call(fs.getattr, f)
        assert (stat.S_IMODE(now.mode), now.uid, now.mtime) == (0o600, 1000, 12345)
        assert sorted(await vol.call(fs.listxattr, f)) == [b"user.added", b"user.k"]
        [live_l] = await lookup_path(vol, b"l")
        assert await vol.call(fs.readlink, live_l.ino) == b"elsewhere"
        await forget(vol, [p, pf, p, pl, live_l])


async def test_past_directory_lists_its_entries_then(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        d = await mkdir(vol, b"d")
        for name in (b"a", b"b", b"c"):
            await put(vol, name, name * 3, parent=d)
        seq = await last_seq(vol)
        await vol.call(fs.unlink, d, b"a")
        await vol.call(fs.rename, d, b"b", d, b"bb", 0)
        await put(vol, b"new", b"new", parent=d)
        await vol.call(fs.rename, ROOT, b"d", ROOT, b"renamed", 0)
        await vol.fsyncdir()

        [p, pd] = await lookup_path(vol, at(seq), b"d")
        entries = await listing(vol, pd.ino)
        assert [name for _, name, _ in entries] == [b"a", b"b", b"c"]
        assert {split(e.ino)[0] for _, _, e in entries} == {split(p.ino)[0]}
        assert [e.attr.size for _, _, e in entries] == [3, 3, 3]
        assert await names_in(vol, p.ino) == [b"d"]  # no @ entries inside history
        assert await read_path(vol, at(seq), b"d", b"a") == b"aaa"
        assert sorted(await names_in(vol, d)) == [b"bb", b"c", b"new"]
        await forget(vol, [p, pd])


# --- the root listing --------------------------------------------------------------------


async def test_root_lists_bookmarks_and_recent_points(tmp_path: Path) -> None:
    clock = ahead_clock()
    async with served(new_store(tmp_path), clock=clock) as vol:
        await put(vol, b"f", b"marked")
        await bookmark(vol, "mark", await last_seq(vol))
        clock.advance(3)
        await put(vol, b"f", b"latest")
        newest = await last_seq(vol)
        for advance in (0, 2):  # listed at once, and two seconds later
            clock.advance(advance)
            entries = await listing(vol, ROOT, keep=True)
            names = [name for _, name, _ in entries]
            assert names[0] == b"f" and b"@mark" in names, names
            auto = [e for _, name, e in entries if name.startswith(b"@20")]
            assert auto, names
            for _, name, entry in entries:
                if not name.startswith(b"@"):
                    continue
                assert entry.attr.is_dir and split(entry.ino)[0] != 0
                [root] = await lookup_path(vol, name)  # every listed name resolves
                assert root.ino == entry.ino, name  # ... to the point it was listed with
                await forget(vol, [root])
            assert await read_path(vol, b"@mark", b"f") == b"marked"
            [newest_root] = await lookup_path(vol, at(newest))
            assert any(e.ino == newest_root.ino for e in auto), "the newest change is unlisted"
            assert await read_path(vol, b"@mark", b"f") == b"marked"
            await forget(vol, [newest_root, *(e for _, _, e in entries)])


async def test_hidden_history_lists_no_moments_but_resolves_them(tmp_path: Path) -> None:
    async with served(new_store(tmp_path), show_history=False) as vol:
        await put(vol, b"f", b"marked")
        seq = await last_seq(vol)
        await bookmark(vol, "mark", seq)
        await put(vol, b"f", b"later")
        assert await names_in(vol, ROOT) == [b"f"]
        assert await read_path(vol, b"@mark", b"f") == b"marked"
        assert await read_path(vol, at("now"), b"f") == b"later"
        assert await read_path(vol, at(seq), b"f") == b"marked"
        assert await names_in(vol, ROOT) == [b"f"]


async def test_root_listing_pages_without_losing_or_repeating_entries(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        for i in range(3):
            await put(vol, b"f%d" % i, b"x")
            await bookmark(vol, f"m{i}", await last_seq(vol))
        held = await listing(vol, ROOT, keep=True)  # (so its @ entries keep their inodes)
        whole = [(name, e.ino) for _, name, e in held]
        assert len(whole) >= 7, whole  # 3 files, 3 bookmarks, recent points
        fh = await vol.call(fs.opendir, ROOT)
        paged: list[tuple[bytes, int]] = []
        offsets: list[int] = []
        start = 0
        while True:
            batch = await vol.call(fs.readdir, fh, start, 2)
            if not batch:
                break
            assert len(batch) <= 2
            await vol.call(fs.count_lookups, [e.ino for _, _, e in batch])
            paged += [(name, e.ino) for _, name, e in batch]
            offsets += [off for off, _, _ in batch]
            start = batch[-1][0]
        await vol.call(fs.releasedir, fh)
        await vol.call(fs.forget, [(ino, 1) for _, ino in paged + whole])
        assert paged == whole
        assert offsets == sorted(set(offsets))


# --- holds ---------------------------------------------------------------------------------


async def test_a_hold_lasts_while_the_kernel_references_a_past_tree(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        await put(vol, b"f", b"x")
        seq = await last_seq(vol)
        await put(vol, b"f", b"y")
        assert await committed_holds(vol) == {}
        [root, f] = await lookup_path(vol, at(seq), b"f")
        [again] = await lookup_path(vol, at(seq))
        slot = split(root.ino)[0]
        held = {f".hold.{os.getpid()}.slot{slot}": seq}
        assert await holds_now(vol) == held
        assert await committed_holds(vol) == held
        await forget(vol, [root, f])
        assert await committed_holds(vol) == held  # one reference is left
        await forget(vol, [again])
        assert await committed_holds(vol) == {}
        assert await read_path(vol, b"f") == b"y"


async def test_an_open_past_file_keeps_its_hold(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        await put(vol, b"f", b"old")
        seq = await last_seq(vol)
        await put(vol, b"f", b"new")
        [root, f] = await lookup_path(vol, at(seq), b"f")
        fh = await vol.call(fs.open, f.ino, os.O_RDONLY)
        await forget(vol, [root, f])  # the kernel forgets the names; the file stays open
        assert list((await committed_holds(vol)).values()) == [seq]
        assert await vol.call(fs.read, fh, 0, 10) == b"old"
        await vol.call(fs.release, fh)
        assert await committed_holds(vol) == {}


async def test_holds_are_dropped_when_the_volume_stops(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        await put(vol, b"f", b"x")
        seq = await last_seq(vol)
        await put(vol, b"f", b"y")
        await lookup_path(vol, at(seq), b"f")  # never forgotten: the kernel still knows it
        fs = vol.fs
        assert fs is not None
        [_, g] = await lookup_path(vol, at("now"), b"f")
        await vol.call(fs.open, g.ino, os.O_RDONLY)  # never released
        assert len(await committed_holds(vol)) == 2
    assert stored_holds(path) == {}
    async with served(path) as vol:  # and the store serves again, history whole
        assert await read_path(vol, at(seq), b"f") == b"x"


async def test_a_forgotten_slot_is_stale_and_never_reused(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        await put(vol, b"f", b"x")
        seq = await last_seq(vol)
        [root, f] = await lookup_path(vol, at(seq), b"f")
        await forget(vol, [root, f])
        for fn, args in ((fs.getattr, (f.ino,)), (fs.open, (f.ino, os.O_RDONLY)),
                         (fs.lookup, (root.ino, b"f")), (fs.opendir, (root.ino,))):
            with pytest.raises(Stale):
                await vol.call(fn, *args)
        [root2, f2] = await lookup_path(vol, at(seq), b"f")
        assert split(root2.ino)[0] > split(root.ino)[0]
        assert split(f2.ino)[1] == split(f.ino)[1]
        assert await read_ino(vol, f2.ino) == b"x"
        await forget(vol, [root2, f2])


# --- permissions -------------------------------------------------------------------------


async def test_past_file_closed_since_is_refused_to_others(tmp_path: Path) -> None:
    async with served(new_store(tmp_path)) as vol:
        fs = vol.fs
        assert fs is not None
        a = await put(vol, b"a", b"content a")
        await put(vol, b"c", b"content c")
        await put(vol, b"d", b"content d")
        mine = await put(vol, b"mine", b"content mine", uid=NOBODY.uid, gid=NOBODY.gid)
        sub = await mkdir(vol, b"sub")
        await put(vol, b"inner", b"inner", parent=sub)
        seq = await last_seq(vol)
        await set_attr(vol, a, mode=0o600)
        await set_attr(vol, mine, mode=0o600)
        await set_attr(vol, sub, mode=0o700)
        await vol.call(fs.unlink, ROOT, b"d")
        past = at(seq)

        with pytest.raises(AccessDenied):  # open then, closed now
            await read_path(vol, past, b"a", who=NOBODY)
        assert await read_path(vol, past, b"c", who=NOBODY) == b"content c"
        assert await read_path(vol, past, b"d", who=NOBODY) == b"content d"  # deleted since
        assert await read_path(vol, past, b"mine", who=NOBODY) == b"content mine"  # owner
        [p, psub] = await lookup_path(vol, past, b"sub", who=NOBODY)
        with pytest.raises(AccessDenied):
            await vol.call(fs.lookup, psub.ino, b"inner", NOBODY)
        with pytest.raises(AccessDenied):
            await vol.call(fs.opendir, psub.ino, NOBODY)
        for who in (Caller(0, 0), None):  # root, and requests without a caller
            assert await read_path(vol, past, b"a", who=who) == b"content a"
            assert await read_path(vol, past, b"sub", b"inner", who=who) == b"inner"
            assert await names_in(vol, psub.ino, who) == [b"inner"]
        await forget(vol, [p, psub])


# --- snapshot and following volumes --------------------------------------------------------


async def test_snapshot_volume_shows_its_point_and_refuses_changes(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        await put(vol, b"f", b"at the snapshot")
        s1 = await last_seq(vol)
        await put(vol, b"f", b"later")
        await put(vol, b"g", b"born later")
    async with served(path, Mode.SNAPSHOT, at=f"#{s1}") as snap:
        fs = snap.fs
        assert fs is not None
        assert snap.seq == s1
        assert await names_in(snap, ROOT) == [b"f"]
        assert await read_path(snap, b"f") == b"at the snapshot"
        [f] = await lookup_path(snap, b"f")
        attempts: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "create": (fs.create, (ROOT, b"x", 0o644, os.O_WRONLY, 0, 0)),
            "mkdir": (fs.mknod, (ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)),
            "unlink": (fs.unlink, (ROOT, b"f")),
            "rename": (fs.rename, (ROOT, b"f", ROOT, b"g", 0)),
            "chmod": (lambda: fs.setattr(f.ino, mode=0o600), ()),
            "truncate": (lambda: fs.setattr(f.ino, size=0), ()),
            "setxattr": (fs.setxattr, (f.ino, b"user.a", b"b")),
            "open for write": (fs.open, (f.ino, os.O_WRONLY)),
        }
        got = {what: await refused(snap, ReadOnly, fn, *args)
               for what, (fn, args) in attempts.items()}
        assert got == dict.fromkeys(attempts, True)
        assert await holds_now(snap) == {f".hold.{os.getpid()}.snapshot": s1}
        await forget(snap, [f])
    assert stored_holds(path) == {}


async def test_snapshot_at_a_relative_moment_reads_the_volume_clock(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    clock = ahead_clock()
    async with served(path, clock=clock) as vol:
        await put(vol, b"f", b"a minute ago")
        clock.advance(60)
        await put(vol, b"f", b"just now")
    async with served(path, Mode.SNAPSHOT, at="-30s", clock=clock) as snap:
        assert await read_path(snap, b"f") == b"a minute ago"


async def test_following_volume_shows_the_newest_state_read_only(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        await put(vol, b"f", b"old")
        s1 = await last_seq(vol)
        await put(vol, b"f", b"newest")
    async with served(path, Mode.FOLLOW) as follow:
        fs = follow.fs
        assert fs is not None
        [f] = await lookup_path(follow, b"f")
        assert await read_ino(follow, f.ino) == b"newest"
        assert fs.attr_ttl(f.ino) == FOLLOW_TTL and not fs.keep_cache(f.ino)
        [p, pf] = await lookup_path(follow, at(s1), b"f")
        assert await read_ino(follow, pf.ino) == b"old"
        assert fs.attr_ttl(pf.ino) is None and fs.keep_cache(pf.ino)  # the past is fixed
        names = await names_in(follow, ROOT)
        assert b"f" in names and any(n.startswith(b"@") for n in names)
        for fn, args in ((fs.create, (ROOT, b"x", 0o644, os.O_WRONLY, 0, 0)),
                         (fs.open, (f.ino, os.O_WRONLY)), (fs.unlink, (ROOT, b"f"))):
            assert await refused(follow, ReadOnly, fn, *args)
        await forget(follow, [f, p, pf])


WRITER = """
import os, sys, trio
from cdpfs.testing import served

async def main() -> None:
    async with served(sys.argv[1]) as vol:
        entry = await vol.call(vol.fs.lookup, 1, b"f")
        fh = await vol.call(vol.fs.open, entry.ino, os.O_WRONLY | os.O_TRUNC)
        await vol.write(fh, 0, sys.argv[2].encode())
        await vol.fsync(fh)
        await vol.call(vol.fs.release, fh)

trio.run(main)
"""


async def test_following_volume_sees_another_process_write(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        await put(vol, b"f", b"before")
    async with served(path, Mode.FOLLOW) as follow:
        fs = follow.fs
        assert fs is not None
        [f] = await lookup_path(follow, b"f")
        fh = await follow.call(fs.open, f.ino, os.O_RDONLY)
        proc = await trio.run_process([sys.executable, "-c", WRITER, str(path),
                                       "written by another process"],
                                      capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        assert await read_path(follow, b"f") == b"written by another process"
        assert await read_path(follow, at("now"), b"f") == b"written by another process"
        # A file opened before reads the version of its open, whole.
        assert await follow.call(fs.read, fh, 0, 100) == b"before"
        await follow.call(fs.release, fh)
        await forget(follow, [f])


# --- statfs and damage -----------------------------------------------------------------


async def test_statfs_reports_the_disk_under_the_store(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        assert vol.fs is not None
        await put(vol, b"f", b"x")
        st = await vol.call(vol.fs.statfs)
        ref = os.statvfs(path)
    assert isinstance(st, DiskStats)
    assert (st.bsize, st.frsize, st.blocks, st.files) == (
        ref.f_bsize, ref.f_frsize, ref.f_blocks, ref.f_files)
    assert abs(st.bavail - ref.f_bavail) * ref.f_frsize < 256 << 20  # others write too
    assert 0 < st.bavail <= st.bfree <= st.blocks
    async with served(path, Mode.SNAPSHOT, at="now") as snap:
        assert snap.fs is not None
        snap_st = await snap.call(snap.fs.statfs)
    assert (snap_st.frsize, snap_st.blocks) == (st.frsize, st.blocks)


def flip_block(path: Path, key: bytes) -> None:
    """Flip every bit of one byte in the middle of stored block ``key`` (store unserved)."""
    size = (path / "data.mdb").stat().st_size
    env = lmdb.open(str(path), map_size=max(1 << 30, 2 * size), max_dbs=32)
    try:
        db = env.open_db(b"blocks", create=False)
        with env.begin(write=True) as txn:
            value = txn.get(key, db=db)
            assert value is not None, f"block {key.hex()} is not stored under its hash"
            i = len(value) // 2
            txn.put(key, value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1:], db=db)
    finally:
        env.close()


async def test_a_corrupt_block_reads_as_corrupt_live_and_in_history(tmp_path: Path) -> None:
    path = new_store(tmp_path)
    async with served(path) as vol:
        assert vol.store is not None
        block = vol.store.block_size
        content = os.urandom(2 * block)  # incompressible: each block stored whole, raw
        await put(vol, b"victim", content)
        await put(vol, b"bystander", b"unharmed")
        seq = await last_seq(vol)
    key = codec.digest(content[:block])
    flip_block(path, key)
    async with served(path) as vol:
        fs = vol.fs
        assert fs is not None
        for names in ((b"victim",), (at(seq), b"victim")):
            entries = await lookup_path(vol, *names)
            fh = await vol.call(fs.open, entries[-1].ino, os.O_RDONLY)
            for off, n in ((0, 4096), (block - 1, 2), (0, 2 * block)):
                with pytest.raises(Corrupt) as exc:
                    await vol.call(fs.read, fh, off, n)
                assert exc.value.digest == key
            assert await vol.call(fs.read, fh, block, block) == content[block:]
            await vol.call(fs.release, fh)
            await forget(vol, entries)
        assert await read_path(vol, b"bystander") == b"unharmed"


# --- retention -----------------------------------------------------------------------------


async def test_a_moment_in_thinned_history_shows_the_kept_point_before_it(
        tmp_path: Path) -> None:
    """After the keep-everything day, one point per minute is kept: a time inside a
    minute shows the newest kept point at or before it, a #seq of a thinned record is
    refused, and the last record of the minute still shows."""
    clock = ahead_clock()
    base = clock.now
    async with served(new_store(tmp_path), clock=clock) as vol:
        clock.now = base + 10 * SECOND
        await put(vol, b"f", b"a")
        clock.now = base + 20 * SECOND
        await put(vol, b"f", b"b")
        thinned = await last_seq(vol)
        clock.now = base + 30 * SECOND
        await put(vol, b"f", b"c")
        kept = await last_seq(vol)
        clock.now = base + 70 * SECOND
        await put(vol, b"f", b"d")
        assert await read_path(vol, at(thinned), b"f") == b"b"  # within the first day
        clock.advance(2 * 86400)
        with pytest.raises(BadMoment):
            await lookup_path(vol, at(thinned))
        assert await read_path(vol, at(kept), b"f") == b"c"
        assert await read_path(vol, at(local_ns(base + 35 * SECOND)), b"f") == b"c"
        assert not await exists(vol, at(local_ns(base + 25 * SECOND)), b"f")
        assert await read_path(vol, b"f") == b"d"
