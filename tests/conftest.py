"""Shared fixtures: real stores and real FUSE mounts, always cleaned up.

Tests that need a FUSE mount (the ``volume``/``make_volume`` fixtures) or
network namespaces are skipped, with the reason, where this process cannot
make them (no real /dev/fuse, no capabilities): the in-process tier runs
anywhere.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdcluster import EtcdCluster
from harness import Procs, ReplicaServer, Volume, can_mount, cdpfs, pair_stores

HAVE_FUSE = can_mount()

# A shell that starts a job in the background without job control makes it ignore
# SIGINT, and every process the tests start would inherit that: a Ctrl-C test
# (t6_drtest) then waits for a signal its process never sees. A handler of this
# process's own is reset to the default in each child it starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """A fresh store, mounted (with the arguments of a ``mount`` mark, if the test
    has one); afterwards unmounted, verified, its log free of errors."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    mark = request.node.get_closest_marker("mount")
    vol = Volume(tmp_path).init()
    try:
        vol.mount(*(mark.args if mark else ()))
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
    bad = vol.problems()
    assert not bad, "the mount logged errors:\n" + "\n".join(bad)


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[type[Volume]]:
    """Build extra volumes by name: ``make_volume('a')``; all cleaned up after."""
    made: list[Volume] = []

    def make(name: str = "vol") -> Volume:
        if not HAVE_FUSE:
            pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
        vol = Volume(tmp_path, name)
        made.append(vol)
        return vol

    yield make  # type: ignore[misc]
    for vol in made:
        vol.cleanup()


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Background ``cdpfs`` processes of a test; all killed in teardown."""
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster with TLS on loopback, for the whole session (each
    test keeps to keys of its own); every member killed at the end."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


Served = tuple[Volume, Path, ReplicaServer]


@pytest.fixture
def served(make_volume: type[Volume], tmp_path: Path) -> Iterator[Served]:
    """A mounted primary shipping (async) to a replica server on loopback."""
    vol = make_volume("primary").init()
    replica = tmp_path / "replica.store"
    pair_stores(vol.store, replica)
    server = ReplicaServer(replica, tmp_path / "serve.log")
    try:
        server.start()
        cdpfs("replica", "add", vol.store, "r1", "--address", server.address)
        vol.mount()
        yield vol, replica, server
    finally:
        server.kill()
        vol.cleanup()
