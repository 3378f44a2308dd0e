"""Helpers that build real, small instances of each layer for tests and benchmarks.

Nothing here is a mock: a ``LiveStore`` is a real LMDB store with the real engine
and filesystem layer running; ``served`` runs the real volume service in a trio
nursery; ``MemoryLinks`` joins real senders and receivers with
``trio.testing.memory_stream_pair`` instead of TCP and TLS; ``FakeClock`` is a
wall clock a test moves by hand (records are stamped with it, retention ages
them by it). None of it needs root, FUSE or the network.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from .fs.engine import Engine
from .fs.mutate import init_volume
from .fs.vfs import FileSystem
from .replication import wire
from .replication.receiver import Receiver
from .replication.registry import ReplicaState
from .replication.sender import Connect
from .store.lmdb import Store
from .volume import Mode, Volume


class FakeClock:
    """A wall clock in ns since the epoch that moves only when told to."""

    def __init__(self, start_ns: int | None = None) -> None:
        self.now = time.time_ns() if start_ns is None else start_ns

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


class LiveStore:
    """A new store (or with ``existing``, one made before: a clone) with its engine
    and filesystem layer running, as a mount has them, driven from plain (non-trio)
    code: ``live(fn, *args)`` runs ``fn`` as an
    engine call on the calling thread and returns its result (or raises its error).

    Attributes:
        store, engine, fs: the open store, its engine, the filesystem layer.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], int] | None = None, existing: bool = False,
                 **engine_options: Any) -> None:
        self.store = Store(path) if existing else init_volume(path)
        self.engine = Engine(self.store, **engine_options)
        kw = {} if clock is None else {"clock": clock}
        self.fs = FileSystem(self.store, self.engine, **kw)
        self.engine.start()

    def __call__(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.engine.run_sync(lambda: fn(*args, **kw))

    def seq(self) -> int:
        """The newest journal record applied."""
        return int(self(lambda: self.fs.m.last_seq))

    def sync(self) -> None:
        """Commit everything applied (what an fsync does)."""
        self.engine.run_sync(self.fs.sync, durable=True)

    def create(self, name: bytes, parent: int = 1, mode: int = 0o644) -> tuple[int, int]:
        """Create and open a regular file: (file handle, inode)."""
        fh, entry = self(self.fs.create, parent, name, mode, os.O_RDWR, 0, 0)
        return fh, entry.ino

    def close(self) -> None:
        self.engine.stop()
        self.store.close()

    def __enter__(self) -> LiveStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@asynccontextmanager
async def served(path: str | os.PathLike[str], mode: Mode = Mode.LIVE,
                 **options: Any) -> AsyncIterator[Volume]:
    """The volume service on ``path`` in a nursery of its own, started; stopped
    (everything committed, the store closed) when the block ends."""
    async with trio.open_nursery() as nursery:
        volume: Volume = await nursery.start(Volume(Path(path), mode, **options).run)
        try:
            yield volume
        finally:
            nursery.cancel_scope.cancel()


class MemoryLinks:
    """Links senders to receivers of this process over in-memory streams.

    ``add(name, receiver)`` names a receiver; ``connect(name)`` is a ``Connect``
    for a ``Sender`` (each call a new connection, served by the receiver in
    ``nursery`` as a TCP connection would be); ``connector`` is the same for a
    ``Fanout``. ``cut()`` breaks every open link, as a network failure would.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.receivers: dict[str, Receiver] = {}
        self.connections = 0
        self._open: list[trio.abc.Stream] = []

    def add(self, name: str, receiver: Receiver) -> None:
        self.receivers[name] = receiver

    def connect(self, name: str) -> Connect:
        async def connect() -> trio.abc.Stream:
            receiver = self.receivers.get(name)
            if receiver is None:
                raise OSError(f"no receiver named {name}")
            ours, theirs = trio.testing.memory_stream_pair()
            self.connections += 1
            self._open += [ours, theirs]
            self.nursery.start_soon(self._serve, receiver, theirs, f"memory:{name}")
            return ours

        return connect

    def connector(self, store: Store, state: ReplicaState) -> Connect:
        return self.connect(state.name)

    async def _serve(self, receiver: Receiver, stream: trio.abc.Stream, peer: str) -> None:
        try:
            await receiver.serve_connection(wire.Connection(stream), peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def cut(self) -> None:
        """Close every link made so far (both ends), as a dropped network would."""
        streams, self._open = self._open, []
        for stream in streams:
            await trio.aclose_forcefully(stream)
