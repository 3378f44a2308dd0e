"""DR tests on a live replica (``cdpfs replica test``): prove a replica can be
recovered from, while it keeps applying changes.

A test clones the replica at a moment (``history.clones``: nothing is copied and
the replica server is not paused), mounts the clone read-write, runs the
scenario's ``[[test]]`` steps on it (start the application on the clone, let it
recover, query it, check it), then always its ``[[test_stop]]`` steps; compares
the clone's tree hash at the tested seq with the primary's when the primary's
store can be read here; stops whatever the steps started that still runs (found
by the ``CDPFS_DRTEST`` variable in its environment), unmounts and deletes the
clone. A pass bookmarks the tested point on the replica as ``tested-<UTC time>``;
a failure keeps the clone for inspection (unless told not to) and names the
failing step with its output. The result is kept in the replica store's settings
(``config.drtest``, ``cdpfs.drtests``) for ``cdpfs status``.

A test cleans up after itself, also when it fails, times out or is told to stop
(SIGTERM, SIGINT, SIGHUP: it stops its steps, runs the stop steps, and records
itself as failed, "interrupted by signal N"). So that what a test killed outright
leaves can be found, it records itself (``config.drtest_running``: its process,
the clone and the mount directory it will make, its environment token) before it
makes anything; ``clean_up`` (the next test of the store, or ``replica test
--cleanup``) removes what a dead one left. Of failed tests' clones only the
newest is kept (``config.drtest_kept``); a pass keeps it too, as evidence, until
the next failure replaces it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from cdpfs import system
from cdpfs.drtests import (
    TOKEN,
    Result,
    Running,
    check_replica,
    finish,
    kept_in,
    record,
    record_killed,
    running_in,
    when,
)
from cdpfs.errors import CdpfsError
from cdpfs.history import clones
from cdpfs.history.bookmarks import TESTED
from cdpfs.history.treehash import hash_of
from cdpfs.mount.control import find_mount, holder_pid, unmount, wait_exit
from cdpfs.scenario import Scenario, stop_processes

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "cdpfs.tools.cli"]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def leftovers(rec: Running, clone: bool = True) -> list[str]:
    """What of the test ``rec`` is still there, in words (the clone too, if ``clone``)."""
    out = []
    if n := len(rec.strays()):
        out.append(f"{n} process{'es' if n > 1 else ''} its steps started")
    if find_mount(Path(rec.mnt)) is not None:
        out.append(f"the clone's mount on {rec.mnt}")
    if rec.daemon_alive():
        out.append(f"the clone's mount process {rec.daemon}")
    if os.path.isdir(rec.mnt) and not os.path.ismount(rec.mnt):
        out.append(f"directory {rec.mnt}")
    if clone and os.path.lexists(rec.clone):
        out.append(f"clone {rec.clone} (and its hold on the replica)")
    return out


class Interrupted(BaseException):
    """A DR test was told to stop (SIGTERM, SIGINT, SIGHUP) while a step ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGTERM, SIGINT and SIGHUP while a test runs: noted, and raised as
    ``Interrupted`` inside ``armed`` sections (the steps, the hash comparison: what
    may take long and can stop anywhere); elsewhere (cloning, mounting, deleting)
    the test stops at the next ``check``. Signals the caller ignores stay ignored."""

    def __init__(self) -> None:
        self.signum = 0
        self._armed = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._caught)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _caught(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("DR test: signal %d: stopping and cleaning up", signum)
        if self._armed:
            self._armed = False
            raise Interrupted(signum)

    def check(self) -> None:
        if self.signum:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.check()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def run(replica: Path, scenario: Scenario, *, at: str | None = None,
        primary: Path | None = None, keep_failed: bool = True, allow_other: bool = False,
        every: int = 0, echo: Callable[[str], None] = print) -> Result:
    """Test ``replica`` at moment ``at`` (default: its newest record) with ``scenario``."""
    replica = Path(os.path.abspath(replica))
    echo = _heard(echo)
    check_replica(replica)
    if not scenario.steps("test"):
        raise CdpfsError(f"{scenario.name}: has no [[test]] steps")
    other = clean_up(replica, echo)
    if other is not None and other.alive:
        raise CdpfsError(f"a DR test of {replica} is running already ({other.who()})")
    started, t0 = time.time_ns(), time.monotonic()
    stamp = dt.datetime.fromtimestamp(started // 10**9, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    clone_path = _new_path(replica.parent / f"{replica.name}.drtest-{stamp}")
    token = secrets.token_hex(8)
    mnt = Path(tempfile.gettempdir()) / f"cdpfs-drtest-{token}"
    me = Running(os.getpid(), system.process_identity(os.getpid()) or "", started,
                 scenario.name, every, str(clone_path), str(mnt), token)
    record(replica, me, claim=True)  # before anything is made: a kill leaves it named
    with _Signals() as signals:
        try:
            made = clones.make(replica, clone_path, at)
        except BaseException:
            record(replica, None)
            raise
        echo(f"cloned {replica} as of #{made.seq} into {clone_path}")
        me.seq = made.seq
        record(replica, me)
        failed, hashed = "", "not compared"
        try:
            signals.check()
            os.mkdir(mnt, 0o700)
            os.chmod(mnt, 0o755)  # an application may run as another user (--allow-other)
            _cli("mount", clone_path, mnt, *(["--allow-other"] if allow_other else []))
            me.daemon = holder_pid(clone_path) or 0
            me.daemon_identity = system.process_identity(me.daemon) or ""
            record(replica, me)
            env = {"CDPFS_MOUNT": str(mnt), "CDPFS_CLONE": str(clone_path),
                   "CDPFS_REPLICA": str(replica), "CDPFS_SEQ": str(made.seq), TOKEN: token}
            failed = _steps(scenario, mnt, env, echo, signals)
            with signals.armed():
                hashed = _compare(clone_path, primary, made.seq)
            if hashed.startswith("differs") and not failed:
                failed = f"tree hash: {hashed}"
            _stop_strays(me, echo)
            signals.check()
            _cli("umount", mnt)
        except Interrupted:
            pass
        except CdpfsError as exc:
            failed = failed or str(exc)
        finally:
            _take_down(me, echo)
        # A signal from here on finds the test over: it finishes its bookkeeping.
        stopped_by, tested_failed = signals.signum, failed
        if stopped_by:
            name = signal.Signals(stopped_by).name
            failed = f"interrupted by signal {stopped_by} ({name})" + \
                (f" after: {failed}" if failed else "")
        result = Result(started, made.seq, not failed, time.monotonic() - t0, scenario.name,
                        failed=failed, tree_hash=hashed, every=every)
        keep = bool(tested_failed) and keep_failed
        if keep:
            result.clone = str(clone_path)
        else:
            _delete_clone(clone_path, replica, echo, quiet=True)
        left = leftovers(me, clone=not keep)
        still_kept = [p for p in kept_in(replica) if p != str(clone_path)]
        if keep:  # the newest failure's clone replaces the one kept before
            still_kept = [p for p in still_kept
                          if not _delete_clone(Path(p), replica, echo, why="of an older "
                                               "failed test, replaced by this one's")]
            still_kept.append(str(clone_path))
        finish(replica, result, f"{TESTED}{stamp}", still_kept, done=not left)
    if left:
        echo(f"left behind: {'; '.join(left)} (cdpfs replica test {replica} --cleanup)")
    return result


def clean_up(replica: Path, echo: Callable[[str], None] = print) -> Running | None:
    """Remove what a killed DR test of ``replica`` left (one line each to ``echo``)
    and record it as failed. The test recorded (None if none): if it is ``alive``,
    it was left alone. CdpfsError naming what could not be removed."""
    replica = Path(os.path.abspath(replica))
    echo = _heard(echo)
    rec = running_in(replica)
    if rec is None or rec.alive:
        return rec
    left = _remove(rec, replica, echo)
    if left:
        raise CdpfsError(f"the DR test of {replica} killed {when(rec.ts)} left what "
                         f"could not be removed: {'; '.join(left)}")
    result = Result(rec.ts, rec.seq, False, 0.0, rec.scenario,
                    failed=f"killed before it finished ({rec.who()}); what it left was "
                    "removed", every=rec.every)
    if record_killed(replica, rec, result):
        echo(f"recorded the DR test killed before it finished ({rec.who()}) as failed")
    return rec


def _heard(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo`` that never stops a cleanup: when whoever read the output has gone (a
    closed pipe), the lines go to the log."""
    def say(line: str) -> None:
        try:
            echo(line)
        except OSError:
            log.info("DR test: %s", line)

    return say


