"""Feeds and subfeeds: the public objects of the feeds layer.

A :class:`Feed` is identified by its writer's Ed25519 public key; a :class:`Subfeed` is one signed
append-only log inside it, named by any string. Appends take an exclusive ``flock`` on the subfeed
file, read what other processes of this node appended since (so ``seq`` and ``prev`` are right),
write the batch with one ``write`` and one ``fsync``, sign a checkpoint at every multiple of
``feed_checkpoint_every`` messages, and release. Readers in any process share nothing but the
files; each keeps a verified :class:`~.log.LogIndex` per subfeed, extended incrementally.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import config
from ..errors import UserError
from ..fs import write_atomic
from ..identity import KeyPair
from . import forks, sources
from .checkpoints import Checkpoint, ConsistencyProof, InclusionProof
from .errors import FeedReadOnlyError, ForkedFeedError
from .log import LogIndex
from .messages import canonical, check_shape, sign_message, signature_ok
from .storage import flocked, subfeed_stem, write_all, write_json_atomic

T = TypeVar("T")
_POLL_S = 0.02
_REPLAY_BATCH = 10_000


class _State:
    """Per-process state of one subfeed file, shared by every Subfeed object naming it."""

    def __init__(self, index: LogIndex):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.index = index


_states: dict[Path, _State] = {}
_states_lock = threading.Lock()


@dataclass
class IngestResult:
    """What :meth:`Subfeed.ingest` did with each item it was given."""

    appended: int = 0
    duplicates: int = 0
    rejected: list[tuple[int | None, str]] = field(default_factory=list)
    forks: list[int] = field(default_factory=list)

    @property
    def forked(self) -> bool:
        return bool(self.forks)


class Feed:
    """A signed feed: ``feed://<public key hex>``. Writable when this node holds the key."""

    def __init__(self, feed_id: str, directory: Path, keys: KeyPair | None, label: str | None = None):
        self.feed_id = feed_id
        self.dir = directory
        self.keys = keys
        self.label = label
        self._subfeeds: dict[str, Subfeed] = {}

    @property
    def uri(self) -> str:
        return f"feed://{self.feed_id}"

    @property
    def writable(self) -> bool:
        return self.keys is not None

    def __repr__(self) -> str:
        return f"Feed({self.uri!r}, label={self.label!r}, writable={self.writable})"

    def subfeed(self, name: str) -> Subfeed:
        """The subfeed called ``name`` (any string); created on first append."""
        sub = self._subfeeds.get(name)
        if sub is None:
            sub = self._subfeeds[name] = Subfeed(self, name)
        return sub

    def subfeeds(self) -> list[str]:
        """Names of the subfeeds stored here."""
        names = []
        for p in sorted(self.dir.glob("*.name")):
            try:
                names.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return sorted(names)

    def forks(self) -> list[dict[str, Any]]:
        """Recorded fork evidence: each has kind, subfeed, seq, and the local and remote signed items."""
        return forks.load(self.dir)

    def check_not_forked(self) -> None:
        forks.check(self.dir, self.feed_id)

    def resolve_fork(self, subfeed: str | None = None, keep: str = "local") -> list[dict[str, Any]]:
        """Settle recorded forks of ``subfeed`` (all if None) and unfreeze the feed.

        ``keep="local"`` keeps this node's messages and drops any stored checkpoint that disagrees
        with them. ``keep="remote"`` cuts this node's messages from the first conflicting seq on
        (saved in ``forks-resolved.jsonl``) and takes the other side's message there, so the
        subfeed can be fetched again from the peer that holds the other history. Returns the
        evidence that was cleared.
        """
        if keep not in ("local", "remote"):
            raise UserError(f"keep must be 'local' or 'remote', not {keep!r}")
        items = [e for e in self.forks() if subfeed is None or e["subfeed"] == subfeed]
        if not items:
            raise UserError(f"feed {self.feed_id} has no recorded fork{'' if subfeed is None else f' in subfeed {subfeed!r}'}")
        cleared = []
        for name in sorted({e["subfeed"] for e in items}):
            mine = [e for e in items if e["subfeed"] == name]
            sub = self.subfeed(name)
            orphaned: list[str] = []
            remote_msgs: list[dict] = []
            if keep == "remote":
                if any(e["kind"] == "checkpoint" for e in mine):
                    raise UserError(
                        f"subfeed {name!r} has a conflicting checkpoint, which names no single message; "
                        "resolve with keep='local', or delete the subfeed files and fetch it again"
                    )
                cut = min(e["seq"] for e in mine)
                orphaned = sub._truncate(cut)
                remote_msgs = [e["remote"] for e in mine if e["kind"] == "message" and e["seq"] == cut]
            else:
                sub._drop_disagreeing_checkpoints()
            cleared += forks.clear(self.dir, name, keep, {"orphaned": orphaned} if orphaned else None)
            sub._reset()
            if remote_msgs:
                sub.ingest(remote_msgs[:1])
        return cleared

    def pull(self) -> int:
        """Bring new messages of this feed from the configured buckets (verified; see
        :mod:`.sources`); returns how many were added. :func:`load_feed` does this for a read-only
        feed on every call."""
        return sources.fetch(self.feed_id) or 0

    def verify(self) -> list[dict[str, Any]]:
        """Re-read and verify every subfeed from disk; raises :class:`FeedTamperError` on the first bad one."""
        self.check_not_forked()
        return [self.subfeed(name).verify() for name in self.subfeeds()]


