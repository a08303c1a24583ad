"""Blobs between two homes' stores through a bucket (issue 21, "Layout" and "Transfer"): over a
directory bucket and fake-gcs-server, with 64 KiB chunks so that multi-chunk blobs stay small.
Nothing of ours is mocked: writes and reads are counted by a wrapper around the real bucket, damage
is written into the real bucket, processes are really killed, and FaultyBucket injects faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bucket_faults import FaultyBucket
from bucket_fixtures import open_test_bucket
from transfer_support import CountingBucket, read_log

from kachery_tasks.buckets import Bucket, BucketUnavailable, NotFound
from kachery_tasks.buckets.layout import (
    MARKER_KEY,
    BucketManifest,
    ChunkRef,
    InvalidManifest,
    LayoutError,
    blob_key,
    feed_key,
    manifest_key,
    record_key,
)
from kachery_tasks.buckets.transfer import (
    BlobNotInBucket,
    DamagedObject,
    clean_partials,
    download_blob,
    missing_blobs,
    partial_dir,
    upload_blob,
)
from kachery_tasks.errors import IntegrityError, NotFoundError
from kachery_tasks.store.blobs import BlobStore
from kachery_tasks.store.local import store_for

CHUNK = 64 * 2**10


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def src(tmp_path: Path) -> BlobStore:
    return store_for(tmp_path / "home-a").blobs


@pytest.fixture
def dst(tmp_path: Path) -> BlobStore:
    return store_for(tmp_path / "home-b").blobs


def up(bucket: Bucket, blobs: BlobStore, digest: str, **kw):
    return upload_blob(bucket, blobs, digest, chunk_size=CHUNK, **kw)


def assert_absent(blobs: BlobStore, digest: str) -> None:
    with pytest.raises(NotFoundError):
        blobs.verified_path(digest)


def chunk_keys(data: bytes) -> list[str]:
    return [blob_key(sha(data[o:o + CHUNK])) for o in range(0, len(data), CHUNK)]


class Sum:
    """A progress callback that adds up what it is told."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0

    def __call__(self, n: int) -> None:
        self.total += n
        self.calls += 1


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK, CHUNK + 1, 5 * CHUNK + 123])
def test_round_trip(bucket: Bucket, src: BlobStore, dst: BlobStore, size: int) -> None:
    data = os.urandom(size)
    digest = src.put_bytes(data)
    sent, got = Sum(), Sum()
    t = up(bucket, src, digest, progress=sent)
    n_chunks = -(-size // CHUNK) if size > CHUNK else 1
    assert (t.size, t.bytes_moved, t.bytes_skipped, t.chunks, t.chunks_moved) == (size, size, 0, n_chunks, n_chunks)
    assert sent.total == size
    if size > CHUNK:
        manifest = BucketManifest.from_json(b"".join(bucket.read(manifest_key(digest))))
        assert manifest.sha256 == digest and manifest.chunk_size == CHUNK and len(manifest.chunks) == n_chunks
        assert bucket.stat(blob_key(digest)) is None  # a chunked file is not also one object
    else:
        assert bucket.stat(manifest_key(digest)) is None
    assert json.loads(b"".join(bucket.read(MARKER_KEY))) == {"layout": "kachery-bucket", "version": 1}

    r = download_blob(bucket, dst, digest, progress=got)
    assert (r.bytes_moved, r.bytes_skipped, r.chunks, r.retries) == (size, 0, n_chunks, 0)
    assert got.total == size
    assert dst.read_bytes(digest) == data
    assert not list(partial_dir(dst).glob(f"{digest}.*"))  # part file and journal gone

    again = download_blob(bucket, dst, digest)  # the store has it: nothing moves
    assert (again.bytes_moved, again.bytes_skipped) == (0, size)


def test_big_blob_gets_the_stores_own_c1_manifest(bucket: Bucket, src: BlobStore, dst: BlobStore) -> None:
    data = os.urandom(16 * 2**20 + 5)  # over the store's 16 MiB: the store keeps a c1 manifest
    digest = src.put_bytes(data)
    upload_blob(bucket, src, digest, chunk_size=4 * 2**20)
    download_blob(bucket, dst, digest)
    assert dst.manifest(digest) == src.manifest(digest) is not None
    assert b"".join(dst.read_verified(digest)) == data


def test_identical_chunks_are_one_object(bucket: Bucket, src: BlobStore, dst: BlobStore) -> None:
    data = bytes(4 * CHUNK) + os.urandom(CHUNK // 2)  # four equal chunks of zeros, one other
    digest = src.put_bytes(data)
    counted = CountingBucket(bucket)
    t = up(counted, src, digest)
    assert (t.chunks, t.chunks_moved, t.bytes_moved) == (5, 2, CHUNK + CHUNK // 2)
    assert sorted(k for k in counted.writes if k.startswith("sha256/")) == sorted(set(chunk_keys(data)))
    counted = CountingBucket(bucket)
    r = download_blob(counted, dst, digest)
    assert counted.reads[chunk_keys(data)[0]] == CHUNK  # fetched once, written at four offsets
    assert r.bytes_moved == CHUNK + CHUNK // 2 and dst.read_bytes(digest) == data


# -- skipping what is there ------------------------------------------------------------------------
def test_upload_skips_what_the_bucket_has(bucket: Bucket, src: BlobStore) -> None:
    small, big = os.urandom(5000), os.urandom(6 * CHUNK + 7)
    ds, db = src.put_bytes(small), src.put_bytes(big)
    up(bucket, src, ds)
    up(bucket, src, db)

    counted = CountingBucket(bucket)
    t = up(counted, src, db)
    assert (t.bytes_moved, t.bytes_skipped, t.chunks_moved) == (0, len(big), 0)
    assert counted.calls["write"] == 0 and counted.calls["exists_many"] == 1
    t = up(counted, src, ds)
    assert (t.bytes_moved, t.bytes_skipped) == (0, len(small))
    assert sum(counted.writes.values()) == 0  # the one create-if-absent write was refused

    # chunks lost from the bucket (a lifecycle rule, a careless delete): only those go again
    lost = chunk_keys(big)[1:3]
    for key in lost:
        assert bucket.delete(key)
    generation = bucket.stat(manifest_key(db)).generation
    counted = CountingBucket(bucket)
    t = up(counted, src, db)
    assert sorted(counted.writes) == sorted(lost) and t.bytes_moved == 2 * CHUNK
    assert bucket.stat(manifest_key(db)).generation == generation  # the manifest was not rewritten


def test_missing_blobs_is_one_call(bucket: Bucket, src: BlobStore) -> None:
    present = [src.put_bytes(os.urandom(n)) for n in (10, 3 * CHUNK)]
    for d in present:
        up(bucket, src, d)
    absent = [sha(os.urandom(8)) for _ in range(40)]
    counted = CountingBucket(bucket)
    assert missing_blobs(counted, present + absent) == set(absent)
    assert counted.calls["exists_many"] == 1 and counted.calls["stat"] == 0
    assert missing_blobs(counted, []) == set()


def test_not_in_bucket(bucket: Bucket, dst: BlobStore) -> None:
    digest = sha(b"nobody uploaded this")
    with pytest.raises(BlobNotInBucket) as e:
        download_blob(bucket, dst, digest)
    assert isinstance(e.value, NotFound) and bucket.uri in str(e.value) and digest in str(e.value)
    assert "\n" not in str(e.value)


def test_upload_of_a_blob_not_in_the_store(bucket: Bucket, src: BlobStore) -> None:
    with pytest.raises(NotFoundError):
        up(bucket, src, sha(b"absent"))


# -- damage in the bucket ---------------------------------------------------------------------------
def _flip(data: bytes, bit: int = 12345) -> bytes:
    b = bytearray(data)
    b[(bit // 8) % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "wrong_name"])
def test_damaged_single_object_is_refused(bucket: Bucket, src: BlobStore, dst: BlobStore, damage: str) -> None:
    data = os.urandom(20_000)
    digest = src.put_bytes(data)
    other = os.urandom(20_000)
    bad = {"truncated": data[:-100], "bit_flip": _flip(data), "wrong_name": other}[damage]
    bucket.write(blob_key(digest), bad)
    with pytest.raises(DamagedObject) as e:
        download_blob(bucket, dst, digest)
    assert e.value.key == blob_key(digest) and blob_key(digest) in str(e.value) and "\n" not in str(e.value)
    assert_absent(dst, digest)
    assert_absent(dst, sha(bad))  # the bad bytes did not enter the store under their own name either
    assert not list(dst.tmp_dir.glob("*"))

    bucket.delete(blob_key(digest))  # a good copy later works
    up(bucket, src, digest)
    download_blob(bucket, dst, digest)
    assert dst.read_bytes(digest) == data


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "wrong_name"])
def test_damaged_chunk_is_refused_and_the_rest_kept(bucket: Bucket, src: BlobStore, dst: BlobStore,
                                                   damage: str) -> None:
    data = os.urandom(6 * CHUNK + 99)
    digest = src.put_bytes(data)
    keys = chunk_keys(data)
    good = data[2 * CHUNK:3 * CHUNK]
    bad = {"truncated": good[:-1], "bit_flip": _flip(good), "wrong_name": os.urandom(CHUNK)}[damage]
    bucket.write(keys[2], bad)  # planted before the upload, which then finds it "there"
    up(bucket, src, digest)
    with pytest.raises(DamagedObject) as e:
        download_blob(bucket, dst, digest, attempts=2)
    assert e.value.key == keys[2] and keys[2] in str(e.value)
    assert_absent(dst, digest)

    bucket.delete(keys[2])
    counted = CountingBucket(bucket)
    t = up(counted, src, digest)
    assert list(counted.writes) == [keys[2]] and t.bytes_moved == CHUNK
    counted = CountingBucket(bucket)
    r = download_blob(counted, dst, digest)
    # the chunks verified before the failure were kept: only the missing ones (at most all but
    # those, since a download stops fetching at the first error) move again, never a verified one
    assert keys[2] in counted.reads and r.bytes_moved == counted.moved()[1] < len(data)
    assert r.bytes_skipped > 0
    assert dst.read_bytes(digest) == data


def _bad_manifests(m: BucketManifest) -> dict[str, tuple[str, str]]:
    raw = json.loads(m.to_json())

    def edit(fn):
        r = json.loads(json.dumps(raw))
        fn(r)
        return json.dumps(r)

    c = raw["chunks"]
    return {
        "gap": (edit(lambda r: r["chunks"][1].update(offset=c[1]["offset"] + 1)), "contiguous"),
        "short_chunk": (edit(lambda r: r["chunks"][1].update(size=c[1]["size"] - 1)), "chunk 1 has"),
        "size_too_big": (edit(lambda r: r.update(size=r["size"] + 1)), "chunk"),
        "missing_chunk": (edit(lambda r: r["chunks"].pop()), "chunks, but"),
        "wrong_chunk_size": (edit(lambda r: r.update(chunk_size=CHUNK // 2)), "chunk"),
        "bad_hex": (edit(lambda r: r["chunks"][0].update(sha256="XYZ")), "hex"),
        "bad_profile": (edit(lambda r: r.update(profile="c1")), "profile"),
        "not_json": ("{\"profile\": ", "not JSON"),
        "extra_field": (edit(lambda r: r.update(extra=1)), "unknown fields"),
        "other_file": (edit(lambda r: r.update(sha256="0" * 64)), "describes sha256"),
        "one_chunk": (edit(lambda r: r.update(chunk_size=r["size"])), "fits in one chunk"),
    }


def test_manifest_whose_chunks_do_not_add_up_is_refused(bucket: Bucket, src: BlobStore, dst: BlobStore) -> None:
    data = os.urandom(3 * CHUNK + 10)
    digest = src.put_bytes(data)
    good = BucketManifest.for_chunks(digest, len(data), CHUNK, [sha(data[o:o + CHUNK]) for o in range(0, len(data), CHUNK)])
    for name, (text, says) in _bad_manifests(good).items():
        if name != "other_file":
            with pytest.raises(InvalidManifest, match=says):
                BucketManifest.from_json(text)
        bucket.delete(manifest_key(digest))
        bucket.write(manifest_key(digest), text.encode())
        with pytest.raises(DamagedObject, match=says) as e:
            download_blob(bucket, dst, digest)
        assert e.value.key == manifest_key(digest) and "\n" not in str(e.value), name
        assert_absent(dst, digest)
    with pytest.raises(InvalidManifest, match="contiguous"):
        BucketManifest(good.size, digest, CHUNK, (ChunkRef(0, CHUNK, good.chunks[0].sha256),) + good.chunks[2:]
                       + (good.chunks[1],))
    assert BucketManifest.from_json(good.to_json()) == good


def test_manifest_listing_the_wrong_chunks_is_refused(bucket: Bucket, src: BlobStore, dst: BlobStore) -> None:
    """Every chunk verifies, but they make another file: the whole-file SHA-256 refuses it."""
    data, other = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    digest, forged = src.put_bytes(data), src.put_bytes(other)
    up(bucket, src, forged)
    m = BucketManifest.from_json(b"".join(bucket.read(manifest_key(forged))))
    bucket.write(manifest_key(digest), BucketManifest(m.size, digest, m.chunk_size, m.chunks).to_json().encode())
    with pytest.raises(DamagedObject, match="lists chunks") as e:
        download_blob(bucket, dst, digest)
    assert e.value.key == manifest_key(digest)
    assert_absent(dst, digest)
    assert not list(partial_dir(dst).glob(f"{digest}.*"))


# -- the marker ---------------------------------------------------------------------------------------
def test_marker_of_a_newer_layout_is_refused(bucket_uri: str, src: BlobStore, dst: BlobStore) -> None:
    bucket = open_test_bucket(bucket_uri)
    bucket.write(MARKER_KEY, json.dumps({"layout": "kachery-bucket", "version": 2}).encode())
    digest = src.put_bytes(b"x" * 100)
    for call in (lambda: up(bucket, src, digest), lambda: download_blob(bucket, dst, digest),
                 lambda: missing_blobs(bucket, [digest])):
        with pytest.raises(LayoutError, match="written by a newer kachery-tasks") as e:
            call()
        assert "\n" not in str(e.value) and bucket.uri in str(e.value)
    assert bucket.stat(blob_key(digest)) is None
    other = open_test_bucket(bucket_uri)
    other.delete(MARKER_KEY)
    other.write(MARKER_KEY, b'{"something": "else"}')
    with pytest.raises(LayoutError, match="not a kachery bucket"):
        up(other, src, digest)


def test_reserved_keys() -> None:
    assert record_key("0123abcd", "node-1") == "records/0123abcd/node-1.json"
    assert feed_key("f1", "log/000001") == "feeds/f1/log/000001"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            record_key(bad, "n")


# -- killed mid-transfer -----------------------------------------------------------------------------
CHILD = """
import sys
from bucket_fixtures import open_test_bucket
from transfer_support import CountingBucket
from kachery_tasks.store.local import store_for
from kachery_tasks.buckets.transfer import download_blob, upload_blob
op, uri, home, digest, log, chunk = sys.argv[1:]
bucket = CountingBucket(open_test_bucket(uri), delay=0.04, log=log)
blobs = store_for(home).blobs
if op == "upload":
    upload_blob(bucket, blobs, digest, chunk_size=int(chunk), workers=2)
else:
    download_blob(bucket, blobs, digest, workers=2)
print("finished")
"""

N_CHUNKS = 48


def _run_and_kill(op: str, uri: str, home: Path, digest: str, log: Path, env: dict, ready) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, op, uri, str(home), digest, str(log), str(CHUNK)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_upload_resumes(bucket_uri: str, src: BlobStore, tmp_path: Path, subprocess_env: dict) -> None:
    bucket = open_test_bucket(bucket_uri)
    data = os.urandom(N_CHUNKS * CHUNK - 1000)
    digest = src.put_bytes(data)
    keys = chunk_keys(data)
    log = tmp_path / "upload.log"

    def ready() -> bool:  # killed with about a third of the chunks written
        return sum(1 for op, k, _ in read_log(str(log)) if op == "write" and k in keys) >= N_CHUNKS // 3

    _run_and_kill("upload", bucket_uri, src.root.parent, digest, log, subprocess_env, ready)
    time.sleep(0.2)  # a request the killed child had sent whole may still be finishing at the server
    there = {k for k in keys if bucket.stat(k) is not None}
    assert N_CHUNKS // 3 <= len(there) < N_CHUNKS and bucket.stat(manifest_key(digest)) is None
    missing = sum(len(data[i * CHUNK:(i + 1) * CHUNK]) for i, k in enumerate(keys) if k not in there)
    sent_before = sum(n for op, k, n in read_log(str(log)) if op == "write" and k in keys)

    counted = CountingBucket(bucket)
    t = up(counted, src, digest)
    resent = counted.moved()[0]
    assert not set(counted.writes) & there  # nothing the bucket had was sent again
    assert t.bytes_moved == resent == missing <= len(data) - sent_before + CHUNK
    assert sent_before + resent <= len(data) + CHUNK  # re-sent in all: at most one chunk's worth
    assert manifest_key(digest) in counted.writes
    download_blob(bucket, store_for(tmp_path / "home-c").blobs, digest)
    assert store_for(tmp_path / "home-c").blobs.read_bytes(digest) == data


def test_killed_download_resumes(bucket_uri: str, src: BlobStore, dst: BlobStore, tmp_path: Path,
                                 subprocess_env: dict) -> None:
    bucket = open_test_bucket(bucket_uri)
    data = os.urandom(N_CHUNKS * CHUNK - 1000)
    digest = src.put_bytes(data)
    up(bucket, src, digest)
    journal = partial_dir(dst) / f"{digest}.journal"
    log = tmp_path / "download.log"

    def verified() -> int:
        try:
            return journal.read_bytes().count(b"\n") - 1
        except FileNotFoundError:
            return 0

    _run_and_kill("download", bucket_uri, dst.root.parent, digest, log, subprocess_env,
                  lambda: verified() >= N_CHUNKS // 3)
    assert_absent(dst, digest)  # nothing under the final name
    n_done = verified()
    assert N_CHUNKS // 3 <= n_done < N_CHUNKS
    missing = len(data) - n_done * CHUNK
    fetched_before = sum(n for op, k, n in read_log(str(log)) if op == "read" and k.startswith("sha256/"))

    counted = CountingBucket(bucket)
    got = Sum()
    r = download_blob(counted, dst, digest, progress=got)
    refetched = counted.moved()[1]
    assert r.bytes_skipped == n_done * CHUNK and got.total == len(data)
    assert r.bytes_moved == refetched == missing  # only the chunks not verified before the kill
    # in-flight chunks lost with the killed process: at most one per worker (two), partly read
    assert fetched_before + refetched <= len(data) + 2 * CHUNK
    assert dst.read_bytes(digest) == data
    assert not list(partial_dir(dst).glob(f"{digest}.*"))


# -- faults ----------------------------------------------------------------------------------------------
def test_faulty_bucket_never_yields_a_bad_blob(bucket: Bucket, tmp_path: Path) -> None:
    """Through FaultyBucket(rate=0.1): every transfer ends verified or with a clear error; a rerun
    of a failed download resumes, and the blob arrives eventually."""
    src = store_for(tmp_path / "faulty-src").blobs
    outcomes = {"ok": 0, "error": 0}
    faults: dict[str, int] = {}
    eventually = 0
    for i in range(30):
        data = os.urandom([300, 40_000, 3 * CHUNK + 5, 7 * CHUNK][i % 4])
        digest = src.put_bytes(data)
        faulty_up = FaultyBucket(bucket, rate=0.1, seed=1000 + i)
        try:
            up(faulty_up, src, digest)
        except (BucketUnavailable, IntegrityError) as e:
            assert "\n" not in str(e)
            up(bucket, src, digest)  # finish it cleanly so the download has something to fetch
        dst = store_for(tmp_path / f"faulty-dst-{i}").blobs
        for attempt in range(8):
            faulty = FaultyBucket(bucket, rate=0.1, seed=i * 100 + attempt)
            try:
                download_blob(faulty, dst, digest, attempts=3)
            except (BucketUnavailable, IntegrityError) as e:
                assert "\n" not in str(e) and bucket.uri in str(e)
                outcomes["error"] += 1
                assert_absent(dst, digest)  # never a blob that is not verified
            else:
                outcomes["ok"] += 1
                assert dst.read_bytes(digest) == data
                eventually += 1
                break
            finally:
                for kind, n in faulty.faults.items():
                    faults[kind] = faults.get(kind, 0) + n
        # and never a blob under a wrong name in the store
        assert set(dst.iter_hashes()) <= {digest}
    assert faults.get("bit_flip") and faults.get("truncated") and faults.get("unavailable"), faults
    assert outcomes["error"] > 0 and eventually >= 28, (outcomes, eventually)


def test_concurrent_downloads_of_one_blob(bucket: Bucket, src: BlobStore, dst: BlobStore) -> None:
    data = os.urandom(9 * CHUNK)
    digest = src.put_bytes(data)
    up(bucket, src, digest)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: download_blob(bucket, dst, digest), range(3)))
    assert sum(r.bytes_moved for r in results) == len(data)  # one fetched it, the others found it
    assert dst.read_bytes(digest) == data


def test_stale_partials_are_removed(src: BlobStore) -> None:
    partial = partial_dir(src)
    partial.mkdir(parents=True)
    old, fresh = "a" * 64, "b" * 64
    for name in (old, fresh):
        (partial / f"{name}.part").write_bytes(b"x")
        (partial / f"{name}.journal").write_bytes(b"{}\n")
    week_ago = time.time() - 8 * 24 * 3600
    for suffix in ("part", "journal"):
        os.utime(partial / f"{old}.{suffix}", (week_ago, week_ago))
    assert clean_partials(src) == 1
    assert sorted(p.name for p in partial.iterdir()) == [f"{fresh}.journal", f"{fresh}.part"]
