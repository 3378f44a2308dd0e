"""Writable clones without a mount: a clone shows its base as of its point, keeps
its own changes apart from the base, survives a reopen and a prune of either
store, and holds its point in the base until it is deleted.

Real LMDB stores, the real engine and filesystem layer (``LiveStore``); a fake
wall clock ages the records for retention.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdpfs.errors import CdpfsError, Corrupt, StoreError
from cdpfs.history import bookmarks, clones
from cdpfs.history.moments import BadMoment
from cdpfs.history.points import resolve
from cdpfs.history.stats import space_stats
from cdpfs.history.treehash import tree_hash
from cdpfs.history.verify import verify
from cdpfs.replication import registry
from cdpfs.store.lmdb import Store
from cdpfs.store.view import View, open_view
from cdpfs.testing import FakeClock, LiveStore
from cdpfs.volume import prune

LATER = 400 * 86400 * 10**9  # past every bucket of the policy: only newest and holds stay


def _files(view: View, ino: int = 1, prefix: str = "") -> dict[str, bytes]:
    """Every regular file of the tree under ``ino`` with its content, by path."""
    out: dict[str, bytes] = {}
    for name, child in view.listdir(ino):
        path = prefix + name.decode()
        node = view.inode(child)
        assert node is not None, path
        if node.is_dir:
            out[path + "/"] = b""
            out.update(_files(view, child, path + "/"))
        else:
            out[path] = view.read(child, 0, node.size, node.size)
    return out


def _tree(store: Store, seq: int | None = None) -> dict[str, bytes]:
    with open_view(store, seq=seq) as view:
        return _files(view)


def _hash(store: Store, seq: int) -> str:
    with store.txn() as txn:
        return tree_hash(store, txn, seq)[0]


def _write(vol: LiveStore, path: str, data: bytes, off: int = 0) -> None:
    """Create (or open) ``path`` and write ``data`` at ``off``."""
    parent, name = _parent(vol, path)
    try:
        ino = vol(vol.fs.lookup, parent, name).ino
        fh = vol(vol.fs.open, ino, os.O_RDWR)
    except Exception:
        fh, _ = vol.create(name, parent)
    vol(vol.fs.write, fh, off, data)
    vol(vol.fs.release, fh)


def _parent(vol: LiveStore, path: str) -> tuple[int, bytes]:
    *dirs, name = path.encode().split(b"/")
    ino = 1
    for part in dirs:
        ino = vol(vol.fs.lookup, ino, part).ino
    return ino, name


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000 * 10**9)


@pytest.fixture
def base(tmp_path: Path, clock: FakeClock) -> tuple[Path, int, dict[str, bytes]]:
    """A closed base store with files, a directory, small and large writes; the seq of a
    past point M, the tree at M; and changes after M."""
    vol = LiveStore(tmp_path / "base", clock=clock)
    try:
        rng = random.Random(3)
        vol(vol.fs.mknod, 1, b"dir", stat.S_IFDIR | 0o755, 0, 0)
        for i in range(6):
            _write(vol, f"f{i}", rng.randbytes(rng.choice([100, 5000, 300_000])))
        _write(vol, "dir/inner", b"inner " * 1000)
        _write(vol, "f1", b"patched", 50)  # a patch over a full block
        vol(vol.fs.setxattr, vol(vol.fs.lookup, 1, b"f2").ino, b"user.tag", b"two")
        vol.sync()
        m = vol.seq()
        clock.advance(60)
        _write(vol, "f0", b"after M", 10)
        vol(vol.fs.unlink, 1, b"f3")
        _write(vol, "new-after-M", b"x")
        vol.sync()
    finally:
        vol.close()
    with Store(tmp_path / "base") as st:
        then = _tree(st, m)
    return tmp_path / "base", m, then


def test_a_clone_at_a_past_point_reads_as_the_base_did_then(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]]) -> None:
    path, m, then = base
    made = clones.make(path, tmp_path / "clone", f"#{m}")
    assert made.seq == m
    with Store(path) as st:
        base_hash = _hash(st, m)
    with Store(tmp_path / "clone") as clone:
        assert _tree(clone) == then
        assert _hash(clone, m) == base_hash
        with open_view(clone) as view:
            assert view.xattr(view.resolve("f2"), b"user.tag") == b"two"
        assert verify(clone) == []


def test_changes_to_a_clone_stay_in_the_clone_and_survive_a_reopen(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    """Random writes, truncates, renames, deletes and new files on the clone, against
    a model; the base's tree at M and its newest tree do not change."""
    path, m, then = base
    with Store(path) as st:
        base_newest = _tree(st)
        base_hash = _hash(st, m)
    clones.make(path, tmp_path / "clone", f"#{m}")
    model = dict(then)
    rng = random.Random(11)
    vol = LiveStore(tmp_path / "clone", existing=True, clock=clock)
    try:
        for step in range(200):
            files = sorted(p for p in model if not p.endswith("/"))
            kind = rng.choice(["write", "write", "truncate", "rename", "delete", "new"])
            if kind == "new" or not files:
                name = f"n{step}"
                data = rng.randbytes(rng.choice([10, 4000, 200_000]))
                _write(vol, name, data)
                model[name] = data
                continue
            victim = rng.choice(files)
            parent, name = _parent(vol, victim)
            ino = vol(vol.fs.lookup, parent, name).ino
            if kind == "write":
                off = rng.randrange(0, len(model[victim]) + 1000)
                data = rng.randbytes(rng.choice([1, 100, 4096, 140_000]))
                _write(vol, victim, data, off)
                old = bytearray(model[victim])
                old[len(old):off] = bytes(max(0, off - len(old)))
                old[off:off + len(data)] = data
                model[victim] = bytes(old)
            elif kind == "truncate":
                size = rng.randrange(0, len(model[victim]) + 1)
                vol(vol.fs.setattr, ino, size=size)
                model[victim] = model[victim][:size]
            elif kind == "rename":
                new = f"r{step}"
                vol(vol.fs.rename, parent, name, 1, new.encode(), 0)
                model[new] = model.pop(victim)
            else:
                vol(vol.fs.unlink, parent, name)
                del model[victim]
            if step % 50 == 0:
                vol.sync()
        vol.sync()
    finally:
        vol.close()
    with Store(tmp_path / "clone") as clone:
        assert _tree(clone) == model
        assert verify(clone) == []
        assert _tree(clone, m) == then, "the clone's own point M changed"
    with Store(path) as st:
        assert _hash(st, m) == base_hash
        assert _tree(st) == base_newest
        assert verify(st) == []


