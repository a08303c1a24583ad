"""Buckets: where nodes share blobs, records and the few mutable objects of a channel.

``open_bucket(uri)`` opens ``file:///abs/path`` (:mod:`.directory`) or ``gs://bucket/prefix``
(:mod:`.gcs`, needs the ``gcs`` extra). The protocol is in :mod:`.base`.
"""

from __future__ import annotations

from . import feeds as _feeds  # noqa: F401  registers the configured buckets as a source of feeds
from . import fetch as _fetch  # noqa: F401  registers the configured buckets as a source of missing files
from .base import (
    AlreadyExists,
    Bucket,
    BucketError,
    BucketUnavailable,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    PreconditionFailed,
    ReadOnlyBucket,
    check_key,
)
from .uri import open_bucket

__all__ = [
    "AlreadyExists",
    "Bucket",
    "BucketError",
    "BucketUnavailable",
    "InvalidKey",
    "NotFound",
    "ObjectInfo",
    "PermissionDenied",
    "PreconditionFailed",
    "ReadOnlyBucket",
    "check_key",
    "open_bucket",
]
