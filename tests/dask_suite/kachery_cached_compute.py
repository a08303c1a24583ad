"""A pytest plugin that computes every Dask collection through ``cached()``.

Loaded with ``-p kachery_cached_compute`` into a run of dask's own test suites (see
tests/test_dask_suite.py): ``dask.compute`` and every collection's ``.compute()`` go through
``cached()`` first, in one home shared by the whole run, so later tests load what earlier tests
stored. A test that passes plainly and fails here shows a false hit, a wrong result or a crash of
``cached()`` on a graph that dask itself computes correctly.

The home comes from ``KACHERY_TASKS_HOME`` as for any process; every node is recorded however fast
(``dask_min_seconds=0``), so that the run exercises loads, not only computes.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.base

from kachery_tasks import config
from kachery_tasks.dask import cached

_plain_compute = dask.base.compute


def _cached_or_plain(collection: Any) -> Any:
    try:
        return cached(collection)
    except TypeError:  # not a collection cached() takes (a bare expression, a custom collection)
        return collection


def compute_through_cached(*args: Any, traverse: bool = True, **kwargs: Any) -> Any:
    """``dask.compute`` with its collections replaced by ``cached(*collections)``: cached together,
    as they are computed together, so that work they share runs once."""
    collections, repack = dask.base.unpack_collections(*args, traverse=traverse)
    if not collections:
        return args
    try:
        replaced = cached(*collections) if len(collections) > 1 else (cached(collections[0]),)
    except TypeError:  # one is no collection cached() takes: each on its own
        replaced = tuple(_cached_or_plain(c) for c in collections)
    results = _plain_compute(*replaced, traverse=False, **kwargs)
    return repack(results)


_settings = config.set(dask_min_seconds=0.0)


def pytest_configure(config: Any) -> None:  # noqa: ARG001 - pytest's hook signature
    _settings.__enter__()
    dask.base.compute = compute_through_cached
    dask.compute = compute_through_cached


def pytest_unconfigure(config: Any) -> None:  # noqa: ARG001
    dask.base.compute = _plain_compute
    dask.compute = _plain_compute
    _settings.__exit__(None, None, None)
