"""Two nodes (separate processes, separate homes) sharing one directory bucket: what one computed and
published, the other finds, verified and trusted, without computing it again.

Executions are counted through a file each computation appends to (a side channel, not a global).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]

PIPELINE = '''
import os
import numpy as np
import kachery_tasks as kt

COUNTER = os.environ["KT_TEST_COUNTER"]


def _count(name):
    with open(COUNTER, "a") as fh:
        fh.write(name + "\\n")


@kt.pure
def ramp(n):
    _count("ramp")
    return np.arange(n, dtype=np.float64) * 2.0


@kt.pure
def total(x):
    _count("total")
    return float(x.sum())


@kt.pure
def report(totals, tag):
    _count("report")
    return {"tag": tag, "sum": sum(totals)}


@kt.pure
def summary(arrays, totals):
    _count("summary")
    return {"n": sum(len(a) for a in arrays), "sum": sum(totals)}


@kt.pure(codec="pickle")
def shapes(n):
    _count("shapes")
    return {"n": n, "kinds": {"a", "b"}}


def square(x):  # plain functions, for dask.delayed graphs through kt.cached
    _count("square")
    return x * x


def add(a, b):
    _count("add")
    return a + b
'''


class Node:
    """One node: a home of its own, the shared bucket, and the pipeline module."""

    def __init__(self, tmp: Path, name: str, bucket: Path | str, counter: Path):
        self.home = tmp / name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_TASKS_")}
        self.env.update({
            "KACHERY_TASKS_HOME": str(self.home),
            "KACHERY_TASKS_BUCKET": bucket if isinstance(bucket, str) else bucket.as_uri(),
            "KT_TEST_COUNTER": str(counter),
            "PYTHONPATH": os.pathsep.join([str(tmp), str(REPO)]),
        })

    def run(self, code: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**self.env, **extra}, capture_output=True,
                              text=True, timeout=120, cwd=self.home.parent)

    def py(self, code: str, **extra: str) -> str:
        proc = self.run(code, **extra)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def kachery(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], env={**self.env, **extra},
                              capture_output=True, text=True, timeout=120, cwd=self.home.parent)

    @property
    def node_id(self) -> str:
        return self.py("from kachery_tasks import config\nfrom kachery_tasks.identity import node_identity\n"
                       "print(node_identity(config.home()).node_id)")


@pytest.fixture
def lab(tmp_path: Path):
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    counter = tmp_path / "runs.txt"
    a = Node(tmp_path, "home-a", bucket, counter)
    b = Node(tmp_path, "home-b", bucket, counter)
    return a, b, bucket, counter


def runs(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


CALL = "import pipeline\nprint(pipeline.total(pipeline.ramp.job(300_000)))"


def test_a_published_result_is_a_hit_for_a_node_that_trusts_its_publisher(lab):
    a, b, bucket, counter = lab
    assert a.py(CALL, KACHERY_TASKS_PUBLISH="true") == str(float((2.0 * __import__("numpy").arange(300_000)).sum()))
    assert runs(counter) == ["ramp", "total"]
    assert list((bucket / "records").iterdir()), "publishing put records in the bucket"

    # not trusted yet: B computes for itself
    untrusted = b.py(CALL)
    assert runs(counter) == ["ramp", "total", "ramp", "total"]

    # trusted: a hit, nothing computed; the record and blob land in B's store
    counter.unlink()
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    fresh = Node(b.home.parent, "home-c", bucket, counter)
    assert fresh.py(CALL, **trust) == untrusted
    assert runs(counter) == [], "a trusted record in the bucket is a hit"
    assert list((fresh.home / "tasks").rglob("*.json")), "the bucket hit was copied into the local store"
    # and again without the bucket: served from the local copy
    assert fresh.py(CALL, KACHERY_TASKS_TIERS="[memory, local]") == untrusted
    assert runs(counter) == []


def test_an_untrusted_pickle_is_never_loaded_and_explain_says_why(lab):
    a, b, bucket, counter = lab
    a.py("import pipeline\npipeline.shapes(3)", KACHERY_TASKS_PUBLISH="true")
    assert runs(counter) == ["shapes"]
    out = b.py("import pipeline, kachery_tasks as kt\n"
               "from kachery_tasks.tasks.resolver import find\n"
               "misses = []\n"
               "j = pipeline.shapes.job(3)\n"
               "print(find(j.settings.home, j.id, misses) is None)\n"
               "print(misses)")
    assert out.splitlines()[0] == "True"
    assert "not trusted" in out and a.node_id[:12] in out
    said = b.py("import pipeline, kachery_tasks as kt\nprint(kt.explain(pipeline.shapes.job(3)))")
    assert "not used: bucket:" in said and "not trusted" in said
    assert runs(counter) == ["shapes"], "looking is not computing"


def _record_file(bucket: Path) -> Path:
    [task_dir] = [d for d in (bucket / "records").iterdir() if d.is_dir()]
    [record] = list(task_dir.iterdir())
    return record


def test_a_tampered_record_in_the_bucket_is_refused_and_recomputed(lab):
    a, b, bucket, counter = lab
    code = "import pipeline\nprint(pipeline.shapes(7))"
    a.py(code, KACHERY_TASKS_PUBLISH="true")
    path = _record_file(bucket)
    record = orjson.loads(path.read_bytes())
    record["created"] += 1.0  # any change after signing
    os.chmod(path, 0o644)
    path.write_bytes(orjson.dumps(record))
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    out = b.py("import pipeline\nfrom kachery_tasks.tasks.resolver import find\nmisses = []\n"
               "j = pipeline.shapes.job(7)\nfind(j.settings.home, j.id, misses)\nprint(misses)", **trust)
    assert "bad signature" in out
    b.py(code, **trust)
    assert runs(counter) == ["shapes", "shapes"], "a tampered record is never served"


def test_a_record_whose_blob_is_gone_is_incomplete_and_recomputed(lab):
    a, b, bucket, counter = lab
    a.py("import pipeline\npipeline.ramp(300_000)", KACHERY_TASKS_PUBLISH="true")
    for blob in (bucket / "sha256").rglob("*"):
        if blob.is_file():
            blob.unlink()
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    out = b.py("import pipeline\nfrom kachery_tasks.tasks.resolver import find\nmisses = []\n"
               "j = pipeline.ramp.job(300_000)\nprint(find(j.settings.home, j.id, misses) is None, misses)", **trust)
    assert out.startswith("True") and "not in the bucket" in out
    b.py("import pipeline\npipeline.ramp(300_000)", **trust)
    assert runs(counter) == ["ramp", "ramp"]


def test_publish_by_command_then_hit_elsewhere(lab):
    a, b, bucket, counter = lab
    task_id = a.py("import pipeline\nj = pipeline.ramp.job(1000)\nj.result()\nprint(j.id)")
    assert not (bucket / "records").exists()
    proc = a.kachery("publish", task_id)
    assert proc.returncode == 0, proc.stderr
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    b.py("import pipeline\npipeline.ramp(1000)", **trust)
    assert runs(counter) == ["ramp"]
    listed = json.loads(a.kachery("bucket", "ls", "--json").stdout)
    assert [(row["kind"], row["id"], row["function"]) for row in listed][0] == ("record", task_id, "pipeline.ramp")
    assert [(row["kind"], row["bytes"]) for row in listed][1:] == [("file", 8000 + 128)], "its result blob (npy)"
    assert json.loads(b.kachery("bucket", "ls", "--json").stdout) == [], "B published nothing"
    assert "not in the bucket" in b.kachery("bucket", "rm", task_id).stdout, "B cannot remove A's record"
    assert a.kachery("bucket", "rm", task_id[:10]).returncode == 0
    assert [row["kind"] for row in json.loads(a.kachery("bucket", "ls", "--json").stdout)] == ["file"]
    c = Node(b.home.parent, "home-c", bucket, counter)
    c.py("import pipeline\npipeline.ramp(1000)", **trust)
    assert runs(counter) == ["ramp", "ramp"], "a removed record is no longer a hit"


def _bucket_files(bucket: Path) -> list[str]:
    return sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file() and ".kt" not in p.parts)


def test_a_file_is_removed_only_when_no_record_names_it_and_the_other_node_then_misses_cleanly(lab):
    a, b, bucket, counter = lab
    a.py(CALL, KACHERY_TASKS_PUBLISH="true")
    [file] = [row for row in json.loads(a.kachery("bucket", "ls", "--json").stdout) if row["kind"] == "file"]
    uri, task_id = file["id"], a.py("import pipeline\nprint(pipeline.ramp.task_id(300_000))")
    before = _bucket_files(bucket)
    refused = a.kachery("bucket", "rm", uri)
    line = refused.stderr.strip()
    assert refused.returncode == 1 and len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert task_id in line and "pipeline.ramp" in line and "kachery bucket rm TASK_ID" in line and "--force" in line
    assert _bucket_files(bucket) == before, "refused: nothing deleted"
    theirs = b.kachery("bucket", "rm", uri)
    assert theirs.returncode == 1 and "was not published to" in theirs.stderr, "B did not publish it"

    assert a.kachery("bucket", "rm", task_id).returncode == 0
    done = a.kachery("bucket", "rm", uri)
    assert done.returncode == 0 and f"removed {uri}" in done.stdout, done.stderr
    assert [row["kind"] for row in json.loads(a.kachery("bucket", "ls", "--json").stdout)] == ["record"]  # total's
    assert not [k for k in _bucket_files(bucket) if k.startswith(("sha256/", "files/"))]

    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    missed = b.kachery("load", uri, **trust)
    assert missed.returncode == 1 and len(missed.stderr.strip().splitlines()) == 1, missed.stderr
    assert not list((b.home / "store").rglob("*.part")) if (b.home / "store").exists() else True
    value = b.py("import pipeline\nprint(float(pipeline.ramp(300_000).sum()))", **trust)
    assert float(value) == 2.0 * 299_999 * 300_000 / 2
    assert runs(counter) == ["ramp", "total", "ramp"], "B computed what is no longer in the bucket, correctly"


def test_publishing_without_a_bucket_is_one_line(lab):
    a, _, _, _ = lab
    proc = a.kachery("publish", "0" * 32, KACHERY_TASKS_BUCKET="")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


DASK_RERUN = '''
import dask, json
import kachery_tasks as kt
import pipeline
from kachery_tasks.buckets.directory import DirectoryBucket

calls = {"exists_many": 0, "list": 0}
for name in calls:
    original = getattr(DirectoryBucket, name)
    def counted(self, *args, _name=name, _original=original, **kwargs):
        calls[_name] += 1
        return _original(self, *args, **kwargs)
    setattr(DirectoryBucket, name, counted)

import os
totals = [pipeline.total.delayed(pipeline.ramp.delayed(1000 + i)) for i in range(20)]
value = pipeline.report.delayed(totals, os.environ["KT_TAG"]).compute(scheduler="sync")
print(json.dumps({"sum": value["sum"], "calls": calls}))
'''


def test_a_dask_pipeline_rerun_elsewhere_computes_only_what_changed_after_batched_lookups(lab):
    a, b, bucket, counter = lab
    first = json.loads(a.py(DASK_RERUN + "", KACHERY_TASKS_PUBLISH="true", KT_TAG="a"))
    assert len(runs(counter)) == 41
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    again = json.loads(b.py(DASK_RERUN, KT_TAG="b", **trust))  # a new report over the same 20 totals
    assert again["sum"] == first["sum"]
    assert runs(counter)[41:] == ["report"], "the other node computed only the changed root"
    # one batched check for the root's level, one for the 20 totals (their ramps are never visited)
    assert again["calls"]["exists_many"] == 2, again["calls"]


COLLECTION = '''
import json, warnings
import kachery_tasks as kt
import pipeline

totals = [pipeline.total.delayed(pipeline.ramp.delayed(1000 + i)) for i in range(5)]
root = pipeline.report.delayed(totals, "tag")


def publish(collection):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = kt.publish(collection)
    return {"records": len(out.records), "blobs": len(out.blobs), "not_computed": out.not_computed,
            "warnings": [str(w.message) for w in said], "summary": out.summary()}
'''


def test_publishing_a_dask_collection_sends_what_is_computed_and_names_the_rest(lab):
    a, b, bucket, counter = lab
    steps = json.loads(a.py(COLLECTION + """
