"""Send and receive in this process: streams of a volume's history into other stores.

A volume is written over simulated time (files made, overwritten, renamed, deleted,
bookmarked); its history goes whole, then in increments, then collapsed to its
ends, into new stores, which must show the same tree at every point they carry,
with the same bookmarks, and pass verify. A store prune thinned is sent too. Then
every way a stream can be wrong: cut short anywhere (resumed with the token the
receive printed), a byte flipped anywhere, another volume's, an incremental
without its base, a store in use, and forged, foreign and garbled tokens.
Real stores and the real engine; no FUSE.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from cdpfs.errors import StoreLocked
from cdpfs.history import bookmarks
from cdpfs.history.prune import prune_store
from cdpfs.history.retention import Policy, save_policy
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.replication import stream, wire
from cdpfs.replication.receiver import ROLE_REPLICA
from cdpfs.store import blocks, epochs, journal
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, LiveStore

S = 10**9


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames of a few blocks each: these small volumes' streams are many frames long,
    so they can break off between frames as a large one does."""
    monkeypatch.setattr(stream, "BATCH_BYTES", 512 * 1024)


# --- a volume with some history ---------------------------------------------------------


def write(live: LiveStore, clock: FakeClock, rnd: random.Random, names: list[bytes],
          rounds: int) -> None:
    """``rounds`` changes, a second apart: creates, overwrites, renames, deletes."""
    for _ in range(rounds):
        clock.advance(1)
        action = rnd.random()
        if action < 0.5 or len(names) < 3:
            name = b"f%d" % rnd.randrange(1000)
            if name not in names:
                fh, _ = live.create(name)
                names.append(name)
            else:
                fh = reopen(live, name)
            size = rnd.choice([100, 5000, 200_000])
            live(live.fs.write, fh, rnd.randrange(0, 300_000), rnd.randbytes(size))
            live(live.fs.release, fh)
        elif action < 0.75:
            old = rnd.choice(names)
            new = b"r%d" % rnd.randrange(1000)
            if new in names:
                continue
            live(live.fs.rename, 1, old, 1, new, 0)
            names[names.index(old)] = new
        else:
            name = rnd.choice(names)
            live(live.fs.unlink, 1, name)
            names.remove(name)
    live.sync()


def reopen(live: LiveStore, name: bytes) -> int:
    ino = live(lambda: live.fs.view.lookup(1, name))
    return int(live(live.fs.open, ino, os.O_RDWR))


def make_volume(path: Path, seed: int = 1, rounds: int = 40,
                ) -> tuple[LiveStore, FakeClock, random.Random, list[bytes]]:
    clock = FakeClock(1_800_000_000 * S)
    live = LiveStore(path, clock=clock)
    rnd = random.Random(seed)
    names: list[bytes] = []
    write(live, clock, rnd, names, rounds)
    return live, clock, rnd, names


def points(store: Store) -> dict[int, str]:
    """{seq: tree hash} of every point a time resolves to."""
    with store.txn() as txn:
        return {rec.seq: tree_hash(store, txn, rec.seq)[0]
                for rec in journal.records(store, txn)
                if journal.indexed(store, txn, rec.seq, rec.ts)}


def marks(store: Store) -> dict[str, int]:
    with store.txn() as txn:
        return {b.name: b.seq for b in bookmarks.bookmarks(store, txn)}


def top(store: Store) -> int:
    with store.txn() as txn:
        return journal.top(store, txn)


# --- sending and receiving through a buffer ------------------------------------------------


def send(store: Store, **plan: Any) -> bytes:
    out = io.BytesIO()

    async def run() -> None:
        await stream.send(store, wire.Connection(wire.FileStream(out)),
                          stream.plan(store, **plan))

    trio.run(run)
    return out.getvalue()


def receive(path: Path, data: bytes, **options: Any) -> stream.Result:
    async def run() -> stream.Result:
        return await stream.receive(path, wire.Connection(wire.FileStream(io.BytesIO(data))),
                                    **options)

    return trio.run(run)


def opened(path: Path) -> Store:
    return Store(path)


# --- the tests ----------------------------------------------------------------------------


def test_full_then_incremental_streams_carry_every_point(tmp_path: Path) -> None:
    live, clock, rnd, names = make_volume(tmp_path / "src")
    with live:
        src = live.store
        with src.txn(write=True) as txn:
            bookmarks.put(src, txn, "first", journal.top(src, txn))
        full = send(src)
        result = receive(tmp_path / "dst", full)
        assert result.created and result.to_seq == top(src)
        assert result.tree == points(src)[top(src)]  # a full stream's end carries it
        with opened(tmp_path / "dst") as dst:
            assert points(dst) == points(src)
            assert marks(dst) == {"first": top(src)}
            assert dst.uuid == src.uuid
            with dst.txn() as txn:
                assert dst.config(txn, "role") == ROLE_REPLICA  # takes increments, no writes
            assert verify(dst) == []
        base = top(src)
        write(live, clock, rnd, names, 30)
        incremental = send(src, start=f"#{base}")
        assert len(incremental) < len(full)
        receive(tmp_path / "dst", incremental)
        with opened(tmp_path / "dst") as dst:
            assert points(dst) == points(src) and len(points(dst)) > 60
            assert verify(dst) == []
        # the same increment again: the store is past its start now
        with pytest.raises(stream.StreamError, match=r"has records after #\d+, up to #\d+"):
            receive(tmp_path / "dst", incremental)


