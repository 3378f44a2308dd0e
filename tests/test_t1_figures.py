"""The figures operators watch (``cdpfs.figures``), computed once for ``status``,
the health endpoint, the metrics and the console.

A replica's lag in seconds is how long the oldest record it lacks has waited:
a replica away for 3 s after an hour without writes lacks 3 s of writes (it
showed the hour: the gap between the newest record's time and the last
acknowledged one's). In-process stores; ``cdpfs status`` as a user runs it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from harness import cdpfs

from cdpfs.figures import NONE, cluster_lag, replica_lag, window
from cdpfs.fs.mutate import init_volume
from cdpfs.replication import registry
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, LiveStore

S = 10**9


def _write(live: LiveStore, name: bytes, data: bytes) -> None:
    fh, _ = live.create(name)
    live(live.fs.write, fh, 0, data)
    live(live.fs.release, fh)
    live.sync()


def _volume(path: Path, clock: FakeClock) -> tuple[int, int]:
    """A volume written an hour ago, then 3 s before ``clock`` ends up: (the seq of
    the hour-old write, the newest seq)."""
    init_volume(path, clock=clock).close()  # its first record too, an hour ago
    with LiveStore(path, clock=clock, existing=True) as live:
        _write(live, b"old", b"written an hour ago")
        old = live.seq()
        clock.advance(3600 - 3)
        _write(live, b"new", b"written 3 s ago")
        return old, live.seq()


def _acked(path: Path, name: str, seq: int) -> None:
    """Replica ``name`` of the store at ``path`` has acknowledged record ``seq``."""
    registry.register(path, name, "127.0.0.1:7999")
    with Store(path) as store, store.txn(write=True) as txn:
        state = registry.get(store, txn, name)
        assert state is not None
        state.acked, state.acked_ts = seq, journal.ts(store, txn, seq) or 0
        registry.put(store, txn, state)


def test_lag_seconds_count_from_the_oldest_record_the_replica_lacks(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000 * S)
    path = tmp_path / "vol"
    old, newest = _volume(path, clock)
    now = clock() + 3 * S
    with Store(path, readonly=True) as store, store.txn() as txn:
        lag = replica_lag(store, txn, old, now)
        assert lag.records == newest - old > 0
        assert 2.9 < lag.seconds < 3.1, lag  # not the hour since the acknowledged write
        assert lag.complete and lag.bytes > len(b"written 3 s ago")
        assert replica_lag(store, txn, newest, now) == NONE
        assert replica_lag(store, txn, 0, now).seconds == 3600  # lacks the first record too
        assert replica_lag(store, txn, old, now, count_bytes=False).bytes == 0
        kept = window(store, txn, now)  # every record is a point: back to the first
        assert (kept.oldest_seq, kept.seconds) == (1, 3600)


def test_status_shows_the_seconds_the_replica_lacks(tmp_path: Path) -> None:
    clock = FakeClock(time.time_ns() - 3600 * S)  # the hour-old write is an hour old now
    path = tmp_path / "vol"
    old, newest = _volume(path, clock)
    _acked(path, "r1", old)
    out = cdpfs("status", path).stdout
    got = re.search(r"replica +r1 .*acked #(\d+), lag (\d+) records / [\d.]+ MiB / "
                    r"([\d.]+)s", out)
    assert got, out
    assert (int(got[1]), int(got[2])) == (old, newest - old)
    assert 3 <= float(got[3]) < 60, out  # 3 s and the test's own time, not 3,597 s
    assert re.search(r"window +back to \S+ \(#1, 1\.0 h ago\)", out), out


def test_cluster_lag_is_behind_the_newest_position_reported() -> None:
    assert cluster_lag({"a": 120, "b": 100, "c": 120}) == {"a": 0, "b": 20, "c": 0}
    assert cluster_lag({}) == {}
