"""``cached()`` for dask's DataFrame collections (DataFrame, Series, Index, Scalar): by partition.

An expression collection's tasks only exist once its expression is optimized and lowered, and
rebuilding the collection on that graph (``__dask_postpersist__``) gives keys that do not match what
the expression layers expect: wrong data. So the lowered graph is materialized once (a disk shuffle
names its nodes anew each time) and identified as a whole (nodes shared by several partitions, as
in a reduction tree or a shuffle, get one id and one job), and each output partition becomes a
delayed object: the :class:`JobDelayed` of its job when its node has an id, or else a plain Delayed
on the partially cached graph (its identifiable upstream cached, the rest as it was). ``FromDelayed``
puts the partitions back together under the collection's own meta and divisions.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from dask.base import tokenize
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ..errors import UserError
from ..tasks.settings import CallSettings
from ..tasks.task import Job
from ._compat import GraphNode, convert_legacy_graph, dataframe_expr
from .delayed import JobDelayed
from .graph import around_jobs, build_graph
from .jobs import graph_jobs


def cached_frame(collection: Any, min_seconds: float) -> Any:
    """``collection`` with every partition keyed by content and cached in the store."""
    if not type(collection).__module__.startswith("dask.dataframe"):
        raise UserError(f"cached() does not take {type(collection).__name__} collections: of dask's "
                        "expression collections it takes DataFrame, Series, Index and Scalar; "
                        "go through to_delayed()")
    new_collection, DelayedsExpr, FromDelayed = dataframe_expr()

    opt = collection.optimize()
    dsk = convert_legacy_graph(dict(opt.__dask_graph__()))
    keys = list(flatten(opt.__dask_keys__()))
    jobs = graph_jobs(dsk, min_seconds)  # a P2P shuffle's nodes get none (identify.keyed_by_name)
    if all(k in jobs for k in keys):
        parts: list[Delayed] = [JobDelayed(jobs[k]) for k in keys]
        # dask keeps one expression per name: it must change with all that the jobs carry
        token = tokenize("kachery-cached", [p.key for p in parts], min_seconds,
                         CallSettings.current().as_config())
    else:
        parts = _partly_cached(dsk, keys, jobs)
        token = uuid.uuid4().hex  # dask's keys say nothing of content: never an earlier call's name
    # divisions and meta of the collection: optimizing may drop known divisions (a reduction's)
    same = collection.npartitions == len(keys)
    divisions = collection.divisions if same else opt.divisions
    meta = collection._meta if same else opt._meta
    # FromDelayed itself: from_delayed() would turn object columns into arrow strings
    expr = FromDelayed(DelayedsExpr(*parts, _determ_token=token), meta, divisions, False, None, "cached")
    return new_collection(expr)


def _partly_cached(dsk: Mapping[Any, GraphNode], keys: list, jobs: Mapping[Any, Job]) -> list[Delayed]:
    """One delayed object per partition when some have no id: those are taken from one graph
    where the nodes with no id keep their keys and read the identified ones from their jobs'
    (pruned) nodes, as ``cached()`` does for arrays."""
    rest, roots = around_jobs(dsk, jobs)
    built, _ = build_graph(roots.values())
    layer = f"kachery-partitions-{uuid.uuid4().hex}"
    graph = HighLevelGraph.from_collections(layer, {**rest, **built}, dependencies=())
    return [JobDelayed(jobs[k]) if k in jobs else Delayed(k, graph, layer=layer) for k in keys]
