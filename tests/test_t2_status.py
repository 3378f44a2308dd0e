"""``cdpfs status``'s replica line, from the state a sender saved: the command line
says what ``registry.link`` makes of it now. A replica silent for longer than a
live link ever is (a cut link: its sender saved nothing since) is named silent,
with no ETA and no rate; one that answered lately is connected, with an ETA and
a rate only while records are on their way; one that is not connected says so.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from harness import cdpfs

from cdpfs.replication import registry
from cdpfs.replication.registry import ReplicaState
from cdpfs.store.lmdb import Store

S = 1_000_000_000


def _line(store: Path, **saved: object) -> str:
    """The replica line of ``cdpfs status`` once replica r1 is saved as ``saved``."""
    with Store(store) as st, st.txn(write=True) as txn:
        registry.put(st, txn, ReplicaState("r1", "10.0.0.2:7400", **saved))  # type: ignore[arg-type]
    out = cdpfs("status", store).stdout
    return next(line for line in out.splitlines() if line.startswith("replica"))


def test_the_replica_line_tells_a_live_link_from_a_silent_one(tmp_path: Path) -> None:
    store = tmp_path / "s"
    cdpfs("init", store)  # record #1: a replica at #0 is one record behind
    shipping = {"connected": True, "acked": 0, "rate": 45.4e6, "bytes_sent": 5 << 20}

    # What a cut link leaves: connected when last saved, 60 s ago (the defect showed
    # "connected ... ETA 3s, 45.4 MB/s lately" for as long as the cut lasted).
    cut = _line(store, **shipping, heard_ns=time.time_ns() - 60 * S)
    assert re.search(r"\(10\.0\.0\.2:7400, async\): no answer for (6\d)s, acked #0, lag 1 "
                     r"records", cut), cut
    assert "ETA" not in cut and "MB/s lately" not in cut and "connected" not in cut, cut

    live = _line(store, **shipping, heard_ns=time.time_ns() - S)
    assert ": connected, acked #0, lag 1 records" in live, live
    assert re.search(r", ETA \d+s, sent 0 records 5\.0 MiB, 45\.4 MB/s lately$", live), live

    caught_up = _line(store, **{**shipping, "acked": 1}, heard_ns=time.time_ns() - S)
    assert ": connected, acked #1, lag 0 records" in caught_up, caught_up
    assert "ETA" not in caught_up and "lately" not in caught_up, caught_up

    down = _line(store, **{**shipping, "connected": False}, heard_ns=time.time_ns() - S,
                 last_error="OSError: no route to host")
    assert ": not connected, acked #0, lag 1 records" in down, down
    assert "ETA" not in down and "lately" not in down, down
    assert down.endswith("last error: OSError: no route to host"), down
