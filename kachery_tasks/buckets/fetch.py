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
from .base import Bucket, NotFound, ReadOnlyBucket
from .layout import blob_key, check_layout, manifest_key
from .refusals import GuardedBucket, check_not_refused, refusals
from .transfer import download_blob, read_manifest
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
    """The bucket of the config key ``bucket`` (its layout checked), or a one-line error.

    With ``write``, the bucket's writes are watched (refusals.py): the first one it refuses, here
    (the layout marker) or later, makes it read-only for the rest of the process, and every later
    call raises :class:`~.refusals.WriteRefused` at once."""
    uri = config.get("bucket")
    if not uri:
        raise UserError("no bucket is configured; set one with "
                        "`kachery config set bucket file:///shared/kachery` (or gs://bucket/prefix)")
    if not write:
        bucket = open_bucket(uri, read_only=True)
        check_layout(bucket, write=False)
        return bucket
    if config.get("bucket_read_only"):
        raise ReadOnlyBucket(f"bucket {uri} is configured read-only (bucket_read_only: true); nothing is written "
                             "to it", uri)
    check_not_refused(uri)
    with refusals(uri):  # a directory bucket opened for writing makes its .kt/ directories
        bucket = GuardedBucket(open_bucket(uri))
        check_layout(bucket, write=True)
    return bucket


def locate_blob(sha256: str) -> tuple[Bucket, int] | None:
    """The first configured bucket that has blob ``sha256`` and the blob's size (its object's, or
    its manifest's), or None: what a progress bar needs before a download starts."""
    bkey, mkey = blob_key(sha256), manifest_key(sha256)
    for bucket in configured_buckets():
        check_layout(bucket, write=False)
        found = bucket.exists_many([bkey, mkey])
        if bkey in found:
            return bucket, found[bkey].size
        if mkey in found:
            return bucket, read_manifest(bucket, sha256).size
    return None


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
