"""Dask integration: ``f.delayed`` graphs keyed by task id and pruned of cached work, ``cached()``
for any Dask collection, ``KacheryPlugin`` for ``distributed``, and progress. See docs/dask.md."""

from .cached import cached
from .graph import JobDelayed, build_graph, job_delayed
from .identify import InputChanged
from .plugin import KacheryPlugin, stats
from .progress import CacheProgress, progress

__all__ = ["CacheProgress", "InputChanged", "JobDelayed", "KacheryPlugin", "build_graph", "cached",
           "job_delayed", "progress", "stats"]
