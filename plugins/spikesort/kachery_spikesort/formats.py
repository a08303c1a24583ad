"""Real-format inputs: a raw binary file in the store, described by a small JSON.

The description (inline dict, or a JSON file in the store) has:

``sampling_frequency`` (Hz, required), ``num_channels`` (required), ``dtype`` (required, e.g.
``"int16"``), and optionally ``gain_to_uV`` (1.0), ``offset_to_uV`` (0.0), ``file_offset`` (header
bytes to skip, 0), ``time_axis`` (0: samples are rows, the usual interleaved ``.dat``), and the
geometry: ``channel_locations`` (a list of ``[x, y]`` in µm, one per channel) or
``probe_pitch_um`` (a single-column linear probe with this pitch; the default, 25 µm).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kachery_tasks import load_file

REQUIRED = ("sampling_frequency", "num_channels", "dtype")
DEFAULTS: dict[str, Any] = {
    "gain_to_uV": 1.0,
    "offset_to_uV": 0.0,
    "file_offset": 0,
    "time_axis": 0,
}
ALLOWED = set(REQUIRED) | set(DEFAULTS) | {"channel_locations", "probe_pitch_um"}
FORMATS = ("binary",)


def normalize_binary_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Check a binary-file description and fill defaults, so equal descriptions hash equal."""
    if not isinstance(meta, dict):
        raise ValueError(f"a binary recording is described by a dict, not {type(meta).__name__}")
    unknown = sorted(set(meta) - ALLOWED)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the binary description; allowed: {sorted(ALLOWED)}")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"the binary description needs {missing}")
    out = {**DEFAULTS, **meta}
    out["sampling_frequency"] = float(out["sampling_frequency"])
    out["num_channels"] = int(out["num_channels"])
    out["dtype"] = np.dtype(out["dtype"]).str
    out["gain_to_uV"] = float(out["gain_to_uV"])
    out["offset_to_uV"] = float(out["offset_to_uV"])
    out["file_offset"] = int(out["file_offset"])
    out["time_axis"] = int(out["time_axis"])
    if out["time_axis"] not in (0, 1):
        raise ValueError("time_axis is 0 (samples are rows) or 1 (channels are rows)")
    if "channel_locations" in out:
        locations = [[float(x) for x in loc] for loc in out["channel_locations"]]
        if len(locations) != out["num_channels"] or any(len(loc) != 2 for loc in locations):
            raise ValueError("channel_locations needs one [x, y] pair per channel")
        out["channel_locations"] = locations
        out.pop("probe_pitch_um", None)
    else:
        out["probe_pitch_um"] = float(out.get("probe_pitch_um", 25.0))
    return out


def check_binary_size(nbytes: int, meta: dict[str, Any]) -> int:
    """The number of samples a file of ``nbytes`` holds; raises if it is not a whole number."""
    frame = meta["num_channels"] * np.dtype(meta["dtype"]).itemsize
    payload = nbytes - meta["file_offset"]
    if payload <= 0 or payload % frame:
        raise ValueError(
            f"a binary file of {nbytes} bytes does not hold whole frames of {meta['num_channels']} channels "
            f"of {meta['dtype']} after a {meta['file_offset']}-byte header"
        )
    return payload // frame


def read_binary_recording(uri: str, meta: dict[str, Any]):
    """The stored raw binary file ``uri`` as a lazy spikeinterface recording with a probe."""
    import spikeinterface.extractors as se
    from probeinterface import Probe

    path = load_file(uri)
    recording = se.read_binary(
        file_paths=[str(path)],
        sampling_frequency=meta["sampling_frequency"],
        dtype=meta["dtype"],
        num_channels=meta["num_channels"],
        gain_to_uV=meta["gain_to_uV"],
        offset_to_uV=meta["offset_to_uV"],
        file_offset=meta["file_offset"],
        time_axis=meta["time_axis"],
        is_filtered=False,
    )
    n = meta["num_channels"]
    if "channel_locations" in meta:
        positions = np.asarray(meta["channel_locations"], dtype=float)
    else:
        positions = np.column_stack([np.zeros(n), np.arange(n) * meta["probe_pitch_um"]])
    probe = Probe(ndim=2, si_units="um")
    probe.set_contacts(positions=positions, shapes="circle", shape_params={"radius": 5})
    probe.set_device_channel_indices(np.arange(n))
    recording.set_probe(probe)  # in place in spikeinterface 0.105
    return recording