def test_ends_collapse_the_stretch_to_its_two_points(tmp_path: Path) -> None:
    live, clock, rnd, names = make_volume(tmp_path / "src", seed=2)
    with live:
        src = live.store
        receive(tmp_path / "dst", send(src))
        base = top(src)
        for _ in range(20):  # the same file overwritten: only the last version matters
            clock.advance(1)
            fh = reopen(live, b"hot") if b"hot" in names else live.create(b"hot")[0]
            names.append(b"hot") if b"hot" not in names else None
            live(live.fs.write, fh, 0, rnd.randbytes(300_000))
            live(live.fs.release, fh)
        write(live, clock, rnd, names, 10)
        every = send(src, start=f"#{base}")
        ends = send(src, start=f"#{base}", ends=True)
        assert len(ends) < len(every) / 3
        receive(tmp_path / "dst", ends)
        with opened(tmp_path / "dst") as dst:
            mine, theirs = points(dst), points(src)
            assert set(mine) == {s for s in theirs if s <= base} | {top(src)}
            assert all(mine[s] == theirs[s] for s in mine)
            assert verify(dst) == []
        # a point only the sender has is no base for the next stream
        clock.advance(1)
        write(live, clock, rnd, names, 3)
        between = sorted(theirs)[-3]
        with pytest.raises(stream.StreamError, match=f"lacks the point the stream starts "
                                                     f"from, #{between}"):
            receive(tmp_path / "dst", send(src, start=f"#{between}"))
        receive(tmp_path / "dst", send(src, start=f"#{max(mine)}"))
        with opened(tmp_path / "dst") as dst:
            assert points(dst)[top(src)] == points(src)[top(src)]


def test_a_thinned_history_goes_as_it_is_kept(tmp_path: Path) -> None:
    live, clock, rnd, names = make_volume(tmp_path / "src", seed=3, rounds=30)
    with live:
        src = live.store
        with src.txn(write=True) as txn:
            bookmarks.put(src, txn, "kept", journal.top(src, txn) - 10)
        clock.advance(3600)
        write(live, clock, rnd, names, 10)
        with src.txn(write=True) as txn:
            save_policy(src, txn, Policy(keep_all=60, minutely=600, hourly=86400,
                                         daily=86400))
        result = prune_store(src, keep_after=None, now_ns=clock.now)
        assert result.records > 0
        thinned = points(src)
        assert len(thinned) < top(src) - 20
        receive(tmp_path / "dst", send(src))
        with opened(tmp_path / "dst") as dst:
            assert points(dst) == thinned
            assert marks(dst) == marks(src)
            assert verify(dst) == []


def test_a_stream_cut_short_anywhere_resumes_from_its_token(tmp_path: Path) -> None:
    live, _, _, _ = make_volume(tmp_path / "src", seed=4, rounds=60)
    with live:
        src = live.store
        data = send(src)
        want = points(src)
        rnd = random.Random(5)
        for n, cut in enumerate(sorted(rnd.sample(range(1, len(data)), 6))):
            dst = tmp_path / f"dst{n}"
            with pytest.raises(stream.StreamError) as err:
                receive(dst, data[:cut])
            assert "\n" not in str(err.value)
            token = err.value.token
            if not token:  # cut before its first records: no store is left behind
                assert not dst.exists()
                continue
            assert token == stream.pending(dst)
            with opened(dst) as store:
                assert verify(store) == []  # what was kept is sound
                kept = points(store)
            assert all(want[s] == h for s, h in kept.items())
            receive(dst, send(src, resume=token))
            with opened(dst) as store:
                assert points(store) == want
            assert stream.pending(dst) == ""


def test_a_flipped_byte_anywhere_is_refused_and_nothing_wrong_is_kept(tmp_path: Path) -> None:
    live, _, _, _ = make_volume(tmp_path / "src", seed=6, rounds=25)
    with live:
        src = live.store
        data = send(src)
        want = points(src)
    rnd = random.Random(7)
    for n, at in enumerate(rnd.sample(range(len(data)), 12)):
        damaged = bytearray(data)
        damaged[at] ^= 1 << rnd.randrange(8)
        dst = tmp_path / f"dst{n}"
        with pytest.raises(stream.StreamError) as err:
            receive(dst, bytes(damaged))
        assert "\n" not in str(err.value)
        if dst.exists() and any(dst.iterdir()):
            with opened(dst) as store:
                assert verify(store) == []
                assert all(want[s] == h for s, h in points(store).items())


