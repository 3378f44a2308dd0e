"""The kept points of a store's history, and the one way a moment becomes one of them.

``Points`` applies the retention policy (``retention.Policy``) to the journal
as of a moment ``now``: which records are kept points, the newest kept point at
or before any seq, the recent points a root listing shows, and the sparse
points prune keeps. ``resolve`` is the one place a moment (an ``@`` name, an
``--at`` option, a bookmark's ``--at``) becomes a sequence number: a time
between kept points shows the newest kept point at or before it, whether or not
prune has run yet; a ``#seq`` that the policy has thinned is refused, naming the
nearest kept point; a bookmark names its point; ``now`` the newest record.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..store import bookmarks as marks
from ..store import journal
from ..store.lmdb import Store
from .moments import BadMoment, Moment, parse
from .retention import DAY, HOUR, Policy, load_policy


def point_name(ts: int) -> str:
    """The one name of an automatic point whose record is stamped ``ts``: that time in
    UTC to the nanosecond (``2026-12-01T20:44:46.980672794Z``). The same in every
    mount and tool, whatever the time zone or the clock now, and unambiguous: the
    points listed are the last record of their time, so the name resolves to them."""
    when = dt.datetime.fromtimestamp(ts // 10**9, dt.UTC)
    return f"{when.strftime('%Y-%m-%dT%H:%M:%S')}.{ts % 10**9:09d}Z"


@dataclass(frozen=True, slots=True)
class Point:
    """A kept point: its sequence number and the time of its record."""

    seq: int
    ts: int


def resolve(store: Store, txn: lmdb.Transaction, text: str, now_ns: int | None = None,
            ) -> Point:
    """The kept point the moment ``text`` names (BadMoment, one line, if none)."""
    points = Points(store, txn, now_ns)
    seq = points.resolve(parse(text, points.now))
    return Point(seq, points.ts(seq) or 0)


def find(path: Path, text: str, now_ns: int | None = None) -> Point:
    """The kept point the moment ``text`` names in the store at ``path``."""
    with Store(path) as store, store.txn() as txn:
        return resolve(store, txn, text, now_ns)


class Points:
    """The kept points of a store as of ``now_ns``, read through ``txn``."""

    def __init__(self, store: Store, txn: lmdb.Transaction, now_ns: int | None = None,
                 policy: Policy | None = None) -> None:
        self.store = store
        self.txn = txn
        self.now = time.time_ns() if now_ns is None else now_ns
        self.policy = policy or load_policy(store, txn)
        self.last, self.last_ts = journal.last(store, txn)
        # Holds of processes that are gone hold nothing (prune deletes them).
        self.marks = [b for b in marks.points(store, txn)
                      if not b.is_hold or b.holder_alive]
        self._marked_set = {b.seq for b in self.marks}
        if store.base is not None:  # a clone keeps the point it was made at
            self._marked_set.add(store.base.seq)
        self._marked = sorted(self._marked_set)

    def ts(self, seq: int) -> int | None:
        return journal.ts(self.store, self.txn, seq)

    def is_kept(self, seq: int, ts: int | None = None) -> bool:
        """Whether the policy (or a bookmark or hold) keeps the state after ``seq``."""
        if seq == self.last or seq in self._marked_set:
            return True
        ts = self.ts(seq) if ts is None else ts
        if ts is None:
            return False
        width = self.policy.bucket(self.now - ts)
        if width is None:
            return False
        if width == 0:
            return True
        nxt = journal.after(self.store, self.txn, seq)
        return nxt is None or nxt[1] // width != ts // width

    def snap(self, seq: int) -> int:
        """The newest kept point <= ``seq`` (0 if none is left)."""
        i = bisect.bisect_right(self._marked, seq)
        marked = self._marked[i - 1] if i else 0
        while seq > marked:
            ts = self.ts(seq)
            if ts is None:  # thinned away already: look at the record before it
                seq = journal.before(self.store, self.txn, seq)[0]
                continue
            if self.is_kept(seq, ts):
                return seq
            width = self.policy.bucket(self.now - ts)
            if not width:
                break
            seq, _ = journal.point_at(self.store, self.txn, ts // width * width - 1)
        return marked

    def resolve(self, moment: Moment) -> int:
        """The kept point a moment names (BadMoment if none)."""
        if moment.kind == "now":
            return self.last
        if moment.kind == "bookmark":
            mark = marks.get(self.store, self.txn, str(moment.value))
            if mark is None:
                raise BadMoment(f"{moment.text!r}: no such bookmark")
            return mark.seq
        if moment.kind == "seq":
            seq = int(moment.value)
            if not 1 <= seq <= self.last:
                raise BadMoment(f"{moment.text!r}: no record #{seq} (the journal has "
                                f"1..{self.last})")
            if self.ts(seq) is None or not self.is_kept(seq):
                near = self.snap(seq)
                raise BadMoment(f"{moment.text!r}: record #{seq} is not kept by retention"
                                + (f" (nearest kept point before it: #{near})" if near else ""))
            return seq
        ts = int(moment.value)
        if ts > self.now:
            raise BadMoment(f"{moment.text!r}: that time is in the future")
        seq = journal.seq_at(self.store, self.txn, ts)
        if seq == 0:
            first = journal.after(self.store, self.txn, 0)
            if first is not None and first[0] > 1:  # the first records are pruned
                raise BadMoment(f"{moment.text!r}: older than the oldest point kept")
            raise BadMoment(f"{moment.text!r}: the volume did not exist yet")

        kept = self.snap(seq)
        if kept == 0:
            raise BadMoment(f"{moment.text!r}: older than the oldest point kept")
        return kept

    def first_full(self) -> int:
        """The first seq of the keep-everything window (every seq from it on is kept)."""
        seq, _ = journal.point_at(self.store, self.txn, self.now - self.policy.keep_all * 10**9)
        return min(seq + 1, self.last)

    def recent(self, hours: int = 24, days: int = 30) -> list[tuple[int, int]]:
        """(seq, ts) of the latest change of each of the last hours and days, newest first."""
        out: dict[int, int] = {}
        for width, count in ((HOUR, hours), (DAY, days)):
            end = (self.now // width + 1) * width
            for _ in range(count):  # the last `count` buckets that saw a change
                seq, ts = journal.point_at(self.store, self.txn, end - 1)
                if seq == 0:
                    break
                end = ts // width * width
                kept = self.snap(seq)
                if kept:
                    out[kept] = self.ts(kept) or ts
        return sorted(out.items(), reverse=True)

    def kept_sparse(self, before: int) -> list[int]:
        """Every kept point below seq ``before``, in order (a scan of the old journal)."""
        out = set(b for b in self._marked if b < before)
        prev: tuple[int, int] | None = None
        for seq, raw in journal.packed(self.store, self.txn):
            ts = journal.ts_of(raw)
            if prev is not None:
                pseq, pts = prev
                width = self.policy.bucket(self.now - pts)
                if width == 0 or (width is not None and ts // width != pts // width):
                    out.add(pseq)
            if seq >= before:
                break
            prev = (seq, ts)
        return sorted(out)


def oldest_point(store: Store, txn: lmdb.Transaction) -> tuple[int, int]:
    """(seq, ts) of the oldest point a moment can still resolve to, (0, 0) if none:
    records kept only to date versions come before it and are not points."""
    points = Points(store, txn)
    for seq, raw in journal.packed(store, txn):
        ts = journal.ts_of(raw)
        if points.is_kept(seq, ts):
            return seq, ts
    return 0, 0
