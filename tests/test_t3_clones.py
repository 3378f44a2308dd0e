"""Writable clones on real mounts: ``cdpfs clone`` of a past moment of a mounted
volume, mounted read-write beside it, changed, remounted, inspected with the
history tools, and deleted; the base never changes and keeps the moment only
while the clone exists.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HAVE_FUSE
from harness import Volume, cdpfs, force_unmount, store_seq
from test_t3_history import assert_same, one_line_error, tree_state

from cdpfs.history.moments import BadMoment
from cdpfs.history.points import resolve
from cdpfs.history.treehash import tree_hash
from cdpfs.store.lmdb import Store

pytestmark = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and CAP_SYS_ADMIN")


def _hash(store: Path, seq: int) -> str:
    with Store(store, readonly=True) as st, st.txn() as txn:
        return tree_hash(st, txn, seq)[0]


def _kept(store: Path, seq: int) -> bool:
    """Whether the store still keeps point ``seq`` (resolvable as ``#seq``)."""
    with Store(store, readonly=True) as st, st.txn() as txn:
        try:
            return resolve(st, txn, f"#{seq}").seq == seq
        except BadMoment:
            return False


def _fill(mnt: Path) -> None:
    """Files of every kind: small and large, a hard link, a symlink, an xattr, a tree."""
    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "small.txt").write_text("small\n")
    (mnt / "big.bin").write_bytes(os.urandom(3 << 20))
    (mnt / "dir" / "sub" / "deep.txt").write_text("deep " * 5000)
    os.link(mnt / "small.txt", mnt / "dir" / "hardlink")
    os.symlink("../small.txt", mnt / "dir" / "link")
    os.setxattr(mnt / "small.txt", "user.colour", b"blue")
    with open(mnt / "big.bin", "r+b") as f:  # a patch over full blocks
        f.seek(1000)
        f.write(b"patched")
    subprocess.run(["sqlite3", str(mnt / "app.db"),
                    "create table t(x); insert into t values (1), (2), (3);"], check=True)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Volume]:
    vol = Volume(tmp_path, "base").init()
    try:
        vol.mount()
        yield vol
        vol.umount()
    finally:
        vol.cleanup()


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Volume]:
    """The clone's paths (not made yet); whatever is mounted there is unmounted after."""
    vol = Volume(tmp_path, "clone")
    try:
        yield vol
    finally:
        if os.path.ismount(vol.mnt):
            cdpfs("umount", vol.mnt, check=False)
        force_unmount(vol.mnt)


def test_a_clone_of_a_past_moment_is_that_moment_writable(base: Volume, clone: Volume) -> None:
    _fill(base.mnt)
    base.sync()
    m = base.last_seq()
    want = tree_state(base.mnt / f"@#{m}")
    m_hash = _hash(base.store, m)
    # The base goes on changing after M.
    (base.mnt / "small.txt").write_text("changed after M\n")
    (base.mnt / "dir" / "sub" / "deep.txt").unlink()
    base.sync()

    out = cdpfs("clone", base.mnt, clone.store, "--at", f"#{m}").stdout
    assert f"as of #{m}" in out
    clone.mount()
    assert_same(tree_state(clone.mnt), want)
    assert subprocess.run(["sqlite3", str(clone.mnt / "app.db"), "select sum(x) from t"],
                          capture_output=True, text=True, check=True).stdout.strip() == "6"

    # Change the clone every way a user can.
    (clone.mnt / "small.txt").write_text("the clone's own\n")  # also through the hard link
    with open(clone.mnt / "big.bin", "r+b") as f:
        f.truncate(1 << 20)
        f.seek(5000)
        f.write(b"clone write")
        os.fsync(f.fileno())
    os.rename(clone.mnt / "dir" / "sub", clone.mnt / "moved")
    (clone.mnt / "dir" / "link").unlink()
    os.removexattr(clone.mnt / "small.txt", "user.colour")
    (clone.mnt / "new.txt").write_text("new in the clone\n")
    subprocess.run(["sqlite3", str(clone.mnt / "app.db"), "insert into t values (10)"],
                   check=True)
    changed = tree_state(clone.mnt)
    clone.umount()
    clone.mount()
    assert_same(tree_state(clone.mnt), changed)
    assert (clone.mnt / "dir" / "hardlink").read_text() == "the clone's own\n"

    # The base did not change: at M, nor now.
    assert _hash(base.store, m) == m_hash
    assert (base.mnt / "small.txt").read_text() == "changed after M\n"
    assert os.getxattr(base.mnt / "small.txt", "user.colour") == b"blue"
    assert (base.mnt / "dir" / "link").is_symlink()

    # History of the clone's own changes, from its point M on.
    assert_same(tree_state(clone.mnt / f"@#{m}"), want)
    log = cdpfs("log", clone.mnt / "new.txt").stdout
    assert "new.txt" in log or "write" in log, log
    diff = cdpfs("diff", f"#{m}", "now", "--store", clone.store).stdout
    assert "new.txt" in diff and "moved" in diff, diff
    clone.umount()
    clone.verify()
    stat = cdpfs("stat", clone.store).stdout
    assert f"clone of         {base.store}" in stat and f"#{m}" in stat, stat


