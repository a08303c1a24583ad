"""cached() never gives a false hit: functions identified as tasks identify them, library lambdas
told apart, side effects outside the graph (the disk shuffle) run every time, results handed out
writable, and every output key a function of content.

Each test here failed before its fix (issue 19)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from execution_log import note, runs

import kachery_tasks as kt
from kachery_tasks import config
from kachery_tasks.dask import cached
from kachery_tasks.hashing import function_id


@pytest.fixture
def module_dir(tmp_path: Path):
    """A directory on sys.path for modules written by the test; they are forgotten afterwards."""
    before = set(sys.modules)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


def _write(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


# -- 1. a rebound global is seen by cached() as by @pure -------------------------------------------
SCALED = """
    SCALE = 3
    def scaled(xs):
        return [x * SCALE for x in xs]
"""


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_cached_sees_a_module_constant_rebound_in_the_running_process(module_dir, scheduler):
    _write(module_dir, "modx_c", SCALED)
    import modx_c

    assert cached(dask.delayed(modx_c.scaled, pure=True)([1.0, 2.0])).compute(scheduler=scheduler) == [3.0, 6.0]
    modx_c.SCALE = 4
    assert cached(dask.delayed(modx_c.scaled, pure=True)([1.0, 2.0])).compute(scheduler=scheduler) == [4.0, 8.0]
    modx_c.SCALE = 3  # and back: the first record is found again
    assert cached(dask.delayed(modx_c.scaled, pure=True)([1.0, 2.0])).compute(scheduler=scheduler) == [3.0, 6.0]


def test_cached_array_sees_a_rebound_constant(module_dir):
    _write(module_dir, "modx_a", """
        SCALE = 3
        def scaled(block):
            return block * SCALE
    """)
    import modx_a

    x = da.ones(4, chunks=2)
    assert cached(x.map_blocks(modx_a.scaled)).compute().tolist() == [3.0] * 4
    modx_a.SCALE = 4
    assert cached(x.map_blocks(modx_a.scaled)).compute().tolist() == [4.0] * 4


def test_task_delayed_sees_a_rebound_constant(module_dir):
    _write(module_dir, "modx_t", SCALED)
    import modx_t

    scaled = kt.pure(modx_t.scaled)
    assert scaled.delayed([1.0, 2.0]).compute() == [3.0, 6.0]
    assert cached(dask.delayed(scaled)([1.0, 2.0])).compute() == [3.0, 6.0]
    modx_t.SCALE = 4
    assert scaled.delayed([1.0, 2.0]).compute() == [4.0, 8.0]
    assert cached(dask.delayed(scaled)([1.0, 2.0])).compute() == [4.0, 8.0]


def test_cached_sees_a_rebound_closure_and_default(module_dir):
    _write(module_dir, "modx_k", """
        def make(k):
            def times(x, bias=0):
                return x * k + bias
            return times
    """)
    import modx_k

    f = modx_k.make(2)
    assert cached(dask.delayed(f, pure=True)(5)).compute() == 10
    f.__closure__[0].cell_contents = 3
    assert cached(dask.delayed(f, pure=True)(5)).compute() == 15
    f.__defaults__ = (1,)
    assert cached(dask.delayed(f, pure=True)(5)).compute() == 16


# -- 2a. library lambdas that share a qualname -----------------------------------------------------
LIBRARY = """
    def pair():
        return (lambda x: tuple(), lambda x: (1, -1))

    def adder(k):
        def add(x):
            return x + k
        return add
