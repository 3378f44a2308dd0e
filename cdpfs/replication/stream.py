"""Send streams: any stretch of a volume's history written to a file or a pipe, and
received into a store, in the replication protocol's frames.

A stream is frames as ``wire`` makes them, one after the other (docs/architecture.md,
Send streams): a ``STREAM`` head naming the volume (uuid, block size, lineage) and
the stretch (``from`` and its record's check, ``to`` and its time; ``after`` when
it resumes an interrupted receive), then ``DATA`` frames holding journal records
with the blocks and packs they reference that the stream has not carried yet
(named by ``blocks`` and ``packs``, as stored: compressed, checked against their
hash on arrival), a ``MARKS`` frame with the bookmarks of the points it carries,
and an ``END`` frame counting what came before it and chaining every frame's
check, so a stream cut short, damaged anywhere, spliced or reordered is refused.

What the records carry: every record of the journal between the two points, so
every kept point between them is a point of the received store too (``zfs send
-I``); records prune thinned (no time resolves to them) are named in
``unindexed`` and carry only the versions the sender still holds. With ``ends``
the stretch collapses to its two ends: only the versions that are the newest at
``to`` are sent (each in its record, the others left out), and ``to`` alone is a
point. The record of a point always goes as stored, so its check is the same on
both sides and a later stream can start from it.

``receive`` applies the frames through the replica's own ``Incoming`` and
``journal.apply`` (the one writer of records), a frame per synced transaction,
and keeps what it applied when a stream breaks off: the store's meta then says
which stream it was receiving and where it is (``PARTIAL``), and ``token`` makes
a resume token of it that ``plan(resume=...)`` checks against the sender's own
history and continues from. A token is a checksummed description, not a secret:
a forged one names a record the sender does not hold as named, and is refused.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lmdb
import msgpack
import trio

from ..errors import CdpfsError, NoSpace, StoreError, first_error
from ..history import bookmarks
from ..history.points import point_name, resolve
from ..history.treehash import tree_hash
from ..store import codec, epochs, journal
from ..store.lmdb import Store, is_store
from ..store.refs import Refs
from ..store.schema import RECEIVING
from . import messages, wire
from .batches import BATCH_BYTES, BATCH_RECORDS, data_frame
from .receiver import ROLE_REPLICA, Incoming

log = logging.getLogger(__name__)

FORMAT = 1  # of the stream; a receiver refuses a newer one
PARTIAL = RECEIVING  # meta, while a receive is incomplete: [identity, applied]
TOKEN_PREFIX = "cdpfs-resume-"
ROOM = 16 << 20  # bytes of disk kept free beyond twice a batch (LMDB's copy-on-write)
_TOKEN_CHECK = 8

Progress = Callable[[int], None]


class StreamError(CdpfsError):
    """A stream that cannot be sent or received (one line); ``token`` is set when
    the target kept a partial receive that ``send --resume`` continues."""

    def __init__(self, message: str, token: str = "") -> None:
        super().__init__(message)
        self.token = token


@dataclass(frozen=True, slots=True)
class Identity:
    """Which stream: the volume and the stretch of its history (what a resume token
    and a partial receive name)."""

    uuid: str
    from_seq: int
    from_check: bytes
    to_seq: int
    to_ts: int
    ends: bool

    def pack(self) -> list[Any]:
        return [self.uuid, self.from_seq, self.from_check, self.to_seq, self.to_ts, self.ends]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Identity:
        uuid, from_seq, from_check, to_seq, to_ts, ends = raw
        return cls(str(uuid), int(from_seq), bytes(from_check), int(to_seq), int(to_ts),
                   bool(ends))


@dataclass(slots=True)
class Plan:
    """What a send sends: the stream's identity, and where it starts (``after``,
    with the check of that record as the stream carries it, when resuming)."""

    ident: Identity
    after: int = 0
    after_check: bytes = b""
    from_ts: int = 0
    tree: bool = False  # the END carries the tree hash at ``to`` (the receiver checks it)


@dataclass(slots=True)
class Result:
    """What a send wrote or a receive applied."""

    to_seq: int = 0
    tree: str = ""  # the tree hash at ``to``, when the stream carried it (checked)
    records: int = 0
    pieces: int = 0
    bytes: int = 0
    created: bool = False
    marks: int = 0


# --- resume tokens ------------------------------------------------------------------------


def make_token(ident: Identity, after: int, after_check: bytes) -> str:
    body = msgpack.packb([FORMAT, *ident.pack(), after, after_check], use_bin_type=True)
    raw = body + codec.digest(body)[:_TOKEN_CHECK]
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(text: str) -> tuple[Identity, int, bytes]:
    """(identity, after, after's check) of a resume token; StreamError if it is not
    one this version made (mistyped, cut, made up)."""
    bad = StreamError(f"{text[:40]!r}: not a resume token (damaged, cut short or made up)")
    if not text.startswith(TOKEN_PREFIX):
        raise bad
    try:
        b64 = text[len(TOKEN_PREFIX):]
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        body, check = raw[:-_TOKEN_CHECK], raw[-_TOKEN_CHECK:]
        if len(raw) <= _TOKEN_CHECK or codec.digest(body)[:_TOKEN_CHECK] != check:
            raise bad
        fmt, *rest = msgpack.unpackb(body, raw=False)
        if fmt != FORMAT or len(rest) != 8:
            raise bad
        return Identity.unpack(rest[:6]), int(rest[6]), bytes(rest[7])
    except (ValueError, TypeError, msgpack.UnpackException):
        raise bad from None


def pending(path: Path) -> str:
    """The resume token of the store at ``path``'s interrupted receive ("" if none)."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        return token_of(store, txn)


def token_of(store: Store, txn: lmdb.Transaction) -> str:
    """The resume token of ``store``'s interrupted receive ("" if none)."""
    raw = store.meta(txn, PARTIAL)
    if raw is None:
        return ""
    ident, _ = msgpack.unpackb(raw, raw=False)
    top = journal.top(store, txn)
    return make_token(Identity.unpack(ident), top, journal.check(store, txn, top))


# --- sending ------------------------------------------------------------------------------


def plan(store: Store, *, start: str | None = None, end: str | None = None,
         ends: bool = False, resume: str | None = None, tree: bool | None = None) -> Plan:
    """What to send from ``store``: the points moments ``start`` (None: a full stream)
    and ``end`` (None: the newest record) name, or what the resume token ``resume``
    names, checked against this store (StreamError, one line, otherwise). ``tree``:
    whether the stream ends with the tree hash at ``to`` for the receiver to check
    (it reads the whole volume at ``to`` once more; by default only a full stream's)."""
    p = _plan(store, start, end, ends, resume)
    p.tree = not p.ident.from_seq if tree is None else tree
    return p


def _plan(store: Store, start: str | None, end: str | None, ends: bool,
          resume: str | None) -> Plan:
    if store.clone_of is not None:
        raise StreamError(f"{store.path} is a clone: a clone cannot be sent (send its "
                          "base, or copy the files out with export)")
    with store.txn() as txn:
        if resume is not None:
            ident, after, after_check = read_token(resume)
            if ident.uuid != store.uuid:
                raise StreamError(f"the resume token is of volume {ident.uuid}, this store "
                                  f"holds {store.uuid}")
            if journal.ts(store, txn, ident.to_seq) != ident.to_ts or (
                    ident.from_seq and
                    journal.check(store, txn, ident.from_seq) != ident.from_check):
                raise StreamError("the resume token names points this store no longer holds "
                                  f"as they were (#{ident.from_seq} to #{ident.to_seq}): send "
                                  "the stretch again from a point the target has")
            if not ident.from_seq <= after <= ident.to_seq:
                raise StreamError("the resume token names a position outside its stretch")
            return Plan(ident, after, after_check, journal.ts(store, txn, ident.from_seq) or 0)
        to = resolve(store, txn, end or "now")
        if start is None:
            return Plan(Identity(store.uuid, 0, b"", to.seq, to.ts, ends))
        frm = resolve(store, txn, start)
        if frm.seq >= to.seq:
            raise StreamError(f"--from {start} (#{frm.seq}) is not older than --to "
                              f"{end or 'now'} (#{to.seq}): nothing to send")
        return Plan(Identity(store.uuid, frm.seq, journal.check(store, txn, frm.seq),
                             to.seq, to.ts, ends), from_ts=frm.ts)


async def send(store: Store, conn: wire.Connection, p: Plan,
               progress: Progress | None = None) -> Result:
    """Write the stream ``p`` plans to ``conn``, holding its points meanwhile (a live
    store may be written and pruned while it is read: each batch is read in a short
    transaction of its own)."""
    ident = p.ident
    with bookmarks.holding(store, (ident.from_seq, ident.to_seq, p.after), "send"):
        reader = _Reader(store, p)
        await trio.to_thread.run_sync(reader.prepare)
        with store.txn() as txn:
            line = epochs.lineage(store, txn)
        head: dict[str, Any] = {
            "format": FORMAT, "uuid": ident.uuid, "block_size": store.block_size,
            "epochs": [list(x) for x in line],
            "from": ident.from_seq, "from_check": ident.from_check, "from_ts": p.from_ts,
            "to": ident.to_seq, "to_ts": ident.to_ts, "ends": ident.ends,
            "created_ns": time.time_ns()}
        if p.after:
            head.update(after=p.after, after_check=p.after_check)
        result = Result(ident.to_seq)
        result.bytes += await conn.send(wire.STREAM, head)
        batches_in, batches = trio.open_memory_channel[tuple[list[wire.Part], int, int]](2)

        async def load() -> None:  # reads the next batch while one is written
            async with batches_in:
                while True:
                    batch = await trio.to_thread.run_sync(reader.batch)
                    if batch is None:
                        return
                    await batches_in.send(batch)

        async def hash_tree() -> None:  # while the frames go: its reads are the same
            result.tree = await _hash_in_thread(store, ident.to_seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            if p.tree:
                nursery.start_soon(hash_tree)
            async for parts, nrecords, npieces in batches:
                size = await conn.send_frame(parts)
                result.bytes += size
                result.records += nrecords
                result.pieces += npieces
                if progress is not None:
                    progress(size)
        marks = await trio.to_thread.run_sync(reader.marks)
        result.marks = len(marks)
        result.bytes += await conn.send(wire.MARKS, marks)
        end: dict[str, Any] = {"records": result.records, "pieces": result.pieces,
                               "chain": conn.chain()}
        if p.tree:
            end["tree"] = result.tree
        result.bytes += await conn.send(wire.END, end)
    return result


class _Reader:
    """Reads the records and blocks of a planned stream, a batch at a time (each in a
    read transaction of its own), as the stream carries them."""

    def __init__(self, store: Store, p: Plan) -> None:
        self.store = store
        self.plan = p
        self.at = p.after or p.ident.from_seq
        self.sent: set[bytes] = set()
        self.sent_packs: set[int] = set()
        self.newest: dict[tuple[int, bytes], int] | None = None

    def prepare(self) -> None:
        """With ``ends``: which record holds each key's version newest at ``to``. When
        resuming: the record the target is at must be the one this stream carries."""
        ident = self.plan.ident
        if ident.ends:
            newest: dict[tuple[int, bytes], int] = {}
            with self.store.txn() as txn:
                for rec, _ in self._records(txn, ident.from_seq):
                    for table, prefix, _ in rec.changes:
                        newest[(table, prefix)] = rec.seq
            self.newest = newest
        if self.plan.after and self.plan.after != ident.from_seq:
            with self.store.txn() as txn:
                rec = journal.get(self.store, txn, self.plan.after)
                carried = None if rec is None else self._as_carried(txn, rec, None)
            if carried is None or codec.digest(carried[1])[:16] != self.plan.after_check:
                raise StreamError(f"the resume token names record #{self.plan.after} as this "
                                  "store does not hold it (made up, or another store's): "
                                  "nothing was sent")

    def _records(self, txn: lmdb.Transaction, after: int,
                 ) -> Iterator[tuple[journal.Record, bytes]]:
        """(record, as stored) of each record after ``after`` up to ``to``."""
        for seq, raw in journal.packed(self.store, txn, after + 1):
            if seq > self.plan.ident.to_seq:
                return
            yield journal.Record.unpack(seq, raw), raw

    def _as_carried(self, txn: lmdb.Transaction, rec: journal.Record, raw: bytes | None,
                    ) -> tuple[journal.Record, bytes, bool] | None:
        """(the record as the stream carries it, packed, whether a point) or None
        when the stream leaves it out; ``raw``: the record as stored, if read."""
        ident = self.plan.ident
        kept = journal.kept(self.store, txn, rec)
        if self.newest is not None:
            point = rec.seq == ident.to_seq
            changes = [c for c in kept.changes if self.newest.get((c[0], c[1])) == rec.seq]
            if not changes and not point:
                return None
            if len(changes) != len(kept.changes):
                kept = kept._replace(changes=changes)
        else:
            point = journal.indexed(self.store, txn, rec.seq, rec.ts)
        if kept is not rec:
            raw = kept.pack()
        elif raw is None:
            raw = journal.raw(self.store, txn, rec.seq)
        if raw is None:
            raise StreamError(f"record #{rec.seq} went away while it was sent")
        return kept, raw, point

    def batch(self) -> tuple[list[wire.Part], int, int] | None:
        """The next DATA frame (its parts, records and pieces), or None at the end."""
        records: list[list[Any]] = []
        unindexed: list[int] = []
        refs = Refs()
        size = 0
        with self.store.txn() as txn:
            for rec, stored in self._records(txn, self.at):
                self.at = rec.seq
                carried = self._as_carried(txn, rec, stored)
                if carried is None:
                    continue
                kept, raw, point = carried
                records.append([rec.seq, raw])
                if not point:
                    unindexed.append(rec.seq)
                size += len(raw)
                refs.add_record(kept)
                if len(records) >= BATCH_RECORDS or size >= BATCH_BYTES or \
                        len(refs.blocks) * self.store.block_size >= BATCH_BYTES:
                    break
            if not records:
                return None
            want = {"blocks": [h for h in refs.blocks if h not in self.sent],
                    "packs": [p for p in refs.packs if p not in self.sent_packs]}
            body: dict[str, Any] = {"records": records, **want}
            if unindexed:
                body["unindexed"] = unindexed
            parts = _data_frame(self.store, txn, want, body)
        self.sent.update(want["blocks"])
        self.sent_packs.update(want["packs"])
        return parts, len(records), len(want["blocks"]) + len(want["packs"])

    def marks(self) -> dict[str, list[int]]:
        """The bookmarks of points the stream carries (``to`` alone with ``ends``)."""
        ident = self.plan.ident
        with self.store.txn() as txn:
            return {b.name: [b.seq, b.created_ns]
                    for b in bookmarks.bookmarks(self.store, txn)
                    if ident.from_seq < b.seq <= ident.to_seq and
                    (b.seq == ident.to_seq if ident.ends else
                     journal.indexed(self.store, txn, b.seq, journal.ts(self.store, txn, b.seq)
                                     or 0))}


def _data_frame(store: Store, txn: lmdb.Transaction, want: dict[str, list[Any]],
                body: dict[str, Any]) -> list[wire.Part]:
    """The replication's DATA frame of ``body``, its pieces as stored."""
    try:
        return data_frame(store, txn, want, body)
    except CdpfsError as exc:
        raise StreamError(f"{store.path}: {exc} (run cdpfs verify)") from None


def send_file(path: Path, out: BinaryIO, *, progress: Progress | None = None,
              **options: Any) -> Result:
    """Send from the store at ``path`` to the binary file ``out`` (a pipe, a file):
    ``options`` as ``plan`` takes them."""
    with Store(path) as store:
        return send_store(store, out, plan(store, **options), progress)


def send_store(store: Store, out: BinaryIO, p: Plan, progress: Progress | None = None,
               ) -> Result:
    """Send the stream ``p`` plans from a store open in this process to the binary
    file ``out`` (``send_file``; a backup of a store being served)."""
    async def run() -> Result:
        return await send(store, wire.Connection(wire.FileStream(out)), p, progress)

    return trio.run(run)


def receive_file(path: Path, inp: BinaryIO, *, new_volume: bool = False,
                 progress: Progress | None = None, mark: tuple[bytes, bytes] | None = None,
                 again: bool = False) -> Result:
    """Receive the stream the binary file ``inp`` holds into the store at ``path``
    (``receive``'s options)."""
    async def run() -> Result:
        return await receive(path, wire.Connection(wire.FileStream(inp)),
                             new_volume=new_volume, progress=progress, mark=mark, again=again)

    return trio.run(run)


# --- receiving ----------------------------------------------------------------------------


async def receive(path: Path, conn: wire.Connection, *, new_volume: bool = False,
                  progress: Progress | None = None, mark: tuple[bytes, bytes] | None = None,
                  again: bool = False) -> Result:
    """Receive a stream from ``conn`` into the store at ``path`` (made if missing).
    StreamError (one line) for a stream this store cannot take, before anything is
    written; one that breaks off keeps what was applied and names its resume token.

    ``mark``: a meta entry (key, value) written with the receive's start, in the
    transaction that notes it (a rebuild's: the store it makes says so from its
    first byte). ``again``: the stream is the one this store's interrupted receive
    was taking, read again from its start (a file cannot be sent from a token):
    the records the store applied already are skipped."""
    try:
        _, head = await conn.recv(wire.STREAM)
    except wire.WireError as exc:
        raise StreamError(f"not a cdpfs send stream, or damaged at its start: {exc}") from None
    if head["format"] > FORMAT:
        raise StreamError(f"a stream of format {head['format']}: this cdpfs reads up to "
                          f"format {FORMAT} (upgrade it)")
    target = await trio.to_thread.run_sync(_Target.open, Path(path), head, new_volume, mark,
                                           again)
    try:
        return await target.run(conn, progress)
    except StreamError as exc:
        if target.created and not target.applied:  # nothing arrived: no store is left
            target.discard()
            exc.token = ""
        raise
    finally:
        target.store.close()


class _Target:
    """A store taking one stream: opened (or made), checked against the stream's
    head, and locked against a mount or a replica server meanwhile."""

    def __init__(self, store: Store, head: dict[str, Any], created: bool,
                 there: set[str] | None, mark: tuple[bytes, bytes] | None = None,
                 again: bool = False) -> None:
        self.store = store
        self.mark = mark
        self.again = again  # may skip what an interrupted receive of this stream applied
        self.skip = 0  # records up to this one were applied before: skipped
        self.there = there  # what the target directory held before (None: no directory)
        self.head = head
        self.created = created
        self.ident = Identity(head["uuid"], head["from"], bytes(head.get("from_check") or b""),
                              head["to"], head["to_ts"], head["ends"])
        self.applied = 0

    @classmethod
    def open(cls, path: Path, head: dict[str, Any], new_volume: bool,
             mark: tuple[bytes, bytes] | None = None, again: bool = False) -> _Target:
        start = int(head.get("after") or head["from"])
        there = set(os.listdir(path)) if path.is_dir() else None
        if new_volume and start:
            raise StreamError("--new-volume takes a full stream (sent without --from)")
        if not is_store(path):
            if start:
                raise StreamError(
                    f"{path} is not a store, and this stream continues the history from "
                    f"#{start} ({_when(head, start)}): receive it into the store that has that "
                    "point, or send a full stream (no --from)")
            store = Store.create(path, block_size=int(head["block_size"]),
                                 volume_uuid=None if new_volume else str(head["uuid"]))
            created = True
        else:
            if new_volume:
                raise StreamError(f"{path} exists: --new-volume makes a new store")
            store = Store(path)
            created = False
        target = cls(store, head, created, there, mark, again)
        try:
            store.lock("receive")
            target._check(new_volume)
        except BaseException:
            if created:  # refused before anything arrived: leave the path as it was
                target.discard()
            store.close()
            raise
        return target

    def discard(self) -> None:
        """Take away the store this receive made (nothing arrived into it)."""
        path = self.store.path
        self.store.close()
        for name in set(os.listdir(path)) - (self.there or set()):
            (path / name).unlink()
        if self.there is None:
            path.rmdir()

    def _check(self, new_volume: bool) -> None:
        """StreamError unless this store can take the stream as it starts; then note
        the receive under way (``PARTIAL``)."""
        store, head, ident = self.store, self.head, self.ident
        if store.clone_of is not None:
            raise StreamError(f"{store.path} is a clone: a stream cannot be received into it")
        if not new_volume and store.uuid != ident.uuid:
            raise StreamError(f"{store.path} holds volume {store.uuid}; the stream is of "
                              f"volume {ident.uuid} (--new-volume receives a full stream "
                              "into a new store as a volume of its own)")
        if store.block_size != int(head["block_size"]):
            raise StreamError(f"{store.path} has blocks of {store.block_size} bytes, the "
                              f"stream's volume of {head['block_size']}")
        line = [(int(e), int(s)) for e, s in head["epochs"]] or [(0, 1)]
        if not epochs.valid(line):
            raise StreamError("the stream's lineage is damaged (its epochs do not rise)")
        with store.txn(write=True) as txn:
            top = journal.top(store, txn)
            partial = store.meta(txn, PARTIAL)
            mine = None if partial is None else Identity.unpack(
                msgpack.unpackb(partial, raw=False)[0])
            after = int(head.get("after") or 0)
            if after:
                if mine != ident or top != after or \
                        journal.check(store, txn, top) != bytes(head.get("after_check") or b""):
                    raise StreamError(f"{store.path}: this stream resumes a receive this "
                                      "store is not in the middle of (a token of another "
                                      "store or stream)")
            elif self.again and mine == ident:
                self.skip = top  # the same stream again: from where it was cut
            elif partial is not None and not (top == ident.from_seq and mine == ident):
                raise StreamError(f"{store.path} is in the middle of another receive: resume "
                                  f"it with 'cdpfs send --resume {token_of(store, txn)}'")
            elif not ident.from_seq and top:
                raise StreamError(f"{store.path} already holds history (up to #{top}): a full "
                                  "stream is received into a new store, an incremental one "
                                  "(send --from a point this store has) extends it")
            elif ident.from_seq and not _is_point(store, txn, ident.from_seq, ident.from_check):
                raise StreamError(f"{store.path} lacks the point the stream starts from, "
                                  f"#{ident.from_seq} ({_when(head, ident.from_seq)}): "
                                  "receive the stream that ends there first")
            elif ident.from_seq and top != ident.from_seq:
                raise StreamError(f"{store.path} has records after #{ident.from_seq}, up to "
                                  f"#{top}: send --from #{top} (or a newer point both have)")
            if not new_volume:
                mine_line = epochs.lineage(store, txn)
                if top and epochs.epoch_of(mine_line, top) != epochs.epoch_of(line, top):
                    raise StreamError(f"{store.path}: history parted at or before #{top} (its "
                                      "records there were written in another epoch than the "
                                      "stream's)")
                epochs.follow(store, txn, line)
            if self.created and not new_volume:  # a copy: takes increments, like a replica
                store.set_config(txn, "role", ROLE_REPLICA)
            self.applied = after or self.skip or ident.from_seq
            store.set_meta(txn, PARTIAL, msgpack.packb([ident.pack(), self.applied],
                                                       use_bin_type=True))
            if self.mark is not None:
                store.set_meta(txn, *self.mark)

    async def run(self, conn: wire.Connection, progress: Progress | None) -> Result:
        result = Result(self.ident.to_seq, created=self.created)
        try:
            try:  # a batch is received and checked while the one before it is applied
                async with trio.open_nursery() as nursery:
                    batches_in, batches = trio.open_memory_channel[Incoming](0)
                    nursery.start_soon(self._applier, batches)
                    async with batches_in:
                        marks, body = await self._frames(conn, batches_in, result, progress)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            if self.applied != self.ident.to_seq:
                raise wire.WireError(f"the stream ended at #{self.applied}, before its "
                                     f"point #{self.ident.to_seq}")
            if body.get("tree"):
                result.tree = await _hash_in_thread(self.store, self.ident.to_seq)
                if result.tree != body["tree"]:
                    raise StreamError(
                        f"the volume received differs from the sender's at #{self.applied} "
                        f"(tree hash {result.tree[:16]}, the sender's {body['tree'][:16]}): "
                        "it is kept as received, marked incomplete; report this")
            result.marks = await trio.to_thread.run_sync(self._finish, marks)
        except (wire.WireError, messages.BadMessage, StoreError, NoSpace, lmdb.Error, OSError,
                ValueError, TypeError, msgpack.UnpackException) as exc:
            raise self._broken(exc) from None
        result.bytes = conn.received
        return result

    async def _applier(self, batches: trio.MemoryReceiveChannel[Incoming]) -> None:
        """Apply the batches in order, each in a synced transaction of its own."""
        async with batches:
            async for batch in batches:
                self.applied = await trio.to_thread.run_sync(self._apply, batch)

    async def _frames(self, conn: wire.Connection,
                      batches: trio.MemorySendChannel[Incoming], result: Result,
                      progress: Progress | None) -> tuple[dict[str, list[int]], dict[str, Any]]:
        """Read the stream's frames up to its END, checking each and handing its batch to
        the applier: (the stream's bookmarks, the END's body)."""
        marks: dict[str, list[int]] = {}
        carried = 0  # records the stream carried, skipped ones too (END counts them)
        while True:
            chain = conn.chain()
            received = conn.received
            kind, body, pieces = await conn.recv_frame(wire.DATA, wire.MARKS, wire.END)
            if progress is not None:
                progress(conn.received - received)
            if kind == wire.END:
                if body["chain"] != chain or body["records"] != carried or \
                        body["pieces"] != result.pieces:
                    raise wire.WireError("the stream's end does not match what came "
                                         "before it (frames lost, repeated or spliced)")
                return marks, body
            if kind == wire.MARKS:
                marks = body
                continue
            if body.get("base") is not None:
                raise wire.WireError("a send stream's DATA frame with table entries")
            refs = Refs()
            records = body.get("records") or []
            for seq, raw in records:
                if seq > self.ident.to_seq:
                    raise wire.WireError(f"record #{seq} is past the stream's end "
                                         f"#{self.ident.to_seq}")
                if seq > self.skip:
                    refs.add_record(journal.Record.unpack(seq, raw))
            if self.skip:  # applied before: its blocks are put again, they are here
                body = {**body, "records": [r for r in records if r[0] > self.skip]}
            batch = Incoming(refs.offer(), {"blocks": body.get("blocks") or [],
                                            "packs": body.get("packs") or []},
                             body, pieces, gaps=True)
            await trio.to_thread.run_sync(batch.check, self.store.block_size)
            await batches.send(batch)
            carried += len(records)
            result.records += len(batch.records)
            result.pieces += len(pieces)

    def _apply(self, batch: Incoming) -> int:
        """Apply ``batch`` durably, with how far the receive got; NoSpace (before
        anything of it is written) when the disk cannot take it."""
        needed = 2 * batch.size() + ROOM
        with self.store.txn() as txn:
            room = self.store.disk_free() + self.store.reusable_bytes(txn)
        if room < needed:
            raise NoSpace(f"no space left for the store ({room >> 20} MiB free on its disk, "
                          f"{needed >> 20} MiB needed for the next part of the stream)")
        self.store.grow_if_needed(needed)
        with self.store.txn(write=True) as txn:
            applied = batch.apply(txn, self.store, self.applied)
            self.store.set_meta(txn, PARTIAL, msgpack.packb([self.ident.pack(), applied],
                                                            use_bin_type=True))
        return applied

    def _finish(self, marks: dict[str, list[int]]) -> int:
        """The stream is all here: its bookmarks, and the receive is no longer partial."""
        named = 0
        with self.store.txn(write=True) as txn:
            for name, (seq, _created) in marks.items():
                ts = journal.ts(self.store, txn, seq)
                if ts is None or not journal.indexed(self.store, txn, seq, ts) or \
                        not bookmarks.valid_name(name):
                    continue
                bookmarks.put(self.store, txn, name, seq, replace=True)
                named += 1
            self.store.set_meta(txn, PARTIAL, None)
        return named

    def _broken(self, exc: BaseException) -> StreamError:
        """The error for a stream that broke off: what was kept, and the token."""
        what = str(exc) or type(exc).__name__
        if isinstance(exc, wire.Closed) or "closed by the peer" in what:
            what = "the stream ended before its last frame (cut short, or the sender stopped)"
        elif isinstance(exc, lmdb.Error):
            free = self.store.disk_free()
            what = (f"no space left for the store ({free >> 20} MiB free on its disk)"
                    if free < 2 * ROOM else f"cannot write the store: {what}")
        try:
            with self.store.txn() as txn:
                token = token_of(self.store, txn)
        except (lmdb.Error, StoreError):
            token = ""
        kept = (f"kept what arrived, up to #{self.applied}" if self.applied
                else "nothing was applied")
        return StreamError(f"receive stopped: {what}; {kept}", token)


def hash_at(store: Store, seq: int, check: Callable[[], None] | None = None) -> str:
    """The tree hash of the volume in ``store`` at ``seq`` (``check``: as
    ``tree_hash`` takes it)."""
    with store.txn() as txn:
        return tree_hash(store, txn, seq, check=check)[0]


async def _hash_in_thread(store: Store, seq: int) -> str:
    """``hash_at`` in a worker thread that stops when the calling task is cancelled
    (a stream cut short does not wait for the whole volume to be hashed)."""
    return await trio.to_thread.run_sync(
        lambda: hash_at(store, seq, check=trio.from_thread.check_cancelled))


def _is_point(store: Store, txn: lmdb.Transaction, seq: int, check: bytes) -> bool:
    """Whether record ``seq`` is here as ``check`` says and a point (a record a
    collapsed stream carried is not: the state there is not whole)."""
    ts = journal.ts(store, txn, seq)
    return ts is not None and journal.indexed(store, txn, seq, ts) and \
        journal.check(store, txn, seq) == check


def _when(head: dict[str, Any], seq: int) -> str:
    """How a point of the stream's head is shown in an error."""
    ts = head.get("from_ts") if seq == head.get("from") else None
    return point_name(ts) if ts else f"#{seq}"
