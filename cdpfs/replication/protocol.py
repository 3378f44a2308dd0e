"""What both sides of replication agree on: the protocol version, the tables a full
resync sends, how a history position is checked, and how an address is written.

The frames themselves are in ``wire.py``; the primary's side in ``sender.py``,
the replica's in ``receiver.py`` (docs/architecture.md has the exchange).
"""

from __future__ import annotations

from typing import Any

from ..errors import CdpfsError
from ..store import entries, journal
from ..store.lmdb import Store

PROTOCOL = 4  # 4: PING and PONG (keepalives); 3: the frame check covers the header
PIPELINE = 4  # batches on the way at once: offered or sent ahead of their acknowledgement
ANSWER_TIMEOUT = 30.0  # seconds a peer owing an answer may move no byte before the link drops
# An idle link (the replica has everything) is silent on its own: the primary sends a
# PING after this many seconds without an answer, so a dead one is noticed and status
# can tell when the replica last answered.
KEEPALIVE = 3.0
IDLE_TIMEOUT = 15.0  # seconds an idle link may go unanswered (a PING owed) before it drops
# The history tables a full resync sends, in this order (entries up to its seq).
BASE_TABLES = entries.TABLES


def record_check(txn: Any, store: Store, seq: int) -> bytes:
    """A short hash of the record at ``seq`` (``journal.check``): equal on two stores
    when they hold the same history up to there."""
    return journal.check(store, txn, seq)


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port) to (host, port); CdpfsError if malformed.
    ``any_port``: port 0 too (a listener on a free port the system picks)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or not (0 if any_port else 1) <= int(port) \
            < 65536:
        raise CdpfsError(f"{text!r}: expected HOST:PORT (a port from 1 to 65535)")
    return host.strip("[]"), int(port)