def test_delete_refuses_a_mounted_clone_and_a_store_that_is_not_one(
        base: Volume, clone: Volume) -> None:
    (base.mnt / "f").write_text("x")
    base.sync()
    cdpfs("clone", base.store, clone.store)
    clone.mount()
    line = one_line_error(cdpfs("clone", "--delete", clone.store, check=False))
    assert "unmount it first" in line, line
    line = one_line_error(cdpfs("clone", "--delete", base.store, check=False))
    assert "not a clone" in line, line
    clone.umount()
    out = cdpfs("clone", "--delete", clone.store).stdout
    assert "deleted clone" in out and not clone.store.exists()
    assert (base.mnt / "f").read_text() == "x"


def test_bad_clone_requests_are_one_line_and_change_nothing(
        base: Volume, clone: Volume, tmp_path: Path) -> None:
    (base.mnt / "f").write_text("x")
    base.sync()
    seq = store_seq(base.store)
    taken = tmp_path / "taken"
    taken.mkdir()
    other = tmp_path / "other"
    cdpfs("clone", base.store, other)
    cases = [
        (["replica", "add", other, "r1", "--address", "127.0.0.1:1"], "cannot be replicated"),
        (["clone", base.store, taken], "exists already"),
        (["clone", base.store, clone.store, "--at", f"#{seq + 50}"], "no record"),
        (["clone", base.store, clone.store, "--at", "yesterday-ish"], ""),
        (["clone", tmp_path / "nowhere", clone.store], ""),
        (["clone", base.mnt / "f", clone.store], "not a path inside it"),
        (["clone", "--delete", tmp_path / "nowhere"], ""),
    ]
    for args, words in cases:
        line = one_line_error(cdpfs(*args, check=False))
        assert words in line, (args, line)
    assert not clone.store.exists() and os.listdir(taken) == []
    assert store_seq(base.store) == seq
    cdpfs("clone", "--delete", other)
    with Store(base.store, readonly=True) as st, st.txn() as txn:
        holds = [bytes(k) for k, _ in txn.cursor(db=st.db["bookmarks"])]
    assert not [h for h in holds if b"clone" in h], holds


def _clone_then_keep_nothing(base: Volume, clone: Volume) -> int:
    """A clone of "version 1" of ``f`` at #M (returned), "version 2" written since,
    and the base's retention set to keep no past moment."""
    (base.mnt / "f").write_text("version 1")
    base.sync()
    m = base.last_seq()
    cdpfs("clone", base.store, clone.store, "--at", f"#{m}")
    (base.mnt / "f").write_text("version 2")
    base.sync()
    cdpfs("retention", base.store, "--keep-all", "0s", "--minutely", "0s",
          "--hourly", "0s", "--daily", "0s")
    return m


def test_the_base_keeps_the_moment_while_the_clone_exists(base: Volume, clone: Volume) -> None:
    """After the clone is deleted, the base can prune its moment; while it exists,
    the clone mounts and reads it whatever the base has pruned since."""
    m = _clone_then_keep_nothing(base, clone)
    cdpfs("prune", base.mnt)
    # (Not through base.mnt/@#M: the base mount would hold the moment while the
    # kernel keeps that directory.)
    assert _kept(base.store, m)
    clone.mount()
    assert (clone.mnt / "f").read_text() == "version 1"
    clone.umount()
    cdpfs("clone", "--delete", clone.store)
    cdpfs("prune", base.mnt)
    assert not _kept(base.store, m)
    assert (base.mnt / "f").read_text() == "version 2"
    base.sync()
    base.verify()


def test_a_moved_clone_keeps_its_moment_and_one_removed_by_hand_is_released_by_name(
        base: Volume, clone: Volume, tmp_path: Path) -> None:
    """A clone moved away keeps the base's moment through prunes and mounts where it
    is; status and verify of the base say no clone is at the path it was made at;
    one removed by hand keeps the moment until clone --delete CLONE --base BASE."""
    m = _clone_then_keep_nothing(base, clone)
    (tmp_path / "elsewhere").mkdir()
    moved = Volume(tmp_path / "elsewhere", "clone")  # same names, another directory
    try:
        os.rename(clone.store, moved.store)
        cdpfs("prune", base.mnt)
        assert _kept(base.store, m)
        status = cdpfs("status", base.store).stdout
        assert f"clone        {clone.store} holds #{m}; no clone of this store is there" \
            in status, status
        note = cdpfs("verify", base.store).stdout
        assert f"note: #{m} is held for a clone made at {clone.store}" in note, note
        moved.mount()
        assert (moved.mnt / "f").read_text() == "version 1"
        moved.umount()
        moved.verify()
    finally:
        force_unmount(moved.mnt)
    subprocess.run(["rm", "-rf", str(moved.store)], check=True)  # removed by hand
    cdpfs("prune", base.mnt)
    assert _kept(base.store, m)
    line = one_line_error(cdpfs("clone", "--delete", clone.store, check=False))
    assert "--base" in line, line
    out = cdpfs("clone", "--delete", clone.store, "--base", base.store).stdout
    assert f"released the hold {base.store} kept for the clone removed from {clone.store}" \
        in out, out
    cdpfs("prune", base.mnt)
    assert not _kept(base.store, m)
    assert "clone " not in cdpfs("status", base.store).stdout
