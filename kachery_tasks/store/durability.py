"""Group commit: task records of cheap computations reach the disk together, within a window.

An ``fsync`` per record costs 0.2–0.5 ms, more than a small task takes to compute, and made the
first run of a graph of tiny tasks several times slower than the computation itself. A record is
therefore written with a rename, which makes it atomic and visible to every process at once and
survives any *process* crash (the data is in the kernel's page cache), and the file system is
synced for many records at once, at most ``record_sync_seconds`` later (one ``syncfs``).

What a *machine* crash (power loss, kernel panic) inside that window can do: a record comes back
missing, empty or zero-filled. A reader treats all of these as absent (records.py sets an
unparsable one aside), so the task is computed again; a wrong result is never served. Only records
of computations shorter than the window are deferred, so such a crash costs at most about one
window of compute per worker. Longer computations, blobs, feeds and action logs are fsynced before
the call returns, as before.

A full disk is nearly always reported by the ``write`` itself (local file systems reserve space when
a page is dirtied), so a record that does not fit is never renamed into place (the task engine then
returns the value with a ``StoreFullWarning``). Where the disk reports it only at writeback (network
file systems, thin provisioning), ``syncfs`` fails: that is logged as a warning naming the home,
because those records would not survive a machine crash; they read correctly until then.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import logging
import multiprocessing.util
import os
import sys
import threading
import time

from ..errors import FULL_ERRNOS, as_store_full

log = logging.getLogger(__name__)

#: What ``syncfs`` reports when the disk could not take pages already written (Linux >= 5.8).
_WRITEBACK_ERRNOS = FULL_ERRNOS | {errno.EIO}


def _load_syncfs():
    """libc's ``syncfs(fd)`` (Linux): one journal commit for every file written on that file system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def sync_filesystem(directory: str) -> None:
    """Make everything written so far on ``directory``'s file system durable."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed on {directory}: {os.strerror(err)}")
    finally:
        os.close(fd)


class GroupCommit:
    """Directories with writes not yet synced, and a daemon thread that syncs them within ``window``.

    ``window`` is read by the writer at each deferral (config ``record_sync_seconds``); the thread
    wakes at the deadline of the oldest pending write. ``flush()`` syncs at once; it also runs at
    interpreter exit and at the exit of a multiprocessing child, and in a forked child the
    parent's pending writes stay the parent's.
    """

    def __init__(self) -> None:
        self._reset()
        atexit.register(self.flush)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[str, float] = {}  # directory -> deadline of its oldest unsynced write
        self._thread: threading.Thread | None = None
        self.syncs = 0

    def defer(self, directory: str, window: float) -> None:
        """Note a write under ``directory`` that must be durable within ``window`` seconds."""
        deadline = time.monotonic() + window
        with self._lock:
            if directory in self._pending:
                return  # an earlier deadline covers this write too
            self._pending[directory] = deadline
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kachery-group-commit", daemon=True)
                self._thread.start()
                _flush_at_process_exit(self)
            self._wake.notify()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Sync every pending directory now."""
        with self._lock:
            due = list(self._pending)
            self._pending.clear()
        self._sync(due)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._wake.wait()
                now = time.monotonic()
                due = [d for d, deadline in self._pending.items() if deadline <= now]
                if not due:
                    self._wake.wait(min(self._pending.values()) - now)
                    continue
                for d in due:
                    del self._pending[d]
            self._sync(due)

    def _sync(self, directories: list[str]) -> None:
        for directory in directories:
            try:
                sync_filesystem(directory)
            except OSError as exc:
                if exc.errno in _WRITEBACK_ERRNOS:
                    # The records are visible and correct now; the disk refused to keep some of
                    # them. After a machine crash such a record reads as absent: a recompute.
                    log.warning("task records written under %s since the last sync may not survive a machine "
                                "crash (they would then read as absent and be recomputed): %s",
                                directory, as_store_full(exc, os.path.dirname(directory)) or exc)
                else:  # e.g. the home was removed: nothing left there to make durable
                    log.debug("group commit of %s skipped: %s", directory, exc)
            self.syncs += 1


def _flush_at_process_exit(commit: GroupCommit) -> None:
    """Worker processes of multiprocessing (Dask's process pool, distributed's nannies) end with
    ``os._exit``, which skips atexit but runs multiprocessing's own finalizers: flush there too."""
    multiprocessing.util.Finalize(commit, commit.flush, exitpriority=100)


#: The process's one group commit.
GROUP_COMMIT = GroupCommit()
