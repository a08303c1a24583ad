"""The key layout of a kachery bucket, version 1 (normative; docs/buckets.md, "Layout").

::

    kachery-bucket.json                      {"layout": "kachery-bucket", "version": 1}
    sha256/<ab>/<cd>/<64 hex>                a file of at most 16 MiB, or one chunk of a larger one
    manifests/<ab>/<cd>/<64 hex>.json        the s1 manifest of a file over 16 MiB
    records/<task id>/<node id>.json         a task record, one object per publishing node (reserved)
    files/<ab>/<cd>/<64 hex>/<node id>.json  {"sha256": ..., "size": N}: that node published that file
    feeds/<feed id>/head.json                the feed's signed head: what the bucket holds (CAS only)
    feeds/<feed id>/<stem>/<start>-<end>-<sha256>.jsonl   messages start..end-1 of a subfeed (immutable)
    channels/<name>/config.json              a channel's config, signed by its owner (CAS only)
    channels/<name>/answers/<request id>/<node id>.json   a member's signed answer to a request

**Marker.** ``kachery-bucket.json`` is created (create-if-absent) the first time a node writes to
the bucket. A node refuses a bucket whose marker names a higher version ("written by a newer
kachery-tasks"), or whose marker is not a kachery marker.

**Blobs and chunks.** A file of at most ``CHUNK_SIZE`` bytes is one object under its SHA-256. A
larger file is cut into ``CHUNK_SIZE`` chunks (the last one shorter); each chunk is an object under
*its own* SHA-256, in the same ``sha256/`` keys as files, so identical chunks are stored once, and
the file's manifest (profile ``s1``) lists them::

    {"profile": "s1", "size": N, "sha256": "<file hex>", "chunk_size": 16777216,
     "chunks": [{"offset": 0, "size": 16777216, "sha256": "<chunk hex>"}, ...]}

The manifest is written last, so a manifest in the bucket means its chunks were written before it.

**Why SHA-256 per chunk, and not the xxh3-128 of the local ``c1`` manifests.** xxh3 is fast but not
collision-resistant: it is made to spread accidental differences, not to resist someone looking for
a second input with the same hash. In a node's own store only the node writes, so xxh3 serves to
resume and spot-check. A bucket is written by other nodes: anyone with write access could upload a
crafted chunk whose xxh3 matches the manifest. A downloader checking chunks by xxh3 would accept it,
and only the final SHA-256 of the whole file would catch the forgery, without saying which chunk is
bad: the whole file would have to be fetched again (and again, since the bad chunk stays). With a
SHA-256 per chunk every chunk is checked on arrival by a hash no one can match on purpose; a bad one
is discarded and fetched again alone, and a chunk object can only ever hold the bytes its key names.
The whole file is still checked against its own SHA-256 at the end, since the manifest itself is not
content-addressed (anyone could write a manifest listing the wrong chunks; they would all verify,
and the whole-file check refuses the result).

**Reserved** (key functions only, used by the bucket tier): task records under
``records/<task id>/<node id>.json``, one object per publishing node, so an untrusted node cannot
squat a task id by writing first (readers pick the records whose signer they trust).

**Publishers of files** (``buckets/published.py``). A blob says nothing of who put it there, and
several nodes may publish the same bytes. So a node that publishes a file (by itself, or as the
result or argument blob of a record) also writes ``files/<ab>/<cd>/<sha256>/<node id>.json``
(create-if-absent, after the blob is complete): ``kachery bucket ls`` lists this node's, and
``kachery bucket rm URI`` removes only a file this node published, and keeps the bytes while
another node's marker remains. Readers of blobs never look at them. (Added to version 1 without a
new version number: a reader that does not know them ignores them, and loses nothing.)

**Feeds** (``buckets/feeds.py``). A published feed is its **segments** and its **head**. A segment
holds messages ``start <= seq < end`` of one subfeed (``<stem>`` is the SHA-256 of the subfeed name,
as on disk), exactly as stored locally: the canonical JSON of each signed message followed by
``\n``; its key names its range and the SHA-256 of its bytes, so it is written create-if-absent and
never rewritten. The head is the canonical JSON of::

    {"type": "kachery-feed-head/1", "feed": "<feed id>", "timestamp": <ms>,
     "subfeeds": {"<stem>": {"name": "<subfeed name>", "count": <messages>,
                             "last": "<SHA-256 of the last stored line, or 64 zeros>",
                             "segments": [{"start": 0, "end": 10, "sha256": "<hex>"}, ...],
                             "checkpoint": <the latest signed checkpoint of size <= count> | null}},
     "signature": "<Ed25519 of the feed key over the rest>"}

Segments of a subfeed are contiguous from 0 to ``count``. The head is written only by
``write_if_generation`` (compare-and-swap) after the segments it names, so a head in a bucket names
segments that were there when it was written.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass

from ..errors import KacheryError, UserError
from .base import AlreadyExists, Bucket, BucketError, NotFound

LAYOUT = "kachery-bucket"
VERSION = 1
MARKER_KEY = "kachery-bucket.json"
PROFILE = "s1"
RECORDS_PREFIX = "records/"
MANIFESTS_PREFIX = "manifests/"
FILES_PREFIX = "files/"

#: Chunk size of the layout: files up to this size are one object, larger ones are chunked.
CHUNK_SIZE = 16 * 2**20
#: Chunk sizes a manifest may declare (tests use small chunks; a chunk is held in memory to verify).
MIN_CHUNK_SIZE = 2**10
MAX_CHUNK_SIZE = 64 * 2**20
#: Largest manifest object a reader accepts (a 1 TiB file in 16 MiB chunks needs about 8 MiB).
MAX_MANIFEST_BYTES = 64 * 2**20

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# -- keys -------------------------------------------------------------------------------------------
def _check_hex(sha256: str) -> str:
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise ValueError(f"{sha256!r} is not a SHA-256 (64 lowercase hex digits)")
    return sha256


def blob_key(sha256: str) -> str:
    """``sha256/<ab>/<cd>/<hex>``: a file of at most one chunk, or a chunk of a larger file."""
    _check_hex(sha256)
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def manifest_key(sha256: str) -> str:
    """``manifests/<ab>/<cd>/<hex>.json``: the s1 manifest of a file over one chunk."""
    _check_hex(sha256)
    return f"{MANIFESTS_PREFIX}{sha256[:2]}/{sha256[2:4]}/{sha256}.json"


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID_PART.match(value):
        raise ValueError(f"{value!r} is not a {what} usable in a bucket key (letters, digits, '.', '_', '-'; "
                         "at most 128, not starting with '.')")
    return value


def record_key(task_id: str, node_id: str) -> str:
    """``records/<task id>/<node id>.json``: the record of ``task_id`` published by ``node_id``
    (reserved for the bucket tier). One object per publishing node: a node that writes first cannot
    squat a task id, since readers choose among the records by signer."""
    return f"{RECORDS_PREFIX}{_check_id(task_id, 'task id')}/{_check_id(node_id, 'node id')}.json"


def file_marker_key(sha256: str, node_id: str) -> str:
    """``files/<ab>/<cd>/<hex>/<node id>.json``: ``node_id`` published the file ``sha256``."""
    return f"{file_markers_prefix(sha256)}{_check_id(node_id, 'node id')}.json"


def file_markers_prefix(sha256: str) -> str:
    """``files/<ab>/<cd>/<hex>/``: list it to find every node that published the file."""
    _check_hex(sha256)
    return f"{FILES_PREFIX}{sha256[:2]}/{sha256[2:4]}/{sha256}/"


def records_prefix(task_id: str) -> str:
    """``records/<task id>/``: list it to find every node's record of a task (reserved)."""
    return f"{RECORDS_PREFIX}{_check_id(task_id, 'task id')}/"


