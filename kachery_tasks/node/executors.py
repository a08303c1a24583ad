"""Where a served task runs: in the daemon's own threads, or on a ``distributed`` cluster.

An :data:`Execute` runs one job the way ``Job.result(**options)`` does and returns what it returns
(for a pure task, nothing: the record is in the store, and the daemon publishes it from there).
The daemon's queue (node/runner.py) decides when; this decides where.

**On a cluster** (``kachery node start --dask-scheduler ADDRESS``, or ``--workers N`` for a
``LocalCluster`` started with the daemon) each job is one ``client.submit``. The workers must use
this node's home, as for any kachery graph on a cluster (dask/plugin.py): they record the results
there and the daemon publishes them from there, so the home is one path on every machine (a shared
filesystem). If the scheduler has no ``KacheryPlugin`` yet, the daemon registers one for its home;
a cluster whose plugin names another home refuses each job in one line (dask/worker.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from ..tasks.task import Job

log = logging.getLogger("kachery_tasks.node")

#: Run a job as ``Job.result(**options)`` does; the value for a query or an action, None for a pure task.
Execute = Callable[[Job, dict[str, Any]], Any]


def run_here(job: Job, options: dict[str, Any]) -> Any:
    """Run ``job`` in this process (the daemon's thread that took it from the queue)."""
    value = job.result(**options)
    return None if job.task.kind == "pure" else value


def run_on_worker(job: Job, options: dict[str, Any]) -> Any:
    """What a cluster's worker runs: the job under its own settings, in the cluster's home."""
    from ..dask.worker import check_cluster_home, entered

    check_cluster_home(job)
    with entered(job):
        return run_here(job, options)


class DaskExecution:
    """An :data:`Execute` that runs each job on a ``distributed`` cluster (module doc)."""

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client = client
        self._cluster = cluster

    @classmethod
    def connect(cls, address: str) -> DaskExecution:
        """The cluster whose scheduler is at ``address``."""
        from distributed import Client

        try:
            client = Client(address, timeout="10s")
        except OSError as exc:
            raise UserError(f"--dask-scheduler {address}: cannot reach the scheduler ({exc})") from None
        execution = cls(client)
        execution._ensure_plugin()
        return execution

    @classmethod
    def local(cls, workers: int) -> DaskExecution:
        """A ``LocalCluster`` of ``workers`` single-threaded worker processes, closed with the daemon."""
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        execution = cls(Client(cluster), cluster)
        execution._ensure_plugin()
        return execution

    def _ensure_plugin(self) -> None:
        from ..dask.plugin import NAME, KacheryPlugin

        if not self.client.run_on_scheduler(lambda dask_scheduler: NAME in dask_scheduler.plugins):
            self.client.register_plugin(KacheryPlugin())

    def threads(self) -> int:
        """Threads across the cluster's workers now: the default number of requests run at once."""
        return max(1, sum(self.client.nthreads().values()))

    def __call__(self, job: Job, options: dict[str, Any]) -> Any:
        key = f"kachery-serve-{job.task.name}-{uuid.uuid4().hex[:12]}"
        return self.client.submit(run_on_worker, job, options, key=key, pure=False).result()

    def describe(self) -> str:
        return f"Dask scheduler {self.client.scheduler.address} ({self.threads()} worker thread(s))"

    def close(self) -> None:
        try:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()
        except Exception as exc:  # noqa: BLE001 - closing at exit: a failure is logged, never raised
            log.warning("closing the Dask cluster: %s", exc)
