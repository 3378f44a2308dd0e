"""The one error hierarchy of cdpfs.

Every error a user can cause is a ``CdpfsError`` whose ``str()`` is one line fit
to print as is. The class says what went wrong (``NotFound``, ``ReadOnly``,
``Corrupt``, ...); the library never chooses an errno or an NTSTATUS: each front
end maps the classes to its own codes (``cdpfs.mount.errnos`` for FUSE), and the
command line prints the message.
"""

from __future__ import annotations

import trio


class CdpfsError(Exception):
    """Base of all cdpfs errors: ``str()`` is one line for people. Raised as is, it
    is an error with no more precise class (a front end reports it as an I/O error)."""

    default = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.default)


# --- refusals of a filesystem request ------------------------------------------------


class FsError(CdpfsError):
    """A filesystem request refused for a reason its class names."""


class NotFound(FsError):
    """No such file, name, inode, attribute holder or moment."""

    default = "no such file or directory"


class Exists(FsError):
    default = "file exists"


class NotEmpty(FsError):
    default = "directory not empty"


class NotADirectory(FsError):
    default = "not a directory"


class IsADirectory(FsError):
    default = "is a directory"


class InvalidArgument(FsError):
    default = "invalid argument"


class NameTooLong(FsError):
    default = "file name too long"


class NotPermitted(FsError):
    """The operation is never allowed on this object (a hard link to a directory)."""

    default = "operation not permitted"


class Reserved(NotPermitted):
    """A name reserved for history (``@...`` at the volume root)."""

    default = "name reserved for history"


class AccessDenied(FsError):
    """The caller lacks the permission the request needs."""

    default = "permission denied"


class ReadOnly(FsError):
    """A change to something read-only: history, a snapshot or following mount."""

    default = "read-only"


class Fenced(ReadOnly):
    """This node may no longer change the volume: it lost (or never had) the primary
    role's lease. Reads go on; writes and fsyncs are refused."""

    default = "writes refused: this node does not hold the primary role"


class CrossDevice(FsError):
    """A link or rename between history and the live tree."""

    default = "cross-device link"


class NoAttribute(FsError):
    """No extended attribute of that name."""

    default = "no such attribute"


class BadHandle(FsError):
    """A file handle that is not open."""

    default = "bad file handle"


class Stale(FsError):
    """A handle or inode of a past point that is no longer shown."""

    default = "stale file handle"


class Unsupported(FsError):
    """A request the volume does not support (POSIX ACLs, say)."""

    default = "operation not supported"


# --- the store and its data ------------------------------------------------------------


class StoreError(CdpfsError):
    """The store directory is missing, not a store, of another format, or locked."""


class StoreLocked(StoreError):
    """Another process holds the store's write lock (a mount or a writing tool)."""


class Corrupt(CdpfsError):
    """Stored bytes that do not hash to their name: never served, always reported."""

    def __init__(self, digest: bytes, message: str = "") -> None:
        super().__init__(message or f"block {digest.hex()} is corrupt (hash mismatch)")
        self.digest = digest


class NoSpace(CdpfsError):
    """The disk under the store is (nearly) full: the change is refused, nothing lost."""

    default = "no space left for the store"


class ClusterError(CdpfsError):
    """The coordination service (etcd) refused a request or no member of it answered;
    or the cluster's settings in it say the request cannot be done."""

    default = "the cluster cannot be reached"


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
