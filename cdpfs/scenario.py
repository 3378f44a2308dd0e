"""Scenarios: what an application needs done around the volume, as commands in a TOML
file (see contrib/scenarios/).

One file serves bookmarks (``before``/``after``: a database checkpoint, a freeze
and a thaw), DR tests (``test``/``test_stop``: start the application on a clone
of a replica, check it, stop it) and high availability (``check``: is the application alive on the
primary; ``promote``: start it on a node that has just become the primary, move a
virtual IP; ``demote``: stop it on a node that has lost or is handing on the
role)::

    description = "what the scenario is for"
    [vars]            # variables the commands use; "" means the user must set it
    DB = ""
    [[before]]        # run in order; a failure cancels the bookmark
    run = "sqlite3 \\"$DB\\" 'PRAGMA wal_checkpoint(TRUNCATE);'"
    timeout = 60      # seconds (default 120)
    [[after]]         # always run, even when the bookmark failed
    run = "..."
    [[check]]         # every check interval on the primary; a failure moves the role
    run = "pg_isready -q"
    [[promote]]       # in order, once the volume is mounted on the new primary
    run = "..."
    [[demote]]        # in order, before a planned hand-over drains and when fenced
    run = "..."
    [[test]]          # a DR test (cdpfs replica test), in order, on a clone's mount
    run = "..."       # (CDPFS_MOUNT, CDPFS_SEQ); the first failure fails the test
    [[test_stop]]     # always after the test steps: stop what they started
    run = "..."

Commands run through ``bash -c`` in the volume's mount directory with the
variables and the caller's own (``CDPFS_BOOKMARK``, ``CDPFS_NODE``, ...) in their
environment. ``run`` (blocking) and ``arun`` (trio) raise ``CdpfsError`` naming the
first command that failed, with the last line it printed. Each command runs in a
session of its own: one that times out, or whose caller is interrupted or
cancelled, is stopped with everything it started that is still in its session
(SIGTERM, then SIGKILL after ``GRACE`` seconds), so nothing of it runs on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from . import system
from .errors import CdpfsError

log = logging.getLogger(__name__)

PHASES = ("before", "after", "check", "promote", "demote", "test", "test_stop")
DEFAULT_TIMEOUT = 120.0
GRACE = 5.0  # seconds a timed-out or cancelled step's processes get between SIGTERM and SIGKILL
MAX_SIZE = 1 << 20  # bytes of a scenario file


def read(path: Path) -> str:
    """The text of the scenario file ``path`` (CdpfsError if it is no regular file of
    UTF-8 text: a FIFO named by mistake is refused, not waited on)."""
    try:
        return system.read_small_file(path, MAX_SIZE).decode()
    except OSError as exc:
        raise CdpfsError(f"{path}: not a valid scenario: {exc.strerror}") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise CdpfsError(f"{path}: not a valid scenario: {exc}") from None


@dataclass(frozen=True, slots=True)
class Step:
    run: str
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class Scenario:
    """A loaded scenario: its commands per phase and the variables they get."""

    name: str
    description: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    phases: dict[str, tuple[Step, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, assignments: tuple[str, ...] | list[str] = ()) -> Scenario:
        return cls.parse(read(path), str(path), assignments)

    @classmethod
    def parse(cls, text: str, name: str, assignments: tuple[str, ...] | list[str] = (),
              complete: bool = True) -> Scenario:
        """Parse a scenario's text; ``complete=False`` lets variables stay unset (each
        node of a cluster may set its own)."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CdpfsError(f"{name}: not a valid scenario: {exc}") from None
        variables = {str(k): str(v) for k, v in doc.get("vars", {}).items()}
        variables.update(parse_assignments(assignments))
        missing = sorted(k for k, v in variables.items() if v == "")
        if missing and complete:
            raise CdpfsError(f"{name}: set {', '.join(missing)} with --set KEY=VALUE")
        phases = {}
        for phase in PHASES:
            steps = []
            for step in doc.get(phase, []):
                if not isinstance(step, dict) or not isinstance(step.get("run"), str):
                    raise CdpfsError(f"{name}: each [[{phase}]] needs run = \"command\"")
                try:
                    timeout = float(step.get("timeout", DEFAULT_TIMEOUT))
                except (TypeError, ValueError):
                    raise CdpfsError(f"{name}: [[{phase}]] timeout: a number of seconds") \
                        from None
                steps.append(Step(step["run"], timeout))
            phases[phase] = tuple(steps)
        return cls(name, str(doc.get("description", "")), variables, phases)

    def steps(self, phase: str) -> tuple[Step, ...]:
        return self.phases.get(phase, ())

    def replace(self, phase: str, steps: list[Step]) -> Scenario:
        """This scenario with ``steps`` as ``phase``'s."""
        return Scenario(self.name, self.description, self.variables,
                        {**self.phases, phase: tuple(steps)})

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **self.variables, **extra}

    def run(self, phase: str, cwd: Path, extra: dict[str, str]) -> None:
        """Run ``phase``'s commands in order; CdpfsError on the first failure."""
        env = self._env(extra)
        for step in self.steps(phase):
            log.info("scenario %s, %s: %s", self.name, phase, step.run)
            proc = subprocess.Popen(["bash", "-c", step.run], cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=step.timeout)
            except subprocess.TimeoutExpired:
                _end(proc)
                raise CdpfsError(_timed_out(phase, step)) from None
            except BaseException:  # a signal's exception, KeyboardInterrupt: the same end
                _end(proc)
                raise
            _check(phase, step, proc.returncode, out, err)

    async def arun(self, phase: str, cwd: Path | None, extra: dict[str, str]) -> None:
        """``run`` from trio: the commands run as processes trio waits for; a
        cancelled one ends as a timed-out one does."""
        env = self._env(extra)
        for step in self.steps(phase):
            log.info("scenario %s, %s: %s", self.name, phase, step.run)
            try:
                proc = await trio.lowlevel.open_process(
                    ["bash", "-c", step.run], cwd=cwd, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                raise CdpfsError(f"{phase} hook could not run: {step.run}: {exc.strerror}") \
                    from None
            out: list[bytes] = []
            err: list[bytes] = []
            try:
                with trio.fail_after(step.timeout):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_read, proc.stdout, out)
                        nursery.start_soon(_read, proc.stderr, err)
                        await proc.wait()
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(stop_processes,
                                                  partial(system.session_processes, proc.pid))
                    proc.kill()  # the leader, should it have left its own session
                    await proc.wait()
                if isinstance(exc, trio.TooSlowError):
                    raise CdpfsError(_timed_out(phase, step)) from None
                raise
            _check(phase, step, proc.returncode, b"".join(out), b"".join(err))


