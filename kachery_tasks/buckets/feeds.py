"""Feeds in a bucket: publishing a feed's messages and checkpoints, and reading them back verified.

The layout (``layout.py``, docs/buckets.md "Layout"): immutable **segments** of stored message
lines under ``feeds/<feed id>/<stem>/<start>-<end>-<sha256>.jsonl``, and one signed **head** per
feed, ``feeds/<feed id>/head.json``, listing per subfeed its message count, the SHA-256 of its last
line, its segments and its latest checkpoint.

**Publishing** (:func:`publish_feed`, on the writer's node): ``stat`` the head (its generation),
read it, bring in and check what it holds (below: the same verified read as any node's; a head of
another history is a fork, reported, never overwritten), upload the new messages as segments
(create-if-absent), sign a new head, and compare-and-swap it on the generation read. If another
process moved the head meanwhile (:class:`PreconditionFailed`), start again from the new head:
since it passed the same checks it is this history, so only what it lacks is added. Two processes
of one writer racing therefore lose nothing; segments uploaded by an attempt that lost the race
stay unreferenced (harmless, content-addressed).

**Reading** (:func:`pull_feed`, what ``kt.load_feed(uri)`` does through ``feeds.sources``): the head's
signature must verify against the feed id; the segments needed (those past what this home
already holds) are read whole and each checked against the SHA-256 in its name before a line is parsed;
every line must be in canonical form, well formed, at its seq, validly signed by the feed key and
chained by ``prev``; the last one must be the head's ``last``. Against this home: where the head
holds no more than this home, its ``last`` must be the hash of this home's line at that seq; where
it holds more, only the segments from this home's count on are read, and the first new message must
chain to this home's last. Only when every subfeed passed is anything stored: a head of another
history records its first differing message as fork evidence (:class:`ForkedFeedError`, the feed
frozen, nothing else stored); otherwise the new messages go through :meth:`Subfeed.ingest`, then
the head's checkpoint through :meth:`Subfeed.ingest_checkpoints` (its Merkle root must match the
messages, which also makes it consistent with any checkpoint this home held). A failed check raises
:class:`FeedObjectTampered` naming the bucket object, and nothing of the copy is stored.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from .. import config
from ..errors import KacheryWarning, UserError
from ..feeds import sources
from ..feeds.checkpoints import Checkpoint
from ..feeds.errors import FeedReadOnlyError, FeedTamperError, ForkedFeedError
from ..feeds.feed import Feed
from ..feeds.messages import HEX64, ZERO_HASH, canonical, check_shape, now_ms, signature_ok
from ..feeds.registry import load_feed, stored_feed
from ..feeds.storage import subfeed_stem
from ..identity import KeyPair, verify
from ..identity.documents import canonical_json
from .base import AlreadyExists, Bucket, BucketError, BucketUnavailable, NotFound, PreconditionFailed
from .fetch import configured_bucket, configured_buckets
from .layout import check_layout, feed_head_key, feed_segment_key

HEAD_TYPE = "kachery-feed-head/1"
#: A segment holds at most this many messages, or about this many bytes (one larger message alone).
MAX_SEGMENT_MESSAGES = 4096
MAX_SEGMENT_BYTES = 4 * 2**20
#: Largest head a reader accepts.
MAX_HEAD_BYTES = 64 * 2**20
#: Compare-and-swap attempts before publishing gives up (each one lost to another publisher).
CAS_ATTEMPTS = 50


class FeedObjectTampered(FeedTamperError):
    """An object of a feed in a bucket fails its checks; ``bucket`` and ``key`` name it. Nothing
    of the copy was stored."""

    def __init__(self, feed_id: str, subfeed: str, seq: int | None, reason: str, bucket: str, key: str):
        super().__init__(feed_id, subfeed, seq, reason, f"{bucket} object {key}")
        self.bucket = bucket
        self.key = key
        what = f"message {seq} {reason}" if seq is not None else reason
        self.args = (f"feed {feed_id} subfeed {subfeed!r}: {what}, in {bucket} object {key}; nothing was "
                     "taken from it: republish the feed from its writer's node (`kachery feed publish`) "
                     "or remove the bad object",)


class FeedPullWarning(KacheryWarning):
    """A bucket could not be reached to bring a stored feed up to date; its local copy is used."""


@dataclass
class PublishedFeed:
    """What :func:`publish_feed` did: per subfeed ``{"messages": count in the bucket, "new": sent
    now}``, segments written, compare-and-swap attempts lost (``retries``) and the head's generation."""

    bucket: str
    feed: str
    subfeeds: dict[str, dict[str, int]] = field(default_factory=dict)
    segments_written: int = 0
    retries: int = 0
    generation: int = 0
    changed: bool = False


