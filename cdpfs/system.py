"""What cdpfs asks of the operating system, in one place, so ``import cdpfs`` works anywhere.

File locks, whether a process still runs, a process's groups, the coarse clock,
the clock leases are timed on, free space, making a rename durable, writing back
what the kernel caches for a filesystem, and the open flags the filesystem layer
reads. Linux is what cdpfs runs on today (and what
the tests exercise); other systems get the nearest portable equivalent, so the
library imports and its tools run there, and a front end for them (WinFsp)
needs no change below it.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass

WINDOWS = sys.platform == "win32"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt's locks instead
    fcntl = None  # type: ignore[assignment]

# Open flags as front ends pass them (Linux values where Python lacks the name).
O_ACCMODE: int = getattr(os, "O_ACCMODE", 3)
O_RDONLY: int = os.O_RDONLY
O_TRUNC: int = os.O_TRUNC
O_WAITS: int = (getattr(os, "O_DIRECT", 0) | getattr(os, "O_SYNC", 0)
                | getattr(os, "O_DSYNC", 0))  # writes on such a handle are not written behind

_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5 if sys.platform.startswith("linux") else None)


def coarse_time_ns() -> int:
    """The wall clock at the resolution the kernel stamps files with (Linux's coarse
    clock), so a stored mtime never runs ahead of what the kernel showed."""
    if _COARSE is not None and hasattr(time, "clock_gettime_ns"):
        return time.clock_gettime_ns(_COARSE)
    return time.time_ns()


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def boot_clock() -> float:
    """Seconds on a clock that never goes back and keeps counting while the process
    is stopped (SIGSTOP) and, unlike ``time.monotonic`` on Linux, while the machine
    is suspended or its VM frozen: what a lease deadline must be measured on."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


# --- file locks ------------------------------------------------------------------------


def try_lock(fd: int, exclusive: bool = True) -> bool:
    """Lock the open file ``fd`` without waiting; False when another process holds it.
    The lock lasts until ``unlock`` (or until ``fd`` and every copy of it are closed)."""
    if fcntl is None:  # pragma: no cover
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    """Let go of ``try_lock``'s lock on ``fd`` now. Closing ``fd`` is not enough: a
    child forked meanwhile by another thread holds a copy of it until it execs, and
    with it the lock."""
    if fcntl is None:  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


# --- processes ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    if WINDOWS:  # pragma: no cover
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:  # other POSIX systems
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process ``pid`` (empty where they cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def process_identity(pid: int) -> str | None:
    """Who process ``pid`` is, in a form a reused pid does not repeat (the boot and the
    clock tick it started at); None when it is gone or a zombie, or where this cannot
    be read (no /proc)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}:{fields[19]}"  # field 22 of stat: starttime


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid`` or of process group ``sid`` (a session's
    leader started them, or one of theirs did, unless they left it with setsid). Where
    there is no /proc: ``[sid]`` while a process of that group runs."""
    if not os.path.isdir("/proc/self"):  # pragma: no cover - not Linux
        try:
            os.killpg(sid, 0)
        except (OSError, AttributeError):
            return []
        return [sid]
    out = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != "Z" and sid in (int(fields[2]), int(fields[3])):
            out.append(pid)
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """The live processes (of those this process may inspect) started with ``key=value``
    in their environment: a variable every descendant inherits, unless it clears it."""
    want = f"{key}={value}".encode()
    out = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want in env and pid_alive(pid):
            out.append(pid)
    return out


# --- disks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskStats:
    """What statfs reports of the filesystem under a path (counts in ``frsize`` units)."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int


def fd_path(fd: int) -> str:
    """A name of open descriptor ``fd`` that calls by name follow to it (Linux's
    /proc/self/fd: how an O_PATH descriptor is given to chmod and xattr calls)."""
    return f"/proc/self/fd/{fd}"


def disk_stats(path: str | os.PathLike[str]) -> DiskStats:
    if hasattr(os, "statvfs"):
        st = os.statvfs(path)
        return DiskStats(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                         st.f_files, st.f_ffree, st.f_favail)
    usage = shutil.disk_usage(path)  # pragma: no cover - Windows
    unit = 4096
    return DiskStats(unit, unit, usage.total // unit, usage.free // unit, usage.free // unit,
                     0, 0, 0)


def disk_free(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem under ``path``."""
    return shutil.disk_usage(path).free


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The contents of the regular file ``path`` (a certificate, a scenario).

    It is opened without blocking and looked at before it is read, so a FIFO or a
    device named by mistake is refused at once, not waited on forever; ValueError
    says why (not a regular file, or larger than ``limit`` bytes). OSError if it
    cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or creation in directory ``path`` durable (a no-op where
    directories cannot be synced)."""
    if WINDOWS:  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_back(fd: int) -> OSError | None:
    """Have the kernel write into the filesystem of ``fd`` everything it still caches
    dirty for it, and wait until it has: ``syncfs(2)`` (which Python does not wrap;
    ``sync`` where it is missing) starts it for every file, and an fsync of each
    file open for writing there (found in /proc: those of processes this one may
    look at) waits for it, as syncfs does not for a FUSE mount (Linux 6.18 starts
    a FUSE mount's writeback on syncfs and returns before the filesystem has the
    data; a closed file's data went in when it was closed). The kernel sends a
    /dev/fuse mount no request to commit on syncfs (no FUSE_SYNCFS: checked with
    libfuse's debug output), so the caller then asks the mount to commit (an
    fsync of its root). The error writeback reported (ENOSPC, EIO: the programs
    that wrote the data get it too), or None."""
    if WINDOWS:  # pragma: no cover
        return None
    import ctypes

    error = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            error = OSError(err, os.strerror(err))
    except AttributeError:  # pragma: no cover - a libc without syncfs
        os.sync()
    for path in _writers_on(os.fstat(fd).st_dev):
        try:
            other = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # closed meanwhile, or not ours to open
            continue
        try:
            os.fsync(other)
        except OSError as exc:
            error = error or exc
        finally:
            os.close(other)
    return error


def _writers_on(dev: int) -> list[str]:
    """``/proc/PID/fd/N`` of every regular file on device ``dev`` that a process
    this one may look at has open for writing (reopening one reaches that very
    file, renamed or unlinked as it may be since)."""
    out = []
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                st = os.stat(path)
                if st.st_dev != dev or not stat.S_ISREG(st.st_mode):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info
                                  if line.startswith("flags:")), 0)
            except (OSError, ValueError, IndexError):
                continue
            if flags & O_ACCMODE != os.O_RDONLY:
                out.append(path)
    return out
