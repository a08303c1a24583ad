"""What answering one request came to: one line of the daemon's log, and what ``kachery node status`` counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """One line of the daemon's log, and what ``kachery node status`` counts."""

    status: str  # finished, not_found, refused, error; for tasks also rejected, code_mismatch, failed, claimed
    detail: str = ""
    bytes_sent: int = 0
    count: int = 0  # messages of a feed in the bucket
