"""Fork evidence: two validly signed, different messages (or checkpoints) for the same position.

A single-writer log can fork only if its key signs two histories (a key copied to a second node, a
node restored from an old backup). Neither copy is "the" history, so instead of picking one the
feed keeps both signed items in ``forks.json`` and refuses further use until someone decides
(:meth:`Feed.resolve_fork`). The evidence is portable proof of equivocation: anyone with the
public key can check both signatures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..fs import fsync_dir
from .errors import ForkedFeedError
from .messages import now_ms
from .storage import flocked, read_json, write_all, write_json_atomic


def forks_path(feed_dir: Path) -> Path:
    return feed_dir / "forks.json"


def load(feed_dir: Path) -> list[dict[str, Any]]:
    return list(read_json(forks_path(feed_dir), []))


def record(feed_dir: Path, evidence: dict[str, Any]) -> None:
    """Add ``evidence`` (kind, subfeed, seq, local, remote) unless the same is already recorded."""
    with flocked(feed_dir / ".forks.lock"):
        items = load(feed_dir)
        key = {k: evidence[k] for k in ("kind", "subfeed", "seq", "local", "remote")}
        if any({k: e.get(k) for k in key} == key for e in items):
            return
        items.append({**key, "recorded": now_ms()})
        write_json_atomic(forks_path(feed_dir), items)


def check(feed_dir: Path, feed_id: str) -> None:
    """Raise :class:`ForkedFeedError` if fork evidence is recorded for this feed."""
    if not os.path.exists(forks_path(feed_dir)):
        return
    items = load(feed_dir)
    if not items:
        return
    first = items[0]
    raise ForkedFeedError(
        f"feed {feed_id} is forked: its key signed two different {first['kind']}s for subfeed "
        f"{first['subfeed']!r} at seq {first['seq']} ({len(items)} conflict(s)); inspect them with "
        "Feed.forks() and settle with Feed.resolve_fork() or `kachery feed resolve`"
    )


def clear(feed_dir: Path, subfeed: str | None, resolution: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Move the evidence for ``subfeed`` (all if None) to ``forks-resolved.jsonl``; return it."""
    with flocked(feed_dir / ".forks.lock"):
        items = load(feed_dir)
        gone = [e for e in items if subfeed is None or e["subfeed"] == subfeed]
        keep = [e for e in items if e not in gone]
        if gone:
            with flocked(feed_dir / "forks-resolved.jsonl") as fd:
                for e in gone:
                    entry = {**e, "resolution": resolution, "resolved": now_ms(), **(extra or {})}
                    write_all(fd, json.dumps(entry, sort_keys=True, ensure_ascii=False).encode() + b"\n")
                os.fsync(fd)
        if keep:
            write_json_atomic(forks_path(feed_dir), keep)
        else:
            try:
                os.unlink(forks_path(feed_dir))
                fsync_dir(feed_dir)
            except FileNotFoundError:
                pass
        return gone
