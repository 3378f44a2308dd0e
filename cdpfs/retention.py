"""Which points of history are kept, and how a moment resolves to one of them.

The policy keeps every record for ``keep_all`` seconds, then the last record of
each minute until ``minutely``, of each hour until ``hourly``, of each day (UTC)
until ``daily``; older points go, except bookmarks, holds and the newest record.
Buckets nest (a day's last record is also its hour's and minute's last), so a
point kept today was kept yesterday: once ``prune`` has removed what the policy
no longer keeps, every moment still resolves to a point whose state is intact.

``Points.resolve`` is the one place a moment (``@`` name, ``--at``) becomes a
sequence number: a time between kept points shows the newest kept point at or
before it, whether or not prune has run yet; a ``#seq`` that the policy has
thinned is refused, naming the nearest kept point.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import time
from dataclasses import asdict, dataclass

import lmdb

from . import bookmarks, journal
from .store import Store
from .timespec import BadMoment, Moment
from .timespec import resolve as resolve_raw

MINUTE, HOUR, DAY = 60 * 10**9, 3600 * 10**9, 86400 * 10**9
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdwy])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``30m``, ``24h``, ``7d``, ``2w``, ``1y`` (ValueError if malformed)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r}: a duration is a number and one of s m h d w y")
    return int(float(m[1]) * _UNIT_S[m[2]])


def format_duration(seconds: int) -> str:
    for unit in "ydhms":
        n = _UNIT_S[unit]
        if seconds % n == 0 and seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Policy:
    """Retention periods in seconds, each counted from now back."""

    keep_all: int = 86400
    minutely: int = 7 * 86400
    hourly: int = 30 * 86400
    daily: int = 365 * 86400

    def bucket(self, age_ns: int) -> int | None:
        """The bucket width (ns) for a record this old: 0 keeps all, None none."""
        age = age_ns // 10**9
        if age < self.keep_all:
            return 0
        for limit, width in ((self.minutely, MINUTE), (self.hourly, HOUR), (self.daily, DAY)):
            if age < limit:
                return width
        return None

    def check(self) -> None:
        if not self.keep_all <= self.minutely <= self.hourly <= self.daily:
            raise ValueError("retention periods must not shrink: "
                             "keep-all <= minutely <= hourly <= daily")

    def describe(self) -> str:
        return (f"every write for {format_duration(self.keep_all)}, then one point per minute "
                f"to {format_duration(self.minutely)}, per hour to "
                f"{format_duration(self.hourly)}, per day to {format_duration(self.daily)}; "
                "bookmarks until deleted")


def load_policy(store: Store, txn: lmdb.Transaction) -> Policy:
    raw = store.config(txn, "retention")
    return Policy(**raw) if raw else Policy()


def save_policy(store: Store, txn: lmdb.Transaction, policy: Policy) -> None:
    policy.check()
    store.set_config(txn, "retention", asdict(policy))


class Points:
    """The kept points of a store as of ``now_ns``, read through ``txn``."""

    def __init__(self, store: Store, txn: lmdb.Transaction, now_ns: int | None = None,
                 policy: Policy | None = None) -> None:
        self.store = store
        self.txn = txn
        self.dbs = store.db
        self.now = time.time_ns() if now_ns is None else now_ns
        self.policy = policy or load_policy(store, txn)
        self.last, self.last_ts = journal.last(txn, self.dbs)
        self.marks = bookmarks.all_points(txn, self.dbs)
        self._marked_set = {b.seq for b in self.marks}
        self._marked = sorted(self._marked_set)

    def ts(self, seq: int) -> int | None:
        raw = self.txn.get(journal.U64.pack(seq), db=self.dbs["journal"])
        return None if raw is None else journal.ts_of(raw)

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
        nxt = journal.after(self.txn, self.dbs, seq)
        return nxt is None or nxt[1] // width != ts // width

    def snap(self, seq: int) -> int:
        """The newest kept point <= ``seq`` (0 if none is left)."""
        i = bisect.bisect_right(self._marked, seq)
        marked = self._marked[i - 1] if i else 0
        while seq > marked:
            ts = self.ts(seq)
            if ts is None:  # thinned away already: look at the record before it
                seq = journal.before(self.txn, self.dbs, seq)[0]
                continue
            if self.is_kept(seq, ts):
                return seq
            width = self.policy.bucket(self.now - ts)
            if not width:
                break
            seq, _ = journal.point_at(self.txn, self.dbs, ts // width * width - 1)
        return marked

    def resolve(self, moment: Moment) -> int:
        """The kept point a moment names (BadMoment if none)."""
        seq = resolve_raw(moment, self.txn, self.dbs, self.now)
        if moment.kind in ("bookmark", "now"):
            return seq
        if moment.kind == "seq":
            if self.ts(seq) is None or not self.is_kept(seq):
                near = self.snap(seq)
                raise BadMoment(f"{moment.text!r}: record #{seq} is not kept by retention"
                                + (f" (nearest kept point before it: #{near})" if near else ""))
            return seq
        kept = self.snap(seq)
        if kept == 0:
            raise BadMoment(f"{moment.text!r}: older than the oldest point kept")
        return kept

    def first_full(self) -> int:
        """The first seq of the keep-everything window (every seq from it on is kept)."""
        seq, _ = journal.point_at(self.txn, self.dbs, self.now - self.policy.keep_all * 10**9)
        return min(seq + 1, self.last)

    def recent(self, hours: int = 24, days: int = 30) -> list[tuple[int, int]]:
        """(seq, ts) of the latest change of each of the last hours and days, newest first."""
        out: dict[int, int] = {}
        for width, count in ((HOUR, hours), (DAY, days)):
            end = (self.now // width + 1) * width
            for _ in range(count):  # the last `count` buckets that saw a change
                seq, ts = journal.point_at(self.txn, self.dbs, end - 1)
                if seq == 0:
                    break
                end = ts // width * width
                kept = self.snap(seq)
                if kept:
                    out[kept] = self.ts(kept) or ts
        return sorted(out.items(), reverse=True)

    def name_of(self, seq: int, ts: int) -> str:
        """A moment name (local time) that resolves to ``seq``: seconds when enough."""
        nxt = journal.after(self.txn, self.dbs, seq)
        ceil = -(-ts // 10**9) * 10**9
        local = dt.datetime.fromtimestamp(ceil / 1e9)
        if ceil <= self.now and (nxt is None or nxt[1] > ceil):
            return local.isoformat(timespec="seconds")
        return dt.datetime.fromtimestamp(ts // 10**9).isoformat(timespec="seconds") + \
            f".{ts % 10**9:09d}"

    def kept_sparse(self, before: int) -> list[int]:
        """Every kept point below seq ``before``, in order (a scan of the old journal)."""
        out = set(b for b in self._marked if b < before)
        cur = self.txn.cursor(db=self.dbs["journal"])
        prev: tuple[int, int] | None = None
        for key, raw in cur.iternext():
            seq = journal.U64.unpack(key)[0]
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
