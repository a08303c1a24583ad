"""What one bucket implementation does beyond the conformance suite: the directory bucket's temp
files and generation rule, GCS retries through a proxy that answers 503 and 429, an unreachable
server, the fault-injecting wrapper, errors across processes, and lazy imports."""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bucket_faults import FaultyBucket
from bucket_fixtures import GCS_BUCKET

from kachery_tasks.buckets import (
    Bucket,
    BucketError,
    BucketUnavailable,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    open_bucket,
)
from kachery_tasks.errors import UserError


# -- directory -----------------------------------------------------------------------------------------
def test_directory_removes_old_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    open_bucket(root.as_uri())
    tmp = root / ".kt" / "tmp"
    old, fresh = tmp / ".tmp-0123456789abcdef", tmp / ".tmp-fedcba9876543210"
    old.write_bytes(b"left by a killed writer")
    fresh.write_bytes(b"a writer at work")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    open_bucket(root.as_uri())
    assert not old.exists() and fresh.exists()


def test_directory_generation_survives_an_interrupted_commit(tmp_path: Path) -> None:
    """A compare-and-swap killed between renaming the object and its generation file: the new
    object is there, the sidecar still names the old inode. The rule makes it generation g+1."""
    root = tmp_path / "b"
    root.mkdir()
    b = open_bucket(root.as_uri())
    g1 = b.write("head", b"1").generation
    g2 = b.write_if_generation("head", b"2", g1).generation
    new = root / ".kt" / "tmp" / "interrupted"
    new.write_bytes(b"3")
    os.replace(new, root / "head")  # what the killed commit had done
    assert b.stat("head").generation == g2 + 1
    with pytest.raises(PreconditionFailed) as e:
        b.write_if_generation("head", b"stale", g2)
    assert e.value.current_generation == g2 + 1
    assert b.write_if_generation("head", b"4", g2 + 1).generation == g2 + 2
    assert b"".join(b.read("head")) == b"4"


