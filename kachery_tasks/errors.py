"""Exceptions shared by every layer.

Every error a user can cause derives from :class:`UserError`: its message is one line that says what
was wrong and what to do, so the command line can print it without a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import warnings


class KacheryError(Exception):
    """Base of every error raised on purpose by kachery-tasks."""


class UserError(KacheryError):
    """Bad input or a situation the user can fix; the message says how."""


class ConfigError(UserError, KeyError):
    """An unknown or malformed configuration key or value."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidURI(UserError, ValueError):
    """A URI that does not follow the formats in docs/files.md."""


class NotFoundError(UserError, LookupError):
    """Something named by id or URI is not in this node's store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IntegrityError(KacheryError):
    """Stored bytes no longer match their hash; the bad copy was moved to quarantine."""


class InvalidRecord(KacheryError, ValueError):
    """A task record that does not follow docs/formats.md ("Task records"): a field missing or of the
    wrong type, an unknown status, a malformed id, a result in two forms, or a record written by a
    newer kachery-tasks. ``reason`` says what is wrong; ``task_id`` is the record's id when it has
    a valid one. The local store sets such a record aside and reads it as absent."""

    def __init__(self, reason: str, task_id: str | None = None):
        super().__init__(f"task record {task_id}: {reason}" if task_id else f"task record: {reason}")
        self.reason = reason
        self.task_id = task_id

    def __reduce__(self):
        return (type(self), (self.reason, self.task_id))


class ReadOnlyStoreError(UserError):
    """A write was attempted while the configuration says ``read_only``."""


class UnhashableArgument(UserError, TypeError):
    """A value that has no canonical encoding, so no task id can be computed for it."""


class CodecError(UserError, TypeError):
    """A result that the chosen codec cannot encode."""


class StoreFullError(UserError, OSError):
    """A write into the home failed because its disk is full, over quota or read-only.

    The store leaves nothing partial behind, so the home stays consistent; the message names the
    home, the bytes the write needed and the way out. It is an ``OSError`` too (with the original
    ``errno``), so code written against the operating system's error still catches it.
    """

    def __init__(self, code: int, home: str | os.PathLike, needed: int | None = None,
                 path: str | os.PathLike | None = None):
        super().__init__(code, os.strerror(code), None if path is None else os.fspath(path))
        self.home = os.fspath(home)
        self.needed = needed

    def __str__(self) -> str:
        needs = "" if self.needed is None or self.errno == errno.EROFS else f" (needs {human_bytes(self.needed)}"
        if needs:
            free = _free_bytes(self.home)
            needs += f", {human_bytes(free)} free)" if free is not None else ")"
        if self.errno == errno.EROFS:
            way_out = ("use a writable home (KACHERY_TASKS_HOME, or kachery --home PATH), or set read_only to use "
                       "this one for hits only")
        else:
            way_out = "free space there or use another home (KACHERY_TASKS_HOME, or kachery --home PATH)"
        return f"cannot write to kachery home {self.home}: {_REASONS.get(self.errno, self.strerror)}{needs}; {way_out}"

    def __reduce__(self):  # raised on a Dask worker, shown on the client
        return (type(self), (self.errno, self.home, self.needed, self.filename))


#: errno values that mean "this home cannot take the write" rather than a bug.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_NEARLY_FULL = 2**20


def as_store_full(exc: BaseException, home: str | os.PathLike, needed: int | None = None) -> StoreFullError | None:
    """``exc`` as a :class:`StoreFullError` if it says the home cannot take a write, else None.

    Writers below the store (feeds, the mutables database, the node key) raise the operating
    system's error; this is the one place that recognises it, for the task engine and the CLI alike.
    SQLite reports a full disk as its own error (SQLITE_FULL), not as ``OSError``.
    """
    if isinstance(exc, StoreFullError):
        return exc
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return StoreFullError(exc.errno, home, needed, exc.filename)
    if type(exc).__module__ == "sqlite3":
        code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11; the message before
        primary = None if code is None else code & 0xFF
        if primary == _SQLITE_FULL or "database or disk is full" in str(exc):
            return StoreFullError(errno.ENOSPC, home, needed)
        # SQLite folds ENOSPC on its WAL index into a plain I/O error: name it only when the disk
        # is in fact (nearly) full, so that a real I/O error keeps its own message.
        if primary == _SQLITE_IOERR or "disk I/O error" in str(exc):
            free = _free_bytes(os.fspath(home))
            if free is not None and free < _NEARLY_FULL:
                return StoreFullError(errno.ENOSPC, home, needed)
    return None


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class KacheryWarning(UserWarning):
    """Base of every warning issued by kachery-tasks (filter them all with this class)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_outside(warning: Warning) -> None:
    """Issue ``warning`` attributed to the first frame outside kachery-tasks (the user's call, or
    the Dask machinery that ran it), not to the line of kachery-tasks that noticed: that is the line
    the user can act on, and Python shows a warning once per line it is attributed to."""
    frame = sys._getframe(1)  # the caller: stacklevel 2
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(warning, stacklevel=level if frame is not None else 1)


class StaleResultWarning(KacheryWarning):
    """A query failed and its last cached result was returned instead."""


class StoreFullWarning(KacheryWarning):
    """A value was computed and returned, but the home could not record it (full, over quota or
    read-only): nothing is lost but the cache entry, and the next call computes it again."""
