"""Large task arguments kept as content-addressed blobs, so that ordinary calls can be replayed.

A record keeps each argument in a form ``kachery task rerun`` / ``stale --rerun`` / ``recheck`` can
rebuild (recording.py). Small values go inside the record; an array or a byte string too large for
it (``record_args_max_bytes``) is written to the store as a blob, up to ``record_args_blob_max_bytes``,
and the record's ``args`` entry refers to it by file URI, beside the argument's hash:

    "signal": {"hash": "<xxh3-128>", "blob": "sha256://<hex>", "codec": "npy", "size": 320128}

Blobs are named by their SHA-256, so a recording passed to 50 tasks is stored once. Each process
also remembers which blob holds a value of a given canonical hash (the hash the task id is made
from), so the same array passed to many calls is hashed and written once, not once per call: any
blob whose value has that canonical hash replays the call with the same task id. Replay reads the
blob verified (blobs.py), so a damaged blob makes the call not replayable, never wrong.

Codecs: ``npy`` for numpy arrays of fixed-size dtypes (``ndarray`` and ``memmap``, which hash alike;
loaded by copy-on-write memory map), ``bytes`` and ``bytearray`` (raw), ``json`` for plain data.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import orjson

from ..store.blobs import BlobStore
from ..store.codecs import decode_json, npy_blocks
from ..store.task_record import ArgEntry
from ..store.uris import file_uri, parse_file_uri
from .results import private_array

_MEMO_LIMIT = 4096
_memo: dict[tuple[str, str, str], tuple[str, int]] = {}  # (blob root, canonical hash, codec) -> (sha256, size)
_memo_lock = threading.Lock()


def blob_codec(value: Any) -> str | None:
    """The codec a value is kept with as a blob argument, or None if it is not kept that way."""
    if type(value) in (np.ndarray, np.memmap):  # other subclasses have hashes of their own, or none
        # object and string-object dtypes have no npy form; datetimes none that npy_blocks can buffer
        return None if value.dtype.hasobject or value.dtype.kind in "TMm" else "npy"
    if type(value) is bytes:
        return "bytes"
    if type(value) is bytearray:
        return "bytearray"
    return None


def size_of(value: Any, codec: str) -> int:
    """Bytes of the value's data, known without encoding it (the blob of an array adds its header)."""
    if codec == "npy":
        return int(value.nbytes)
    return len(value)


def keep(value: Any, codec: str, value_hash: str, blobs: BlobStore) -> dict[str, Any]:
    """Write ``value`` as a blob (unless this process already did) and return the entry fields.

    A full disk raises :class:`StoreFullError` with nothing partial left (blobs.py); the caller
    records the argument as not kept."""
    key = (str(blobs.root), value_hash, codec)
    known = _memo.get(key)
    if known is not None and blobs.exists(known[0]):
        return _fields(known[0], codec, known[1])
    if codec == "npy":
        digest = blobs.put_stream(npy_blocks(value))
    elif codec == "json":
        digest = blobs.put_bytes(orjson.dumps(value))
    else:
        digest = blobs.put_bytes(bytes(value) if codec == "bytearray" else value)
    size = blobs.size(digest)
    with _memo_lock:
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = (digest, size)
    return _fields(digest, codec, size)


def keep_json(value: Any, value_hash: str, blobs: BlobStore) -> dict[str, Any]:
    """Plain data too large for the record, as a ``json`` blob (never a pickle: loading it runs no code)."""
    return keep(value, "json", value_hash, blobs)


def _fields(digest: str, codec: str, size: int) -> dict[str, Any]:
    return {"blob": file_uri(digest), "codec": codec, "size": size}


def load(entry: ArgEntry, blobs: BlobStore) -> Any:
    """The value of a ``blob`` argument entry, read verified. Raises the store's ``NotFoundError``
    or ``IntegrityError`` (a damaged blob is quarantined) and ``ValueError`` for an unknown codec."""
    digest = parse_file_uri(entry.blob).sha256
    codec = entry.codec
    if codec == "npy":
        return private_array(str(blobs.verified_path(digest)))
    if codec not in ("bytes", "bytearray", "json"):
        raise ValueError(f"unknown codec {codec!r} (a newer kachery-tasks wrote this record?)")
    data = blobs.read_bytes(digest)
    if codec == "json":
        return decode_json(data)
    return bytearray(data) if codec == "bytearray" else data


__all__ = ["blob_codec", "keep", "keep_json", "load", "size_of"]
