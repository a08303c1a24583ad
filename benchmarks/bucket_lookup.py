"""Bucket tier: looking up a 10,000-node pipeline whose records are only in a bucket.

Node A computes 10,000 small pure tasks and publishes them to a bucket (a directory, and Google
Cloud Storage through fake-gcs-server); node B, an empty home trusting A, asks which of the 10,000
it could load: one batched check (``resolver.have_results``, what prunes a Dask graph: one
``exists_many`` per bucket) against one ``stat`` per node, the way a tier without a batch call would
ask (kachery-cloud, DVC's per-object ``exists``). Target (issue 21): the batched check ≥ 10× faster.
Then B reruns a pipeline of a new root over 1,000 of them (everything below the root loaded from the
bucket, one record and one blob read each) against computing them in a fresh home.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kachery_tasks import config
from kachery_tasks.buckets import open_bucket
from kachery_tasks.buckets.layout import record_key
from kachery_tasks.identity import node_identity
from kachery_tasks.tasks import pure
from kachery_tasks.tasks.publish import publish
from kachery_tasks.tasks.resolver import have_results

from ._common import row

N = 10_000
#: The rerun loads every result from the bucket, one record and blob read each: fewer of them, so the
#: benchmark ends in minutes through the emulator.
N_RERUN = 1_000


@pure
def leaf(i: int) -> int:
    time.sleep(0.0005)  # a small computation: 5 s for all of them
    return i * i


@pure
def combine(values: list, tag: str) -> int:
    return sum(values) + len(tag)


def _case(kind: str, uri: str, tmp: Path) -> list[dict]:
    home_a, home_b = str(tmp / f"{kind}-a"), str(tmp / f"{kind}-b")
    with config.set(home=home_a, bucket=uri):
        jobs = [leaf.job(i) for i in range(N)]
        for job in jobs:
            job.result()
        start = time.perf_counter()
        publish(*jobs)
        publish_s = time.perf_counter() - start
        a_id = node_identity(config.home()).node_id
    with config.set(home=home_b, bucket=uri, trusted_nodes=[a_id]):
        jobs = [leaf.job(i) for i in range(N)]
        start = time.perf_counter()
        found = have_results(jobs)
        batched_s = time.perf_counter() - start
        assert len(found) == N, len(found)
        bucket = open_bucket(uri, read_only=True)
        start = time.perf_counter()
        stats = [bucket.stat(record_key(job.id, a_id)) for job in jobs]
        per_node_s = time.perf_counter() - start
        assert all(s is not None for s in stats)

        import dask

        root = combine.delayed([leaf.delayed(i) for i in range(N_RERUN)], "b")
        start = time.perf_counter()
        dask.compute(root, scheduler="threads")
        rerun_s = time.perf_counter() - start
    with config.set(home=str(tmp / f"{kind}-c")):  # the same pipeline computed from nothing
        root = combine.delayed([leaf.delayed(i) for i in range(N_RERUN)], "b")
        start = time.perf_counter()
        dask.compute(root, scheduler="threads")
        compute_s = time.perf_counter() - start
    return [
        row(f"{kind}: is each of {N} records there?", batched_s, "one stat per node", per_node_s,
            note=f"one batched check; publishing the {N} took {publish_s:.1f} s", target="≥ 10×"),
        row(f"{kind}: rerun of a new root over {N_RERUN} published results", rerun_s, "computing them here", compute_s,
            note="loads every result from the bucket, verified"),
    ]


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kt-bench-lookup-") as tmp:
        tmp = Path(tmp)
        (tmp / "bucket").mkdir()
        rows += _case("directory", (tmp / "bucket").as_uri(), tmp)
        from .buckets import _Server

        server = _Server(tmp / "fake-gcs.log")
        try:
            from google.cloud import storage

            storage.Client().create_bucket("kt-lookup")
            rows += _case("gcs (fake-gcs-server)", "gs://kt-lookup/lab", tmp)
        finally:
            server.stop()
    return rows