def stop_processes(find: Callable[[], list[int]], grace: float = GRACE) -> list[int]:
    """Stop the processes ``find`` returns: SIGTERM, then SIGKILL to any still there
    (or started since) after ``grace`` seconds; the pids signalled."""
    signalled = find()
    _signal(signalled, signal.SIGTERM)
    if not _wait_gone(find, grace):
        late = find()
        _signal(late, signal.SIGKILL)
        signalled += [pid for pid in late if pid not in signalled]
        if not _wait_gone(find, grace):  # uninterruptible sleep: they go when it ends
            log.warning("processes %s did not end on SIGKILL", find())
    return signalled


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(find: Callable[[], list[int]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while find():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End a step that timed out or was interrupted: its whole session (what it
    started, too), then reap it."""
    stop_processes(partial(system.session_processes, proc.pid))
    proc.kill()  # the leader, should it have left its own session
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


async def _read(stream: trio.abc.ReceiveStream | None, into: list[bytes]) -> None:
    assert stream is not None
    async with stream:
        async for chunk in stream:
            into.append(chunk)


def parse_assignments(assignments: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; CdpfsError for one without ``=``."""
    out = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CdpfsError(f"--set {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _timed_out(phase: str, step: Step) -> str:
    return f"{phase} hook timed out after {step.timeout:.0f}s: {step.run}"


def _check(phase: str, step: Step, code: int, out: bytes, err: bytes) -> None:
    if code != 0:
        said = (err.decode(errors="replace").strip()
                or out.decode(errors="replace").strip()).splitlines()
        raise CdpfsError(f"{phase} hook failed (exit {code}): {step.run}"
                         + (f": {said[-1]}" if said else ""))