out = {"none": publish(root)}
totals[0].compute(scheduler="sync")
out["part"] = publish(root)
root.compute(scheduler="sync")
out["all"] = publish(root)
print(json.dumps(out))
"""))
    none, part, done = steps["none"], steps["part"], steps["all"]
    # not computed: not an error; nothing sent, every node named, in the return value and one warning
    assert (none["records"], none["blobs"], len(none["not_computed"])) == (0, 0, 11)
    assert len(none["warnings"]) == 1 and "11 graph node(s) have no result" in none["warnings"][0]
    assert "compute the collection first" in none["warnings"][0] and "\n" not in none["warnings"][0]
    assert "11 graph node(s) not computed yet" in none["summary"]
    # one branch computed: its two records (and the ramp's blob) go, the 9 others are named
    assert (part["records"], part["blobs"], len(part["not_computed"])) == (2, 1, 9)
    assert all(name.startswith(("ramp-", "total-", "report-")) for name in part["not_computed"])
    assert (done["records"], done["blobs"], done["not_computed"], done["warnings"]) == (11, 5, [], [])
    assert runs(counter).count("ramp") == 5 and len(runs(counter)) == 11
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    value = b.py(COLLECTION + "print(root.compute(scheduler='sync')['sum'])", **trust)
    assert float(value) == sum(2.0 * (n - 1) * n / 2 for n in range(1000, 1005))
    assert len(runs(counter)) == 11, "B computed nothing: every node was published"


def test_publishing_a_cached_collection_of_plain_dask_functions(lab):
    a, b, _, counter = lab
    code = COLLECTION + """
