"""kachery-tasks: a content-addressed, shareable result cache for Python tasks, files and feeds.

The public API lives here so that user code needs one import (``import kachery_tasks as kt``).
Importing this package must stay fast: it loads the configuration, the store and numpy, never
dask, distributed or pandas (those load where they are used).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import config
from .errors import (
    CodecError,
    ConfigError,
    IntegrityError,
    InvalidURI,
    KacheryError,
    KacheryWarning,
    NotFoundError,
    ReadOnlyStoreError,
    StaleResultWarning,
    StoreFullError,
    StoreFullWarning,
    UnhashableArgument,
    UserError,
)
from .store import (
    File,
    delete_mutable,
    file_info,
    get_mutable,
    load_bytes,
    load_file,
    load_json,
    load_npy,
    set_mutable,
    store_bytes,
    store_file,
    store_json,
    store_npy,
)

try:
    __version__ = _version("kachery-tasks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CodecError",
    "ConfigError",
    "File",
    "IntegrityError",
    "InvalidURI",
    "KacheryError",
    "KacheryWarning",
    "NotFoundError",
    "ReadOnlyStoreError",
    "StaleResultWarning",
    "StoreFullError",
    "StoreFullWarning",
    "UnhashableArgument",
    "UserError",
    "__version__",
    "config",
    "delete_mutable",
    "file_info",
    "get_mutable",
    "load_bytes",
    "load_file",
    "load_json",
    "load_npy",
    "set_mutable",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
]

# The task engine (kachery_tasks.tasks) imports no dask; kachery_tasks.dask is imported on use.
from .feeds import create_feed, list_feeds, load_feed, local_feed  # noqa: E402
from .tasks import ActionResult, Job, Task, TaskFailed, action, explain, pure, query  # noqa: E402
from .tasks.stale import recheck, rerun, stale  # noqa: E402

#: Names served from kachery_tasks.dask on first use, so that importing kachery_tasks stays free of
#: dask and distributed.
_FROM_DASK = ("cached", "KacheryPlugin")


def __getattr__(name: str):
    if name in _FROM_DASK:
        from . import dask as _dask

        return getattr(_dask, name)
    raise AttributeError(f"module 'kachery_tasks' has no attribute {name!r}")

__all__ += [
    "ActionResult",
    "Job",
    "KacheryPlugin",
    "cached",
    "create_feed",
    "list_feeds",
    "load_feed",
    "local_feed",
    "Task",
    "TaskFailed",
    "action",
    "explain",
    "pure",
    "query",
    "recheck",
    "rerun",
    "stale",
]
