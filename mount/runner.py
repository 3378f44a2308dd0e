"""Run a FUSE mount of a store: serve the volume until unmounted or signalled.

``mount_store`` does the whole life of a mount in the calling process (the CLI
forks first for background mode): it starts the volume service
(``cdpfs.volume.Volume``, which opens, locks, recovers and serves the store),
mounts it with pyfuse3, and on SIGINT/SIGTERM, or when the kernel unmounts,
stops it, which commits everything applied before the store is closed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from cdpfs.api.access import Caller
from cdpfs.api.app import Action, Served
from cdpfs.api.server import ApiOptions, serve_api
from cdpfs.errors import CdpfsError, StoreError, first_error
from cdpfs.names import volume_path
from cdpfs.volume import Mode, Volume

from .control import check_source
from .fuse import FuseOperations
from .restore import Summary, restore_tree

log = logging.getLogger(__name__)


def fuse_options(store: Path, allow_other: bool, snapshot: int | str | None = None) -> set[str]:
    """Mount options; a snapshot mount is read-only and named ``STORE#seq`` (a
    following one ``STORE#follow``)."""
    check_source(store)
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


def check_mountpoint(mountpoint: Path, nonempty: bool = False,
                     hint: str = "use --nonempty to mount there anyway") -> None:
    """StoreError unless ``mountpoint`` is a directory a volume may be mounted on:
    no dead mount, nothing mounted, and (unless ``nonempty``) empty, since a mount
    hides what is there (``hint`` says what to do about that)."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StoreError(f"{mountpoint}: a dead mount is still there (its process died); "
                             f"run 'cdpfs umount {mountpoint}' first") from None
    if not mountpoint.is_dir():
        raise StoreError(f"{mountpoint}: mount point does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise StoreError(f"{mountpoint}: something is already mounted there")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                taken = next(entries, None) is not None
        except OSError as exc:
            raise StoreError(f"{mountpoint}: cannot read it: {exc.strerror}") from None
        if taken:
            raise StoreError(f"{mountpoint}: is not empty, and the mount would hide what "
                             f"is in it ({hint})")


def mount_store(store_path: Path, mountpoint: Path, *, allow_other: bool = False,
                ready: Callable[[], None] | None = None, at: str | None = None,
                show_history: bool | None = None, follow: bool = False,
                nonempty: bool = False, api: ApiOptions | None = None) -> None:
    """Mount ``store_path`` on ``mountpoint`` and serve until unmounted.

    With ``at`` (a moment), mount that past state alone, read-only, beside any
    live mount of the same store. With ``follow``, mount the newest state read-only
    as another process (a replica server, a live mount) changes it. ``ready`` is
    called once the mount answers. With ``api``, serve the node API beside it.
    """
    check_mountpoint(mountpoint, nonempty)
    mountpoint = mountpoint.resolve()
    mode = Mode.SNAPSHOT if at is not None else Mode.FOLLOW if follow else Mode.LIVE
    if mode is Mode.LIVE:
        # Requests run on the trio thread while a commit writes the last layer in
        # a worker thread: a short GIL switch interval keeps a request from waiting
        # the default 5 ms behind the commit's Python work.
        sys.setswitchinterval(0.0002)
    volume = Volume(store_path, mode, at=at, show_history=show_history,
                    kernel_mtime=FuseOperations.enable_writeback_cache,
                    owner=f"mount on {mountpoint}")
    try:
        trio.run(_serve, volume, mountpoint, allow_other, ready, api)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def _serve(volume: Volume, mountpoint: Path, allow_other: bool,
                 ready: Callable[[], None] | None, api: ApiOptions | None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.run)
        if api is not None:
            actions = {"restore": restore_action(volume, mountpoint)}
            await nursery.start(serve_api, api, Served(volume, "mount", actions))
        store = volume.store
        assert store is not None
        tag = {Mode.SNAPSHOT: volume.seq, Mode.FOLLOW: "follow"}.get(volume.mode)
        pyfuse3.init(FuseOperations(volume), str(mountpoint),
                     fuse_options(store.path, allow_other, tag))
        try:
            if volume.mode is Mode.LIVE:
                log.info("mounted %s on %s", store.path, mountpoint)
            else:
                log.info("mounted %s %s on %s, read-only", store.path,
                         "following its newest state" if volume.mode is Mode.FOLLOW
                         else f"as of #{volume.seq} ({volume.at})", mountpoint)
            nursery.start_soon(stop_on_signal)
            nursery.start_soon(_announce, mountpoint, ready)
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=32)
            except BaseException:
                log.exception("the FUSE main loop failed")
                raise
        finally:
            pyfuse3.close(unmount=True)
        nursery.cancel_scope.cancel()
    log.info("unmounted %s", mountpoint)


async def _announce(mountpoint: Path, ready: Callable[[], None] | None) -> None:
    """Widen readahead and report ready once the kernel has the FUSE INIT reply: it
    resets readahead when the reply arrives, and holds every request until then, so
    a stat of the mount point (from a thread: this process serves it) returns after."""
    await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
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


def restore_action(volume: Volume, mountpoint: Path) -> Action:
    """The node API's restore (``POST /api/v1/restore``, ``{"path": ..., "at": MOMENT,
    "delete": false}``): the file or tree at ``path`` put back as it was, through
    the mount (``cdpfs restore``'s engine: nothing written outside the path), in a
    thread (its requests come back to this process)."""

    async def restore(body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rel = volume_path(body.get("path"))
        at, delete = body.get("at"), body.get("delete", False)
        if not isinstance(at, str) or not isinstance(delete, bool):
            raise CdpfsError("at: a moment (a time, -15m, #seq or a bookmark); delete: "
                             "true or false")
        seq, ts = await volume.point(at)
        summary = await trio.to_thread.run_sync(_restore, mountpoint, rel, seq, delete)
        if summary.warnings:
            raise CdpfsError(f"{len(summary.warnings)} entries could not be restored: "
                             f"{summary.warnings[0]}")
        volume.counters.events.emit("restore", path=rel, seq=seq, caller=caller.name)
        return {"path": rel, "seq": seq, "time_ns": ts, **asdict(summary)}

    return restore


def _restore(mountpoint: Path, rel: str, seq: int, delete: bool) -> Summary:
    then = mountpoint / f"@#{seq}"
    if not os.path.lexists(then / rel):
        raise CdpfsError(f"{rel}: did not exist at #{seq}")
    return restore_tree(then / rel, mountpoint / rel, src_root=then, dst_root=mountpoint,
                        dst_dev=os.stat(mountpoint).st_dev, delete=delete)
