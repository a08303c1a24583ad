"""kachery-tasks: a content-addressed, shareable result cache for Python tasks, files and feeds.

The public API lives here so that user code needs one import (``import kachery_tasks as kt``).
Importing this package must stay fast: it loads the configuration, the store and numpy, never
dask, distributed or pandas (those load where they are used). The task engine (kachery_tasks.tasks)
imports no dask; kachery_tasks.dask is imported on first use: ``kt.cached`` and ``kt.KacheryPlugin``
(``__getattr__`` below), ``f.delayed`` and ``rerun`` of many calls (the loader registered below).
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
from .feeds import create_feed, list_feeds, load_feed, local_feed
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
from .tasks import ActionResult, Job, Task, TaskFailed, action, explain, pure, query
from .tasks.dask_layer import register_loader
from .tasks.publish import publish
from .tasks.stale import recheck, rerun, stale

try:
    __version__ = _version("kachery-tasks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ActionResult",
    "CodecError",
    "ConfigError",
    "File",
    "IntegrityError",
    "InvalidURI",
    "Job",
    "KacheryError",
    "KacheryPlugin",
    "KacheryWarning",
    "NotFoundError",
    "ReadOnlyStoreError",
    "StaleResultWarning",
    "StoreFullError",
    "StoreFullWarning",
    "Task",
    "TaskFailed",
    "UnhashableArgument",
    "UserError",
    "__version__",
    "action",
    "cached",
    "config",
    "create_feed",
    "delete_mutable",
    "explain",
    "file_info",
    "get_mutable",
    "list_feeds",
    "load_bytes",
    "load_feed",
    "load_file",
    "load_json",
    "load_npy",
    "local_feed",
    "publish",
    "pure",
    "query",
    "recheck",
    "rerun",
    "set_mutable",
    "stale",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
]

#: Names served from kachery_tasks.dask on first use, so that importing kachery_tasks stays free of
#: dask and distributed.
_FROM_DASK = ("cached", "KacheryPlugin")


def _dask_layer():
    """kachery_tasks.dask, imported here on first use: importing it (dask, distributed) costs
    about half a second, which ``import kachery_tasks`` does not pay. It registers itself with the
    task engine as it is imported."""
    from . import dask

    return dask


register_loader(_dask_layer)


def __getattr__(name: str):
    if name in _FROM_DASK:
        return getattr(_dask_layer(), name)
    raise AttributeError(f"module 'kachery_tasks' has no attribute {name!r}")
