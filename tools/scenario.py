"""Consistency hooks for bookmarks: a TOML scenario names commands to run before
and after the bookmark is taken (a database checkpoint, a freeze and a thaw).

Format (see contrib/scenarios/)::

    description = "what the scenario makes consistent"
    [vars]            # variables the commands use; "" means the user must --set it
    DB = ""
    [[before]]        # run in order; a failure cancels the bookmark
    run = "sqlite3 \\"$DB\\" 'PRAGMA wal_checkpoint(TRUNCATE);'"
    timeout = 60      # seconds (default 120)
    [[after]]         # always run, even when the bookmark failed
    run = "..."

Commands run through ``bash -c`` in the volume's mount directory, with the
variables and ``CDPFS_BOOKMARK``, ``CDPFS_STORE`` and ``CDPFS_MOUNT`` in their
environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cdpfs.errors import CdpfsError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A loaded scenario: its commands and the variables they get."""

    path: Path
    description: str
    variables: dict[str, str]
    before: list[tuple[str, float]]
    after: list[tuple[str, float]]

    @classmethod
    def load(cls, path: Path, assignments: tuple[str, ...] | list[str] = ()) -> Scenario:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CdpfsError(f"{path}: not a valid scenario: {exc}") from None
        variables = {str(k): str(v) for k, v in doc.get("vars", {}).items()}
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CdpfsError(f"--set {item!r}: expected KEY=VALUE")
            variables[key] = value
        missing = sorted(k for k, v in variables.items() if v == "")
        if missing:
            raise CdpfsError(f"{path}: set {', '.join(missing)} with --set KEY=VALUE")

        def steps(name: str) -> list[tuple[str, float]]:
            out = []
            for step in doc.get(name, []):
                if not isinstance(step, dict) or not isinstance(step.get("run"), str):
                    raise CdpfsError(f"{path}: each [[{name}]] needs run = \"command\"")
                out.append((step["run"], float(step.get("timeout", 120))))
            return out

        return cls(path, str(doc.get("description", "")), variables, steps("before"),
                   steps("after"))

    def run(self, phase: str, cwd: Path, extra: dict[str, str]) -> None:
        """Run the ``before`` or ``after`` commands; CdpfsError on the first failure."""
        env = {**os.environ, **self.variables, **extra}
        for command, timeout in getattr(self, phase):
            log.info("scenario %s, %s: %s", self.path.name, phase, command)
            try:
                proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, timeout=timeout,
                                      capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                raise CdpfsError(f"{phase} hook timed out after {timeout:.0f}s: {command}") \
                    from None
            if proc.returncode != 0:
                detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
                raise CdpfsError(f"{phase} hook failed (exit {proc.returncode}): {command}"
                                 + (f": {detail[-1]}" if detail else ""))
