"""The one configuration system of kachery-tasks.

Every option of every layer lives here, in the style of ``dask.config`` (and on the same library,
donfig). Values come, lowest first, from the built-in defaults, the YAML file ``config.yaml`` in the
home directory, ``KACHERY_TASKS_*`` environment variables, and ``with config.set(...)`` blocks.
No other module reads ``os.environ``: they call :func:`get`, so a test, a notebook or a pipeline can
use two homes side by side in one process.

Keys are flat words with underscores (``read_only``, ``memory_cache_bytes``). ``set`` refuses
unknown keys and names the closest valid one, because a misspelt ``forec=True`` that silently did
nothing would cost a user a day.
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from donfig import Config

from .errors import ConfigError

ENV_PREFIX = "KACHERY_TASKS_"

#: Built-in defaults, with the reason each exists. docs/config.md lists them for users.
DEFAULTS: dict[str, Any] = {
    # Where the store, task records, feeds, keys and mutables live.
    "home": "~/.kachery-tasks",
    # Enters every task id: changing it disowns every earlier result without deleting anything.
    "namespace": "",
    # Cache control for every task kind (also per call with f.options(...)).
    "force": False,  # skip the lookup, compute, replace the record
    "cache": True,  # False: compute, store nothing, do not join a concurrent identical call
    "read_only": False,  # use hits, never write
    "cache_errors": False,  # serve recorded failures as results (re-raise them) instead of recomputing
    # The resolution tiers, first hit wins (tasks/tiers/): the channel tier asks the channels this
    # node joined when the store and the buckets miss.
    "tiers": ["memory", "local", "bucket", "channel"],
    # Memory tier: an LRU bounded in bytes of results held.
    "memory_cache_bytes": 256 * 2**20,
    # Results whose encoding is at most this many bytes are kept inside the task record.
    "inline_max_bytes": 8192,
    # Arguments whose canonical encoding is at most this many bytes are kept in the record, so the
    # call can be replayed by `kachery task rerun` / `stale --rerun` / `recheck`.
    "record_args_max_bytes": 65536,
    # Larger arrays, byte strings and plain data arguments, up to this many bytes, are kept as blobs
    # in the store (deduplicated by content) and referenced from the record, so that ordinary calls
    # on in-memory data stay replayable; 0 keeps none.
    "record_args_blob_max_bytes": 2**30,
    # The bucket this node publishes to and reads from (file:///path or gs://bucket/prefix); none:
    # results stay on this machine.
    "bucket": None,
    # Further buckets read after `bucket`, in order, never written (another lab's, a public one).
    "read_buckets": [],
    # Never write to `bucket` (a consumer with read access only).
    "bucket_read_only": False,
    # Results fetched from the buckets at once when a Dask graph is pruned (tasks/tiers/bucket.py):
    # a round trip costs milliseconds whatever the size, so one at a time is latency, not bandwidth.
    # 0 fetches none ahead: each load node fetches its own result when it runs.
    "bucket_parallelism": 16,
    # Publish every computed pure result (record, result blob, upstream records) to `bucket`.
    "publish": False,
    # Node ids, besides this node, whose records a bucket (or channel) tier serves; pickle results
    # too (unpickling runs code). This node's own store is always trusted.
    "trusted_nodes": [],
    # Channels: how often a node re-reads a joined channel's config from its bucket (a revocation
    # takes effect everywhere within this many seconds, with no restart).
    "channel_refresh_seconds": 60.0,
    # Channel messages timestamped further than this from this node's clock are refused (replays of
    # older ones are refused by their nonce within the window, and by their age after it).
    "clock_window_seconds": 60.0,
    # How long a request to a channel (a file, a feed, a result, a task) waits for word from a
    # provider: an answer, or news that it is queued, running or uploading (each resets the wait).
    "request_timeout": 30.0,
    # A node serving tasks runs at most this many requests at once; more wait in a queue, in order.
    # With a Dask cluster (`kachery node start --workers N` or `--dask-scheduler`), 0 means the
    # cluster's thread count; without one, 0 means 4.
    "serve_concurrency": 0,
    # A Unix group that shares the home: directories setgid and group-writable.
    "shared_group": None,
    # Progress bars in the command line for files larger than this.
    "progress_min_bytes": 8 * 2**20,
    # Task records of computations shorter than this many seconds are fsynced together, at most this
    # long after they are written, instead of one by one; 0 fsyncs every record before the call
    # returns. A machine crash in the window costs a recompute of those records, never a wrong result.
    "record_sync_seconds": 1.0,
    # Dask: cached(collection) stores results of tasks that took at least this long.
    "dask_min_seconds": 0.0,
    # Checkpoint a subfeed every this many messages.
    "feed_checkpoint_every": 1024,
}

#: Keys that hold a size in bytes (by name: they all end in ``_bytes``). Besides a number they take
#: one written as Python writes it (``1e6``, ``1_000_000``) or with a unit (``512k``, ``1.5GB``,
#: ``256MiB``), from every layer, because a value read from the environment or YAML arrives as text.
SIZE_KEYS = frozenset(key for key in DEFAULTS if key.endswith("_bytes"))
_SIZE_FORMS = "a non-negative number of bytes (1000000, 1e6, 1_000_000) or a size with a unit (512k, 1.5GB, 256MiB)"

#: Keys whose value is text or null (their default is None), and those that hold a bucket URI (the
#: buckets layer parses it when it opens the bucket; here only its shape is checked).
_TEXT_OR_NONE = frozenset({"shared_group", "bucket"})
_URI_KEYS = frozenset({"bucket"})

_config = Config("kachery_tasks", defaults=[DEFAULTS], paths=[], env={})
_sources: dict[str, str] = {}
#: Changes whenever any value may have changed, so hot paths can cache what they derive from config.
_generation = 0
#: A bad home file or environment value found at import, raised by get() (see the end of this module).
_load_error: ConfigError | None = None


def _home_file(home: str) -> Path:
    return Path(home).expanduser() / "config.yaml"


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in DEFAULTS:
            continue  # other tools share the prefix space; only our keys are read
        values[key] = _parse_env(key, raw)
    return values


def _parse_env(key: str, raw: str) -> Any:
    return parse_text(key, raw, f"environment variable {ENV_PREFIX}{key.upper()}={raw!r}")


def parse_text(key: str, raw: str, where: str) -> Any:
    """A value written as text (an environment variable, ``kachery config set``): YAML (``true``,
    ``5``, ``[memory, local]``), except for string keys, which are taken as they are."""
    default = DEFAULTS[key]
    if isinstance(default, str) or default is None and key in _TEXT_OR_NONE:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid: {exc}") from None
    return value


def checked(key: str, value: Any, where: str) -> Any:
    """``value`` as ``key`` holds it, or a :class:`ConfigError` naming ``where`` (what every layer
    does with a value before it takes it)."""
    check_key(key, where=where)
    return _validate(key, value, where=where)


def read_home_file(home: str | os.PathLike) -> dict[str, Any]:
    """The options in ``<home>/config.yaml`` (empty if there is none), keys checked."""
    path = _home_file(os.fspath(home))
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}; fix or remove it") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value; fix or remove it")
    for key in loaded:
        check_key(key, where=str(path))
    return dict(loaded)


def refresh(environ: Mapping[str, str] | None = None) -> None:
    """Re-read the home file and the environment (done once at import)."""
    global _load_error, _generation
    _generation += 1
    environ = os.environ if environ is None else environ
    env_values = _env_values(environ)
    home = env_values.get("home", DEFAULTS["home"])
    path = _home_file(home)
    file_values = read_home_file(home)
    _config.clear()
    _config.update_defaults(DEFAULTS)
    _sources.clear()
    for key in DEFAULTS:
        _sources[key] = "default"
    for key, value in file_values.items():
        _config.config[key] = _validate(key, value, where=str(path))
        _sources[key] = str(path)
    for key, value in env_values.items():
        _config.config[key] = _validate(key, value, where=f"environment variable {ENV_PREFIX}{key.upper()}")
        _sources[key] = f"env {ENV_PREFIX}{key.upper()}"
    _load_error = None


def check_key(key: str, where: str = "config.set") -> None:
    """Raise a :class:`ConfigError` naming the closest valid key unless ``key`` is one."""
    if key in DEFAULTS:
        return
    close = difflib.get_close_matches(key.replace("-", "_"), DEFAULTS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(DEFAULTS))}"
    raise ConfigError(f"unknown configuration key {key!r} in {where}{hint}")


def _validate(key: str, value: Any, where: str | None = None) -> Any:
    default = DEFAULTS[key]
    if value is None and default is None:
        return None
    if key in SIZE_KEYS:
        size = parse_size(value)
        if size is None:
            source = f" (from {where})" if where else ""
            raise ConfigError(f"configuration key {key!r}{source} takes {_SIZE_FORMS}, not {value!r}")
        return size
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"configuration key {key!r} takes true or false, not {value!r}")
        return value
    if isinstance(default, int | float) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"configuration key {key!r} takes a non-negative number, not {value!r}")
        return value
    if key in _URI_KEYS:
        return None if value == "" else _bucket_uri(key, value)  # "" (an empty variable): no bucket
    if isinstance(default, str) or key in _TEXT_OR_NONE:
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"configuration key {key!r} takes a string, not {value!r}")
        return os.fspath(value)
    if isinstance(default, list):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"configuration key {key!r} takes a list of strings, not {value!r}")
        if key == "read_buckets":
            for uri in value:
                _bucket_uri(key, uri)
        return list(value)
    return value


def _bucket_uri(key: str, value: Any) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(f"configuration key {key!r} takes bucket URIs such as file:///shared/kachery "
                          f"or gs://bucket/prefix, not {value!r}")
    return value


def parse_size(value: Any) -> int | None:
    """``value`` as a whole number of bytes, or None if it is not a size (see :data:`SIZE_KEYS`).

    Plain numbers are read here; text with a unit goes to ``dask.utils.parse_bytes`` (``k`` is
    1000, ``KiB`` 1024), imported only then: importing dask costs more than all of kachery_tasks'
    own import, and this module is imported by everything. A fraction of a byte is rounded down.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text or not (text[0].isdigit() or text[0] == "."):
            return None  # "", "MB" (dask reads it as 1 MB), "-1", "nan", "inf"
        try:
            value = int(text, 0)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                from dask.utils import parse_bytes

                try:
                    value = parse_bytes(text)
                except ValueError:
                    return None
    if not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
        return None
    return int(value)


