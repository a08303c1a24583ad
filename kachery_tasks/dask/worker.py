"""What the nodes of a built graph run, on the workers (or the local scheduler's threads): load a
recorded result, or resolve a job with its upstream values, under the settings it was made with.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from .. import config
from ..errors import KacheryError
from ..store.local import store_for
from ..tasks.compute import compute
from ..tasks.provenance import Measure
from ..tasks.recording import record_success
from ..tasks.resolver import MISS, find, lookup, resolve
from ..tasks.settings import CallSettings
from ..tasks.task import Job
from .nodes import PLUGIN_NAME, TOPIC, job_key, node_spec, prunable


@contextmanager
def entered(job: Job) -> Iterator[None]:
    """Run under the job's settings (its home above all), as in the process that made it.

    In this thread only (``config.scoped``): a scheduler's threads run jobs of different settings
    at once, and ``config.set``, process-wide, let one job's settings leak into the others and
    outlive it. Entered only when the settings differ from those in force.
    """
    settings = job.settings
    current = CallSettings.current()
    with nullcontext() if settings is current or settings == current else config.scoped(**settings.as_config()):
        yield


def in_worker() -> Any:
    """The ``distributed`` worker running this task, or None (local schedulers)."""
    dist = sys.modules.get("distributed")
    if dist is None:
        return None
    try:
        return dist.get_worker()
    except ValueError:
        return None


def check_cluster_home(job: Job) -> None:
    """Refuse, on a worker with a ``KacheryPlugin``, a job made in another home than the plugin's.

    A job records in the home it was made in; a cluster configured for one home must not quietly
    record in another (the client's, which the workers may not even share)."""
    worker = in_worker()
    if worker is None:
        return
    plugin = getattr(worker, "plugins", {}).get(PLUGIN_NAME)
    home = getattr(plugin, "settings", {}).get("home") if plugin is not None else None
    if home is not None and home != job.settings.home:
        raise KacheryError(
            f"task {job.id[:12]} ({job.task.name}) was made in home {job.settings.home}, but this "
            f"cluster's KacheryPlugin records in {home}: compute it with that home in force on the "
            "client (kt.config.set(home=...)), or register the plugin again for this home")


def emit(msg: dict[str, Any]) -> None:
    """Tell the scheduler (KacheryPlugin) what a node did; a no-op off ``distributed``."""
    worker = in_worker()
    if worker is not None:
        worker.log_event(TOPIC, msg)


def load_job(job: Job, pruned: int = 0) -> Any:
    """Load a recorded result (the load node of a pruned graph)."""
    check_cluster_home(job)
    with entered(job):
        hit = find(job.settings.home, job.id)
        if hit is None:
            raise KacheryError(
                f"the record of task {job.id} ({job.task.name}) disappeared between building the "
                "graph and running it (garbage collection?); compute the graph again to recompute it")
        if in_worker() is not None:
            saved = hit.record.provenance.wall_s if hit.record is not None else 0.0
            emit({"event": "hit", "key": job_key(job), "saved_s": saved, "pruned": pruned})
    return hit.value


def run_job(job: Job, ids: tuple[str, ...], *values: Any) -> Any:
    """Resolve a job on the worker, with the values of its upstream jobs (ids in ``ids``)."""
    check_cluster_home(job)
    upstream = dict(zip(ids, values, strict=True))
    start = time.perf_counter()
    spec = node_spec(job)
    if spec is not None and spec.always_run:  # state outside the graph: run here, never recorded
        return compute(job, upstream=upstream)
    with entered(job):
        missed = False
        if prunable(job):  # recorded since the graph was built (another graph, another cluster)
            found = lookup(job)
            if found is not MISS:
                emit({"event": "late-hit", "key": job_key(job)})
                return found
            missed = True
        if spec is not None and spec.min_seconds > 0:
            value = run_node(job, upstream, spec.min_seconds)
        else:
            value = resolve(job, upstream=upstream, missed=missed)
    emit({"event": "computed", "key": job_key(job), "seconds": time.perf_counter() - start})
    return value


def run_node(job: Job, upstream: Mapping[str, Any], min_seconds: float) -> Any:
    """Compute a cached() node; record it only if it took at least ``min_seconds`` (cheap nodes are
    not worth a record and a blob)."""
    measure = Measure()
    value = compute(job, measure, upstream)
    s = job.settings
    if s.cache and not s.read_only and measure.wall_s >= min_seconds:
        record_success(job, store_for(s.home), value, measure)
    return value
