"""Where feeds this home does not hold (or newer messages of feeds it reads) come from.

The feeds layer knows no remote: buckets sit above it. So it keeps a list of sources, as the store
keeps ``store.files.FETCHERS``, and the buckets layer adds the configured buckets when it is
imported (``buckets/feeds.py``). Each source takes a feed id and brings into the home in force what
it holds of that feed, verified (every signature against the feed id, the chain, the checkpoints)
before anything is stored; it returns how many messages it added, or None if it holds no copy of
the feed. A tampered or forked copy raises (``FeedTamperError``, ``ForkedFeedError``), never merges.
"""

from __future__ import annotations

from collections.abc import Callable

#: Sources of feeds, asked in order: each takes a feed id, returns messages added or None.
FETCHERS: list[Callable[[str], int | None]] = []


def fetch(feed_id: str) -> int | None:
    """Ask every source for ``feed_id``; the messages they added in all, or None if none has it."""
    found: int | None = None
    for source in FETCHERS:
        added = source(feed_id)
        if added is not None:
            found = (found or 0) + added
    return found