#: Values in force in this thread (or task) only, over the process-wide ones: (scope id, values).
_scoped: ContextVar[tuple[int, dict[str, Any]] | None] = ContextVar("kachery_config_scoped", default=None)
_scope_ids = itertools.count(1)


def generation() -> int | tuple[int, int]:
    """A value that changes whenever a configuration value in force here may have changed
    (compare with ``!=``): the process-wide generation, and the scope of :func:`scoped`, if any."""
    local = _scoped.get()
    return _generation if local is None else (_generation, local[0])


def get(key: str) -> Any:
    """The value in force for ``key``."""
    if _load_error is not None:
        raise ConfigError(str(_load_error))
    if key not in DEFAULTS:
        check_key(key, where="config.get")
    local = _scoped.get()
    if local is not None and key in local[1]:
        return local[1][key]
    return _config.config.get(key, DEFAULTS[key])


@contextmanager
def scoped(**values: Any) -> Iterator[None]:
    """Set options for a block of code in this thread (this asyncio task) only.

    For the library's own use where one process runs calls of different settings at once: a
    Dask worker's threads each running a job under the settings it was made with. ``set`` changes
    every thread's values, and two threads entering and leaving it out of order restore each
    other's: one job's ``cache=False`` then stayed in force for the whole process. Threads started
    inside the block do not inherit these values (``set`` is for that)."""
    checked = {}
    for key, value in values.items():
        check_key(key)
        checked[key] = _validate(key, value)
    outer = _scoped.get()
    merged = {**outer[1], **checked} if outer is not None else checked
    token = _scoped.set((next(_scope_ids), merged))
    try:
        yield
    finally:
        _scoped.reset(token)