class Subfeed:
    """One signed append-only log of a feed."""

    def __init__(self, feed: Feed, name: str):
        self.feed = feed
        self.name = name
        stem = subfeed_stem(name)
        self.path = feed.dir / f"{stem}.jsonl"
        self.cp_path = feed.dir / f"{stem}.checkpoints.jsonl"
        self._name_path = feed.dir / f"{stem}.name"
        with _states_lock:
            state = _states.get(self.path)
            if state is None:
                state = _states[self.path] = _State(self._new_index())
        self._state = state

    def __repr__(self) -> str:
        return f"Subfeed({self.feed.uri!r}, {self.name!r})"

    def _new_index(self) -> LogIndex:
        return LogIndex(self.feed.feed_id, self.name, self.path, self.cp_path)

    def _reset(self) -> None:
        with self._state.lock:
            self._state.index = self._new_index()

    def _index(self) -> LogIndex:
        """The shared index brought up to date (caller holds the state lock)."""
        self.feed.check_not_forked()
        try:
            self._state.index.refresh()
        except ForkedFeedError as exc:
            if exc.evidence:
                forks.record(self.feed.dir, exc.evidence)
            self._reset()
            raise
        return self._state.index

    def _ensure_files(self) -> None:
        if not self._name_path.exists():
            self.feed.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._name_path, self.name)

    def _require_writable(self) -> KeyPair:
        if self.feed.keys is None:
            raise FeedReadOnlyError(
                f"feed {self.feed.feed_id} is read-only here: this node does not hold its key; "
                "append on the node that created it"
            )
        return self.feed.keys

    # -- writing -------------------------------------------------------------------------------

    def append(self, body: Any) -> dict[str, Any]:
        """Append one JSON-serializable ``body``; returns the signed message."""
        return self.append_many([body])[0]

    def append_many(self, bodies: Iterable[Any]) -> list[dict[str, Any]]:
        """Append ``bodies`` as one batch: one lock, one write, one fsync; returns the signed messages."""
        keys = self._require_writable()
        bodies = list(bodies)
        if not bodies:
            return []
        for body in bodies:
            canonical(body)  # refuse a bad body before anything is locked or written
        with self._state.lock:
            self._ensure_files()
            with flocked(self.path) as fd:
                index = self._index()
                self._repair_torn_tail(fd, index)
                seq, prev = len(index), index.last_hash
                lines = []
                for body in bodies:
                    line = sign_message(keys, seq, prev, body)
                    lines.append(line)
                    prev = hashlib.sha256(line).hexdigest()
                    seq += 1
                write_all(fd, b"".join(line + b"\n" for line in lines))
                os.fsync(fd)
                for line in lines:
                    index.add_own(line)
                self._auto_checkpoint(keys, index, len(index) - len(lines))
            self._state.cond.notify_all()
        return [json.loads(line) for line in lines]

    def _repair_torn_tail(self, fd: int, index: LogIndex) -> None:
        """Cut an incomplete last line: a crash mid-append; safe only while holding the lock."""
        if index.torn_bytes:
            os.ftruncate(fd, index.end)
            os.fsync(fd)
            index.torn_bytes = 0

    def _auto_checkpoint(self, keys: KeyPair, index: LogIndex, before: int) -> None:
        every = int(config.get("feed_checkpoint_every"))
        if every <= 0:
            return
        sizes = range((before // every + 1) * every, len(index) + 1, every)
        self._write_checkpoints(index, [Checkpoint.create(keys, self.name, s, index.merkle.root(s)) for s in sizes])

    def _write_checkpoints(self, index: LogIndex, cps: list[Checkpoint]) -> None:
        if not cps:
            return
        data = b"".join(cp.line() + b"\n" for cp in cps)
        fd = os.open(self.cp_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        for cp in cps:
            index.add_checkpoint(cp)
        index._cp_read += len(data)

    def checkpoint(self) -> Checkpoint:
        """Sign a checkpoint over the whole subfeed now (or return the one already at this size)."""
        keys = self._require_writable()
        with self._state.lock:
            self._ensure_files()
            with flocked(self.path):
                index = self._index()
                if len(index) == 0:
                    raise UserError(f"subfeed {self.name!r} is empty: append a message before checkpointing")
                cp = index.checkpoints.get(len(index))
                if cp is None:
                    cp = Checkpoint.create(keys, self.name, len(index), index.merkle.root())
                    self._write_checkpoints(index, [cp])
        return cp

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._state.lock:
            return len(self._index())

    def messages(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """Messages ``start <= seq < end`` (verified), read through the in-memory offset index."""
        if start < 0 or (end is not None and end < 0):
            raise UserError("start and end of a message range are non-negative seqs")
        with self._state.lock:
            index = self._index()
            end = len(index) if end is None else min(end, len(index))
            lines = index.lines(start, end) if start < end else []
        return [json.loads(line) for line in lines]

    def lines(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """The stored lines (canonical JSON of the signed messages, no newline) ``start <= seq < end``,
        verified as :meth:`messages` are: the bytes whose SHA-256 the next message names as ``prev``."""
        if start < 0 or (end is not None and end < 0):
            raise UserError("start and end of a message range are non-negative seqs")
        with self._state.lock:
            index = self._index()
            end = len(index) if end is None else min(end, len(index))
            return index.lines(start, end) if start < end else []

    def tail(self, start: int = 0, timeout: float | None = None) -> list[dict[str, Any]]:
        """Messages from ``start`` on, waiting up to ``timeout`` seconds (None: forever) until there
        is at least one. Wakes at once for appends in this process and within ~20 ms for appends
        by other processes (the file is polled). Returns [] on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state.lock:
            while True:
                if len(self._index()) > start:
                    return self.messages(start)
                wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    return []
                self._state.cond.wait(wait)

    def replay(self, reducer: Callable[[T, dict[str, Any]], T], initial: T, verify: bool = True) -> T:
        """Fold ``reducer(state, message)`` over every message, from ``initial``.

        With ``verify`` (the default) the file is re-read and verified from scratch in the same
        pass: hash chain, Merkle roots against signed checkpoints, signatures after the last one.
        """
        if not verify:
            state = initial
            n = len(self)
            for lo in range(0, n, _REPLAY_BATCH):
                for msg in self.messages(lo, min(lo + _REPLAY_BATCH, n)):
                    state = reducer(state, msg)
            return state
        self.feed.check_not_forked()
        holder = [initial]

        def sink(msg: dict[str, Any]) -> None:
            holder[0] = reducer(holder[0], msg)

        index = self._new_index()
        index.sink = sink
        index.refresh()
        return holder[0]

    def verify(self) -> dict[str, Any]:
        """Re-read and verify the whole subfeed from disk; raises :class:`FeedTamperError` with the seq."""
        self.feed.check_not_forked()
        index = self._new_index()
        index.refresh()
        return {
            "subfeed": self.name,
            "messages": len(index),
            "checkpoints": len(index.checkpoints),
            "by_checkpoint": index.checked_cp,
            "by_signature": len(index) - index.checked_cp,
            "torn_bytes": index.torn_bytes,
        }

    def checkpoints(self) -> list[Checkpoint]:
        with self._state.lock:
            index = self._index()
            return [index.checkpoints[s] for s in sorted(index.checkpoints)]

    def latest_checkpoint(self) -> Checkpoint | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    # -- proofs --------------------------------------------------------------------------------

    def inclusion_proof(self, seq: int, checkpoint: Checkpoint | None = None) -> InclusionProof:
        """Proof that message ``seq`` is in the log signed by ``checkpoint`` (default: the latest)."""
        with self._state.lock:
            index = self._index()
            cp = checkpoint or (index.checkpoints[index.max_cp] if index.checkpoints else None)
            if cp is None or cp.size <= seq or index.checkpoints.get(cp.size) != cp:
                raise UserError(
                    f"message {seq} of subfeed {self.name!r} is not covered by a stored checkpoint; "
                    "the writer can sign one with Subfeed.checkpoint()"
                )
            path = index.merkle.inclusion_path(seq, cp.size)
        return InclusionProof(seq=seq, size=cp.size, path=[h.hex() for h in path], checkpoint=cp)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Proof that the checkpoint at ``new_size`` (default: latest) extends the one at ``old_size``."""
        with self._state.lock:
            index = self._index()
            new_size = index.max_cp if new_size is None else new_size
            old, new = index.checkpoints.get(old_size), index.checkpoints.get(new_size)
            if old is None or new is None or old_size > new_size:
                raise UserError(
                    f"subfeed {self.name!r} has no stored checkpoints at sizes {old_size} and {new_size}; "
                    f"stored sizes: {sorted(index.checkpoints)[-5:]}"
                )
            path = index.merkle.consistency_path(old_size, new_size)
        return ConsistencyProof(old=old, new=new, path=[h.hex() for h in path])

    # -- messages from elsewhere -----------------------------------------------------------------

    def ingest(self, messages: Iterable[dict[str, Any] | str | bytes]) -> IngestResult:
        """Take signed messages that arrived from elsewhere.

        Valid continuations are appended, exact duplicates ignored, messages that are not validly
        signed by this feed's key (or malformed, or leave a gap) rejected, and a validly signed
        message that conflicts with a stored one recorded as fork evidence, which freezes the feed.
        """
        result = IngestResult()
        feed_id = self.feed.feed_id
        with self._state.lock:
            self._ensure_files()
            with flocked(self.path) as fd:
                index = self._index()
                self._repair_torn_tail(fd, index)
                pending: dict[int, bytes] = {}
                evidence = None
                for item in messages:
                    msg = _parse(item)
                    why = check_shape(msg) if msg is not None else "is not JSON"
                    seq = msg.get("seq") if isinstance(msg, dict) and isinstance(msg.get("seq"), int) else None
                    if why is not None:
                        result.rejected.append((seq, f"message {why}"))
                        continue
                    if not signature_ok(feed_id, msg):
                        result.rejected.append((seq, "signature is not valid for this feed's key (forged or altered)"))
                        continue
                    line = canonical(msg)
                    n = len(index) + len(pending)
                    if seq < n:
                        ours = pending[seq] if seq in pending else index.line(seq)
                        if ours == line:
                            result.duplicates += 1
                            continue
                        evidence = {"kind": "message", "subfeed": self.name, "seq": seq,
                                    "local": json.loads(ours), "remote": msg}
                    elif seq > n:
                        result.rejected.append((seq, f"leaves a gap: this subfeed has {n} messages"))
                        continue
                    else:
                        last = hashlib.sha256(pending[n - 1]).hexdigest() if pending else index.last_hash
                        if msg["prev"] == last:
                            pending[seq] = line
                            continue
                        ours = pending.get(n - 1) or index.line(n - 1)
                        evidence = {"kind": "message", "subfeed": self.name, "seq": n - 1,
                                    "local": json.loads(ours), "remote": msg}
                    result.forks.append(evidence["seq"])
                    break
                if pending:
                    lines = [pending[s] for s in sorted(pending)]
                    write_all(fd, b"".join(line + b"\n" for line in lines))
                    os.fsync(fd)
                    for line in lines:
                        index.add_own(line)
                    result.appended = len(lines)
                    if self.feed.keys is not None:
                        self._auto_checkpoint(self.feed.keys, index, len(index) - len(lines))
                if evidence is not None:
                    forks.record(self.feed.dir, evidence)
            self._state.cond.notify_all()
        return result

    def ingest_checkpoints(self, checkpoints: Iterable[Checkpoint | dict[str, Any]]) -> IngestResult:
        """Take signed checkpoints from elsewhere: store those that match the local messages, record
        a validly signed one that contradicts them as fork evidence, reject the rest."""
        result = IngestResult()
        with self._state.lock:
            self._ensure_files()
            with flocked(self.path):
                index = self._index()
                for item in checkpoints:
                    cp = item if isinstance(item, Checkpoint) else Checkpoint.from_dict(item)
                    if cp is None or cp.subfeed != self.name or not cp.signed_by(self.feed.feed_id):
                        result.rejected.append((None, "not a checkpoint of this subfeed signed by this feed's key"))
                        continue
                    known = index.checkpoints.get(cp.size)
                    if known == cp:
                        result.duplicates += 1
                        continue
                    if cp.size > len(index):
                        result.rejected.append((cp.size, f"covers {cp.size} messages; only {len(index)} are here"))
                        continue
                    ours = known.to_dict() if known else {"size": cp.size, "root": index.merkle.root(cp.size).hex()}
                    if ours["root"] == cp.root and known is None:
                        self._write_checkpoints(index, [cp])
                        result.appended += 1
                        continue
                    if ours["root"] == cp.root:
                        result.duplicates += 1  # same tree head, signed at another time
                        continue
                    forks.record(self.feed.dir, {"kind": "checkpoint", "subfeed": self.name, "seq": cp.size - 1,
                                                 "local": ours, "remote": cp.to_dict()})
                    result.forks.append(cp.size - 1)
                    break
        return result

    # -- fork resolution helpers (caller: Feed.resolve_fork) ------------------------------------

    def _truncate(self, seq: int) -> list[str]:
        """Cut messages ``seq`` onwards and checkpoints beyond ``seq``; return the cut lines."""
        with self._state.lock, flocked(self.path) as fd:
            index = self._clean_index()
            cut = index.lines(seq, len(index)) if seq < len(index) else []
            os.ftruncate(fd, index.offsets[min(seq, len(index))])
            os.fsync(fd)
            self._rewrite_checkpoints([cp for s, cp in index.checkpoints.items() if s <= seq])
            self._reset()
        return [line.decode() for line in cut]

    def _drop_disagreeing_checkpoints(self) -> None:
        with self._state.lock, flocked(self.path):
            index = self._clean_index()
            keep = [cp for s, cp in index.checkpoints.items() if s <= len(index) and index.merkle.root(s).hex() == cp.root]
            self._rewrite_checkpoints(keep)
            self._reset()

    def _clean_index(self) -> LogIndex:
        """Index the messages by signature alone, collecting checkpoints without trusting them."""
        index = LogIndex(self.feed.feed_id, self.name, self.path, self.path.with_suffix(".none"))
        index.refresh()
        for line in read_json_lines(self.cp_path):
            cp = Checkpoint.from_dict(line)
            if (
                cp is not None
                and cp.subfeed == self.name
                and cp.size <= len(index)
                and index.merkle.root(cp.size).hex() == cp.root
                and cp.signed_by(self.feed.feed_id)
            ):
                index.checkpoints.setdefault(cp.size, cp)
        return index

    def _rewrite_checkpoints(self, cps: list[Checkpoint]) -> None:
        data = b"".join(cp.line() + b"\n" for cp in sorted(cps, key=lambda c: c.size))
        write_atomic(self.cp_path, data, mode=0o644)


def read_json_lines(path: Path) -> list[Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _parse(item: Any) -> Any:
    if isinstance(item, (bytes, str)):
        try:
            return json.loads(item)
        except ValueError:
            return None
    return item

