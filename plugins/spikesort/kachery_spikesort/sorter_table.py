"""Checking a config's sorter parameters without importing spikeinterface's sorter registry.

A batch is checked before anything expensive runs, and that check happens on every run, the
all-cached rerun included. Importing ``spikeinterface.sorters`` to ask it costs about half a
second (numba, the extractors, every sorter class), more than the rest of a cached rerun. So the
parameter names of spikeinterface's internal sorters are written down here, per spikeinterface
version; tests/test_spikesort.py proves the table equals what the registry answers. A sorter not
in the table (an external one a user installed) or a spikeinterface version not in it falls back
to the registry, so the table can only make a check faster, never change its verdict.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ConfigError

#: spikeinterface version -> sorter -> the names ``get_default_sorter_params(sorter)`` returns.
#: Internal sorters only: they are installed whenever spikeinterface is.
SORTER_PARAMS: dict[str, dict[str, frozenset[str]]] = {
    "0.105.3": {
        "simple": frozenset({
            "apply_preprocessing", "clusterer", "clusterer_kwargs", "detect_threshold", "freq_max", "freq_min",
            "job_kwargs", "ms_after", "ms_before", "n_svd_components_per_channel", "peak_sign", "seed",
        }),
        "spykingcircus2": frozenset({
            "apply_motion_correction", "apply_preprocessing", "apply_whitening", "cache_preprocessing",
            "chunk_preprocessing", "cleaning", "clustering", "debug", "detection", "deterministic_peaks_detection",
            "filtering", "general", "job_kwargs", "matching", "merging", "min_firing_rate", "motion_correction",
            "multi_units_only", "seed", "selection", "whitening",
        }),
        "tridesclous2": frozenset({
            "apply_motion_correction", "apply_preprocessing", "cache_preprocessing_mode", "clustering_ms_after",
            "clustering_ms_before", "clustering_recursive_depth", "debug", "detect_threshold",
            "detection_radius_um", "features_radius_um", "freq_max", "freq_min", "gather_mode", "job_kwargs",
            "merge_similarity_lag_ms", "min_firing_rate", "motion_correction_preset", "ms_after", "ms_before",
            "n_pca_features", "n_peaks_per_channel", "n_svd_components_per_channel", "peak_sign",
            "preprocessing_dict", "save_array", "seed", "split_radius_um", "template_max_jitter_ms",
            "template_min_snr_ptp", "template_radius_um", "template_sparsify_threshold",
        }),
    },
}


@functools.lru_cache(maxsize=1)
def spikeinterface_version() -> str | None:
    """The installed spikeinterface's version, read from its metadata (no import)."""
    try:
        return version("spikeinterface")
    except PackageNotFoundError:
        return None


def known_params(sorter: str) -> frozenset[str] | None:
    """The parameter names of ``sorter`` from the table, or None when the table cannot answer."""
    return SORTER_PARAMS.get(spikeinterface_version() or "", {}).get(sorter)


def registry_params(sorter: str) -> frozenset[str]:
    """The parameter names of ``sorter`` asked of spikeinterface's registry (slow: imports it)."""
    import spikeinterface.sorters as ss

    installed = ss.installed_sorters()
    if sorter not in installed:
        raise ConfigError(f"sorter {sorter!r} is not installed; installed: {', '.join(installed)}")
    return frozenset(ss.get_default_sorter_params(sorter))


def check_sorter_params(sorter: str, params: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``sorter`` is not installed or ``params`` has a key it does
    not take (top-level keys: nested dicts are the sorter's to check)."""
    known = known_params(sorter)
    if known is None:
        known = registry_params(sorter)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for sorter {sorter!r}")