def test_streams_that_do_not_fit_the_store_are_refused(tmp_path: Path) -> None:
    live, clock, rnd, names = make_volume(tmp_path / "src", seed=8, rounds=10)
    other, _, _, _ = make_volume(tmp_path / "other", seed=9, rounds=5)
    with live, other:
        src = live.store
        full = send(src)
        base = top(src)
        write(live, clock, rnd, names, 5)
        incremental = send(src, start=f"#{base}")
        with pytest.raises(stream.StreamError, match="is not a store, and this stream "
                                                     f"continues the history from #{base}"):
            receive(tmp_path / "none", incremental)
        assert not (tmp_path / "none").exists()
        receive(tmp_path / "again", full)
        with pytest.raises(stream.StreamError, match="already holds history"):
            receive(tmp_path / "again", full)
        # a new volume from another's full stream: a store of its own
        receive(tmp_path / "copy", send(other.store), new_volume=True)
        with opened(tmp_path / "copy") as copy:
            assert copy.uuid != other.store.uuid
            assert points(copy) == points(other.store)
        with pytest.raises(stream.StreamError, match="the stream is of volume"):
            receive(tmp_path / "copy", full)
        with pytest.raises(stream.StreamError, match="--new-volume takes a full stream"):
            receive(tmp_path / "copy2", incremental, new_volume=True)
        with pytest.raises(stream.StreamError, match="not a cdpfs send stream"):
            receive(tmp_path / "junk", b"PK\x03\x04 not a stream at all" * 10)
        with pytest.raises(stream.StreamError, match="not a cdpfs send stream"):
            receive(tmp_path / "empty", b"")
        # a store in use (a mount, a replica server) takes no stream
        receive(tmp_path / "busy", full)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from cdpfs.store.lmdb import Store; "
             "s = Store(sys.argv[1]); s.lock('mount'); print('held', flush=True); "
             "time.sleep(60)", str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(StoreLocked, match="in use by mount"):
                receive(tmp_path / "busy", incremental)
        finally:
            holder.kill()
            holder.wait()
        receive(tmp_path / "busy", incremental)


def test_forged_foreign_and_garbled_tokens_are_refused(tmp_path: Path) -> None:
    live, _, _, _ = make_volume(tmp_path / "src", seed=10, rounds=40)
    other, _, _, _ = make_volume(tmp_path / "other", seed=11, rounds=40)
    with live, other:
        src = live.store
        data = send(src)
        with pytest.raises(stream.StreamError) as err:
            receive(tmp_path / "dst", data[: len(data) // 2])
        token = err.value.token
        ident, after, check = stream.read_token(token)
        assert after > 0
        with pytest.raises(stream.StreamError, match="of volume"):
            stream.plan(other.store, resume=token)
        forged = stream.make_token(ident, after, bytes(16))
        with pytest.raises(stream.StreamError, match=f"names record #{after} as this store "
                                                     "does not hold it"):
            send(src, resume=forged)
        beyond = stream.make_token(ident, ident.to_seq + 5, check)
        with pytest.raises(stream.StreamError, match="outside its stretch"):
            stream.plan(src, resume=beyond)
        changed = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
        for garbled in (token[:-3], changed, "hello", ""):
            with pytest.raises(stream.StreamError, match="not a resume token"):
                stream.plan(src, resume=garbled)
        # a good token of another stream into this partial store: refused there
        other_data = send(src, start=f"#{after}")
        with pytest.raises(stream.StreamError, match="in the middle of another receive"):
            receive(tmp_path / "dst", other_data)
        receive(tmp_path / "dst", send(src, resume=token))
        with opened(tmp_path / "dst") as dst:
            assert points(dst) == points(src)


def test_a_copy_taken_over_numbers_its_packs_apart_from_the_old_primary(
        tmp_path: Path) -> None:
    """Pack ids are numbers, not hashes: a primary that lost its role and a copy that
    took over must never hand out the same one (the old primary, rejoining as a
    replica, keeps its packs of after the fork and would take an offered pack of the
    same id as one it has: its reads would fail their hash check)."""
    live, clock, _, names = make_volume(tmp_path / "src", seed=12, rounds=10)

    def small_writes(store_live: LiveStore) -> set[int]:
        with store_live.store.txn() as txn:
            before = {p for p, _ in blocks.scan_packs(store_live.store, txn)}
        for n in range(5):  # partial-block writes: their bytes go into packs
            fh = reopen(store_live, names[0])
            store_live(store_live.fs.write, fh, 1000 + n, b"x%d" % n * 30)
            store_live(store_live.fs.release, fh)
            store_live.sync()
        with store_live.store.txn() as txn:
            return {p for p, _ in blocks.scan_packs(store_live.store, txn)} - before

    with live:
        receive(tmp_path / "copy", send(live.store))
        with Store(tmp_path / "copy") as copy, copy.txn(write=True) as txn:
            epochs.begin(copy, txn, epochs.seen(copy, txn) + 1)  # what a promotion does
        old = small_writes(live)  # the old primary writes on after the take-over
    with LiveStore(tmp_path / "copy", clock=clock, existing=True) as taken_over:
        new = small_writes(taken_over)
    assert old and new and not old & new
