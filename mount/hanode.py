"""Run a node of a high-availability cluster: ``cdpfs ha run``.

The node's daemon (``cdpfs.ha.node.Node``) decides the role; this front end adds
what only a mount can: while the node is primary it mounts the live volume at
the node's mount point (FUSE, as ``cdpfs mount`` would) and counts the mount
answering a stat as one of the checks the lease is renewed on; when the node
loses the role the mount goes with the live volume. As a replica the node asks
``can_serve`` before it campaigns: the mount point must be an empty directory
with nothing mounted on it (as ``cdpfs mount`` checks), or it would win the role
and fail to mount. SIGINT/SIGTERM stop the
node: a primary hands the role on at once (its lease is revoked after its
volume is committed and unmounted) instead of leaving it to run out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pyfuse3
import trio

from cdpfs.api.server import ApiOptions
from cdpfs.errors import StoreError, first_error
from cdpfs.ha.cluster import Cluster
from cdpfs.ha.etcd import Etcd, Tls
from cdpfs.ha.node import Node
from cdpfs.volume import Volume

from .fuse import FuseOperations
from .runner import check_mountpoint, fuse_options, set_readahead

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds a stat of the mount point may take and still pass
# what to do about a mount point with something in it (there is no --nonempty here:
# a primary's mount must not hide files the application would then miss on another)
EMPTY_HINT = "move what is there away: the node can serve again once it is empty"


def run_node(endpoints: list[str], tls: Tls | None, cluster: str, name: str, *,
             allow_other: bool = False, api: ApiOptions | None = None) -> None:
    """Run node ``name`` of ``cluster`` until SIGINT/SIGTERM (``api``: serve the node
    API so, not on the address the node joined with)."""
    sys.setswitchinterval(0.0002)  # as a live mount: requests beside commits
    try:
        trio.run(_run, endpoints, tls, cluster, name, allow_other, api)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def _run(endpoints: list[str], tls: Tls | None, cluster: str, name: str,
               allow_other: bool, api: ApiOptions | None) -> None:
    async with Etcd(endpoints, tls) as etcd, trio.open_nursery() as nursery:
        mounted: list[Path] = []

        async def serve(volume: Volume) -> None:
            spec = node.spec
            if spec is None or not spec.mount:
                node.serving = True  # no mount: the volume serves through nothing else
                await trio.sleep_forever()
            mountpoint = Path(spec.mount)
            await trio.to_thread.run_sync(check_mountpoint, mountpoint, False, EMPTY_HINT)
            assert volume.store is not None
            pyfuse3.init(FuseOperations(volume), str(mountpoint),
                         fuse_options(volume.store.path, allow_other))
            mounted.append(mountpoint)
            node.serving = True  # the mount is there: /primary may send clients
            log.info("node %s: mounted %s on %s", name, volume.store.path, mountpoint)
            try:
                async with trio.open_nursery() as inner:
                    inner.start_soon(trio.to_thread.run_sync, set_readahead, mountpoint)
                    await pyfuse3.main(min_tasks=4, max_tasks=32)
            finally:
                node.serving = False
                mounted.remove(mountpoint)
                pyfuse3.close(unmount=True)
                log.info("node %s: unmounted %s", name, mountpoint)

        async def check() -> bool:
            """The mount answers (when the node has one): a stat from a thread."""
            if not mounted:
                return True
            with trio.move_on_after(CHECK_TIMEOUT):
                await trio.to_thread.run_sync(os.stat, mounted[0], abandon_on_cancel=True)
                return True
            log.warning("node %s: the mount did not answer a stat in %.0f s", name,
                        CHECK_TIMEOUT)
            return False

        probing = threading.Event()  # a look at the mount point has not returned yet
        one_look = trio.Lock()  # the node asks from two tasks: one look at a time

        def probe(mountpoint: Path) -> str | None:
            try:
                check_mountpoint(mountpoint, False, EMPTY_HINT)
            except StoreError as exc:
                return str(exc)
            finally:
                probing.clear()
            return None

        async def can_serve() -> str | None:
            """Why the volume could not be mounted now (None: it could), as ``serve``
            checks it; in a thread, given up after a while (a hung mount there),
            and none started while an earlier one still hangs."""
            spec = node.spec
            if spec is None or not spec.mount:
                return None
            async with one_look:
                with trio.move_on_after(CHECK_TIMEOUT):
                    while probing.is_set():  # an earlier look was abandoned: it may hang
                        await trio.sleep(0.01)
                    probing.set()
                    return await trio.to_thread.run_sync(probe, Path(spec.mount),
                                                         abandon_on_cancel=True)
                return f"{spec.mount}: did not answer a stat in {CHECK_TIMEOUT:.0f} s"

        async def drain() -> None:
            """The kernel writes back what it still holds for the mount."""
            if mounted:
                await trio.to_thread.run_sync(os.sync)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("node %s: signal %d: stopping (a primary hands the role on)",
                             name, signum)
                    node.stop()
                    return

        node = Node(Cluster(etcd, cluster), name, serve=serve, check=check, drain=drain,
                    can_serve=can_serve, api=api)
        nursery.start_soon(stop_on_signal)
        await node.run()
        nursery.cancel_scope.cancel()
