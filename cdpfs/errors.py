"""The one error hierarchy of cdpfs.

Every error a user can cause carries an errno (so front ends map it without
knowing the cause) and a one-line message fit to print as is.
"""

from __future__ import annotations

import errno as _errno

import trio


class CdpfsError(Exception):
    """Base of all cdpfs errors: ``errno`` for the kernel, ``str()`` for people."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        super().__init__(message or _errno.errorcode.get(errno or self.errno, "error"))
        if errno is not None:
            self.errno = errno


class FsError(CdpfsError):
    """A filesystem operation refused with a plain errno (ENOENT, EEXIST, ...)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)), errno)


class StoreError(CdpfsError):
    """The store directory is missing, not a store, of another format, or locked."""

    errno = _errno.EINVAL


class StoreLocked(StoreError):
    """Another process holds the store's write lock (a mount or a writing tool)."""

    errno = _errno.EBUSY


class CorruptBlock(CdpfsError):
    """A stored block's bytes do not hash to its key: never served, always reported."""

    errno = _errno.EIO

    def __init__(self, digest: bytes, message: str = "") -> None:
        super().__init__(message or f"block {digest.hex()} is corrupt (hash mismatch)")
        self.digest = digest


class NoSpace(CdpfsError):
    """The disk under the store is (nearly) full: the write is refused, nothing lost."""

    errno = _errno.ENOSPC


def root_cause(exc: BaseException) -> str:
    """The innermost cause of a (possibly wrapped or grouped) error, in one line."""
    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            return f"{type(exc).__name__}: {exc}"


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first error in a group that is not a cancellation (the group itself if all are)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = first_error(exc)
            if inner is not exc:
                return inner
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return group

