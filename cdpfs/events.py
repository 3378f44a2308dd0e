"""What happened to a served volume, as events with gap-free ids.

One ``Events`` per process (a mount, a replica server, an HA node: it outlives
the volumes a node serves in turn), handed to the parts that notice something
(the volume service, the senders, the fan-out, the HA node). Each event gets the
next id, so a client that follows them (``/api/v1/events``) and sees an id jump
knows it missed some: the log keeps the newest ``KEEP`` only, and a process that
restarted starts again at 1 with a new ``run`` id.

Kinds (and their fields besides ``id``, ``time``, ``kind``): ``bookmark``
(name, seq), ``bookmark-deleted`` (name), ``prune`` (records, versions,
bytes_freed), ``replica-connected``, ``replica-lost`` (error),
``replica-caught-up`` (acked), ``sync-degraded``, ``sync-restored`` (replica
each), ``role`` (role, epoch: failover, switchover, fenced, demoted),
``drtest-started``, ``drtest-passed``, ``drtest-failed`` (seq, detail),
``backup-done``, ``backup-failed`` (file, detail), ``restore`` (path, moment),
``action`` (what, caller), ``error`` (message).

``emit`` may be called from any thread; followers wait on the trio thread.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio

KEEP = 10_000  # events kept for followers that come late or fall behind


class Events:
    """The event log of one process (see the module docstring)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.run = uuid.uuid4().hex[:12]
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._next = 1
        self._token: trio.lowlevel.TrioToken | None = None
        self._arrived = trio.Event()

    @property
    def last_id(self) -> int:
        return self._next - 1

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record an event now; the event as followers get it."""
        with self._lock:
            event = {"id": self._next, "time": time.time_ns(), "kind": kind, **fields}
            self._next += 1
            self._log.append(event)
        self._wake()
        return event

    def _wake(self) -> None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # another thread: wake the followers from the trio thread
            if self._token is not None:
                try:
                    self._token.run_sync_soon(self._set)
                except trio.RunFinishedError:
                    pass
            return
        self._set()

    def _set(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    def since(self, after: int = 0) -> list[dict[str, Any]]:
        """The events kept with an id above ``after``, oldest first."""
        with self._lock:
            return [e for e in self._log if e["id"] > after]

    async def follow(self, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The events after id ``after``, then each new one as it happens (forever)."""
        self._token = trio.lowlevel.current_trio_token()
        while True:
            arrived = self._arrived
            for event in self.since(after):
                after = event["id"]
                yield event
            if self.last_id <= after:
                await arrived.wait()
