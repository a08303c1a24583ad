"""File-system helpers shared by every writer in the home: atomic writes and group sharing.

A home may be shared by the Unix users of one group (config ``shared_group``). Then directories are
setgid and group-writable and files group-readable whatever each user's umask, so that one user's
results are hits for another. Every directory and file the home holds is made through here.
"""

from __future__ import annotations

import grp
import os
import time
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from .. import config
from ..errors import UserError


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


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644, tmp_dir: str | Path | None = None,
                       *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never part.

    The temp file (``.tmp-…``, in ``tmp_dir`` or else beside the target) is fsynced, then renamed
    over the target. Without ``fsync`` the caller makes it durable later (durability.py); the rename
    is atomic either way.
    """
    directory = tmp_dir or os.path.dirname(os.fspath(path))
    tmp = _new_temp_name(directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:  # directories exist but the first time: ask forgiveness, the check costs a stat per write
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        make_dirs(Path(directory))
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
            share_fd(fd, mode)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # the target's directory is new
            make_dirs(Path(path).parent)
            os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


TEMP_PREFIX = ".tmp-"


def _new_temp_name(directory: str | os.PathLike) -> str:
    """A fresh name for a temp file (random: a home may be shared by several users and hosts)."""
    return f"{os.fspath(directory)}/{TEMP_PREFIX}{os.urandom(8).hex()}"


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
