"""Handles: small picklable references to recordings and sortings kept in the kachery store.

Task results are never open spikeinterface objects. A stage returns a handle, and the next stage
calls ``handle.load()`` to get a lazy spikeinterface object back. A handle's canonical form
(``__kachery_canon__``) is plain data: the content hash of the stored bytes, the kind of storage
and the parameters needed to read them. So the task id of a downstream stage is a Merkle hash of
what it reads, never of a temporary path, and the same recording reached two ways is one input.

Kinds:

- ``"si_folder"``: a spikeinterface folder (binary-folder recording or numpy-folder sorting)
  packed as one deterministic tar (see :mod:`kachery_spikesort.packing`).
- ``"binary"``: a user's raw binary file (``.dat``/``.bin``), read with
  ``spikeinterface.extractors.read_binary`` using ``params`` (sampling frequency, channel count,
  dtype, gains, probe geometry).
"""

from __future__ import annotations

from typing import Any

from kachery_tasks.store import parse_file_uri

from .packing import unpacked_folder

RECORDING_KINDS = ("si_folder", "binary")


class RecordingRef:
    """A recording in the store. ``ground_truth`` (a :class:`SortingRef`) travels with recordings
    that have one (generated ones, and what preprocessing makes of them). ``info`` is display
    data (channels, duration, ...) and is not part of the identity."""

    __kachery_type__ = "kachery_spikesort.RecordingRef"

    def __init__(self, uri: str, kind: str, params: dict[str, Any] | None = None,
                 ground_truth: SortingRef | None = None, info: dict[str, Any] | None = None):
        if kind not in RECORDING_KINDS:
            raise ValueError(f"unknown recording kind {kind!r}; use one of {', '.join(RECORDING_KINDS)}")
        parse_file_uri(uri)  # fails early on something that is not a sha256:// URI
        self.uri = uri
        self.kind = kind
        self.params = dict(params or {})
        self.ground_truth = ground_truth
        self.info = dict(info or {})

    @property
    def sha256(self) -> str:
        return parse_file_uri(self.uri).sha256

    def __kachery_canon__(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "kind": self.kind,
            "params": self.params,
            "ground_truth": None if self.ground_truth is None else self.ground_truth.__kachery_canon__(),
        }

    def load(self):
        """The recording as a lazy spikeinterface object (traces memory-mapped, nothing read yet)."""
        if self.kind == "si_folder":
            import spikeinterface as si

            return si.load(unpacked_folder(self.uri))
        from .formats import read_binary_recording

        return read_binary_recording(self.uri, self.params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordingRef) and other.__kachery_canon__() == self.__kachery_canon__()

    def __hash__(self) -> int:
        return hash((self.sha256, self.kind))

    def __repr__(self) -> str:
        gt = ", ground_truth" if self.ground_truth is not None else ""
        return f"RecordingRef({self.uri!r}, kind={self.kind!r}{gt})"


class SortingRef:
    """A sorting in the store, packed numpy folder. ``info`` (sorter, units, run time) is display
    data, not identity."""

    __kachery_type__ = "kachery_spikesort.SortingRef"

    def __init__(self, uri: str, info: dict[str, Any] | None = None):
        parse_file_uri(uri)
        self.uri = uri
        self.info = dict(info or {})

    @property
    def sha256(self) -> str:
        return parse_file_uri(self.uri).sha256

    def __kachery_canon__(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "kind": "si_folder"}

    def load(self):
        import spikeinterface as si

        return si.load(unpacked_folder(self.uri))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SortingRef) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return f"SortingRef({self.uri!r})"
