"""Where feed files live and the low-level file operations on them.

Layout under ``<home>``::

    feeds/names.json                     local feed names -> feed ids (local_feed)
    feeds/<feed id>/feed.json            {"feed": id, "label": ..., "created": ms}
    feeds/<feed id>/<stem>.name          the subfeed's name (JSON string)
    feeds/<feed id>/<stem>.jsonl         messages, one signed message per line
    feeds/<feed id>/<stem>.checkpoints.jsonl   signed checkpoints, one per line
    feeds/<feed id>/forks.json           fork evidence (present = the feed is frozen)
    feeds/<feed id>/forks-resolved.jsonl evidence of resolved forks, kept for audit
    keys/feeds/<feed id>.pem             writer key, mode 0600 (outside feeds/, so copying a
                                         feed directory to a peer never copies its key)

``<stem>`` is the SHA-256 hex of the subfeed name's UTF-8 bytes, so no name can reach outside the
feed directory, and names differing only in case stay apart on case-insensitive file systems.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import config
from ..fs import write_atomic
from .errors import InvalidMessageError


def feeds_root() -> Path:
    return config.home() / "feeds"


def feed_dir(feed_id: str) -> Path:
    return feeds_root() / feed_id


def key_path(feed_id: str) -> Path:
    return config.home() / "keys" / "feeds" / f"{feed_id}.pem"


def subfeed_stem(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidMessageError(f"a subfeed name is a string, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessageError(f"subfeed name {name!r} is not valid UTF-8 text; choose another name") from None
    return hashlib.sha256(raw).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically and durably (fs.write_atomic): never half a file."""
    text = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode("utf-8"), mode=0o600)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


@contextmanager
def flocked(path: Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent); yields the fd (O_APPEND)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_range(path: Path, start: int, end: int) -> bytes:
    if end <= start:
        return b""
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)
