"""Figures about a store: journal length, objects, space (``cdpfs status``)."""

from __future__ import annotations

from dataclasses import dataclass

from . import journal
from .store import Store


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
    with store.env.begin() as txn:
        seq, ts = journal.last(txn, store.db)

        def count(name: str) -> int:
            return int(txn.stat(store.db[name])["entries"])

        versions = sum(count(n) for n in ("inodes", "dirents", "extents", "xattrs"))
        return StoreStats(
            path=str(store.path), uuid=store.uuid, block_size=store.block_size,
            last_seq=seq, last_time_ns=ts, records=count("journal"), blocks=count("blocks"),
            packs=count("packs"), versions=versions, used_bytes=store.used_bytes(),
            map_bytes=store.env.info()["map_size"],
        )
