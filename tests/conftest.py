"""Shared fixtures: real stores and real FUSE mounts, always cleaned up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Volume

HAVE_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    """A fresh store, mounted; afterwards unmounted, verified, its log free of errors."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and root")
    vol = Volume(tmp_path).init()
    try:
        vol.mount()
        yield vol
    finally:
        if os.path.ismount(vol.mnt):
            try:
                vol.umount()
            finally:
                vol.cleanup()
        else:
            vol.cleanup()
    vol.verify()
    log = vol.store / "cdpfs.log"
    bad = [line for line in (log.read_text().splitlines() if log.exists() else [])
           if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    assert not bad, "the mount logged errors:\n" + "\n".join(bad)


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[type[Volume]]:
    """Build extra volumes by name: ``make_volume('a')``; all cleaned up after."""
    made: list[Volume] = []

    def make(name: str = "vol") -> Volume:
        if not HAVE_FUSE:
            pytest.skip("needs /dev/fuse and root")
        vol = Volume(tmp_path, name)
        made.append(vol)
        return vol

    yield make  # type: ignore[misc]
    for vol in made:
        vol.cleanup()
