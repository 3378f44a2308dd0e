"""DR tests on a live replica (``cdpfs replica test``): prove a replica can be
recovered from, while it keeps applying changes.

A test clones the replica at a moment (``history.clones``: nothing is copied and
the replica server is not paused), mounts the clone read-write, runs the
scenario's ``[[test]]`` steps on it (start the application on the clone, let it
recover, query it, check it), then always its ``[[test_stop]]`` steps; compares
the clone's tree hash at the tested seq with the primary's when the primary's
store can be read here; unmounts and deletes the clone. A pass bookmarks the
tested point on the replica as ``tested-<UTC time>``; a failure keeps the clone
for inspection (unless told not to) and names the failing step with its output.
The result is kept in the replica store's settings (``config.drtest``) for
``cdpfs status``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cdpfs.errors import CdpfsError
from cdpfs.history import bookmarks, clones
from cdpfs.history.treehash import tree_hash
from cdpfs.replication.receiver import ROLE_REPLICA
from cdpfs.scenario import Scenario
from cdpfs.store.lmdb import Store

log = logging.getLogger(__name__)

SETTING = "drtest"  # the last result, in the replica's settings
CLI = [sys.executable, "-m", "cdpfs.tools.cli"]


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


def last(store: Store) -> Result | None:
    """The last DR test recorded in ``store`` (None if none)."""
    with store.txn() as txn:
        raw = store.config(txn, SETTING)
    return None if raw is None else Result(**raw)


def run(replica: Path, scenario: Scenario, *, at: str | None = None,
        primary: Path | None = None, keep_failed: bool = True, allow_other: bool = False,
        every: int = 0, echo: Callable[[str], None] = print) -> Result:
    """Test ``replica`` at moment ``at`` (default: its newest record) with ``scenario``."""
    replica = Path(os.path.abspath(replica))
    with Store(replica, readonly=True) as st, st.txn() as txn:
        if st.config(txn, "role") != ROLE_REPLICA:
            raise CdpfsError(f"{replica}: not a replica store (a DR test runs on a replica; "
                             "on a primary, use cdpfs clone and mount the clone)")
    if not scenario.steps("test"):
        raise CdpfsError(f"{scenario.name}: has no [[test]] steps")
    started, t0 = time.time_ns(), time.monotonic()
    stamp = dt.datetime.fromtimestamp(started // 10**9, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    clone_path = replica.parent / f"{replica.name}.drtest-{stamp}"
    made = clones.make(replica, clone_path, at)
    echo(f"cloned {replica} as of #{made.seq} into {clone_path}")
    mnt = Path(tempfile.mkdtemp(prefix="cdpfs-drtest-"))
    os.chmod(mnt, 0o755)  # an application may run as another user (--allow-other)
    failed, hashed = "", "not compared"
    mounted = False
    try:
        _cli("mount", clone_path, mnt, *(["--allow-other"] if allow_other else []))
        mounted = True
        env = {"CDPFS_MOUNT": str(mnt), "CDPFS_CLONE": str(clone_path),
               "CDPFS_REPLICA": str(replica), "CDPFS_SEQ": str(made.seq)}
        failed = _steps(scenario, mnt, env, echo)
        hashed = _compare(clone_path, primary, made.seq)
        if hashed.startswith("differs") and not failed:
            failed = f"tree hash: {hashed}"
        _cli("umount", mnt)
        mounted = False
    except CdpfsError as exc:
        failed = failed or str(exc)
    finally:
        if mounted:
            subprocess.run([*CLI, "umount", str(mnt)], capture_output=True, check=False)
        if not os.path.ismount(mnt):
            os.rmdir(mnt)
    result = Result(started, made.seq, not failed, time.monotonic() - t0, scenario.name,
                    failed=failed, tree_hash=hashed, every=every)
    if failed and keep_failed:
        result.clone = str(clone_path)
    else:
        clones.delete(clone_path)
    with Store(replica) as st, st.txn(write=True) as txn:
        if result.ok:
            result.bookmark = f"tested-{stamp}"
            bookmarks.put(txn, st.db, result.bookmark, made.seq, replace=True)
        st.set_config(txn, SETTING, asdict(result))
    return result


def _steps(scenario: Scenario, mnt: Path, env: dict[str, str],
           say: Callable[[str], None]) -> str:
    """Run the test steps, then always the stop steps; the first failure, or ""."""
    failed = ""
    for n, step in enumerate(scenario.steps("test"), 1):
        try:
            scenario.replace("test", [step]).run("test", mnt, env)
        except CdpfsError as exc:
            failed = f"step {n} of {len(scenario.steps('test'))}: {exc}"
            say(f"test step {n}: FAILED: {exc}")
            break
        say(f"test step {n}: ok: {step.run.splitlines()[0][:100]}")
    try:
        scenario.run("test_stop", mnt, env)
    except CdpfsError as exc:
        say(f"stop: {exc}")
        failed = failed or f"stop: {exc}"
    return failed


def _compare(clone: Path, primary: Path | None, seq: int) -> str:
    """The clone's tree hash at ``seq`` against the primary's, in words."""
    if primary is None:
        return "not compared (no --primary store given)"
    try:
        with Store(primary, readonly=True) as pst, pst.txn() as txn:
            want = tree_hash(pst, txn, seq)[0]
    except CdpfsError as exc:
        return f"not compared (the primary's store cannot be read: {exc})"
    with Store(clone, readonly=True) as cst, cst.txn() as txn:
        got = tree_hash(cst, txn, seq)[0]
    if got != want:
        return f"differs from the primary's at #{seq}: {got[:16]} against {want[:16]}"
    return f"matches the primary's at #{seq} ({got[:16]})"


def _cli(*args: str | os.PathLike[str]) -> None:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise CdpfsError(f"cdpfs {args[0]} failed: {said[-1] if said else proc.returncode}")