# -- the head ---------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _head_problem(head: Any, feed_id: str) -> tuple[str | None, str | None]:
    """(subfeed name or None, what is wrong) with a parsed head, or (None, None) if it is sound."""
    if not isinstance(head, dict) or set(head) != {"type", "feed", "timestamp", "subfeeds", "signature"}:
        return None, "is not a feed head (wrong fields)"
    if head["type"] != HEAD_TYPE:
        return None, f"has type {head['type']!r}, not {HEAD_TYPE!r}"
    if head["feed"] != feed_id:
        return None, f"names feed {str(head['feed'])[:70]!r}"
    if not isinstance(head["signature"], str) or not verify(
            feed_id, canonical_json({k: v for k, v in head.items() if k != "signature"}), head["signature"]):
        return None, "is not validly signed by the feed's key (forged or altered)"
    if not isinstance(head["subfeeds"], dict):
        return None, "has no subfeed table"
    for stem, e in head["subfeeds"].items():
        if not isinstance(e, dict) or set(e) != {"name", "count", "last", "segments", "checkpoint"}:
            return None, f"has a malformed entry {stem[:70]!r}"
        name = e["name"]
        if not isinstance(name, str) or subfeed_stem(name) != stem:
            return None, f"has an entry {stem[:70]!r} whose name does not hash to it"
        if not _is_count(e["count"]) or not isinstance(e["last"], str) or not HEX64.fullmatch(e["last"]):
            return name, "has a malformed count or last hash"
        pos = 0
        for seg in e["segments"] if isinstance(e["segments"], list) else [None]:
            if (not isinstance(seg, dict) or set(seg) != {"start", "end", "sha256"} or seg["start"] != pos
                    or not _is_count(seg["end"]) or seg["end"] <= pos
                    or not isinstance(seg["sha256"], str) or not HEX64.fullmatch(seg["sha256"])):
                return name, "has segments that do not run contiguously from seq 0"
            pos = seg["end"]
        if pos != e["count"]:
            return name, f"has segments up to seq {pos}, not its count {e['count']}"
        if e["checkpoint"] is not None:
            cp = Checkpoint.from_dict(e["checkpoint"])
            if cp is None or cp.subfeed != name or cp.size > e["count"] or not cp.signed_by(feed_id):
                return name, "has a checkpoint that is not one of this subfeed signed by the feed's key"
    return None, None


def read_head(bucket: Bucket, feed_id: str) -> tuple[dict[str, Any] | None, int]:
    """The verified head of ``feed_id`` in ``bucket`` and its generation; (None, 0) if there is none.

    ``stat`` comes before ``read``, so the bytes are at least as new as the generation returned."""
    key = feed_head_key(feed_id)
    for _ in range(3):
        info = bucket.stat(key)
        if info is None:
            return None, 0
        if info.size > MAX_HEAD_BYTES:
            raise FeedObjectTampered(feed_id, "*", None, f"the head is {info.size} bytes (at most {MAX_HEAD_BYTES})",
                                     bucket.uri, key)
        try:
            raw = b"".join(bucket.read(key))
        except NotFound:  # replaced or removed between stat and read: stat again
            continue
        try:
            head = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise FeedObjectTampered(feed_id, "*", None, "the head is not JSON", bucket.uri, key) from None
        name, problem = _head_problem(head, feed_id)
        if problem:
            raise FeedObjectTampered(feed_id, name or "*", None, f"the head {problem}", bucket.uri, key)
        return head, info.generation
    raise BucketUnavailable(f"{bucket.uri}: {key} kept changing while being read; try again", bucket.uri, key)


def _sign_head(keys: KeyPair, subfeeds: dict[str, Any]) -> bytes:
    unsigned = {"type": HEAD_TYPE, "feed": keys.public_hex, "timestamp": now_ms(), "subfeeds": subfeeds}
    return canonical_json({**unsigned, "signature": keys.sign(canonical_json(unsigned))})


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    name: str
    local: int  # messages this home held when the head was checked
    lines: list[bytes]  # verified lines, seq ``first`` on
    first: int
    checkpoint: dict | None
    forked: bool = False  # the head's history is not this home's


