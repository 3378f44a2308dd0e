"""Moments (``@`` names of past states): parsing and resolution against a real store."""

from __future__ import annotations

import datetime as dt
import errno
import os
import time
from pathlib import Path

import pytest

from cdpfs.fs.mutate import Mutator, init_volume
from cdpfs.history.moments import BadMoment, parse
from cdpfs.history.points import resolve
from cdpfs.mount.errnos import errno_of
from cdpfs.store import journal, pending
from cdpfs.store.pending import Pending
from cdpfs.store.schema import U64

NOW = int(dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC).timestamp()) * 10**9


@pytest.mark.parametrize(("spec", "expect"), [
    ("@2026-11-25T10:00:00.250Z", NOW - 2 * 3600 * 10**9 + 250_000_000),
    ("@2026-11-25T10:00Z", NOW - 2 * 3600 * 10**9),
    ("@2026-11-25T10-00-00Z", NOW - 2 * 3600 * 10**9),
    ("@2026-11-25T11:00:00+01:00", NOW - 2 * 3600 * 10**9),
    ("@2026-11-25T10:00:00.000000001Z", NOW - 2 * 3600 * 10**9 + 1),
    ("@-15m", NOW - 15 * 60 * 10**9),
    ("@-2h", NOW - 2 * 3600 * 10**9),
    ("@-3d", NOW - 3 * 86400 * 10**9),
])
def test_times(spec: str, expect: int) -> None:
    m = parse(spec, NOW)
    assert (m.kind, m.value) == ("time", expect)


def test_local_time_uses_the_machine_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert parse("@2026-11-25T13:00", NOW).value == NOW  # CET is UTC+1 in November
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_seq_and_bookmark_and_errors() -> None:
    assert parse("@#12345").kind == "seq" and parse("@#12345").value == 12345
    assert parse("@before-upgrade").value == "before-upgrade"
    for bad in ("@", "@#12a", "@2026-13-45T10:00", "@2026-11-25T25:00", "@-15x", "@a/b",
                "@2026-11-25Tnoon"):
        with pytest.raises(BadMoment) as exc:
            parse(bad, NOW)
        assert bad in str(exc.value) and errno_of(exc.value) == errno.ENOENT


def test_resolve_against_a_store(tmp_path: Path) -> None:
    store = init_volume(tmp_path / "s")
    try:
        changes = Pending()
        with store.env.begin(write=True) as txn:
            m = Mutator(store, lambda: txn, changes)
            import stat

            ino, _ = m.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
            m.write(ino, 0, os.urandom(10))
            m.seal()
            pending.write(store, txn, changes.current)
            txn.put(b"mark", U64.pack(2), db=store.db["bookmarks"])
            last, ts = journal.last(store, txn)
        with store.env.begin() as txn:
            assert resolve(store, txn, "@#2").seq == 2
            assert resolve(store, txn, "@mark").seq == 2
            assert resolve(store, txn, f"@{ts_iso(ts)}").seq == last
            for bad, why in (("@#99", "no record"), ("@nomark", "no such bookmark"),
                             ("@2099-01-01T00:00Z", "future"), ("@1999-01-01T00:00Z", "not exist")):
                with pytest.raises(BadMoment, match=why):
                    resolve(store, txn, bad)

    finally:
        store.close()


def ts_iso(ns: int) -> str:
    when = dt.datetime.fromtimestamp(ns // 10**9, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"
