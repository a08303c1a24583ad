"""The tier protocol: the resolver asks the tiers in force in order, and what a later tier found is
copied into the tiers before it (one rule, in resolver.find).

A second home's local store stands in for a network tier here: it is registered under a new name in
``tiers.KINDS`` (the extension point a bucket tier uses), so these tests run the real resolver over
real stores. Executions are counted through a file, not a global.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kachery_tasks import config
from kachery_tasks.buckets.layout import record_key
from kachery_tasks.errors import UserError
from kachery_tasks.identity import node_identity
from kachery_tasks.store.local import store_for
from kachery_tasks.tasks import MEMORY, pure
from kachery_tasks.tasks.publish import publish
from kachery_tasks.tasks.resolver import fetch_results, find, has_result
from kachery_tasks.tasks.stats import STATS
from kachery_tasks.tasks.tiers import ABSENT, KINDS, BucketTier, Fetched, Hit, LocalTier, Miss, tiers_for


def _count(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


@pytest.fixture
def other_home(tmp_path: Path):
    """A second home, registered as the tier ``other`` (its local store)."""
    other = tmp_path / "other-home"
    KINDS["other"] = lambda home: LocalTier(str(other))
    yield other
    del KINDS["other"]


def _task(counter: Path):
    counter = str(counter)  # a path hashes by location only through store_file: the text is enough here

    @pure
    def ramp(n: int) -> np.ndarray:
        with open(counter, "a") as fh:
            fh.write("x")
        return np.arange(n, dtype=np.float64) * 2.0

    return ramp


def test_a_later_tier_hit_is_copied_into_the_tiers_before_it(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        expected = ramp(200_000)  # 1.6 MB: an npy blob, not an inline result
    assert _count(counter) == 1
    task_id = ramp.job(200_000).id
    mine = store_for(str(home))
    assert mine.records.read(task_id) is None

    MEMORY.clear()
    STATS.reset()
    with config.set(tiers=["memory", "local", "other"]):
        got = ramp(200_000)
        assert _count(counter) == 1, "a hit in a later tier must not compute"
        np.testing.assert_array_equal(got, expected)
        assert STATS.snapshot().get("hit_other") == 1
        # copied down: the record and its blob are now in this home's store, and in memory
        record = mine.records.read(task_id)
        assert record is not None
        digest = record.result.sha256
        assert mine.blobs.exists(digest)
        assert MEMORY.get(str(home), task_id) is not None

        MEMORY.clear()
        STATS.reset()
        np.testing.assert_array_equal(ramp(200_000), expected)
        assert STATS.snapshot().get("hit_local") == 1, "the next call is served by the nearer tier"
    assert _count(counter) == 1


def test_tiers_are_asked_in_the_order_configured(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        ramp(10)
    ramp(10)  # this home has its own record too
    assert _count(counter) == 2
    task_id = ramp.job(10).id
    MEMORY.clear()
    STATS.reset()
    with config.set(tiers=["other", "local"]):
        hit = find(str(home), task_id)
    assert isinstance(hit, Hit)
    assert STATS.snapshot() == {"hit_other": 1}


def test_a_tier_left_out_is_not_asked(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        ramp(10)
    job = ramp.job(10)
    assert not has_result(job)
    with config.set(tiers=["memory", "local", "other"]):
        assert has_result(job)
    ramp(10)
    assert _count(counter) == 2


def test_an_incomplete_record_in_a_later_tier_is_a_miss_that_says_why(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        ramp(200_000)
    task_id = ramp.job(200_000).id
    theirs = store_for(str(other_home))
    digest = theirs.records.read(task_id).result.sha256
    theirs.blobs.path(digest).unlink()  # the blob is gone: the record is incomplete
    misses: list[tuple[str, str]] = []
    MEMORY.clear()
    with config.set(tiers=["memory", "local", "other"]):
        assert find(str(home), task_id, misses) is None
        assert misses and misses[0][0] == "other" and "missing" in misses[0][1]
        ramp(200_000)
    assert _count(counter) == 2, "an incomplete record is recomputed"


def test_an_unknown_tier_is_one_line_naming_the_tiers_there_are(home):
    @pure
    def one() -> int:
        return 1

    with config.set(tiers=["memory", "bucket-typo"]), pytest.raises(UserError, match="unknown resolution tier 'bucket-typo'.*memory, local"):
        one()


class _RefusesEverything(LocalTier):
    """A tier that holds nothing and cannot keep anything (a full disk, say)."""

    def get(self, task_id):
        from kachery_tasks.tasks.tiers import ABSENT

        return ABSENT

    def put(self, task_id, hit):
        raise OSError(28, "No space left on device")


def test_a_hit_stands_when_an_earlier_tier_cannot_keep_it(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        expected = ramp(1000)
    KINDS["full"] = _RefusesEverything
    try:
        with config.set(tiers=["full", "other"]):
            np.testing.assert_array_equal(ramp(1000), expected)
    finally:
        del KINDS["full"]
    assert _count(counter) == 1, "a copy that failed does not turn the hit into a recompute or an error"


# -- prefetch: many results brought nearer at once, without loading them -------------------------------
class _Prefetching(LocalTier):
    """Another home's store that prefetches, as a remote tier does (without the network): each id
    it holds is a Fetched of that store, except those it is told to refuse."""

    refuse: frozenset[str] = frozenset()

    def prefetch(self, task_ids):
        for task_id in task_ids:
            if task_id in self.refuse:
                yield task_id, Miss("refused here")
            else:
                yield task_id, Fetched(self.store.records.read(task_id), self.store.blobs)


@pytest.fixture
def prefetching_home(tmp_path: Path):
    """A second home, registered as the tier ``other``, that prefetches."""
    other = tmp_path / "prefetching-home"
    KINDS["other"] = lambda home: _Prefetching(str(other))
    yield other
    del KINDS["other"]


def test_a_prefetch_copies_records_into_the_tiers_before_it_and_loads_nothing(home, prefetching_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(prefetching_home)):
        expected = [ramp(200_000 + i) for i in range(3)]  # npy blobs, not inline results
    jobs = [ramp.job(200_000 + i) for i in range(3)]
    mine = store_for(str(home))
    MEMORY.clear()
    STATS.reset()
    with config.set(tiers=["memory", "local", "other"]):
        [other] = [t for t in tiers_for(str(home)) if isinstance(t, _Prefetching)]
        other.refuse = frozenset({jobs[2].id})
        found = fetch_results(jobs)
        assert found == {jobs[0].id, jobs[1].id}, "a refused record is not found: its node is computed"
        assert STATS.snapshot() == {"prefetched_other": 2}
        for job in jobs[:2]:
            record = mine.records.read(job.id)
            assert record is not None and mine.blobs.exists(record.result.sha256), "kept: record and blob"
            assert MEMORY.get(str(home), job.id) is None, "nothing is loaded into memory by a prefetch"
        assert mine.records.read(jobs[2].id) is None
        STATS.reset()
        for job, value in zip(jobs[:2], expected[:2], strict=True):
            np.testing.assert_array_equal(job.result(), value)
        assert STATS.snapshot() == {"hit_local": 2}, "the loads then hit the local store"
    assert _count(counter) == 3


def test_a_tier_that_does_not_prefetch_leaves_its_results_to_get(home, other_home, tmp_path):
    counter = tmp_path / "runs"
    ramp = _task(counter)
    with config.set(home=str(other_home)):
        ramp(10)
    job = ramp.job(10)
    with config.set(tiers=["memory", "local", "other"]):
        assert fetch_results([job]) == {job.id}, "found, as have_results says"
        assert store_for(str(home)).records.read(job.id) is None, "nothing copied ahead by default"
        ramp(10)
    assert _count(counter) == 1


# -- the bucket tier's prefetch: the checks of get, on a thread pool -------------------------------------
def _published(tmp_path: Path, counter: Path, n: int, name: str = "a") -> tuple[object, str, str]:
    """Node ``name`` (a home of its own) computes ``ramp(1000 + i)`` for ``i < n`` and publishes them
    to a directory bucket of its own name; the task, the bucket URI and the node id. (Its jobs carry
    its home: the reader makes its own.)"""
    bucket = tmp_path / f"bucket-{name}"
    bucket.mkdir()
    ramp = _task(counter)
    with config.set(home=str(tmp_path / f"home-{name}"), bucket=bucket.as_uri(), publish=False):
        jobs = [ramp.job(1000 + i) for i in range(n)]
        for job in jobs:
            job.result()
        publish(*jobs)
        node_id = node_identity(config.home()).node_id
    return ramp, bucket.as_uri(), node_id


def _bucket_tier(home: Path) -> BucketTier:
    [tier] = [t for t in tiers_for(str(home)) if isinstance(t, BucketTier)]
    return tier


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_the_bucket_tier_prefetches_in_parallel_into_the_local_store(home, tmp_path):
    counter = tmp_path / "runs"
    ramp, uri, a_id = _published(tmp_path, counter, 12)
    jobs = [ramp.job(1000 + i) for i in range(12)]
    MEMORY.clear()
    STATS.reset()
    with config.set(bucket=uri, trusted_nodes=[a_id], bucket_parallelism=4):
        tier = _bucket_tier(home)
        assert tier.parallelism == 4
        got = dict(tier.prefetch([j.id for j in jobs]))
        assert set(got) == {j.id for j in jobs} and all(type(f) is Fetched for f in got.values())
        mine = store_for(str(home))
        assert all(mine.blobs.exists(f.record.result.sha256) for f in got.values()), "blobs are in the store"
        assert all(mine.records.read(j.id) is None for j in jobs), "records are for the resolver to keep"
        assert fetch_results(jobs) == {j.id for j in jobs}
        assert all(mine.records.read(j.id) is not None for j in jobs)
        for job in jobs:
            job.result()
    assert STATS.snapshot().get("hit_local") == 12 and "hit_bucket" not in STATS.snapshot()
    assert _count(counter) == 12, "computed once, by the publisher"


def test_an_untrusted_publishers_records_are_never_prefetched(home, tmp_path):
    counter = tmp_path / "runs"
    ramp, uri, a_id = _published(tmp_path, counter, 6)
    jobs = [ramp.job(1000 + i) for i in range(6)]
    with config.set(bucket=uri):  # A is not trusted here
        got = dict(_bucket_tier(home).prefetch([j.id for j in jobs]))  # asked even so: it reads none
        assert got == {j.id: ABSENT for j in jobs}
        assert fetch_results(jobs) == set()
        assert _files(home / "tasks") == [], "no record of an untrusted node enters the store"
        assert _files(store_for(str(home)).blobs.root) == [], "nor any blob"


def test_a_record_signed_by_another_node_under_a_trusted_name_is_refused(home, tmp_path):
    counter = tmp_path / "runs"
    ramp, uri, a_id = _published(tmp_path, counter, 4)
    jobs = [ramp.job(1000 + i) for i in range(4)]
    _, c_uri, c_id = _published(tmp_path, counter, 4, name="c")  # C, not trusted, computed the same
    forged = jobs[1].id
    ours = Path(c_uri.removeprefix("file://")) / record_key(forged, c_id)
    theirs = Path(uri.removeprefix("file://")) / record_key(forged, a_id)
    theirs.chmod(0o644)
    theirs.write_bytes(ours.read_bytes())  # C's valid signature, under A's name
    with config.set(bucket=uri, trusted_nodes=[a_id]):
        assert fetch_results(jobs) == {j.id for j in jobs} - {forged}
        assert store_for(str(home)).records.read(forged) is None, "the forged record is not kept"
        misses: list[tuple[str, str]] = []
        assert find(str(home), forged, misses) is None and "misplaced" in misses[0][1]
        ramp(1001)
    assert _count(counter) == 9, "computed by A and C, and here for the forged record alone"


def test_a_record_removed_between_the_check_and_the_fetch_is_a_miss_not_a_failed_load(home, tmp_path):
    counter = tmp_path / "runs"
    ramp, uri, a_id = _published(tmp_path, counter, 3)
    jobs = [ramp.job(1000 + i) for i in range(3)]
    with config.set(bucket=uri, trusted_nodes=[a_id]):
        tier = _bucket_tier(home)
        assert tier.missing([j.id for j in jobs]) == set()
        (Path(uri.removeprefix("file://")) / record_key(jobs[0].id, a_id)).unlink()
        got = dict(tier.prefetch([j.id for j in jobs]))
        assert got[jobs[0].id] == ABSENT and all(type(got[j.id]) is Fetched for j in jobs[1:])
