"""Parsing of ``sha256://`` URIs, strictly, because a URI turns into a path in the store.

Only exactly 64 lowercase hex characters are a hash, so no URI can name a path outside the store
(``sha256://../../etc/passwd`` is an error, not a lookup).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlencode

from ..errors import InvalidURI

_URI = re.compile(r"^sha256://([0-9a-f]{64})(?:\?(.*))?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileURI:
    sha256: str
    label: str | None = None

    def __str__(self) -> str:
        if self.label:
            return f"sha256://{self.sha256}?{urlencode({'label': self.label}, quote_via=quote)}"
        return f"sha256://{self.sha256}"


def parse_file_uri(uri: str) -> FileURI:
    """Split a file URI into hash and label; anything malformed raises :class:`InvalidURI`."""
    if not isinstance(uri, str):
        raise InvalidURI(f"a file URI is a string like sha256://<64 hex>, not {type(uri).__name__}")
    match = _URI.match(uri.strip())
    if match is None:
        raise InvalidURI(
            f"{uri!r} is not a file URI; expected sha256://<64 lowercase hex characters>[?label=NAME]"
        )
    label = None
    if match.group(2):
        query = parse_qs(match.group(2), keep_blank_values=True)
        unknown = set(query) - {"label"}
        if unknown:
            raise InvalidURI(f"{uri!r} has unknown parameter(s) {sorted(unknown)}; only label= is allowed")
        label = query.get("label", [None])[-1] or None
    return FileURI(match.group(1), label)


def check_sha256_hex(text: str) -> str:
    """Return ``text`` if it is a SHA-256 hex digest, else raise :class:`InvalidURI`."""
    if not isinstance(text, str) or not _HEX64.match(text):
        raise InvalidURI(f"{text!r} is not a SHA-256 hash (64 lowercase hex characters)")
    return text


def file_uri(sha256: str, label: str | None = None) -> str:
    return str(FileURI(check_sha256_hex(sha256), label))
