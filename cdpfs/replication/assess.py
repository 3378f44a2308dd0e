"""Assessment: what replication would send, measured from the journal, sending nothing.

``assess`` walks the records of a period in the batches the sender would make
(``batches.read_batch``) and builds the frames it would send (``batches.data_frame``):
the offer of hashes, the blocks and packs a replica that was current at the
start would lack (each once), and the records, compressed as on the wire. The
bytes are spread over seconds by record time; the result gives bytes per minute
raw and compressed (median, p95, peak) and the bandwidth needed so that the
replica stays within a chosen lag.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..store import blocks, codec, journal
from ..store.lmdb import Store
from . import wire
from .batches import data_frame, read_batch


@dataclass(frozen=True, slots=True)
class Assessment:
    """Bytes replication would send over a period."""

    first_seq: int
    last_seq: int
    seconds: float
    records: int
    raw_bytes: int  # records and new blocks uncompressed
    wire_bytes: int  # the primary's frames (compressed), TLS framing aside
    per_minute_raw: list[int]
    per_minute_wire: list[int]
    needed_bps: float  # bytes per second to stay within ``lag`` seconds
    lag: float

    @staticmethod
    def _stats(values: list[int]) -> tuple[float, float, int]:
        if not values:
            return 0.0, 0.0, 0
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return statistics.median(ordered), p95, ordered[-1]

    def lines(self) -> list[str]:
        def mb(n: float) -> str:
            return f"{n / 1e6:,.2f} MB"

        out = [f"records #{self.first_seq}..#{self.last_seq} over {self.seconds:,.0f}s: "
               f"{self.records} records, {mb(self.raw_bytes)} raw, {mb(self.wire_bytes)} "
               f"on the wire (x{self.raw_bytes / max(1, self.wire_bytes):.2f} compression)"]
        for label, values in (("raw", self.per_minute_raw), ("wire", self.per_minute_wire)):
            med, p95, peak = self._stats(values)
            out.append(f"per minute ({label}): median {mb(med)}, p95 {mb(p95)}, peak {mb(peak)}")
        out.append(f"bandwidth needed for a lag of at most {self.lag:g}s: "
                   f"{self.needed_bps * 8 / 1e6:,.2f} Mbit/s ({mb(self.needed_bps)}/s)")
        return out


def assess(path: Path, since_ns: int, lag: float) -> Assessment:
    """What replication would have sent for the records stamped since ``since_ns`` in
    the store at ``path``."""
    with Store(path) as store:
        return _assess(store, since_ns, lag)


def _assess(store: Store, since_ns: int, lag: float) -> Assessment:
    raw_by_s: dict[int, int] = defaultdict(int)
    wire_by_s: dict[int, int] = defaultdict(int)
    seen_blocks: set[bytes] = set()
    seen_packs: set[int] = set()
    records = raw_total = wire_total = 0
    with store.txn() as txn:
        start = journal.seq_at(store, txn, since_ns)
        last, _ = journal.last(store, txn)
        first_ts = last_ts = 0
        acked = start
        while acked < last:
            batch, refs = read_batch(store, txn, acked)
            if not batch:
                break
            want = {"blocks": [h for h in refs["blocks"] if h not in seen_blocks],
                    "packs": [p for p in refs["packs"] if p not in seen_packs]}
            seen_blocks.update(want["blocks"])
            seen_packs.update(want["packs"])
            wire_size = wire.frame_size(wire.frame(wire.OFFER, refs)) + \
                wire.frame_size(data_frame(store, txn, want, {"records": batch}))
            plain = sum(len(raw) for _, raw in batch) + \
                sum(codec.plain_size(blocks.stored(store, txn, h) or b"\0")
                    for h in want["blocks"]) + \
                sum(len(blocks.stored_pack(store, txn, p) or b"") for p in want["packs"])
            # spread the batch over the seconds its records were stamped in
            stamps = [journal.ts_of(raw) // 10**9 for _, raw in batch]
            first_ts = first_ts or stamps[0]
            last_ts = stamps[-1]
            for sec in stamps:
                raw_by_s[sec] += plain // len(stamps)
                wire_by_s[sec] += wire_size // len(stamps)
            records += len(batch)
            raw_total += plain
            wire_total += wire_size
            acked = batch[-1][0]
    return Assessment(
        first_seq=start + 1, last_seq=acked, seconds=float(max(1, last_ts - first_ts + 1)),
        records=records, raw_bytes=raw_total, wire_bytes=wire_total,
        per_minute_raw=_per_minute(raw_by_s), per_minute_wire=_per_minute(wire_by_s),
        needed_bps=_needed(wire_by_s, lag), lag=lag)


def _per_minute(by_second: dict[int, int]) -> list[int]:
    minutes: dict[int, int] = defaultdict(int)
    for sec, n in by_second.items():
        minutes[sec // 60] += n
    if not minutes:
        return []
    lo, hi = min(minutes), max(minutes)
    return [minutes.get(m, 0) for m in range(lo, hi + 1)]


def _needed(by_second: dict[int, int], lag: float) -> float:
    """The smallest rate that sends every window of ``lag`` seconds within that window
    (the peak of a sliding sum over whole seconds)."""
    if not by_second:
        return 0.0
    width = max(1, int(lag))
    secs = range(min(by_second), max(by_second) + 1)
    values = [by_second.get(s, 0) for s in secs]
    window = peak = 0
    for i, v in enumerate(values):
        window += v - (values[i - width] if i >= width else 0)
        peak = max(peak, window)
    return peak / width
