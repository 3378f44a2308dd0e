"""The tree hash (``history.treehash``): equal for the same bytes however they were
written and stored, different for any other bytes, and an error for a store that
lacks a block its files name.

The hash names a file's 128 KiB pieces by the hashes they are stored under where
it can (no decompression), and reads the rest; these tests build the same content
through every path a write can take (one large write, many small ones into packs,
patches over a block, holes against written zeros, a truncation, another block
size) and compare. In-process stores, no FUSE.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from cdpfs.errors import Corrupt
from cdpfs.fs.mutate import init_volume
from cdpfs.history.treehash import tree_hash
from cdpfs.store.lmdb import Store
from cdpfs.testing import LiveStore

START_NS = 1_700_000_000 * 10**9
DATA = random.Random(7).randbytes(300_000)  # two blocks and a part of a third

Writer = Callable[[LiveStore, int], None]  # writes file "f" (open as the handle given)


def _hash_of(tmp_path: Path, name: str, write: Writer, block_size: int | None = None,
             ) -> str:
    """The tree hash of a new volume holding only file "f", written by ``write``,
    its and the root's times set alike after (so only the content can differ)."""
    path = tmp_path / name
    if block_size is not None:
        init_volume(path, block_size=block_size).close()
    vol = LiveStore(path, existing=block_size is not None)
    try:
        fh, _ = vol.create(b"f")
        write(vol, fh)
        vol(vol.fs.release, fh)
        for ino in (1, _ino(vol)):
            vol(vol.fs.setattr, ino, mtime=START_NS)
        vol.sync()
        with vol.store.txn() as txn:
            return tree_hash(vol.store, txn, vol.seq())[0]
    finally:
        vol.close()


def _whole(vol: LiveStore, fh: int) -> None:
    vol(vol.fs.write, fh, 0, DATA)


def _small_writes(vol: LiveStore, fh: int) -> None:
    for off in range(0, len(DATA), 1000):  # each one a piece of a pack
        vol(vol.fs.write, fh, off, DATA[off:off + 1000])


def _patched(vol: LiveStore, fh: int) -> None:
    vol(vol.fs.write, fh, 0, bytes(len(DATA)))
    vol.sync()  # full blocks of zeros, then patches over them
    for off in range(0, len(DATA), 70_000):
        vol(vol.fs.write, fh, off, DATA[off:off + 70_000])


def _ino(vol: LiveStore) -> int:
    return int(vol(vol.fs.lookup, 1, b"f").ino)


def test_the_same_bytes_written_any_way_hash_alike(tmp_path: Path) -> None:
    whole = _hash_of(tmp_path, "whole", _whole)
    assert _hash_of(tmp_path, "small", _small_writes) == whole
    assert _hash_of(tmp_path, "patched", _patched) == whole
    assert _hash_of(tmp_path, "64k", _whole, block_size=64 * 1024) == whole
    assert _hash_of(tmp_path, "64k-small", _small_writes, block_size=64 * 1024) == whole

    def truncated(vol: LiveStore, fh: int) -> None:  # the block past the end keeps bytes
        vol(vol.fs.write, fh, 0, DATA + os.urandom(100_000))
        vol.sync()
        vol(vol.fs.setattr, _ino(vol), size=len(DATA))

    assert _hash_of(tmp_path, "truncated", truncated) == whole


def test_a_hole_hashes_as_the_zeros_it_reads_as(tmp_path: Path) -> None:
    def holes(vol: LiveStore, fh: int) -> None:
        vol(vol.fs.setattr, _ino(vol), size=200_000)
        vol(vol.fs.write, fh, 200_000, DATA)

    def zeros(vol: LiveStore, fh: int) -> None:
        vol(vol.fs.write, fh, 0, bytes(200_000) + DATA)

    assert _hash_of(tmp_path, "holes", holes) == _hash_of(tmp_path, "zeros", zeros)


def test_any_other_byte_hashes_otherwise(tmp_path: Path) -> None:
    whole = _hash_of(tmp_path, "whole", _whole)
    for i, at in enumerate((0, 131_071, 131_072, len(DATA) - 1)):
        changed = bytearray(DATA)
        changed[at] ^= 1

        def write(vol: LiveStore, fh: int, data: bytes = bytes(changed)) -> None:
            vol(vol.fs.write, fh, 0, data)

        assert _hash_of(tmp_path, f"changed{i}", write) != whole, at

    def longer(vol: LiveStore, fh: int) -> None:
        vol(vol.fs.write, fh, 0, DATA + bytes(1))

    assert _hash_of(tmp_path, "longer", longer) != whole


def test_a_block_missing_from_the_store_is_an_error_not_a_hash(tmp_path: Path) -> None:
    _hash_of(tmp_path, "vol", _whole)
    with Store(tmp_path / "vol") as store:
        with store.txn(write=True) as txn:
            first = next(txn.cursor(db=store.db["blocks"]).iternext(values=False))
            txn.delete(first, db=store.db["blocks"])
        with store.txn() as txn, pytest.raises(Corrupt, match="missing"):
            tree_hash(store, txn, 2**64 - 1)


def test_a_small_file_hashes_alike_in_a_pack_or_a_block(tmp_path: Path) -> None:
    small = DATA[:5000]

    def once(vol: LiveStore, fh: int) -> None:  # one piece of a pack, from offset 0
        vol(vol.fs.write, fh, 0, small)

    def pieces(vol: LiveStore, fh: int) -> None:
        for off in range(0, len(small), 999):
            vol(vol.fs.write, fh, off, small[off:off + 999])

    def block(vol: LiveStore, fh: int) -> None:  # a full block, cut to the size
        vol(vol.fs.write, fh, 0, DATA[:131_072])
        vol.sync()
        vol(vol.fs.setattr, _ino(vol), size=len(small))

    want = _hash_of(tmp_path, "once", once)
    assert _hash_of(tmp_path, "pieces", pieces) == want
    assert _hash_of(tmp_path, "block", block) == want
    assert _hash_of(tmp_path, "other", lambda vol, fh: once(vol, fh) or
                    vol(vol.fs.write, fh, 4999, b"!")) != want


def test_the_walk_stops_when_its_check_says_so(tmp_path: Path) -> None:
    """What ``check`` raises ends the walk (a send cut short stops its hashing)."""
    _hash_of(tmp_path, "vol", _whole)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with Store(tmp_path / "vol") as store, store.txn() as txn:
        _, entries = tree_hash(store, txn, 2**64 - 1, check=lambda: None)
        with pytest.raises(KeyboardInterrupt):
            tree_hash(store, txn, 2**64 - 1, check=check)
    assert entries == 2 and len(calls) == 2
