"""One conformance suite that every Bucket implementation passes (as DVC's TestRemote and
``git annex testremote``): a directory on the real file system and GCS on the real
fake-gcs-server binary, through the same tests. Nothing of ours is mocked. Several tests run real
processes against one bucket (concurrent compare-and-swap, racing creators, a writer killed
mid-stream)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bucket_fixtures import GCS_BUCKET, open_test_bucket

from kachery_tasks.buckets import (
    AlreadyExists,
    Bucket,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    ReadOnlyBucket,
    open_bucket,
)
from kachery_tasks.errors import UserError

MiB = 2**20


def content(bucket: Bucket, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(bucket.read(key, start, end))


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def start_together(go: Path, procs: list[subprocess.Popen]) -> None:
    """Wait until every worker has opened the bucket and waits for ``go``; then create it."""
    deadline = time.monotonic() + 60
    while len(list(go.parent.glob(f"{go.name}.ready.*"))) < len(procs):
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 7])
def test_round_trip(bucket: Bucket, size: int) -> None:
    data = os.urandom(size)
    info = bucket.write("objects/x", data)
    assert isinstance(info, ObjectInfo) and info.key == "objects/x" and info.size == size
    assert content(bucket, "objects/x") == data
    st = bucket.stat("objects/x")
    assert st is not None and st.size == size and st.generation == info.generation


@pytest.mark.parametrize("form", ["blocks", "file"])
def test_write_from_stream(bucket: Bucket, form: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 11)
    if form == "blocks":
        source = iter([data[i:i + 300_000] for i in range(0, len(data), 300_000)])
    else:
        path = tmp_path / "src"
        path.write_bytes(data)
        source = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        assert bucket.write("s", source).size == len(data)
    finally:
        if form == "file":
            source.close()
    assert content(bucket, "s") == data
    assert bucket.write("small", iter([b"ab", b"", b"c"])).size == 3
    assert content(bucket, "small") == b"abc"


def test_ranged_reads(bucket: Bucket) -> None:
    data = os.urandom(3 * MiB + 5)
    bucket.write("r", data)
    assert content(bucket, "r", 10) == data[10:]
    assert content(bucket, "r", 0, 10) == data[:10]
    assert content(bucket, "r", MiB - 3, 2 * MiB + 3) == data[MiB - 3:2 * MiB + 3]  # across blocks
    assert content(bucket, "r", len(data) - 4, len(data) + 100) == data[-4:]  # end past the end
    assert content(bucket, "r", len(data)) == b""  # start at the end
    assert content(bucket, "r", len(data) + 50) == b""  # start past the end
    assert content(bucket, "r", 7, 7) == b""
    bucket.write("empty", b"")
    assert content(bucket, "empty") == b"" and content(bucket, "empty", 0, 10) == b""
    with pytest.raises(ValueError):
        bucket.read("r", 5, 2)


def test_read_missing_raises_at_the_call(bucket: Bucket) -> None:
    with pytest.raises(NotFound) as e:
        bucket.read("no/such/key")  # not only when iterated
    assert bucket.uri in one_line(e.value)
    with pytest.raises(NotFound):
        bucket.read("no/such/key", 3, 3)
    assert bucket.stat("no/such/key") is None


# -- create-if-absent ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [5, 2 * MiB])  # a simple upload and a resumable one on GCS
def test_create_if_absent(bucket: Bucket, size: int) -> None:
    first = os.urandom(size)
    info = bucket.write("k", first)
    with pytest.raises(AlreadyExists) as e:
        bucket.write("k", os.urandom(size))
    assert e.value.current_generation == info.generation
    assert isinstance(e.value, PreconditionFailed)
    assert "k" in one_line(e.value) and bucket.uri in str(e.value)
    assert content(bucket, "k") == first
    assert bucket.stat("k").generation == info.generation


# -- compare-and-swap ----------------------------------------------------------------------------------
def test_compare_and_swap(bucket: Bucket) -> None:
    created = bucket.write_if_generation("head", b"v1", 0)  # must not exist: it does not
    assert created.generation > 0 and content(bucket, "head") == b"v1"
    with pytest.raises(AlreadyExists) as e:  # must not exist: it does
        bucket.write_if_generation("head", b"nope", None)
    assert e.value.current_generation == created.generation
    second = bucket.write_if_generation("head", b"v2", created.generation)
    assert second.generation > created.generation
    assert bucket.stat("head").generation == second.generation
    with pytest.raises(PreconditionFailed) as e:  # stale generation
        bucket.write_if_generation("head", b"v3", created.generation)
    assert e.value.current_generation == second.generation and not isinstance(e.value, AlreadyExists)
    assert str(second.generation) in one_line(e.value)
    assert content(bucket, "head") == b"v2"
    with pytest.raises(PreconditionFailed) as e:  # a generation for an object that does not exist
        bucket.write_if_generation("absent", b"x", 12345)
    assert e.value.current_generation == 0 and bucket.stat("absent") is None


def test_cas_after_plain_write(bucket: Bucket) -> None:
    first = bucket.write("claim", b"a")
    nxt = bucket.write_if_generation("claim", b"b", first.generation)
    assert nxt.generation > first.generation and content(bucket, "claim") == b"b"


def test_generation_never_reused_after_delete(bucket: Bucket) -> None:
    seen = [bucket.write("g", b"1").generation]
    seen.append(bucket.write_if_generation("g", b"2", seen[-1]).generation)
    assert bucket.delete("g")
    seen.append(bucket.write("g", b"3").generation)
    assert bucket.delete("g")
    seen.append(bucket.write_if_generation("g", b"4", 0).generation)
    assert seen == sorted(set(seen)), seen
    with pytest.raises(PreconditionFailed):  # a holder of an old generation cannot write
        bucket.write_if_generation("g", b"stale", seen[0])


CAS_WORKER = """
import os, sys, time
from bucket_fixtures import open_test_bucket
from kachery_tasks.buckets import PreconditionFailed
uri, key, k, go = sys.argv[1:5]
b = open_test_bucket(uri)
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
done = conflicts = 0
while done < int(k):
    info = b.stat(key)  # the generation first, then the bytes
    value = int(b"".join(b.read(key)))
    try:
        b.write_if_generation(key, str(value + 1).encode(), info.generation)
        done += 1
    except PreconditionFailed:
        conflicts += 1
