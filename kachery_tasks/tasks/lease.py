"""Single flight: one process computes a task id, the others wait for its record.

The lock is an OS file lock (``flock``) on ``<home>/tasks/locks/<ab>/<id>.lock``. The kernel holds
it for the computing process and drops it the moment that process dies, even by SIGKILL, so a waiter
takes over at once, with no clock to trust and no heartbeat to miss. On NFSv4 the same lock is held
by a protocol lease that expires when the holder's host stops renewing it. A waiter that gets the
lock checks for the record first: if the holder finished, there is nothing to compute.

The holder writes its pid, host and start time into the file, for ``kachery task ls --running``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from contextlib import suppress
from pathlib import Path

from ..store.fs import make_dirs

_INFO_BYTES = 256


class TaskLock:
    def __init__(self, locks_dir: Path, task_id: str):
        self.path = locks_dir / task_id[:2] / f"{task_id}.lock"
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking``, wait while another process computes."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        except FileNotFoundError:  # first lock in this directory
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        info = json.dumps({"pid": os.getpid(), "host": _host(), "started": time.time()}).encode()
        # padded in place, never truncated: on ext4 a truncated-then-written file is flushed to disk
        # at close (auto_da_alloc), which would cost a disk write per computed task
        with suppress(OSError):
            os.pwrite(fd, info.ljust(_INFO_BYTES), 0)
        return True

    def release(self, *, done: bool) -> None:
        """Drop the lock; ``done`` (a record now exists) also removes the file.

        Removing is safe only once the record exists: anyone who then takes a lock, on this inode
        or on a new file of the same name, finds the record and computes nothing.
        """
        if self._fd is None:
            return
        if done:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> TaskLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release(done=False)


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return socket.gethostname()


def running(locks_dir: Path) -> list[dict]:
    """The task ids being computed right now in this home (their locks are held), with holder info."""
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

