"""Signed append-only feeds: subfeeds, replay, checkpoints, proofs, tamper and fork evidence.

See docs/feeds.md for the model, the on-disk format and the guarantees.
"""

from .checkpoints import Checkpoint, ConsistencyProof, InclusionProof, verify_consistency, verify_inclusion
from .errors import FeedReadOnlyError, FeedTamperError, ForkedFeedError, InvalidMessageError
from .feed import Feed, IngestResult, Subfeed
from .ids import is_feed_id, parse_feed_id
from .messages import ZERO_HASH, canonical
from .registry import (
    create_feed,
    list_feeds,
    load_feed,
    local_feed,
    local_names,
    parse_feed_uri,
    resolve_feed,
    stored_feed,
)

__all__ = [
    "Checkpoint",
    "ConsistencyProof",
    "Feed",
    "FeedReadOnlyError",
    "FeedTamperError",
    "ForkedFeedError",
    "InclusionProof",
    "IngestResult",
    "InvalidMessageError",
    "Subfeed",
    "ZERO_HASH",
    "canonical",
    "create_feed",
    "is_feed_id",
    "list_feeds",
    "load_feed",
    "local_feed",
    "local_names",
    "parse_feed_id",
    "parse_feed_uri",
    "resolve_feed",
    "stored_feed",
    "verify_consistency",
    "verify_inclusion",
]
