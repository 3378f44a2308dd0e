"""Counters of a served volume, kept in one place for status and metrics.

The volume service owns one ``Counters`` and hands it to the parts that count:
the engine (commits, bytes applied and not yet committed), the senders (what was shipped)
and the receiver (what was applied). Plain integers written by one thread each
and read by anyone: a reader may see a value a moment old, never a torn one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Counters:
    """What a served volume has done since it started."""

    commits: int = 0  # synced LMDB commits that wrote something
    pending_bytes: int = 0  # bytes applied and not yet committed, about
    records_shipped: int = 0  # records replicas acknowledged, over all senders
    bytes_shipped: int = 0  # bytes sent to replicas (frames, TLS framing aside)
    records_applied: int = 0  # records received from a primary and made durable
    bytes_received: int = 0  # bytes received from a primary
    lag: dict[str, int] = field(default_factory=dict)  # replica -> records behind

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
