"""Dask integration: ``f.delayed`` graphs keyed by task id and pruned of cached work, ``cached()``
for any Dask collection, ``KacheryPlugin`` for ``distributed``, and progress. See docs/dask.md.

Modules, each importing only those above it in this list: ``_compat`` (dask's private names),
``nodes`` (graph node classes, the task of cached() nodes), ``identify`` (content ids of dask
nodes), ``jobs`` (a dask graph's jobs), ``worker`` (what the nodes run), ``graph`` (the pruned
graph of jobs), ``delayed`` (``f.delayed``), ``frames`` (DataFrames), ``cached`` (``cached()``),
``published`` (a collection's task ids, for ``kt.publish``); ``plugin`` and ``progress`` read
``nodes``. Importing this package registers ``f.delayed``, the runner of ``rerun`` and the task ids
of collections with the task engine (kachery_tasks.tasks.dask_layer), which never imports it.
"""

from ..tasks.dask_layer import DaskLayer, register
from .cached import cached
from .delayed import JobDelayed, job_delayed, run_many
from .graph import build_graph
from .identify import InputChanged
from .plugin import KacheryPlugin, stats
from .progress import CacheProgress, progress
from .published import collection_tasks

register(DaskLayer(delayed=job_delayed, run_many=run_many, collection_tasks=collection_tasks))

__all__ = ["CacheProgress", "InputChanged", "JobDelayed", "KacheryPlugin", "build_graph", "cached",
           "job_delayed", "progress", "stats"]
