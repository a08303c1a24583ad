"""cached() on dask DataFrames and Series: same values as without it, reruns from the store, and
recomputes only what changed (data of one partition, code of a function).

Executions are counted through a file (execution_log), and every map_partitions is given its meta,
so that dask never calls the function to guess it and the counts are exact.
"""

from __future__ import annotations

import decimal
import importlib.util
import logging
import sys
import textwrap

import numpy as np
import pytest
from execution_log import note, runs

from kachery_tasks import config
from kachery_tasks.dask import cached
from kachery_tasks.dask.nodes import LoadTask, RunTask

pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")

FRAME = pd.DataFrame({"a": np.arange(40), "b": np.arange(40.0) / 4, "g": np.arange(40) % 3},
                     index=pd.Index(np.arange(40), name="i"))
META = FRAME.iloc[:0].assign(c=0.0)


def step(part, log):
    note(log, f"step{part.index[0]}")
    return part.assign(c=part.a * 2 + part.b)


def stepped(log, frame=FRAME):
    """Four partitions (divisions 0, 10, 20, 30, 39), each through ``step``."""
    return dd.from_pandas(frame, npartitions=4).map_partitions(step, str(log), meta=META)


def _columns(log):
    x = stepped(log)
    return x.c * 2 - x.a


def _filtered(log):
    x = stepped(log)
    x = x[x.a % 3 != 1]
    return x.assign(d=x.c + x.b)


PIPELINES = {
    "map_partitions": stepped,
    "columns": _columns,
    "filter_assign": _filtered,
    "groupby_sum": lambda log: stepped(log).groupby("g").c.sum(),
    "groupby_agg": lambda log: stepped(log).groupby("g").agg({"c": "sum", "a": "max"}),
    "frame_sum": lambda log: stepped(log)[["a", "c"]].sum(),
    "scalar_sum": lambda log: stepped(log).c.sum(),
    "index": lambda log: stepped(log).index,
}


def assert_same(got, expected):
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(got, expected)
    elif isinstance(expected, pd.Index):
        pd.testing.assert_index_equal(got, expected)
    else:
        assert type(got) is type(expected) and got == expected


def assert_same_collection(c, x):
    """Same type, partitions, divisions and meta (dtypes, columns, index)."""
    assert type(c) is type(x)
    assert c.npartitions == x.npartitions and c.divisions == x.divisions
    if isinstance(x._meta, pd.DataFrame | pd.Series | pd.Index):
        assert_same(c._meta, x._meta)
    else:
        assert type(c._meta) is type(x._meta)


def job_keys(c) -> set:
    """The content-keyed nodes of a cached collection's graph (load or run)."""
    return {k for k, v in dict(c.__dask_graph__()).items() if isinstance(v, LoadTask | RunTask)}


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_same_values_as_uncached_and_second_run_computes_nothing(tmp_path, scheduler, name):
    log = tmp_path / "log"
    make = PIPELINES[name]
    x = make(log)
    expected = x.compute(scheduler=scheduler)
    assert len(runs(log)) == 4
    c = cached(x)
    assert_same_collection(c, x)
    assert_same(c.compute(scheduler=scheduler), expected)
    assert len(runs(log)) == 8  # every partition once more: nothing was recorded yet
    again = cached(make(log))  # rebuilt from scratch: new dask objects, same content
    assert_same_collection(again, x)
    assert_same(again.compute(scheduler=scheduler), expected)
    assert len(runs(log)) == 8
    assert_same(again.compute(scheduler=scheduler), expected)  # a collection computes again
    assert len(runs(log)) == 8


def test_changed_data_in_one_partition_recomputes_only_that_partition(tmp_path):
    log = tmp_path / "log"
    cached(stepped(log).groupby("g").c.sum()).compute(scheduler="sync")
    assert sorted(runs(log)) == ["step0", "step10", "step20", "step30"]
    changed = FRAME.copy()
    changed.loc[25, "b"] = -100.0  # in the third partition (20..29)
    got = cached(stepped(log, changed).groupby("g").c.sum()).compute(scheduler="sync")
    assert sorted(runs(log)) == ["step0", "step10", "step20", "step20", "step30"]
    expected = stepped(tmp_path / "plain", changed).groupby("g").c.sum().compute(scheduler="sync")
    pd.testing.assert_series_equal(got, expected)


