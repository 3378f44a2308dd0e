"""Run a FUSE mount of a store: lock, recover, serve until unmounted or signalled.

``mount_store`` does the whole life of a mount in the calling process (the
CLI forks first for background mode). On SIGINT/SIGTERM, or when the kernel
unmounts, everything applied is committed before the store is closed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from cdpfs.engine import Engine
from cdpfs.errors import StoreError
from cdpfs.store import Store
from cdpfs.vfs import FileSystem

from .fuse import FuseOperations

log = logging.getLogger(__name__)


def fuse_options(store: Path, allow_other: bool) -> set[str]:
    if "," in str(store):
        raise StoreError(f"{store}: a store path must not contain a comma (FUSE options)")
    opts = {f"fsname={store}", "subtype=cdpfs", "default_permissions", "noatime"}
    if allow_other:
        opts.add("allow_other")
    return opts


READ_AHEAD_KB = 1024


def set_readahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Widen the kernel's readahead on a FUSE mount (128 KiB by default).

    With 128 KiB only one read request is in flight at a time and sequential
    reads wait on every round trip; a wider window keeps several in flight.
    """
    # Not os.stat(mountpoint): that would ask this very process, not yet serving.
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                dev = fields[2]
    if dev is None:
        return
    knob = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        knob.write_text(str(kb))
    except OSError as exc:  # not root, or no sysfs: correct, only slower
        log.info("cannot set readahead of %s: %s", mountpoint, exc)


def check_mountpoint(mountpoint: Path) -> None:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StoreError(f"{mountpoint}: a dead mount is still there (its process died); "
                             f"run 'cdpfs umount {mountpoint}' first", errno.EBUSY) from None
    if not mountpoint.is_dir():
        raise StoreError(f"{mountpoint}: mount point does not exist or is not a directory",
                         errno.ENOENT)
    if os.path.ismount(mountpoint):
        raise StoreError(f"{mountpoint}: something is already mounted there", errno.EBUSY)


def mount_store(store_path: Path, mountpoint: Path, *, allow_other: bool = False,
                ready: Callable[[], None] | None = None) -> None:
    """Mount ``store_path`` on ``mountpoint`` and serve until unmounted."""
    check_mountpoint(mountpoint)
    mountpoint = mountpoint.resolve()
    # Two busy threads (trio, store) hand each request back and forth: a short
    # GIL switch interval keeps that hand-off from waiting the default 5 ms.
    sys.setswitchinterval(0.0002)
    store = Store(store_path)
    try:
        store.lock(f"mount on {mountpoint}")
        engine = Engine(store)
        fs = FileSystem(store, engine)
        engine.start()
        try:
            engine.call_sync(fs.recover, durable=True)
            ops = FuseOperations(fs, engine)
            pyfuse3.init(ops, str(mountpoint), fuse_options(store.path, allow_other))
            try:
                log.info("mounted %s on %s", store.path, mountpoint)
                try:
                    trio.run(_serve, ready, mountpoint)
                except BaseException:
                    log.exception("the FUSE main loop failed")
                    raise
            finally:
                pyfuse3.close(unmount=True)
        finally:
            engine.stop()
            log.info("unmounted %s; %d commits", mountpoint, engine.commits)
    finally:
        store.close()


async def _serve(ready: Callable[[], None] | None, mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(_tune_after_init, mountpoint, ready)
        await pyfuse3.main(min_tasks=4, max_tasks=32)
        nursery.cancel_scope.cancel()


async def _tune_after_init(mountpoint: Path, ready: Callable[[], None] | None) -> None:
    # The kernel resets readahead when the FUSE INIT reply arrives, which is
    # sent once pyfuse3.main() runs: set it after that, then report ready.
    await trio.sleep(0.2)
    await trio.to_thread.run_sync(set_readahead, mountpoint)
    if ready is not None:
        ready()


async def stop_on_signal() -> None:
    """End the FUSE main loop (and so unmount) on SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
