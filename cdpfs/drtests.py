"""What a replica store keeps of its DR tests (``cdpfs replica test``), in its settings.

A DR test (run by ``tools/drtest.py``: it clones the replica, mounts the clone,
runs the scenario's steps, cleans up) keeps three settings in the replica store:
``config.drtest``, the last result (``Result``; ``cdpfs status`` shows it);
``config.drtest_running``, the test in progress and what it makes (``Running``:
recorded before it makes anything, so that what a killed test left can be found
and removed); ``config.drtest_kept``, the clones of failed tests kept for
inspection. A passed test also bookmarks its point ``tested-<UTC time>``. This
module reads and writes them; a DR test runs only on a replica (``check_replica``).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import system
from .errors import CdpfsError
from .history import bookmarks
from .replication.receiver import ROLE_REPLICA
from .store.lmdb import Store

SETTING = "drtest"  # the last result, in the replica's settings
RUNNING = "drtest_running"  # the test in progress (or killed), and what it makes
KEPT = "drtest_kept"  # the clone of the newest failed test, kept for inspection
TOKEN = "CDPFS_DRTEST"  # in the steps' environment: what they started carries it


@dataclass(slots=True)
class Result:
    """One DR test: when, what was tested, and how it went."""

    ts: int  # when it started (ns since the epoch)
    seq: int  # the tested point
    ok: bool
    seconds: float
    scenario: str
    failed: str = ""  # the failing step and its output
    bookmark: str = ""  # the bookmark of a passed test
    clone: str = ""  # a failed test's clone, kept for inspection
    tree_hash: str = ""  # "matches the primary", or why it was not compared
    every: int = 0  # seconds between scheduled tests (replica serve --test-every), or 0

    def overdue(self, now_ns: int) -> bool:
        """Whether two scheduled tests have been missed since this one."""
        return bool(self.every) and now_ns - self.ts > 2 * self.every * 10**9


@dataclass(slots=True)
class Running:
    """A test in progress as recorded in the replica: who runs it and what it makes."""

    pid: int
    identity: str  # system.process_identity of pid: a reused pid is not this test
    ts: int  # when it started (ns since the epoch)
    scenario: str
    every: int
    clone: str  # the clone's path (made after this is recorded)
    mnt: str  # the temporary mount directory (likewise)
    token: str  # the value of TOKEN in its steps' environment
    seq: int = 0  # the tested point, once cloned
    daemon: int = 0  # the clone's mount process, once mounted
    daemon_identity: str = ""

    @property
    def alive(self) -> bool:
        """Whether the test's process still runs."""
        if not self.identity:  # no identity where it was recorded: the pid alone
            return system.pid_alive(self.pid)
        return system.process_identity(self.pid) == self.identity

    def daemon_alive(self) -> bool:
        return bool(self.daemon) and system.process_identity(self.daemon) == \
            self.daemon_identity

    def strays(self) -> list[int]:
        """The processes its steps started that still run."""
        return system.processes_with_env(TOKEN, self.token)

    def who(self) -> str:
        """The test in words: its process and when it started."""
        return f"pid {self.pid}, started {when(self.ts)}"


def when(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts / 1e9).isoformat(sep=" ", timespec="seconds")


def last(store: Store) -> Result | None:
    """The last DR test recorded in ``store`` (None if none)."""
    with store.txn() as txn:
        raw = store.config(txn, SETTING)
    return None if raw is None else Result(**raw)


def running(store: Store) -> Running | None:
    """The test recorded as in progress in ``store``: running, or killed (None if none)."""
    with store.txn() as txn:
        raw = store.config(txn, RUNNING)
    return None if raw is None else Running(**raw)


def kept(store: Store) -> list[str]:
    """The failed tests' clones kept for inspection that are still there."""
    with store.txn() as txn:
        paths = store.config(txn, KEPT) or []
    return [p for p in paths if os.path.lexists(p)]


def running_in(replica: Path) -> Running | None:
    """``running`` of the replica store at ``replica``."""
    with Store(replica, readonly=True) as store:
        return running(store)


def kept_in(replica: Path) -> list[str]:
    """``kept`` of the replica store at ``replica``."""
    with Store(replica, readonly=True) as store:
        return kept(store)


def check_replica(replica: Path) -> None:
    """CdpfsError unless ``replica`` is a replica store."""
    with Store(replica, readonly=True) as store, store.txn() as txn:
        if store.config(txn, "role") != ROLE_REPLICA:
            raise CdpfsError(f"{replica}: not a replica store (a DR test runs on a replica; "
                             "on a primary, use cdpfs clone and mount the clone)")


def record(replica: Path, rec: Running | None, claim: bool = False) -> None:
    """Record the test in progress (None: none); with ``claim``, only if no other is
    (CdpfsError naming it)."""
    with Store(replica) as store, store.txn(write=True) as txn:
        if claim and (raw := store.config(txn, RUNNING)) is not None:
            other = Running(**raw)
            raise CdpfsError(f"a DR test of {replica} is running already ({other.who()})"
                             if other.alive else f"a DR test of {replica} left things "
                             "behind: cdpfs replica test --cleanup")
        store.set_config(txn, RUNNING, None if rec is None else asdict(rec))


def finish(replica: Path, result: Result, bookmark: str, kept: list[str], done: bool) -> None:
    """Record the end of a test: its result (bookmarking its point as ``bookmark`` if
    it passed), the failed tests' clones kept now, and, once nothing of it is left
    (``done``), that no test is in progress."""
    with Store(replica) as store, store.txn(write=True) as txn:
        if result.ok:
            result.bookmark = bookmark
            bookmarks.put(store, txn, bookmark, result.seq, replace=True)
        store.set_config(txn, SETTING, asdict(result))
        store.set_config(txn, KEPT, kept)
        if done:
            store.set_config(txn, RUNNING, None)


def record_killed(replica: Path, rec: Running, result: Result) -> bool:
    """Record that the test ``rec``, killed, is gone (what it left was removed), with
    ``result`` as the last test's unless it recorded its own; whether ``result`` was
    recorded (not if another cleanup was quicker)."""
    with Store(replica) as store, store.txn(write=True) as txn:
        now = store.config(txn, RUNNING)
        if now is None or now.get("token") != rec.token:
            return False  # another cleanup was quicker
        store.set_config(txn, RUNNING, None)
        told = store.config(txn, SETTING)
        if told is not None and told.get("ts") == rec.ts:
            return False  # it ended and recorded its result, but could not clean up
        store.set_config(txn, SETTING, asdict(result))
        return True
