"""The primary side of replication: ship journal records, and the blocks a replica lacks.

A ``Sender`` connects to one replica (TLS, credentials.client_context), learns
its acknowledged position, and sends batches in seq order: the block hashes and
pack ids the batch references (OFFER), then one DATA frame with the records
(compressed on the wire) and only the blocks and packs the replica asked for
(as stored, compressed already). Up to PIPELINE batches are on the way
at once. The replica acknowledges each batch once it is durable. Every
failure (refused connection, dropped link, damaged frame) ends the connection;
the sender waits and resumes from the replica's position, so nothing is lost
or applied twice. Its state for ``cdpfs status`` is kept in the ``replicas``
table (``registry``; retention keeps journal records and blocks a replica still
needs), with when the replica last answered. A sender waits for new records on
``poke()``, which whoever commits calls; nothing here polls. While idle (the
replica has everything) it sends a PING after KEEPALIVE seconds without an
answer: the PONG is saved as a sign of life, and an idle link left unanswered
for IDLE_TIMEOUT is dropped and reconnected like any broken link.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..counters import Counters
from ..errors import CdpfsError, first_error, root_cause
from ..history import bookmarks
from ..store import epochs, journal
from ..store.lmdb import Store
from . import registry, wire
from .batches import JournalGap, data_frame, read_base_chunk, read_batch
from .protocol import (
    ANSWER_TIMEOUT,
    BASE_TABLES,
    IDLE_TIMEOUT,
    KEEPALIVE,
    PIPELINE,
    PROTOCOL,
    parse_address,
    record_check,
)
from .registry import ReplicaState

log = logging.getLogger(__name__)

SAVE_EVERY = 0.2  # seconds between saves of a replica's state while it is acknowledging
LINK_ERRORS = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError,
               trio.TooSlowError, wire.WireError)  # a broken link: retried

Connect = Callable[[], Awaitable[trio.abc.Stream]]


def tls_connect(address: str, ctx: ssl.SSLContext) -> Connect:
    """A connector to the replica at ``address``: TCP, then the TLS handshake."""
    host, port = parse_address(address)

    async def connect() -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        tls = wire.tls_stream(stream, ctx, server_side=False)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    return connect


@dataclass(slots=True)
class _Sent:
    """A batch offered or sent, not yet acknowledged."""

    seq: int  # its last record
    count: int  # records
    ts: int  # timestamp of its last record
    started: float  # trio time of its OFFER
    nbytes: int = 0  # frames sent for it


class Sender:
    """Ships ``store`` to the replica ``name`` at ``address``, connecting with
    ``connect`` (``tls_connect``; an in-memory stream in tests).

    Attributes:
        state: what is known of the replica (saved in the registry).
        caught_up: set once the replica has had everything committed.
        on_batch: called with ``state`` after each acknowledged batch (progress).
        heard_at: trio time the replica last answered (``state.heard_ns`` on the
            wall clock).
    """

    def __init__(self, store: Store, name: str, address: str, connect: Connect,
                 counters: Counters | None = None) -> None:
        self.store = store
        self.address = address
        self.connect = connect
        self.counters = counters or Counters()
        # A replica first met here (not added with 'cdpfs replica add') is registered
        # as manual: a one-off 'cdpfs replicate' must not make later mounts ship to it.
        self.state = ReplicaState(name, address, mode="manual")
        with store.txn() as txn:
            known = registry.get(store, txn, name)
        # Saved in the registry once it answered; made there by the first save if it
        # was not registered before, never made again if it is removed meanwhile.
        self._registered = known is not None
        self._create = known is None
        if known is not None:  # keep what was registered and counted before
            self.state = known
            self.state.address, self.state.connected = address, False
        self.caught_up = trio.Event()
        self.on_batch: Callable[[ReplicaState], None] | None = None
        self._wake = trio.Event()
        self._acked = trio.Event()  # set (and replaced) whenever the position moves
        self._resync = False  # the journal after the replica's position has a hole
        self._budget_at = 0.0  # trio time until which the bandwidth budget is spent
        self._dirty = False  # state changed since it was last saved
        self._saved_at = 0.0
        self.heard_at = 0.0
        self._behind = False  # connected, and not yet had everything in this session

    def poke(self) -> None:
        """Something changed (records committed, bookmarks): look now."""
        self._wake.set()

    async def wait_acked(self, seq: int) -> None:
        """Return once the replica has acknowledged ``seq``."""
        while self.state.acked < seq:
            await self._acked.wait()

    def _heard(self) -> None:
        """The replica answered: it is alive (saved with the next save)."""
        self.heard_at = trio.current_time()
        self.state.heard_ns = time.time_ns()

    def _moved(self) -> None:
        self._acked.set()
        self._acked = trio.Event()

    def _save(self) -> None:
        self._dirty = False
        if not self._registered:  # a replica never reached is not registered
            return
        self.state.updated_ns = time.time_ns()
        with self.store.txn(write=True) as txn:
            registry.save_progress(self.store, txn, self.state, create=self._create)
        self._create = False

    async def run(self, follow: bool = True, attempts: int = 0) -> None:
        """Ship until cancelled (``follow``) or until the replica has everything.
        Retries dropped connections; gives up after ``attempts`` failures in a row
        (0: never)."""
        try:
            await self._run(follow, attempts)
        finally:
            if self.state.connected:  # stopped (unmount, signal): say so in status
                self.state.connected = False
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._save)

    async def _run(self, follow: bool, attempts: int) -> None:
        self._failures = 0  # in a row: a session the replica acknowledged new records in
        self._acked_at_failure = self.state.acked  # resets it (WELCOME alone does not)
        while True:
            try:
                await self._session(follow)
                return
            except wire.PeerError as exc:
                await self._stopped(f"refused: {exc}")
                raise CdpfsError(f"replica {self.state.name} refused: {exc}") from None
            except JournalGap as exc:  # a hole further on than the replica's next record
                log.warning("%s: a full resync follows", exc)
                self._resync = True
            except LINK_ERRORS as exc:
                await self._failed(exc, attempts)
            except CdpfsError as exc:  # not the link: e.g. its history parted from this one
                await self._stopped(str(exc))
                raise
            except Exception as exc:  # a bug, here or provoked by the replica: this link only
                log.debug("internal error shipping to %s", self.state.name, exc_info=True)
                await self._failed(exc, attempts, internal=True)

    async def _failed(self, exc: BaseException, attempts: int, internal: bool = False) -> None:
        """A connection failed: note it, give up after ``attempts`` in a row, else wait
        (longer after each: a replica that welcomes and then fails is not hammered)."""
        if self.state.acked != self._acked_at_failure:
            self._failures, self._acked_at_failure = 0, self.state.acked
        self._failures += 1
        error = ("internal error: " if internal else "") + root_cause(exc)
        level = logging.ERROR if internal else logging.WARNING
        log.log(level if error != self.state.last_error else logging.DEBUG,
                "replica %s at %s: %s; retrying", self.state.name, self.address, error)
        if self.state.connected or error != self.state.last_error:
            self.counters.events.emit("replica-lost", replica=self.state.name, error=error)
        self.state.connected, self.state.last_error = False, error
        await trio.to_thread.run_sync(self._save)
        if attempts and self._failures >= attempts:
            raise CdpfsError(f"replica {self.state.name}: {self.state.last_error}") from None
        await trio.sleep(min(2.0, 0.2 * 2 ** min(self._failures, 4)))


    async def _stopped(self, error: str) -> None:
        """Shipping to this replica ends on ``error``: keep it for status."""
        self.counters.events.emit("replica-lost", replica=self.state.name, error=error)
        self.state.connected, self.state.last_error = False, error
        await trio.to_thread.run_sync(self._save)

    async def _session(self, follow: bool) -> None:
        with trio.fail_after(ANSWER_TIMEOUT):  # a replica that takes no handshake
            tls = await self.connect()
        try:
            conn = wire.Connection(tls)
            with self.store.txn() as txn:
                line = epochs.lineage(self.store, txn)
            await conn.send(wire.HELLO, {"proto": PROTOCOL, "uuid": self.store.uuid,
                                         "block_size": self.store.block_size,
                                         "name": self.state.name,
                                         "epochs": [list(x) for x in line]})
            with trio.fail_after(ANSWER_TIMEOUT):  # a replica that never welcomes
                _, welcome = await conn.recv(wire.WELCOME)
            self._heard()
            self._registered = True
            acked = int(welcome["acked"])
            try:
                gap = await trio.to_thread.run_sync(self._gap, acked,
                                                    bytes(welcome.get("check") or b""))
            except CdpfsError as exc:
                await conn.send(wire.ERROR, {"message": str(exc)})  # for the replica's log
                raise
            self.state.connected, self.state.last_error = True, ""
            self.counters.events.emit("replica-connected", replica=self.state.name,
                                      acked=acked)
            self._behind = True  # until it has everything: a caught-up event then
            if acked != self.state.acked:
                log.info("replica %s is at #%d", self.state.name, acked)
            self.state.acked = acked
            self._moved()
            await trio.to_thread.run_sync(self._save)
            if welcome.get("base_pending") or gap or self._resync:
                sent = conn.sent
                acked = await self._full_resync(conn)
                self._resync = False
                self.state.bytes_sent += conn.sent - sent
            try:
                await self._pipeline(conn, acked, follow)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            self.state.connected = False
            await trio.to_thread.run_sync(self._save)
            await tls.aclose()  # a clean end: close_notify, not a drop
        finally:
            await trio.aclose_forcefully(tls)

    async def _pipeline(self, conn: wire.Connection, acked: int, follow: bool) -> None:
        """Ship batches until caught up (or forever with ``follow``), up to PIPELINE
        of them offered or sent but not yet acknowledged.

        Tasks share the link: this one reads batches and sends their OFFERs ahead;
        ``loader`` pairs each with its WANT and reads the wanted blocks while
        ``sender`` sends the DATA frame before; ``reader`` takes WANTs and ACKs as
        they come back. So the replica answers the next offer while the data before
        it is still on the way, and neither side waits for a round trip between
        batches. Whenever the replica has everything, the volume's bookmarks follow
        if they changed (MARKS)."""
        slots = trio.Semaphore(PIPELINE)
        send_lock = trio.Lock()
        offered_in, offered = trio.open_memory_channel[
            tuple[list[list[Any]], dict[str, list[Any]], _Sent]](PIPELINE)
        wants_in, wants = trio.open_memory_channel[dict[str, list[Any]]](PIPELINE)
        inflight: deque[_Sent] = deque()  # sent, waiting for their ACK, in order
        pending = 0  # frames that expect an answer (OFFER: WANT, DATA: ACK)

        ready_in, ready = trio.open_memory_channel[tuple[list[wire.Part], _Sent]](1)

        async def loader() -> None:  # reads the next frame's blocks while one is sent
            async for batch, refs, sent in offered:
                want = await wants.receive()
                parts = await trio.to_thread.run_sync(self._data_frame, want, refs,
                                                      {"records": batch})
                await ready_in.send((parts, sent))

        async def sender() -> None:
            nonlocal pending
            async for parts, sent in ready:
                async with send_lock:
                    pending += 1
                    sent.nbytes += await conn.send_frame(parts, pace=self._throttle)

        ping = 0  # the id of the newest PING
        pong = trio.Event()  # set when it is answered

        async def reader() -> None:
            nonlocal pending
            while True:
                kind, body = await conn.recv(wire.WANT, wire.ACK, wire.PONG)
                self._heard()
                if kind == wire.PONG:
                    if not ping or body["id"] != ping or pong.is_set():
                        raise wire.WireError(f"PONG {body['id']} answers no PING")
                    pong.set()
                    continue
                pending -= 1
                if kind == wire.WANT:
                    await wants_in.send(body)
                    continue
                if not inflight or int(body["seq"]) != inflight[0].seq:
                    raise wire.WireError(f"acknowledged #{body['seq']}, expected "
                                         f"#{inflight[0].seq if inflight else 'nothing'}")
                await self._on_ack(inflight.popleft())
                slots.release()
                self.poke()  # the loop below may be waiting for the last ACK

        async def watchdog() -> None:  # a dead link or replica: reconnect
            while True:
                if trio.current_time() < conn.active + ANSWER_TIMEOUT:
                    await trio.sleep_until(conn.active + ANSWER_TIMEOUT)
                elif pending:
                    raise trio.TooSlowError(f"no answer from the replica for "
                                            f"{ANSWER_TIMEOUT:.0f}s")
                else:  # nothing owed (keepalive's part): look again later, never spin
                    await trio.sleep(KEEPALIVE)

        async def keepalive() -> None:  # an idle link: ask for a sign of life now and then
            nonlocal ping, pong
            while True:
                if pending:  # answers are owed: the watchdog judges the link
                    await trio.sleep(KEEPALIVE)
                    continue
                if trio.current_time() < self.heard_at + KEEPALIVE:
                    await trio.sleep_until(self.heard_at + KEEPALIVE)
                    continue
                ping, pong = ping + 1, trio.Event()
                async with send_lock:
                    await conn.send(wire.PING, {"id": ping})
                with trio.move_on_at(self.heard_at + IDLE_TIMEOUT):
                    await pong.wait()
                if pong.is_set():  # status sees it alive: a small write every KEEPALIVE
                    self._saved_at = trio.current_time()
                    await trio.to_thread.run_sync(self._save)
                elif not pending:
                    raise trio.TooSlowError(f"no answer from the idle replica for "
                                            f"{trio.current_time() - self.heard_at:.0f}s")

        async with trio.open_nursery() as nursery:
            for task in (loader, sender, reader, watchdog, keepalive):
                nursery.start_soon(task)
            upto = acked
            marks_sent: dict[str, list[int]] | None = None
            while True:
                await slots.acquire()
                batch, refs = await trio.to_thread.run_sync(self._read_batch, upto)
                if batch:
                    sent = _Sent(batch[-1][0], len(batch), journal.ts_of(batch[-1][1]),
                                 trio.current_time())
                    inflight.append(sent)
                    async with send_lock:
                        pending += 1
                        sent.nbytes += await conn.send(wire.OFFER, refs)
                    await offered_in.send((batch, refs, sent))
                    upto = batch[-1][0]
                    continue
                slots.release()
                if not inflight:
                    marks = await trio.to_thread.run_sync(self._bookmarks)
                    if marks != marks_sent:  # bookmarks made or deleted: the replica's follow
                        async with send_lock:
                            await conn.send(wire.MARKS, marks)
                        marks_sent = marks
                    if self._dirty:
                        await trio.to_thread.run_sync(self._save)
                    if self._behind:  # the first time in this session
                        self.counters.events.emit("replica-caught-up",
                                                  replica=self.state.name, acked=upto)
                        self._behind = False
                    self.caught_up.set()
                    if not follow:
                        break
                await self._wake.wait()
                self._wake = trio.Event()
            nursery.cancel_scope.cancel()

    async def _on_ack(self, sent: _Sent) -> None:
        """Account for a batch the replica acknowledged (saved now and then: retention
        keeps the journal from the saved position, so a late save only keeps more)."""
        took = max(1e-3, trio.current_time() - sent.started)
        state = self.state
        state.rate = 0.7 * state.rate + 0.3 * sent.nbytes / took
        state.record_rate = 0.7 * state.record_rate + 0.3 * sent.count / took
        state.acked, state.acked_ts = sent.seq, sent.ts
        state.records_sent += sent.count
        state.bytes_sent += sent.nbytes
        self.counters.records_shipped += sent.count
        self.counters.bytes_shipped += sent.nbytes
        self._moved()
        self._dirty = True
        await self._save_now_and_then()
        if self.on_batch is not None:
            self.on_batch(state)

    async def _save_now_and_then(self) -> None:
        """Save the state unless that was done less than SAVE_EVERY ago."""
        if trio.current_time() - self._saved_at >= SAVE_EVERY:
            self._saved_at = trio.current_time()
            await trio.to_thread.run_sync(self._save)

    def _bookmarks(self) -> dict[str, list[int]]:
        """The user's bookmarks the replica can hold (their records acknowledged)."""
        with self.store.txn() as txn:
            return {b.name: [b.seq, b.created_ns] for b in bookmarks.bookmarks(self.store, txn)
                    if b.seq <= self.state.acked}

    def _read_batch(self, acked: int) -> tuple[list[list[Any]], dict[str, list[Any]]]:
        with self.store.txn() as txn:
            return read_batch(self.store, txn, acked, self.state.name)

    def _gap(self, acked: int, check: bytes) -> bool:
        """Whether the records after ``acked`` are no longer in the journal (pruned).
        CdpfsError if the replica's history is not this volume's."""
        with self.store.txn() as txn:
            last, _ = journal.last(self.store, txn)
            mine = record_check(txn, self.store, acked)
            if acked > last or (check and mine and check != mine):
                held = f"records up to #{acked} (this volume is at #{last})" if acked > last \
                    else f"another record #{acked} than this volume"
                raise CdpfsError(f"replica {self.state.name} holds {held}: its history has "
                                 "parted from this volume's (written to, or fed from "
                                 "elsewhere); nothing was sent")
            return acked < last and not journal.has(self.store, txn, acked + 1)

    async def _exchange(self, conn: wire.Connection, refs: dict[str, list[Any]],
                        body: dict[str, Any]) -> int:
        """Offer what ``body`` references, then send it with what is missing; the ack."""
        with trio.fail_after(ANSWER_TIMEOUT):  # a dead link or replica: reconnect
            await conn.send(wire.OFFER, refs)
            _, want = await conn.recv(wire.WANT)
        self._heard()
        parts = await trio.to_thread.run_sync(self._data_frame, want, refs, body)
        await conn.send_frame(parts, pace=self._throttle)

        with trio.fail_after(ANSWER_TIMEOUT):
            _, ack = await conn.recv(wire.ACK)
        self._heard()
        return int(ack["seq"])

    async def _full_resync(self, conn: wire.Connection) -> int:
        """Send the whole retained history (blocks only where the replica lacks them),
        for a replica whose position is no longer in the journal."""
        with self.store.txn() as txn:
            top, _ = journal.last(self.store, txn)
        log.warning("replica %s needs a full resync (its records were pruned here): sending "
                    "the history up to #%d, blocks only where it lacks them", self.state.name,
                    top)
        await conn.send(wire.BASE, {"begin": True, "seq": top})
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.recv(wire.ACK)
        self._heard()
        # Retention keeps what comes after the base from now on; nothing counts as
        # acknowledged (a sync write waits) until the replica has the whole base.
        self.state.hold = top
        await trio.to_thread.run_sync(self._save)
        for table in BASE_TABLES:
            after = b""
            while True:
                items, refs, after = await trio.to_thread.run_sync(
                    read_base_chunk, self.store, table, after, top)
                if after is None:
                    break
                if items:
                    await self._exchange(conn, refs, {"base": {"table": table,
                                                               "items": items}})
                    await self._save_now_and_then()  # status: it answers
        await conn.send(wire.BASE, {"end": True, "seq": top})
        with trio.fail_after(ANSWER_TIMEOUT):
            _, ack = await conn.recv(wire.ACK)
        self._heard()
        log.info("replica %s: full resync to #%d done", self.state.name, top)
        self.state.acked = int(ack["seq"])
        self._moved()
        await trio.to_thread.run_sync(self._save)
        return self.state.acked

    async def _throttle(self, nbytes: int) -> None:
        """Keep to the replica's bandwidth limit (bytes per second), if it has one."""
        if not self.state.limit:
            return
        now = trio.current_time()
        self._budget_at = max(self._budget_at, now) + nbytes / self.state.limit
        await trio.sleep_until(self._budget_at)

    def _data_frame(self, want: dict[str, list[Any]], offer: dict[str, list[Any]],
                    body: dict[str, Any]) -> list[wire.Part]:
        """The DATA frame of ``body`` with what the replica wants of ``offer``."""
        for kind in ("blocks", "packs"):
            if not set(want[kind]) <= set(offer[kind]):
                raise wire.WireError(f"the replica wants {kind} that were not offered")
        with self.store.txn() as txn:
            return data_frame(self.store, txn, want, body)

