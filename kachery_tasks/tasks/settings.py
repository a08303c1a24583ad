"""The settings a call runs under: cache control plus the home and namespace in force.

They are read once, when a job is made, from the configuration and from per-call options
(``f.options(force=True)``), and travel with the job: a job built inside
``with config.set(home=A)`` resolves in A even when Dask runs it later in another process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .. import config
from ..errors import UserError

#: Options a call may set with ``f.options(...)``; the same keys exist in the configuration.
CALL_OPTIONS = ("force", "cache", "read_only", "namespace", "cache_errors", "publish")


@dataclass(frozen=True)
class CallSettings:
    home: str
    namespace: str
    force: bool
    cache: bool
    read_only: bool
    cache_errors: bool
    publish: bool  # publish the computed result to the configured bucket (tasks/publish.py)

    @classmethod
    def current(cls, overrides: dict[str, Any] | None = None) -> CallSettings:
        """The settings in force, with ``overrides``; cached until the configuration changes,
        because every job (one per call, on the hit path) asks."""
        global _cached
        generation = config.generation()
        if _cached is None or _cached[0] != generation:
            get = config.get
            base = cls(config.home_str(), get("namespace"), get("force"), get("cache"), get("read_only"),
                       get("cache_errors"), get("publish"))
            _cached = (generation, base)
        base = _cached[1]
        return replace(base, **overrides) if overrides else base

    def as_config(self) -> dict[str, Any]:
        """These settings as ``config.set`` keywords, to re-enter them in another process."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_cached: tuple[int, CallSettings] | None = None


def check_call_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``f.options(...)`` keywords with the configuration's own rules."""
    for key, value in options.items():
        if key not in CALL_OPTIONS:
            raise UserError(
                f"unknown task option {key!r}; f.options() takes {', '.join(CALL_OPTIONS)}"
            )
        with config.set(**{key: value}):  # same type checks as the config keys
            pass
    return dict(options)


def in_home(home: str):
    """A context in which ``config.home()`` is ``home`` (a no-op when it already is)."""
    from contextlib import nullcontext

    return nullcontext() if config.home_str() == home else config.set(home=home)