def _new_path(path: Path) -> Path:
    """``path``, or ``path-N`` if a test of the same second made it already."""
    n, out = 1, path
    while os.path.lexists(out):
        n += 1
        out = path.with_name(f"{path.name}-{n}")
    return out


def _steps(scenario: Scenario, mnt: Path, env: dict[str, str], say: Callable[[str], None],
           signals: _Signals) -> str:
    """Run the test steps, then always the stop steps (also when interrupted); the
    first failure, or ""."""
    failed = ""
    total = len(scenario.steps("test"))
    try:
        with signals.armed():
            for n, step in enumerate(scenario.steps("test"), 1):
                try:
                    scenario.replace("test", [step]).run("test", mnt, env)
                except CdpfsError as exc:
                    failed = f"step {n} of {total}: {exc}"
                    say(f"test step {n}: FAILED: {exc}")
                    break
                say(f"test step {n}: ok: {step.run.splitlines()[0][:100]}")
    except Interrupted as exc:
        say(f"test: interrupted by signal {exc.signum}; stopping")
        raise
    finally:
        try:
            scenario.run("test_stop", mnt, env)
        except CdpfsError as exc:
            say(f"stop: {exc}")
            failed = failed or f"stop: {exc}"
    return failed


def _stop_strays(rec: Running, say: Callable[[str], None], whose: str = "the test's") -> None:
    """Stop what the steps started and the stop steps left running."""
    pids = stop_processes(rec.strays)
    if pids:
        say(f"stopped {len(pids)} process{'es' if len(pids) > 1 else ''} {whose} steps "
            f"left running: {', '.join(map(str, pids))}")


