"""The errno a FUSE front end answers for each cdpfs error class.

The library raises typed errors (``cdpfs.errors``) and never chooses an errno;
this table is where the FUSE front end does. A class not listed takes the
errno of its nearest listed base; anything else is an I/O error.
"""

from __future__ import annotations

import errno

from cdpfs.errors import (
    AccessDenied,
    BadHandle,
    Corrupt,
    CrossDevice,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
    Stale,
    StoreLocked,
    Unsupported,
)

ERRNO: dict[type[BaseException], int] = {
    NotFound: errno.ENOENT,  # BadMoment too: an @ name that names nothing
    Exists: errno.EEXIST,
    NotEmpty: errno.ENOTEMPTY,
    NotADirectory: errno.ENOTDIR,
    IsADirectory: errno.EISDIR,
    InvalidArgument: errno.EINVAL,
    NameTooLong: errno.ENAMETOOLONG,
    NotPermitted: errno.EPERM,  # Reserved too: @ names at the volume root
    AccessDenied: errno.EACCES,
    ReadOnly: errno.EROFS,
    CrossDevice: errno.EXDEV,
    NoAttribute: errno.ENODATA,
    BadHandle: errno.EBADF,
    Stale: errno.ESTALE,
    Unsupported: errno.EOPNOTSUPP,
    NoSpace: errno.ENOSPC,
    Corrupt: errno.EIO,
    StoreLocked: errno.EBUSY,
}

# Answers that are part of normal work, not worth a log line.
QUIET = (NotFound, Exists, NotEmpty, NoAttribute)


def errno_of(exc: BaseException) -> int:
    """The errno for ``exc``: its class's, or its nearest listed base's; else EIO."""
    for cls in type(exc).__mro__:
        code = ERRNO.get(cls)
        if code is not None:
            return code
    return errno.EIO
