"""Resolving a tool's path argument as the kernel would, on plain directories.

A directory stands for a mounted volume (``resolve`` takes the volume roots and
their devices); the walk must end where the kernel would and refuse, with one
line naming the path and why, whatever leaves the volume it has entered: ``..``
above its root, links in it that lead out or into another volume, a root on
another device than its mount. Paths that stay inside work however they are
spelled. The same rules on a real FUSE mount, for every tool, are in
``test_t3_confinement.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdpfs.errors import CdpfsError
from cdpfs.fs.mutate import init_volume
from cdpfs.tools.locate import locate, resolve


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """parent/vol (a volume) with d/f, b and links; parent/sentinel; other (a second
    volume); alias -> parent/vol (a link outside both)."""
    parent, other = tmp_path / "parent", tmp_path / "other"
    vol = parent / "vol"
    (vol / "d").mkdir(parents=True)
    other.mkdir()
    (vol / "d" / "f").write_bytes(b"f")
    (vol / "b").write_bytes(b"b")
    (parent / "sentinel").write_bytes(b"not in a volume")
    (other / "g").write_bytes(b"g")
    os.symlink("..", vol / "up")                     # to the mount's parent
    os.symlink(str(parent), vol / "absup")           # the same, absolute
    os.symlink(str(other), vol / "into-other")       # into another volume
    os.symlink("d", vol / "dl")                      # inside, relative
    os.symlink(str(vol / "d"), vol / "abs-d")        # inside, absolute
    os.symlink("../vol/d", vol / "out-and-back")     # out by '..' and back in
    os.symlink("loop2", vol / "loop1")
    os.symlink("loop1", vol / "loop2")
    os.symlink(str(vol), tmp_path / "alias")
    return {"tmp": tmp_path, "parent": parent, "vol": vol, "other": other}


def _roots(t: dict[str, Path]) -> dict[str, int]:
    return {str(t[k]): os.stat(t[k]).st_dev for k in ("vol", "other")}


def _refused(path: Path | str, roots: dict[str, int], **kw: bool) -> str:
    with pytest.raises(CdpfsError) as caught:
        resolve(path, roots, **kw)
    msg = str(caught.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg


def test_paths_that_stay_inside_resolve_as_the_kernel_would(
        tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    vol, roots = tree["vol"], _roots(tree)
    for spelled, want in [(vol / "d" / ".." / "b", vol / "b"),
                          (f"{vol}/d/./f", vol / "d" / "f"),
                          (f"{vol}//d/", vol / "d"),
                          (vol / "d" / "..", vol),
                          (vol, vol),
                          (vol / "gone" / "f", vol / "gone" / "f")]:  # may have existed then
        place = resolve(spelled, roots)
        assert (place.path, place.root) == (str(want), str(vol)), spelled
        assert place.dev == os.stat(vol).st_dev and not place.through_link
    monkeypatch.chdir(vol / "d")
    assert resolve("../b", roots).path == str(vol / "b")
    assert resolve("f", roots).path == str(vol / "d" / "f")


def test_links_inside_the_volume_that_stay_inside_are_followed(tree: dict[str, Path]) -> None:
    vol, roots = tree["vol"], _roots(tree)
    for spelled, want in [(vol / "dl" / "f", vol / "d" / "f"),
                          (vol / "abs-d" / "f", vol / "d" / "f"),
                          (vol / "dl" / ".." / "b", vol / "b")]:  # '..' of d, not of vol
        place = resolve(spelled, roots)
        assert (place.path, place.root, place.through_link) == (str(want), str(vol), True)
    # the last component is the entry itself: not followed (a tool acts on the link)
    for link in ("dl", "up", "absup", "into-other"):
        place = resolve(vol / link, roots)
        assert (place.path, place.root, place.through_link) == (str(vol / link), str(vol),
                                                                False)
    assert resolve(vol / "dl", roots, follow_last=True).path == str(vol / "d")


def test_links_outside_volumes_are_followed_freely(tree: dict[str, Path]) -> None:
    vol, alias, roots = tree["vol"], tree["tmp"] / "alias", _roots(tree)
    place = resolve(alias / "d" / "f", roots)
    assert (place.path, place.root, place.through_link) == (str(vol / "d" / "f"), str(vol),
                                                            False)
    assert resolve(alias, roots).path == str(vol)  # even as the last component
    outside = resolve(tree["parent"] / "sentinel", roots)
    assert (outside.root, outside.dev) == (None, None)


def test_what_leaves_the_volume_is_refused(tree: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vol, parent, roots = tree["vol"], tree["parent"], _roots(tree)
    for path in (f"{vol}/..", f"{vol}/d/../..", f"{vol}/d/../../sentinel", f"{vol}/../vol"):
        assert f"'..' leads out of the volume mounted on {vol}" in _refused(path, roots)
    for path, link in [(vol / "up" / "sentinel", "up"), (vol / "absup" / "sentinel", "absup"),
                       (vol / "up" / "vol" / "b", "up"),  # out and back: still refused
                       (vol / "into-other" / "g", "into-other"),
                       (vol / "out-and-back" / "f", "out-and-back"),
                       (vol / "dl" / ".." / "up" / "x", "up")]:
        msg = _refused(path, roots)
        assert f"the symbolic link {vol / link} leads out of the volume mounted on {vol}" \
            in msg, msg
    # a link as the last component, followed to see where it leads (tools that take
    # the volume a path is in)
    for link in ("up", "absup", "into-other"):
        assert "leads out of the volume" in _refused(vol / link, roots, follow_last=True)
    assert "too many levels of symbolic links" in _refused(vol / "loop1" / "x", roots)
    monkeypatch.chdir(vol / "d")
    assert "'..' leads out" in _refused("../..", roots)
    assert "'..' leads out" in _refused("../../sentinel", roots)
    # a volume root on another device than its mount's (something mounted over it)
    wrong = {str(vol): os.stat(vol).st_dev + 1}
    assert "another filesystem is mounted over the volume" in _refused(vol / "b", wrong)
    with pytest.raises(CdpfsError, match="empty path"):
        resolve("", roots)
    # nothing was touched
    assert sorted(os.listdir(parent)) == ["sentinel", "vol"]
    assert (parent / "sentinel").read_bytes() == b"not in a volume"


def test_a_path_relative_to_a_store_may_not_climb_out(tmp_path: Path) -> None:
    """``log``/``diff --store STORE PATH``: PATH is relative to the volume root."""
    store = tmp_path / "s.store"
    init_volume(store).close()
    assert locate(Path("a/../b/./c"), store).rel == "b/c"
    assert locate(Path("/a/b"), store).rel == "a/b"
    assert locate(Path("."), store).rel == ""
    for path in ("..", "a/../..", "../s.store"):
        with pytest.raises(CdpfsError, match="leads out of the volume"):
            locate(Path(path), store)
