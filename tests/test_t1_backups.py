"""Backups in this process: a store with history backed up into a directory, verified
before it counts, kept N at a time, listed; damaged backups never count.

A volume is written over simulated time (``test_t1_stream``'s writer: creates,
overwrites, renames, deletes); ``backups.make`` writes its whole kept history as a
send stream into a directory and checks it by receiving it into a scratch store.
Received again, a backup gives a store with every point of the volume. A byte
flipped in the file after it was written and before it was verified makes the
backup fail: no file under a backup name, recorded as failed, not counted towards
``keep``. Real stores and the real engine; no FUSE.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict
from pathlib import Path

import pytest
from test_t1_stream import make_volume, points, write

from cdpfs import backups
from cdpfs.backups import Backup, BackupError
from cdpfs.history import bookmarks
from cdpfs.history.treehash import tree_hash
from cdpfs.replication import stream
from cdpfs.store import journal
from cdpfs.store.lmdb import Store


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _flip(path: Path, where: float) -> None:
    """Flip one bit of the byte at fraction ``where`` of the file."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(int(size * where))
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def test_a_backup_verifies_and_gives_back_every_point(tmp_path: Path) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    live, _, _, _ = make_volume(tmp_path / "src", rounds=40)
    with live:
        src = live.store
        with src.txn(write=True) as txn:
            bookmarks.put(src, txn, "before-backup", journal.top(src, txn))
            top, ts = journal.top(src, txn), journal.ts(src, txn, journal.top(src, txn))
        made = backups.make(src, out)
        assert made.verified and not made.failed, made
        assert (made.seq, made.point_ts, made.volume) == (top, ts, src.uuid)
        name = backups.name_of(src.uuid, ts, "send")
        assert made.path == str(out / name) and _files(out) == [name, name + ".json"]
        assert name.startswith(src.uuid[:8] + "-") and name.endswith("Z.cdpfs")
        assert made.size == (out / name).stat().st_size and made.tree == points(src)[top]
        record = Backup.of(json.loads((out / (name + ".json")).read_text()))
        assert record == made
        kept = backups.schedule(src)
        assert kept.last == made and kept.verified == made and not kept.overdue(made.made_at)
        want = points(src)
    # Received again, the backup is the volume's whole kept history.
    with open(out / name, "rb") as f:
        got = stream.receive_file(tmp_path / "restored", f)
    assert got.tree == made.tree and got.to_seq == top
    with Store(tmp_path / "restored") as restored:
        assert points(restored) == want and len(want) > 30
        with restored.txn() as txn:
            assert [b.name for b in bookmarks.bookmarks(restored, txn)] == ["before-backup"]
    listed = backups.listing(out)
    assert [(b.path.name, b.verified, b.state()) for b in listed] == [(name, True, "verified")]


def test_keep_n_deletes_the_oldest_verified_backups_only(tmp_path: Path) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    live, clock, rnd, names = make_volume(tmp_path / "src", rounds=10)
    made: list[Backup] = []
    with live:
        for _ in range(4):
            write(live, clock, rnd, names, 3)
            made.append(backups.make(live.store, out, keep=2))
            assert made[-1].verified, made[-1]
        # Files that are not verified backups of this volume are neither counted nor
        # deleted: one without a record, one changed since it verified.
        stray = out / backups.name_of("0" * 8, made[0].point_ts, "send")
        stray.write_bytes(b"not a backup")
        changed = Path(made[-2].path)
        with open(changed, "ab") as f:
            f.write(b"x")
        write(live, clock, rnd, names, 3)
        newest = backups.make(live.store, out, keep=2)
        assert newest.verified
    listed = backups.listing(out)
    assert [b.path for b in listed] == [stray, changed, *(Path(b.path) for b in
                                                          (made[-1], newest))]
    assert [b.verified for b in listed] == [False, False, True, True]
    assert listed[0].state() == "not verified (no record beside it)"
    assert listed[1].state().startswith("CHANGED since it verified")
    assert all(not Path(b.path).exists() for b in made[:2])
    assert sorted(backups.prune_kept(out, newest.volume, 0)) == [Path(made[-1].path)]
    assert Path(newest.path).exists()  # the newest verified one is always kept


