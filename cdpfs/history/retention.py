"""The retention policy: how long history is kept, and how densely.

The policy keeps every record for ``keep_all`` seconds, then the last record of
each minute until ``minutely``, of each hour until ``hourly``, of each day (UTC)
until ``daily``; older points go, except bookmarks, holds and the newest record.
Buckets nest (a day's last record is also its hour's and minute's last), so a
point kept today was kept yesterday: once ``prune`` has removed what the policy
no longer keeps, every moment still resolves to a point whose state is intact
(``points.py`` applies the policy to a store's journal).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from ..store.lmdb import Store

MINUTE, HOUR, DAY = 60 * 10**9, 3600 * 10**9, 86400 * 10**9
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdwy])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
MAX_DURATION = 1000 * _UNIT_S["y"]  # seconds: longer is a typo (and overflows a float)


def parse_duration(text: str) -> int:
    """Seconds in ``30m``, ``24h``, ``7d``, ``2w``, ``1y`` (ValueError if malformed or
    longer than 1000 years)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r}: a duration is a number and one of s m h d w y")
    seconds = float(m[1]) * _UNIT_S[m[2]]  # inf for hundreds of digits: refused below
    if not seconds <= MAX_DURATION:
        raise ValueError(f"{text!r}: a duration is at most 1000y")
    return int(seconds)


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


def configure(path: Path, *, keep_all: str | None = None, minutely: str | None = None,
              hourly: str | None = None, daily: str | None = None,
              prune_interval: str | None = None, replica_max_lag: int | None = None,
              ) -> tuple[Policy, int]:
    """Set what is given of the retention of the store at ``path`` (durations as
    ``parse_duration`` reads them; ValueError, nothing changed, for a bad one):
    the policy and how often a mount prunes in seconds, as they are now."""
    with Store(path) as store, store.txn(write=True) as txn:
        old = load_policy(store, txn)
        new = Policy(*(parse_duration(v) if v else getattr(old, k) for k, v in (
            ("keep_all", keep_all), ("minutely", minutely), ("hourly", hourly),
            ("daily", daily))))
        if new != old:
            save_policy(store, txn, new)
        if prune_interval:
            store.set_config(txn, "prune_interval", parse_duration(prune_interval))
        if replica_max_lag is not None:
            store.set_config(txn, "replica_max_lag", replica_max_lag)
        return new, int(store.config(txn, "prune_interval") or 3600)
