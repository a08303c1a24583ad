"""``KacheryPlugin``: the store on every ``distributed`` worker, and cache statistics on the scheduler.

One object to register (``client.register_plugin(KacheryPlugin(home=...))``). It is a scheduler
plugin; when the scheduler starts it, it installs a worker plugin on every current and future worker
(the pattern of ``distributed.diagnostics.plugin.InstallPlugin``), which enters
``config.set(home=...)`` for the worker's life. Workers on one machine, or sharing a filesystem,
then share one store, and its file locks give single flight across them.

The scheduler part only counts: load and run nodes log events (topic ``kachery``) from the workers
(hits with the compute time their record says they saved and the nodes they pruned; computes), and
the ``transition`` hook adds the compute time of run nodes from their startstops. Nothing here
does I/O on the scheduler's event loop. One line per graph is logged when its last node finishes.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .. import config
from ..errors import UserError
from ..store.durability import GROUP_COMMIT
from .nodes import PLUGIN_NAME, TOPIC, JobTask

log = logging.getLogger("kachery_tasks.dask")

NAME = "kachery"
#: The configuration keys that decide where results come from: the workers get the client's values.
RESULT_SOURCES = ("tiers", "bucket", "read_buckets", "bucket_read_only", "trusted_nodes")


class KacheryWorkerPlugin(WorkerPlugin):
    """Enters the kachery configuration for the worker's life; jobs of another home are refused
    there (worker.py ``check_cluster_home``)."""

    idempotent = True

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self._cm: Any = None

    def setup(self, worker: Any) -> None:
        self._cm = config.set(**self.settings)
        self._cm.__enter__()

    def teardown(self, worker: Any) -> None:
        GROUP_COMMIT.flush()  # the worker's last records are durable before it goes
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


class KacheryPlugin(SchedulerPlugin):
    """Configure the kachery store on every worker and count cache hits, misses and time saved.

    ``home``: the home the workers use (default: the home in force here), which must be the home
    in force here: jobs record in the home they were made in (and the client prunes by looking
    there), so a plugin with another home would leave the cluster recording where the client is,
    not where the plugin says. The home must be one path on every machine (a shared filesystem).
    ``bucket``: the bucket the workers read and publish to (default: the one in force here); the
    other keys that decide where results come from (``tiers``, ``read_buckets``,
    ``bucket_read_only``, ``trusted_nodes``) go to the workers as they are here, so a graph the
    client pruned against a bucket loads from that bucket on the workers. ``settings``: other
    configuration keys to set on the workers (``namespace``, ``read_only``, ...).
    """

    idempotent = False
    name = NAME

    def __init__(self, home: str | None = None, bucket: str | None = None, **settings: Any):
        if bucket is not None:
            settings["bucket"] = bucket
        with config.set(**settings):  # validates the keys and values here, not on the workers
            pass
        here = config.home_str()
        if home is not None:
            with config.scoped(home=str(home)):
                wanted = config.home_str()
            if wanted != here:
                raise UserError(
                    f"KacheryPlugin(home={str(home)!r}) differs from the home in force here ({here}): "
                    "jobs record in the home they are made in, so make it the home here too "
                    f"(kt.config.set(home={str(home)!r}) or KACHERY_TASKS_HOME) or leave home= out")
        sources = {key: config.get(key) for key in RESULT_SOURCES}
        self.worker_settings = {"home": here, **sources, **settings}
        self._scheduler: Any = None
        self._reset()

    def _reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self._graphs: dict[int, dict[str, Any]] = {}
        self._graph_of: dict[Any, int] = {}
        self._next_graph = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        from distributed.protocol.pickle import dumps

        self._scheduler = scheduler
        await scheduler.register_worker_plugin(
            comm=None, plugin=dumps(KacheryWorkerPlugin(self.worker_settings)),
            name=PLUGIN_NAME, idempotent=False)

    def restart(self, scheduler: Any) -> None:
        self._reset()

    # -- counting ----------------------------------------------------------------------------------
    def update_graph(self, scheduler: Any, *, keys: Any = (), tasks: Any = (), **kwargs: Any) -> None:
        ours = []
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is not None and isinstance(ts.run_spec, JobTask) and ts.state not in ("memory", "erred"):
                ours.append(key)
        if not ours:
            return
        gid = self._next_graph
        self._next_graph += 1
        self._graphs[gid] = {"pending": set(ours), "counts": Counter(), "seconds": Counter()}
        for key in ours:
            self._graph_of[key] = gid
        self.counts["graphs"] += 1

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        event = msg.get("event")
        graph = self._graphs.get(self._graph_of.get(msg.get("key"), -1))
        counters = [self.counts] + ([graph["counts"]] if graph else [])
        seconds = [self.seconds] + ([graph["seconds"]] if graph else [])
        for c in counters:
            if event == "hit":
                c["hits"] += 1
                c["pruned"] += int(msg.get("pruned", 0))
            elif event == "late-hit":
                c["hits"] += 1
                c["late_hits"] += 1
            elif event == "computed":
                c["misses"] += 1
        if event == "hit":
            for s in seconds:
                s["saved_s"] += float(msg.get("saved_s", 0.0))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        gid = self._graph_of.get(key)
        if gid is None:
            return
        graph = self._graphs.get(gid)
        if finish == "memory" and start == "processing":
            spent = sum(ss["stop"] - ss["start"] for ss in kwargs.get("startstops", ())
                        if ss.get("action") == "compute")
            for s in (self.seconds, graph["seconds"] if graph else Counter()):
                s["compute_s"] += spent
        if finish in ("memory", "erred", "forgotten", "released") and graph is not None:
            graph["pending"].discard(key)
            del self._graph_of[key]
            if not graph["pending"]:
                self._finish_graph(gid)

    def _finish_graph(self, gid: int) -> None:
        graph = self._graphs.pop(gid)
        c, s = graph["counts"], graph["seconds"]
        log.info("kachery graph %d: %d hits (%d upstream pruned), %d computed, %.3f s computing, "
                 "%.3f s saved", gid, c["hits"], c["pruned"], c["misses"], s["compute_s"], s["saved_s"])

    def summary(self) -> dict[str, Any]:
        """The counters, as ``stats(client)`` returns them."""
        return {
            "hits": self.counts["hits"],
            "misses": self.counts["misses"],
            "pruned": self.counts["pruned"],
            "late_hits": self.counts["late_hits"],
            "graphs": self.counts["graphs"],
            "compute_s": round(self.seconds["compute_s"], 6),
            "saved_s": round(self.seconds["saved_s"], 6),
        }


def stats(client: Any) -> dict[str, Any]:
    """Cache statistics of the cluster since the plugin was registered (see :class:`KacheryPlugin`)."""

    def _get(dask_scheduler: Any) -> dict[str, Any] | None:
        plugin = dask_scheduler.plugins.get(NAME)
        return plugin.summary() if plugin is not None else None

    found = client.run_on_scheduler(_get)
    if found is None:
        raise UserError("no KacheryPlugin on this cluster: call client.register_plugin(KacheryPlugin(...)) first")
    return found
