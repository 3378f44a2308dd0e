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
from typing import Any

import pyfuse3
import trio

from cdpfs import bookmarks, timespec
from cdpfs.engine import Engine, ReadEngine
from cdpfs.errors import StoreError
from cdpfs.prune import Pruner
from cdpfs.replicator import Replicator
from cdpfs.retention import Points
from cdpfs.store import Store
from cdpfs.timefs import TimeFS
from cdpfs.vfs import FileSystem
from cdpfs.view import View

from .fuse import FuseOperations

log = logging.getLogger(__name__)


def fuse_options(store: Path, allow_other: bool, snapshot: int | str | None = None) -> set[str]:
    """Mount options; a snapshot mount is read-only and named ``STORE#seq`` (a
    following one ``STORE#follow``)."""
    if "," in str(store) or "#" in str(store):
        raise StoreError(f"{store}: a store path must not contain ',' or '#' (FUSE options)")
    name = store if snapshot is None else f"{store}#{snapshot}"
    opts = {f"fsname={name}", "subtype=cdpfs", "default_permissions", "noatime"}
    if snapshot is not None:
        opts.add("ro")
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
                ready: Callable[[], None] | None = None, at: str | None = None,
                show_history: bool = True, follow: bool = False) -> None:
    """Mount ``store_path`` on ``mountpoint`` and serve until unmounted.

    With ``at`` (a moment), mount that past state alone, read-only, beside any
    live mount of the same store. With ``follow``, mount the newest state read-only
    as another process (a replica server, a live mount) changes it.
    """
    check_mountpoint(mountpoint)
    mountpoint = mountpoint.resolve()
    if at is not None or follow:
        _mount_snapshot(store_path, mountpoint, at, allow_other, ready, show_history)
        return
    # Two busy threads (trio, store) hand each request back and forth: a short
    # GIL switch interval keeps that hand-off from waiting the default 5 ms.
    sys.setswitchinterval(0.0002)
    store = Store(store_path)
    try:
        store.lock(f"mount on {mountpoint}")
        with store.txn() as txn:
            if store.config(txn, "role") == "replica":
                raise StoreError(f"{store.path} is a replica: mount it with --follow or --at "
                                 "to read it (writing would part its history from the "
                                 "primary's; failover is not built yet)", errno.EROFS)
        engine = Engine(store)
        fs = FileSystem(store, engine, kernel_mtime=FuseOperations.enable_writeback_cache)
        engine.start()
        try:
            engine.call_sync(fs.recover, durable=True)
            tfs = TimeFS(store, lambda seq: View(store, fs.m.txn, seq), live=fs,
                         show_history=show_history, on_slot=_holder(store, fs))
            replicator = Replicator(store)
            ops = FuseOperations(tfs, engine, replicator)
            pyfuse3.init(ops, str(mountpoint), fuse_options(store.path, allow_other))
            try:
                log.info("mounted %s on %s", store.path, mountpoint)
                try:
                    trio.run(_serve, ready, mountpoint, _pruning(store, engine), replicator.run,
                             _wake_on_commit(engine, replicator))
                except BaseException:
                    log.exception("the FUSE main loop failed")
                    raise
            finally:
                pyfuse3.close(unmount=True)
        finally:
            try:
                engine.call_sync(_drop_holds, store, fs)
            finally:
                engine.stop()
            log.info("unmounted %s; %d commits", mountpoint, engine.commits)
    finally:
        store.close()


def _holder(store: Store, fs: FileSystem) -> Callable[[int, int | None], None]:
    """Keep a hold on each past point the mount shows (runs on the store thread)."""

    def on_slot(slot: int, seq: int | None) -> None:
        if seq is None:
            bookmarks.release(fs.m.txn, store.db, f"slot{slot}")
        else:
            bookmarks.hold(fs.m.txn, store.db, f"slot{slot}", seq)
        fs.engine.note_dirty(64)

    return on_slot


def _drop_holds(store: Store, fs: FileSystem) -> None:
    mine = bookmarks.hold_name("")
    for mark in bookmarks.all_points(fs.m.txn, store.db):
        if mark.name.startswith(mine):
            fs.m.txn.delete(mark.name.encode(), db=store.db["bookmarks"])
            fs.engine.note_dirty(64)


def _pruning(store: Store, engine: Engine) -> Callable[[], Any]:
    """The mount's periodic prune: in small steps on the store thread, between requests."""

    async def loop() -> None:
        while True:
            every = await engine.call(lambda: store.config(engine.ensure_txn(), "prune_interval"))
            await trio.sleep(3600 if every is None else max(1, every))
            try:
                pruner = await engine.call(lambda: Pruner(store, engine.ensure_txn()))
                while not await engine.call(_prune_step, pruner, engine):
                    await trio.sleep(0)
                r = pruner.result
                log.info("pruned: %d versions, %d records, %d blocks, %d packs, %.1f MiB freed "
                         "in %.1fs", r.versions, r.records, r.blocks, r.packs,
                         r.bytes_freed / 2**20, r.seconds)
            except Exception:
                log.exception("periodic prune failed")

    return loop


def _prune_step(pruner: Pruner, engine: Engine) -> bool:
    done = pruner.step(engine.ensure_txn())
    engine.note_dirty(4096)
    return done


def _mount_snapshot(store_path: Path, mountpoint: Path, at: str | None, allow_other: bool,
                    ready: Callable[[], None] | None, show_history: bool) -> None:
    """Serve one past state (``at``), read-only, holding its point while mounted; or
    (``at`` None) follow the newest state, read-only."""
    store = Store(store_path)
    try:
        seq = None
        if at is not None:
            with store.txn(write=True) as txn:
                seq = Points(store, txn).resolve(timespec.parse(at))
                bookmarks.hold(txn, store.db, "snapshot", seq)
        try:
            engine = ReadEngine(store)
            tfs = TimeFS(store, lambda s: View(store, engine.txn, s), base_seq=seq,
                         follow=seq is None, show_history=show_history)
            ops = FuseOperations(tfs, engine)
            pyfuse3.init(ops, str(mountpoint),
                         fuse_options(store.path, allow_other, "follow" if seq is None else seq))
            try:
                log.info("mounted %s %s on %s, read-only", store.path,
                         "following its newest state" if seq is None else f"as of #{seq} ({at})",
                         mountpoint)
                trio.run(_serve, ready, mountpoint)
            finally:
                pyfuse3.close(unmount=True)
        finally:
            if seq is not None:
                with store.txn(write=True) as txn:
                    bookmarks.release(txn, store.db, "snapshot")
            log.info("unmounted %s", mountpoint)
    finally:
        store.close()


def _wake_on_commit(engine: Engine, replicator: Replicator) -> Callable[[], Any]:
    """Let the shippers look for new records as soon as they are committed."""

    async def hook() -> None:
        token = trio.lowlevel.current_trio_token()

        def committed() -> None:  # on the store thread
            try:
                token.run_sync_soon(replicator.committed)
            except trio.RunFinishedError:
                pass

        engine.after_commit(committed)

    return hook


async def _serve(ready: Callable[[], None] | None, mountpoint: Path,
                 *background: Callable[[], Any]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(_tune_after_init, mountpoint, ready)
        for task in background:
            nursery.start_soon(task)
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
