"""Sorter parameters (names and defaults) without importing spikeinterface's sorter registry.

A batch is checked before anything expensive runs, and that check happens on every run, the
all-cached rerun included; so is the results table, which labels each sort with the parameters it
was given that differ from the sorter's defaults. Importing ``spikeinterface.sorters`` to ask it
costs about half a second (numba, the extractors, every sorter class), more than the rest of a
cached rerun. So the default parameters of spikeinterface's internal sorters are written down here,
per spikeinterface version; tests/test_spikesort.py proves the table equals what the registry
answers. A sorter not in the table (an external one a user installed) or a spikeinterface version
not in it falls back to the registry, so the table can only make a check or a label faster, never
change it.
"""

from __future__ import annotations

import functools
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ConfigError

#: spikeinterface version -> sorter -> what ``get_default_sorter_params(sorter)`` returns: the names a
#: sorter takes (its keys) and their defaults (its values, which the results table compares a sort's
#: params with). Internal sorters only: they are installed whenever spikeinterface is.
SORTER_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "0.105.3": {
        "simple": {"apply_preprocessing": True,
                   "clusterer": "hdbscan",
                   "clusterer_kwargs": {},
                   "detect_threshold": 5.0,
                   "freq_max": 6000.0,
                   "freq_min": 150.0,
                   "job_kwargs": {},
                   "ms_after": 1.5,
                   "ms_before": 1.0,
                   "n_svd_components_per_channel": 5,
                   "peak_sign": "neg",
                   "seed": None},
        "spykingcircus2": {"apply_motion_correction": True,
                           "apply_preprocessing": True,
                           "apply_whitening": True,
                           "cache_preprocessing": {"mode": "memory", "memory_limit": 0.5},
                           "chunk_preprocessing": {"memory_limit": None},
                           "cleaning": {"min_snr": 5,
                                        "max_jitter_ms": 0.2,
                                        "sparsify_threshold": 1,
                                        "mean_sd_ratio_threshold": 3},
                           "clustering": {"method": "iterative-hdbscan", "method_kwargs": {}},
                           "debug": False,
                           "detection": {"method": "matched_filtering",
                                         "method_kwargs": {"peak_sign": "neg", "detect_threshold": 5},
                                         "pipeline_kwargs": {}},
                           "deterministic_peaks_detection": False,
                           "filtering": {"freq_min": 150, "freq_max": 7000, "ftype": "bessel", "filter_order": 2},
                           "general": {"ms_before": 0.5, "ms_after": 1.5, "radius_um": 100.0},
                           "job_kwargs": {},
                           "matching": {"method": "circus-omp", "method_kwargs": {}, "pipeline_kwargs": {}},
                           "merging": {"max_distance_um": 50},
                           "min_firing_rate": 0.1,
                           "motion_correction": {"preset": "dredge_fast"},
                           "multi_units_only": False,
                           "seed": 42,
                           "selection": {"method": "uniform",
                                         "method_kwargs": {"n_peaks_per_channel": 5000,
                                                           "min_n_peaks": 100000,
                                                           "select_per_channel": False}},
                           "whitening": {"mode": "local", "regularize": False}},
        "tridesclous2": {"apply_motion_correction": False,
                         "apply_preprocessing": True,
                         "cache_preprocessing_mode": "auto",
                         "clustering_ms_after": 1.5,
                         "clustering_ms_before": 0.5,
                         "clustering_recursive_depth": 3,
                         "debug": False,
                         "detect_threshold": 5.0,
                         "detection_radius_um": 150.0,
                         "features_radius_um": 120.0,
                         "freq_max": 6000.0,
                         "freq_min": 150.0,
                         "gather_mode": "memory",
                         "job_kwargs": {},
                         "merge_similarity_lag_ms": 0.5,
                         "min_firing_rate": 0.1,
                         "motion_correction_preset": "dredge_fast",
                         "ms_after": 2.5,
                         "ms_before": 1.0,
                         "n_pca_features": 6,
                         "n_peaks_per_channel": 5000,
                         "n_svd_components_per_channel": 5,
                         "peak_sign": "neg",
                         "preprocessing_dict": None,
                         "save_array": True,
                         "seed": None,
                         "split_radius_um": 60.0,
                         "template_max_jitter_ms": 0.2,
                         "template_min_snr_ptp": 3.5,
                         "template_radius_um": 100.0,
                         "template_sparsify_threshold": 1.5},
    },
}


@functools.lru_cache(maxsize=1)
def spikeinterface_version() -> str | None:
    """The installed spikeinterface's version, read from its metadata (no import)."""
    try:
        return version("spikeinterface")
    except PackageNotFoundError:
        return None


def table_defaults(sorter: str) -> dict[str, Any] | None:
    """The default parameters of ``sorter`` from the table, or None when the table cannot answer."""
    return SORTER_DEFAULTS.get(spikeinterface_version() or "", {}).get(sorter)


def registry_defaults(sorter: str) -> dict[str, Any]:
    """The default parameters of ``sorter`` asked of spikeinterface's registry (slow: imports it)."""
    import spikeinterface.sorters as ss

    installed = ss.installed_sorters()
    if sorter not in installed:
        raise ConfigError(f"sorter {sorter!r} is not installed; installed: {', '.join(installed)}")
    return dict(ss.get_default_sorter_params(sorter))


def default_params(sorter: str) -> dict[str, Any]:
    """The default parameters of ``sorter``: the table's, else the registry's (do not modify)."""
    found = table_defaults(sorter)
    return found if found is not None else registry_defaults(sorter)


def check_sorter_params(sorter: str, params: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``sorter`` is not installed or ``params`` has a key it does
    not take (top-level keys: nested dicts are the sorter's to check)."""
    unknown = sorted(set(params) - set(default_params(sorter)))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for sorter {sorter!r}")


_UNKNOWN = object()


def _leaves(params: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, value)`` for each value of nested ``params``; an empty dict is a value."""
    out = []
    for key, value in params.items():
        path = (*prefix, str(key))
        out += _leaves(value, path) if isinstance(value, dict) and value else [(path, value)]
    return out


def _default_at(defaults: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(defaults, dict) or key not in defaults:
            return _UNKNOWN
        defaults = defaults[key]
    return defaults


def _same(default: Any, value: Any) -> bool:
    """Equal as a sorter sees it: 5 is 5.0 (YAML writes both), but True is not 1."""
    return default == value and isinstance(default, bool) == isinstance(value, bool)


def format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def params_label(sorter: str, params: dict[str, Any]) -> str:
    """What sets a sort apart in the results table: each parameter of ``params`` that differs from
    ``sorter``'s default, as ``name=value`` (nested ones by dotted name: ``detection.method=...``),
    in the order given; ``default`` when none does.

    A parameter given with its default value is left out (it changes nothing the sorter does); one
    whose default is unknown (a nested key the defaults lack) is shown, so the label never hides a
    parameter that may matter.
    """
    defaults = default_params(sorter)
    parts = []
    for path, value in _leaves(params):
        default = _default_at(defaults, path)
        if default is _UNKNOWN or not _same(default, value):
            parts.append(f"{'.'.join(path)}={format_value(value)}")
    return ",".join(parts) or "default"
