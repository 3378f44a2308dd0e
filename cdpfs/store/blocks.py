"""Stored data: content-addressed blocks and numbered packs.

``blocks``: blake3(plaintext) (32) -> tag + payload (``codec.encode``), one whole
block each, deduplicated by hash. ``packs``: pack id (8) -> tag + blake3 + payload
(``codec.encode_pack``): small writes side by side, each piece named by a PATCH
extent with its offset, length and hash. A clone reads what its own tables lack
from its base (``_base``, the one place that falls through): a block missing from
its ``blocks``, a pack numbered below its ``pack_start``. Its writes never share a
base block: ``has`` looks in its own table only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import lmdb

from ..errors import Corrupt
from . import codec
from .lmdb import Store
from .schema import U64


class Swept(NamedTuple):
    """What one step of a sweep did: where to go on from (None: the table is done),
    how many entries it deleted, and their stored bytes."""

    resume: bytes | None
    count: int
    nbytes: int


def _base(store: Store, txn: lmdb.Transaction) -> tuple[Store, lmdb.Transaction]:
    """A clone's base and the base's read transaction paired with ``txn``."""
    assert store.base is not None
    return store.base.store, store.under(txn)


# --- blocks ------------------------------------------------------------------------


def has(store: Store, txn: lmdb.Transaction, key: bytes) -> bool:
    """Whether this store's own table holds block ``key`` (a clone's base's do not count).
    A cursor finds the key without copying the block out, as ``txn.get`` would."""
    return bool(txn.cursor(db=store.db["blocks"]).set_key(key))


def stored(store: Store, txn: lmdb.Transaction, key: bytes) -> bytes | None:
    """Block ``key`` as stored (compressed), from this store's own table."""
    return txn.get(key, db=store.db["blocks"])


def get(store: Store, txn: lmdb.Transaction, key: bytes) -> bytes:
    """The verified plaintext of block ``key`` (a clone's from its base if it lacks
    it); Corrupt if it does not match its hash or is missing."""
    data = store.cache.get(key)
    if data is not None:
        return data
    raw = txn.get(key, db=store.db["blocks"])
    if raw is None and store.base is not None:
        return get(*_base(store, txn), key)
    if raw is None:
        raise Corrupt(key, f"block {key.hex()} is missing from the store")
    data = codec.decode(raw, key, store.block_size)
    store.cache.put(key, data)
    return data


def holds(store: Store, txn: lmdb.Transaction, key: bytes) -> bool:
    """Whether block ``key`` can be read here (a clone's base's counting)."""
    if has(store, txn, key):
        return True
    return store.base is not None and holds(*_base(store, txn), key)


def put(store: Store, txn: lmdb.Transaction, key: bytes, raw: bytes) -> None:
    """Keep block ``key`` in its stored form (``codec.encode``, checked by the caller)."""
    txn.put(key, raw, db=store.db["blocks"])


