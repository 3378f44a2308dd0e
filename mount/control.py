"""Find and stop running mounts (used by ``cdpfs umount``)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

from cdpfs.errors import StoreError
from cdpfs.store import LOCK_NAME


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def canonical(mountpoint: Path) -> str:
    """The absolute path of ``mountpoint`` without touching it (it may be a dead mount)."""
    mountpoint = mountpoint.absolute()
    return os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)


def find_mount(mountpoint: Path) -> Path | None:
    """The store mounted on ``mountpoint`` by cdpfs, if any."""
    target = canonical(mountpoint)
    with open("/proc/mounts") as f:
        for line in f:
            src, mnt, fstype, *_ = line.split()
            if fstype == "fuse.cdpfs" and _unescape(mnt) == target:
                return Path(_unescape(src))
    return None


def holder_pid(store: Path) -> int | None:
    """The pid of the process holding the store's writer lock, if one holds it now."""
    try:
        fd = os.open(store / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: the pid written there is stale
    except BlockingIOError:
        text = os.read(fd, 200).decode(errors="replace")
    finally:
        os.close(fd)
    if "(pid " not in text:
        return None
    return int(text.rsplit("(pid ", 1)[1].split(")")[0])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def unmount(mountpoint: Path, timeout: float = 120.0) -> None:
    """Flush and unmount: ask the mount process to stop and wait until it has."""
    store = find_mount(mountpoint)
    if store is None:
        raise StoreError(f"{mountpoint}: no cdpfs volume is mounted there")
    pid = holder_pid(store)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            raise StoreError(f"{mountpoint}: mount process {pid} did not stop in {timeout:.0f}s")
    if find_mount(mountpoint) is not None:  # the process died without unmounting
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
