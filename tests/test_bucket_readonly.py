"""A node whose credentials may read the bucket but not write it (issue 21: "credentials without write
permission: one line, and read-only use still works").

Two real ways to be refused: a directory bucket owned by root, used by a node that runs as a second
Unix user (tests run as root, and permissions deny root nothing); and fake-gcs-server behind a proxy
that answers 403 to every write, as Google answers an ``objectViewer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from second_user import give, reachable_dir, run_as_second_user, second_user
from test_bucket_sharing import CALL, PIPELINE, Node, runs
from test_buckets_impl import FlakyProxy

DATA = bytes(range(256)) * 5000

# runs as the reader: a hit from the bucket, two results computed (auto-publish refused), a file loaded
READER = '''
import sys
import pipeline, kachery_tasks as kt
print(pipeline.total(pipeline.ramp.job(300_000)))
seven = float(pipeline.ramp(7).sum())  # a line each: Python shows a warning once per line
eight = float(pipeline.ramp(8).sum())
print(seven, eight)
print(kt.load_file(sys.argv[1]).read_bytes() == open("data.bin", "rb").read())
'''
SAYS = ("read-only for these credentials", "kachery config set bucket_read_only true")


def _objects(bucket: Path) -> dict[str, int]:
    """Every object of a directory bucket (its .kt/ bookkeeping aside) with its size."""
    return {str(p.relative_to(bucket)): p.stat().st_size for p in bucket.rglob("*")
            if p.is_file() and p.relative_to(bucket).parts[0] != ".kt"}


class Reader:
    """Node B, run as the second user."""

    def __init__(self, base: Path, env: dict[str, str]):
        self.home = give(base / "home-b")
        self.env = {**env, "KACHERY_TASKS_HOME": str(self.home)}
        self.cwd = base

    def run(self, *args: str, **extra: str):
        return run_as_second_user(list(args), {**self.env, **extra}, cwd=self.cwd)


@pytest.fixture
def shared():
    found = second_user()
    if isinstance(found, str):
        pytest.skip(found)
    with reachable_dir() as base:
        (base / "pipeline.py").write_text(PIPELINE)
        (base / "data.bin").write_bytes(DATA)
        counter = base / "runs.txt"
        counter.touch()
        for path in (base / "pipeline.py", base / "data.bin", counter):
            path.chmod(0o666 if path == counter else 0o644)
        bucket = base / "bucket"
        bucket.mkdir(mode=0o755)
        yield base, bucket, counter


def test_a_reader_without_write_access_gets_hits_and_files_and_one_warning(shared):
    base, bucket, counter = shared
    a = Node(base, "home-a", bucket, counter)
    a.py(CALL, KACHERY_TASKS_PUBLISH="true")
    uri = a.kachery("store", str(base / "data.bin")).stdout.strip()
    assert a.kachery("publish", uri).returncode == 0
    before = _objects(bucket)
    b = Reader(base, {**a.env, "KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])})

    done = b.run("-c", READER, uri, KACHERY_TASKS_PUBLISH="true")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == [str(2.0 * 21), str(2.0 * 28), "True"]
    assert runs(counter) == ["ramp", "total", "ramp", "ramp"], "the hit was read; only the new calls ran"
    # the first refused write made the bucket read-only: one line, once, saying how to silence it
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(s in lines[0] for s in SAYS) and "ReadOnlyBucketWarning" in lines[0], done.stderr
    assert _objects(bucket) == before, "nothing was written"

    # said in advance: not a word
    quiet = b.run("-c", "import pipeline; pipeline.ramp(9)", KACHERY_TASKS_PUBLISH="true",
                  KACHERY_TASKS_BUCKET_READ_ONLY="true")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr

    # by hand: one line, exit status 1, no traceback
    task_id = b.run("-c", "import pipeline; print(pipeline.ramp.task_id(7))").stdout.strip()
    refused = b.run("-m", "kachery_tasks.cli", "publish", task_id)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and all(s in refused.stderr for s in SAYS), refused.stderr
    loaded = b.run("-m", "kachery_tasks.cli", "load", uri)
    assert loaded.returncode == 0 and Path(loaded.stdout.strip()).read_bytes() == DATA
    assert _objects(bucket) == before


@pytest.mark.parametrize("bucket_kind", ["gcs"])
def test_a_gcs_reader_refused_writes_by_the_server_still_gets_hits(tmp_path, bucket_uri):
    """fake-gcs-server behind a proxy that answers 403 to writes: the same as an objectViewer."""
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    a = Node(tmp_path, "home-a", bucket_uri, counter)
    first = a.py(CALL, KACHERY_TASKS_PUBLISH="true")
    proxy = FlakyProxy(os.environ["STORAGE_EMULATOR_HOST"], writes_status=403)
    try:
        b = Node(tmp_path, "home-b", bucket_uri, counter)
        reader = {"STORAGE_EMULATOR_HOST": proxy.url, "KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id]),
                  "KACHERY_TASKS_PUBLISH": "true"}
        proc = b.run(CALL + "\npipeline.ramp(7)\npipeline.ramp(8)", **reader)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == first and runs(counter) == ["ramp", "total", "ramp", "ramp"]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and all(s in lines[0] for s in SAYS) and "roles/storage" in lines[0], proc.stderr
        refused = b.kachery("publish", "--json", b.py("import pipeline; print(pipeline.ramp.task_id(7))"), **reader)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert SAYS[0] in refused.stderr and "Traceback" not in refused.stderr
    finally:
        proxy.close()