def _load_steps(tmp_path, monkeypatch, version: str, factor: int):
    """A module ``frame_steps`` written to disk, whose ``step`` differs only in its body."""
    folder = tmp_path / version
    folder.mkdir()
    path = folder / "frame_steps.py"
    path.write_text(textwrap.dedent(f"""
        from execution_log import note

        def step(part, log):
            note(log, "{version}")
            return part.assign(c=part.a * {factor})
        """))
    spec = importlib.util.spec_from_file_location("frame_steps", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "frame_steps", module)
    spec.loader.exec_module(module)
    return module.step


def test_changed_function_code_gives_new_ids(tmp_path, monkeypatch):
    log = str(tmp_path / "log")
    meta = FRAME.iloc[:0].assign(c=0)
    v1 = _load_steps(tmp_path, monkeypatch, "v1", 2)
    first = cached(dd.from_pandas(FRAME, npartitions=4).map_partitions(v1, log, meta=meta))
    pd.testing.assert_frame_equal(first.compute(scheduler="sync"), FRAME.assign(c=FRAME.a * 2))
    assert runs(log) == ["v1"] * 4
    v2 = _load_steps(tmp_path, monkeypatch, "v2", 3)  # same module, same name, other body
    second = cached(dd.from_pandas(FRAME, npartitions=4).map_partitions(v2, log, meta=meta))
    again = cached(dd.from_pandas(FRAME, npartitions=4).map_partitions(v1, log, meta=meta))
    assert job_keys(second) and not job_keys(second) & job_keys(again)
    pd.testing.assert_frame_equal(second.compute(scheduler="sync"), FRAME.assign(c=FRAME.a * 3))
    assert runs(log) == ["v1"] * 4 + ["v2"] * 4
    pd.testing.assert_frame_equal(again.compute(scheduler="sync"), FRAME.assign(c=FRAME.a * 2))
    assert runs(log) == ["v1"] * 4 + ["v2"] * 4  # v1's records are still there


def _decimals(part):
    return part.assign(o=[decimal.Decimal(int(v)) / 3 for v in part.a])


def test_series_index_and_odd_dtypes_keep_meta_and_divisions(tmp_path):
    frame = FRAME.assign(s=[f"x{i % 5}" for i in range(40)], k=pd.Categorical(["p", "q"] * 20),
                         t=pd.date_range("2024-01-01", periods=40, freq="h"))
    x = dd.from_pandas(frame, npartitions=4)
    objects = x.map_partitions(_decimals, meta=frame.iloc[:0].assign(o=pd.Series([], dtype=object)))
    for col in [x, x.k, x.s, x.t, x.index, x.set_index("t").b, objects, objects.o]:
        c = cached(col)
        assert_same_collection(c, col)
        assert c.npartitions == 4 and c.known_divisions
        assert_same(c.compute(scheduler="sync"), col.compute(scheduler="sync"))
    # dd.from_delayed would have turned the Decimals into strings
    assert pd.api.types.is_object_dtype(cached(objects).dtypes["o"])
    assert isinstance(cached(objects.o).compute(scheduler="sync").iloc[1], decimal.Decimal)


def test_min_seconds_records_nothing_for_cheap_partitions(tmp_path):
    log = tmp_path / "log"
    expected = stepped(tmp_path / "plain").compute(scheduler="sync")
    pd.testing.assert_frame_equal(cached(stepped(log), min_seconds=60).compute(scheduler="sync"), expected)
    again = cached(stepped(log), min_seconds=60)
    assert not any(isinstance(v, LoadTask) for v in dict(again.__dask_graph__()).values())
    pd.testing.assert_frame_equal(again.compute(scheduler="sync"), expected)
    assert len(runs(log)) == 8  # both runs computed every partition
    cached(stepped(log), min_seconds=0).compute(scheduler="sync")
    cached(stepped(log), min_seconds=0).compute(scheduler="sync")
    assert len(runs(log)) == 12  # with min_seconds=0 the third run recorded them


