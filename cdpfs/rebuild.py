"""Rebuilding a lost primary: a replica server's answer to FETCH, and ``rebuild``.

On an empty machine, ``rebuild(STORE, ADDRESS)`` asks a replica server for a send
stream of its store (FETCH, over the replication link and its mutual TLS) and
receives it into STORE; ``rebuild(STORE, FILE)`` receives a send stream from a
file. Either way STORE is then made the volume's primary as ``replica promote``
does (``ha.roles.promote``: role ``live``, a new epoch), and keeps the volume's
identity: its id, its lineage of epochs, its history and bookmarks, so the old
replicas follow it from where they are, without a full resync.

The replica server answers a FETCH (``answer``, the hook the volume service gives
its ``Receiver``) with WELCOME, its newest record, then, unless the FETCH says the
target has that record already, a send stream (``stream.plan``/``stream.send``:
read in short transactions, the points held, beside the primary's session): the
whole history, or the rest of an interrupted receive (its resume token), or what
follows the target's newest record; always with the tree hash at its end, which
the receive checks.

A rebuild survives a kill at any point and is continued by running it again. The
store it makes says so from its first transaction (``REBUILDING`` in the meta,
written with the receive's start): then an interrupted receive is resumed (from
the address with its token; from a file by reading it again and skipping what was
applied), a store that has its stream is caught up to the replica's newest record
and promoted, and a promoted one is only finished. Any other store is refused: a
rebuild never writes over a volume.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .errors import CdpfsError, first_error, root_cause
from .ha import roles
from .replication import credentials, stream, wire
from .replication.protocol import ANSWER_TIMEOUT, PROTOCOL, parse_address
from .replication.receiver import ROLE_REPLICA
from .replication.sender import Connect, tls_connect
from .store import epochs, journal
from .store.lmdb import Store, is_store

log = logging.getLogger(__name__)

REBUILDING = b"rebuild.source"  # meta of a store a rebuild is making: where it comes from
ROUNDS = 10  # increments a rebuild takes at most while its replica still receives records

Progress = Callable[[int], None]


class RebuildError(CdpfsError):
    """A rebuild that cannot go on (one line, saying how to go on)."""


# --- the replica server's side ------------------------------------------------------------


async def answer(store: Store, conn: wire.Connection, fetch: dict[str, Any],
                 peer: str) -> None:
    """Answer a FETCH (the receiver checked the protocol and the volume): WELCOME with
    this store's newest record, then the stream the FETCH asks for, if any. A FETCH
    this store cannot answer gets an ERROR with the reason, one line."""
    try:
        newest, check, plan = await trio.to_thread.run_sync(_plan, store, fetch)
    except CdpfsError as exc:
        log.warning("%s: send stream refused: %s", peer, exc)
        await conn.send(wire.ERROR, {"message": str(exc)})
        return
    await conn.send(wire.WELCOME, {"acked": newest, "uuid": store.uuid,
                                   "base_pending": False, "check": check})
    if plan is None:
        log.info("%s: has every record of this replica (#%d): nothing to send", peer, newest)
        return
    start = plan.after or plan.ident.from_seq
    log.info("%s: sending a stream of this replica's history %s to #%d", peer,
             f"after #{start}" if start else "from the start", plan.ident.to_seq)
    before = conn.sent
    try:
        try:
            sent = await stream.send(store, conn, plan)
        except BaseExceptionGroup as group:  # its reader and writer run in a nursery
            raise first_error(group) from None
    except stream.StreamError as exc:
        if conn.sent != before:  # cut in the middle: the receive says so
            raise
        # refused before its head (a resume token naming a record not as held here)
        log.warning("%s: send stream refused: %s", peer, exc)
        await conn.send(wire.ERROR, {"message": str(exc)})
        return
    log.info("%s: sent %d records, %.1f MiB", peer, sent.records, sent.bytes / 2**20)


def _plan(store: Store, fetch: dict[str, Any]) -> tuple[int, bytes, stream.Plan | None]:
    """(the newest record, its check, the stream to send or None: the target has it)."""
    with store.txn() as txn:
        newest = journal.top(store, txn)
        check = journal.check(store, txn, newest)
        after = int(fetch.get("after") or 0)
        theirs = journal.check(store, txn, after) if after else b""
    tree = bool(fetch.get("tree"))
    if not newest:
        raise stream.StreamError("this replica holds no records yet")
    if fetch.get("resume"):
        return newest, check, stream.plan(store, resume=str(fetch["resume"]), tree=tree)
    if not after:
        return newest, check, stream.plan(store, tree=tree)
    if after > newest:
        raise stream.StreamError(f"the target holds records up to #{after}, this replica only "
                                 f"up to #{newest}: rebuild from the one that has them")
    if theirs != bytes(fetch.get("check") or b""):
        raise stream.StreamError(f"the target's record #{after} is not this replica's: their "
                                 "histories parted")
    if after == newest:
        return newest, check, None
    return newest, check, stream.plan(store, start=f"#{after}", tree=tree)


# --- the rebuilding side ------------------------------------------------------------------


@dataclass(slots=True)
class Rebuilt:
    """What a rebuild made (and what this run of it did)."""

    path: Path
    uuid: str = ""
    to_seq: int = 0  # the newest record: the primary's first new one follows it
    tree: str = ""  # the tree hash there
    checked: bool = False  # ... compared with the sender's by this run
    epoch: int = 0  # the epoch the store is the primary of
    lineage: list[tuple[int, int]] = field(default_factory=list)
    records: int = 0  # records received by this run
    bytes: int = 0  # bytes received by this run
    resumed: int = 0  # where this run took up an interrupted rebuild (0: from nothing)
    finished: bool = False  # the store was promoted already: this run only finished it
    peer: str = ""  # the name the replica server is trusted under (from an address)


@dataclass(slots=True)
class _Found:
    """What the target directory holds: ``new`` (no store), ``partial`` (a receive
    to resume), ``received`` (a rebuild's stream all there, not promoted yet) or
    ``promoted`` (a rebuild promoted, not yet marked done)."""

    kind: str
    uuid: str = ""
    top: int = 0
    check: bytes = b""
    token: str = ""


def _found(path: Path) -> _Found:
    """What ``path`` holds; RebuildError if it is a store no rebuild may touch."""
    if not is_store(path):
        return _Found("new")
    token = stream.pending(path)
    with Store(path, readonly=True) as store, store.txn() as txn:
        if store.clone_of is not None:
            raise RebuildError(f"{path} is a clone: a rebuild makes a store of its own")
        role = store.config(txn, "role") or roles.ROLE_LIVE
        marked = store.meta(txn, REBUILDING) is not None
        top = journal.top(store, txn)
        found = _Found("", store.uuid, top, journal.check(store, txn, top), token)
    if role != ROLE_REPLICA:
        if marked:
            found.kind = "promoted"
            return found
        raise RebuildError(f"{path} holds volume {found.uuid} already (a primary, up to "
                           f"#{top}): a rebuild makes a lost primary again in a new or "
                           "empty directory")
    if token:
        found.kind = "partial"
    elif marked:
        found.kind = "received"
    else:
        raise RebuildError(f"{path} is a replica of volume {found.uuid} (up to #{top}), not "
                           "a rebuild under way: to make it the primary, stop its server "
                           f"and run 'cdpfs replica promote {path}'")
    return found


def rebuild(path: Path, source: str, *, peer: str | None = None,
            progress: Progress | None = None) -> Rebuilt:
    """Make the volume again at ``path`` from ``source``: a send stream's file, or
    the HOST:PORT of a replica server that trusts ``path``'s certificate (``path``
    trusts the server's under ``peer``; by default its one trusted name). Then it is
    the primary. Run again after any interruption, it goes on from where it was."""
    path = Path(path)
    if Path(source).exists():
        return rebuild_file(path, Path(source), progress=progress)
    try:
        parse_address(source)
    except CdpfsError:
        raise RebuildError(f"{source!r}: no such file, and not a HOST:PORT address") from None
    peer, ctx = _context(path, peer)
    out = trio.run(lambda: rebuild_from(path, tls_connect(source, ctx), source,
                                        progress=progress))
    out.peer = peer
    return out


def _context(path: Path, peer: str | None) -> tuple[str, ssl.SSLContext]:
    """TLS for connecting to the replica trusted under ``peer`` (or the one trusted),
    and that name."""
    if peer is None:
        names = credentials.trusted_names(path)
        if len(names) != 1:
            raise RebuildError(
                f"{path} trusts {', '.join(names) or 'no replica yet'}: "
                "give --name NAME, the name the replica's certificate is trusted under "
                f"('cdpfs replica keygen {path}', then 'cdpfs replica trust {path} "
                "REPLICA.crt --name NAME')")
        peer = names[0]
    return peer, credentials.client_context(path, peer)


async def rebuild_from(path: Path, connect: Connect, source: str, *,
                       progress: Progress | None = None) -> Rebuilt:
    """``rebuild`` from the replica server ``connect`` reaches (``source`` names it in
    messages): the whole stream (or the rest of an interrupted one), then what the
    replica received meanwhile, until it has nothing newer; then promoted."""
    found = await trio.to_thread.run_sync(_found, path)
    out = Rebuilt(path, resumed=found.top)
    if found.kind != "promoted":
        for _ in range(ROUNDS):
            if await _round(path, connect, source, found, out, progress):
                break
            found = await trio.to_thread.run_sync(_found, path)
        else:
            raise RebuildError(f"{source} kept receiving new records through {ROUNDS} "
                               "rounds (a primary still ships to it?): stop that primary, then "
                               "run the same command again, it goes on from here")
    return await trio.to_thread.run_sync(_finish, out)


async def _round(path: Path, connect: Connect, source: str, found: _Found, out: Rebuilt,
                 progress: Progress | None) -> bool:
    """One FETCH: whether the replica had nothing newer than the target."""
    fetch: dict[str, Any] = {"proto": PROTOCOL, "tree": True}
    if found.uuid:
        fetch["uuid"] = found.uuid
    if found.token:
        fetch["resume"] = found.token
    elif found.top:
        fetch.update(after=found.top, check=found.check)
    try:
        with trio.fail_after(ANSWER_TIMEOUT):
            link = await connect()
    except (ssl.SSLError, trio.BrokenResourceError) as exc:  # the TLS handshake
        raise RebuildError(f"{source}: cannot connect: {root_cause(exc)}; {_trust(path)}") \
            from None
    except (OSError, trio.TooSlowError) as exc:
        raise RebuildError(f"{source}: cannot connect: {root_cause(exc)}") from None
    try:
        conn = wire.Connection(link)
        try:
            await conn.send(wire.FETCH, fetch)
            with trio.fail_after(ANSWER_TIMEOUT):
                _, welcome = await conn.recv(wire.WELCOME)
        except wire.PeerError as exc:
            raise RebuildError(f"{source} refused: {exc}") from None
        except (wire.WireError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise RebuildError(f"{source}: no answer ({root_cause(exc)}); {_trust(path)}") \
                from None
        if found.top and not found.token and welcome["acked"] == found.top:
            return True
        try:
            got = await stream.receive(path, conn, progress=progress,
                                       mark=(REBUILDING, source.encode()))
        except wire.PeerError as exc:
            raise RebuildError(f"{source} refused: {exc}") from None
        except stream.StreamError as exc:
            raise _stopped(exc) from None
    finally:
        await trio.aclose_forcefully(link)
    out.records += got.records
    out.bytes += got.bytes
    out.tree, out.checked = got.tree, bool(got.tree)
    log.info("received %s to #%d from %s (%d records)",
             "the rest of the stream" if found.token else "a stream", got.to_seq, source,
             got.records)
    return False


def _trust(path: Path) -> str:
    """What a TLS refusal of a replica server most likely means, and the cure."""
    return (f"if the replica's log says 'refused TLS connection', it does not trust {path}'s "
            f"certificate yet: 'cdpfs replica trust REPLICA_STORE "
            f"{credentials.tls_dir(path) / 'node.crt'} --name NAME', then restart its server")


def rebuild_file(path: Path, source: Path, *, progress: Progress | None = None) -> Rebuilt:
    """``rebuild`` from a send stream in the file ``source`` (a full stream; after an
    interruption the same file again: what was applied is skipped)."""
    found = _found(path)
    out = Rebuilt(path, resumed=found.top)
    if found.kind in ("new", "partial"):
        try:
            f = open(source, "rb")  # noqa: SIM115 (closed below, after the receive)
        except OSError as exc:
            raise RebuildError(f"{source}: cannot read: {exc.strerror}") from None
        with f:
            try:
                got = stream.receive_file(path, f, progress=progress,
                                          mark=(REBUILDING, str(source).encode()),
                                          again=found.kind == "partial")
            except stream.StreamError as exc:
                raise _stopped(exc) from None
        out.records, out.bytes = got.records, got.bytes
        out.tree, out.checked = got.tree, bool(got.tree)
    return _finish(out)


def _stopped(exc: stream.StreamError) -> RebuildError:
    """The error of a receive that stopped: how to go on, if something was kept."""
    return RebuildError(f"{exc}: run the same command again to go on" if exc.token
                        else str(exc))


def _finish(out: Rebuilt) -> Rebuilt:
    """Promote the store (unless done before) and say the rebuild is over."""
    path = out.path
    found = _found(path)
    if found.kind == "promoted":
        out.finished = True
    else:
        roles.promote(path)
    with Store(path) as store:
        store.lock("rebuild")
        with store.txn(write=True) as txn:
            store.set_meta(txn, REBUILDING, None)
            out.uuid = store.uuid
            out.to_seq = journal.top(store, txn)
            out.lineage = epochs.lineage(store, txn)
            out.epoch = out.lineage[-1][0]
        if not out.tree:
            out.tree = stream.hash_at(store, out.to_seq)
    log.info("%s is the primary of volume %s now (epoch %d, from #%d)", path, out.uuid,
             out.epoch, out.to_seq + 1)
    return out