import dask
graph = dask.delayed(pipeline.add)(dask.delayed(pipeline.square)(3), dask.delayed(pipeline.square)(4))
c = kt.cached(graph, min_seconds=0)
"""
    first = json.loads(a.py(code + "v = c.compute(scheduler='sync')\nprint(json.dumps([v, publish(c)]))"))
    assert first[0] == 25 and first[1]["records"] == 3 and first[1]["not_computed"] == []
    assert sorted(runs(counter)) == ["add", "square", "square"]
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    assert b.py(code + "print(c.compute(scheduler='sync'))", **trust) == "25"
    assert len(runs(counter)) == 3, "B loaded the cached graph's results from the bucket"


DASK_FETCH = '''
import dask, json, os, threading
import kachery_tasks as kt
import pipeline
from kachery_tasks.buckets.directory import DirectoryBucket
from kachery_tasks.tasks.stats import STATS

publisher = os.environ["KT_PUBLISHER"]
reads = []  # [key, thread] of each read of one of the publisher's records or of a blob
attempts = []  # the records the prefetch tried to read
overlapped = []  # whether the first two record reads were in flight together
meet = threading.Barrier(2, timeout=5)  # one at a time, the first waits alone and the barrier breaks
lock = threading.Lock()
original = DirectoryBucket.read


def read(self, key, *args, **kwargs):
    if key.startswith("records/") and threading.current_thread().name.startswith("kt-prefetch"):
        with lock:
            attempts.append(key)  # found or not
    blocks = original(self, key, *args, **kwargs)  # what is not there (NotFound) is not in reads
    record = key.endswith(publisher + ".json")
    if record or key.startswith("sha256/"):
        with lock:
            reads.append([key, threading.current_thread().name])
            first_two = record and sum(k.startswith("records/") for k, _ in reads) <= 2
        if first_two:
            try:
                meet.wait()
                overlapped.append(True)
            except threading.BrokenBarrierError:
                overlapped.append(False)
    return blocks


DirectoryBucket.read = read
ramps = [pipeline.ramp.delayed(1000 + i) for i in range(20)]
totals = [pipeline.total.delayed(r) for r in ramps]
if os.environ.get("KT_EXPLAIN"):
    [job] = [t.job for t in totals if t.job.id == os.environ["KT_EXPLAIN"]]
    print(json.dumps({"explain": str(kt.explain(job))}))
else:  # a new root over what A published: one graph, whose second level is 40 load nodes
    value = pipeline.summary.delayed(ramps, totals).compute(scheduler="sync")
    print(json.dumps({"summary": value, "reads": reads, "attempts": attempts, "overlapped": overlapped,
                      "stats": STATS.snapshot()}))
'''


SUMMARY = {"n": sum(1000 + i for i in range(20)), "sum": sum(2.0 * sum(range(1000 + i)) for i in range(20))}


def test_a_dask_rerun_from_the_bucket_computes_nothing_and_fetches_every_record_at_once(lab):
    """A new root on B over 40 results A published: B computes the root alone. Its 40 load nodes
    are one level of the graph: one batched check, then every record and blob is read by the
    prefetch's threads, several in flight, before the graph runs; the load nodes then read the
    local store alone. Fails if the prefetch is removed (the load nodes read the bucket, one at a
    time, on the scheduler's thread), made sequential (``bucket_parallelism: 1``), or made to read
    B's own records, which the batched check found absent, before A's (twice the requests)."""
    a, b, bucket, counter = lab
    a.py(DASK_RERUN, KACHERY_TASKS_PUBLISH="true", KT_TAG="a")
    assert len(runs(counter)) == 41
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id]), "KT_PUBLISHER": a.node_id}
    out = json.loads(b.py(DASK_FETCH, **trust))
    assert out["summary"] == SUMMARY
    assert runs(counter)[41:] == ["summary"], "nothing computed on B but the new root"
    records = [key for key, _ in out["reads"] if key.startswith("records/")]
    blobs = [key for key, _ in out["reads"] if key.startswith("sha256/")]
    assert len(records) == len(set(records)) == 40, "every record read once: 20 ramps, 20 totals"
    assert sorted(out["attempts"]) == sorted(records), "no read of a record the batched check found absent (B's own)"
    assert len(blobs) == len(set(blobs)) == 20, "every result blob read once (the totals are inline)"
    threads = {thread for _, thread in out["reads"]}
    assert all(t.startswith("kt-prefetch") for t in threads), f"read outside the prefetch: {threads}"
    assert out["overlapped"] == [True, True], "the records are fetched in parallel"
    stats = out["stats"]
    assert stats.get("prefetched_bucket") == 40 and stats.get("hit_local") == 40, stats
    assert "hit_bucket" not in stats, "no load node went to the bucket"


def test_one_tampered_record_among_many_is_refused_and_that_node_alone_recomputed(lab):
    a, b, bucket, counter = lab
    a.py(DASK_RERUN, KACHERY_TASKS_PUBLISH="true", KT_TAG="a")
    tampered = None
    for path in sorted((bucket / "records").rglob("*.json")):
        record = orjson.loads(path.read_bytes())
        if record["function"]["name"] == "pipeline.total":
            record["created"] += 1.0  # any change after signing
            os.chmod(path, 0o644)
            path.write_bytes(orjson.dumps(record))
            tampered = record["task_id"]
            break
    assert tampered is not None
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id]), "KT_PUBLISHER": a.node_id}
    said = json.loads(b.py(DASK_FETCH, KT_EXPLAIN=tampered, **trust))["explain"]
    assert "bad signature" in said
    out = json.loads(b.py(DASK_FETCH, **trust))
    assert out["summary"] == SUMMARY
    assert sorted(runs(counter)[41:]) == ["summary", "total"], "the tampered record's node alone is computed"
    assert out["stats"].get("prefetched_bucket") == 39, out["stats"]  # 20 ramps (one feeds the total), 19 totals


def test_a_file_published_by_one_node_is_loaded_by_another_verified(lab, tmp_path):
    a, b, bucket, _ = lab
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit
    (tmp_path / "rec.dat").write_bytes(data)
    uri = a.kachery("store", str(tmp_path / "rec.dat")).stdout.strip()
    assert b.kachery("cat", uri).returncode == 1, "not there before it is published"
    proc = a.kachery("publish", uri)
    assert proc.returncode == 0, proc.stderr
    path = b.kachery("load", uri).stdout.strip()
    assert Path(path).read_bytes() == data and str(b.home) in path
    # a damaged copy in the bucket is refused with one line, never handed out
    [obj] = [p for p in (bucket / "sha256").rglob("*") if p.is_file()]
    os.chmod(obj, 0o644)
    obj.write_bytes(data[:-1] + b"X")
    c = Node(tmp_path, "home-c", bucket, tmp_path / "runs.txt")
    proc = c.kachery("cat", uri)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    kept = [p for p in (c.home / "store" / "sha256").rglob("*") if p.is_file()] if (c.home / "store").exists() else []
    assert kept == [], "damaged bytes never enter the store"


@pytest.mark.parametrize("bucket_kind", ["gcs"])
def test_sharing_through_google_cloud_storage(tmp_path, bucket_uri):
    """The same sharing through fake-gcs-server (the real google-cloud-storage client on both nodes)."""
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    a = Node(tmp_path, "home-a", bucket_uri, counter)
    b = Node(tmp_path, "home-b", bucket_uri, counter)
    first = a.py(CALL, KACHERY_TASKS_PUBLISH="true")
    assert runs(counter) == ["ramp", "total"]
    trust = {"KACHERY_TASKS_TRUSTED_NODES": json.dumps([a.node_id])}
    assert b.py(CALL, **trust) == first
    assert runs(counter) == ["ramp", "total"], "a trusted record in the GCS bucket is a hit"
    c = Node(tmp_path, "home-c", bucket_uri, counter)  # trusts nobody
    said = c.py("import pipeline, kachery_tasks as kt\nprint(kt.explain(pipeline.ramp.job(300_000)))")
    assert "not trusted" in said and a.node_id[:12] in said
