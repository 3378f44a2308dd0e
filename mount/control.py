"""Find running mounts and stop them (``cdpfs umount``, and tools that need to know
which store a path belongs to)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

from cdpfs.errors import StoreError
from cdpfs.store.lock import holder
from cdpfs.system import pid_alive


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def check_source(store: Path) -> None:
    """StoreError unless a mount can name ``store`` as its source: its path has no ','
    (which ends a FUSE option, fsname=STORE) and no '#' (which marks the source of a
    snapshot or following mount, STORE#seq, in /proc/mounts)."""
    if "," in str(store) or "#" in str(store):
        raise StoreError(f"{store}: a store path must not contain ',' or '#' (a mount "
                         "names its store in FUSE's options, where ',' separates them "
                         "and '#' marks a read-only mount)")


def canonical(mountpoint: Path) -> str:
    """The absolute path of ``mountpoint`` without touching it (it may be a dead mount)."""
    mountpoint = mountpoint.absolute()
    return os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)


def _mounts() -> list[tuple[str, str, bool]]:
    """(source, mount point, read-only) of every cdpfs mount."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            src, mnt, fstype, opts, *_ = line.split()
            if fstype == "fuse.cdpfs":
                out.append((_unescape(src), _unescape(mnt), "ro" in opts.split(",")))
    return out


def find_mount(mountpoint: Path) -> Path | None:
    """The source of the cdpfs mount on ``mountpoint`` (``STORE``, or ``STORE#seq``
    for a snapshot mount), if any."""
    target = canonical(mountpoint)
    for src, mnt, _ro in _mounts():
        if mnt == target:
            return Path(src)
    return None


def live_mount_of(store: Path) -> Path | None:
    """Where ``store`` is mounted live (read-write), if it is."""
    want = os.path.realpath(store)
    for src, mnt, ro in _mounts():
        if src == want and not ro:
            return Path(mnt)
    return None


def mount_containing(path: Path) -> tuple[Path, Path] | None:
    """(mount point, source) of the cdpfs mount holding ``path``, if any; the
    path's last component is not followed."""
    full = Path(canonical(path))
    mounts = {Path(mnt): src for src, mnt, _ro in _mounts()}
    for candidate in (full, *full.parents):
        if candidate in mounts:
            return candidate, Path(mounts[candidate])
    return None


def holder_pid(store: Path) -> int | None:
    """The pid of the process holding the store's writer lock, if one holds it now."""
    who = holder(store)
    return who.pid if who is not None and who.pid else None


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has ended (or is a zombie); False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already (or no pidfd on this kernel: look now and then)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not pid_alive(pid)
    try:
        select.select([fd], [], [], timeout)  # readable when the process ends
    finally:
        os.close(fd)
    return not pid_alive(pid)


def unmount(mountpoint: Path, timeout: float = 120.0) -> None:
    """Flush and unmount: ask the mount process to stop and wait until it has."""
    store = find_mount(mountpoint)
    if store is None:
        raise StoreError(f"{mountpoint}: no cdpfs volume is mounted there")
    if "#" in store.name:  # a snapshot mount: nothing to flush, the kernel ends it
        proc = subprocess.run(["fusermount3", "-u", canonical(mountpoint)], check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise StoreError(f"{mountpoint}: {proc.stderr.strip() or 'cannot unmount'}")
        deadline = time.monotonic() + timeout
        while find_mount(mountpoint) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    pid = holder_pid(store)
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not wait_exit(pid, timeout):
            raise StoreError(f"{mountpoint}: mount process {pid} did not stop in {timeout:.0f}s")

    if find_mount(mountpoint) is not None:  # the process died without unmounting
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