def scan(store: Store, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
    """(hash, stored form) of every block of this store, in hash order."""
    yield from txn.cursor(db=store.db["blocks"])


def count(store: Store, txn: lmdb.Transaction) -> int:
    return int(txn.stat(store.db["blocks"])["entries"])


def sweep(store: Store, txn: lmdb.Transaction, resume: bytes,
          referenced: Callable[[bytes], bool], limit: int) -> Swept:
    """Delete the blocks, from position ``resume`` (b"": the first) on, of which
    ``referenced(hash)`` is false, looking at ``limit`` blocks at most."""
    return _sweep(txn, store.db["blocks"], resume, referenced, limit)


# --- packs -------------------------------------------------------------------------


def has_pack(store: Store, txn: lmdb.Transaction, pack: int) -> bool:
    """Whether this store's own table holds pack ``pack``."""
    return bool(txn.cursor(db=store.db["packs"]).set_key(U64.pack(pack)))


def stored_pack(store: Store, txn: lmdb.Transaction, pack: int) -> bytes | None:
    """Pack ``pack`` as stored (compressed), from this store's own table."""
    return txn.get(U64.pack(pack), db=store.db["packs"])


def holds_pack(store: Store, txn: lmdb.Transaction, pack: int) -> bool:
    """Whether pack ``pack`` can be read here (a clone's base's counting)."""
    if store.base is not None and pack < store.base.pack_start:
        return holds_pack(*_base(store, txn), pack)
    return has_pack(store, txn, pack)


def put_pack(store: Store, txn: lmdb.Transaction, pack: int, raw: bytes) -> None:
    """Keep pack ``pack`` in its stored form (``codec.encode_pack``, checked by the caller)."""
    txn.put(U64.pack(pack), raw, db=store.db["packs"])


def write_pack(store: Store, txn: lmdb.Transaction, pack: int,
               plain: bytes | bytearray) -> int:
    """Keep a full or final pack, hashed and compressed here; the bytes stored."""
    raw = codec.encode_pack(plain)
    txn.put(U64.pack(pack), raw, db=store.db["packs"])
    return len(raw)


def piece(store: Store, txn: lmdb.Transaction, pack: int, off: int, length: int,
          digest: bytes, sealed: bytes | None = None) -> bytes:
    """A small write kept in a pack, checked against its hash (a clone's from its
    base if the pack is the base's). ``sealed``: the pack's plaintext when it is
    sealed but not committed yet; the pack the writer is filling is read from
    ``store.open_pack``."""
    if sealed is not None:
        data: bytes | bytearray = sealed
    elif pack == store.open_pack[0]:
        data = store.open_pack[1]
    elif store.base is not None and pack < store.base.pack_start:
        return piece(*_base(store, txn), pack, off, length, digest)
    else:
        key = b"pack" + U64.pack(pack)
        cached = store.cache.get(key)
        if cached is None:
            raw = txn.get(U64.pack(pack), db=store.db["packs"])
            if raw is None:
                raise Corrupt(digest, f"pack {pack} is missing from the store")
            cached = codec.decode_pack(raw, pack, store.block_size)
            store.cache.put(key, cached)
        data = cached
    out = bytes(data[off : off + length])
    if codec.digest(out) != digest:
        raise Corrupt(digest, f"piece {digest.hex()} in pack {pack} is corrupt "
                              "(hash mismatch)")
    return out


def scan_packs(store: Store, txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
    """(pack id, stored form) of every pack of this store, in order."""
    for key, raw in txn.cursor(db=store.db["packs"]):
        yield U64.unpack(key)[0], raw


def count_packs(store: Store, txn: lmdb.Transaction) -> int:
    return int(txn.stat(store.db["packs"])["entries"])


def sweep_packs(store: Store, txn: lmdb.Transaction, resume: bytes,
                referenced: Callable[[int], bool], limit: int) -> Swept:
    """Delete the packs, from position ``resume`` (b"": the first) on, of which
    ``referenced(pack id)`` is false, looking at ``limit`` packs at most."""
    return _sweep(txn, store.db["packs"], resume, lambda key: referenced(U64.unpack(key)[0]),
                  limit)


def _sweep(txn: lmdb.Transaction, db: object, resume: bytes,
           referenced: Callable[[bytes], bool], limit: int) -> Swept:
    cur = txn.cursor(db=db)
    if not cur.set_range(resume or b"\0"):
        return Swept(None, 0, 0)
    n = count = nbytes = 0
    while True:
        key = bytes(cur.key())
        if n >= limit:
            return Swept(key, count, nbytes)
        n += 1
        if referenced(key):
            if not cur.next():
                return Swept(None, count, nbytes)
            continue
        nbytes += len(cur.value())
        count += 1
        if not cur.delete():  # moves to the next item
            return Swept(None, count, nbytes)
        if not cur.key():
            return Swept(None, count, nbytes)