def feed_prefix(feed_id: str) -> str:
    """``feeds/<feed id>/``: where a feed's objects live (head and segments: buckets/feeds.py)."""
    return f"feeds/{_check_id(feed_id, 'feed id')}/"


def feed_key(feed_id: str, name: str) -> str:
    """``feeds/<feed id>/<name>`` (``name`` is a relative key under the feed)."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        raise ValueError(f"{name!r} is not a relative name under a feed")
    return feed_prefix(feed_id) + name


def feed_head_key(feed_id: str) -> str:
    """``feeds/<feed id>/head.json``: the signed head of a published feed, moved only by CAS."""
    return feed_key(feed_id, "head.json")


def channel_config_key(channel: str) -> str:
    """``channels/<name>/config.json``: the channel's signed config (channels/config.py), moved only by CAS."""
    return f"channels/{_check_id(channel, 'channel name')}/config.json"


def channel_answer_key(channel: str, request_id: str, node_id: str) -> str:
    """``channels/<name>/answers/<request id>/<node id>.json``: ``node_id``'s signed answer to a request.

    Answers are durable objects because the transport may lose the message that announces them: a
    requester that missed it finds the answer here. One object per answering node, as for records."""
    return (f"channels/{_check_id(channel, 'channel name')}/answers/{_check_id(request_id, 'request id')}/"
            f"{_check_id(node_id, 'node id')}.json")