def _fetch_lines(bucket: Bucket, feed_id: str, stem: str, entry: dict, lo: int, hi: int) -> list[bytes]:
    """Lines ``lo <= seq < hi`` of a head entry's segments, every check passed (module docstring)."""
    name = entry["name"]
    out: list[bytes] = []
    prev = ZERO_HASH if lo == 0 else None
    for seg in entry["segments"]:
        start, end = seg["start"], seg["end"]
        if end <= lo or start >= hi:
            continue
        key = feed_segment_key(feed_id, stem, start, end, seg["sha256"])

        def bad(seq: int | None, reason: str, key: str = key) -> FeedObjectTampered:
            return FeedObjectTampered(feed_id, name, seq, reason, bucket.uri, key)

        try:
            data = b"".join(bucket.read(key))
        except NotFound:
            raise bad(start, "is missing: the head names a segment the bucket does not hold") from None
        if _sha(data) != seg["sha256"]:
            raise bad(None, "the segment does not hash to the SHA-256 in its name (altered)")
        lines = data[:-1].split(b"\n") if data.endswith(b"\n") else []
        if len(lines) != end - start:
            raise bad(start, f"the segment holds {len(lines)} lines, not {end - start}")
        for seq, line in enumerate(lines, start):
            if seq < lo or seq >= hi:
                prev = _sha(line) if seq == lo - 1 else prev
                continue
            try:
                msg = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise bad(seq, "is not valid JSON (altered)") from None
            shape = check_shape(msg)
            if shape is not None:
                raise bad(seq, f"is malformed: it {shape}")
            if msg["seq"] != seq:
                raise bad(seq, f"is out of place (message {msg['seq']} stands where message {seq} belongs)")
            if canonical(msg) != line or not signature_ok(feed_id, msg):
                raise bad(seq, "fails its signature or is not in canonical form (altered)")
            if prev is not None and msg["prev"] != prev:
                raise bad(seq, "does not chain to the message before it")
            prev = _sha(line)
            out.append(line)
    if len(out) != hi - lo:
        raise FeedObjectTampered(feed_id, name, lo, "is not covered by the head's segments", bucket.uri,
                                 feed_head_key(feed_id))
    if hi == entry["count"] and _sha(out[-1]) != entry["last"]:
        raise FeedObjectTampered(feed_id, name, hi - 1, "is not the last message the head names", bucket.uri,
                                 feed_head_key(feed_id))
    return out


def _apply_head(feed_id: str, bucket: Bucket, head: dict[str, Any]) -> dict[str, int]:
    """Check ``head`` against this home and store what it adds; messages added per subfeed."""
    local = stored_feed(feed_id)
    if local is not None:
        local.check_not_forked()
    plans: list[_Plan] = []
    for stem, entry in sorted(head["subfeeds"].items()):
        name, count = entry["name"], entry["count"]
        sub = local.subfeed(name) if local is not None and name in local.subfeeds() else None
        n = len(sub) if sub is not None else 0
        if count == 0:
            continue
        if count <= n:
            if _sha(sub.lines(count - 1, count)[0]) == entry["last"]:  # type: ignore[union-attr]
                plans.append(_Plan(name, n, [], count, entry["checkpoint"]))
                continue
            lo, hi = count - 1, count  # a different message at a seq both hold: fetched as evidence
        else:
            lo, hi = n, count
        lines = _fetch_lines(bucket, feed_id, stem, entry, lo, hi)
        forked = lo < n or (n > 0 and json.loads(lines[0])["prev"] != _sha(sub.lines(n - 1, n)[0]))  # type: ignore[union-attr]
        plans.append(_Plan(name, n, lines, lo, entry["checkpoint"], forked))
    if not plans:
        return {}
    feed = local if local is not None else load_feed(feed_id, create=True, pull=False)
    # another history first, before anything is stored: its first message is the evidence
    for p in plans:
        if p.forked:
            result = feed.subfeed(p.name).ingest(p.lines[:1])
            _raise_fork(feed, bucket, p.name, result.forks[0] if result.forks else p.first)
    added: dict[str, int] = {}
    for p in plans:
        sub = feed.subfeed(p.name)
        new = p.lines
        if new:
            result = sub.ingest(new)
            if result.forked:
                _raise_fork(feed, bucket, p.name, result.forks[0])
            if result.rejected:  # cannot happen after the checks above: the local file changed meanwhile
                seq, why = result.rejected[0]
                raise FeedObjectTampered(feed_id, p.name, seq, why, bucket.uri, feed_head_key(feed_id))
            added[p.name] = result.appended
        if p.checkpoint is not None:
            result = sub.ingest_checkpoints([p.checkpoint])
            if result.forked:
                _raise_fork(feed, bucket, p.name, result.forks[0])
    return added


def _raise_fork(feed: Feed, bucket: Bucket, name: str, seq: int) -> None:
    evidence = next((e for e in feed.forks() if e["subfeed"] == name), None)
    raise ForkedFeedError(
        f"feed {feed.feed_id} subfeed {name!r}: the copy in {bucket.uri} is another history signed by the same "
        f"key (they differ at seq {seq}); nothing of it was stored and the feed is frozen here: inspect "
        "Feed.forks() and settle with `kachery feed resolve`", evidence)


