"""Errors of the feeds layer.

Each derives from a shared error of :mod:`kachery_tasks.errors`, so the command line turns it into
one line without a traceback. Tamper errors carry the subfeed and the seq where the stored history
stops being trustworthy, because "the feed is bad" is not something a user can act on.
"""

from __future__ import annotations

from ..errors import IntegrityError, UserError


class FeedTamperError(IntegrityError):
    """A stored message or checkpoint fails its signature, chain or Merkle root.

    ``seq`` is the first message that cannot be trusted (for a truncated file, the first missing
    one). Nothing is dropped or repaired: the file is left as found, as evidence.
    """

    def __init__(self, feed_id: str, subfeed: str, seq: int | None, reason: str, path: str | None = None):
        self.feed_id = feed_id
        self.subfeed = subfeed
        self.seq = seq
        self.reason = reason
        self.path = path
        what = f"message {seq} {reason}" if seq is not None else reason
        where = f" ({path})" if path else ""
        super().__init__(
            f"feed {feed_id} subfeed {subfeed!r}: {what}{where}; "
            "restore the file from a backup or fetch the subfeed again from a peer"
        )


class ForkedFeedError(UserError):
    """The feed's writer key signed two different histories; the feed is frozen until resolved.

    ``evidence`` holds the two conflicting signed items when the error is raised at detection.
    """

    def __init__(self, message: str, evidence: dict | None = None):
        super().__init__(message)
        self.evidence = evidence


class FeedReadOnlyError(UserError):
    """An append or checkpoint on a feed whose private key this node does not hold."""


class InvalidMessageError(UserError, ValueError):
    """A body that cannot be stored (not JSON-serializable) or a malformed signed message."""
