"""Bucket tier: looking up, then rerunning, a pipeline whose records are only in a bucket.

Node A computes 10,000 small pure tasks and publishes them to a bucket (a directory, and Google
Cloud Storage through fake-gcs-server); node B, an empty home trusting A, asks which of the 10,000
it could load: one batched check (``resolver.have_results``, what prunes a Dask graph: one
``exists_many`` per bucket) against one ``stat`` per node, the way a tier without a batch call would
ask (kachery-cloud, DVC's per-object ``exists``). Target (issue 21): the batched check ≥ 10× faster.

Then B reruns a pipeline of a new root over results A published, in a fresh home each time, against
computing them in a fresh home: 1,000 of the small results (inline in their records: one record read
each), and 500 arrays of 64 KiB (a record and a blob each). Each rerun is made twice: with
``bucket_parallelism: 0``, each load node fetching its own result as it runs (as every rerun did
before the prefetch), and with the default, the graph's load nodes fetched in parallel into the local
store while the graph is built (``resolver.fetch_results``). The figure that matters is the
milliseconds per result of a rerun, and how it compares with computing.

On one machine, neither bucket has the latency of a real one: a directory answers in microseconds,
and fake-gcs-server on localhost in about a millisecond, which is spent as CPU in the
google-cloud-storage client (about 1.1 ms of CPU per read here, under the GIL, whatever the
threads). So the directory bucket is also measured with :data:`LATENCY` added to every request
(:class:`_Distant`), a modeled round trip to a cloud bucket: what the prefetch is for.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kachery_tasks import config
from kachery_tasks.buckets import Bucket, ObjectInfo, fetch, open_bucket
from kachery_tasks.buckets.layout import record_key
from kachery_tasks.identity import node_identity
from kachery_tasks.tasks import pure
from kachery_tasks.tasks.publish import publish
from kachery_tasks.tasks.resolver import have_results

from ._common import row

N = 10_000
#: The rerun of the small results: fewer of them, so that the benchmark ends in minutes through the
#: emulator with prefetching off (one round trip after the other).
N_RERUN = 1_000
#: The rerun of results that are blobs, 64 KiB each.
N_ARRAYS = 500
ARRAY_LEN = 8192
#: The round trip added to each request of the modeled distant bucket (a cloud bucket from a VM in
#: another region is 10-50 ms; in the same region, a few ms to a first byte).
LATENCY = 0.010


@pure
def leaf(i: int) -> int:
    time.sleep(0.0005)  # a small computation: 5 s for all of them
    return i * i


@pure
def combine(values: list, tag: str) -> int:
    return sum(values) + len(tag)


@pure
def wave(i: int) -> np.ndarray:
    time.sleep(0.0005)
    return np.full(ARRAY_LEN, float(i))


@pure
def norms(arrays: list, tag: str) -> float:
    return float(sum(float(a.sum()) for a in arrays)) + len(tag)


def _small_root(tag: str) -> Any:
    return combine.delayed([leaf.delayed(i) for i in range(N_RERUN)], tag)


def _array_root(tag: str) -> Any:
    return norms.delayed([wave.delayed(i) for i in range(N_ARRAYS)], tag)


class _Distant(Bucket):
    """A bucket that answers as a distant one would: every request waits :data:`LATENCY` first."""

    def __init__(self, inner: Bucket):
        super().__init__(inner.uri, read_only=True)
        self.inner = inner

    def stat(self, key: str) -> ObjectInfo | None:
        time.sleep(LATENCY)
        return self.inner.stat(key)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        time.sleep(LATENCY)  # one batched request
        return self.inner.exists_many(keys)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        time.sleep(LATENCY)
        return self.inner.read(key, start, end)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        time.sleep(LATENCY)
        return self.inner.list(prefix)


@contextmanager
def _distant(uri: str) -> Iterator[None]:
    """The readers of this process see bucket ``uri`` as a distant one (the tier reads the buckets
    ``buckets.fetch`` opened for reading, once per process)."""
    fetch._opened[uri] = _Distant(open_bucket(uri, read_only=True))
    try:
        yield
    finally:
        del fetch._opened[uri]


def _timed_rerun(home: Path, make_root: Callable[[str], Any], **settings: Any) -> float:
    """Seconds to compute a new root over ``make_root``'s results in a fresh ``home``."""
    import dask

    with config.set(home=str(home), **settings):
        node_identity(config.home())  # the node's key is made before the clock starts
        root = make_root("b")
        start = time.perf_counter()
        dask.compute(root, scheduler="threads")
        return time.perf_counter() - start


def _reruns(kind: str, uri: str, tmp: Path, a_id: str, what: str, n: int,
            make_root: Callable[[str], Any]) -> list[dict]:
    """The rerun of ``n`` published results from the bucket, each load node fetching its own and
    prefetched, and computing them."""
    reader = {"bucket": uri, "trusted_nodes": [a_id]}
    slug = re.sub(r"\W+", "-", kind)  # a fresh home per case
    before_s = _timed_rerun(tmp / f"{slug}-{n}-one-by-one", make_root, bucket_parallelism=0, **reader)
    after_s = _timed_rerun(tmp / f"{slug}-{n}-prefetched", make_root, **reader)
    compute_s = _timed_rerun(tmp / f"{slug}-{n}-computed", make_root)
    per = config.get("bucket_parallelism")
    return [
        row(f"{kind}: rerun over {n} published {what}, prefetched ({per} at once)", after_s,
            "computing them here", compute_s,
            note=f"{1000 * after_s / n:.2f} ms per result; computing {1000 * compute_s / n:.2f} ms"),
        row(f"{kind}: rerun over {n} published {what}, prefetched", after_s,
            "one fetch per load node (bucket_parallelism 0)", before_s,
            note=f"{1000 * after_s / n:.2f} against {1000 * before_s / n:.2f} ms per result"),
    ]


def _all_reruns(kind: str, uri: str, tmp: Path, a_id: str) -> list[dict]:
    return [*_reruns(kind, uri, tmp, a_id, "small results", N_RERUN, _small_root),
            *_reruns(kind, uri, tmp, a_id, f"arrays of {ARRAY_LEN * 8 // 1024} KiB", N_ARRAYS, _array_root)]


def _case(kind: str, uri: str, tmp: Path) -> list[dict]:
    home_a, home_b = str(tmp / f"{kind}-a"), str(tmp / f"{kind}-b")
    with config.set(home=home_a, bucket=uri):
        jobs = [leaf.job(i) for i in range(N)]
        for job in jobs:
            job.result()
        start = time.perf_counter()
        publish(*jobs)
        publish_s = time.perf_counter() - start
        arrays = [wave.job(i) for i in range(N_ARRAYS)]
        for job in arrays:
            job.result()
        publish(*arrays)
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
    return [
        row(f"{kind}: is each of {N} records there?", batched_s, "one stat per node", per_node_s,
            note=f"one batched check; publishing the {N} took {publish_s:.1f} s", target="≥ 10×"),
        *_all_reruns(kind, uri, tmp, a_id),
        *(_distant_reruns(uri, tmp, a_id) if uri.startswith("file:") else []),
    ]


def _distant_reruns(uri: str, tmp: Path, a_id: str) -> list[dict]:
    with _distant(uri):
        return _all_reruns(f"directory + {LATENCY * 1000:.0f} ms per request (modeled)", uri, tmp, a_id)


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
