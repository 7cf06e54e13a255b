"""Errors a user can fix: the CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator, Optional

# errno -> how a full disk or quota is named in messages
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class UserError(Exception):
    """A problem with the user's input (a spec, a data file, a path), stated so they can fix it."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk or the user's quota is full (``errno`` ENOSPC or EDQUOT).

    Also an ``OSError`` (``errno``, ``filename``), so code that handles OSError still sees it;
    ``str()`` is the message alone. Raised as a UserError: training cannot go on until someone
    frees space or points ``output.dir`` elsewhere, so a retry on the same disk is pointless.
    """

    def __init__(self, code: int, message: str, filename: Optional[str] = None):
        super().__init__(code, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_errno(error: Optional[BaseException]) -> Optional[int]:
    """ENOSPC or EDQUOT when ``error``, or an error it was raised from, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(error: BaseException, what: str, where) -> Optional[DiskFullError]:
    """A :class:`DiskFullError` for ``error`` if it is a full disk or quota (else None), saying
    "<no space left on device> while writing <what> to <where>: free space there or point
    output.dir elsewhere"."""
    code = disk_full_errno(error)
    if code is None:
        return None
    return DiskFullError(code, f"{DISK_FULL[code]} while writing {what} to {where}: free space there or "
                               "point output.dir elsewhere", str(where))


@contextlib.contextmanager
def disk_full_as(what: str, where) -> Iterator[None]:
    """A full disk or quota inside the block becomes a :class:`DiskFullError` naming ``what`` and
    ``where`` (see :func:`disk_full_error`); any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as e:
        full = disk_full_error(e, what, where)
        if full is None:
            raise
        raise full from e
