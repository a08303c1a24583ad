"""``@pure``, ``@query`` and ``@action``: usable bare or with options.

    @pure
    def f(x): ...

    @pure(version="2", name="lab.sort", codec="npy")
    def g(x): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

from .task import Task


def _decorator(kind: str, func: Callable | None, options: dict[str, Any]) -> Any:
    if func is not None:
        return Task(func, kind, **options)
    return lambda f: Task(f, kind, **options)


@overload
def pure(func: Callable) -> Task: ...
@overload
def pure(*, version: str | None = ..., name: str | None = ..., codec: str | None = ...,
         ignore_globals: Iterable[str] = ..., cache_errors: bool | None = ..., publish: bool | None = ...,
         rtol: float | None = ..., atol: float | None = ..., service: str | None = ...) -> Callable[[Callable], Task]: ...
def pure(func=None, *, version=None, name=None, codec=None, ignore_globals=(), cache_errors=None,
         publish=None, rtol=None, atol=None, service=None):
    """A deterministic function: its id (code + canonical arguments) maps to one result, computed
    at most once per store. ``rtol``/``atol`` declare how close a recomputation must come for
    ``kachery task recheck`` to call it reproducible; ``publish=True`` publishes every result it
    computes to the configured bucket (as the config key ``publish`` does for every task).
    ``service="NAME"``: run by a channel member that serves it (docs/remote.md), here if none does."""
    call_options = {k: v for k, v in (("cache_errors", cache_errors), ("publish", publish)) if v is not None}
    return _decorator("pure", func, dict(version=version, name=name, codec=codec, ignore_globals=ignore_globals,
                                         rtol=rtol, atol=atol, call_options=call_options, service=service))


def query(func=None, *, version=None, name=None, codec=None, ignore_globals=(), service=None):
    """A read of changing state: recomputed at every call, its last success kept as a fallback.
    ``service="NAME"``: asked of a channel member that serves it (docs/remote.md)."""
    return _decorator("query", func, dict(version=version, name=name, codec=codec, ignore_globals=ignore_globals,
                                          service=service))


def action(func=None, *, version=None, name=None, ignore_globals=(), service=None):
    """A change to the outside world: returns only success or failure, runs at most once per
    idempotency key (by default its task id). ``service="NAME"``: run by the channel member that
    serves it, at most once per key in that member's action log (docs/remote.md)."""
    return _decorator("action", func, dict(version=version, name=name, ignore_globals=ignore_globals,
                                           service=service))
