"""The writer lock of a store: ``cdpfs.lock``, locked by the one process that writes.

The process that serves a store read-write (a mount, a replica server) locks the
file and writes who it is into it: ``<owner> (pid <n>)``. Anyone can ask who
holds it; the lock goes with the process, so a crash leaves no stale lock (the
text left behind is ignored while nobody holds the lock).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import system
from ..errors import StoreLocked

LOCK_NAME = "cdpfs.lock"
_PID = re.compile(r"\(pid (\d+)\)\s*$")


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a store's writer lock: the text it wrote and its pid (0 if unknown)."""

    text: str
    pid: int

    def __str__(self) -> str:
        return self.text


def _parse(raw: bytes) -> Holder:
    text = raw.decode(errors="replace").strip() or "another process"
    m = _PID.search(text)
    return Holder(text, int(m[1]) if m else 0)


def holder(store: Path) -> Holder | None:
    """Who holds the writer lock of ``store`` now (None when nobody does)."""
    try:
        fd = os.open(Path(store) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        if system.try_lock(fd, exclusive=False):
            system.unlock(fd)
            return None  # nobody holds it: what is written there is stale
        return _parse(os.read(fd, 200))
    finally:
        os.close(fd)


class WriterLock:
    """The writer lock of ``store``, taken by ``acquire`` and held until ``release``."""

    def __init__(self, store: Path) -> None:
        self.path = Path(store) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, owner: str) -> None:
        """Take the lock as ``owner``, or raise StoreLocked naming who holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not system.try_lock(fd):
            who = _parse(os.read(fd, 200))
            os.close(fd)
            raise StoreLocked(f"{self.path.parent}: store is in use by {who}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner} (pid {os.getpid()})\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            system.unlock(self._fd)
            os.close(self._fd)
            self._fd = None
