"""A bucket in a directory (``file:///abs/path``): the embedded default, correct on NFS and for
several Unix users sharing a group.

Layout: the object under key ``a/b/c`` is the file ``<root>/a/b/c`` (read-only, mode 0444; group
sharing as for the store, by config ``shared_group`` through :mod:`kachery_tasks.fs`). Beside the
objects, ``<root>/.kt/`` (a key's first part may not be ``.kt``) holds

- ``tmp/``: writers stream into a temp file here (same file system as the objects), fsync it, and
  only then give it its final name. Temp files of writers that were killed are removed when they
  are older than ``stale_temp_seconds`` (at open). A listing never sees them.
- ``locks/<xx>.lock``: 256 lock files; a key's compare-and-swap and delete hold an exclusive
  ``fcntl`` lock on the one its SHA-256 picks (POSIX locks work across NFS clients through the
  lock manager). Within a process a thread lock goes with it, since POSIX locks are per process,
  and each lock file is opened once per process, since closing any descriptor of a file drops
  the process's locks on it.
- ``gen/<xx>/<sha256 of key>``: the generation sidecar of a key, ``"<generation> <inode>"``.

**Create-if-absent** (:meth:`write`) takes no lock: ``os.link(temp, final)`` is atomic and fails if
the name exists, on local file systems and on NFS (where a lost reply is recognised by the temp's
link count, :func:`kachery_tasks.fs.write_atomic`). So content-addressed writes never wait for
each other.

**Generations.** Modification times are no generation: NFS servers round them, clocks differ, and
two writes in one tick collide. Nor is the inode alone, since inodes are reused. The generation is
a per-key counter in the sidecar, bound to the inode of the object it describes:

- no object: the key does not exist (generation 0);
- an object and no sidecar: generation 1 (content-addressed objects never get a sidecar);
- sidecar ``g ino`` and the object's inode is ``ino``: generation ``g``;
- otherwise ``g + 1``: the one change that can happen without the sidecar following is a commit
  interrupted between its two renames (or a create after a delete's tombstone, ``ino`` = 0).

A compare-and-swap (under the key's lock) first makes the sidecar describe the current object if
it does not (so an earlier interrupted commit is settled before a new one starts), then renames the
new object over the old one, then renames the new sidecar ``g+1 new-inode`` into place. A reader
(no lock) reads the sidecar first and then opens the object: it may see a generation older than
the bytes it reads next, never newer, so a compare-and-swap based on what it read cannot overwrite
a version it did not see. A delete writes the tombstone ``g 0`` before it unlinks, and the sidecar
stays, so a generation is never reused for a key after a delete and recreate. Opening (not
``stat``-ing) the object makes NFS revalidate it (close-to-open consistency).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..fs import TEMP_PREFIX, make_dirs, remove_stale_files, share_fd, write_atomic
from .base import (
    RESERVED_PART,
    Bucket,
    BucketError,
    CountedBlocks,
    Data,
    NotFound,
    ObjectInfo,
    PermissionDenied,
    check_key,
    check_prefix,
    check_range,
    iter_data,
    join_data,
    precondition_failed,
)

READ_BLOCK = 2**20
#: A temp file untouched this long belongs to a writer that died (a live writer keeps writing it).
STALE_TEMP_SECONDS = 6 * 3600
#: exists_many lists a directory once instead of opening each key when it asks this many in it.
LIST_DIR_MIN_KEYS = 8


class DirectoryBucket(Bucket):
    def __init__(self, root: str | os.PathLike, *, read_only: bool = False, create: bool = False,
                 stale_temp_seconds: float = STALE_TEMP_SECONDS):
        root = Path(root)
        super().__init__(root.absolute().as_uri(), read_only=read_only)
        if create and not read_only:
            make_dirs(root)
        if not root.is_dir():
            raise UserError(f"bucket {self.uri}: no such directory; create it (mkdir -p {root}) or fix the URI")
        self.root = root.absolute()
        self.meta = self.root / RESERVED_PART
        self.tmp_dir = self.meta / "tmp"
        if not read_only:
            with self._os_errors("(open)", "write"):
                for d in (self.tmp_dir, self.meta / "locks", self.meta / "gen"):
                    make_dirs(d)
                remove_stale_files(self.tmp_dir, stale_temp_seconds, TEMP_PREFIX)

    # -- reading -----------------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo | None:
        check_key(key, self.uri)
        side = self._read_side(key)  # before the object: see the module docstring
        st = self._open_stat(key)
        return None if st is None else self._info(key, st, side)

    def exists_many(self, keys: Iterable[str]) -> dict[str, ObjectInfo]:
        by_dir: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            check_key(key, self.uri)
            by_dir.setdefault(key.rpartition("/")[0], []).append(key)
        found = {}
        for directory, group in by_dir.items():
            if len(group) >= LIST_DIR_MIN_KEYS:  # one READDIR instead of a lookup per key on NFS
                try:
                    names = set(os.listdir(self.root / directory))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                group = [k for k in group if k.rpartition("/")[2] in names]
            for key in group:
                info = self.stat(key)
                if info is not None:
                    found[key] = info
        return found

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        check_key(key, self.uri)
        check_range(start, end)
        try:
            fd = os.open(self.root / key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{self.uri}: no object {key}", self.uri, key) from None
        except PermissionError:
            raise self._denied(key, "read") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"{self.uri}: no object {key}", self.uri, key)
        return self._blocks(fd, start, end)

    @staticmethod
    def _blocks(fd: int, start: int, end: int | None) -> Iterator[bytes]:
        try:
            pos = start
            while end is None or pos < end:
                n = READ_BLOCK if end is None else min(READ_BLOCK, end - pos)
                block = os.pread(fd, n, pos)
                if not block:
                    return
                pos += len(block)
                yield block
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix, self.uri)
        base = prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root / base if base else self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if not rel and RESERVED_PART in dirnames:
                dirnames.remove(RESERVED_PART)
            keys.extend(k for k in (rel + name for name in filenames) if k.startswith(prefix))
        for key in sorted(keys, key=lambda k: k.encode("utf-8", "surrogateescape")):
            info = self.stat(key)
            if info is not None:
                yield info

    # -- writing -----------------------------------------------------------------------------------
    def write(self, key: str, data: Data) -> ObjectInfo:
        self._check_writable(key)
        counted = CountedBlocks(iter_data(data))
        self._link_new(key, counted)
        st = self._open_stat(key)
        gen = 1 if st is None else self._info(key, st, self._read_side(key)).generation
        return ObjectInfo(key, counted.n, gen, None if st is None else st.st_mtime)

    def write_if_generation(self, key: str, data: bytes, generation: int | None) -> ObjectInfo:
        self._check_writable(key)
        data = join_data(data)
        expected = generation or 0
        with self._locked(key):
            side = self._read_side(key)
            st = self._open_stat(key)
            current = None if st is None else self._info(key, st, side)
            if (0 if current is None else current.generation) != expected:
                raise precondition_failed(self.uri, key, generation, current)
            if current is None:
                if side is not None and side[1] != 0:  # an object vanished outside a delete
                    self._write_side(key, side[0] + 1, 0)
                    side = (side[0] + 1, 0)
                self._link_new(key, [data])  # lock-free writers may race us: link decides
                new = 1 if side is None else side[0] + 1
            else:
                if side is None or side[1] != st.st_ino:  # settle the current version first
                    self._write_side(key, current.generation, st.st_ino)
                with self._os_errors(key, "write"):
                    write_atomic(self.root / key, data, mode=0o444, overwrite=True, tmp_dir=self.tmp_dir)
                new = current.generation + 1
                self._write_side(key, new, self._open_stat(key).st_ino)
            st = self._open_stat(key)
        return ObjectInfo(key, len(data), new, None if st is None else st.st_mtime)

    def delete(self, key: str) -> bool:
        self._check_writable(key)
        with self._locked(key):
            side = self._read_side(key)
            st = self._open_stat(key)
            if st is None:
                return False
            self._write_side(key, self._info(key, st, side).generation, 0)  # tombstone first
            with self._os_errors(key, "delete"):
                try:
                    os.unlink(self.root / key)
                except FileNotFoundError:
                    return False
        return True

    # -- helpers -----------------------------------------------------------------------------------
    def _info(self, key: str, st: os.stat_result, side: tuple[int, int] | None) -> ObjectInfo:
        if side is None:
            gen = 1
        else:
            gen = side[0] if side[1] == st.st_ino else side[0] + 1
        return ObjectInfo(key, st.st_size, gen, st.st_mtime)

    def _open_stat(self, key: str) -> os.stat_result | None:
        """The object's stat through open (NFS revalidates on open), None if there is none."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except PermissionError:
            raise self._denied(key, "read") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st if not stat.S_ISDIR(st.st_mode) else None

    def _side_path(self, key: str) -> Path:
        h = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self.meta / "gen" / h[:2] / h

    def _read_side(self, key: str) -> tuple[int, int] | None:
        try:
            text = self._side_path(key).read_text()
        except FileNotFoundError:
            return None
        try:
            gen, ino = text.split()
            return int(gen), int(ino)
        except ValueError:
            raise BucketError(f"{self.uri}: the generation file of {key} ({self._side_path(key)}) is damaged; "
                              "remove it (the key's generation restarts)", self.uri, key) from None

    def _write_side(self, key: str, gen: int, ino: int) -> None:
        with self._os_errors(key, "write"):
            write_atomic(self._side_path(key), f"{gen} {ino}\n".encode(), mode=0o664, tmp_dir=self.tmp_dir)

    def _link_new(self, key: str, blocks: Iterable[bytes]) -> None:
        with self._os_errors(key, "write"):
            try:
                write_atomic(self.root / key, blocks, mode=0o444, overwrite=False, tmp_dir=self.tmp_dir)
            except FileExistsError:
                raise precondition_failed(self.uri, key, 0, self.stat(key)) from None

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        stripe = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:2]
        path = os.path.realpath(self.meta / "locks" / f"{stripe}.lock")
        with self._os_errors(key, "lock"):
            thread_lock, fd = _lock_file(path)
        with thread_lock:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def _denied(self, key: str, action: str) -> PermissionDenied:
        return PermissionDenied(f"{self.uri}: permission denied to {action} {key}; the bucket's directories must "
                                "be writable (and files readable) by you or your shared group (config "
                                "shared_group)", self.uri, key)

    @contextmanager
    def _os_errors(self, key: str, action: str) -> Iterator[None]:
        try:
            yield
        except BucketError:
            raise
        except PermissionError:  # EACCES, EPERM: these credentials may not; one line naming what
            raise self._denied(key, action) from None
        except NotADirectoryError:
            raise BucketError(f"{self.uri}: cannot {action} {key}: a part of it is an object, and a "
                              "directory bucket cannot hold both a/b and a", self.uri, key) from None
        except IsADirectoryError:
            raise BucketError(f"{self.uri}: cannot {action} {key}: there are keys under {key}/, and a "
                              "directory bucket cannot hold both a/b and a", self.uri, key) from None
        except OSError as e:
            raise BucketError(f"{self.uri}: cannot {action} {key}: {e.strerror or e}", self.uri, key) from e


_lock_files: dict[str, tuple[threading.Lock, int]] = {}
_lock_files_lock = threading.Lock()


def _lock_file(path: str) -> tuple[threading.Lock, int]:
    """The thread lock and the descriptor (open for the life of the process) of a lock file."""
    with _lock_files_lock:
        found = _lock_files.get(path)
        if found is None or _lock_pid.get(path) != os.getpid():  # after a fork: locks are not inherited
            flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o664)
                share_fd(fd, 0o664)  # other users of a shared group lock it too
            except FileExistsError:
                fd = os.open(path, flags)
            found = _lock_files[path] = (threading.Lock(), fd)
            _lock_pid[path] = os.getpid()
        return found


_lock_pid: dict[str, int] = {}
