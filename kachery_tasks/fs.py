"""File-system helpers for every layer: one atomic write, and group sharing of the home.

Why one module at the bottom: the identity, feed, store, task and command-line layers all write
files that readers must see whole, and each had its own temp-file-and-rename with its own bugs (a
temp name shared by two writers, no fsync, files a shared home's other users could not write). Here
is the one way, importing nothing from the package but ``config`` (for ``shared_group``) and
``errors``, so that any layer may use it.

A home may be shared by the Unix users of one group (config ``shared_group``). Then directories are
setgid and group-writable and files group-readable (group-writable when their owner may write)
whatever each user's umask, so that one user's results are hits for another. Every directory and
file the home holds is made through here.
"""

from __future__ import annotations

import grp
import os
import time
from collections.abc import Iterable
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from . import config
from .errors import UserError

#: Every temp file :func:`write_atomic` makes is named ``.tmp-<16 random hex>``.
TEMP_PREFIX = ".tmp-"


@lru_cache(maxsize=8)
def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UserError(f"shared_group {name!r} is not a Unix group here; create it or change the config") from None


def shared_gid() -> int | None:
    name = config.get("shared_group")
    return None if not name else group_id(name)


def make_dirs(path: Path) -> Path:
    """Create ``path`` and its parents; in a shared home make the new ones setgid, group-writable."""
    if path.is_dir():
        return path
    gid = shared_gid()
    if gid is None:
        path.mkdir(parents=True, exist_ok=True)
        return path
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with suppress(FileExistsError):
            d.mkdir()
            with suppress(PermissionError):
                os.chown(d, -1, gid)
                os.chmod(d, 0o2775)
    return path


def share_fd(fd: int, mode: int = 0o444) -> None:
    """Give a file just written the permissions its home needs (read-only for content)."""
    gid = shared_gid()
    if gid is not None:
        with suppress(PermissionError):
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode | 0o040 | (0o020 if mode & 0o200 else 0))
    else:
        os.fchmod(fd, mode)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the names in directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[bytes], *, mode: int = 0o644,
                 fsync: bool = True, share: bool = True, overwrite: bool = True,
                 tmp_dir: str | os.PathLike | None = None) -> None:
    """Write ``data`` (bytes, or an iterable of byte blocks) to ``path`` so that readers see the old
    file or the whole new one, never part, and no writer's temp file is another's.

    The temp file (``.tmp-<random>``, made with O_EXCL beside the target, or in ``tmp_dir`` on the
    same file system) gets ``mode`` (exactly, whatever the umask; in a shared home also the group's
    bits unless ``share`` is false, as for a private key), is fsynced, then renamed over the target
    and the directory fsynced. Without ``fsync`` the caller makes it durable later (durability.py);
    the rename is atomic either way. With ``overwrite=False`` an existing ``path`` is left alone and
    :class:`FileExistsError` raised (of two racing writers, the first wins).

    On any failure (a full disk, an exception from ``data``, an interrupt) the temp file is removed
    and the error propagates unchanged: errors.as_store_full turns ENOSPC into StoreFullError above.
    Missing directories are made (:func:`make_dirs`).
    """
    directory = os.fspath(tmp_dir) if tmp_dir is not None else os.path.dirname(os.fspath(path)) or "."
    tmp = f"{directory}/{TEMP_PREFIX}{os.urandom(8).hex()}"  # random: a home may be shared by hosts
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:  # directories exist but the first time: ask forgiveness, the check costs a stat per write
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        make_dirs(Path(directory))
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            for block in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
            if share:
                share_fd(fd, mode)
            else:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        place = os.replace if overwrite else _link
        try:
            place(tmp, path)
        except FileNotFoundError:  # the target's directory is new
            make_dirs(Path(path).parent)
            place(tmp, path)
        if not overwrite:
            os.unlink(tmp)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def _link(tmp: str, path: str | os.PathLike) -> None:
    """``os.link`` that also knows its own success on NFS, where a retransmitted LINK whose first
    reply was lost fails with EEXIST: if the temp file has two links, the name is ours."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        if os.stat(tmp).st_nlink < 2:
            raise


def remove_stale_files(directory: Path, older_than_s: float, prefix: str = "") -> int:
    """Remove the files in ``directory`` (named ``prefix…``) not modified for ``older_than_s``
    seconds: temp files of killed writers, never under a final name, so removing them loses nothing."""
    removed = 0
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if (entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
