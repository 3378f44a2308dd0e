"""Retention without a mount: the policy's ages, durations, and prune of a real store
whose history was written over three simulated days by a fake clock.

The kept points are checked against a computation made here from the record
timestamps alone (the last record of each minute, hour or UTC day, by the age
of the record), then ``cdpfs.volume.prune`` runs on a copy of that store: every
kept point must show the same tree afterwards, moments must resolve the same,
thinned ``#seq`` names are refused naming the nearest kept point, holds of dead
processes go, and the journal a replica still needs stays.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cdpfs import system
from cdpfs.history import bookmarks
from cdpfs.history.moments import BadMoment
from cdpfs.history.points import Points, resolve
from cdpfs.history.prune import PruneResult
from cdpfs.history.retention import (
    DAY,
    HOUR,
    MINUTE,
    Policy,
    format_duration,
    load_policy,
    parse_duration,
    save_policy,
)
from cdpfs.history.treehash import tree_hash
from cdpfs.replication import registry
from cdpfs.replication.registry import ReplicaState
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
from cdpfs.store.refs import Refs
from cdpfs.store.schema import U64
from cdpfs.testing import FakeClock, LiveStore
from cdpfs.volume import prune

S = 10**9
BS = 128 * 1024
# keep everything 1 h, then one point a minute to 6 h, an hour to 30 h, a day to 60 h
POLICY = Policy(keep_all=3600, minutely=6 * 3600, hourly=30 * 3600, daily=60 * 3600)
DEAD_PID = 999999  # above pid_max (32768 by default, 4194304 at most): never a process


# --- the policy by itself ---------------------------------------------------------------------


@pytest.mark.parametrize(("age_s", "width"), [
    (0, 0),
    (3599, 0),
    (3600, MINUTE),
    (7199, MINUTE),
    (7200, HOUR),
    (86399, HOUR),
    (86400, DAY),
    (7 * 86400 - 1, DAY),
    (7 * 86400, None),
    (10 * 365 * 86400, None),
])
def test_bucket_width_by_age(age_s: int, width: int | None) -> None:
    policy = Policy(keep_all=3600, minutely=7200, hourly=86400, daily=7 * 86400)
    assert policy.bucket(age_s * S) == width
    # a nanosecond less is still the younger bucket (when there is one)
    if age_s:
        younger = policy.bucket(age_s * S - 1)
        assert younger == policy.bucket((age_s - 1) * S)


def test_default_policy_buckets() -> None:
    policy = Policy()
    assert policy.bucket(23 * 3600 * S) == 0
    assert policy.bucket(25 * 3600 * S) == MINUTE
    assert policy.bucket(8 * 86400 * S) == HOUR
    assert policy.bucket(31 * 86400 * S) == DAY
    assert policy.bucket(366 * 86400 * S) is None
    assert policy.bucket(-5 * S) == 0  # a record stamped after "now" is kept whole


@pytest.mark.parametrize("periods", [
    (7200, 3600, 86400, 7 * 86400),   # keep-all longer than minutely
    (3600, 86400, 7200, 7 * 86400),   # minutely longer than hourly
    (3600, 7200, 7 * 86400, 86400),   # hourly longer than daily
    (10, 5, 3, 1),
])
def test_check_refuses_shrinking_periods(periods: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="must not shrink"):
        Policy(*periods).check()


def test_check_accepts_equal_periods() -> None:
    Policy(60, 60, 60, 60).check()
    Policy(0, 0, 0, 0).check()
    Policy().check()


def test_save_policy_refuses_shrinking_and_keeps_the_old_one(tmp_path: Path) -> None:
    live = LiveStore(tmp_path / "s")
    live.close()
    with Store(tmp_path / "s") as store:
        with store.txn() as txn:
            assert load_policy(store, txn) == Policy()  # unset: the default
        with store.txn(write=True) as txn:
            save_policy(store, txn, POLICY)
        with pytest.raises(ValueError), store.txn(write=True) as txn:
            save_policy(store, txn, Policy(keep_all=7200, minutely=3600))
        with store.txn() as txn:
            assert load_policy(store, txn) == POLICY


@pytest.mark.parametrize("seconds", [
    0, 1, 59, 60, 61, 90, 3599, 3600, 5400, 86400, 90000, 7 * 86400, 14 * 86400,
    365 * 86400, 2 * 365 * 86400, 365 * 86400 + 1,
])
def test_duration_round_trip(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 7 * 86400), ("2w", 14 * 86400),
    ("1y", 365 * 86400), ("1.5h", 5400), (" 10m ", 600), ("0.5m", 30),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "   ", "10", "h", "10x", "-5m", "1h30m", "1e3s", "5 m", "m5", "1.h", ".5h", "10M",
    "ten minutes",
])
def test_parse_duration_refuses_bad_input(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# --- a history of three simulated days ---------------------------------------------------------


@dataclass(frozen=True)
class History:
    """A closed store written by a fake clock, and the clock's time at its end."""

    path: Path
    now: int


