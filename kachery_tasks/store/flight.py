"""Single flight: one process computes a task id, the others wait for its record.

The store hands out these locks by name (``RecordStore.lock(task_id)``, ``RecordStore.action_lock``);
the lock files live under ``<home>/tasks/locks/``.

The lock is a kernel lock that its holder cannot outlive: the kernel drops it the moment the
holding process dies, even by SIGKILL, so a waiter takes over at once, with no clock to trust and no
heartbeat to miss. On NFSv4 it is held under the protocol's own lease, which expires when the
holder's host stops renewing it. A waiter that gets the lock checks for the record first: if the
holder finished, there is nothing to compute.

On Linux the lock is an "open file description" byte-range lock (``F_OFD_SETLKW``) on one byte of
``<locks>/flight.lock``, the byte named by the task id: taking and dropping it costs about 5 µs and
creates nothing, where a lock file per task (create, then unlink: two journaled changes of a
directory) cost 50 µs and more, a good part of the first run of a graph of tiny tasks. Two ids
share a byte with odds of 2^-60: they would then take turns, which is slower, never wrong.
Elsewhere (macOS) the lock is an ``flock`` on a file per task.

A computation still running :data:`SHOW_AFTER_S` after it took its lock shows itself in
``<locks>/<ab>/<id>.lock`` (pid, host, start time), a file it holds with ``flock`` until it ends: that
is what ``kachery task ls --running`` lists (:func:`running`). Without OFD locks that file is the
lock, written at once.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import json
import os
import socket
import struct
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import xxhash

from ..errors import UserError
from ..fs import make_dirs, share_fd

_INFO_BYTES = 256
#: A holder running longer than this writes its info file (shorter ones never touch the disk).
SHOW_AFTER_S = 0.5
_TICK_S = 0.1
#: OFD locks: Linux only (struct flock laid out for its 64-bit ABIs: type, whence, start, len, pid).
OFD = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLKW") and struct.calcsize("P") == 8
_FLOCK = struct.Struct("hhxxxxqqixxxx")
_FLIGHT = "flight.lock"


def _byte_of(task_id: str) -> int:
    """The byte of the flight file that stands for ``task_id`` (60 bits: any off_t holds it)."""
    return xxhash.xxh64_intdigest(task_id.encode()) >> 4


class FlightLock:
    def __init__(self, locks_dir: Path, task_id: str):
        self.locks_dir = locks_dir
        self.task_id = task_id
        self.path = locks_dir / task_id[:2] / f"{task_id}.lock"
        self._fd: int | None = None  # the flight file (OFD), or the task's lock file (flock)
        self._info_fd: int | None = None
        self._since = 0.0
        self._mutex = threading.Lock()  # between release() and the watcher showing the holder

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking``, wait while another process computes."""
        if not OFD:
            return self._acquire_file(blocking)
        fd = _open_creating(self.locks_dir / _FLIGHT)
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _byte_of(self.task_id), 1, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            os.close(fd)
            if not blocking and exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._since = time.time()
        _WATCHER.watch(self)
        return True

    def release(self, *, done: bool) -> None:
        """Drop the lock (``done``: a record now exists, so the per-task file may go too).

        The lock is released explicitly before the descriptor is closed: a child forked by the task
        shares the descriptor, and would otherwise keep the lock until it exits.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if not OFD:
            self._release_file(fd, done)
            return
        with self._mutex:
            info_fd, self._info_fd = self._info_fd, None
        if info_fd is not None:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
            fcntl.flock(info_fd, fcntl.LOCK_UN)
            os.close(info_fd)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, _byte_of(self.task_id), 1, 0))
        os.close(fd)

    def __enter__(self) -> FlightLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release(done=False)

    # -- the holder's info file --------------------------------------------------------------------
    def show(self) -> None:
        """Write the info file of a holder that is still computing (called by the watcher)."""
        with self._mutex:
            if self._fd is None or self._info_fd is not None:
                return
            try:
                fd = _open_creating(self.path)
            except (OSError, UserError):
                return  # a read-only or full disk, another user's file: the computation goes on unlisted
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _write_info(fd, self._since)
            except OSError:  # held by a process of an older version, which lists it itself
                os.close(fd)
                return
            self._info_fd = fd

    # -- without OFD locks: the per-task file is the lock --------------------------------------------
    def _acquire_file(self, blocking: bool) -> bool:
        fd = _open_creating(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        with suppress(OSError):
            _write_info(fd, time.time())
        return True

    def _release_file(self, fd: int, done: bool) -> None:
        # Removing is safe only once the record exists: anyone who then takes a lock, on this inode
        # or on a new file of the same name, finds the record and computes nothing.
        if done:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_creating(path: Path) -> int:
    """``path`` opened for locking, created group-writable if missing (whatever the umask: in a
    home shared by a group every member must be able to lock it)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    for _ in range(4):  # other threads and processes create it, or its directory, at the same time
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        except PermissionError:
            raise UserError(
                f"cannot open {path} to take a task lock (permission denied); in a home shared by a "
                "group, set shared_group (kachery node init --shared-group GROUP) and make the existing "
                "lock files group-writable") from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o664)
        except FileNotFoundError:  # the first lock in this directory
            make_dirs(path.parent)
            continue
        except FileExistsError:
            continue
        share_fd(fd, 0o664)
        return fd
    return os.open(path, flags)


def _write_info(fd: int, since: float) -> None:
    info = json.dumps({"pid": os.getpid(), "host": _host(), "started": since}).encode()
    # padded in place, never truncated: on ext4 a truncated-then-written file is flushed to disk at
    # close (auto_da_alloc), which would cost a disk write
    os.pwrite(fd, info.ljust(_INFO_BYTES), 0)


class _Watcher:
    """One daemon thread that shows the holders still computing :data:`SHOW_AFTER_S` after they
    took their lock (give or take a tick; a timer per lock would start a thread per task)."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[float, FlightLock]] = collections.deque()
        self._thread: threading.Thread | None = None

    def watch(self, lock: FlightLock) -> None:
        with self._cond:
            self._queue.append((time.monotonic() + SHOW_AFTER_S, lock))  # deadlines in order
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kachery-task-locks", daemon=True)
                self._thread.start()
            if len(self._queue) == 1:
                self._cond.notify()  # the thread waits only while the queue is empty

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                now = time.monotonic()
                due = []
                while self._queue and self._queue[0][0] <= now:
                    due.append(self._queue.popleft()[1])
            for lock in due:
                if lock._fd is not None:
                    lock.show()
            # in ticks, not at each deadline: a graph of tiny tasks would wake this thread (and
            # take the GIL from the computation) once per task
            time.sleep(_TICK_S)


_WATCHER = _Watcher()


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return socket.gethostname()


def running(locks_dir: Path) -> list[dict]:
    """The task ids being computed right now in this home, with holder info: those whose info file
    is held (with OFD locks, computations that have run for :data:`SHOW_AFTER_S` or more)."""
    found = []
    for path in sorted(locks_dir.glob("*/*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: someone computes it
                try:
                    info = json.loads(os.pread(fd, _INFO_BYTES, 0).decode().strip() or "{}")
                except ValueError:
                    info = {}
                found.append({"task_id": path.stem, **info})
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return found
