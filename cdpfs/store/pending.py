"""Changes applied to the live volume and not yet committed, kept in memory.

The live volume's writer applies each operation to the current ``Layer``: its
versioned puts (by table and key prefix, with their seq), its journal record,
new blocks and sealed packs. Readers see the committed store through a short
LMDB read transaction with the layers laid over it (``store.view.View``). A
commit freezes the current layer (a new one takes the changes that follow),
writes the frozen one into one synced LMDB write transaction in a worker
thread (``write``) and drops it once the commit is done, so at every moment a
reader sees each change either in LMDB, in a layer, or in both, never in
neither. Layers are touched by their owner thread only (the trio thread of a
mount); ``write`` reads a frozen layer, which nobody changes any more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lmdb

from . import blocks, journal
from .journal import Record
from .lmdb import Store
from .schema import T_DIRENT, T_EXTENT, T_XATTR, U64

Job = Callable[[lmdb.Transaction], Any]
MISSING = object()  # no version in the layers: look in LMDB


class Layer:
    """The changes of consecutive operations, committed together.

    Attributes:
        records: the journal records, in seq order.
        versions: (table code, key prefix) -> [(seq, value)], oldest first.
        names: (table code, parent or ino) -> names with versions here (dirents,
            xattrs), so a listing merges them into what LMDB holds.
        indices: ino -> block indices with extent versions here.
        blocks: hash -> stored form of blocks new in this layer.
        packs: pack id -> plaintext of packs sealed in this layer (encoded when
            written: the compression runs in the committing thread).
        plain: (table, key) -> value (None: delete) for the unversioned tables.
        jobs: functions run in the write transaction after the rest (holds,
            prune steps), with their results for whoever waits.
        nbytes: bytes this layer will add to the store, about.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.versions: dict[tuple[int, bytes], list[tuple[int, bytes]]] = {}
        self.names: dict[tuple[int, bytes], set[bytes]] = {}
        self.indices: dict[int, set[int]] = {}
        self.blocks: dict[bytes, bytes] = {}
        self.packs: dict[int, bytes] = {}
        self.plain: dict[tuple[str, bytes], bytes | None] = {}
        self.jobs: list[tuple[Job, list[Any]]] = []
        self.nbytes = 0
        self._log: list[tuple[int, bytes]] = []  # versioned puts, for undo

    @property
    def empty(self) -> bool:
        return not (self.records or self.plain or self.jobs or self.blocks or self.packs)

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0

    # --- building (the owner thread) -----------------------------------------------

    def put(self, table: int, prefix: bytes, seq: int, value: bytes) -> None:
        self.versions.setdefault((table, prefix), []).append((seq, value))
        self._log.append((table, prefix))
        if table in (T_DIRENT, T_XATTR):
            self.names.setdefault((table, prefix[:8]), set()).add(prefix[8:-1])
        elif table == T_EXTENT:
            self.indices.setdefault(U64.unpack_from(prefix)[0], set()).add(
                U64.unpack_from(prefix, 8)[0])

    def mark(self) -> int:
        return len(self._log)

    def undo(self, mark: int) -> None:
        """Take back the versioned puts made since ``mark`` (an operation that failed).
        Names and indices stay noted: a note with no version only costs a look."""
        while len(self._log) > mark:
            key = self._log.pop()
            versions = self.versions[key]
            versions.pop()
            if not versions:
                del self.versions[key]

    # --- reading --------------------------------------------------------------------

    def newest(self, table: int, prefix: bytes, seq: int) -> Any:
        """The value of the newest version <= seq here, or MISSING."""
        for s, value in reversed(self.versions.get((table, prefix), ())):
            if s <= seq:
                return value
        return MISSING


class Pending:
    """The layers not yet committed, oldest first; the last takes new changes."""

    def __init__(self) -> None:
        self.layers: list[Layer] = [Layer()]
        self.pruning = 0  # prune steps queued and not yet committed

    @property
    def current(self) -> Layer:
        return self.layers[-1]

    def __bool__(self) -> bool:
        return any(not layer.empty for layer in self.layers)

    def freeze(self) -> Layer | None:
        """End the current layer (None if it holds nothing) and start a new one."""
        layer = self.layers[-1]
        if layer.empty:
            return None
        self.layers.append(Layer())
        return layer

    def drop(self, layer: Layer) -> None:
        """Forget a layer whose commit is done."""
        self.layers.remove(layer)

    # --- reading (newest layer first) --------------------------------------------------

    def newest(self, table: int, prefix: bytes, seq: int) -> Any:
        for layer in reversed(self.layers):
            value = layer.newest(table, prefix, seq)
            if value is not MISSING:
                return value
        return MISSING

    def versions(self, table: int, prefix: bytes, seq: int) -> Iterator[bytes]:
        """Values of the versions <= seq in the layers, newest first."""
        for layer in reversed(self.layers):
            for s, value in reversed(layer.versions.get((table, prefix), ())):
                if s <= seq:
                    yield value

    def names(self, table: int, base: bytes) -> set[bytes]:
        out: set[bytes] = set()
        for layer in self.layers:
            out |= layer.names.get((table, base), set())
        return out

    def all_names(self, table: int) -> set[bytes]:
        return {name for layer in self.layers for (t, _), names in layer.names.items()
                if t == table for name in names}

    def indices(self, ino: int) -> set[int]:
        out: set[int] = set()
        for layer in self.layers:
            out |= layer.indices.get(ino, set())
        return out

    def block(self, key: bytes) -> bytes | None:
        """The stored form of a block not yet committed, or None."""
        return next((layer.blocks[key] for layer in reversed(self.layers)
                     if key in layer.blocks), None)

    def pack(self, pack: int) -> bytes | None:
        """The plaintext of a sealed pack not yet committed, or None."""
        return next((layer.packs[pack] for layer in reversed(self.layers)
                     if pack in layer.packs), None)


def write(store: Store, txn: lmdb.Transaction, layer: Layer) -> int:
    """Put a frozen layer into write transaction ``txn``: blocks, packs, the records
    (``journal.apply``: each one's versioned puts and the record), the plain puts,
    then the jobs. Bytes of packs stored."""
    for key, raw in layer.blocks.items():
        blocks.put(store, txn, key, raw)
    packed = 0
    for pack, data in layer.packs.items():
        packed += blocks.write_pack(store, txn, pack, data)
    journal.apply(store, txn, layer.records)
    dbs = store.db
    for (table, key), value in layer.plain.items():
        if value is None:
            txn.delete(key, db=dbs[table])
        else:
            txn.put(key, value, db=dbs[table])
    for job, box in layer.jobs:
        box.append(job(txn))
    return packed