print(conflicts)
"""


def test_concurrent_cas_from_processes(bucket: Bucket, bucket_uri: str, subprocess_env: dict,
                                       tmp_path: Path) -> None:
    n, k = 4, 15
    bucket.write("counter", b"0")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CAS_WORKER, bucket_uri, "counter", str(k), str(go)],
                              env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    start_together(go, procs)
    conflicts = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        conflicts += int(out)
    assert int(content(bucket, "counter")) == n * k, f"lost updates ({conflicts} conflicts retried)"


CREATE_WORKER = """
import os, sys, time
from bucket_fixtures import open_test_bucket
from kachery_tasks.buckets import AlreadyExists
uri, key, me, go = sys.argv[1:5]
b = open_test_bucket(uri)
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
try:
    b.write(key, (me * 1000).encode())
    print("won")
except AlreadyExists:
    print("lost")
"""


def test_concurrent_create_if_absent_one_wins(bucket: Bucket, bucket_uri: str, subprocess_env: dict,
                                              tmp_path: Path) -> None:
    go = tmp_path / "go"
    names = [f"w{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_WORKER, bucket_uri, "claims/task", name, str(go)],
                              env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    start_together(go, procs)
    results = {}
    for name, p in zip(names, procs, strict=True):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results[name] = out.strip()
    winners = [name for name, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    assert content(bucket, "claims/task") == (winners[0] * 1000).encode()


# -- listing, deleting, existence ----------------------------------------------------------------------
def test_list_with_prefix(bucket: Bucket) -> None:
    for key in ["a/1", "a/2", "a/sub/3", "ab", "b/1"]:
        bucket.write(key, key.encode())
    keys = lambda prefix: [i.key for i in bucket.list(prefix)]  # noqa: E731
    assert keys("") == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert keys("a/") == ["a/1", "a/2", "a/sub/3"]
    assert keys("a") == ["a/1", "a/2", "a/sub/3", "ab"]
    assert keys("a/s") == ["a/sub/3"]
    assert keys("c") == [] and keys("c/d/") == []
    infos = {i.key: i for i in bucket.list("b/")}
    assert infos["b/1"].size == 3 and infos["b/1"].generation == bucket.stat("b/1").generation


def test_delete(bucket: Bucket) -> None:
    bucket.write("d/x", b"x")
    assert bucket.delete("d/x") is True
    assert bucket.stat("d/x") is None
    assert bucket.delete("d/x") is False
    with pytest.raises(NotFound):
        bucket.read("d/x")
    assert [i.key for i in bucket.list("d/")] == []
    bucket.write("d/x", b"again")  # and the key can be used again
    assert content(bucket, "d/x") == b"again"


def test_exists_many_over_1000_keys(bucket: Bucket) -> None:
    keys = [f"blobs/{i:02x}/{i:06d}" for i in range(1000)]
    present = keys[::5]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: bucket.write(k, k.encode()), present))
    found = bucket.exists_many(keys)
    assert set(found) == set(present)
    assert all(found[k].size == len(k) for k in present)


def test_exists_many_small_and_spread(bucket: Bucket) -> None:
    for key in ["x/1", "y/deep/2", "z"]:
        bucket.write(key, b"1")
    asked = ["x/1", "x/nope", "y/deep/2", "z", "z", "zz", "a/b/c"]
    assert set(bucket.exists_many(asked)) == {"x/1", "y/deep/2", "z"}
    assert bucket.exists_many([]) == {}


BAD_KEYS = ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".", "a\x00b", "a\nb", ".kt/x",
            "x" * 1100, "a\\b"]


@pytest.mark.parametrize("key", BAD_KEYS + [5])
def test_bad_keys_rejected(bucket: Bucket, key: object) -> None:
    for call in (lambda: bucket.write(key, b"x"), lambda: bucket.read(key), lambda: bucket.stat(key),
                 lambda: bucket.write_if_generation(key, b"x", 0), lambda: bucket.delete(key),
                 lambda: bucket.exists_many(["ok", key])):
        with pytest.raises(InvalidKey) as e:
            call()
        assert isinstance(e.value, UserError) and bucket.uri in one_line(e.value)
    assert [i.key for i in bucket.list()] == []


def test_unicode_keys(bucket: Bucket) -> None:
    bucket.write("ünï/cødé ✓", b"u")
    assert content(bucket, "ünï/cødé ✓") == b"u"
    assert [i.key for i in bucket.list("ünï/")] == ["ünï/cødé ✓"]


# -- a writer killed mid-stream ------------------------------------------------------------------------
KILLED_WRITER = """
import os, sys, time
from bucket_fixtures import open_test_bucket
uri, key, started = sys.argv[1:4]
b = open_test_bucket(uri)
def blocks():
    for i in range(400):
        if i == 16:  # 4 MiB sent: uploads are under way
            open(started, "w").close()
        if i >= 16:
            time.sleep(0.05)
        yield os.urandom(256 * 1024)
