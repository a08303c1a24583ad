"""Content-addressed blobs on the local disk, written atomically and verified on read.

Layout (docs/files.md): ``<root>/sha256/ab/cd/<hex>`` holds the bytes whose SHA-256 is ``<hex>``;
beside it ``<hex>.c1.json`` (the chunk manifest of a file over 16 MiB) and ``<hex>.ok`` (the
verified stamp: size, mtime, ctime and inode of the blob when its hash last matched). Bytes are
streamed into ``<root>/tmp/`` (the hash is known only at the end), fsynced, then renamed into place,
so a blob's final name never holds partial bytes. A blob whose bytes no longer match is moved to
``<root>/quarantine/`` by the read that finds it, and that read is an error, never bad bytes.

Two kinds of read (docs/files.md, "Verification"): a path or a memory map (``verified_path``) must
take milliseconds, so it trusts a stamp that still matches; a read that goes through every byte
anyway (``read_bytes``, ``read_verified``) hashes as it reads and ignores the stamp, so it also
catches bit rot, which changes no stamp. ``verified_path(rehash=True)`` is the scrub (``kachery
verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..errors import IntegrityError, NotFoundError, as_store_full
from ..fs import make_dirs, remove_stale_files, share_fd, write_atomic
from .manifest import CHUNK_SIZE, ChunkHasher, Manifest
from .uris import check_sha256_hex

IO_BLOCK = 8 * 2**20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Stamp:
    """What changes when a blob's bytes may have. ctime is there because a user (or a tool that
    restores times) can set mtime back but not ctime; bit rot changes none of them."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class BlobStore:
    """The blobs of one home. Safe for many threads and processes at once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self._stamps: dict[str, Stamp] = {}
        self._lock = threading.Lock()

    # -- names -----------------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def _stamp_path(self, sha256: str) -> Path:
        return self.path(sha256).with_suffix(".ok")

    def manifest_path(self, sha256: str) -> Path:
        return self.path(sha256).with_suffix(".c1.json")

    # -- writing ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes | memoryview) -> str:
        """Store ``data``; returns its SHA-256 hex."""
        return self._put_blocks([memoryview(data)] if len(data) else [], progress=None, total=len(data))

    def put_file(self, src: Path, *, link: bool = False, progress: Progress | None = None) -> str:
        """Store the file at ``src`` by streaming it (never all in memory); returns its SHA-256 hex.

        With ``link=True`` the blob is a hard link to ``src`` where the file system allows: no copy,
        but editing ``src`` in place then damages the blob, which the next read detects.
        """
        src = Path(src)
        if link:
            linked = self._put_link(src, progress)
            if linked is not None:
                return linked
        with open(src, "rb") as fh:
            return self._put_blocks(_read_blocks(fh), progress=progress, total=os.fstat(fh.fileno()).st_size)

    def put_stream(self, blocks: Iterable[bytes], progress: Progress | None = None, *,
                   expected: str | None = None) -> str:
        """Store the concatenated ``blocks``. If the disk fills, the rest of ``blocks`` is counted
        (not written) so that the error can say how many bytes were needed: meant for streams of
        data already in memory (arrays), where counting costs nothing.

        With ``expected`` (bytes from elsewhere, as a download), bytes that do not hash to it are
        discarded, never stored under their own hash, and :class:`IntegrityError` is raised."""
        return self._put_blocks(blocks, progress=progress, expected=expected)

    def install_file(self, path: Path, sha256: str, manifest: Manifest | None) -> None:
        """Move the complete file at ``path`` into the store as blob ``sha256``: fsync, make it
        read-only, rename it into place (unless a sound copy is already there, then ``path`` goes).

        For a writer that assembles a blob itself (a resumed download writing chunks at their
        offsets) in a directory on the store's file system, and that **has checked** that the bytes
        of ``path`` hash to ``sha256`` (reading them back from ``path``) and holds it privately
        meanwhile. ``manifest`` is its c1 manifest (None for a file of at most one chunk)."""
        check_sha256_hex(sha256)
        path = Path(path)
        if manifest is not None and (manifest.sha256 != sha256 or manifest.size != os.stat(path).st_size):
            raise ValueError(f"the c1 manifest given for {sha256} describes another file")
        fd = os.open(path, os.O_RDONLY)
        try:
            if not self._valid_existing(sha256):
                os.fsync(fd)
                share_fd(fd, 0o444)
        except OSError as exc:
            raise self._full(exc, None) from exc
        finally:
            os.close(fd)
        self._install(path, sha256, manifest)

    def _new_tmp(self) -> tuple[int, str]:
        # not fs.write_atomic: the name is known only once the stream is hashed, and a duplicate skips the fsync
        make_dirs(self.tmp_dir)
        return tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-")

    def _put_blocks(self, blocks: Iterable[bytes | memoryview], progress: Progress | None,
                    total: int | None = None, expected: str | None = None) -> str:
        """Stream ``blocks`` into a temp file, then install it. On any failure the temp file is
        removed; a full, over-quota or read-only disk is a :class:`StoreFullError` (one line)."""
        stream = iter(blocks)
        offered = 0
        try:
            fd, tmp = self._new_tmp()
        except OSError as exc:
            raise self._full(exc, total, stream, offered) from exc
        sha = hashlib.sha256()
        chunks = ChunkHasher()
        try:
            # Writing runs in a second thread while this one hashes the next block: hashlib and
            # os.write both release the GIL, so the copy costs little more than the hash.
            with ThreadPoolExecutor(max_workers=1) as writer:
                pending: Future | None = None
                for block in stream:
                    offered += len(block)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(_write_all, fd, block)
                    sha.update(block)
                    chunks.update(block)
                    if progress is not None:
                        progress(len(block))
                if pending is not None:
                    pending.result()
            digest = sha.hexdigest()
            if expected is not None and digest != expected:
                raise IntegrityError(f"received {offered} bytes hashing to {digest}, not the expected "
                                     f"{expected}; discarded")
            # Already stored and sound: drop the temp file unsynced, so a re-store costs no disk flush.
            duplicate = self._valid_existing(digest)
            if not duplicate:
                os.fsync(fd)
                share_fd(fd, 0o444)
        except BaseException as exc:
            with suppress(OSError):
                os.close(fd)
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._full(exc, total, stream, offered) from exc
            raise
        try:
            os.close(fd)  # a network file system may report a full disk only here
        except OSError as exc:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise self._full(exc, total, stream, offered) from exc
        if duplicate:
            os.unlink(tmp)
            return digest
        self._install(Path(tmp), digest, chunks.manifest(digest))
        return digest

    def _full(self, exc: OSError, total: int | None, rest: Iterator[bytes | memoryview] | None = None,
              offered: int = 0) -> OSError:
        """``exc`` as a StoreFullError saying how many bytes the blob needs, or ``exc`` itself if it
        is another error. Without a known total, what was not yet written is counted."""
        if total is None and rest is not None:
            try:
                total = offered + sum(len(block) for block in rest)
            except Exception:  # counting is a courtesy; the error stands without it
                total = offered or None
        return as_store_full(exc, self.root.parent, total) or exc

    def _put_link(self, src: Path, progress: Progress | None) -> str | None:
        sha = hashlib.sha256()
        chunks = ChunkHasher()
        with open(src, "rb") as fh:
            for block in _read_blocks(fh):
                sha.update(block)
                chunks.update(block)
                if progress is not None:
                    progress(len(block))
        digest = sha.hexdigest()
        if self._valid_existing(digest):
            return digest
        make_dirs(self.tmp_dir)
        # a hard link of the source, not a write: fs.write_atomic would copy the bytes this avoids
        tmp = self.tmp_dir / f"link-{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"
        try:
            os.link(src, tmp)
        except OSError:
            return None  # another file system, or links not allowed: copy instead
        if _sha256_file(tmp) != digest:  # the source changed while we hashed it
            tmp.unlink()
            return None
        self._install(tmp, digest, chunks.manifest(digest))
        return digest

    def _install(self, tmp: Path, digest: str, manifest: Manifest | None) -> None:
        """Rename a complete temp file into place, unless a sound copy is already there.

        On failure (a full disk can refuse the new directory, the manifest or even the rename) the
        temp file goes, and so does a manifest written for a blob that did not arrive."""
        final = self.path(digest)
        if self._valid_existing(digest):
            tmp.unlink()
            return
        try:
            make_dirs(final.parent)
            if manifest is not None:
                write_atomic(self.manifest_path(digest), manifest.to_json().encode(), tmp_dir=self.tmp_dir)
            os.replace(tmp, final)  # replaces a damaged blob of that name, if any
        except BaseException as exc:
            size = None
            with suppress(OSError):
                size = os.stat(tmp).st_size
                os.unlink(tmp)
            if manifest is not None and not final.exists():
                with suppress(OSError):
                    os.unlink(self.manifest_path(digest))
            if isinstance(exc, OSError):
                raise self._full(exc, size) from exc
            raise
        self._write_stamp(digest, Stamp.of(os.stat(final)))

    def _valid_existing(self, digest: str) -> bool:
        """True if a blob of that name exists and is sound (a damaged one is quarantined)."""
        try:
            self.verified_path(digest)
        except (NotFoundError, IntegrityError):
            return False
        return True

    # -- reading ---------------------------------------------------------------------------------
    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise self._not_found(sha256) from None

    def verified_path(self, sha256: str, *, rehash: bool = False) -> Path:
        """Path of the blob after checking that its bytes match their hash.

        A blob whose size, mtime, ctime and inode equal its verified stamp is not hashed again (so
        memory maps of big results take milliseconds); ``rehash=True`` hashes regardless.
        """
        check_sha256_hex(sha256)
        path = self.path(sha256)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise self._not_found(sha256) from None
        current = Stamp.of(st)
        if not rehash and self._read_stamp(sha256) == current:
            return path
        if _sha256_file(path) != sha256:
            raise self._damaged(sha256)
        self._write_stamp(sha256, Stamp.of(os.stat(path)))
        return path

    def scrub(self, sha256: str, progress: Progress | None = None) -> int:
        """Hash every byte of the blob whatever its stamp says (``kachery verify``: the scrub that
        finds bit rot under an unchanged stamp), telling ``progress`` the bytes as they are hashed,
        so a bar moves within a large blob; returns its size. A mismatch quarantines the blob and
        raises :class:`IntegrityError`; a match refreshes the stamp unless the blob changed meanwhile."""
        with self._open(sha256) as fh:
            before = os.fstat(fh.fileno())
            digest = _sha256_fh(fh, progress)
            after = os.fstat(fh.fileno())
        if digest != sha256:
            raise self._damaged(sha256)
        self._vouch(sha256, before, after)
        return before.st_size

    def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes, hashed as they are read: none is returned unless all match.

        The stamp is not consulted: a reader of every byte pays only the hash to catch what no stamp
        sees (bit rot under the same size and times). A match refreshes the stamp, so a later map or
        path of the same blob skips the hash."""
        with self._open(sha256) as fh:
            before = os.fstat(fh.fileno())
            data = fh.read()
            after = os.fstat(fh.fileno())
        if hashlib.sha256(data).hexdigest() != sha256:
            raise self._damaged(sha256)
        self._vouch(sha256, before, after)
        return data

    def read_verified(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in blocks for a stream (``kachery cat``, ``load -o``), each checked
        before it is yielded, so that damage found on the way never reaches the consumer.

        A blob of at most one chunk (16 MiB) is read whole and checked against its SHA-256. A larger
        one goes chunk by chunk, each checked against the xxh3-128 of its c1 manifest; without a
        usable manifest it is hashed whole first (a second read). In both cases the SHA-256 of the
        whole is checked at the end: a mismatch there (a forgery that rewrote the manifest too, or a
        change between the two reads) raises :class:`IntegrityError` after blocks were yielded.
        """
        with self._open(sha256) as fh:
            before = os.fstat(fh.fileno())
            if before.st_size <= CHUNK_SIZE:
                data = fh.read()
                after = os.fstat(fh.fileno())
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise self._damaged(sha256)
                self._vouch(sha256, before, after)
                if data:
                    yield data
                return
            chunks = self._chunk_hashes(sha256, before.st_size)
            if chunks is None:
                if _sha256_fh(fh) != sha256:
                    raise self._damaged(sha256)
                fh.seek(0)
            sha = hashlib.sha256()
            offset = 0
            while block := _read_exact(fh, CHUNK_SIZE):
                if chunks is not None and xxhash.xxh3_128(block).hexdigest() != chunks.get(offset):
                    fh.seek(0)
                    if _sha256_fh(fh) != sha256:
                        raise self._damaged(sha256)
                    fh.seek(offset + len(block))
                    chunks = None  # the blob is sound, its manifest is not: the SHA-256 at the end decides
                sha.update(block)
                offset += len(block)
                yield block
            after = os.fstat(fh.fileno())
        if sha.hexdigest() != sha256:
            raise self._damaged(sha256)
        self._vouch(sha256, before, after)

    def manifest(self, sha256: str) -> Manifest | None:
        try:
            return Manifest.from_json(self.manifest_path(sha256).read_text())
        except FileNotFoundError:
            return None

    def _chunk_hashes(self, sha256: str, size: int) -> dict[int, str] | None:
        """xxh3-128 by chunk offset from the blob's manifest, if it describes a file of this hash
        and size cut in whole chunks; None if there is none or it is unreadable (then the caller
        hashes the blob whole instead, so a bad manifest never fails a read of a sound blob)."""
        try:
            manifest = self.manifest(sha256)
        except (ValueError, KeyError, TypeError):
            return None
        if manifest is None or manifest.sha256 != sha256 or manifest.size != size:
            return None
        expected = [(offset, min(CHUNK_SIZE, size - offset)) for offset in range(0, size, CHUNK_SIZE)]
        if [(c.offset, c.size) for c in manifest.chunks] != expected:
            return None
        return {c.offset: c.xxh3_128 for c in manifest.chunks}

    def iter_hashes(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for a in sorted(base.iterdir()):
            for b in sorted(a.iterdir()):
                for f in sorted(b.iterdir()):
                    if len(f.name) == 64:
                        yield f.name

    def total_size(self) -> tuple[int, int]:
        """Number of blobs and their total bytes."""
        count = size = 0
        for h in self.iter_hashes():
            count += 1
            with suppress(FileNotFoundError):
                size += self.path(h).stat().st_size
        return count, size

    def clean_tmp(self, older_than_s: float = 6 * 3600) -> int:
        """Remove temp files left by writers that died (a live writer keeps its file's mtime fresh:
        it writes at least every block). Returns how many were removed."""
        return remove_stale_files(self.tmp_dir, older_than_s)

    def _open(self, sha256: str):
        check_sha256_hex(sha256)
        try:
            return open(self.path(sha256), "rb", buffering=0)  # noqa: SIM115 - callers close it
        except FileNotFoundError:
            raise self._not_found(sha256) from None

    def _vouch(self, sha256: str, before: os.stat_result, after: os.stat_result) -> None:
        """Stamp a blob whose bytes were just read and matched, unless it changed (or was replaced)
        while they were read, or its stamp already says so."""
        try:
            now = Stamp.of(os.stat(self.path(sha256)))
        except FileNotFoundError:
            return
        if Stamp.of(before) == Stamp.of(after) == now and self._read_stamp(sha256) != now:
            self._write_stamp(sha256, now)

    @staticmethod
    def _not_found(sha256: str) -> NotFoundError:
        return NotFoundError(f"sha256://{sha256} is not found in this node's store")

    # -- damage ----------------------------------------------------------------------------------
    def _damaged(self, sha256: str) -> IntegrityError:
        """Quarantine the blob; the error to raise (one line)."""
        where = self.quarantine(sha256)
        return IntegrityError(f"sha256://{sha256}: stored bytes do not match their hash; moved to {where}. "
                              "Store the file again or fetch it from another source")

    def quarantine(self, sha256: str) -> Path:
        """Move a damaged blob aside (kept for inspection, never served) and forget its stamp."""
        make_dirs(self.quarantine_dir)
        target = self.quarantine_dir / f"{sha256}.{time.time_ns()}"
        with self._lock:
            self._stamps.pop(sha256, None)
        with suppress(FileNotFoundError):
            os.unlink(self._stamp_path(sha256))
        try:  # a move of the stored blob, not a write: no fs.write_atomic
            os.replace(self.path(sha256), target)
        except FileNotFoundError:
            pass
        except OSError:  # a read-only store: the bad copy stays, and every read keeps refusing it
            return self.path(sha256)
        return target

    # -- stamps ----------------------------------------------------------------------------------
    def _read_stamp(self, sha256: str) -> Stamp | None:
        stamp = self._stamps.get(sha256)
        if stamp is not None:
            return stamp
        try:
            raw = json.loads(self._stamp_path(sha256).read_text())
            stamp = Stamp(raw["size"], raw["mtime_ns"], raw["ctime_ns"], raw["ino"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None  # none, torn, or written before stamps had ctime_ns: unverified, hash once
        with self._lock:
            self._stamps[sha256] = stamp
        return stamp

    def _write_stamp(self, sha256: str, stamp: Stamp) -> None:
        with self._lock:
            self._stamps[sha256] = stamp
        data = json.dumps({"size": stamp.size, "mtime_ns": stamp.mtime_ns, "ctime_ns": stamp.ctime_ns,
                           "ino": stamp.ino}).encode()
        try:
            write_atomic(self._stamp_path(sha256), data, tmp_dir=self.tmp_dir)
        except OSError:
            pass  # a read-only store still verifies; it just cannot remember that it did


def _write_all(fd: int, block: bytes | memoryview) -> None:
    view = memoryview(block)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_blocks(fh) -> Iterator[bytes]:
    while True:
        block = fh.read(IO_BLOCK)
        if not block:
            return
        yield block


def _sha256_file(path: Path) -> str:
    with open(path, "rb", buffering=0) as fh:
        return _sha256_fh(fh)


def _sha256_fh(fh, progress: Progress | None = None) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(IO_BLOCK)
    view = memoryview(buffer)
    while n := fh.readinto(buffer):
        sha.update(view[:n])
        if progress is not None:
            progress(n)
    return sha.hexdigest()


def _read_exact(fh, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at the end of the file (a read may return less)."""
    block = fh.read(size)
    if not block or len(block) == size:
        return block
    parts = [block]
    got = len(block)
    while got < size and (more := fh.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


__all__ = ["BlobStore", "CHUNK_SIZE", "Stamp"]
