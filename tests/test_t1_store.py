"""The volume engine without FUSE: versioned state, blocks, space per write.

These tests drive the real filesystem layer (``FileSystem`` on the engine's
engine, a real LMDB store in a temp dir) and read every past state back
through ``open_view``.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdpfs.errors import FsError, StoreError
from cdpfs.fs.mutate import init_volume
from cdpfs.store.lmdb import Store
from cdpfs.store.view import open_view
from cdpfs.testing import LiveStore

BS = 128 * 1024


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveStore]:
    vol = LiveStore(tmp_path / "store")
    try:
        yield vol
    finally:
        vol.close()


def test_every_intermediate_state_reads_back(live: LiveStore) -> None:
    """Write, overwrite, truncate, rename, delete; every past seq is exact."""
    rng = random.Random(7)
    model: dict[bytes, bytearray] = {}
    points: list[tuple[int, dict[bytes, bytes]]] = []
    fh, ino = live.create(b"a")
    inos = {b"a": ino}
    fhs = {b"a": fh}
    model[b"a"] = bytearray()
    for step in range(300):
        name = rng.choice(sorted(model))
        action = rng.random()
        data = model[name]
        if action < 0.55:
            off = rng.randrange(0, len(data) + BS)
            n = rng.choice([1, 100, 4096, BS, BS + 17, 3 * BS])
            buf = rng.randbytes(n) if rng.random() < 0.5 else bytes([step % 251]) * n
            live(live.fs.write, fhs[name], off, buf)
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + n] = buf
        elif action < 0.7:
            size = rng.randrange(0, len(data) + 2 * BS)
            live(live.fs.setattr, inos[name], size=size)
            if size < len(data):
                del data[size:]
            else:
                data.extend(bytes(size - len(data)))
        elif action < 0.8 and len(model) < 6:
            new = b"f%d" % step
            fh, ino = live.create(new)
            inos[new], fhs[new], model[new] = ino, fh, bytearray()
        elif action < 0.9:
            new = b"r%d" % step
            live(live.fs.rename, 1, name, 1, new, 0)
            inos[new], fhs[new], model[new] = inos.pop(name), fhs.pop(name), model.pop(name)
        elif len(model) > 1:
            live(live.fs.unlink, 1, name)
            live(live.fs.release, fhs.pop(name))
            del model[name], inos[name]
        points.append((live.seq(), {k: bytes(v) for k, v in model.items()}))
    live.sync()
    for seq, state in points:
        with open_view(live.store, seq=seq) as view:
            assert sorted(name for name, _ in view.listdir(1)) == sorted(state), seq
            for name, content in state.items():
                assert view.read_file(name) == content, (seq, name)
                ino = view.resolve(name)
                node = view.inode(ino)
                assert node is not None
                # st_blocks: every block holding data, no hole, never past the size.
                data = [i for i in range(0, len(content), BS) if content[i : i + BS].strip(b"\0")]
                stored = [i for i in view.block_indices(ino) if view.allocated(ino, i)]
                assert node.blocks == len(stored) >= len(data), (seq, name)
                assert len(stored) <= -(-len(content) // BS), (seq, name)


def test_view_by_time_and_errors(live: LiveStore) -> None:
    import time

    fh, _ = live.create(b"t")
    live(live.fs.write, fh, 0, b"first")
    live.sync()
    t1 = time.time_ns()
    time.sleep(0.01)
    live(live.fs.write, fh, 0, b"SECOND")
    live.sync()
    with open_view(live.store, time_ns=t1) as view:
        assert view.read_file("t") == b"first"
    with open_view(live.store) as view:
        assert view.read_file("/t") == b"SECOND"
        with pytest.raises(FsError):
            view.resolve("missing/file")
    with pytest.raises(FsError), open_view(live.store, time_ns=1):
        pass


def test_identical_blocks_stored_once_and_holes_not_stored(live: LiveStore) -> None:
    block = os.urandom(BS)
    fh, _ = live.create(b"one")
    before = live(lambda: live.fs.m.stored_bytes)
    live(live.fs.write, fh, 0, block * 8)
    after_one = live(lambda: live.fs.m.stored_bytes)
    assert BS <= after_one - before <= BS + 64  # eight equal blocks: one stored
    fh2, _ = live.create(b"two")
    live(live.fs.write, fh2, 0, block)
    assert live(lambda: live.fs.m.stored_bytes) == after_one  # shared with "one"
    fh3, ino3 = live.create(b"sparse")
    live(live.fs.write, fh3, 10 * 2**30, b"x")
    live(live.fs.write, fh3, 0, bytes(4 * BS))  # zeros are holes, not blocks
    assert live(lambda: live.fs.m.stored_bytes) - after_one < 100
    live.sync()
    with open_view(live.store) as view:
        node = view.inode(ino3)
        assert node is not None and node.size == 10 * 2**30 + 1
        assert view.read(ino3, 10 * 2**30 - 5, 10, node.size) == bytes(5) + b"x"


def test_st_blocks_counts_data_not_holes(live: LiveStore) -> None:
    """A 3-byte write at 5 GiB allocates one block, not 5 GiB (what du shows)."""
    fh, ino = live.create(b"sparse")
    live(live.fs.write, fh, 5 * 2**30, b"end")
    node = live(live.fs.getattr, ino)
    assert node.size == 5 * 2**30 + 3
    assert node.st_blocks(BS) * 512 == BS
    fh2, ino2 = live.create(b"dense")
    live(live.fs.write, fh2, 0, os.urandom(8 * BS + 100))
    assert live(live.fs.getattr, ino2).st_blocks(BS) == (8 * BS + 100 + 511) // 512
    live(live.fs.write, fh2, 2 * BS, bytes(BS))  # a whole block of zeros is a hole
    assert live(live.fs.getattr, ino2).blocks == 8
    live(live.fs.setattr, ino2, size=3 * BS + 1)  # blocks 0, 1, 3 are left
    assert live(live.fs.getattr, ino2).blocks == 3
    live(live.fs.write, fh2, 2 * BS + 5, b"x")  # a small write into the hole
    assert live(live.fs.getattr, ino2).blocks == 4
    live(live.fs.setattr, ino2, size=0)
    assert live(live.fs.getattr, ino2).st_blocks(BS) == 0
    live.sync()
    with open_view(live.store) as view:  # what is committed, history included
        assert view.inode(ino) == node


def test_compressible_data_is_stored_compressed(live: LiveStore) -> None:
    text = b"".join(b"line %08d of a log file with some words\n" % i for i in range(20_000))
    fh, _ = live.create(b"log")
    live(live.fs.write, fh, 0, text)
    stored = live(lambda: live.fs.m.stored_bytes)
    assert stored < len(text) / 3


def _used(store: Store) -> int:
    return store.used_bytes()


def test_random_4k_writes_cost_at_most_twice_their_size(live: LiveStore) -> None:
    """Every version is kept, yet a 4 KiB write does not store a whole block again."""
    size = 64 * BS
    fh, _ = live.create(b"db")
    for off in range(0, size, BS):
        live(live.fs.write, fh, off, os.urandom(BS))
    live.sync()
    base = _used(live.store)
    rng = random.Random(1)
    n = 4000
    for _ in range(n):
        live(live.fs.write, fh, rng.randrange(0, size // 4096) * 4096, os.urandom(4096))
    live.sync()
    grown = _used(live.store) - base
    data_ratio = live(lambda: live.fs.m.stored_bytes) / (n * 4096 + size)
    per_write = grown / (n * 4096)
    assert per_write < 2.0 + 0.15, f"store grew {per_write:.2f}x the bytes written"
    assert data_ratio < 2.0


def test_sequential_writes_are_whole_blocks(live: LiveStore) -> None:
    fh, ino = live.create(b"seq")
    for i in range(32):  # 4 KiB appends, as an application writing a log would
        live(live.fs.write, fh, i * 4096, os.urandom(4096))
    chain = live(lambda: live.fs.view.chain(ino, 0))
    assert len(chain) <= 32 and chain[-1].kind == "F"
    for i in range(4):
        live(live.fs.write, fh, BS + i * BS, os.urandom(BS))
    for i in range(1, 5):
        chain = live(lambda i=i: live.fs.view.chain(ino, i))
        assert [e.kind for e in chain] == ["F"]


def test_store_init_refusals(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        init_volume(tmp_path / "full")
    init_volume(tmp_path / "s").close()
    with pytest.raises(StoreError, match="already"):
        init_volume(tmp_path / "s")
    with pytest.raises(StoreError, match="not a cdpfs store"):
        Store(tmp_path / "full")
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "nothing")


def test_kinds_of_nodes(live: LiveStore) -> None:
    e = live(live.fs.mknod, 1, b"dir", stat.S_IFDIR | 0o755, 0, 0)
    live(live.fs.mknod, e.ino, b"link", stat.S_IFLNK | 0o777, 0, 0, 0, b"../target")
    assert live(live.fs.readlink, live(live.fs.lookup, e.ino, b"link").ino) == b"../target"
    with pytest.raises(FsError):
        live(live.fs.mknod, 1, b"dir", stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(FsError):
        live(live.fs.mknod, 1, b"x" * 256, stat.S_IFREG | 0o644, 0, 0)


def test_map_grows_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start with a tiny LMDB map: writing far more than it holds just works."""
    import cdpfs.store.lmdb

    monkeypatch.setattr(cdpfs.store.lmdb, "MIN_MAP", 1 << 20)
    vol = LiveStore(tmp_path / "small", max_dirty=1 << 20)
    try:
        start = vol.store.env.info()["map_size"]
        fh, ino = vol.create(b"big")
        data = b"".join(os.urandom(BS) for _ in range(160))  # 20 MiB
        for off in range(0, len(data), 1 << 20):
            vol(vol.fs.write, fh, off, data[off : off + (1 << 20)])
        vol.sync()
        assert vol.store.used_bytes() > start / 2
        assert vol.store.env.info()["map_size"] > start
        with open_view(vol.store) as view:
            assert view.read(ino, 0, len(data), len(data)) == data
    finally:
        vol.close()