def channel_claim_key(channel: str, subject: str) -> str:
    """``channels/<name>/claims/<subject>.json``: which provider runs a task request (node/serving.py).

    Written create-if-absent: of several providers serving the same task, the one whose write
    succeeds runs it and the others stay silent. ``subject`` is the request id, or for an action a
    digest of its name and idempotency key (so a repeated key goes to the provider whose action log
    holds its outcome)."""
    return f"channels/{_check_id(channel, 'channel name')}/claims/{_check_id(subject, 'claim subject')}.json"


def feed_segment_key(feed_id: str, stem: str, start: int, end: int, sha256: str) -> str:
    """``feeds/<feed id>/<stem>/<start>-<end>-<sha256>.jsonl``: messages ``start <= seq < end`` of
    the subfeed whose name hashes to ``stem``, one stored line each; immutable, create-if-absent."""
    _check_hex(stem)
    _check_hex(sha256)
    if not (_is_int(start) and _is_int(end) and 0 <= start < end):
        raise ValueError(f"a segment spans 0 <= start < end, not {start!r}..{end!r}")
    return feed_key(feed_id, f"{stem}/{start}-{end}-{sha256}.jsonl")


# -- manifests --------------------------------------------------------------------------------------
class InvalidManifest(KacheryError, ValueError):
    """A manifest that does not parse, or whose chunks do not add up; the message names the problem."""


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file: ``size`` bytes at ``offset``, stored under its own ``sha256``."""

    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class BucketManifest:
    """An s1 manifest; constructing one checks it (every way in goes through ``__post_init__``)."""

    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[ChunkRef, ...]
    profile: str = PROFILE

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise InvalidManifest(f"manifest of {self.sha256!r:.70}: {problem}")

    def _problem(self) -> str | None:
        if self.profile != PROFILE:
            return f"profile {self.profile!r} is not {PROFILE!r}"
        if not _is_int(self.size) or self.size < 0:
            return f"size {self.size!r} is not a byte count"
        if not isinstance(self.sha256, str) or not _HEX64.match(self.sha256):
            return "sha256 is not 64 lowercase hex digits"
        if not _is_int(self.chunk_size) or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            return f"chunk_size {self.chunk_size!r} is not between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        if self.size <= self.chunk_size:
            return (f"size {self.size} fits in one chunk of {self.chunk_size} bytes; such a file is one "
                    "object, without a manifest")
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            return f"{len(self.chunks)} chunks, but {self.size} bytes in chunks of {self.chunk_size} make {expected}"
        offset = 0
        for i, c in enumerate(self.chunks):
            if not isinstance(c, ChunkRef):
                return f"chunk {i} is not a chunk"
            if not _is_int(c.offset) or c.offset != offset:
                return f"chunk {i} starts at {c.offset!r}, not {offset} (chunks must be contiguous from 0)"
            want = min(self.chunk_size, self.size - offset)
            if not _is_int(c.size) or c.size != want:
                return (f"chunk {i} has {c.size!r} bytes, not {want} (every chunk but the last has chunk_size "
                        f"{self.chunk_size} bytes)")
            if not isinstance(c.sha256, str) or not _HEX64.match(c.sha256):
                return f"chunk {i}: sha256 {c.sha256!r:.70} is not 64 lowercase hex digits"
            offset += c.size
        if offset != self.size:  # cannot happen after the checks above; kept as the rule itself
            return f"chunks add up to {offset} bytes, not size {self.size}"
        return None

    def to_json(self) -> str:
        return json.dumps({"profile": self.profile, "size": self.size, "sha256": self.sha256,
                           "chunk_size": self.chunk_size,
                           "chunks": [{"offset": c.offset, "size": c.size, "sha256": c.sha256} for c in self.chunks]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> BucketManifest:
        """Parse and check a manifest; :class:`InvalidManifest` names what is wrong."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidManifest(f"manifest is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise InvalidManifest(f"manifest is a JSON {type(raw).__name__}, not an object")
        fields = {"profile", "size", "sha256", "chunk_size", "chunks"}
        if set(raw) != fields:
            missing, extra = sorted(fields - set(raw)), sorted(set(raw) - fields)
            raise InvalidManifest("manifest " + "; ".join(filter(None, [
                missing and f"lacks {', '.join(missing)}", extra and f"has unknown fields {', '.join(extra)}"])))
        if not isinstance(raw["chunks"], list):
            raise InvalidManifest("manifest chunks is not a list")
        chunks = []
        for i, c in enumerate(raw["chunks"]):
            if not isinstance(c, dict) or set(c) != {"offset", "size", "sha256"}:
                raise InvalidManifest(f"manifest chunk {i} is not {{\"offset\", \"size\", \"sha256\"}}")
            chunks.append(ChunkRef(c["offset"], c["size"], c["sha256"]))
        return cls(raw["size"], raw["sha256"], raw["chunk_size"], tuple(chunks), raw["profile"])

    @classmethod
    def for_chunks(cls, sha256: str, size: int, chunk_size: int, chunk_hashes: list[str]) -> BucketManifest:
        """The manifest of a file of ``size`` bytes cut in ``chunk_size`` chunks with these hashes."""
        chunks = tuple(ChunkRef(off, min(chunk_size, size - off), h)
                       for off, h in zip(range(0, size, chunk_size), chunk_hashes, strict=True))
        return cls(size, sha256, chunk_size, chunks)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chunk_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, size) of the chunks of a file of ``size`` bytes."""
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


# -- the marker -------------------------------------------------------------------------------------
class LayoutError(BucketError, UserError):
    """A bucket this version cannot use: a newer layout, or a marker that is not kachery's."""


