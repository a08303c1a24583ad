"""Removing a file from a bucket (buckets/published.py, ``kachery bucket rm URI``): only a file this
node published, never bytes a record, another file's manifest or another publisher still needs.
Over a directory bucket and fake-gcs-server, with 1 KiB chunks so that chunked files stay small;
the two-node command-line cases are in test_bucket_sharing.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import kachery_tasks as kt
from kachery_tasks import config
from kachery_tasks.buckets import Bucket
from kachery_tasks.buckets.layout import blob_key, file_marker_key, manifest_key
from kachery_tasks.buckets.published import FileInUse, mark_published, published_files, remove_file
from kachery_tasks.buckets.transfer import BlobNotInBucket, download_blob, upload_blob
from kachery_tasks.errors import NotFoundError
from kachery_tasks.identity import node_identity
from kachery_tasks.store import current_store, parse_file_uri
from kachery_tasks.store.local import store_for

CHUNK = 1024
ME, OTHER = "a" * 64, "b" * 64


def _put(bucket: Bucket, data: bytes, node: str) -> str:
    """Store ``data`` here, upload it in 1 KiB chunks, and mark it published by ``node``."""
    digest = parse_file_uri(kt.store_bytes(data)).sha256
    upload_blob(bucket, current_store().blobs, digest, chunk_size=CHUNK)
    mark_published(bucket, digest, len(data), node)
    return digest


def _chunk(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(CHUNK)


def test_a_chunked_file_goes_with_its_manifest_and_the_chunks_nothing_else_uses(bucket: Bucket, tmp_path: Path):
    a, b, c, d = (_chunk(i) for i in range(4))
    x = _put(bucket, a + b + c, ME)  # chunks a b c
    y = _put(bucket, a + d, ME)  # shares chunk a with x
    z = _put(bucket, c, OTHER)  # chunk c of x, published as a file of its own by another node
    assert (x, len(a + b + c)) in published_files(bucket, ME)

    removed = remove_file(bucket, x, ME)
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    assert sorted(removed.deleted) == sorted([manifest_key(x), blob_key(sha(b)), file_marker_key(x, ME)])
    assert removed.shared_chunks == 2 and removed.kept_for == []
    other = store_for(tmp_path / "home-other").blobs
    with pytest.raises(BlobNotInBucket):  # a clean miss: no manifest left naming deleted chunks
        download_blob(bucket, other, x)
    for digest in (y, z):  # what shares its bytes is whole
        assert download_blob(bucket, other, digest).size > 0
    assert x not in {digest for digest, _ in published_files(bucket, ME)}


def test_bytes_another_node_published_stay(bucket: Bucket):
    data = os.urandom(3000)
    digest = _put(bucket, data, ME)
    mark_published(bucket, digest, len(data), OTHER)
    removed = remove_file(bucket, digest, ME)
    assert removed.kept_for == [OTHER] and removed.deleted == [file_marker_key(digest, ME)]
    assert bucket.stat(manifest_key(digest)) is not None
    with pytest.raises(NotFoundError, match="not published to .* by this node"):
        remove_file(bucket, digest, ME)  # no longer this node's


def test_a_file_this_node_did_not_publish_is_refused(bucket: Bucket):
    digest = _put(bucket, b"theirs", OTHER)
    with pytest.raises(NotFoundError) as e:
        remove_file(bucket, digest, ME)
    assert "\n" not in str(e.value) and "kachery bucket ls" in str(e.value)
    assert bucket.stat(blob_key(digest)) is not None


@kt.pure
def _ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def test_a_file_a_record_names_is_refused_unless_forced(bucket: Bucket, bucket_uri: str):
    with config.set(bucket=bucket_uri):
        job = _ramp.job(5000)
        job.result()
        kt.publish(job)
    me = node_identity(config.home()).node_id
    record = current_store().records.read(job.id)
    digest = record.result.sha256
    assert (digest, record.result.size) in published_files(bucket, me), "a result blob is marked as published too"
    with pytest.raises(FileInUse) as e:
        remove_file(bucket, digest, me)
    text = str(e.value)
    assert "\n" not in text and job.id in text and "_ramp" in text and "--force" in text
    assert "kachery bucket rm TASK_ID" in text and bucket.stat(blob_key(digest)) is not None
    assert blob_key(digest) in remove_file(bucket, digest, me, force=True).deleted

