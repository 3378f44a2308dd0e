"""The replica side of replication: accept a primary, apply its records in order, durably.

``serve`` listens for TLS connections (credentials.server_context: only trusted
certificates get in). For each batch the primary offers the block hashes and
pack ids its records reference; the replica answers with those it lacks; the
primary sends the records with them (DATA). The replica checks every block
against its hash, applies the batches that arrived in one synced LMDB
transaction, and only then acknowledges each batch's last seq: an acknowledged
record is on disk. Its position is simply the newest record in its journal
(WELCOME also carries a hash of that record, so a primary can tell a replica
whose history parted from its own), and a restart of either side resumes there.
The replica store is created from the primary's first HELLO (same volume uuid
and block size), is marked ``role = replica`` (a read-write mount refuses it),
and can be mounted read-only while it receives (``cdpfs mount --follow`` or
``--at``). Bookmarks arrive as MARKS and are mirrored. The volume service
(``cdpfs.volume``, mode ``replica``) runs a ``Receiver`` beside the replica's own
prune and the senders to the replicas registered in the replica's store (a chain).

A connection may instead open with FETCH: a rebuild asks for a send stream of the
replica's store (``cdpfs rebuild --from ADDRESS``). The receiver checks who asks
for what (the protocol, the volume, a store that is whole) and hands the
connection to ``on_fetch``, which the volume service sets (the streams are a
layer above this one); meanwhile the primary's session goes on.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import trio

from ..counters import Counters
from ..errors import CdpfsError, Corrupt, first_error, root_cause
from ..history import bookmarks
from ..history.diverged import keep_and_truncate
from ..store import blocks, codec, entries, epochs, journal
from ..store.lmdb import Store, is_store
from ..store.schema import U64
from . import wire
from .protocol import BASE_TABLES, PIPELINE, PROTOCOL, parse_address, record_check

log = logging.getLogger(__name__)

GROUP_MAX = 8  # batches committed in one transaction at most
BASE_PENDING = b"replica.base_pending"  # meta key while a full resync is under way
ROLE_REPLICA = "replica"  # config.role of a replica store (a read-write mount refuses it)

# Serves a FETCH: (the replica's store, the connection, the FETCH body, the peer).
Fetch = Callable[[Store, wire.Connection, dict[str, Any], str], Awaitable[None]]


class Incoming:
    """A batch received and waiting to be applied; or, with ``control``, the start or
    the end of a full resync (BASE) or the primary's bookmarks (MARKS).

    A send stream's batches (``replication.stream``) are applied by the same code:
    their records may leave gaps (history thinned by prune, or collapsed to its
    ends), and records no time resolves to are named in ``unindexed``."""

    def __init__(self, offer: dict[str, Any] | None = None, want: dict[str, Any] | None = None,
                 body: dict[str, Any] | None = None, pieces: Sequence[bytes] = (),
                 control: tuple[int, Any] | None = None, gaps: bool = False) -> None:
        self.control = control
        self.gaps = gaps
        self.offer = offer or {"blocks": [], "packs": []}
        self.want = want or {"blocks": [], "packs": []}
        body = body or {}
        self.records: list[list[Any]] = body.get("records") or []
        self.base: dict[str, Any] | None = body.get("base")
        self.unindexed: set[int] = set(body.get("unindexed") or ())
        # the pieces are the wanted blocks, then the wanted packs, in order
        nblocks = len(self.want["blocks"])
        if len(pieces) != nblocks + len(self.want["packs"]):
            raise wire.WireError(f"the primary sent {len(pieces)} blocks and packs, "
                                 f"{nblocks + len(self.want['packs'])} were wanted")
        self.blocks = dict(zip(map(bytes, self.want["blocks"]), pieces[:nblocks], strict=True))
        self.packs = dict(zip(map(int, self.want["packs"]), pieces[nblocks:], strict=True))

    def wanted(self) -> list[object]:
        """What was wanted for it (the replica's ``inflight`` keys)."""
        return [*self.want["blocks"], *(("p", p) for p in self.want["packs"])]

    def size(self) -> int:
        return sum(map(len, self.blocks.values())) + sum(map(len, self.packs.values())) + \
            sum(len(raw) for _, raw in self.records) + \
            sum(len(k) + len(v) for k, v in (self.base or {}).get("items", []))

    def check(self, limit: int) -> None:
        """WireError unless each block and pack is what its hash says (and decodes to
        at most ``limit`` bytes, the block size)."""
        try:  # never keep a block that is not what it claims
            for digest, stored in self.blocks.items():
                codec.check(stored, digest, limit)
            for pack, stored in self.packs.items():
                codec.decode_pack(stored, pack, limit)
        except Corrupt as exc:
            raise wire.WireError(f"received a damaged block: {exc}") from None

    def apply(self, txn: Any, store: Store, acked: int) -> int:
        """Write it in ``txn``; the seq the replica is at after it. WireError (and
        nothing of it kept: the caller's transaction aborts) if it cannot be applied."""
        try:
            return self._apply(txn, store, acked)
        except (lmdb.BadValsizeError, KeyError, TypeError, ValueError,
                msgpack.UnpackException) as exc:
            raise wire.WireError(f"a batch that cannot be applied arrived: "
                                 f"{type(exc).__name__}: {exc}") from None

    def _apply(self, txn: Any, store: Store, acked: int) -> int:
        # had when offered: still here (prune)? A stream's: sent before, or here?
        gone = ("is neither in the stream nor in this store" if self.gaps else
                "went away since it was offered (pruned meanwhile): the batch is sent again")
        for digest in self.offer["blocks"]:
            if digest not in self.blocks and not blocks.has(store, txn, digest):
                raise wire.WireError(f"block {bytes(digest).hex()} {gone}")
        for pack in self.offer["packs"]:
            if pack not in self.packs and not blocks.has_pack(store, txn, pack):
                raise wire.WireError(f"pack {pack} {gone}")
        for digest, stored in self.blocks.items():
            blocks.put(store, txn, digest, stored)
        for pack, stored in self.packs.items():
            blocks.put_pack(store, txn, pack, stored)
        if self.base is not None:  # a piece of a full resync: table entries as they are
            if self.base.get("table") not in BASE_TABLES:
                raise wire.WireError(f"full resync of unknown table {self.base.get('table')!r}")
            entries.put(store, txn, self.base["table"], self.base["items"])
        records = []
        for seq, raw in self.records:
            if seq != acked + 1 and not (self.gaps and seq > acked):
                raise wire.WireError(f"record #{seq} out of order (this store is at #{acked})")
            records.append(journal.Record.unpack(seq, raw))
            acked = seq
        journal.apply(store, txn, records, [raw for _, raw in self.records])
        for rec in records:
            if rec.seq in self.unindexed:
                journal.unindex(store, txn, rec.seq, rec.ts)
        return acked


class Receiver:
    """A replica store receiving from one primary at a time.

    Attributes:
        path: the replica store directory.
        store: the open store (None until the first primary created it).
        store_ready: set once ``store`` is there (opened, or created by a primary).
        counters: records applied and bytes received are counted here.
        on_applied: called (trio thread) after each commit of received records.
        on_fetch: serves a FETCH (a rebuild asking for a send stream of the store);
            None: FETCH is refused.
    """

    def __init__(self, path: Path, counters: Counters | None = None, *,
                 failback: bool = False) -> None:
        self.path = Path(path)
        self.failback = failback  # keep and take out records a parted history wrote
        self.diverged: list[Path] = []  # the copies made of them
        self.counters = counters or Counters()
        self.store_ready = trio.Event()
        self.on_applied: Callable[[], None] | None = None
        self.on_fetch: Fetch | None = None
        self.store: Store | None = None
        if is_store(self.path):
            self.store = Store(path)
            try:
                self.store.lock("replica serve")
            except BaseException:
                self.store.close()
                raise
            self.store_ready.set()
        self._one = trio.Lock()
        self._session: trio.CancelScope | None = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _open(self, hello: dict[str, Any]) -> Store:
        if self.store is None:
            self.store = Store.create(self.path, block_size=int(hello["block_size"]),
                                      volume_uuid=str(hello["uuid"]))
            with self.store.txn(write=True) as txn:  # a live mount refuses it (see volume)
                self.store.set_config(txn, "role", ROLE_REPLICA)
            self.store.lock("replica serve")
            log.info("created replica store %s of volume %s", self.path, hello["uuid"])
            trio.from_thread.run_sync(self.store_ready.set)
        if self.store.uuid != hello["uuid"]:
            raise CdpfsError(f"this replica holds volume {self.store.uuid}, not {hello['uuid']}")
        if self.store.block_size != int(hello["block_size"]):
            raise CdpfsError("block size differs from the primary's")
        self._follow(self.store, [(int(e), int(s)) for e, s in hello.get("epochs") or [[0, 1]]])
        return self.store

    def _follow(self, store: Store, line: epochs.Lineage) -> None:
        """Take the primary's lineage, unless it is of an older epoch than one this
        store has seen (a primary that lost its role) or says this store's newest
        record was written in another epoch than the one this store wrote it in:
        then the histories parted, and unless ``failback`` allows it (a node of a
        cluster rejoining), the primary is refused. With it, what this store wrote
        after the fork is kept in a copy and taken out (``history.diverged``), and
        the primary resumes after the fork."""
        if not epochs.valid(line):
            raise wire.WireError("HELLO with a lineage whose epochs do not rise")
        with store.txn() as txn:
            stale = _stale(line, epochs.seen(store, txn))
            mine = epochs.lineage(store, txn)
            top = journal.last(store, txn)[0]
        if stale:
            raise CdpfsError(stale)
        if top and epochs.epoch_of(mine, top) != epochs.epoch_of(line, top):
            shared = epochs.fork(mine, line, top)
            if not self.failback:
                raise CdpfsError(f"history parted after #{shared}: this replica's records "
                                 f"up to #{top} were written in epoch "
                                 f"{epochs.epoch_of(mine, top)}, the primary's in epoch "
                                 f"{epochs.epoch_of(line, top)}")
            self.diverged.append(keep_and_truncate(store, shared)[0])
        with store.txn(write=True) as txn:
            epochs.follow(store, txn, line)

    def _stale(self, hello: dict[str, Any]) -> str:
        """Why a HELLO comes from a primary that lost its role ("" if it does not)."""
        line = hello.get("epochs") or [[0, 1]]
        if self.store is None or not epochs.valid(line):
            return ""
        with self.store.txn() as txn:
            return _stale(line, epochs.seen(self.store, txn))

    def position(self) -> tuple[int, bool, bytes]:
        """(acknowledged seq, whether a full resync was cut short, the check of the
        record at that seq: the primary compares it with its own)."""
        assert self.store is not None
        with self.store.txn() as txn:
            if self.store.meta(txn, BASE_PENDING) is not None:
                return 0, True, b""
            seq = journal.last(self.store, txn)[0]
            return seq, False, record_check(txn, self.store, seq)

    @staticmethod
    def _bookmarks(store: Store, marks: dict[str, list[int]]) -> None:
        with store.txn(write=True) as txn:
            changed = bookmarks.mirror(store, txn, marks)
        if changed:
            log.info("bookmarks now as on the primary (%d changed)", changed)

    def _base_mark(self, store: Store, msg: dict[str, Any]) -> int:
        """Begin a full resync or end one (its seq).

        The entries of a resync are laid over what the replica has, nothing is
        cleared: versioned keys never change once written (``key + inv(seq)``
        holds one value in every store of the volume), and both stores hold
        versions of one history (the lineage was checked), each side keeping
        what its own kept points need. So every point either side kept reads
        the same in the union, and the replica's older history, its bookmarks,
        DR tests' ``tested-*`` points and the points its clones read all stay."""
        with store.txn(write=True) as txn:
            if msg.get("begin"):
                store.set_meta(txn, BASE_PENDING, U64.pack(int(msg["seq"])))
                log.info("full resync to #%d begins: the primary's history is laid over "
                         "this replica's", msg["seq"])
                return 0
            if store.meta(txn, BASE_PENDING) is None:
                raise wire.WireError("end of a full resync that never began")
            store.set_meta(txn, BASE_PENDING, None)
            log.info("full resync to #%d done", msg["seq"])
            return int(msg["seq"])

    async def handle(self, conn: wire.Connection, peer: str) -> None:
        """Serve one connected primary until it goes away (or one FETCH)."""
        kind, hello = await conn.recv(wire.HELLO, wire.FETCH)
        if kind == wire.FETCH:
            await self._fetch(conn, peer, hello)
            return
        if hello.get("proto") != PROTOCOL:
            await conn.send(wire.ERROR, {"message": f"protocol {hello.get('proto')} unsupported"})
            return
        if not isinstance(hello.get("uuid"), str) or not isinstance(hello.get("block_size"), int):
            raise wire.WireError("HELLO without the volume's uuid and block size")
        if self.store is not None and self.store.uuid != hello.get("uuid"):
            log.warning("%s: refused: this replica holds volume %s, not %s", peer,
                        self.store.uuid, hello.get("uuid"))
            await conn.send(wire.ERROR, {"message": f"this replica holds volume "
                                                    f"{self.store.uuid}, not {hello.get('uuid')}"})
            return
        stale = self._stale(hello)
        if stale:  # checked before it can replace the session of the primary of now
            log.warning("%s: refused: %s", peer, stale)
            await conn.send(wire.ERROR, {"message": stale})
            return
        if self._session is not None:  # a reconnect: the old link is dead or dying
            log.info("%s: replaces the connection of the previous primary session", peer)
            self._session.cancel()
        async with self._one:
            scope = self._session = trio.CancelScope()
            try:
                with scope:
                    await self._receive(conn, peer, hello)
            finally:
                if self._session is scope:
                    self._session = None

    async def _fetch(self, conn: wire.Connection, peer: str, fetch: dict[str, Any]) -> None:
        """A rebuild asks for a send stream of this store: refused (ERROR, one line)
        unless it speaks this protocol, expects this volume, and the store is whole
        (it exists, and no full resync is half laid over it); then ``on_fetch``
        answers, beside the primary's session."""
        why = ""
        if fetch["proto"] != PROTOCOL:
            why = f"protocol {fetch['proto']} unsupported (this replica speaks {PROTOCOL})"
        elif self.on_fetch is None:
            why = "this server does not serve send streams"
        elif self.store is None:
            why = "this replica holds no volume yet (no primary has shipped to it)"
        elif fetch.get("uuid") not in (None, self.store.uuid):
            why = f"this replica holds volume {self.store.uuid}, not {fetch['uuid']}"
        elif (await trio.to_thread.run_sync(self.position))[1]:
            why = ("a full resync is under way on this replica: its store is not whole "
                   "until it is done")
        if why:
            log.warning("%s: send stream refused: %s", peer, why)
            await conn.send(wire.ERROR, {"message": why})
            return
        assert self.on_fetch is not None and self.store is not None
        await self.on_fetch(self.store, conn, fetch, peer)

    async def _receive(self, conn: wire.Connection, peer: str, hello: dict[str, Any]) -> None:
        """One primary session: batches in, acknowledgements out."""
        try:
            store = await trio.to_thread.run_sync(self._open, hello)
        except CdpfsError as exc:
            log.warning("%s: refused: %s", peer, exc)
            await conn.send(wire.ERROR, {"message": str(exc)})
            return
        acked, pending, check = await trio.to_thread.run_sync(self.position)
        log.info("%s (%s) connected; resuming after #%d%s", peer, hello.get("name"), acked,
                 " (a full resync was cut: it starts again)" if pending else "")
        await conn.send(wire.WELCOME, {"acked": acked, "uuid": store.uuid,
                                       "base_pending": pending, "check": check})
        # Receiving and applying overlap: offers are answered and batches received
        # while the ones before are verified and committed (those waiting are
        # committed together); acknowledgements go out in order.
        lock = trio.Lock()
        inflight: dict[object, int] = {}  # blocks and ("p", pack) wanted, not applied yet
        offers: deque[tuple[dict[str, Any], dict[str, Any]]] = deque()  # (offer, want)
        send_q, recv_q = trio.open_memory_channel[Incoming](PIPELINE)

        async def reply(kind: int, body: Any) -> None:
            async with lock:
                await conn.send(kind, body)

        async def applier() -> None:
            nonlocal acked
            counted = 0  # bytes of this connection counted in counters.bytes_received
            async for first in recv_q:
                group = [first]  # group commit: batches that arrived meanwhile go along
                while first.control is None and len(group) < GROUP_MAX:
                    try:
                        group.append(recv_q.receive_nowait())
                    except trio.WouldBlock:
                        break
                    if group[-1].control is not None:
                        break
                control = group.pop().control if group[-1].control is not None else None
                if group:
                    ends = await trio.to_thread.run_sync(self._apply, store, acked, group)
                    for item in group:
                        for key in item.wanted():
                            left = inflight.pop(key, 1) - 1
                            if left:
                                inflight[key] = left
                    self.counters.bytes_received += conn.received - counted
                    counted = conn.received
                    acked = ends[-1]
                    for seq in ends:
                        await reply(wire.ACK, {"seq": seq})
                    if self.on_applied is not None:
                        self.on_applied()
                if control is not None and control[0] == wire.BASE:
                    acked = await trio.to_thread.run_sync(self._base_mark, store, control[1])
                    await reply(wire.ACK, {"seq": acked})
                elif control is not None:
                    await trio.to_thread.run_sync(self._bookmarks, store, control[1])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(applier)
                await self._frames(conn, store, inflight, offers, send_q, reply)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _frames(self, conn: wire.Connection, store: Store, inflight: dict[object, int],
                      offers: deque[tuple[dict[str, Any], dict[str, Any]]],
                      send_q: trio.MemorySendChannel[Incoming], reply: Any) -> None:
        """Take frames from the primary: answer offers and keepalives, queue batches
        for the applier."""
        while True:
            kind, body, pieces = await conn.recv_frame(wire.OFFER, wire.DATA, wire.BASE,
                                                       wire.MARKS, wire.PING)
            if kind == wire.PING:  # answered at once: the primary times the silence
                await reply(wire.PONG, {"id": body["id"]})
            elif kind in (wire.BASE, wire.MARKS):  # a full resync's start or end; bookmarks
                await send_q.send(Incoming(control=(kind, body)))
            elif kind == wire.OFFER:
                want = await trio.to_thread.run_sync(self._missing, store, body)
                want = {"blocks": [h for h in want["blocks"] if h not in inflight],
                        "packs": [p for p in want["packs"] if ("p", p) not in inflight]}
                for key in (*want["blocks"], *(("p", p) for p in want["packs"])):
                    inflight[key] = inflight.get(key, 0) + 1
                offers.append((body, want))
                await reply(wire.WANT, want)
            else:
                if not offers:
                    raise wire.WireError("DATA frame without an offer before it")
                offer, want = offers.popleft()
                await send_q.send(Incoming(offer, want, body, pieces))

    @staticmethod
    def _missing(store: Store, offer: dict[str, Any]) -> dict[str, Any]:
        with store.txn() as txn:
            want = [h for h in offer["blocks"] if not blocks.has(store, txn, h)]
            packs = [p for p in offer["packs"] if not blocks.has_pack(store, txn, p)]
        return {"blocks": want, "packs": packs}

    def _apply(self, store: Store, acked: int, group: list[Incoming]) -> list[int]:
        """Verify and commit batches in one synced transaction; the seq each ends at."""
        for item in group:
            item.check(store.block_size)

        store.grow_if_needed(2 * sum(item.size() for item in group) + (64 << 20))
        marks = []
        with store.txn(write=True) as txn:
            for item in group:
                acked = item.apply(txn, store, acked)
                marks.append(acked)
        self.counters.records_applied += sum(len(item.records) for item in group)
        return marks

    async def listen(self, address: str, ctx: ssl.SSLContext, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept primaries on ``address`` (HOST:PORT; TLS with ``ctx``) until
        cancelled; started once listening."""
        host, port = parse_address(address)
        listeners = await trio.open_tcp_listeners(port, host=host)
        log.info("replica %s listening on %s", self.path, address)
        task_status.started()
        await trio.serve_listeners(functools.partial(self._connected, ctx=ctx), listeners)

    async def _connected(self, stream: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        """One connection: the TLS handshake, then a primary's session."""
        peer = _peer(stream)
        tls = wire.tls_stream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.warning("%s: refused TLS connection: %s", peer, root_cause(exc))
            await trio.aclose_forcefully(stream)
            return
        try:
            await self.serve_connection(wire.Connection(tls), peer)
        finally:
            await trio.aclose_forcefully(tls)

    async def serve_connection(self, conn: wire.Connection, peer: str) -> None:
        """Serve one connected primary; whatever goes wrong costs this connection only."""
        try:
            await self.handle(conn, peer)
        except wire.Closed:
            log.info("%s: disconnected", peer)
        except (wire.WireError, wire.PeerError, trio.BrokenResourceError,
                trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.warning("%s: connection dropped: %s", peer, root_cause(exc))
        except CdpfsError as exc:
            log.error("%s: %s", peer, exc)
        except Exception as exc:  # a bug: it costs this connection, not the server
            log.error("%s: internal error, connection dropped: %s", peer, root_cause(exc))
            log.debug("the internal error", exc_info=True)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _stale(line: Sequence[Sequence[int]], newest: int) -> str:
    if line[-1][0] >= newest:
        return ""
    return (f"a primary of epoch {line[-1][0]} is refused: this replica has seen epoch "
            f"{newest} (a newer primary exists)")
