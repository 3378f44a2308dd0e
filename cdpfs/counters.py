"""Counters of a served volume, kept in one place for status and metrics.

The volume service owns one ``Counters`` and hands it to the parts that count:
the engine (commits, bytes applied and not yet committed), the senders (what was shipped)
and the receiver (what was applied). Plain integers written by one thread each
and read by anyone: a reader may see a value a moment old, never a torn one.
Beside them: how long each fsync took (a ``prometheus_client`` histogram, not
registered anywhere: the node API's metrics collect it) and the process's
``Events``, which the same parts report what happened to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client import Histogram

from .events import Events

# fsync latency buckets (seconds): from a group commit's fraction of a
# millisecond to a sync replica's timeout
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 10.0)


def _fsync_histogram() -> Histogram:
    return Histogram("cdpfs_fsync_seconds", "How long fsync took, until durable and on "
                     "the sync replicas", buckets=FSYNC_BUCKETS, registry=None)


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
    bytes_written: int = 0  # bytes applications wrote (acknowledged writes)
    fsyncs: Histogram = field(default_factory=_fsync_histogram)
    events: Events = field(default_factory=Events)

    def as_dict(self) -> dict[str, Any]:
        """The plain figures (not the histogram or the events)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("fsyncs", "events")}
