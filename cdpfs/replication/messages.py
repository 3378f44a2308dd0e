"""What each frame's body may hold: checked field by field before anything uses it.

A peer is trusted to be who it says (TLS), not to be right: a bug, a damaged
disk or a hostile process on a trusted machine can send anything msgpack
encodes. ``check(kind, body)`` raises ``BadMessage`` (one line: which frame,
which field, what is wrong) unless the body has the shape the protocol names
(docs/architecture.md, Replication, the frame table): the right types, integers
in range, hashes of the right length, lists and strings within their bounds.
The receiver and the sender then check what only they can (order, subsets,
positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CdpfsError
from ..store.epochs import MAX_EPOCHS

# Frame types
HELLO, WELCOME, OFFER, WANT, DATA, ACK, ERROR, BASE, MARKS, PING, PONG, STREAM, END, FETCH = \
    range(1, 15)
NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", OFFER: "OFFER", WANT: "WANT", DATA: "DATA",
         ACK: "ACK", ERROR: "ERROR", BASE: "BASE", MARKS: "MARKS", PING: "PING",
         PONG: "PONG", STREAM: "STREAM", END: "END", FETCH: "FETCH"}

MAX_SEQ = 2**64 - 1
MAX_ITEMS = 100_000  # entries of any list or map in one body
MAX_TEXT = 4096  # characters of any string
MAX_BYTES = 256 << 20  # bytes of one value (a record, a table entry)
HASH_LEN = 32
CHECK_LEN = 16


class BadMessage(CdpfsError):
    """A frame body that does not have the shape its type names."""


Check = Callable[[Any, str], None]


def _fail(where: str, what: str) -> None:
    raise BadMessage(f"{where}: {what}")


def _int(lo: int = 0, hi: int = MAX_SEQ) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not int or not lo <= v <= hi:
            _fail(where, f"expected an integer from {lo} to {hi}, got {_show(v)}")
    return check


def _bool(v: Any, where: str) -> None:
    if type(v) is not bool:
        _fail(where, f"expected true or false, got {_show(v)}")


def _text(limit: int = MAX_TEXT, least: int = 0) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not str or not least <= len(v) <= limit:
            _fail(where, f"expected a string of {least} to {limit} characters, got {_show(v)}")
    return check


def _bytes(exact: int | None = None, limit: int = MAX_BYTES) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not bytes or (exact is not None and len(v) != exact) or len(v) > limit:
            size = f"{exact} bytes" if exact is not None else f"at most {limit} bytes"
            _fail(where, f"expected {size}, got {_show(v)}")
    return check


def _list(item: Check, limit: int = MAX_ITEMS) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not list or len(v) > limit:
            _fail(where, f"expected a list of at most {limit} items, got {_show(v)}")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return check


def _pair(first: Check, second: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not list or len(v) != 2:
            _fail(where, f"expected a pair, got {_show(v)}")
        first(v[0], f"{where}[0]")
        second(v[1], f"{where}[1]")
    return check


def _map(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """A map with these keys (others are allowed and ignored: newer peers may add some)."""
    optional = optional or {}

    def check(v: Any, where: str) -> None:
        if type(v) is not dict or len(v) > MAX_ITEMS:
            _fail(where, f"expected a map, got {_show(v)}")
        for key, field in required.items():
            if key not in v:
                _fail(where, f"no {key!r}")
            field(v[key], f"{where}.{key}")
        for key, field in optional.items():
            if key in v and v[key] is not None:
                field(v[key], f"{where}.{key}")
    return check


def _marks(v: Any, where: str) -> None:
    if type(v) is not dict or len(v) > MAX_ITEMS:
        _fail(where, f"expected a map of bookmarks, got {_show(v)}")
    for name, point in v.items():
        _text(100)(name, f"{where} name")
        _pair(_int(), _int(0, 2**63 - 1))(point, f"{where}[{name!r}]")


_SEQ = _int()
_REFS = _map({"blocks": _list(_bytes(HASH_LEN)), "packs": _list(_int())})

SHAPES: dict[int, Check] = {
    HELLO: _map({"proto": _int(0, 2**31)},
                {"uuid": _text(64, least=1), "block_size": _int(1, 2**31), "name": _text(256),
                 "epochs": _list(_pair(_int(), _int(1)), limit=MAX_EPOCHS)}),
    WELCOME: _map({"acked": _SEQ},
                  {"uuid": _text(64, least=1), "base_pending": _bool,
                   "check": _bytes(limit=CHECK_LEN)}),
    OFFER: _REFS,
    WANT: _REFS,
    DATA: _map({}, {"records": _list(_pair(_SEQ, _bytes())),
                    "base": _map({"table": _text(32),
                                  "items": _list(_pair(_bytes(), _bytes()))}),
                    # a send stream's: the pieces' names, and records no time resolves to
                    "blocks": _list(_bytes(HASH_LEN)), "packs": _list(_int()),
                    "unindexed": _list(_SEQ)}),
    ACK: _map({"seq": _SEQ}),
    ERROR: _map({}, {"message": _text()}),
    BASE: _map({"seq": _SEQ}, {"begin": _bool, "end": _bool}),
    MARKS: _marks,
    PING: _map({"id": _SEQ}),  # a keepalive on an idle link
    PONG: _map({"id": _SEQ}),  # its answer, naming the PING's id
    # A send stream's head: the volume, the stretch of history and where it starts
    # (a resumed stream: after the record ``after``, whose check is ``after_check``).
    STREAM: _map({"format": _int(1, 2**31), "uuid": _text(64, least=1),
                  "block_size": _int(1, 2**31), "from": _SEQ, "to": _SEQ,
                  "to_ts": _int(0, 2**63 - 1), "ends": _bool,
                  "epochs": _list(_pair(_int(), _int(1)), limit=MAX_EPOCHS)},
                 {"name": _text(256), "from_check": _bytes(limit=CHECK_LEN),
                  "from_ts": _int(0, 2**63 - 1), "after": _SEQ,
                  "after_check": _bytes(limit=CHECK_LEN), "created_ns": _int(0, 2**63 - 1)}),
    # Its tail: what came before it, so a stream cut short or spliced is told apart.
    # With ``tree``: the tree hash of the volume at ``to``, which the receiver checks.
    END: _map({"records": _SEQ, "pieces": _SEQ, "chain": _bytes(CHECK_LEN)},
              {"tree": _text(64)}),
    # A rebuild asks a replica server for a send stream of its store: the volume it
    # expects, and where its target is (the token of an interrupted receive, or its
    # newest record ``after`` with that record's ``check``); ``tree``: end with the
    # tree hash. Answered by WELCOME (the replica's newest record), then the stream.
    FETCH: _map({"proto": _int(0, 2**31)},
                {"uuid": _text(64, least=1), "resume": _text(), "after": _SEQ,
                 "check": _bytes(limit=CHECK_LEN), "tree": _bool}),
}


def check(kind: int, body: Any) -> None:
    """BadMessage unless ``body`` has the shape frames of type ``kind`` have."""
    shape = SHAPES.get(kind)
    if shape is None:
        raise BadMessage(f"unknown frame type {kind}")
    shape(body, NAMES[kind])


def _show(v: Any) -> str:
    """A short description of a value, for a one-line error."""
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
