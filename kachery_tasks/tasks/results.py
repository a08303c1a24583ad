"""Results in task records: encode a value with its codec, and load it back only if complete.

A record is a hit only if every blob it references is there with the size the record says; a
missing or damaged blob makes the record incomplete, the caller sets it aside and recomputes, and the
recompute replaces the blob (the blob store checks an existing blob before it skips a write).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ..errors import CodecError, IntegrityError, NotFoundError
from ..store.blobs import BlobStore
from ..store.codecs import (
    check_codec,
    choose_codec,
    decode_json,
    decode_pickle,
    encode_json,
    encode_pickle,
    npy_blocks,
)
from ..store.task_record import ResultRef
from ..store.uris import file_uri


class IncompleteRecord(Exception):
    """A record whose result blob is missing or damaged: not a hit."""


@dataclass(frozen=True)
class Loaded:
    """A decoded result plus what the memory tier should keep to serve it again."""

    value: Any
    memo: tuple[str, Any]  # ("json"|"pickle", bytes) decoded afresh per hit, ("npy", blob path) mapped
    # afresh per hit: every hit gets a value of its own
    nbytes: int


def encode_result(value: Any, codec: str | None, blobs: BlobStore, inline_max: int) -> dict[str, Any]:
    """The ``result`` field of a record for ``value``; large encodings go to the blob store."""
    check_codec(codec)
    codec = codec or choose_codec(value)
    if codec == "npy":
        if not isinstance(value, np.ndarray):
            raise CodecError(f"codec 'npy' stores numpy arrays, not {type(value).__name__}; use codec='pickle'")
        digest = blobs.put_stream(npy_blocks(value))
        return {"codec": "npy", "uri": file_uri(digest), "size": blobs.size(digest),
                "shape": list(value.shape), "dtype": value.dtype.str}
    data = encode_json(value) if codec == "json" else encode_pickle(value)
    if len(data) <= inline_max:
        if codec == "json":
            return {"codec": "json", "inline": value, "size": len(data)}
        return {"codec": codec, "inline_b64": base64.b64encode(data).decode(), "size": len(data)}
    digest = blobs.put_bytes(data)
    return {"codec": codec, "uri": file_uri(digest), "size": len(data)}


def check_complete(result: ResultRef, blobs: BlobStore) -> None:
    """Raise :class:`IncompleteRecord` unless the result's blob exists with its recorded size."""
    digest = result.sha256
    if digest is None:  # inline
        return
    try:
        size = blobs.size(digest)
    except NotFoundError:
        raise IncompleteRecord(f"result blob {result.uri} is missing") from None
    if size != result.size:
        raise IncompleteRecord(f"result blob {result.uri} has {size} bytes, the record says {result.size}")


def load_result(result: ResultRef, blobs: BlobStore) -> Loaded:
    """Decode a record's result; any trouble with its blob is :class:`IncompleteRecord`."""
    codec, form = result.codec, result.form
    if form == "inline":
        # the record was parsed just now, so its value is a fresh object nobody else holds; the
        # memory tier keeps its text and decodes a copy per hit
        value = result.value
        data = orjson.dumps(value)  # it came from orjson.loads of the record: it round-trips
        return Loaded(value, ("json", data), len(data))
    if form == "inline_b64":
        data = base64.b64decode(result.value)
        return Loaded(decode_pickle(data), ("pickle", data), len(data))
    check_complete(result, blobs)
    digest = result.sha256
    try:
        if codec == "npy":
            path = str(blobs.verified_path(digest))
            return Loaded(private_array(path), ("npy", path), 4096)
        # json and pickle read every byte anyway: read_bytes hashes them as it reads (bit rot under
        # an unchanged stamp too), and a mismatch quarantines the blob and sets the record aside
        data = blobs.read_bytes(digest)
    except (NotFoundError, IntegrityError) as exc:
        raise IncompleteRecord(str(exc)) from None
    if codec == "json":
        return Loaded(decode_json(data), ("json", data), len(data))
    return Loaded(decode_pickle(data), ("pickle", data), len(data))


def private_array(path: str) -> np.ndarray:
    """The array of a verified ``.npy`` blob as a plain, writable ``ndarray`` of the caller's own.

    Mapped copy-on-write: loading takes milliseconds whatever the size, pages are read from the
    blob only when touched, and a write goes to a private copy of its page, never to the blob (which
    is read-only on disk anyway) nor to any other caller's array. A result is then the same type,
    and as writable, on a hit as on the call that computed it (``result += 1`` works on both)."""
    return np.load(path, mmap_mode="c", allow_pickle=False).view(np.ndarray)


def from_memo(memo: tuple[str, Any]) -> Any:
    kind, payload = memo
    if kind == "json":
        return decode_json(payload)
    if kind == "pickle":
        return decode_pickle(payload)
    return private_array(payload)  # "npy": a private map per hit, callers may write to it
