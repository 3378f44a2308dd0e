"""Figures about a store: journal length, objects, space (``cdpfs status``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..store import blocks, codec, journal, versions
from ..store.lmdb import Store
from ..store.refs import Refs
from ..store.schema import U64, Extent, Inode
from ..store.view import View
from .points import Points, oldest_point
from .retention import load_policy


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What ``cdpfs status`` prints about a store."""

    path: str
    uuid: str
    block_size: int
    last_seq: int
    last_time_ns: int
    records: int
    blocks: int
    packs: int
    versions: int
    used_bytes: int
    map_bytes: int


def store_stats(store: Store) -> StoreStats:
    with store.txn() as txn:
        seq, ts = journal.last(store, txn)
        return StoreStats(
            path=str(store.path), uuid=store.uuid, block_size=store.block_size,
            last_seq=seq, last_time_ns=ts, records=journal.count(store, txn),
            blocks=blocks.count(store, txn), packs=blocks.count_packs(store, txn),
            versions=versions.count(store, txn), used_bytes=store.used_bytes(),
            map_bytes=store.map_size(),
        )


@dataclass(frozen=True, slots=True)
class SpaceStats:
    """What ``cdpfs stat`` prints: where the store's bytes go."""

    live_files: int
    live_bytes: int  # sum of the sizes of live regular files
    live_stored: int  # stored bytes of the blocks and packs live files use
    history_stored: int  # stored bytes only older versions use
    stored_bytes: int  # all blocks and packs, as stored
    file_bytes: int  # the LMDB file's used pages
    free_inside: int  # of those, pages no table uses: new writes fill them first
    disk_free: int  # free on the disk under the store
    dedup_ratio: float
    compression_ratio: float
    oldest_seq: int
    oldest_ts: int | None
    last_seq: int
    last_ts: int
    records: int
    policy: str
    clone_of: str | None = None  # a clone: its base store
    clone_seq: int = 0  # ... the point of the base it was made at
    clone_ts: int = 0


def space(path: Path) -> SpaceStats:
    """``space_stats`` of the store at ``path`` (``cdpfs stat``)."""
    with Store(path) as store:
        return space_stats(store)


def space_stats(store: Store) -> SpaceStats:
    """Scan the store (every inode, extent and block once) for ``cdpfs stat``."""

    with store.txn() as txn:
        live = _live(store, txn)
        refs = Refs()  # what live files use
        logical = 0
        prefix = None
        in_chain = False
        for key, value in versions.scan(store, txn, "extents"):
            if key[:16] != prefix:
                prefix = key[:16]
                in_chain = U64.unpack_from(key)[0] in live
            if not in_chain:
                continue
            refs.add_extent(value)
            ext = Extent.unpack(value)
            if ext.kind == "F":
                logical += ext.length
            if ext.is_base:
                in_chain = False
        stored = plain = live_stored = unique = 0
        for key, value in blocks.scan(store, txn):
            stored += len(value)
            size = codec.plain_size(value)
            plain += size
            if key in refs.blocks:
                live_stored += len(value)
                unique += size
        for pack, value in blocks.scan_packs(store, txn):
            stored += len(value)
            plain += len(value)
            if pack in refs.packs:
                live_stored += len(value)
        points = Points(store, txn)
        oldest_seq, oldest_ts = oldest_point(store, txn)
        last_seq, last_ts = journal.last(store, txn)
        base = store.base
        return SpaceStats(
            live_files=sum(1 for n in live.values() if n.is_reg and n.nlink),
            live_bytes=sum(n.size for n in live.values() if n.is_reg and n.nlink),
            live_stored=live_stored, history_stored=stored - live_stored, stored_bytes=stored,
            file_bytes=store.used_bytes(), free_inside=store.reusable_bytes(txn),
            disk_free=store.disk_free(), dedup_ratio=logical / unique if unique else 1.0,
            compression_ratio=plain / stored if stored else 1.0, oldest_seq=oldest_seq,
            oldest_ts=oldest_ts or None, last_seq=last_seq, last_ts=last_ts,
            records=journal.count(store, txn),
            policy=load_policy(store, txn).describe(),
            clone_of=None if base is None else str(base.store.path),
            clone_seq=0 if base is None else base.seq,
            clone_ts=0 if base is None else points.ts(base.seq) or 0)


def _live(store: Store, txn: lmdb.Transaction) -> dict[int, Inode]:
    """The inodes of the newest state (a clone's: its own and its base's it shows)."""
    live: dict[int, Inode] = {}
    last_ino = None
    for key, value in versions.scan(store, txn, "inodes"):
        ino = U64.unpack_from(key)[0]
        if ino != last_ino:  # the newest version comes first
            last_ino = ino
            if value:
                live[ino] = Inode.unpack(value)
    under = View(store, txn).under
    if under is not None:  # what the clone has no version of shows the base at its point
        for ino in versions.inos(under.store, under.txn):
            if not versions.has(store, txn, "inodes", U64.pack(ino)):
                node = under.inode(ino)
                if node is not None:
                    live[ino] = node
    return live
