"""The SHA-256 of a local file by its path, remembered by the file's stamp so that unchanged files
are not read again.

``cached()`` identifies a DataFrame read from files by the content of those files, at every call:
hashing a few GB of parquet each time would cost more than the cache saves. So the hash of a path is
kept in ``<home>/cache/file_hashes.sqlite`` (SQLite in WAL mode, as mutables: several processes read
while one writes) together with the file's stamp (device, inode, size, mtime and ctime in ns); it is
served again only while the file's stamp is the same. Anything that rewrites or replaces the file
changes the stamp (ctime cannot be set back by a user, unlike mtime), and the next call hashes again.

Two races are closed. A file that changes while it is being hashed has another stamp after than
before: it is hashed again, and after a few tries refused, so no hash of bytes in flux is ever kept.
And file times advance in ticks (a few ms on a local disk, more on a network file system), so a
change made just after hashing, in the same tick and to the same size, would leave the stamp as it
was; like git's "racily clean" entries, a hash whose file changed less than :data:`RACY_NS` before it
was taken is kept but never trusted: it is checked by hashing again until the file is older.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from .. import config
from ..errors import UserError
from ..fs import make_dirs

#: Bytes read at a time (hashlib releases the GIL on blocks this size).
BLOCK = 4 * 2**20
#: A hash taken less than this long after the file last changed is re-checked at the next call.
RACY_NS = 1_000_000_000
#: Tries before a file that keeps changing while it is hashed is refused.
TRIES = 3

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, dev INTEGER NOT NULL, "
    "ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, "
    "sha256 TEXT NOT NULL, hashed_ns INTEGER NOT NULL)"
)

Stamp = tuple[int, int, int, int, int]


def cache_path(home: Path | None = None) -> Path:
    """Where the hashes of ``home`` (default: the home in force) are kept."""
    return (home or config.home()) / "cache" / "file_hashes.sqlite"


def stamp_of(st: os.stat_result) -> Stamp:
    """(device, inode, size, mtime_ns, ctime_ns): what changes when a file's bytes may have."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex of the bytes of the local file at ``path`` (the id of ``sha256://`` URIs).

    Served from the home's cache while the file's stamp is unchanged (and not racy); otherwise the
    file is read and the cache updated, unless the configuration says ``read_only``.
    Raises :class:`UserError` for a missing file, a directory or anything else that is not a regular
    file, and for a file that keeps changing while it is read.
    """
    real = os.path.realpath(os.fspath(path))
    st = _stat(path, real)
    read_only = bool(config.get("read_only"))
    db = cache_path()
    row = _lookup(db, real, read_only)
    if row is not None and row[0] == stamp_of(st) and not _racy(row[0], row[2]):
        return row[1]
    for _ in range(TRIES):
        digest, stamp, steady = _hash(real, path)
        if steady:
            if not read_only:
                _store(db, real, stamp, digest)
            return digest
    raise UserError(f"{os.fspath(path)} changed while it was being hashed ({TRIES} times): "
                    "it has no content identity while it is being written")


def _stat(path: str | os.PathLike, real: str) -> os.stat_result:
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise UserError(f"{os.fspath(path)}: no such file") from None
    except OSError as exc:
        raise UserError(f"{os.fspath(path)}: cannot stat it ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{os.fspath(path)} is a directory, not a file: hash the files in it")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{os.fspath(path)} is not a regular file: its bytes have no stable hash")
    return st


def _racy(stamp: Stamp, hashed_ns: int) -> bool:
    """True if the file may have changed after the hash in the same tick of its clock."""
    return hashed_ns - max(stamp[3], stamp[4]) < RACY_NS


def _hash(real: str, shown: str | os.PathLike) -> tuple[str, Stamp, bool]:
    """The hash of the bytes read, the file's stamp, and whether that stamp stayed the same from
    before the first byte to after the last (by handle and by path: a file written in place changes
    the first, a file replaced by another the second)."""
    sha = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    try:
        fh = open(real, "rb", buffering=0)  # noqa: SIM115 - the with below closes it
    except OSError as exc:
        raise UserError(f"{os.fspath(shown)}: cannot read it ({exc.strerror})") from None
    with fh:
        before = stamp_of(os.fstat(fh.fileno()))
        while n := fh.readinto(buffer):
            sha.update(view[:n])
        after = stamp_of(os.fstat(fh.fileno()))
    try:
        by_path = stamp_of(os.stat(real))
    except FileNotFoundError:
        raise UserError(f"{os.fspath(shown)} was removed while it was being hashed") from None
    return sha.hexdigest(), before, before == after == by_path


# -- the cache -------------------------------------------------------------------------------------
_local = threading.local()


def _connection(db: Path, create: bool) -> sqlite3.Connection | None:
    """This thread's connection to ``db`` (one per process and thread: a forked child gets its own);
    None when ``db`` does not exist and may not be created."""
    conns = getattr(_local, "conns", None)
    if conns is None or _local.pid != os.getpid():
        conns = _local.conns = {}
        _local.pid = os.getpid()
    conn = conns.get((db, create))
    if conn is not None:
        return conn
    if create:
        make_dirs(db.parent)
        conn = sqlite3.connect(db, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
    else:
        if not db.exists():
            return None
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    if len(conns) >= 8:  # homes come and go (tests, config.set blocks): keep the latest few open
        oldest = next(iter(conns))
        conns.pop(oldest).close()
    conns[(db, create)] = conn
    return conn


def _lookup(db: Path, real: str, read_only: bool) -> tuple[Stamp, str, int] | None:
    try:
        conn = _connection(db, create=not read_only)
        if conn is None:
            return None
        row = conn.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, sha256, hashed_ns FROM file_hashes "
                           "WHERE path = ?", (real,)).fetchone()
    except sqlite3.Error:
        if not read_only:
            raise
        return None  # a read-only home whose cache cannot be read: hash every time
    return None if row is None else (tuple(row[:5]), row[5], row[6])


def _store(db: Path, real: str, stamp: Stamp, digest: str) -> None:
    conn = _connection(db, create=True)
    assert conn is not None
    conn.execute("INSERT INTO file_hashes(path, dev, ino, size, mtime_ns, ctime_ns, sha256, hashed_ns) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET dev=excluded.dev, "
                 "ino=excluded.ino, size=excluded.size, mtime_ns=excluded.mtime_ns, "
                 "ctime_ns=excluded.ctime_ns, sha256=excluded.sha256, hashed_ns=excluded.hashed_ns",
                 (real, *stamp, digest, time.time_ns()))


__all__ = ["cache_path", "content_sha256", "stamp_of"]
