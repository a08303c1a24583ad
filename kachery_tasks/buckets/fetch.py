"""Files missing from the store, fetched from the configured buckets (``bucket``, then
``read_buckets``), verified on the way in: what makes ``kt.load_file(uri)`` and ``kachery load URI``
work for a file another node published.

The store layer cannot import buckets (they sit above it), so it keeps a list of sources of missing
blobs (``store.files.FETCHERS``) and this module adds one when the buckets package is imported.
"""

from __future__ import annotations

import threading

from .. import config
from ..errors import UserError
from ..store.blobs import BlobStore
from ..store.files import FETCHERS
from .base import Bucket, NotFound
from .layout import check_layout
from .transfer import download_blob
from .uri import open_bucket

_opened: dict[str, Bucket] = {}
_lock = threading.Lock()


def configured_buckets() -> list[Bucket]:
    """The buckets the configuration names, in reading order, each opened once per process."""
    uris = ([config.get("bucket")] if config.get("bucket") else []) + list(config.get("read_buckets"))
    found = []
    for uri in uris:
        with _lock:
            bucket = _opened.get(uri)
            if bucket is None:
                bucket = _opened[uri] = open_bucket(uri, read_only=True)
        found.append(bucket)
    return found


def configured_bucket(*, write: bool) -> Bucket:
    """The bucket of the config key ``bucket`` (its layout checked), or a one-line error."""
    uri = config.get("bucket")
    if not uri:
        raise UserError("no bucket is configured; set one with "
                        "`kachery config set bucket file:///shared/kachery` (or gs://bucket/prefix)")
    if write and config.get("bucket_read_only"):
        raise UserError(f"bucket {uri} is configured read-only (bucket_read_only: true); nothing is written to it")
    bucket = open_bucket(uri, read_only=not write)
    check_layout(bucket, write=write)
    return bucket


def fetch_from_buckets(sha256: str, blobs: BlobStore) -> bool:
    """Download blob ``sha256`` into ``blobs`` from the first configured bucket that has it; False
    if none does (or the store may not be written). A damaged copy raises, naming its bucket key."""
    if config.get("read_only"):
        return False
    for bucket in configured_buckets():
        try:
            download_blob(bucket, blobs, sha256)
        except NotFound:
            continue
        return True
    return False


FETCHERS.append(fetch_from_buckets)
