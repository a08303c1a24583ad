"""The public file API: store and load files, bytes, JSON and numpy arrays by ``sha256://`` URI.

Every function acts on the store of the home in force (``kachery_tasks.config``). Loads verify the
bytes against their hash before handing any out; see docs/files.md. Loads that read every byte
(``load_bytes``, ``load_json``) hash as they read, so they also catch bit rot that left the blob's
verified stamp as it was; ``load_file`` and ``load_npy`` must take milliseconds, so they trust a
matching stamp (``kachery verify`` is the scrub for rot under one).
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..errors import CodecError, NotFoundError, ReadOnlyStoreError, UserError
from .blobs import BlobStore, Progress
from .codecs import encode_json, is_plain_json, npy_blocks
from .local import current_store
from .uris import file_uri, parse_file_uri


def _writable():
    if config.get("read_only"):
        raise ReadOnlyStoreError("the configuration says read_only: nothing can be stored; unset read_only to store")
    return current_store().blobs


def store_file(path: str | os.PathLike, label: str | None = None, *, link: bool = False,
               progress: Progress | None = None) -> str:
    """Store the file at ``path`` and return its URI; a file already stored is not copied again."""
    source = Path(path)
    if not source.is_file():
        what = "a directory" if source.is_dir() else "not found"
        raise UserError(f"cannot store {str(source)!r}: {what}; give the path of a regular file")
    digest = _writable().put_file(source, link=link, progress=progress)
    return file_uri(digest, label if label is not None else source.name)


def store_bytes(data: bytes, label: str | None = None) -> str:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UserError(f"store_bytes takes bytes, not {type(data).__name__}; use store_json for data")
    return file_uri(_writable().put_bytes(data), label)


def store_json(obj: Any, label: str | None = None) -> str:
    """Store plain JSON data (None, bool, int, finite float, str, list, dict with str keys), which
    :func:`load_json` gives back unchanged; anything else is a :class:`CodecError` saying where."""
    if not is_plain_json(obj):
        where, value = _first_non_json(obj, "value")
        raise CodecError(
            f"store_json stores plain JSON data (None, bool, 64-bit int, finite float, str, list, dict with "
            f"str keys); {where} is the {type(value).__name__} {reprlib.repr(value)}, which would not load "
            "back unchanged: convert it first (a list for a tuple, str keys for a dict), or use store_npy "
            "for an array or store_bytes for bytes you serialize yourself"
        )
    return file_uri(_writable().put_bytes(encode_json(obj)), label)


def _first_non_json(value: Any, where: str) -> tuple[str, Any]:
    """Where in ``value`` the first part that is not plain JSON sits, and that part."""
    if type(value) is list:
        for i, item in enumerate(value):
            if not is_plain_json(item):
                return _first_non_json(item, f"{where}[{i}]")
    elif type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"the key {key!r} of {where}", key
            if not is_plain_json(item):
                return _first_non_json(item, f"{where}[{key!r}]")
    return where, value


def store_npy(array: np.ndarray, label: str | None = None) -> str:
    return file_uri(_writable().put_stream(npy_blocks(np.asanyarray(array))), label)


#: Sources of blobs missing from the store, asked in order: each takes (sha256, the store's blobs)
#: and returns True once it has put the blob there, verified. The buckets layer adds the configured
#: buckets (buckets/fetch.py); the store itself knows no remote.
FETCHERS: list[Callable[[str, BlobStore], bool]] = []


def local_blobs(sha256: str) -> BlobStore:
    """The store's blobs, with ``sha256`` fetched into them first if it is missing and a source
    (a configured bucket) has it; a blob nowhere stays missing (the read then says so)."""
    blobs = current_store().blobs
    if not blobs.exists(sha256):
        for fetch in FETCHERS:
            if fetch(sha256, blobs):
                break
    return blobs


def load_file(uri: str) -> Path:
    """Path of the verified local copy of ``uri`` (read it, never write to it): hashed unless its
    verified stamp still matches. A file missing here is fetched from the configured buckets."""
    sha256 = parse_file_uri(uri).sha256
    return local_blobs(sha256).verified_path(sha256)


def load_bytes(uri: str) -> bytes:
    """The bytes of ``uri``, hashed as they are read; :class:`IntegrityError` (the blob quarantined)
    if they do not match, whatever the stamp says. A file missing here is fetched from the
    configured buckets."""
    sha256 = parse_file_uri(uri).sha256
    return local_blobs(sha256).read_bytes(sha256)


def load_json(uri: str) -> Any:
    """The JSON value stored at ``uri``, read through :func:`load_bytes` (hashed as read)."""
    data = load_bytes(uri)
    try:
        return json.loads(data)
    except ValueError:
        raise UserError(f"{uri} is not a JSON file; load it with load_bytes or load_file") from None


def load_npy(uri: str, mmap: bool = True) -> np.ndarray:
    """The array stored at ``uri``; memory-mapped read-only by default, so it loads in milliseconds
    (verified as :func:`load_file` is: a matching stamp skips the hash)."""
    path = load_file(uri)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError:
        raise UserError(f"{uri} is not a .npy array file; load it with load_file") from None


def file_info(uri: str) -> dict[str, Any]:
    """What the store knows of ``uri``: size, path, chunk manifest (without re-hashing)."""
    parsed = parse_file_uri(uri)
    blobs = local_blobs(parsed.sha256)
    if not blobs.exists(parsed.sha256):
        raise NotFoundError(f"{uri} is not found in this node's store; store it first with `kachery store`")
    manifest = blobs.manifest(parsed.sha256)
    return {
        "uri": str(parsed),
        "sha256": parsed.sha256,
        "label": parsed.label,
        "size": blobs.size(parsed.sha256),
        "path": str(blobs.path(parsed.sha256)),
        "chunks": len(manifest.chunks) if manifest else 1,
    }