def pull_feed(feed_id: str, bucket: Bucket) -> dict[str, int] | None:
    """Bring what ``bucket`` holds of ``feed_id`` into the home in force, verified; messages added per
    subfeed, or None if the bucket has no head for the feed."""
    check_layout(bucket, write=False)
    head, _ = read_head(bucket, feed_id)
    if head is None:
        return None
    return _apply_head(feed_id, bucket, head)


def fetch_from_buckets(feed_id: str) -> int | None:
    """The ``feeds.sources`` entry: pull ``feed_id`` from every configured bucket (``bucket``, then
    ``read_buckets``). None if none has it. An unreachable bucket is a warning while the feed is
    stored here (its local copy serves), else the error."""
    if config.get("read_only"):
        return None
    found: int | None = None
    failed: BucketError | None = None
    for bucket in configured_buckets():
        try:
            added = pull_feed(feed_id, bucket)
        except BucketUnavailable as exc:
            failed = failed or exc
            continue
        if added is not None:
            found = (found or 0) + sum(added.values())
    if failed is not None:
        if found is None and stored_feed(feed_id) is None:
            raise failed
        warnings.warn(FeedPullWarning(f"feed {feed_id} may not be up to date: {failed}"), stacklevel=3)
    return found


sources.FETCHERS.append(fetch_from_buckets)


# -- publishing -------------------------------------------------------------------------------------
def _segments(lines: list[bytes], start: int) -> list[tuple[int, int, bytes]]:
    """(start, end, bytes) of the segments holding ``lines`` (seq ``start`` on)."""
    out: list[tuple[int, int, bytes]] = []
    i = 0
    while i < len(lines):
        j, size = i, 0
        while j < len(lines) and j - i < MAX_SEGMENT_MESSAGES and (j == i or size + len(lines[j]) + 1 <= MAX_SEGMENT_BYTES):
            size += len(lines[j]) + 1
            j += 1
        out.append((start + i, start + j, b"".join(line + b"\n" for line in lines[i:j])))
        i = j
    return out


def publish_feed(feed: Feed, bucket: Bucket | None = None) -> PublishedFeed:
    """Upload ``feed``'s new messages and latest checkpoints to ``bucket`` (default: the configured
    ``bucket``) and move its head there by compare-and-swap; see the module docstring."""
    keys = feed.keys
    if keys is None:
        raise FeedReadOnlyError(f"feed {feed.feed_id} is read-only here: only its writer's node, which holds "
                                "its key, publishes it")
    bucket = configured_bucket(write=True) if bucket is None else bucket
    check_layout(bucket, write=True)
    feed.check_not_forked()
    fid = feed.feed_id
    out = PublishedFeed(bucket.uri, feed.uri)
    sent: set[str] = set()
    for _ in range(CAS_ATTEMPTS):
        head, generation = read_head(bucket, fid)
        entries: dict[str, Any] = dict(head["subfeeds"]) if head else {}
        if head is not None:
            _apply_head(fid, bucket, head)  # the bucket's history must be this one (else: fork, raised)
        out.subfeeds = {}
        changed = False
        for name in feed.subfeeds():
            sub = feed.subfeed(name)
            stem = subfeed_stem(name)
            entry = entries.get(stem)
            base = entry["count"] if entry else 0
            n = len(sub)
            cps = [cp for cp in sub.checkpoints() if cp.size <= n]
            cp = cps[-1].to_dict() if cps else None
            out.subfeeds[name] = {"messages": n, "new": n - base}
            if entry is not None and n == base and entry["checkpoint"] == cp:
                continue
            segments = list(entry["segments"]) if entry else []
            last = entry["last"] if entry else ZERO_HASH
            if n > base:
                lines = sub.lines(base, n)
                for start, end, data in _segments(lines, base):
                    digest = _sha(data)
                    key = feed_segment_key(fid, stem, start, end, digest)
                    if key not in sent:
                        try:
                            bucket.write(key, data)
                            out.segments_written += 1
                        except AlreadyExists:  # content-addressed: the same bytes are there
                            pass
                        sent.add(key)
                    segments.append({"start": start, "end": end, "sha256": digest})
                last = _sha(lines[-1])
            entries[stem] = {"name": name, "count": n, "last": last, "segments": segments, "checkpoint": cp}
            changed = True
        if not changed:
            out.generation = generation
            return out
        try:
            info = bucket.write_if_generation(feed_head_key(fid), _sign_head(keys, entries), generation)
        except PreconditionFailed:  # another publisher moved the head: check it and build on it
            out.retries += 1
            continue
        out.generation, out.changed = info.generation, True
        return out
    raise UserError(f"the head of feed {fid} in {bucket.uri} changed {CAS_ATTEMPTS} times while publishing "
                    "(other publishers of this feed); publish again")
