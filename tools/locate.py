"""Find which store and volume path a user's argument names.

Tools take either a store directory or a path inside a mounted volume. A path in a
live mount names the store, the mount and a path in the volume; before reading the
store directly, ``settle`` asks the mount to commit what it has applied.

A path is resolved as the kernel would resolve it (:func:`resolve`), one component
at a time, and nothing that leaves the volume it enters is accepted: a ``..`` above
the volume's root, a symbolic link in the volume that leads out of it (or into
another mount), another filesystem mounted inside the volume or over it. Links on
the way to the mount point itself are followed freely.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cdpfs import system
from cdpfs.errors import CdpfsError
from cdpfs.mount.control import Mount, cdpfs_mounts, live_mount_of
from cdpfs.names import shown
from cdpfs.store.lmdb import is_store

MAX_LINKS = 40  # symbolic links followed in one path, as the kernel allows


@dataclass(frozen=True, slots=True)
class Target:
    """A store, where it is mounted live (if it is), and a path in the volume."""

    store: Path
    mount: Path | None
    rel: str  # relative to the volume root, "" for the root
    through_link: bool = False  # the path given went through a symlink inside the volume
    dev: int | None = None  # the st_dev of the mount (None if not mounted)

    def settle(self, strict: bool = False) -> None:
        """Make the live mount commit everything written to it: what the kernel still
        caches is written in (``system.write_back``), then the mount commits (an
        fsync of its root commits all it has received). ``strict``: CdpfsError if
        the kernel could not write some of it (else the programs that wrote it are
        the ones told)."""
        if self.mount is None:
            return
        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            error = system.write_back(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if error is not None and strict:
            raise CdpfsError(f"{shown(self.mount)}: some data cached for it could not be "
                             f"written in: {error.strerror} (the programs that wrote it get "
                             "the error too); everything else is committed")

    @property
    def live_path(self) -> Path:
        if self.mount is None:
            raise CdpfsError(f"{self.store}: the volume is not mounted "
                             f"(mount it first: cdpfs mount {self.store} MOUNTPOINT)")
        return self.mount / self.rel if self.rel else self.mount

    def whole(self) -> Target:
        """The same volume, its root."""
        return replace(self, rel="", through_link=False)


def locate(path: Path, store: Path | None = None, *, entry: bool = False) -> Target:
    """The target ``path`` names: a store directory, or a path in a mounted volume
    (with ``store``, a path relative to that store's volume root).

    The last component of a path in a volume is the entry itself (a symbolic link
    is not followed into the result); unless ``entry``, a link there must still
    lead to a place in the same volume (a tool that takes the volume a path is in
    must not act on one volume when the path names another place)."""
    if store is not None:
        if not is_store(store):
            raise CdpfsError(f"{store}: not a cdpfs store")
        parts: list[str] = []
        for part in str(path).split("/"):
            if part == "..":
                if not parts:
                    raise CdpfsError(f"{path}: '..' leads out of the volume")
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        mnt = live_mount_of(store)
        return Target(store.resolve(), mnt, "/".join(parts), dev=_dev_of(mnt))
    mounts = {m.point: m for m in cdpfs_mounts()}
    roots = {point: m.dev for point, m in mounts.items()}
    place = resolve(path, roots)
    if place.root is None:
        if os.path.isdir(place.path) and is_store(Path(place.path)):
            real = Path(place.path)
            mnt = live_mount_of(real)
            return Target(real, mnt, "", dev=_dev_of(mnt))
        if not os.path.lexists(place.path):
            raise CdpfsError(f"{path}: no such file or directory")
        raise CdpfsError(f"{path}: not inside a mounted cdpfs volume "
                         "(give a path in a mount, or --store STORE)")
    here = _lstat(place.path)
    if here is not None and stat.S_ISDIR(here.st_mode) and is_store(Path(place.path)):
        mnt = live_mount_of(Path(place.path))  # a store kept in a volume is a store
        return Target(Path(place.path), mnt, "", dev=_dev_of(mnt))
    if not entry and here is not None and stat.S_ISLNK(here.st_mode):
        resolve(path, roots, follow_last=True)  # the link must not lead out of the volume
    src = Path(mounts[place.root].source)
    rel = place.path[len(place.root):].lstrip("/")
    if "#" in src.name:
        raise CdpfsError(f"{path}: is in a read-only (snapshot or following) mount; give a "
                         f"path in the live volume, or --store {str(src).rsplit('#', 1)[0]}")
    if rel.split("/", 1)[0].startswith("@"):
        raise CdpfsError(f"{path}: is inside history; give the live path and --at MOMENT")
    return Target(src, Path(place.root), rel, place.through_link, place.dev)


def _dev_of(mount: Path | None) -> int | None:
    if mount is None:
        return None
    found: Mount | None = next((m for m in cdpfs_mounts() if m.point == str(mount)), None)
    return found.dev if found is not None else None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Place:
    """Where a path leads."""

    path: str              # absolute, every directory on the way resolved
    root: str | None       # the root of the volume it is in, if any
    dev: int | None        # that volume's st_dev
    through_link: bool     # a directory on the way was a symlink inside the volume


@dataclass(frozen=True, slots=True)
class _Back:
    """Pushed after a link's target: when it is reached, the walk must be back in
    the volume the link is in."""

    link: str
    root: str


def resolve(path: Path | str, roots: Mapping[str, int], *,
            follow_last: bool = False) -> Place:
    """Resolve ``path`` one component at a time, as the kernel would, where
    ``roots`` maps the (real) root of every volume to the st_dev of its files.

    A symbolic link on the way is followed; the last component is followed only
    outside volumes, or with ``follow_last``. Components that do not exist are
    taken as they are (a tool may name what existed in the past). Once the walk
    is in a volume it may not leave it: a ``..`` at the volume's root, a link in
    it whose target ends elsewhere (out, or in another volume), and a directory
    of another device (a filesystem mounted inside, or over the root) are refused
    with :class:`CdpfsError`, one line naming the path and why.
    """
    text = os.fspath(path)
    if not text:
        raise CdpfsError("an empty path names nothing")
    if not text.startswith("/"):
        try:
            text = os.path.join(os.getcwd(), text)  # the kernel's cwd: real already
        except OSError as exc:
            raise CdpfsError(f"{path}: the current directory: {exc.strerror}") from None
    todo: list[str | _Back] = ["."] if text.endswith("/") else []  # 'x/' follows x
    todo += reversed([p for p in text.split("/") if p])
    at, root, dev = "/", None, None
    links, through = 0, False
    while todo:
        name = todo.pop()
        if isinstance(name, _Back):
            if root != name.root:
                raise CdpfsError(f"{path}: the symbolic link {name.link} leads out of the "
                                 f"volume mounted on {name.root}")
            continue
        if name == ".":
            continue
        if name == "..":
            if root is not None and at == root:
                link = next((n.link for n in reversed(todo) if isinstance(n, _Back)), None)
                what = "'..'" if link is None else f"the symbolic link {link}"
                raise CdpfsError(f"{path}: {what} leads out of the volume mounted on {root}")
            at = os.path.dirname(at)
            continue
        step = os.path.join(at, name)
        try:
            st: os.stat_result | None = os.lstat(step)
        except (FileNotFoundError, NotADirectoryError):
            st = None  # taken as named: nothing there can lead anywhere
        except OSError as exc:
            raise CdpfsError(f"{path}: {step}: {exc.strerror}") from None
        if root is None and step in roots:
            root, dev = step, roots[step]
            if st is None or st.st_dev != dev:
                raise CdpfsError(f"{path}: another filesystem is mounted over the volume "
                                 f"on {root}")
        elif root is not None and st is not None and st.st_dev != dev:
            raise CdpfsError(f"{path}: another filesystem is mounted on {step}, inside the "
                             f"volume on {root}")
        last = not any(isinstance(n, str) for n in todo)
        if st is None or not stat.S_ISLNK(st.st_mode) or (last and root is not None
                                                           and not follow_last):
            at = step
            continue
        links += 1
        if links > MAX_LINKS:
            raise CdpfsError(f"{path}: too many levels of symbolic links")
        try:
            target = os.readlink(step)
        except OSError as exc:
            raise CdpfsError(f"{path}: {step}: {exc.strerror}") from None
        if root is not None:
            through = through or not last
            todo.append(_Back(step, root))
        if target.startswith("/"):
            at, root, dev = "/", None, None  # from the top: back into a volume by its root
        todo += reversed([p for p in target.split("/") if p])
    return Place(at, root, dev, through)
