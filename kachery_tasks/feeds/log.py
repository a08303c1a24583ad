"""The verified in-memory index of one subfeed file.

A :class:`LogIndex` reads a subfeed's JSON-lines file incrementally and, for every complete line,
checks what makes the history trustworthy before the line is handed out:

* the line parses, has the message fields, and its ``seq`` is its position (a removed, duplicated
  or reordered line shows up here, at its seq);
* its ``prev`` is the SHA-256 of the line before (an altered line breaks the next one's ``prev``;
  the culprit is found by checking the two signatures);
* lines covered by a signed checkpoint are checked by the checkpoint's Merkle root when the index
  reaches its size (hashing speed); lines after the last known checkpoint are checked by signature
  and must be in canonical form.

It keeps the byte offset of every line, so ``messages(start, end)`` is one seek and one read, and a
:class:`~.merkle.MerkleLog`, so checkpoints and proofs cost O(log n). An incomplete last line is
never indexed: it is a torn append (or one in progress in another process); only the writer, holding
the lock, truncates it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from .checkpoints import Checkpoint
from .errors import FeedTamperError, ForkedFeedError
from .merkle import MerkleLog, leaf_hash
from .messages import ZERO_HASH, canonical, check_shape, signature_ok
from .storage import file_size, read_range

_CHUNK = 8 * 2**20


class LogIndex:
    """Offsets, Merkle levels and verification state of one subfeed file."""

    def __init__(self, feed_id: str, name: str, path: Path, cp_path: Path):
        self.feed_id, self.name, self.path, self.cp_path = feed_id, name, path, cp_path
        self.offsets: list[int] = [0]
        self.merkle = MerkleLog()
        self.last_hash = ZERO_HASH
        self._last_line: bytes | None = None
        self.checkpoints: dict[int, Checkpoint] = {}
        self._cp_read = 0
        self.max_cp = 0  # largest checkpoint size seen
        self.checked_cp = 0  # largest checkpoint size whose root matched
        self.torn_bytes = 0  # bytes of an incomplete last line
        self.sink: Callable[[dict], None] | None = None  # called with each verified message (replay)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def end(self) -> int:
        return self.offsets[-1]

    def _tamper(self, seq: int | None, reason: str, path: Path | None = None) -> FeedTamperError:
        return FeedTamperError(self.feed_id, self.name, seq, reason, str(path or self.path))

    # -- reading -----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Index and verify lines appended since the last call; returns how many were added."""
        self._read_checkpoints()  # first: every checkpoint seen has its messages already on disk
        before = len(self)
        size = file_size(self.path)
        if size < self.end:
            seq = next(i for i in range(len(self)) if self.offsets[i + 1] > size)
            raise self._tamper(seq, "is missing: the file was truncated after it was read")
        pos = self.end
        if pos < size:
            with open(self.path, "rb") as fh:
                while pos < size:
                    fh.seek(pos)
                    data = fh.read(min(_CHUNK, size - pos))
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        if pos + len(data) < size:  # a line longer than a chunk
                            data += fh.read(size - pos - len(data))
                            cut = data.rfind(b"\n")
                        if cut < 0:
                            break
                    for line in data[:cut].split(b"\n"):
                        self._add(line)
                    pos += cut + 1
        self.torn_bytes = size - self.end
        if self.max_cp > len(self):
            raise self._tamper(
                len(self),
                f"is missing: a signed checkpoint covers {self.max_cp} messages but the file holds "
                f"{len(self)} complete lines (truncated)",
            )
        return len(self) - before

    def _read_checkpoints(self) -> None:
        size = file_size(self.cp_path)
        if size < self._cp_read:
            raise self._tamper(None, "its checkpoint file shrank (checkpoints were removed)", self.cp_path)
        if size == self._cp_read:
            return
        with open(self.cp_path, "rb") as fh:
            fh.seek(self._cp_read)
            data = fh.read(size - self._cp_read)
        cut = data.rfind(b"\n")
        if cut < 0:
            return
        for line in data[:cut].split(b"\n"):
            try:
                cp = Checkpoint.from_dict(json.loads(line))
            except ValueError:
                cp = None
            if cp is None:
                raise self._tamper(None, "a checkpoint line is not a well-formed checkpoint", self.cp_path)
            if cp.subfeed != self.name or not cp.signed_by(self.feed_id):
                raise self._tamper(None, f"the checkpoint for size {cp.size} fails its signature", self.cp_path)
            self.add_checkpoint(cp)
        self._cp_read += cut + 1

    def add_checkpoint(self, cp: Checkpoint) -> None:
        """Take a checkpoint whose signature was checked; compare it at once if its size is indexed."""
        known = self.checkpoints.get(cp.size)
        if known is not None:
            if known.root != cp.root:
                raise ForkedFeedError(
                    f"feed {self.feed_id} subfeed {self.name!r} has two validly signed checkpoints for size "
                    f"{cp.size}; resolve with `kachery feed resolve`",
                    {"kind": "checkpoint", "subfeed": self.name, "seq": cp.size - 1,
                     "local": known.to_dict(), "remote": cp.to_dict()},
                )
            return
        self.checkpoints[cp.size] = cp
        self.max_cp = max(self.max_cp, cp.size)
        if cp.size <= len(self):
            self._check_root(cp)

    def _check_root(self, cp: Checkpoint) -> None:
        if self.merkle.root(cp.size).hex() == cp.root:
            self.checked_cp = max(self.checked_cp, cp.size)
            return
        # Find the culprit: the first message since the last matched checkpoint that fails its
        # signature. With every signature valid, the key signed two histories.
        start = max((s for s in self.checkpoints if s < cp.size and s <= self.checked_cp), default=0)
        for seq in range(start, cp.size):
            line = self.line(seq)
            if not _valid_line(self.feed_id, line):
                raise self._tamper(seq, "fails its signature or is not in canonical form (altered)")
        raise ForkedFeedError(
            f"feed {self.feed_id} subfeed {self.name!r}: the signed checkpoint for size {cp.size} does not match "
            "the validly signed messages stored here; resolve with `kachery feed resolve`",
            {"kind": "checkpoint", "subfeed": self.name, "seq": cp.size - 1,
             "local": {"size": cp.size, "root": self.merkle.root(cp.size).hex()}, "remote": cp.to_dict()},
        )

    def _add(self, line: bytes) -> None:
        seq = len(self)
        try:
            msg = json.loads(line)
        except ValueError:
            raise self._tamper(seq, "is not valid JSON (altered or overwritten)") from None
        shape = check_shape(msg)
        if shape is not None:
            raise self._tamper(seq, f"is malformed: it {shape}")
        found = msg["seq"]
        if found != seq:
            if found > seq:
                raise self._tamper(seq, f"is missing (the line in its place is message {found}): lines removed")
            raise self._tamper(seq, f"is out of place (message {found} stands where message {seq} belongs)")
        if msg["prev"] != self.last_hash:
            self._explain_break(seq, line)
        if seq >= self.max_cp and not _valid_line(self.feed_id, line, msg):
            raise self._tamper(seq, "fails its signature or is not in canonical form (altered)")
        self._append(line)
        if self.sink is not None:
            self.sink(msg)

    def _explain_break(self, seq: int, line: bytes) -> None:
        if seq > 0 and not _valid_line(self.feed_id, self._last_line or b""):
            raise self._tamper(seq - 1, "fails its signature or is not in canonical form (altered)")
        if not _valid_line(self.feed_id, line):
            raise self._tamper(seq, "fails its signature (its prev was altered)")
        raise self._tamper(seq, "does not chain to the message before it: a validly signed message from another history")

    def _append(self, line: bytes) -> None:
        self.offsets.append(self.offsets[-1] + len(line) + 1)
        self.merkle.append(leaf_hash(line))
        self.last_hash = hashlib.sha256(line).hexdigest()
        self._last_line = line
        cp = self.checkpoints.get(len(self))
        if cp is not None:
            self._check_root(cp)

    def add_own(self, line: bytes) -> None:
        """Index a line this process just built and signed (no re-verification)."""
        self._append(line)

    # -- access ------------------------------------------------------------------------------

    def line(self, seq: int) -> bytes:
        return read_range(self.path, self.offsets[seq], self.offsets[seq + 1] - 1)

    def lines(self, start: int, end: int) -> list[bytes]:
        if end <= start:
            return []
        data = read_range(self.path, self.offsets[start], self.offsets[end] - 1)
        return data.split(b"\n")


def _valid_line(feed_id: str, line: bytes, msg: dict | None = None) -> bool:
    """Signature valid and the line is the canonical JSON of its message."""
    if msg is None:
        try:
            msg = json.loads(line)
        except ValueError:
            return False
    try:
        return canonical(msg) == line and signature_ok(feed_id, msg)
    except Exception:
        return False

