"""Batches: what the sender sends, read from the journal and the block table.

``read_batch`` takes the next records after a replica's position and lists the
blocks and packs they reference (what an OFFER names); ``read_base_chunk`` does
the same for a table's entries during a full resync; ``data_frame`` builds the
DATA frame with the blocks a replica wanted. ``assess`` uses the same functions
to count what replication would send.
"""

from __future__ import annotations

from typing import Any

from ..errors import CdpfsError
from ..store import blocks, entries, journal
from ..store.lmdb import Store
from ..store.refs import Refs
from . import wire

BATCH_RECORDS = 2000
BATCH_BYTES = 8 << 20


class JournalGap(CdpfsError):
    """The records after a replica's position are no longer all in the journal."""



def data_frame(store: Store, txn: Any, want: dict[str, list[Any]], body: dict[str, Any],
               ) -> list[wire.Part]:
    """The DATA frame of ``body`` (records, or a piece of a full resync): the wanted
    blocks and packs as pieces, as stored (compressed already), the rest compressed."""
    pieces: list[bytes] = []
    for digest in want["blocks"]:
        stored = blocks.stored(store, txn, digest)
        if stored is None:
            raise CdpfsError(f"block {bytes(digest).hex()} is missing on the primary")
        pieces.append(stored)
    for pack in want["packs"]:
        stored = blocks.stored_pack(store, txn, pack)
        if stored is None:
            raise CdpfsError(f"pack {pack} is missing on the primary")
        pieces.append(stored)
    return wire.frame(wire.DATA, body, pieces=pieces)


def read_batch(store: Store, txn: Any, acked: int, name: str = "replica",
               ) -> tuple[list[list[Any]], dict[str, list[Any]]]:
    """The next batch after ``acked``: contiguous records, and the blocks and packs
    they reference (what OFFER lists)."""
    batch: list[list[Any]] = []
    refs = Refs()
    size = 0
    for seq, raw in journal.packed(store, txn, acked + 1):
        if seq != acked + 1 + len(batch):
            if not batch:
                raise JournalGap(
                    f"replica {name} is at #{acked} but the journal continues at #{seq}: "
                    "records were pruned before it got them (it needs a full resync)")
            break
        raw = bytes(raw)
        batch.append([seq, raw])
        refs.add_record(journal.Record.unpack(seq, raw))
        size += len(raw)
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES or \
                len(refs.blocks) * store.block_size >= BATCH_BYTES:
            break
    return batch, refs.offer()


def backlog(store: Store, txn: Any, acked: int, limit: int = 100_000) -> tuple[int, bool]:
    """The bytes still to send to a replica at ``acked``, at most: the records after
    it and every block and pack they reference, as stored (the replica may have some
    already); and whether that is all (False: only ``limit`` records were counted)."""
    refs = Refs()
    size, complete = 0, True
    for n, (seq, raw) in enumerate(journal.packed(store, txn, acked + 1)):
        if n == limit:
            complete = False
            break
        size += len(raw)
        refs.add_record(journal.Record.unpack(seq, raw))
    size += sum(len(blocks.stored(store, txn, h) or b"") for h in refs.blocks)
    size += sum(len(blocks.stored_pack(store, txn, p) or b"") for p in refs.packs)
    return size, complete


def read_base_chunk(store: Store, table: str, after: bytes, top: int,
                    ) -> tuple[list[list[bytes]], dict[str, list[Any]], bytes | None]:
    """Entries of ``table`` after key ``after`` that belong to history up to ``top``,
    the blocks and packs they reference, and the key to go on from (None: done)."""
    items: list[list[bytes]] = []
    refs = Refs()
    size = 0
    last: bytes | None = None
    with store.txn() as txn:
        for key, value, seq in entries.read(store, txn, table, after):
            last = key
            if seq > top:  # newer: comes with the records after the resync
                continue
            items.append([key, value])
            size += len(key) + len(value)
            if table == "extents":
                refs.add_extent(value)
            if len(items) >= BATCH_RECORDS * 4 or size >= BATCH_BYTES or \
                    len(refs.blocks) * store.block_size >= BATCH_BYTES:
                break
    return items, refs.offer(), last

