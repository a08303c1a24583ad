"""The Dask layer on the local schedulers: keys, pruning, partial recompute, cached(), progress.

Executions are counted through a file (each task appends a line), never in-process globals, so the
counts hold on the process scheduler too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from dask.utils import key_split
from execution_log import note, runs

from kachery_tasks.dask import cached, progress
from kachery_tasks.dask.graph import build_graph
from kachery_tasks.dask.nodes import LoadTask, RunTask
from kachery_tasks.tasks import pure


@pure
def load(n: int, log: str) -> list:
    note(log, "load")
    return list(range(n))


@pure
def scale(xs: list, factor: int, log: str) -> list:
    note(log, "scale")
    return [x * factor for x in xs]


@pure
def total(xs: list, log: str) -> int:
    note(log, "total")
    return sum(xs)


@pure
def combine(a: list, b: int, log: str) -> int:
    note(log, "combine")
    return sum(a) + b


def pipeline(log: Path, factor: int = 2):
    raw = load.delayed(5, str(log))
    return combine.delayed(scale.delayed(raw, factor, str(log)), total.delayed(raw, str(log)), str(log))


def test_key_is_name_and_task_id(tmp_path):
    d = scale.delayed([1, 2], 3, str(tmp_path / "log"))
    assert d.key == f"scale-{scale.job([1, 2], 3, str(tmp_path / 'log')).id}"
    assert key_split(d.key) == "scale"
    assert not runs(tmp_path / "log")  # building the graph ran nothing


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_second_compute_computes_nothing(tmp_path, scheduler):
    log = tmp_path / "log"
    assert pipeline(log).compute(scheduler=scheduler) == 20 + 10
    assert sorted(runs(log)) == ["combine", "load", "scale", "total"]  # load once: shared node
    again = pipeline(log)
    graph = dict(again.dask)
    assert len(graph) == 1 and isinstance(next(iter(graph.values())), LoadTask)  # one lookup
    assert again.compute(scheduler=scheduler) == 30
    assert len(runs(log)) == 4


def test_changed_parameter_recomputes_only_its_branch(tmp_path):
    log = tmp_path / "log"
    pipeline(log, factor=2).compute(scheduler="sync")
    log.unlink()
    assert pipeline(log, factor=3).compute(scheduler="sync") == 30 + 10
    assert sorted(runs(log)) == ["combine", "scale"]  # load and total came from the store
    graph = dict(pipeline(log, factor=3).dask)
    assert len(graph) == 1


def test_partially_cached_graph_prunes_upstream_of_hits(tmp_path):
    log = str(tmp_path / "log")
    raw = load.delayed(5, log)
    scale.delayed(raw, 2, log).compute(scheduler="sync")
    dsk, counts = build_graph([combine.delayed(scale.delayed(raw, 2, log), 7, log).job])
    kinds = sorted(type(v).__name__ for v in dsk.values())
    assert kinds == ["LoadTask", "RunTask"] and counts["pruned"] == 1  # load is gone


def test_diamond_computes_shared_node_once(tmp_path):
    log = tmp_path / "log"
    raw = load.delayed(4, str(log))
    left = scale.delayed(raw, 2, str(log))
    right = scale.delayed(raw, 3, str(log))
    again = scale.delayed(raw, 2, str(log))  # same id as left: one node
    out = dask.compute(combine.delayed(left, total.delayed(right, str(log)), str(log)), again,
                       scheduler="threads")
    assert out == (12 + 18, [0, 2, 4, 6])
    assert runs(log).count("load") == 1
    assert runs(log).count("scale") == 2


def test_plain_delayed_argument_is_identified_by_content(tmp_path):
    log = tmp_path / "log"
    where = str(log)  # a Path names a location, not content: closures must hold the string

    def make(n):
        note(where, "plain")
        return list(range(n))

    d1 = total.delayed(dask.delayed(make)(3), str(log))
    assert d1.compute(scheduler="sync") == 3
    d2 = total.delayed(dask.delayed(make)(3), str(log))  # a new uuid key, same content
    assert d2.key == d1.key
    assert d2.compute(scheduler="sync") == 3
    assert runs(log) == ["plain", "total"]
    d3 = total.delayed(dask.delayed(make, name="same")(4), str(log))
    assert d3.key != d1.key and d3.compute(scheduler="sync") == 6


def _counted_block(block, log):
    note(log, "block")
    return block * 2 + 1


def test_cached_array_same_numbers_and_rerun_from_cache(tmp_path):
    log = str(tmp_path / "log")
    x = da.from_array(np.arange(64.0).reshape(8, 8), chunks=4)
    y = x.map_blocks(_counted_block, log, dtype=float).T.sum(axis=0)
    n0 = len(runs(tmp_path / "log"))  # map_blocks may probe the function for metadata
    expected = y.compute(scheduler="sync")
    n_plain = len(runs(tmp_path / "log")) - n0
    assert n_plain == 4
    c = cached(y, min_seconds=0)
    assert type(c) is type(y) and c.chunks == y.chunks and c.dtype == y.dtype
    np.testing.assert_array_equal(c.compute(scheduler="sync"), expected)
    assert len(runs(tmp_path / "log")) == n0 + 2 * n_plain
    assert cached(y).sum().compute(scheduler="sync") == y.sum().compute(scheduler="sync")
    before = len(runs(tmp_path / "log"))
    again = cached(y)
    kinds = {type(v).__name__ for v in dict(again.dask).values()}
    assert "RunTask" not in kinds and "LoadTask" in kinds  # everything upstream pruned
    np.testing.assert_array_equal(again.compute(scheduler="threads"), expected)
    assert len(runs(tmp_path / "log")) == before  # no block ran again


def test_same_name_different_data_misses(tmp_path):
    log = str(tmp_path / "log")
    a = np.arange(16.0).reshape(4, 4)
    first = da.from_array(a, chunks=2, name="fixed").map_blocks(_counted_block, log, dtype=float)
    np.testing.assert_array_equal(cached(first).compute(scheduler="sync"), a * 2 + 1)
    second = da.from_array(a + 1, chunks=2, name="fixed").map_blocks(_counted_block, log, dtype=float)
    assert second.name == first.name  # dask sees the same thing
    n = len(runs(tmp_path / "log"))
    np.testing.assert_array_equal(cached(second).compute(scheduler="sync"), (a + 1) * 2 + 1)
    assert len(runs(tmp_path / "log")) == n + 4  # all 4 blocks again: the second run missed
    n = len(runs(tmp_path / "log"))
    np.testing.assert_array_equal(cached(second).compute(scheduler="sync"), (a + 1) * 2 + 1)
    assert len(runs(tmp_path / "log")) == n  # and now it is cached


def test_unhashable_function_left_uncached_with_reason(tmp_path, caplog):
    class Opaque:
        def __call__(self, x):
            return x + 1

    d = dask.delayed(Opaque())(1)
    with caplog.at_level(logging.DEBUG, logger="kachery_tasks.dask"):
        c = cached(d)
    assert c.compute(scheduler="sync") == 2
    assert any("not cached" in r.message for r in caplog.records)


def test_min_seconds_skips_fast_nodes(tmp_path):
    log = str(tmp_path / "log")
    x = da.from_array(np.ones((4, 4)), chunks=2).map_blocks(_counted_block, log, dtype=float)
    cached(x, min_seconds=60).compute(scheduler="sync")
    again = cached(x, min_seconds=60)
    assert not any(isinstance(v, LoadTask) for v in dict(again.dask).values())


def test_progress_counts_cached_and_computed(tmp_path):
    log = tmp_path / "log"
    with progress(show=False) as cb:
        pipeline(log).compute(scheduler="sync")
    assert cb.summary["computed"] == 4 and cb.summary["cached"] == 0
    with progress(show=False) as cb:
        pipeline(log).compute(scheduler="sync")
    assert cb.summary == {"cached": 1, "computed": 0, "dask": 0}


def test_graph_nodes_block_fusion(tmp_path):
    dsk, _ = build_graph([pipeline(tmp_path / "log").job])
    assert all(isinstance(v, RunTask) and v.block_fusion for v in dsk.values())


def test_dataframes_feed_tasks_by_content_and_cached_takes_them(tmp_path):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")

    log = str(tmp_path / "log")

    @pure
    def column_total(frame, log):
        note(log, "total")
        return float(frame.c.sum())

    def with_c(part):
        return part.assign(c=part.a * 2 + part.b)

    frame = pd.DataFrame({"a": np.arange(100), "b": np.arange(100.0)})
    y = dd.from_pandas(frame, npartitions=2).map_partitions(with_c)
    assert column_total.delayed(y, log).compute() == float(y.c.sum().compute())
    assert column_total.delayed(y, log).compute() == float(y.c.sum().compute())
    assert runs(log) == ["total"]
    other = dd.from_pandas(frame.assign(a=frame.a + 1), npartitions=2).map_partitions(with_c)
    assert column_total.delayed(other, log).compute() == float(other.c.sum().compute())
    assert runs(log) == ["total", "total"]  # other data: a miss
    c = cached(y)  # DataFrames: see test_dask_dataframe.py
    assert type(c) is type(y) and c.divisions == y.divisions
    pd.testing.assert_frame_equal(c.compute(scheduler="sync"), y.compute(scheduler="sync"))


def test_the_same_delayed_computed_again_is_pruned(tmp_path):
    """The graph built for a compute is not reused by the next compute of the same object."""
    log = tmp_path / "log"
    model = pipeline(log)
    assert model.compute(scheduler="sync") == 30
    graph = dict(model.dask)  # at once: inside the window in which a graph is reused within a compute
    assert len(graph) == 1 and isinstance(next(iter(graph.values())), LoadTask)
    assert model.compute(scheduler="sync") == 30
    assert len(runs(log)) == 4
