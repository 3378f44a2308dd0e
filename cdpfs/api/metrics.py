"""``GET /metrics``: a served volume's figures in Prometheus's text format.

The figures come from where ``cdpfs status`` gets them (``status.status_of``:
``figures`` for lag and the CDP window), from the volume's ``Counters`` (what
this process did: commits, bytes written and received, fsync latencies), from
the space scan (``Space``: it reads every block's size, so it runs now and then
in the background, not per scrape) and from the HA node when there is one.
Names follow Prometheus's conventions: ``cdpfs_`` prefix, base units (seconds,
bytes), ``_total`` on counters; the only labels are a replica's name and an HA
role (a handful of values each).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..counters import Counters
from ..history.stats import SpaceStats, space_stats
from ..status import Status, status_of
from ..store.lmdb import Store

log = logging.getLogger(__name__)

SPACE_EVERY = 60.0  # seconds between space scans at least
SPACE_SHARE = 30  # ... and 30 times as long as the last one took
HA_ROLES = ("starting", "replica", "primary", "fenced")


@dataclass(slots=True)
class Space:
    """The newest space scan of the served store (None until the first is done)."""

    stats: SpaceStats | None = None
    at_ns: int = 0

    async def refresh(self, store_of: Callable[[], Store | None], *,
                      every: float = SPACE_EVERY) -> None:
        """Scan the store ``store_of`` names now and every ``every`` seconds, in a
        worker thread (none yet: look again in a second)."""
        while True:
            store = store_of()
            if store is None:
                await trio.sleep(1.0)
                continue
            started = trio.current_time()
            try:
                self.stats = await trio.to_thread.run_sync(space_stats, store)
                self.at_ns = time.time_ns()
            except Exception as exc:  # a store closed meanwhile (a role change), damaged
                log.info("space scan of %s: %s", store.path, exc)
            # A scan reads every block's size: on a large store it takes a while, and
            # runs no more than 1/SPACE_SHARE of the time.
            took = trio.current_time() - started
            await trio.sleep(max(every, took * SPACE_SHARE))


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, unit=unit)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def families(now: Status | None, counters: Counters | None, space: Space | None,
             node: dict[str, Any] | None) -> Iterator[Metric]:
    """The metric families of one scrape (``now``: the store's status, None when
    the node serves no store yet)."""
    if now is not None:
        s = now.stats
        yield _gauge("cdpfs_journal_last_seq", "Newest record's sequence number", s.last_seq)
        yield _gauge("cdpfs_journal_records", "Records kept in the journal", s.records)
        yield _gauge("cdpfs_journal_last_timestamp_seconds", "When the newest record was "
                     "written (Unix time)", s.last_time_ns / 1e9)
        yield _gauge("cdpfs_window_seconds", "Age of the oldest point the volume can be "
                     "rewound to (the CDP window)", now.window.seconds)
        yield _gauge("cdpfs_window_oldest_seq", "Oldest point kept", now.window.oldest_seq)
        yield _gauge("cdpfs_store_file_bytes", "Bytes the store's LMDB file uses", s.used_bytes)
        yield _gauge("cdpfs_store_map_bytes", "The store's LMDB map size", s.map_bytes)
        yield _gauge("cdpfs_store_blocks", "Blocks stored", s.blocks)
        yield _gauge("cdpfs_store_packs", "Packs of small writes stored", s.packs)
        yield from _replicas(now)
        yield from _tests_and_backups(now)
    if space is not None and space.stats is not None:
        sp = space.stats
        yield _gauge("cdpfs_store_live_bytes", "Stored bytes the newest state uses",
                     sp.live_stored)
        yield _gauge("cdpfs_store_history_bytes", "Stored bytes only older versions use",
                     sp.history_stored)
        yield _gauge("cdpfs_store_free_inside_bytes", "Pages inside the store no table "
                     "uses (new writes fill them first)", sp.free_inside)
        yield _gauge("cdpfs_disk_free_bytes", "Free bytes on the disk under the store",
                     sp.disk_free)
        yield _gauge("cdpfs_dedup_ratio", "Bytes of live files per unique stored byte",
                     sp.dedup_ratio)
        yield _gauge("cdpfs_compression_ratio", "Plain bytes per stored byte",
                     sp.compression_ratio)
        yield _gauge("cdpfs_space_scan_timestamp_seconds", "When the space figures were "
                     "scanned (Unix time)", space.at_ns / 1e9)
    if counters is not None:
        yield _counter("cdpfs_commits", "Synced commits that wrote something",
                       counters.commits)
        yield _counter("cdpfs_written_bytes", "Bytes applications wrote",
                       counters.bytes_written)
        yield _counter("cdpfs_received_records", "Records received from a primary and "
                       "made durable", counters.records_applied)
        yield _counter("cdpfs_received_bytes", "Bytes received from a primary",
                       counters.bytes_received)
        yield _counter("cdpfs_shipped_records", "Records replicas acknowledged",
                       counters.records_shipped)
        yield _gauge("cdpfs_pending_bytes", "Bytes applied and not yet committed",
                     counters.pending_bytes)
        yield from counters.fsyncs.collect()
        yield _counter("cdpfs_events", "Events reported (the newest event id)",
                       counters.events.last_id)
    if node is not None:
        yield from _ha(node)


def _replicas(now: Status) -> Iterator[Metric]:
    label = ["replica"]
    connected = GaugeMetricFamily("cdpfs_replica_connected", "1 while the link to the "
                                  "replica is up", labels=label)
    acked = GaugeMetricFamily("cdpfs_replica_acked_seq", "Newest record the replica "
                              "acknowledged", labels=label)
    records = GaugeMetricFamily("cdpfs_replica_lag_records", "Records the replica lacks",
                                labels=label)
    nbytes = GaugeMetricFamily("cdpfs_replica_lag_bytes", "Bytes still to send to the "
                               "replica (at most)", labels=label)
    seconds = GaugeMetricFamily("cdpfs_replica_lag_seconds", "How long the oldest record "
                                "the replica lacks has waited (the recovery point)",
                                labels=label)
    sent = CounterMetricFamily("cdpfs_replica_sent_bytes", "Bytes sent to the replica",
                               labels=label)
    for r in now.replicas:
        lag = now.lags[r.name]
        connected.add_metric([r.name], 1.0 if r.connected else 0.0)
        acked.add_metric([r.name], r.acked)
        records.add_metric([r.name], lag.records)
        nbytes.add_metric([r.name], lag.bytes)
        seconds.add_metric([r.name], lag.seconds)
        sent.add_metric([r.name], r.bytes_sent)
    yield from (connected, acked, records, nbytes, seconds, sent)


def _tests_and_backups(now: Status) -> Iterator[Metric]:
    tested = now.tested
    if tested is not None:
        yield _gauge("cdpfs_drtest_last_timestamp_seconds", "When the last DR test started "
                     "(Unix time)", tested.ts / 1e9)
        yield _gauge("cdpfs_drtest_last_success", "1 if the last DR test passed",
                     1.0 if tested.ok else 0.0)
        yield _gauge("cdpfs_drtest_last_duration_seconds", "How long the last DR test took",
                     tested.seconds)
    last, verified = now.backed_up.last, now.backed_up.verified
    if last is not None:
        yield _gauge("cdpfs_backup_last_timestamp_seconds", "When the last backup was made "
                     "or failed (Unix time)", last.made_at / 1e9)
        yield _gauge("cdpfs_backup_last_success", "1 if the last backup was made and "
                     "verified", 0.0 if last.failed else 1.0)
    if verified is not None:
        yield _gauge("cdpfs_backup_verified_timestamp_seconds", "When the newest verified "
                     "backup was made (Unix time)", verified.made_at / 1e9)
        yield _gauge("cdpfs_backup_verified_bytes", "Size of the newest verified backup",
                     verified.size)


def _ha(node: dict[str, Any]) -> Iterator[Metric]:
    role = GaugeMetricFamily("cdpfs_ha_role", "1 for the HA role the node has now",
                             labels=["role"])
    for name in HA_ROLES:
        role.add_metric([name], 1.0 if node["role"] == name else 0.0)
    yield role
    yield _gauge("cdpfs_ha_epoch", "The epoch the node is primary in (0: not primary)",
                 node["epoch"])
    yield _gauge("cdpfs_ha_lease_left_seconds", "Time left before the node's fence shuts "
                 "unless the lease is renewed (0: not primary)", node["lease_left_seconds"])
    yield _counter("cdpfs_ha_promotions", "Times this node became primary",
                   node["promotions"])
    if node.get("lag") is not None:
        yield _gauge("cdpfs_ha_lag_records", "Records behind the newest position any "
                     "node reported", node["lag"])


class _Scrape:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def render(now: Status | None, counters: Counters | None, space: Space | None,
           node: dict[str, Any] | None) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(list(families(now, counters, space, node))))
    return generate_latest(registry)


def scrape(store: Store | None, counters: Counters | None, space: Space | None,
           node: dict[str, Any] | None) -> bytes:
    """Read the figures and render them (in a worker thread: it reads the store)."""
    return render(None if store is None else status_of(store), counters, space, node)