def test_prune_of_a_clone_keeps_what_it_shows_of_its_base(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    """Files the clone never touched, and removals of base files, outlive a prune of
    the clone long after, when only its newest point and its point M are kept."""
    path, m, then = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    vol = LiveStore(tmp_path / "clone", existing=True, clock=clock)
    try:
        vol(vol.fs.unlink, 1, b"f4")
        _write(vol, "dir/inner", b"CLONE", 3)
        _write(vol, "dir/added", b"added")
        vol(vol.fs.rename, 1, b"f5", 1, b"f5-renamed", 0)
        vol.sync()
        clock.advance(60)
        _write(vol, "dir/added", b"again")
        vol.sync()
        expect = _tree(vol.store)
    finally:
        vol.close()
    with Store(tmp_path / "clone") as clone:
        result = prune(clone, now_ns=time.time_ns() + LATER)
        assert result.versions > 0, "prune of the clone removed nothing"
        assert _tree(clone) == expect
        assert "f4" not in _tree(clone) and "f5-renamed" in _tree(clone)
        assert _tree(clone, m) == then
        assert verify(clone) == []


def test_the_base_keeps_the_point_until_the_clone_is_deleted(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    path, m, then = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    later = time.time_ns() + LATER  # past every bucket: only the newest and holds stay
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn:
            assert resolve(st, txn, f"#{m}", later).seq == m
        assert _tree(st, m) == then
    with Store(tmp_path / "clone") as clone:
        assert _tree(clone) == then
    gone = clones.delete(tmp_path / "clone")
    assert gone.seq == m and not (tmp_path / "clone").exists()
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn, pytest.raises(BadMoment):
            resolve(st, txn, f"#{m}", later)


def test_a_clone_moved_away_and_back_keeps_its_point(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    """Moving a clone does not release its hold: the base keeps the point while the
    clone is away, the clone works where it is, and deleting it there releases it."""
    path, m, then = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    (tmp_path / "away").mkdir()
    os.rename(tmp_path / "clone", tmp_path / "away" / "clone")
    later = time.time_ns() + LATER
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn:
            assert resolve(st, txn, f"#{m}", later).seq == m
            assert [(h.seq, h.present) for h in clones.held(st, txn)] == [(m, False)]
    with Store(tmp_path / "away" / "clone") as clone:  # it works where it is now
        assert _tree(clone) == then and verify(clone) == []
    os.rename(tmp_path / "away" / "clone", tmp_path / "clone")
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn:
            assert [(h.seq, h.present) for h in clones.held(st, txn)] == [(m, True)]
    with Store(tmp_path / "clone") as clone:
        assert _tree(clone) == then and verify(clone) == []
    os.rename(tmp_path / "clone", tmp_path / "away" / "clone")
    clones.delete(tmp_path / "away" / "clone")  # deleted elsewhere: its hold goes too
    with Store(path) as st, st.txn() as txn:
        assert clones.held(st, txn) == []


def test_a_clone_removed_by_hand_keeps_its_point_until_its_hold_is_released(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    path, m, _ = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    shutil.rmtree(tmp_path / "clone")
    later = time.time_ns() + LATER
    with Store(path) as st:
        assert prune(st, now_ns=later).holds == 0
        with st.txn() as txn:
            assert resolve(st, txn, f"#{m}", later).seq == m
    with pytest.raises(StoreError, match="no clone there"):
        clones.delete(tmp_path / "clone")
    assert clones.forget(path, tmp_path / "clone").seq == m
    with pytest.raises(StoreError, match="holds no point"):
        clones.forget(path, tmp_path / "clone")
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn, pytest.raises(BadMoment):
            resolve(st, txn, f"#{m}", later)


def test_verify_of_a_clone_finds_its_point_no_longer_held(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]]) -> None:
    path, m, _ = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    with Store(tmp_path / "clone") as clone:
        assert verify(clone) == []
    hold = bookmarks.clone_hold_name(tmp_path / "clone")
    with Store(path) as st, st.txn(write=True) as txn:
        with pytest.raises(BadMoment):  # a hold is not a bookmark a user deletes
            bookmarks.delete(st, txn, hold)
        bookmarks.release_clone(st, txn, hold)  # as a prune used to
    with Store(tmp_path / "clone") as clone:
        [problem] = verify(clone)
    assert f"clone point #{m} is not held by its base" in problem


_REWRITE = """
import sys
from pathlib import Path
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
with Store(Path(sys.argv[1])) as st, st.txn(write=True) as txn:
    rec = journal.get(st, txn, int(sys.argv[2]))
    journal.apply(st, txn, [rec._replace(ts=rec.ts + 1)])
"""


def test_a_clone_never_reads_another_history_of_its_base(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]]) -> None:
    """The base's record at the clone's point replaced (a failback, a store put back
    from elsewhere): an open clone fails its reads (Corrupt, EIO in a mount) instead
    of showing another state, and the clone is refused at its next opening."""
    path, m, then = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    clone = Store(tmp_path / "clone")
    try:
        assert _tree(clone) == then
        subprocess.run([sys.executable, "-c", _REWRITE, str(path), str(m)], check=True)
        with pytest.raises(Corrupt, match="no longer holds the history"):
            _tree(clone)
    finally:
        clone.close()
    with pytest.raises(StoreError, match="another history"):
        Store(tmp_path / "clone")


