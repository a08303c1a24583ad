"""Progress that tells cached from computed tasks.

On the local schedulers (sync, threads, processes) a ``dask.callbacks.Callback`` sees the graph that
runs: load nodes are cached results, run nodes are kachery jobs to resolve, everything else is plain
dask work. With ``distributed``, callbacks do not run; the counts come from KacheryPlugin.

    with kachery_tasks.dask.progress():
        result.compute()
"""

from __future__ import annotations

from typing import Any

from dask.callbacks import Callback

from .nodes import LoadTask, RunTask
from .plugin import stats


def _kind(node: Any) -> str:
    if isinstance(node, LoadTask):
        return "cached"
    if isinstance(node, RunTask):
        return "computed"
    return "dask"


class CacheProgress(Callback):
    """Rich progress bars (cached / computed / other dask tasks) for the local schedulers.

    After the run, ``summary`` holds the counts of finished tasks by kind."""

    def __init__(self, *, show: bool = True, console: Any = None):
        super().__init__()
        self.show = show
        self.console = console
        self.summary: dict[str, int] = {}
        self._kinds: dict[Any, str] = {}
        self._bars: dict[str, Any] = {}
        self._progress: Any = None

    def _start(self, dsk: Any) -> None:
        self._kinds = {key: _kind(node) for key, node in dsk.items()}
        totals = {"cached": 0, "computed": 0, "dask": 0}
        for kind in self._kinds.values():
            totals[kind] += 1
        self.summary = {"cached": 0, "computed": 0, "dask": 0}
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("{task.description:>10}"), BarColumn(),
                                      MofNCompleteColumn(), console=self.console, transient=False)
            self._bars = {kind: self._progress.add_task(kind, total=n) for kind, n in totals.items() if n}
            self._progress.start()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        kind = self._kinds.get(key, "dask")
        self.summary[kind] += 1
        if self._progress is not None and kind in self._bars:
            self._progress.advance(self._bars[kind])

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def progress(client: Any = None, *, show: bool = True, console: Any = None) -> Any:
    """A progress context for the local schedulers, or, given a ``distributed.Client``, the
    cluster's cache counts (``stats(client)``)."""
    if client is not None:
        return stats(client)
    return CacheProgress(show=show, console=console)
