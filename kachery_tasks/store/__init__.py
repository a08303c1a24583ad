"""Content-addressed blobs, chunk manifests, task records, result codecs and mutables."""

from typing import Any

from .blobs import BlobStore
from .file import File
from .files import (
    file_info,
    load_bytes,
    load_file,
    load_json,
    load_npy,
    store_bytes,
    store_file,
    store_json,
    store_npy,
)
from .local import LocalStore, current_store, store_for
from .manifest import CHUNK_SIZE, Manifest
from .uris import FileURI, file_uri, parse_file_uri


def set_mutable(key: str, value: Any) -> None:
    """Set ``key`` to a JSON value in this home's mutables database."""
    current_store().mutables.set(key, value)


def get_mutable(key: str, default: Any = None) -> Any:
    return current_store().mutables.get(key, default)


def delete_mutable(key: str) -> bool:
    return current_store().mutables.delete(key)


__all__ = [
    "CHUNK_SIZE",
    "BlobStore",
    "File",
    "FileURI",
    "LocalStore",
    "Manifest",
    "current_store",
    "delete_mutable",
    "file_info",
    "file_uri",
    "get_mutable",
    "load_bytes",
    "load_file",
    "load_json",
    "load_npy",
    "parse_file_uri",
    "set_mutable",
    "store_bytes",
    "store_file",
    "store_for",
    "store_json",
    "store_npy",
]