def test_bad_clone_requests_are_refused_and_change_nothing(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]], clock: FakeClock) -> None:
    path, _, _ = base
    later = time.time_ns() + LATER
    with Store(path) as st:
        prune(st, now_ns=later)
        with st.txn() as txn:
            marks = txn.stat(st.db["bookmarks"])["entries"]
    with pytest.raises(BadMoment, match=r"no record|thinned|kept"):
        clones.make(path, tmp_path / "c1", "#2", now_ns=later)  # pruned away
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="exists already"):
        clones.make(path, tmp_path / "taken")
    with pytest.raises(StoreError, match="not a clone"):
        clones.delete(path)
    with pytest.raises(StoreError, match="no such store directory"):
        clones.make(tmp_path / "nowhere", tmp_path / "c2")
    deep = tmp_path / ("d" * 200) / ("d" * 200) / ("d" * 200)
    deep.mkdir(parents=True)
    with pytest.raises(StoreError, match="too long a path for a clone"):
        clones.make(path, deep / "clone")  # its hold's name would be no LMDB key
    assert os.listdir(deep) == []
    shutil.rmtree(tmp_path / ("d" * 200))
    with pytest.raises(BadMoment):
        clones.make(path, tmp_path / "c3", "")  # '' is no moment (None is now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "taken"]
    with Store(path) as st, st.txn() as txn:
        assert txn.stat(st.db["bookmarks"])["entries"] == marks, "a refused clone left a hold"