class Opaque:
    """A callable object with no canonical form: its node cannot be identified."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, part):
        note(self.log, "opaque")
        return part + 1


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_unidentifiable_function_computes_uncached_with_right_values(tmp_path, scheduler, caplog):
    log, plain = str(tmp_path / "log"), str(tmp_path / "plain")

    def downstream(where):  # step (cached), then opaque on the one partition of the sums
        return stepped(where).groupby("g").c.sum().map_partitions(Opaque(where), meta=("c", float))

    def upstream(where):  # opaque first: step, downstream of it, cannot be cached either
        return dd.from_pandas(FRAME, npartitions=4).map_partitions(Opaque(where), meta=FRAME.iloc[:0]) \
            .map_partitions(step, where, meta=META)

    expected_down = downstream(plain).compute(scheduler=scheduler)
    expected_up = upstream(plain).compute(scheduler=scheduler)
    with caplog.at_level(logging.DEBUG, logger="kachery_tasks.dask"):
        for _ in range(2):
            pd.testing.assert_series_equal(cached(downstream(log)).compute(scheduler=scheduler),
                                           expected_down)
    assert any("cannot identify the callable Opaque" in r.message for r in caplog.records)
    assert sorted(runs(log)) == ["opaque", "opaque", "step0", "step10", "step20", "step30"]
    for _ in range(2):
        pd.testing.assert_frame_equal(cached(upstream(log)).compute(scheduler=scheduler), expected_up)
    assert len(runs(log)) == 6 + 2 * 8  # every opaque and step partition, both times


def _with_length(part, path):
    return part.assign(n=len(str(path)))


def test_argument_with_no_canonical_form_falls_back_to_uncached(tmp_path):
    log = str(tmp_path / "log")

    def make():  # a Path names a location, not content: it has no canonical form
        return stepped(log).map_partitions(_with_length, tmp_path, meta=META.assign(n=0))

    expected = make().compute(scheduler="sync")
    assert len(runs(log)) == 4
    pd.testing.assert_frame_equal(cached(make()).compute(scheduler="sync"), expected)
    pd.testing.assert_frame_equal(cached(make()).compute(scheduler="threads"), expected)
    assert len(runs(log)) == 12  # fused with _with_length, step is not cached either


@pytest.mark.parametrize("shape", ["repartition", "concat"])
def test_partitions_sharing_upstream_compute_it_once(tmp_path, shape):
    log = tmp_path / "log"

    def make():
        x = stepped(log)
        return x.repartition(npartitions=8) if shape == "repartition" else dd.concat([x, x])

    expected = make().compute(scheduler="sync")
    assert len(runs(log)) == 4  # dask itself computes each step once
    c = cached(make())
    assert c.npartitions == 8
    pd.testing.assert_frame_equal(c.compute(scheduler="threads"), expected)
    assert len(runs(log)) == 8  # one per distinct Merkle id, not per output partition
    pd.testing.assert_frame_equal(cached(make()).compute(scheduler="threads"), expected)
    assert len(runs(log)) == 8


def test_another_home_does_not_reuse_the_first_homes_collection(tmp_path):
    log = tmp_path / "log"
    first = cached(stepped(log))
    first.compute(scheduler="sync")
    with config.set(home=str(tmp_path / "other")):
        second = cached(stepped(log))  # same content ids: dask must not hand back `first`
        pd.testing.assert_frame_equal(second.compute(scheduler="sync"), first.compute(scheduler="sync"))
    assert len(runs(log)) == 8  # the other home's store was empty
    assert (tmp_path / "other").exists()


def test_on_a_local_cluster_with_a_p2p_shuffle(tmp_path):
    distributed = pytest.importorskip("distributed")
    from kachery_tasks.dask import KacheryPlugin

    log = tmp_path / "log"
    plain = tmp_path / "plain"
    sums = stepped(plain).groupby("g").c.sum().compute(scheduler="sync")
    shuffled = stepped(plain).shuffle("g").compute(scheduler="sync").sort_index()
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        client.register_plugin(KacheryPlugin(home=str(tmp_path)))
        for _ in range(2):
            got = client.compute(cached(stepped(log).groupby("g").c.sum())).result()
            pd.testing.assert_series_equal(got, sums)
        assert len(runs(log)) == 4
        # the P2P shuffle finds its barrier by key: it keeps its keys and runs, uncached, each
        # time; what it shuffles (step, fused with the shuffle's partitioning: a node of its own)
        # is cached
        for n in (8, 8):
            got = client.compute(cached(stepped(log).shuffle("g"))).result()
            pd.testing.assert_frame_equal(got.sort_index(), shuffled)
            assert len(runs(log)) == n


# -- dask's own callables and pandas dtypes inside the graph ----------------------------------------
STRINGS = FRAME.assign(s=pd.array([f"k{(i * 7) % 11:02d}" for i in range(40)], dtype=pd.StringDtype("python")))


def _after(part, log):
    note(log, "after")
    return part


BEFORE_FINAL = {
    # groupby().agg({...}) and agg([...]) pick their results out with dask.utils.itemgetter
    "groupby_agg_dict": lambda log: stepped(log).groupby("g").agg({"c": "sum", "a": "max"}),
    "groupby_agg_list": lambda log: stepped(log)[["g", "b", "c"]].groupby("g").agg(["sum", "min"]),
    # a tasks shuffle on a string column passes the column's pandas.StringDtype as an argument
    "set_index_tasks": lambda log: dd.from_pandas(STRINGS, npartitions=4)
    .map_partitions(step, str(log), meta=STRINGS.iloc[:0].assign(c=0.0)).set_index("s", shuffle_method="tasks"),
}


@pytest.mark.parametrize("name", list(BEFORE_FINAL))
def test_graphs_with_itemgetter_or_string_dtype_are_cached_to_the_end(tmp_path, name):
    log = tmp_path / "log"

    def make(where):  # a counted step after the node that used to have no id
        x = BEFORE_FINAL[name](where)
        return x.map_partitions(_after, str(where), meta=x._meta)

    expected = make(tmp_path / "plain").compute(scheduler="sync")
    first = cached(make(log))
    assert_same(first.compute(scheduler="sync"), expected)
    n_out = runs(log).count("after")
    assert n_out == first.npartitions
    assert sorted(set(runs(log)) - {"after"}) == ["step0", "step10", "step20", "step30"]
    again = cached(make(log))  # rebuilt from scratch
    before = len(runs(log))  # (set_index computes its divisions when optimized, outside any cache)
    assert_same(again.compute(scheduler="sync"), expected)
    assert len(runs(log)) == before  # the step after the shuffle or aggregation was loaded too
    assert runs(log).count("after") == n_out


def test_itemgetter_is_identified_by_its_index():
    from dask._task_spec import DataNode, Task
    from dask.utils import itemgetter

    from kachery_tasks.dask.identify import node_id

    def get(index):
        return node_id(Task("k", itemgetter(index), DataNode(None, {"a": 1, "b": 2, ("a", "b"): 3})), {})

    assert get("a") == get("a")  # new itemgetter objects, same index: same id
    ids = [get("a"), get("b"), get(("a", "b")), get(["a", "b"])]
    assert len(set(ids)) == 4  # a list and a tuple select different things in pandas


@pytest.mark.parametrize("dtype, other", [
    (pd.StringDtype("python"), pd.StringDtype("python", na_value=np.nan)),
    (pd.CategoricalDtype(["x", "y"]), pd.CategoricalDtype(["y", "x"])),
    (pd.CategoricalDtype(["x", "y"]), pd.CategoricalDtype(["x", "y"], ordered=True)),
    (pd.DatetimeTZDtype("ns", "UTC"), pd.DatetimeTZDtype("ns", "Europe/Paris")),
    (pd.DatetimeTZDtype("ns", "UTC"), pd.DatetimeTZDtype("us", "UTC")),
])
def test_pandas_dtype_arguments_are_identified_by_their_parameters(tmp_path, dtype, other):
    """A dtype as a task argument (``astype``): cached, and other parameters give other ids."""
    if isinstance(dtype, pd.DatetimeTZDtype):
        frame = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=8, freq="h", tz="UTC")})
        column = "t"
    else:
        frame = pd.DataFrame({"v": ["x", "y"] * 4})
        column = "v"

    def make(d):
        return dd.from_pandas(frame, npartitions=2).astype({column: d})

    first, same, different = cached(make(dtype)), cached(make(type(dtype)(**_params(dtype)))), cached(make(other))
    assert job_keys(first) and job_keys(first) == job_keys(same)
    assert not job_keys(first) & job_keys(different)
    for d, c in ((dtype, first), (other, different)):
        got = c.compute(scheduler="sync")
        pd.testing.assert_frame_equal(got, make(d).compute(scheduler="sync"))
        assert got.dtypes[column] == d


def _params(dtype) -> dict:
    """The constructor arguments of an equal, separately built dtype."""
    if isinstance(dtype, pd.StringDtype):
        return {"storage": dtype.storage, "na_value": dtype.na_value}
    if isinstance(dtype, pd.CategoricalDtype):
        return {"categories": list(dtype.categories), "ordered": dtype.ordered}
    return {"unit": dtype.unit, "tz": str(dtype.tz)}