def write_history(path: Path, clock: FakeClock) -> None:
    """A write every 10 minutes for 3 days (bursts of small writes a few seconds apart,
    a whole-block rewrite of ``big`` now and then, files made and removed)."""
    rnd = random.Random(20261125)
    live = LiveStore(path, clock=clock)
    try:
        files = [live.create(b"f%d" % i)[0] for i in range(3)]
        big, _ = live.create(b"big")
        extra: list[bytes] = []
        for i in range(432):
            clock.advance(600)
            fh = files[i % 3]
            live(live.fs.write, fh, 0, b"v%05d" % i)
            if i % 5 == 0:  # a burst: several records in one minute
                for j in range(3):
                    clock.advance(rnd.choice((3, 4, 9)))
                    live(live.fs.write, fh, 8, b"burst%d.%d" % (i, j))
            if i % 40 == 0:  # a new FULL block: the old one is freed once no point shows it
                live(live.fs.write, big, 0, rnd.randbytes(BS))
            if i % 70 == 0:
                name = b"g%d" % i
                g, _ = live.create(name)
                live(live.fs.write, g, 0, rnd.randbytes(300))
                live(live.fs.release, g)
                extra.append(name)
                if len(extra) > 2:
                    live(live.fs.unlink, 1, extra.pop(0))
        for fh in (*files, big):
            live(live.fs.release, fh)
        live.sync()
    finally:
        live.close()
    with Store(path) as store, store.txn(write=True) as txn:
        save_policy(store, txn, POLICY)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    path = tmp_path_factory.mktemp("history") / "s"
    # Aligned to a UTC midnight (7 s after), one day ahead of the real clock.
    clock = FakeClock((system.coarse_time_ns() // DAY + 1) * DAY + 7 * S)
    write_history(path, clock)
    return History(path, clock())


@contextmanager
def copied(history: History, dest: Path) -> Iterator[Store]:
    """A copy of the history store at ``dest``, open."""
    shutil.copytree(history.path, dest)
    with Store(dest) as s:
        yield s


@pytest.fixture
def store(history: History, tmp_path: Path) -> Iterator[Store]:
    with copied(history, tmp_path / "copy") as s:
        yield s


def stamps(store: Store) -> list[tuple[int, int]]:
    """(seq, ts) of every journal record, in order."""
    with store.txn() as txn:
        return [(r.seq, r.ts) for r in journal.records(store, txn)]


def marked(store: Store) -> set[int]:
    with store.txn() as txn:
        return {b.seq for b in bookmarks.all_points(store, txn)}


def expected_kept(recs: list[tuple[int, int]], policy: Policy, now: int,
                  marks: set[int]) -> set[int]:
    """The points the policy names, worked out from the record timestamps: the last
    record of each minute, hour or UTC day (whichever the record's age asks for),
    everything younger than keep-all, the marks and the newest record."""
    last_of: dict[tuple[int, int], int] = {}
    for seq, ts in recs:
        for width in (MINUTE, HOUR, DAY):
            last_of[width, ts // width] = seq  # later records overwrite: the last one stays
    kept = set(marks) | {recs[-1][0]}
    for seq, ts in recs:
        age = now - ts
        if age < policy.keep_all * S:
            kept.add(seq)
            continue
        for limit, width in ((policy.minutely, MINUTE), (policy.hourly, HOUR),
                             (policy.daily, DAY)):
            if age < limit * S:
                if last_of[width, ts // width] == seq:
                    kept.add(seq)
                break
    return kept


def kept_by_library(store: Store, now: int) -> set[int]:
    with store.txn() as txn:
        points = Points(store, txn, now_ns=now)
        return {s for s in range(1, points.last + 1) if points.is_kept(s)}


def trees(store: Store, seqs: set[int]) -> dict[int, tuple[str, int]]:
    with store.txn() as txn:
        return {s: tree_hash(store, txn, s) for s in sorted(seqs)}


def iso(ts: int) -> str:
    """An exact UTC moment name for ``ts`` (ns)."""
    when = dt.datetime.fromtimestamp(ts // S, dt.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{ts % S:09d}Z"


def journal_keys(store: Store) -> set[int]:
    with store.txn() as txn:
        cur = txn.cursor(db=store.db["journal"])
        return {U64.unpack(k)[0] for k in cur.iternext(values=False)}


def is_idle(result: PruneResult) -> bool:
    return (result.versions, result.records, result.blocks, result.packs,
            result.holds) == (0, 0, 0, 0, 0)


def test_history_keeps_exactly_the_policy_points(store: Store, history: History) -> None:
    recs = stamps(store)
    assert len(recs) > 600
    assert (recs[-1][1] - recs[1][1]) > 3 * 86400 * S - HOUR  # three days of fake time
    expect = expected_kept(recs, POLICY, history.now, marked(store))
    # every tier has points and thinned records, so the comparison means something
    ages = {seq: history.now - ts for seq, ts in recs}
    for lo, hi in ((0, POLICY.keep_all), (POLICY.keep_all, POLICY.minutely),
                   (POLICY.minutely, POLICY.hourly), (POLICY.hourly, POLICY.daily)):
        tier = {s for s, a in ages.items() if lo * S <= a < hi * S}
        assert tier & expect, f"no kept point aged {lo}..{hi} s"
        if lo:
            assert tier - expect, f"nothing thinned aged {lo}..{hi} s"
    assert {s for s, a in ages.items() if a >= POLICY.daily * S} - expect
    assert kept_by_library(store, history.now) == expect

    prune(store, now_ns=history.now)
    # after prune: the same points, by the library and by the timestamps of what is left
    assert kept_by_library(store, history.now) == expect
    left = journal_keys(store)
    assert expect <= left
    assert {s for s, _ in recs} - left, "prune removed no journal record"
    with store.txn() as txn:  # the time index names only kept points below keep-all
        cur = txn.cursor(db=store.db["timeidx"])
        indexed = {U64.unpack(k[8:])[0] for k in cur.iternext(values=False)}
    assert indexed == expect


def test_prune_keeps_every_kept_tree_and_a_second_prune_removes_nothing(
        store: Store, history: History) -> None:
    kept = kept_by_library(store, history.now)
    before = trees(store, kept)
    assert len(set(before.values())) > len(kept) // 2  # the points show different trees
    with store.txn() as txn:
        live_before = tree_hash(store, txn, 2**64 - 1)
    result = prune(store, now_ns=history.now)
    assert result.versions > 0 and result.records > 0 and result.blocks > 0, result
    assert trees(store, kept) == before
    with store.txn() as txn:
        assert tree_hash(store, txn, 2**64 - 1) == live_before
    again = prune(store, now_ns=history.now)
    assert is_idle(again), again
    assert trees(store, kept) == before


def test_time_moments_resolve_to_the_newest_kept_point_before_them(
        store: Store, history: History) -> None:
    recs = stamps(store)
    kept = expected_kept(recs, POLICY, history.now, marked(store))
    moments: list[int] = [recs[0][1] - S]  # before the volume existed
    for (_, ts), (_, nxt) in itertools.pairwise(recs):
        moments.append(ts)
        if nxt > ts + 1:
            moments.append(ts + (nxt - ts) // 2)
    moments.append(history.now)

    def expected(t: int) -> int | None:
        newest = max((s for s, ts in recs if ts <= t), default=0)
        return max((k for k in kept if k <= newest), default=None)

    def resolved(text: str) -> int | None:
        with store.txn() as txn:
            try:
                return resolve(store, txn, text, history.now).seq
            except BadMoment:
                return None

    want = {t: expected(t) for t in moments}
    assert None in want.values() and len(set(want.values())) > 50
    # strictly between two kept points, a moment names the older one
    assert any(k is not None and k not in {s for s, ts in recs if ts == t}
               for t, k in want.items())
    before = {t: resolved(iso(t)) for t in moments}
    assert before == want
    relative = {m: resolved(f"-{m}m") for m in (1, 30, 61, 200, 500, 2000, 3000, 5000)}
    for m, seq in relative.items():
        assert seq == expected(history.now - m * MINUTE), m
    prune(store, now_ns=history.now)
    assert {t: resolved(iso(t)) for t in moments} == before
    assert {m: resolved(f"-{m}m") for m in relative} == relative


def test_a_thinned_seq_is_refused_naming_the_nearest_kept_point(
        store: Store, history: History) -> None:
    recs = stamps(store)
    kept = expected_kept(recs, POLICY, history.now, marked(store))
    thinned = [s for s, _ in recs if s not in kept]
    assert len(thinned) > 100

    def check() -> None:
        with store.txn() as txn:
            points = Points(store, txn, now_ns=history.now)
            for s in range(1, recs[-1][0] + 1):
                if s in kept:
                    assert resolve(store, txn, f"#{s}", history.now).seq == s
                    continue
                with pytest.raises(BadMoment) as exc:
                    resolve(store, txn, f"@#{s}", history.now)
                near = max((k for k in kept if k < s), default=0)
                msg = str(exc.value)
                assert f"#{s} is not kept by retention" in msg
                if near:
                    assert msg.endswith(f"(nearest kept point before it: #{near})"), msg
                else:
                    assert "nearest" not in msg, msg
                assert points.snap(s) == near
            with pytest.raises(BadMoment, match="no record"):
                resolve(store, txn, f"#{recs[-1][0] + 1}", history.now)

    check()
    prune(store, now_ns=history.now)
    check()


def test_bookmarks_and_the_newest_record_outlive_every_period(
        store: Store, history: History) -> None:
    recs = stamps(store)
    kept = kept_by_library(store, history.now)
    old = recs[40][0]
    assert history.now - recs[40][1] > POLICY.daily * S  # beyond every period
    assert old not in kept
    # a record of the hourly tier that is not its hour's last
    mid = next(s for s, ts in recs if history.now - ts < 20 * HOUR and s not in kept)
    assert history.now - dict(recs)[mid] > POLICY.minutely * S
    with store.txn(write=True) as txn:
        bookmarks.put(store, txn, "early", old)
        bookmarks.put(store, txn, "middle", mid)
    shown = trees(store, {old, mid, recs[-1][0]})
    # a year later nothing is young enough for any period: only the marks and the newest
    later = history.now + 365 * DAY
    assert kept_by_library(store, later) == {old, mid, recs[-1][0]}
    result = prune(store, now_ns=later)
    assert result.records > 0
    assert trees(store, {old, mid, recs[-1][0]}) == shown
    assert kept_by_library(store, later) == {old, mid, recs[-1][0]}
    with store.txn() as txn:
        assert resolve(store, txn, "early", later).seq == old
        assert resolve(store, txn, f"#{mid}", later).seq == mid
        assert resolve(store, txn, "now", later).seq == recs[-1][0]
        assert resolve(store, txn, "-1d", later).seq == recs[-1][0]
        # between the two marks, a time shows the older one
        assert resolve(store, txn, iso(recs[41][1]), later).seq == old
        with pytest.raises(BadMoment):
            resolve(store, txn, iso(recs[39][1]), later)


def test_a_time_before_the_oldest_kept_point_is_refused_alike_after_prune(
        store: Store, history: History) -> None:
    """Before prune such a time is "older than the oldest point kept"; prune removes the
    time index of the thinned records, which must not make it read as a time before
    the volume existed."""
    recs = stamps(store)
    kept = kept_by_library(store, history.now)
    oldest = min(kept)
    t = max(ts for s, ts in recs if s < oldest)  # a record of the volume, thinned
    assert t > recs[0][1]

    def refusal() -> str:
        with store.txn() as txn, pytest.raises(BadMoment) as exc:
            resolve(store, txn, iso(t), history.now)
        return str(exc.value)

    before = refusal()
    assert "older than the oldest point kept" in before
    prune(store, now_ns=history.now)
    assert refusal() == before


def test_holds_of_a_dead_process_go_and_holds_of_this_one_stay(
        store: Store, history: History) -> None:
    assert not system.pid_alive(DEAD_PID)
    kept = kept_by_library(store, history.now)
    recs = stamps(store)
    dead_seq, mine_seq = (next(s for s, _ in recs[i:] if s not in kept) for i in (300, 350))
    dead_name = f".hold.{DEAD_PID}.x"
    with store.txn(write=True) as txn:
        txn.put(dead_name.encode(), U64.pack(dead_seq) + U64.pack(0), db=store.db["bookmarks"])
        mine = bookmarks.hold(store, txn, "test", mine_seq)
    assert mine.name.startswith(f".hold.{os.getpid()}.")
    mine_tree = trees(store, {mine_seq})
    result = prune(store, now_ns=history.now)
    assert result.holds == 1
    with store.txn() as txn:
        names = {b.name for b in bookmarks.all_points(store, txn)}
    assert dead_name not in names
    assert mine.name in names
    assert trees(store, {mine_seq}) == mine_tree
    now_kept = kept_by_library(store, history.now)
    assert mine_seq in now_kept
    assert dead_seq not in now_kept  # the dead process's point is no longer kept
    assert now_kept == kept | {mine_seq}
    # the prune that dropped the hold also let its point go: nothing is left to remove
    again = prune(store, now_ns=history.now)
    assert is_idle(again), again


def referenced_by(store: Store, after: int) -> Refs:
    refs = Refs()
    with store.txn() as txn:
        refs.add_records(journal.records(store, txn, after + 1))
    return refs


def present(store: Store, refs: Refs) -> tuple[set[bytes], set[int]]:
    """The blocks and packs of ``refs`` the store holds."""
    with store.txn() as txn:
        blocks = {b for b in refs.blocks if txn.get(b, db=store.db["blocks"]) is not None}
        packs = {p for p in refs.packs if txn.get(U64.pack(p), db=store.db["packs"]) is not None}
    return blocks, packs


def raw_journal(store: Store, after: int) -> dict[int, bytes]:
    with store.txn() as txn:
        cur = txn.cursor(db=store.db["journal"])
        cur.set_range(U64.pack(after + 1))
        return {U64.unpack(k)[0]: bytes(v) for k, v in cur}


def register(store: Store, name: str, acked: int, max_lag: int | None = None) -> None:
    with store.txn(write=True) as txn:
        registry.put(store, txn, ReplicaState(name, "h:1", acked=acked))
        if max_lag is not None:
            store.set_config(txn, "replica_max_lag", max_lag)


def test_prune_keeps_the_journal_a_replica_has_not_acknowledged(
        history: History, tmp_path: Path) -> None:
    with (copied(history, tmp_path / "a") as with_replica,
          copied(history, tmp_path / "b") as alone):
        recs = stamps(alone)
        acked = recs[len(recs) // 5][0]  # about 2.4 days old
        register(with_replica, "r1", acked)
        owed = raw_journal(with_replica, acked)
        refs = referenced_by(with_replica, acked)
        assert len(owed) == recs[-1][0] - acked and refs.blocks and refs.packs

        prune(alone, now_ns=history.now)
        result = prune(with_replica, now_ns=history.now)
        # without the replica, prune thins records after `acked` and frees their blocks
        assert set(owed) - journal_keys(alone)
        assert present(alone, refs)[0] != set(refs.blocks)
        # with it, every record after `acked` is there as it was, and what they reference
        assert raw_journal(with_replica, acked) == owed
        assert present(with_replica, refs) == (set(refs.blocks), set(refs.packs))
        # below `acked` it thinned as usual, and the kept points are those of the policy
        assert result.records > 0 and result.versions > 0
        below = {s for s in journal_keys(alone) if s <= acked}
        assert {s for s in journal_keys(with_replica) if s <= acked} == below
        kept = kept_by_library(alone, history.now)
        assert kept_by_library(with_replica, history.now) == kept
        assert trees(with_replica, kept) == trees(alone, kept)


def test_a_replica_too_far_behind_is_let_go(history: History, tmp_path: Path) -> None:
    with (copied(history, tmp_path / "far") as far,
          copied(history, tmp_path / "edge") as edge,
          copied(history, tmp_path / "alone") as alone):
        last = stamps(alone)[-1][0]
        cap = 200
        register(far, "r1", last - cap - 1, max_lag=cap)  # one record too far behind
        register(edge, "r1", last - cap, max_lag=cap)  # exactly at the limit: still kept for
        with far.txn() as txn:
            assert registry.needed_after(far, txn) is None
        with edge.txn() as txn:
            assert registry.needed_after(edge, txn) == last - cap
        owed = raw_journal(edge, last - cap)
        for s in (far, edge, alone):
            prune(s, now_ns=history.now)
        assert journal_keys(far) == journal_keys(alone)
        assert set(owed) - journal_keys(far)
        assert raw_journal(edge, last - cap) == owed