def _take_down(rec: Running, say: Callable[[str], None]) -> None:
    """After the test, whatever happened: no process of its steps, no mount, no
    mount directory (what cannot be removed stays named by the test's record)."""
    _stop_strays(rec, say)
    _unmount(rec, lambda line: log.info("DR test: %s", line), [])


def _remove(rec: Running, replica: Path, say: Callable[[str], None]) -> list[str]:
    """Remove what the dead test ``rec`` left, one line each; what could not be."""
    left: list[str] = []
    _stop_strays(rec, say, "the killed test's")
    _unmount(rec, say, left)
    if os.path.lexists(rec.clone) and not _delete_clone(Path(rec.clone), replica, say,
                                                        why="of the killed test"):
        left.append(f"clone {rec.clone}")
    return left


def _unmount(rec: Running, say: Callable[[str], None], left: list[str]) -> None:
    """Unmount the test's clone (stopping its mount process) and remove the mount
    directory, one line each to ``say``; what could not be, to ``left``."""
    mnt = Path(rec.mnt)
    daemon = rec.daemon if rec.daemon_alive() else 0
    if find_mount(mnt) is not None:
        try:
            unmount(mnt)
            say(f"unmounted the clone from {mnt}"
                + (f", stopping its mount process {daemon}" if daemon else ""))
        except CdpfsError as exc:
            left.append(f"the mount on {mnt}: {exc}")
    elif daemon:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGTERM)
        if wait_exit(daemon, 30):
            say(f"stopped the clone's mount process {daemon}")
        else:
            left.append(f"the clone's mount process {daemon}: did not stop")
    if os.path.isdir(mnt) and not os.path.ismount(mnt):
        try:
            os.rmdir(mnt)
            say(f"removed directory {mnt}")
        except OSError as exc:
            left.append(f"directory {mnt}: {exc.strerror}")


def _delete_clone(clone: Path, replica: Path, say: Callable[[str], None], why: str = "",
                  quiet: bool = False) -> bool:
    """Delete a test's clone of ``replica`` (releasing its hold on it), saying so
    unless ``quiet``; whether it is gone (a clone of another store is left alone)."""
    if not os.path.lexists(clone):
        return True
    try:
        of = clones.base_of(clone)
        if of is None or os.path.realpath(of.path) != os.path.realpath(replica):
            say(f"{clone}: not a clone of {replica}: left alone")
            return True  # not the test's: nothing of it to remove
        clones.delete(clone)
    except CdpfsError as exc:
        say(" ".join(filter(None, ("clone", str(clone), why, f"could not be deleted: {exc}"))))
        return False
    if not quiet:
        say(" ".join(filter(None, ("deleted clone", str(clone), why,
                                   f"(its hold on {replica} released)"))))
    return True


def _compare(clone: Path, primary: Path | None, seq: int) -> str:
    """The clone's tree hash at ``seq`` against the primary's, in words."""
    if primary is None:
        return "not compared (no --primary store given)"
    try:
        want = hash_of(primary, seq)
    except CdpfsError as exc:
        return f"not compared (the primary's store cannot be read: {exc})"
    got = hash_of(clone, seq)
    if got != want:
        return f"differs from the primary's at #{seq}: {got[:16]} against {want[:16]}"
    return f"matches the primary's at #{seq} ({got[:16]})"


def _cli(*args: str | os.PathLike[str]) -> None:
    # A session of its own: a Ctrl-C meant for the test reaches the test alone, which
    # then stops in order (a mount interrupted half-way would be left behind).
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          check=False, start_new_session=True)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise CdpfsError(f"cdpfs {args[0]} failed: {said[-1] if said else proc.returncode}")
