"""cached() through distributed's P2P shuffle for a dask array (``rechunk(method="p2p")``): the
barrier and the transfer tasks keep their dask keys and run every time, and so does everything
downstream of them, while the identifiable work upstream is recorded and then loaded.
(DataFrame shuffles on a cluster: test_dask_dataframe.py.)

Executions are counted through a file (execution_log), never in-process globals.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from dask._task_spec import Alias, Task, _execute_subgraph, convert_legacy_graph  # noqa: E402
from distributed.shuffle._core import P2PBarrierTask  # noqa: E402
from execution_log import note, runs  # noqa: E402

from kachery_tasks.dask import cached  # noqa: E402
from kachery_tasks.dask.identify import graph_ids, keyed_by_name  # noqa: E402
from kachery_tasks.dask.nodes import LoadTask, RunTask  # noqa: E402

DATA = np.arange(64.0).reshape(8, 8)
META = np.empty((0, 0))  # given, so that map_blocks never calls a step to guess it


def _before(block, log):
    note(log, "before")
    return block * 2 + 1


def _after(block, log):
    note(log, "after")
    return block - 1


def pipeline(log, how: str = "method"):
    """Four column blocks (8, 2) → four row blocks (2, 8) through a P2P rechunk, with counted
    steps before and after the shuffle; building it runs nothing."""
    x = da.from_array(DATA, chunks=(8, 2)).map_blocks(_before, str(log), meta=META)
    if how == "method":
        y = x.rechunk((2, 8), method="p2p")
    else:
        with dask.config.set({"array.rechunk.method": "p2p"}):
            y = x.rechunk((2, 8))
    return y.map_blocks(_after, str(log), meta=META)


EXPECTED = DATA * 2 + 1 - 1


def _graph(collection) -> dict:
    (opt,) = dask.optimize(collection)
    return convert_legacy_graph(dict(opt.__dask_graph__()))


def _calls(node, suffix: str) -> bool:
    """Whether the node (or the fused graph inside it) calls a function whose name ends so."""
    if not isinstance(node, Task):
        return False
    if node.func is _execute_subgraph:
        return any(_calls(inner, suffix) for inner in node.args[0].values())
    return getattr(node.func, "__name__", "").endswith(suffix)


@pytest.mark.parametrize("how", ["method", "config"])
def test_shuffle_nodes_of_a_p2p_rechunk_get_no_id(tmp_path, how):
    dsk = _graph(pipeline(tmp_path / "log", how))
    assert not runs(tmp_path / "log")
    barriers = [k for k, v in dsk.items() if isinstance(v, P2PBarrierTask)]
    assert barriers  # an array's P2P rechunk uses the same barrier class as DataFrame shuffles
    # after dask's fusion the barrier depends on aliases of fused tasks that run the transfers
    transfers = {k for k, v in dsk.items() if _calls(v, "_transfer")}
    assert transfers and not transfers & {d for b in barriers for d in dsk[b].dependencies}
    assert all(isinstance(dsk[d], Alias) for b in barriers for d in dsk[b].dependencies)
    reasons: dict = {}
    ids = graph_ids(dsk, reasons=reasons)
    pinned = keyed_by_name(dsk)
    assert set(barriers) | transfers <= set(pinned)
    for key in pinned:
        assert key not in ids and reasons[key] == pinned[key]
    assert all("barrier of a P2P shuffle" in reasons[b] for b in barriers)
    assert all("hands partitions to the P2P shuffle" in reasons[t] for t in transfers)
    # upstream of the shuffle: the four blocks of _before (fused with from_array) have ids
    upstream = {k for k, v in dsk.items() if _calls(v, "_before")}
    assert len(upstream) == 4 and upstream <= set(ids)
    assert not {k for k, v in dsk.items() if _calls(v, "_after")} & set(ids)  # downstream: none


@pytest.fixture(scope="module")
def client():
    # in-process workers use the test's home (config.set is process-wide): no plugin needed
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("how", ["method", "config"])
def test_cached_p2p_rechunk_same_numbers_and_upstream_loaded(client, tmp_path, how):
    log = tmp_path / "log"
    plain = client.compute(pipeline(tmp_path / "plain", how)).result(timeout=60)
    np.testing.assert_array_equal(plain, EXPECTED)

    first = cached(pipeline(log, how))
    kinds = [type(v) for v in dict(first.__dask_graph__()).values()]
    assert kinds.count(P2PBarrierTask) == 1 and kinds.count(RunTask) == 4 and LoadTask not in kinds
    barrier = next(k for k, v in dict(first.__dask_graph__()).items() if isinstance(v, P2PBarrierTask))
    assert barrier.startswith("shuffle-barrier-")  # its dask key, as distributed expects
    np.testing.assert_array_equal(client.compute(first).result(timeout=60), plain)
    assert sorted(runs(log)) == ["after"] * 4 + ["before"] * 4

    again = cached(pipeline(log, how))  # rebuilt from scratch: new dask objects, same content
    kinds = [type(v) for v in dict(again.__dask_graph__()).values()]
    assert kinds.count(LoadTask) == 4 and RunTask not in kinds  # the blocks before the shuffle
    assert kinds.count(P2PBarrierTask) == 1
    np.testing.assert_array_equal(client.compute(again).result(timeout=60), plain)
    # the shuffle and what follows it ran again; nothing before it did
    assert sorted(runs(log)) == ["after"] * 8 + ["before"] * 4
    np.testing.assert_array_equal(client.compute(cached(pipeline(log, how)).sum()).result(timeout=60),
                                  plain.sum())
    assert runs(log).count("before") == 4