MARKER = json.dumps({"layout": LAYOUT, "version": VERSION}, separators=(",", ":")).encode()
_MARKER_READS = 3
_NOT_JSON = "is not JSON"

_checked: weakref.WeakKeyDictionary[Bucket, bool] = weakref.WeakKeyDictionary()  # bucket -> marker written
_checked_lock = threading.Lock()


def check_layout(bucket: Bucket, *, write: bool) -> None:
    """Check the bucket's marker once per bucket object (and, with ``write``, create it if absent).

    A marker naming a higher version, or not a kachery marker, is a one-line :class:`LayoutError`;
    only an answer read twice alike is believed, so a bit flipped on the way refuses no bucket."""
    with _checked_lock:
        done = _checked.get(bucket)
    if done or (done is not None and not write):
        return
    version = _read_marker(bucket)
    if version is None and write:
        try:
            bucket.write(MARKER_KEY, MARKER)
        except AlreadyExists:  # another node wrote it meanwhile: check what it wrote
            version = _read_marker(bucket)
    if version is not None and version > VERSION:
        raise LayoutError(f"{bucket.uri} was written by a newer kachery-tasks (bucket layout version {version}; "
                          f"this one knows version {VERSION}): upgrade kachery-tasks to use it", bucket.uri,
                          MARKER_KEY)
    with _checked_lock:
        _checked[bucket] = bool(write or _checked.get(bucket))


def _read_marker(bucket: Bucket) -> int | None:
    """The version in the marker (None if there is none), once two reads agree (a marker that does
    not parse, as a truncated read, is read again up to the limit)."""
    answers: list[int | str] = []
    for _ in range(_MARKER_READS + 1):
        try:
            raw = b"".join(bucket.read(MARKER_KEY, 0, 4096))
        except NotFound:
            return None
        answer = _marker_version(raw)
        if answer == VERSION or (answers and answers[-1] == answer and answer != _NOT_JSON):
            return answer if isinstance(answer, int) else _refuse(bucket, answer)
        answers.append(answer)
    answer = answers[-1]
    return answer if isinstance(answer, int) else _refuse(bucket, answer)


def _refuse(bucket: Bucket, answer: str) -> None:
    raise LayoutError(f"{bucket.uri}: {MARKER_KEY} {answer}; this is not a kachery bucket, or a damaged one "
                      "(use another bucket, or remove that object if the bucket is yours)", bucket.uri, MARKER_KEY)


def _marker_version(raw: bytes) -> int | str:
    """The version in a marker, or a string saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON
    if not isinstance(data, dict) or data.get("layout") != LAYOUT:
        return f"does not say \"layout\": \"{LAYOUT}\""
    version = data.get("version")
    if not _is_int(version) or version < 1:
        return f"has no valid version ({version!r})"
    return version


__all__ = [
    "CHUNK_SIZE",
    "MARKER_KEY",
    "BucketManifest",
    "ChunkRef",
    "InvalidManifest",
    "LayoutError",
    "blob_key",
    "check_layout",
    "chunk_spans",
    "feed_head_key",
    "feed_key",
    "feed_prefix",
    "feed_segment_key",
    "file_marker_key",
    "file_markers_prefix",
    "manifest_key",
    "record_key",
    "records_prefix",
]
