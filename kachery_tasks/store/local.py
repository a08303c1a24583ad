"""The store of one home: blobs, task records and mutables under one directory.

``current_store()`` returns the store of the home in force (``config.home()``), one object per
home per process, so two homes can be used side by side with ``config.set(home=...)``.
"""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path

from .. import config
from .blobs import BlobStore
from .mutables import Mutables
from .records import RecordStore


class LocalStore:
    def __init__(self, home: Path):
        self.home = Path(home)

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore(self.home / "store")

    @cached_property
    def records(self) -> RecordStore:
        return RecordStore(self.home / "tasks")

    @cached_property
    def mutables(self) -> Mutables:
        return Mutables(self.home / "mutables.sqlite")

    def __repr__(self) -> str:
        return f"LocalStore({str(self.home)!r})"


_stores: dict[str, LocalStore] = {}
_lock = threading.Lock()


def store_for(home: Path | str) -> LocalStore:
    """The store of ``home`` (an absolute path), one object per home per process."""
    key = str(home)
    found = _stores.get(key)
    if found is None:
        with _lock:
            found = _stores.setdefault(key, LocalStore(Path(key)))
    return found


def current_store() -> LocalStore:
    """The store of the home that the configuration in force names."""
    return store_for(config.home_str())
