"""Find which store and volume path a user's argument names.

Tools take either a store directory or a path inside a mounted volume. A path in a
live mount names the store, the mount and a path in the volume; before reading the
store directly, ``settle`` asks the mount to commit what it has applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cdpfs import system
from cdpfs.errors import CdpfsError
from cdpfs.mount.control import live_mount_of, mount_containing
from cdpfs.store.lmdb import Store, is_store


@dataclass(frozen=True, slots=True)
class Target:
    """A store, where it is mounted live (if it is), and a path in the volume."""

    store: Path
    mount: Path | None
    rel: str  # relative to the volume root, "" for the root
    through_link: bool = False  # the path given went through a symlink inside the volume

    def open(self) -> Store:
        """The store, opened for reading, after the mount has committed."""
        self.settle()
        return Store(self.store)

    def settle(self) -> None:
        """Make the live mount commit everything written to it: what the kernel still
        caches is written in (syncfs), then the mount commits (an fsync of its root
        commits all it has received)."""
        if self.mount is None:
            return
        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            system.syncfs(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def live_path(self) -> Path:
        if self.mount is None:
            raise CdpfsError(f"{self.store}: the volume is not mounted "
                             f"(mount it first: cdpfs mount {self.store} MOUNTPOINT)")
        return self.mount / self.rel if self.rel else self.mount


def locate(path: Path, store: Path | None = None) -> Target:
    """The target ``path`` names: a store directory, or a path in a mounted volume
    (with ``store``, a path relative to that store's volume root)."""
    if store is not None:
        if not is_store(store):
            raise CdpfsError(f"{store}: not a cdpfs store")
        rel = str(path).strip("/")
        return Target(store.resolve(), live_mount_of(store), "" if rel == "." else rel)
    if path.is_dir() and is_store(path):
        return Target(path.resolve(), live_mount_of(path.resolve()), "")
    found = mount_containing(path)
    if found is None:
        if not path.exists() and not path.is_symlink():
            raise CdpfsError(f"{path}: no such file or directory")
        raise CdpfsError(f"{path}: not inside a mounted cdpfs volume "
                         "(give a path in a mount, or --store STORE)")
    mnt, src = found
    rel = str(Path(os.path.join(os.path.realpath(path.parent), path.name)).relative_to(mnt)) \
        if path.name else ""
    rel = "" if rel == "." else rel
    if "#" in src.name:
        raise CdpfsError(f"{path}: is in a read-only (snapshot or following) mount; give a "
                         f"path in the live volume, or --store {str(src).rsplit('#', 1)[0]}")
    if rel.split("/", 1)[0].startswith("@"):
        raise CdpfsError(f"{path}: is inside history; give the live path and --at MOMENT")
    return Target(src, mnt, rel, _through_link(path, mnt))


def _through_link(path: Path, mnt: Path) -> bool:
    """Whether a directory of ``path`` inside the volume mounted on ``mnt`` is a
    symlink (links on the way to the mount point itself do not count)."""
    resolved = Path("/")
    inside = False
    for part in Path(os.path.abspath(path)).parent.parts[1:]:
        step = resolved / part
        if inside and step.is_symlink():
            return True
        resolved = Path(os.path.realpath(step))
        inside = inside or resolved == mnt or mnt in resolved.parents
    return False