def test_a_store_being_created_is_never_seen_half_made(tmp_path: Path) -> None:
    """A reader that finds data.mdb (``is_store``) can open the store: a replica server
    creates its store while ``cdpfs status`` or a test may be looking at it (another
    process: LMDB allows one open of an environment per process)."""
    import subprocess
    import sys

    from cdpfs.store.lmdb import is_store

    paths = [tmp_path / f"s{i}" for i in range(30)]
    for path in paths:
        path.mkdir()
        (path / "tls").mkdir()  # made beforehand by 'cdpfs replica keygen'
    maker = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from cdpfs.store.lmdb import Store\n"
        "for p in sys.argv[1:]:\n"
        "    Store.create(p).close()\n"
        "    time.sleep(0.01)\n"), *map(str, paths)])
    opened: set[Path] = set()
    try:
        while len(opened) < len(paths) and (maker.poll() is None or not opened):
            for path in paths:
                if path not in opened and is_store(path):
                    with Store(path, readonly=True) as st:  # StoreError if half made
                        assert st.block_size > 0
                    opened.add(path)
    finally:
        assert maker.wait(timeout=60) == 0
    for path in paths:
        assert is_store(path)
        assert sorted(p.name for p in path.iterdir()) in (["data.mdb", "lock.mdb", "tls"],
                                                          ["data.mdb", "tls"])
