"""``File``: a reference to stored bytes that tasks can take and return.

A task argument that is a ``File`` is identified by its content hash, never by a path, so moving or
renaming a file keeps its cache and editing it changes the id.
"""

from __future__ import annotations

from pathlib import Path

from .files import load_bytes, load_file
from .uris import FileURI, parse_file_uri


class File:
    """A stored file, named by its ``sha256://`` URI. ``os.fspath(f)`` gives a verified local path."""

    __slots__ = ("_uri",)
    __kachery_type__ = "kachery_tasks.File"

    def __init__(self, uri: str | File):
        self._uri: FileURI = uri._uri if isinstance(uri, File) else parse_file_uri(uri)

    @property
    def uri(self) -> str:
        return str(self._uri)

    @property
    def sha256(self) -> str:
        return self._uri.sha256

    @property
    def label(self) -> str | None:
        return self._uri.label

    @property
    def path(self) -> Path:
        """The verified local copy (see ``load_file``)."""
        return load_file(self.uri)

    def __fspath__(self) -> str:
        return str(self.path)

    def read_bytes(self) -> bytes:
        return load_bytes(self.uri)

    def __kachery_canon__(self) -> str:
        # The label is a display name: the same bytes under another label are the same input.
        return self.sha256

    def __eq__(self, other: object) -> bool:
        return isinstance(other, File) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return f"File({self.uri!r})"

    def __reduce__(self):
        return (File, (self.uri,))
