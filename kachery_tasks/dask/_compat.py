"""The private modules of dask and distributed that kachery_tasks uses, all imported here.

dask's graph node classes (``dask._task_spec``), dask-expr's expression classes and distributed's
P2P shuffle barrier are not public API: a dask release may move or rename them. The rest of
kachery_tasks gets them from this module only, so such a release breaks this file alone, with one
ImportError that names what is missing and the releases kachery_tasks was tested with. What was
imported lazily stays lazy: dask-expr (dask.dataframe imports pandas) through
:func:`dataframe_expr`, and distributed's shuffle module through :func:`p2p_barrier_type`, which
only looks it up.
"""

from __future__ import annotations

import sys
from typing import Any

#: The dask and distributed releases kachery_tasks was tested with: pyproject's floor to the newest.
TESTED_DASK = "2025.4.0 to 2026.11.0"


def _version(package: str) -> str:
    return getattr(sys.modules.get(package), "__version__", "(unknown version)")


def incompatible(what: str, cause: BaseException | None = None) -> ImportError:
    """The one error for a private dask or distributed module or name that is not where it was."""
    package = what.partition(".")[0]
    detail = f" ({cause})" if cause is not None else ""
    return ImportError(
        f"kachery_tasks needs {what}, private to {package}, which {package} {_version(package)} "
        f"does not have{detail}; kachery_tasks is tested with dask and distributed {TESTED_DASK}")


def _moved(exc: ImportError, modules: tuple[str, ...]) -> bool:
    """True if ``exc`` says one of ``modules`` (or a name in it) is missing, as opposed to some other
    import failing inside them (a missing optional dependency such as pandas)."""
    name = exc.name
    return name is not None and name not in ("dask", "distributed") and any(
        m == name or m.startswith(name + ".") for m in modules)


try:
    from dask._task_spec import (
        Alias,
        DataNode,
        GraphNode,
        NestedContainer,
        Task,
        TaskRef,
        convert_legacy_graph,
    )
    from dask._task_spec import _execute_subgraph as execute_subgraph
except ImportError as exc:
    if not _moved(exc, ("dask._task_spec",)):
        raise
    raise incompatible("dask._task_spec", exc) from exc


_DASK_EXPR = ("dask.dataframe.dask_expr._collection", "dask.dataframe.dask_expr._expr",
              "dask.dataframe.dask_expr.io._delayed")


def dataframe_expr() -> tuple[Any, Any, Any]:
    """dask-expr's ``new_collection``, ``DelayedsExpr`` and ``FromDelayed``, imported on first use."""
    try:
        from dask.dataframe.dask_expr._collection import new_collection
        from dask.dataframe.dask_expr._expr import DelayedsExpr
        from dask.dataframe.dask_expr.io._delayed import FromDelayed
    except ImportError as exc:
        if not _moved(exc, _DASK_EXPR):
            raise
        raise incompatible("dask.dataframe.dask_expr (new_collection, DelayedsExpr, FromDelayed)", exc) from exc
    return new_collection, DelayedsExpr, FromDelayed


def p2p_barrier_type() -> type | None:
    """distributed's ``P2PBarrierTask`` if ``distributed.shuffle._core`` is imported already, else
    None (no barrier can exist before it is): looked up, never imported."""
    core = sys.modules.get("distributed.shuffle._core")
    if core is None:
        return None
    try:
        return core.P2PBarrierTask
    except AttributeError:
        raise incompatible("distributed.shuffle._core.P2PBarrierTask") from None


__all__ = ["TESTED_DASK", "Alias", "DataNode", "GraphNode", "NestedContainer", "Task", "TaskRef",
           "convert_legacy_graph", "dataframe_expr", "execute_subgraph", "incompatible",
           "p2p_barrier_type"]