@pytest.mark.parametrize("where", [0.0001, 0.3, 0.6, 0.97, 0.9999])
@pytest.mark.parametrize("fmt", ["send", "tar"])
def test_a_damaged_backup_never_counts(tmp_path: Path, fmt: str, where: float) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    live, clock, rnd, names = make_volume(tmp_path / "src", rounds=20)
    with live:
        good = backups.make(live.store, out, fmt=fmt, keep=1)
        before = _files(out)
        write(live, clock, rnd, names, 5)
        bad = backups.make(live.store, out, fmt=fmt, keep=1,
                           on_written=lambda p: _flip(p, where))
        assert not bad.verified and bad.path == "", bad
        assert "does not verify" in bad.failed, bad.failed
        assert bad.seq > good.seq and bad.size
        # No file under a backup name, nothing temporary left, the good one kept.
        assert _files(out) == before
        kept = backups.schedule(live.store)
        assert kept.last == bad and kept.verified == good
    # The same check of a damaged copy of a good backup fails too.
    copy = tmp_path / f"copy.{fmt}"
    shutil.copy(good.path, copy)
    backups.verify(copy, good, tmp_path / "scratch")  # the copy as it is verifies
    _flip(copy, where)
    with pytest.raises(BackupError, match="does not verify"):
        backups.verify(copy, good, tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


def test_a_tar_backup_verifies_by_the_tree_it_gives_back(tmp_path: Path) -> None:
    """Imported into a scratch volume, a tar must give the point's tree (without
    sockets, which a tar cannot hold: they are counted)."""
    out = tmp_path / "backups"
    out.mkdir()
    live, _, _, _ = make_volume(tmp_path / "src", rounds=30)
    with live:
        live(live.fs.mknod, 1, b"sock", stat.S_IFSOCK | 0o755, 0, 0)
        live(live.fs.setxattr, 1, b"user.where", b"root")
        fh, _ = live.create(b"sparse")
        live(live.fs.write, fh, 5 << 20, b"end")
        live(live.fs.release, fh)
        live.sync()
        tar = backups.make(live.store, out, fmt="tar")
        send = backups.make(live.store, out, fmt="send")
        with live.store.txn() as txn:
            without = tree_hash(live.store, txn, tar.seq, sockets=False)[0]
    assert tar.verified and send.verified and tar.seq == send.seq, (tar, send)
    assert tar.left_out == 1 and tar.tree == without != send.tree
    assert Path(tar.path).name == Path(send.path).name.replace(".cdpfs", ".tar")
    assert tar.size < 2 << 20  # the hole went as a hole
    assert [(b.record.format if b.record else "") for b in backups.listing(out)] == \
        ["tar", "send"]
    # The same tar verified as a send stream: not one.
    with pytest.raises(BackupError, match="not a cdpfs send stream"):
        backups.verify(Path(tar.path), Backup.of({**asdict(tar), "format": "send"}),
                       tmp_path / "scratch")


def test_a_backup_is_checked_against_its_own_point(tmp_path: Path) -> None:
    """Bytes added after the end, or a backup of another point: not verified."""
    out = tmp_path / "backups"
    out.mkdir()
    live, _, _, _ = make_volume(tmp_path / "src", rounds=10)
    with live:
        good = backups.make(live.store, out)
    copy = tmp_path / "copy.cdpfs"
    shutil.copy(good.path, copy)
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackupError, match="bytes after the stream's end"):
        backups.verify(copy, good, tmp_path / "scratch")
    other = Backup.of({**json.loads(Path(good.path + ".json").read_text()), "tree": "0" * 64})
    with pytest.raises(BackupError, match="tree hash"):
        backups.verify(Path(good.path), other, tmp_path / "scratch")
    wrong_seq = Backup.of({**json.loads(Path(good.path + ".json").read_text()),
                           "seq": good.seq + 1})
    with pytest.raises(BackupError, match=f"at #{good.seq}, not .* at #{good.seq + 1}"):
        backups.verify(Path(good.path), wrong_seq, tmp_path / "scratch")


def test_a_point_backed_up_again_replaces_its_backup(tmp_path: Path) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    live, _, _, _ = make_volume(tmp_path / "src", rounds=10)
    with live:
        first = backups.make(live.store, out, keep=3)
        again = backups.make(live.store, out, keep=3)
    assert first.path == again.path and again.verified and again.made_at > first.made_at
    assert [b.record for b in backups.listing(out)] == [again]


def test_what_killed_backups_left_is_removed_and_bad_directories_refused(
        tmp_path: Path) -> None:
    out = tmp_path / "backups"
    out.mkdir()
    dead = 4_000_000_000  # above any pid
    (out / f"{backups.TEMP}{dead}-ab12.cdpfs").write_bytes(b"half")
    (out / f"{backups.TEMP}{dead}-ab12.verify").mkdir()
    (out / f"{backups.TEMP}{dead}-ab12.verify" / "x").write_bytes(b"x")
    mine = out / f"{backups.TEMP}{os.getpid()}-cd34.cdpfs"  # a backup under way: left
    mine.write_bytes(b"busy")
    assert backups.listing(out) == []
    assert len(backups.sweep(out)) == 2 and _files(out) == [mine.name]
    live, _, _, _ = make_volume(tmp_path / "src", rounds=5)
    with live:
        with pytest.raises(BackupError, match="no such directory"):
            backups.backup(tmp_path / "nowhere", tmp_path / "nowhere")
        missing = backups.make(live.store, tmp_path / "nowhere")
        assert not missing.verified and "no such directory" in missing.failed
        odd = tmp_path / os.fsdecode(b"not-utf8-\xff")
        odd.mkdir()
        refused = backups.make(live.store, odd)
        assert "valid UTF-8" in refused.failed and not os.listdir(odd)
        with pytest.raises(BackupError, match="--format zip"):
            backups.make(live.store, out, fmt="zip")
    with pytest.raises(BackupError, match="not a directory of backups"):
        backups.listing(tmp_path / "nowhere")
    with pytest.raises(BackupError, match="not a directory of backups"):
        backups.listing(mine)


def test_overdue_after_two_missed_periods() -> None:
    s = 10**9
    done = Backup("v", 5, 1, "send", 100 * s, verified=True, every=10)
    failed = Backup("v", 6, 2, "send", 125 * s, failed="disk full", every=10)
    assert not backups.Schedule(done, done).overdue(119 * s)
    assert backups.Schedule(done, done).overdue(121 * s)
    assert backups.Schedule(failed, done).overdue(126 * s)  # the failed one does not count
    assert not backups.Schedule(failed, None).overdue(140 * s)
    assert backups.Schedule(failed, None).overdue(146 * s)
    manual = Backup("v", 5, 1, "send", 100 * s, verified=True)
    assert not backups.Schedule(manual, manual).overdue(10**6 * s)