def test_a_clone_is_never_replicated(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]]) -> None:
    """The rule is the library's (registry.register), whatever front end asks: a
    clone's history starts at its point, which a replica would lack."""
    path, m, _ = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    with pytest.raises(CdpfsError, match="a clone cannot be replicated"):
        registry.register(tmp_path / "clone", "r1", "h:1")
    assert registry.overview(tmp_path / "clone")[0] == []
    registry.register(path, "r1", "h:1", "sync", 1000)  # the base can be
    states, last = registry.overview(path)
    assert [(s.name, s.address, s.mode, s.limit) for s in states] == [("r1", "h:1", "sync", 1000)]
    assert last > m
    registry.unregister(path, "r1")
    with pytest.raises(CdpfsError, match=r"has no replica 'r1' \(it has: none\)"):
        registry.unregister(path, "r1")


def test_stat_of_a_clone_counts_its_base_files_and_its_own_bytes(
        tmp_path: Path, base: tuple[Path, int, dict[str, bytes]]) -> None:
    path, m, then = base
    clones.make(path, tmp_path / "clone", f"#{m}")
    with Store(tmp_path / "clone") as clone:
        before = space_stats(clone)
    vol = LiveStore(tmp_path / "clone", existing=True)
    try:
        _write(vol, "big", random.Random(1).randbytes(1 << 20))
        vol.sync()
    finally:
        vol.close()
    with Store(tmp_path / "clone") as clone:
        after = space_stats(clone)
    files = [p for p in then if not p.endswith("/")]
    assert before.live_files == len(files)
    assert before.live_bytes == sum(len(then[p]) for p in files)
    assert before.clone_of == str(path) and before.clone_seq == m
    assert before.stored_bytes < 4096, "a new clone stores nothing of its own"
    assert after.live_files == len(files) + 1
    assert after.stored_bytes >= 1 << 20


def test_a_scheduled_dr_test_is_overdue_after_two_missed_periods() -> None:
    from cdpfs.drtests import Result

    day = 86400
    now = time.time_ns()
    ran = Result(now - int(1.5 * day * 1e9), 7, True, 3.0, "s.toml", every=day)
    assert not ran.overdue(now)
    assert ran.overdue(now + int(0.6 * day * 1e9))
    assert not Result(now - 10 * day * 10**9, 7, True, 3.0, "s.toml").overdue(now)