def test_directory_key_and_directory_conflict(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    b = open_bucket(root.as_uri())
    b.write("a", b"1")
    with pytest.raises(BucketError) as e:
        b.write("a/b", b"2")
    assert "\n" not in str(e.value) and "a/b" in str(e.value)
    b.write("c/d", b"1")
    with pytest.raises(BucketError):
        b.write_if_generation("c", b"2", 0)
    assert b.stat("c") is None and [i.key for i in b.list()] == ["a", "c/d"]


def test_directory_cas_threads_of_one_process(tmp_path: Path) -> None:
    """POSIX locks are per process: the thread lock beside each must serialise threads."""
    root = tmp_path / "b"
    root.mkdir()
    buckets = [open_bucket(root.as_uri()) for _ in range(2)]  # two objects, one lock file each stripe
    buckets[0].write("n", b"0")

    def work(b: Bucket) -> None:
        done = 0
        while done < 25:
            info = b.stat("n")
            value = int(b"".join(b.read("n")))
            try:
                b.write_if_generation("n", str(value + 1).encode(), info.generation)
                done += 1
            except PreconditionFailed:
                pass

    threads = [threading.Thread(target=work, args=(buckets[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(b"".join(buckets[0].read("n"))) == 100


# -- GCS through a proxy that fails --------------------------------------------------------------------
class FlakyProxy:
    """An HTTP proxy to fake-gcs-server that answers 503 or 429 to every ``every``-th request,
    some of them *after* forwarding it (the server did the work; the answer is lost).
    ``writes_status``: every request that writes (POST, PUT, PATCH, DELETE) gets that answer instead,
    and nothing else fails (credentials that may read and not write)."""

    def __init__(self, target: str, every: int = 3, status: int | None = None, writes_status: int | None = None):
        self.target = urlsplit(target)
        self.every = every
        self.status = status
        self.writes_status = writes_status
        self.count = 0
        self.injected = {"before": 0, "after": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                if proxy.writes_status is not None and self.command != "GET":
                    code = proxy.writes_status
                    return self.reply(code, {}, b'{"error": {"code": %d, "message": "no write access"}}' % code)
                fail = proxy.writes_status is None and n % proxy.every == 0
                after = fail and (n // proxy.every) % 2 == 0 and self.command in ("POST", "PUT")
                if fail and not after:
                    proxy.injected["before"] += 1
                    code = proxy.status or (503 if n % 2 else 429)
                    return self.reply(code, {}, b'{"error": {"code": %d, "message": "injected"}}' % code)
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if after:
                    proxy.injected["after"] += 1
                    return self.reply(503, {}, b'{"error": {"code": 503}}')
                skip = ("transfer-encoding", "connection", "content-length")
                self.reply(resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in skip}, data)

            def reply(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that closed its connection early: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_gcs(fake_gcs: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(fake_gcs)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    yield proxy
    proxy.close()


def test_gcs_retries_server_errors_and_lost_answers(flaky_gcs: FlakyProxy) -> None:
    b = open_bucket(f"gs://{GCS_BUCKET}/flaky-{uuid.uuid4().hex[:8]}", retry_initial=0.01, retry_deadline=30,
                    timeout=10, chunk_size=2**18, simple_max=2**18, read_block=2**18)
    big = os.urandom(2**20 + 3)  # resumable: 5 chunks
    assert b.write("big", big).size == len(big)
    assert b"".join(b.read("big")) == big
    g = b.write("head", b"1").generation
    for i in range(2, 8):  # compare-and-swap answers lost after the server wrote: our write id says so
        g = b.write_if_generation("head", str(i).encode(), g).generation
    assert b"".join(b.read("head")) == b"7" and b.stat("head").generation == g
    assert set(b.exists_many(["big", "head", "none"])) == {"big", "head"}
    assert [i.key for i in b.list()] == ["big", "head"]
    assert b.delete("big")
    b.close()
    assert flaky_gcs.injected["before"] >= 5 and flaky_gcs.injected["after"] >= 2, flaky_gcs.injected


def test_gcs_forbidden_names_the_role(fake_gcs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FlakyProxy(fake_gcs, every=1, status=403)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        with pytest.raises(PermissionDenied) as e:
            open_bucket(f"gs://{GCS_BUCKET}/forbidden")
    finally:
        proxy.close()
    text = str(e.value)
    assert "\n" not in text and f"gs://{GCS_BUCKET}/forbidden" in text and "roles/storage.objectViewer" in text
    assert isinstance(e.value, UserError)


def test_gcs_unreachable_gives_up_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(BucketUnavailable) as e:
        open_bucket("gs://some-bucket/p", retry_deadline=1.0, retry_initial=0.05, timeout=1.0)
    assert time.monotonic() - t0 < 15
    assert "gs://some-bucket/p" in str(e.value) and "\n" not in str(e.value)


# -- the fault injector ----------------------------------------------------------------------------------
def read_verified(bucket: Bucket, key: str, sha256: str, attempts: int = 50) -> bytes:
    """What a transfer does: read, check the hash, try again; the bytes or a clear error."""
    for _ in range(attempts):
        try:
            data = b"".join(bucket.read(key))
        except BucketUnavailable:
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    raise BucketError(f"{bucket.uri}: {key} did not verify in {attempts} attempts")


def test_faulty_bucket_injects_and_verified_reads_survive(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    inner = open_bucket(root.as_uri())
    data = os.urandom(3 * 2**20 + 1)  # 4 blocks per read
    inner.write("x", data)
    faulty = FaultyBucket(inner, rate=0.3, seed=7)
    wrong = 0
    for _ in range(30):
        try:
            wrong += b"".join(faulty.read("x")) != data
        except BucketUnavailable:
            pass
    assert wrong > 0 and faulty.faults["unavailable"] and faulty.faults["truncated"] and faulty.faults["bit_flip"]
    assert read_verified(faulty, "x", hashlib.sha256(data).hexdigest()) == data
    with pytest.raises(BucketError):
        read_verified(FaultyBucket(inner, rate=1.0, seed=1), "x", hashlib.sha256(data).hexdigest(), 5)
    assert FaultyBucket(inner, rate=0.0).stat("x") == inner.stat("x")


# -- errors and imports ---------------------------------------------------------------------------------
def test_errors_survive_pickling() -> None:
    e = PreconditionFailed("gs://b/p: object k is at generation 5, not 4", "gs://b/p", "k", 5)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is PreconditionFailed and back.current_generation == 5 and back.key == "k"
    assert str(back) == str(e)
    n = pickle.loads(pickle.dumps(NotFound("u: no object k", "u", "k")))
    assert isinstance(n, LookupError) and n.uri == "u"


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_google_libraries_load_only_for_gs_uris(tmp_path: Path) -> None:
    proc = run_python(f"""
import sys, kachery_tasks, kachery_tasks.buckets
from kachery_tasks.buckets import open_bucket
open_bucket({tmp_path.as_uri()!r})
assert not [m for m in sys.modules if m.startswith("google")], "google imported"
""")
    assert proc.returncode == 0, proc.stderr


def test_gs_without_the_extra_says_what_to_install() -> None:
    proc = run_python("""
import sys
sys.modules["google.cloud.storage"] = None  # as if google-cloud-storage were not installed
from kachery_tasks.buckets import open_bucket
from kachery_tasks.errors import UserError
try:
    open_bucket("gs://some-bucket/x")
except UserError as e:
    print(e)
""")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "pip install 'kachery-tasks[gcs]'" in line and "gs://some-bucket/x" in line
