"""The Dask layer as the task engine sees it: two functions that ``kachery_tasks.dask`` lends it.

The Dask layer sits above the task engine (it builds graphs of jobs), so the engine never imports
it: ``kachery_tasks.dask`` registers itself here when it is imported (:func:`register`), and
``kachery_tasks`` registers a loader that imports it on first use (importing dask costs about half
a second, which ``import kachery_tasks`` does not pay). Nothing here imports dask.

- ``delayed(job, fresh=...)``: the ``dask.delayed`` object of a job (``f.delayed(...)``);
- ``run_many(jobs)``: run many jobs, independent branches in parallel (``rerun`` of many calls);
- ``collection_tasks(collection)``: the task ids of a Dask collection's graph (``kt.publish``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class CollectionTasks:
    """The nodes of a Dask collection's graph that can have a task record, by name (``<function
    name>-<task id>``) to task id, upstream included; and the nodes that cannot (no content
    identity: computed every time), by dask key to why."""

    ids: dict[str, str]
    uncached: dict[str, str]


def _no_collection_tasks(collection: Any) -> CollectionTasks:
    raise UserError("this Dask layer cannot list the tasks of a collection")


@dataclass(frozen=True)
class DaskLayer:
    delayed: Callable[..., Any]
    run_many: Callable[[list], None]
    collection_tasks: Callable[[Any], CollectionTasks] = _no_collection_tasks


def is_collection(value: object) -> bool:
    """True for a Dask collection (asked of the type: a ``Delayed`` answers any attribute)."""
    return hasattr(type(value), "__dask_graph__")


_layer: DaskLayer | None = None
_loader: Callable[[], object] | None = None


def register(layer: DaskLayer) -> None:
    """Make ``layer`` the one the task engine uses (``kachery_tasks.dask`` calls this)."""
    global _layer
    _layer = layer


def register_loader(loader: Callable[[], object] | None) -> None:
    """``loader`` imports the Dask layer, which then registers itself (``kachery_tasks`` calls this)."""
    global _loader
    _loader = loader


def dask_layer() -> DaskLayer:
    """The registered Dask layer, loaded on first use; a UserError that says why if there is none."""
    if _layer is not None:
        return _layer
    if _loader is not None:
        try:
            _loader()
        except ImportError as exc:
            raise UserError(f"f.delayed and rerun of many calls need kachery_tasks.dask, which cannot be "
                            f"imported here ({exc}): install dask (pip install 'kachery-tasks')") from exc
    if _layer is None:
        raise UserError("no Dask layer is registered: import kachery_tasks.dask before f.delayed(...) "
                        "or a rerun with use_dask")
    return _layer