"""


@pytest.fixture
def library(tmp_path: Path):
    """A module installed under a site-packages directory: library code, counted by version."""
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    _write(site, "libx_trust", LIBRARY)
    sys.path.insert(0, str(site))
    import libx_trust

    yield libx_trust
    sys.path.remove(str(site))
    sys.modules.pop("libx_trust", None)


def test_library_lambdas_of_one_function_have_different_ids(library):
    first, second = library.pair()
    assert first.__qualname__ == second.__qualname__  # what made them collide
    assert function_id(first) != function_id(second)
    assert function_id(library.adder(1)) != function_id(library.adder(2))  # closures differ
    assert function_id(library.adder(1)) == function_id(library.adder(1))
    assert function_id(library.pair) == function_id(library.pair)  # named functions: by version


def test_library_lambdas_in_cached_and_in_task_arguments(library):
    first, second = library.pair()
    assert cached(dask.delayed(second, pure=True)(1)).compute() == (1, -1)
    assert cached(dask.delayed(first, pure=True)(1)).compute() == ()  # was (1, -1): a false hit

    @kt.pure
    def apply(f, x):
        return f(x)

    assert apply(second, 1) == (1, -1)
    assert apply(first, 1) == ()
    assert apply(library.adder(1), 1) == 2
    assert apply(library.adder(5), 1) == 6


# -- 2b. the disk shuffle: partd state outside the graph ---------------------------------------------
def _grouped(n: int, log: str):
    def key(x):
        return x % 3

    def total(kv):
        note(log, "total")
        return (kv[0], sum(kv[1]))

    return db.from_sequence(range(n), npartitions=3).groupby(key, shuffle="disk").map(total)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_disk_groupby_runs_its_shuffle_every_time_and_caches_what_follows(tmp_path, scheduler):
    log = str(tmp_path / "log")
    with config.set(dask_min_seconds=0.0):
        for _ in range(2):
            b = db.from_sequence(range(10), npartitions=3)
            got = dict(cached(b.groupby(lambda x: x % 3, shuffle="disk")).compute(scheduler=scheduler))
            assert {k: sorted(v) for k, v in got.items()} == {0: [0, 3, 6, 9], 1: [1, 4, 7], 2: [2, 5, 8]}
        assert sorted(cached(_grouped(10, log)).compute(scheduler=scheduler)) == [(0, 18), (1, 12), (2, 15)]
        assert runs(log) == ["total"] * 3
        # other data through the same shuffle: other results, never the first run's
        assert sorted(cached(_grouped(20, log)).compute(scheduler=scheduler)) == [(0, 63), (1, 70), (2, 57)]
        assert runs(log) == ["total"] * 6
        # the same data again: what follows the shuffle comes from the store, nothing recomputed
        assert sorted(cached(_grouped(20, log)).compute(scheduler=scheduler)) == [(0, 63), (1, 70), (2, 57)]
        assert runs(log) == ["total"] * 6



# -- 2c. arrays come back as writable ndarrays ---------------------------------------------------------
def test_a_pure_array_result_is_a_writable_ndarray_on_every_hit():
    @kt.pure
    def ramp(n):
        return np.arange(n, dtype=np.float64)

    first = ramp(1000)
    first += 1  # the computing call's own array
    for _ in range(2):  # a store hit, then a memory hit
        again = ramp(1000)
        assert type(again) is np.ndarray
        again += 1  # raised "output array is read-only" on a hit
        assert again[0] == 1.0 and again[-1] == 1000.0  # private: no earlier write shows
    from kachery_tasks.tasks import MEMORY

    MEMORY.clear()
    assert ramp(1000)[0] == 0.0  # the blob itself never changed


def test_cached_dask_array_chunks_are_ndarrays():
    with config.set(dask_min_seconds=0.0):
        x = da.arange(8, chunks=4, dtype=np.float64) * 2
        assert type(cached(x).compute()) is np.ndarray
        assert type(cached(x).compute()) is np.ndarray  # from the store
        blocks = cached(x).blocks[0].compute()
        blocks += 1


def test_disk_groupby_output_keys_follow_the_data():
    with config.set(dask_min_seconds=0.0):
        one = cached(db.from_sequence(range(10), npartitions=2).groupby(lambda x: x % 2, shuffle="disk"))
        two = cached(db.from_sequence(range(12), npartitions=2).groupby(lambda x: x % 2, shuffle="disk"))
        again = cached(db.from_sequence(range(10), npartitions=2).groupby(lambda x: x % 2, shuffle="disk"))
    assert set(one.__dask_keys__()).isdisjoint(two.__dask_keys__())
    assert one.__dask_keys__() == again.__dask_keys__()


# -- 3. every output key of cached(collection) is a function of content -----------------------------
def _negate(block):
    return -block


def _load(seed):
    return np.random.default_rng(seed).random(6)


def _keys(collection) -> list:
    from dask.core import flatten

    return list(flatten(collection.__dask_keys__()))


def _array_named(x):
    return da.from_array(x, chunks=4, name="input").map_blocks(_negate, name="negated").cumsum(axis=0)


def _bag_named(xs):
    import dask.bag.core as dbc
    from dask.highlevelgraph import HighLevelGraph

    graph = HighLevelGraph.from_collections("fixed-name", {("fixed-name", 0): xs}, dependencies=())
    return dbc.Bag(graph, "fixed-name", 1).accumulate(lambda a, b: a + b)


def _from_delayed(seed):
    return da.from_delayed(dask.delayed(_load)(seed), shape=(6,), dtype=float)


@pytest.mark.parametrize("make,one,two", [
    (_array_named, np.arange(8.0), np.arange(8.0) + 1),
    (_bag_named, [1, 2, 3], [1, 2, 4]),
    (_from_delayed, 1, 2),
    (lambda v: dask.delayed(_negate, pure=True)(v, dask_key_name="fixed"), 1, 2),
])
def test_output_keys_differ_with_content_and_agree_without(make, one, two):
    with config.set(dask_min_seconds=0.0):
        a, b, a_again = cached(make(one)), cached(make(two)), cached(make(one))
        assert set(_keys(a)).isdisjoint(_keys(b))  # different data: never one key
        assert _keys(a) == _keys(a_again)  # same data: the same keys, build after build
        expected = dask.compute(make(two), scheduler="sync")[0]
        got = b.compute(scheduler="sync")
        assert (np.asarray(got) == np.asarray(expected)).all()


def test_dataframe_output_keys_follow_content():
    pd = pytest.importorskip("pandas")
    import dask.dataframe as dd

    def frame(v):
        return dd.from_pandas(pd.DataFrame({"x": [v, 2.0, 3.0, 4.0]}), npartitions=2).x.cumsum()

    with config.set(dask_min_seconds=0.0):
        a, b, again = cached(frame(1.0)), cached(frame(5.0)), cached(frame(1.0))
        assert set(_keys(a)).isdisjoint(_keys(b))
        assert _keys(a) == _keys(again)
        assert b.compute().tolist() == [5.0, 7.0, 10.0, 14.0]


# -- 2d. writes outside the graph run every time; work shared by collections cached together -------
def _shared(block, log):
    note(log, "shared")
    return np.stack([block + 1, block + 2])


def _stores(log: str, start_value: float):
    start = da.arange(4, chunks=1, dtype=float).reshape(2, 2).rechunk(1) + start_value
    src = da.map_blocks(_shared, start, log, dtype=float, meta=np.array((), dtype=float), new_axis=[0],
                        chunks=(2, *start.chunks))
    one, two = np.zeros((2, 2)), np.zeros((2, 2))
    return da.store(src[0], one, compute=False, lock=False), da.store(src[1], two, compute=False,
                                                                        lock=False), one, two


def test_store_writes_its_target_on_every_run(tmp_path):
    log = str(tmp_path / "log")
    with config.set(dask_min_seconds=0.0):
        for _ in range(2):  # the second run loads what feeds the store, and still writes the targets
            s1, s2, one, two = _stores(log, 0.0)
            dask.compute(cached(s1), cached(s2), scheduler="sync")
            assert one.tolist() == [[1, 2], [3, 4]] and two.tolist() == [[2, 3], [4, 5]]


def test_collections_cached_together_share_their_work(tmp_path):
    log = str(tmp_path / "log")
    with config.set(dask_min_seconds=0.0):
        s1, s2, one, two = _stores(log, 10.0)
        dask.compute(*cached(s1, s2), scheduler="sync")
    assert runs(log) == ["shared"] * 4  # once per block, as plain dask.compute(s1, s2) does
    assert one.tolist() == [[11, 12], [13, 14]] and two.tolist() == [[12, 13], [14, 15]]
    a, b = cached(da.ones(4, chunks=2) + 1, da.ones(4, chunks=2) * 3)
    assert a.compute().tolist() == [2.0] * 4 and b.compute().tolist() == [3.0] * 4


def _numbers(n):
    return (i for i in range(n))  # a generator: what dask hands between its tasks, with no encoding


def test_a_node_whose_value_has_no_encoding_is_computed_not_recorded():
    with config.set(dask_min_seconds=0.0):
        for _ in range(2):
            total = dask.delayed(sum, pure=True)(dask.delayed(_numbers, pure=True)(5))
            assert cached(total).compute(scheduler="sync") == 10  # raised CodecError from the record


# -- a job's settings stay in its own thread ---------------------------------------------------------
def test_jobs_of_different_settings_in_threads_do_not_leak_their_settings():
    import threading

    from kachery_tasks.dask.worker import entered

    @kt.pure
    def ident(x):
        return x

    forced = ident.options(force=True).job(1)
    uncached = ident.options(cache=False).job(2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def run_a():
        with entered(forced):
            a_in.set()
            b_in.wait(5)
            seen["a"] = (config.get("force"), config.get("cache"))
        a_out.set()

    def run_b():
        a_in.wait(5)
        with entered(uncached):
            b_in.set()
            a_out.wait(5)  # A leaves first: out of order, as a scheduler's threads do
            seen["b"] = (config.get("force"), config.get("cache"))

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": (True, True), "b": (False, False)}
    assert (config.get("force"), config.get("cache")) == (False, True)  # nothing left behind


def test_dataframe_disk_shuffle_is_correct_and_what_follows_is_cached():
    pd = pytest.importorskip("pandas")
    import dask.dataframe as dd

    from kachery_tasks.dask.nodes import LoadTask, RunTask

    def total(n):
        frame = pd.DataFrame({"k": [i % 5 for i in range(n)], "x": range(n)})
        return dd.from_pandas(frame, npartitions=4).shuffle("k", shuffle_method="disk").x.sum()

    with config.set(dask_min_seconds=0.0):
        for n, expected in ((100, 4950), (100, 4950), (200, 19900)):
            assert cached(total(n)).compute(scheduler="threads") == expected
        again = dict(cached(total(200)).__dask_graph__())
    assert not any(isinstance(node, RunTask) for node in again.values())  # loaded: no shuffle runs
    assert any(isinstance(node, LoadTask) for node in again.values())