b.write(key, blocks())
print("finished")
"""


def test_crash_mid_write_leaves_nothing(bucket: Bucket, bucket_uri: str, subprocess_env: dict,
                                        tmp_path: Path) -> None:
    started = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, bucket_uri, "big/object", str(started)],
                         env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert bucket.stat("big/object") is None
    assert [i.key for i in bucket.list()] == []
    with pytest.raises(NotFound):
        bucket.read("big/object")
    data = os.urandom(2 * MiB + 3)
    bucket.write("big/object", data)
    assert content(bucket, "big/object") == data


# -- opening -------------------------------------------------------------------------------------------
BAD_URIS = ["", "no-scheme", "/abs/path", "ftp://host/x", "s3://bucket/x", "file://relative/path",
            "file:relative", "file:///tmp/x?y=1", "gs://", "gs://UPPER/x", "gs://ab/x", "gs://-bad-/x"]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(UserError) as e:
        open_bucket(uri)
    assert repr(uri) in one_line(e.value) or uri in str(e.value)


def test_missing_bucket(bucket_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if bucket_kind == "directory":
        uri = (tmp_path / "not-there").as_uri()
    else:
        request.getfixturevalue("fake_gcs")
        uri = f"gs://kt-missing-{uuid.uuid4().hex[:8]}/p"
    with pytest.raises(UserError) as e:
        open_test_bucket(uri)
    assert uri in one_line(e.value) and "create" in str(e.value)


def test_gcs_prefix_is_a_namespace(fake_gcs: str) -> None:
    a = open_test_bucket(f"gs://{GCS_BUCKET}/ns-{uuid.uuid4().hex[:8]}")
    b = open_test_bucket(f"{a.uri}/inner")
    a.write("inner/x", b"1")
    assert content(b, "x") == b"1" and [i.key for i in b.list()] == ["x"]
    assert [i.key for i in a.list()] == ["inner/x"]


# -- the read-only variant -----------------------------------------------------------------------------
@pytest.mark.bucket_readonly
def test_read_only_bucket(bucket: Bucket, bucket_uri: str) -> None:
    info = bucket.write("ro/x", b"data")
    ro = open_test_bucket(bucket_uri, read_only=True)
    try:
        assert ro.read_only
        assert content(ro, "ro/x") == b"data" and content(ro, "ro/x", 1, 3) == b"at"
        assert ro.stat("ro/x") == bucket.stat("ro/x")
        assert [i.key for i in ro.list("ro/")] == ["ro/x"]
        assert set(ro.exists_many(["ro/x", "ro/y"])) == {"ro/x"}
        for call in (lambda: ro.write("ro/y", b"1"), lambda: ro.write("ro/x", b"1"),
                     lambda: ro.write_if_generation("ro/x", b"2", info.generation),
                     lambda: ro.write_if_generation("ro/z", b"2", 0), lambda: ro.delete("ro/x")):
            with pytest.raises(ReadOnlyBucket) as e:
                call()
            assert isinstance(e.value, UserError) and bucket_uri in one_line(e.value)
            assert "read-only" in str(e.value)
        assert content(bucket, "ro/x") == b"data" and bucket.stat("ro/y") is None
        assert bucket.stat("ro/x").generation == info.generation
    finally:
        ro.close()


@pytest.mark.bucket_readonly
def test_read_only_directory_bucket_makes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    b = open_bucket(root.as_uri(), read_only=True)
    assert b.stat("x") is None and list(b.list()) == []
    assert list(root.iterdir()) == []
