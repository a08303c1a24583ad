"""Chunk manifests, profile ``c1``: how a file over 16 MiB moves between nodes.

``{"profile":"c1","size":N,"sha256":"…","chunks":[{"offset":o,"size":s,"xxh3_128":"…"}]}``. Each
16 MiB chunk carries a fast hash so a transfer can resume and check per chunk; the whole file is
still checked against its SHA-256 at the end. Computed while the file is stored, at no extra read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import xxhash

CHUNK_SIZE = 16 * 2**20
PROFILE = "c1"


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class Manifest:
    size: int
    sha256: str
    chunks: tuple[Chunk, ...] = field(default_factory=tuple)
    profile: str = PROFILE

    def to_json(self) -> str:
        return json.dumps(
            {
                "profile": self.profile,
                "size": self.size,
                "sha256": self.sha256,
                "chunks": [{"offset": c.offset, "size": c.size, "xxh3_128": c.xxh3_128} for c in self.chunks],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("profile") != PROFILE:
            raise ValueError(f"unknown chunk profile {raw.get('profile')!r}")
        chunks = tuple(Chunk(c["offset"], c["size"], c["xxh3_128"]) for c in raw["chunks"])
        return cls(raw["size"], raw["sha256"], chunks)


class ChunkHasher:
    """Fed the bytes of a file in any block sizes; yields its c1 chunk hashes."""

    def __init__(self) -> None:
        self._chunks: list[Chunk] = []
        self._hasher = xxhash.xxh3_128()
        self._offset = 0  # start of the current chunk
        self._filled = 0  # bytes of the current chunk seen so far

    def update(self, block: bytes | memoryview) -> None:
        view = memoryview(block)
        while view:
            take = min(len(view), CHUNK_SIZE - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK_SIZE:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self._chunks.append(Chunk(self._offset, self._filled, self._hasher.hexdigest()))
        self._offset += self._filled
        self._filled = 0
        self._hasher.reset()

    def manifest(self, sha256: str) -> Manifest | None:
        """The manifest, or None for a file of at most one chunk (it moves whole)."""
        if self._filled:
            self._close_chunk()
        size = self._offset
        if size <= CHUNK_SIZE:
            return None
        return Manifest(size, sha256, tuple(self._chunks))
