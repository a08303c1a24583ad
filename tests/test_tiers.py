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
from kachery_tasks.errors import UserError
from kachery_tasks.store.local import store_for
from kachery_tasks.tasks import MEMORY, pure
from kachery_tasks.tasks.resolver import find, has_result
from kachery_tasks.tasks.stats import STATS
from kachery_tasks.tasks.tiers import KINDS, Hit, LocalTier


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
