"""Running a job's function here, on its resolved arguments, under its caller's settings.

The one place a task's code is called: the resolver (pure and query jobs), actions, ``rerun`` and
the Dask layer's nodes all come here, so what a computation sees (upstream values substituted, the
home and namespace of its caller, the ``computed`` count and the measure of its cost) is the same
on every path.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

from .. import config
from .provenance import Measure
from .stats import STATS
from .task import Job, substitute_jobs


def compute(job: Job, measure: Measure | None = None, upstream: Mapping[str, Any] | None = None) -> Any:
    """Run the job's function here on its resolved arguments (upstream jobs resolved first)."""
    given = upstream or {}
    args = substitute_jobs(job.args, lambda up: given[up.id] if up.id in given else up.result())
    bound = inspect.BoundArguments(job.task.signature, args)
    STATS.count("computed")
    measure = measure or Measure()
    measure.start()
    try:
        with _caller_settings(job):
            return job.task.func(*bound.args, **bound.kwargs)
    finally:
        measure.stop()


def _caller_settings(job: Job):
    """Tasks called inside a task resolve in the same home and namespace as their caller (in the
    calling thread only: other threads may be running jobs of other settings)."""
    s = job.settings
    wanted = {"home": s.home, "namespace": s.namespace, "read_only": s.read_only}
    if config.home_str() == s.home and config.get("namespace") == s.namespace and config.get("read_only") == s.read_only:
        return nullcontext()
    return config.scoped(**wanted)
