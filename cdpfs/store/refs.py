"""Which stored blocks and packs extent versions reference.

A FULL extent names a block by its hash, a PATCH names the pack its bytes are
in; ZERO and HOLE reference nothing. Replication offers what a batch
references, prune keeps what some version references, stats and verify count
and check them: all through ``Refs``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .journal import Record
from .schema import T_EXTENT, Extent


def of_extent(value: bytes | memoryview) -> tuple[bytes | None, int | None]:
    """(block hash, pack id) an extent value references (None where it has none)."""
    if not value:
        return None, None
    kind = value[0]
    if kind == 0x46:  # F
        return Extent.unpack(value).digest, None
    if kind == 0x50:  # P
        return None, Extent.unpack(value).pack
    return None, None


@dataclass(slots=True)
class Refs:
    """Blocks and packs referenced so far, each once, in the order first met."""

    blocks: dict[bytes, None] = field(default_factory=dict)
    packs: dict[int, None] = field(default_factory=dict)

    def add_extent(self, value: bytes | memoryview) -> None:
        block, pack = of_extent(value)
        if block is not None:
            self.blocks[block] = None
        elif pack is not None:
            self.packs[pack] = None

    def add_record(self, rec: Record) -> None:
        """What the versions a journal record put reference."""
        for table, _prefix, value in rec.changes:
            if table == T_EXTENT:
                self.add_extent(value)

    def add_records(self, recs: Iterable[Record]) -> None:
        for rec in recs:
            self.add_record(rec)

    def __len__(self) -> int:
        return len(self.blocks) + len(self.packs)

    def offer(self) -> dict[str, list[Any]]:
        """As replication names them (an OFFER's body)."""
        return {"blocks": list(self.blocks), "packs": list(self.packs)}
