"""Find running mounts and stop them (``cdpfs umount``, and tools that need to know
which store a path belongs to)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from cdpfs.errors import StoreError
from cdpfs.store.lock import holder
from cdpfs.system import pid_alive

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A path field of a mount table: the kernel writes space, tab, newline and
    backslash as octal escapes, every other byte as it is."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def check_source(store: Path) -> None:
    """StoreError unless a mount can name ``store`` as its source: its path has no ','
    (which ends a FUSE option, fsname=STORE) and no '#' (which marks the source of a
    snapshot or following mount, STORE#seq, in /proc/mounts)."""
    if "," in str(store) or "#" in str(store):
        raise StoreError(f"{store}: a store path must not contain ',' or '#' (a mount "
                         "names its store in FUSE's options, where ',' separates them "
                         "and '#' marks a read-only mount)")


def canonical(mountpoint: Path) -> str:
    """The absolute path of ``mountpoint`` without touching it (it may be a dead mount).

    Directories on the way are resolved as the kernel would; the last component is
    not followed, unless it is ``..`` or ``.``, which name a directory above or here
    and are resolved like the rest (``MNT/..`` is MNT's parent, not MNT)."""
    mountpoint = mountpoint.absolute()
    if mountpoint.name in ("", ".", ".."):  # a Path keeps a final '..' as its name
        return os.path.realpath(mountpoint)
    return os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)


class Mount(NamedTuple):
    """A cdpfs mount as the kernel lists it."""

    source: str      # the store, or STORE#seq for a snapshot or following mount
    point: str       # where it is mounted (a real path: the kernel's)
    read_only: bool
    dev: int         # the st_dev of everything in it


def cdpfs_mounts() -> list[Mount]:
    """Every cdpfs mount of this process's namespace, in mount order (of two on one
    point, the later is on top), from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding=sys.getfilesystemencoding(),
              errors="surrogateescape") as f:  # paths as os.fsdecode gives them
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)  # the optional fields end at a lone '-'
            fstype, src, sopts = fields[sep + 1], fields[sep + 2], fields[sep + 3]
            if fstype == "fuse.cdpfs":
                major, minor = fields[2].split(":")
                ro = "ro" in fields[5].split(",") or "ro" in sopts.split(",")
                out.append(Mount(_unescape(src), _unescape(fields[4]), ro,
                                 os.makedev(int(major), int(minor))))
    return out


def find_mount(mountpoint: Path) -> Path | None:
    """The source of the cdpfs mount on ``mountpoint`` (``STORE``, or ``STORE#seq``
    for a snapshot mount), if any."""
    target = canonical(mountpoint)
    for m in cdpfs_mounts():
        if m.point == target:
            return Path(m.source)
    return None


def live_mount_of(store: Path) -> Path | None:
    """Where ``store`` is mounted live (read-write), if it is."""
    want = os.path.realpath(store)
    for m in cdpfs_mounts():
        if m.source == want and not m.read_only:
            return Path(m.point)
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
