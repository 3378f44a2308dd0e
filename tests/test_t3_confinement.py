"""Nothing writes outside its volume: every tool that takes a path in a mount,
attacked from the command line on a real FUSE mount.

The mount point lives in a directory of its own with a sentinel file beside it
(the store elsewhere). Each tool is given paths that leave the volume: ``MNT/..``,
``MNT/d/../..``, ``../..`` from inside, absolute paths outside, a symlink in the
volume to the mount's parent (and a path through it), one into another mount,
paths into ``@`` history; restore with and without ``--delete``. Every call must
be refused with exactly one line ``cdpfs: error: ...`` and exit status 1, and
afterwards the sentinel, the mount's parent, both volumes, their bookmarks and
settings are as they were. Another filesystem mounted inside the volume is
neither entered nor emptied, even by a restore of the whole volume.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import HAVE_FUSE
from harness import Volume, cdpfs, privileged, settle, store_seq
from test_t3_history import assert_same, contents, one_line_error, tree_state

from cdpfs.errors import CdpfsError
from cdpfs.mount.restore import restore_tree

pytestmark = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and CAP_SYS_ADMIN")


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    """A mounted volume whose mount point is ``parent/mnt``: the parent holds
    nothing of cdpfs (the store is elsewhere); afterwards unmounted and verified."""
    v = Volume(tmp_path)
    v.mnt = tmp_path / "parent" / "mnt"
    v.mnt.mkdir(parents=True)
    v.init()
    try:
        v.mount()
        yield v
    finally:
        try:
            if os.path.ismount(v.mnt):
                v.umount()
        finally:
            v.cleanup()
    v.verify()
    bad = v.problems()
    assert not bad, "the mount logged errors:\n" + "\n".join(bad)


def _commands(path: str, clone: Path) -> list[list[str]]:
    """Every tool that takes a path in a mount, with ``path`` there."""
    return [["restore", path, "--at", "B"],
            ["restore", path, "--at", "B", "--delete"],
            ["rewind", path, "--at", "B", "--yes"],
            ["log", path], ["diff", "B", "now", path],
            ["bookmark", "X", "--volume", path],
            ["bookmark", "--delete", "keep", "--volume", path],
            ["bookmarks", "--volume", path],
            ["stat", path], ["prune", path],
            ["retention", path, "--keep-all", "1s"],
            ["config", path, "history=visible"],
            ["clone", path, str(clone)]]


def _state(vol: Volume, other: Volume) -> dict[str, object]:
    """What the attacks must leave as it was: the mount's parent (names, the
    sentinel's content and inode), both trees, the journal's end, bookmarks,
    retention and settings."""
    parent = vol.mnt.parent
    sentinel = os.lstat(parent / "sentinel")
    out: dict[str, object] = {
        "parent": sorted(os.listdir(parent)),
        "sentinel": ((parent / "sentinel").read_bytes(), sentinel.st_ino, sentinel.st_mtime_ns),
    }
    for v in (vol, other):
        settle(v.mnt)
        out[f"{v.store} seq"] = store_seq(v.store)
        for cmd in (["bookmarks", "--volume"], ["retention"], ["config"]):
            out[f"{v.store} {cmd[0]}"] = cdpfs(*cmd, v.store).stdout
    return out


def test_no_tool_leaves_its_volume(vol: Volume, make_volume: type[Volume],
                                   tmp_path: Path) -> None:
    m, parent = vol.mnt, vol.mnt.parent
    (m / "d" / "sub").mkdir(parents=True)
    (m / "a").write_bytes(b"a at B")
    (m / "d" / "sub" / "f").write_bytes(b"f at B")
    other = make_volume("other").init().mount()
    (other.mnt / "g").write_bytes(b"in another volume")
    cdpfs("bookmark", "B", "--volume", m)
    for v in (vol, other):
        cdpfs("bookmark", "keep", "--volume", v.mnt)
    # After B the volume differs from B, so a rewind or restore that acted on it shows.
    (m / "a").write_bytes(b"a now")
    (m / "new").write_bytes(b"new since B")
    os.symlink("..", m / "up")
    os.symlink(parent, m / "absup")
    os.symlink(other.mnt, m / "into-other")
    os.symlink("@B", m / "hist")
    (parent / "sentinel").write_bytes(b"belongs to no volume")
    clone = tmp_path / "clone.store"
    # Every tool with each of these; then more ways out with the tools that write.
    every = [f"{m}/..", f"{m}/d/../..", str(parent / "sentinel"),  # absolute, outside
             str(m / "up"), str(m / "up" / "sentinel")]  # a link to the parent, through it
    calls: list[tuple[list[str], Path | None]] = [
        (cmd, None) for path in every for cmd in _commands(path, clone)]
    P = "PATH"  # where the path goes in a command
    restore, delete = ["restore", P, "--at", "B"], ["restore", P, "--at", "B", "--delete"]
    rewind, stat = ["rewind", P, "--at", "B", "--yes"], ["stat", P]
    more: list[tuple[str, list[list[str]], Path | None]] = [
        (f"{m}/d/sub/../../..", [delete, rewind], None),
        ("../..", [delete, rewind, stat], m / "d"),  # relative, from inside the volume
        (str(parent), [delete, rewind], None),
        (str(m / "absup" / "sentinel"), [delete, stat], None),
        (str(m / "into-other"), [rewind, stat, ["bookmark", "X", "--volume", P]], None),
        (str(m / "into-other" / "g"), [delete, ["log", P]], None),
        (str(m / "@B" / "a"), [restore, rewind], None),  # into history
        (str(m / "hist" / "a"), [delete], None)]
    calls += [([path if a == P else a for a in tool], cwd) for path, tools, cwd in more
              for tool in tools]
    vol_tree, other_tree = tree_state(m, skip_at=True), tree_state(other.mnt)
    before = _state(vol, other)

    def run(call: tuple[list[str], Path | None]) -> tuple[list[str], Path | None,
                                                           subprocess.CompletedProcess[str]]:
        cmd, cwd = call
        try:
            return cmd, cwd, cdpfs(*cmd, check=False, timeout=120, cwd=cwd,
                                   stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:  # its directory is gone: an earlier call broke out
            return cmd, cwd, subprocess.CompletedProcess(cmd, -1, "", f"not run: {exc}")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, calls))
    bad = []
    for cmd, cwd, proc in results:
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 1 or len(lines) != 1 or not lines[0].startswith("cdpfs: error: "):
            where = f" (in {cwd})" if cwd else ""
            bad.append(f"cdpfs {' '.join(cmd)}{where}: exit {proc.returncode}\n"
                       f"  {proc.stdout.strip()[:300]}\n  {proc.stderr.strip()[-500:]}")
    assert not bad, f"{len(bad)} of {len(calls)} calls were not refused:\n" + "\n".join(bad)
    assert_same(tree_state(m, skip_at=True), vol_tree)
    assert_same(tree_state(other.mnt), other_tree)
    assert _state(vol, other) == before
    assert not os.path.lexists(clone)
    # Paths that stay inside still work, however spelled.
    cdpfs("restore", f"{m}/d/../a", "--at", "B")
    assert (m / "a").read_bytes() == b"a at B"
    cdpfs("rewind", f"{m}/d/..", "--at", "B", "--yes")
    assert contents(m) == {"a": b"a at B", "d/sub/f": b"f at B"}
    assert sorted(os.listdir(parent)) == ["mnt", "sentinel"]


@pytest.mark.skipif(not privileged(), reason="needs root to mount a tmpfs")
def test_a_filesystem_mounted_inside_the_volume_is_left_alone(vol: Volume) -> None:
    m = vol.mnt
    (m / "d" / "sub").mkdir(parents=True)
    (m / "d" / "sub" / "f").write_bytes(b"f at B")
    (m / "a").write_bytes(b"a at B")
    cdpfs("bookmark", "B", "--volume", m)
    (m / "a").write_bytes(b"a now")
    mounted: list[Path] = []
    try:
        for where in (m / "d", m):  # inside the volume, then over its root
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cdpfs-test", where],
                           check=True)
            mounted.append(where)
            (where / "t").write_bytes(b"on the tmpfs")
            if where == m:
                for cmd in (["restore", m / "a", "--at", "B"],
                            ["rewind", m, "--at", "B", "--yes"], ["stat", m]):
                    line = one_line_error(cdpfs(*cmd, check=False))
                    assert "another filesystem is mounted over the volume" in line, line
                continue
            for cmd in (["restore", m / "d", "--at", "B", "--delete"],
                        ["restore", m / "d" / "t", "--at", "B"],
                        ["restore", m / "d" / "sub", "--at", "B"],
                        ["rewind", m / "d", "--at", "B", "--yes"],
                        ["log", m / "d" / "t"], ["stat", m / "d"],
                        ["bookmark", "X", "--volume", m / "d"]):
                line = one_line_error(cdpfs(*cmd, check=False))
                assert f"another filesystem is mounted on {m / 'd'}" in line, line
            # The engine itself, given a path that the check above would refuse (as
            # if the mount appeared after it): it does not enter the mount either.
            with pytest.raises(CdpfsError, match="another filesystem is mounted there"):
                restore_tree(m / "@B" / "d" / "sub", m / "d" / "sub", src_root=m / "@B",
                             dst_root=m)
            # The whole volume: restored around the mount, which is neither entered
            # nor emptied (its one entry differs from B and would be removed).
            for cmd in (["restore", m, "--at", "B", "--delete"],
                        ["rewind", m, "--at", "B", "--yes"]):
                proc = cdpfs(*cmd, check=False)
                assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
                assert proc.stderr.strip().splitlines() == [
                    "cdpfs: warning: d: another filesystem is mounted there; left alone",
                    "cdpfs: error: 1 entries could not be restored"], proc.stderr
                assert os.listdir(m / "d") == ["t"]
                assert (m / "d" / "t").read_bytes() == b"on the tmpfs"
                assert (m / "a").read_bytes() == b"a at B"
        assert os.listdir(m) == ["t"]  # the tmpfs on top, untouched
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", where], check=True)
    assert contents(m) == {"a": b"a at B", "d/sub/f": b"f at B"}