@contextmanager
def set(**values: Any) -> Iterator[None]:  # noqa: A001 - mirrors dask.config.set
    """Set options for a block of code: ``with kt.config.set(home=tmp, force=True): ...``.

    The values are in force in every thread of the process while the block runs, as in dask.
    """
    checked = {}
    for key, value in values.items():
        check_key(key)
        checked[key] = _validate(key, value)
    global _generation
    with _config.set(checked):
        _generation += 1
        saved = {k: _sources.get(k) for k in checked}
        for key in checked:
            _sources[key] = "config.set"
        try:
            yield
        finally:
            _sources.update(saved)
    _generation += 1  # after donfig restored the old values


_resolved_homes: dict[str, str] = {}


def home_str() -> str:
    """The home directory in force as an absolute string; memoized, as it sits on the hit path."""
    raw = get("home")
    found = _resolved_homes.get(raw)
    if found is None:
        found = _resolved_homes[raw] = str(Path(raw).expanduser().absolute())
    return found


def home() -> Path:
    """The home directory in force, expanded and absolute (not created)."""
    return Path(home_str())


@contextmanager
def home_layers(home: str | os.PathLike) -> Iterator[None]:
    """Use ``home`` together with its own ``config.yaml``, as if ``KACHERY_TASKS_HOME`` named it
    (``kachery --home``): ``config.set(home=…)`` alone would keep the other home's file in force.
    Process-wide, like every layer; the previous layers come back at the end."""
    global _load_error
    environ = {**os.environ, f"{ENV_PREFIX}HOME": os.fspath(home)}
    try:
        refresh(environ)
        _sources["home"] = "--home"
    except ConfigError as exc:
        _load_error = exc  # raised by the first get(), as a bad file found at import is
    try:
        yield
    finally:
        try:
            refresh()
        except ConfigError as exc:
            _load_error = exc


def effective() -> list[tuple[str, Any, str]]:
    """Every key with its value in force and where that value came from."""
    return [(key, get(key), _sources.get(key, "default")) for key in sorted(DEFAULTS)]


def serialize() -> dict[str, Any]:
    """The values in force, for shipping to worker processes (see KacheryPlugin)."""
    return {key: get(key) for key in DEFAULTS}


try:
    refresh()
except ConfigError as exc:
    # Not raised here: `import kachery_tasks` would fail with a traceback before the command line could
    # print the one-line message. Every get() raises it instead.
    _load_error = exc
