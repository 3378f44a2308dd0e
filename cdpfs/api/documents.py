"""The JSON documents operators read: one function per document, for the CLI's
``--json`` and the node API alike (the keys are listed in docs/user-guide.md).

Times are ISO 8601 in UTC (``2026-12-07T03:18:09.123456Z``) beside the same
instant in ns since the epoch (``*_ns``) for programs; durations in seconds;
sizes in bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..backups import Backup, Listed, Schedule
from ..drtests import Result, Running
from ..figures import Lag
from ..history.stats import SpaceStats
from ..history.versions import Change, Version
from ..replication.registry import ReplicaState, link
from ..status import Status

FORMAT = 1  # bumped when a key changes meaning or goes; new keys do not bump it


def iso(ns: int | None) -> str | None:
    """An instant (ns since the epoch) in ISO 8601, UTC, to the microsecond when it
    has one (None stays None)."""
    if not ns:
        return None
    when = dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    spec = "seconds" if when.microsecond == 0 else "microseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def lag_document(lag: Lag) -> dict[str, Any]:
    return {"records": lag.records, "bytes": lag.bytes, "bytes_complete": lag.complete,
            "seconds": round(lag.seconds, 3)}


def replica_document(state: ReplicaState, lag: Lag, at_ns: int) -> dict[str, Any]:
    view = link(state, at_ns, lag.records)
    eta = view.eta(lag.bytes)
    return {"name": state.name, "address": state.address, "mode": state.mode,
            "link": view.words(), "connected": state.connected, "acked": state.acked,
            "acked_time": iso(state.acked_ts), "lag": lag_document(lag),
            "rate_bytes_per_second": round(view.rate, 1) if view.moving else 0.0,
            "eta_seconds": None if eta is None else round(eta, 1),
            "records_sent": state.records_sent, "bytes_sent": state.bytes_sent,
            "heard_time": iso(state.heard_ns), "last_error": state.last_error or None}


def drtest_document(result: Result | None, now_ns: int) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"time": iso(result.ts), "time_ns": result.ts, "seq": result.seq,
            "passed": result.ok, "seconds": round(result.seconds, 3),
            "scenario": result.scenario, "failed": result.failed or None,
            "bookmark": result.bookmark or None, "clone_kept": result.clone or None,
            "tree_hash": result.tree_hash or None, "every_seconds": result.every or None,
            "overdue": result.overdue(now_ns)}


def running_document(running: Running | None) -> dict[str, Any] | None:
    if running is None:
        return None
    return {"since": iso(running.ts), "pid": running.pid, "alive": running.alive,
            "scenario": running.scenario, "clone": running.clone, "mountpoint": running.mnt}


def backup_document(made: Backup | None) -> dict[str, Any] | None:
    if made is None:
        return None
    return {"time": iso(made.made_at), "time_ns": made.made_at, "seq": made.seq,
            "point_time": iso(made.point_ts), "format": made.format, "file": made.path,
            "bytes": made.size, "seconds": round(made.seconds, 3), "verified": made.verified,
            "tree_hash": made.tree or None, "failed": made.failed or None}


def backups_document(schedule: Schedule, now_ns: int) -> dict[str, Any]:
    return {"last": backup_document(schedule.last),
            "verified": backup_document(schedule.verified),
            "every_seconds": schedule.every or None, "overdue": schedule.overdue(now_ns)}


def status_document(now: Status) -> dict[str, Any]:
    """``cdpfs status --json`` and ``GET /api/v1/status``."""
    s = now.stats
    return {
        "format": FORMAT,
        "store": s.path, "uuid": s.uuid, "time": iso(now.at_ns),
        "in_use_by": now.holder,
        "journal": {"records": s.records, "last_seq": s.last_seq,
                    "last_time": iso(s.last_time_ns)},
        "window": {"oldest_seq": now.window.oldest_seq,
                   "oldest_time": iso(now.window.oldest_ts),
                   "seconds": round(now.window.seconds, 3)},
        "objects": {"blocks": s.blocks, "packs": s.packs, "versions": s.versions},
        "space": {"used_bytes": s.used_bytes, "map_bytes": s.map_bytes,
                  "block_size": s.block_size},
        "clone_of": None if now.clone_of is None else {"store": str(now.clone_of.path),
                                                       "seq": now.clone_of.seq},
        "clones": [{"path": str(h.path), "seq": h.seq, "present": h.present} for h in now.held],
        "receiving": now.receiving or None,
        "drtest": {"last": drtest_document(now.tested, now.at_ns),
                   "running": running_document(now.testing),
                   "kept_clones": now.kept},
        "backups": backups_document(now.backed_up, now.at_ns),
        "replicas": [replica_document(r, now.lags[r.name], now.at_ns) for r in now.replicas],
    }


def space_document(s: SpaceStats) -> dict[str, Any]:
    """``cdpfs stat --json``."""
    return {"format": FORMAT, "live_files": s.live_files, "live_bytes": s.live_bytes,
            "live_stored_bytes": s.live_stored, "history_stored_bytes": s.history_stored,
            "stored_bytes": s.stored_bytes, "store_file_bytes": s.file_bytes,
            "free_inside_bytes": s.free_inside, "disk_free_bytes": s.disk_free,
            "dedup_ratio": round(s.dedup_ratio, 4),
            "compression_ratio": round(s.compression_ratio, 4),
            "oldest_seq": s.oldest_seq, "oldest_time": iso(s.oldest_ts),
            "last_seq": s.last_seq, "last_time": iso(s.last_ts), "records": s.records,
            "retention": s.policy,
            "clone_of": None if s.clone_of is None else {
                "store": s.clone_of, "seq": s.clone_seq, "time": iso(s.clone_ts)}}


def versions_document(rel: str, found: list[Version]) -> dict[str, Any]:
    """``cdpfs log --json``: a file's versions, newest first."""
    return {"format": FORMAT, "path": rel, "versions": [
        {"seq": v.seq, "time": iso(v.ts), "op": v.op,
         "size": None if v.node is None else v.node.size,
         "args": {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                  for k, v in v.args.items() if k != "kind"}}
        for v in found]}


def changes_document(seq1: int, seq2: int, changes: list[Change]) -> dict[str, Any]:
    """``cdpfs diff --json``."""
    return {"format": FORMAT, "from_seq": seq1, "to_seq": seq2,
            "changes": [{"kind": c.kind, "path": c.path, **({"old": c.old} if c.old else {})}
                        for c in changes],
            "counts": {k: sum(c.kind == k for c in changes) for k in "AMDR"}}


def verify_document(store: str, problems: list[str], notes: list[str]) -> dict[str, Any]:
    """``cdpfs verify --json``."""
    return {"format": FORMAT, "store": store, "ok": not problems, "problems": problems,
            "notes": notes}


def backup_listing_document(directory: str, found: list[Listed]) -> dict[str, Any]:
    """``cdpfs backups --json``: the backups in a directory, newest last."""
    return {"format": FORMAT, "directory": directory, "backups": [
        {"file": str(b.path), "bytes": b.size, "state": b.state(),
         "record": backup_document(b.record)} for b in found]}
