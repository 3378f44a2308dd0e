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
first command that failed, with the last line it printed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import CdpfsError
from .system import read_small_file

log = logging.getLogger(__name__)

PHASES = ("before", "after", "check", "promote", "demote", "test", "test_stop")
DEFAULT_TIMEOUT = 120.0
MAX_SIZE = 1 << 20  # bytes of a scenario file


def read(path: Path) -> str:
    """The text of the scenario file ``path`` (CdpfsError if it is no regular file of
    UTF-8 text: a FIFO named by mistake is refused, not waited on)."""
    try:
        return read_small_file(path, MAX_SIZE).decode()
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
            try:
                proc = subprocess.run(["bash", "-c", step.run], cwd=cwd, env=env,
                                      timeout=step.timeout, capture_output=True)
            except subprocess.TimeoutExpired:
                raise CdpfsError(_timed_out(phase, step)) from None
            _check(phase, step, proc.returncode, proc.stdout, proc.stderr)

    async def arun(self, phase: str, cwd: Path | None, extra: dict[str, str]) -> None:
        """``run`` from trio: the commands run as processes trio waits for."""
        env = self._env(extra)
        for step in self.steps(phase):
            log.info("scenario %s, %s: %s", self.name, phase, step.run)
            try:
                with trio.fail_after(step.timeout):
                    proc = await trio.run_process(["bash", "-c", step.run], cwd=cwd, env=env,
                                                  check=False, capture_stdout=True,
                                                  capture_stderr=True)
            except trio.TooSlowError:
                raise CdpfsError(_timed_out(phase, step)) from None
            except OSError as exc:
                raise CdpfsError(f"{phase} hook could not run: {step.run}: {exc.strerror}") \
                    from None
            _check(phase, step, proc.returncode, proc.stdout, proc.stderr)


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
