"""The pipeline stages, each a pure kachery task.

Recordings and sortings come back as handles (:class:`RecordingRef`, :class:`SortingRef`) whose
bytes are in the store; numbers (comparisons, metrics, summaries) come back as plain JSON data.
Chain the stages with ``.job(...)`` and task ids are Merkle hashes of the whole branch before
anything runs::

    rec = generate_recording.job(seed=1, duration_s=10, num_channels=8, num_units=5)
    pre = preprocess.job(rec, freq_min=300, freq_max=6000)
    srt = sort.job(pre, "simple", {"detect_threshold": 5})
    cmp = compare.job(srt, rec)
    cmp.result()   # runs what is missing, loads the rest

Every stage runs spikeinterface with ``n_jobs=1`` unless told otherwise (parallelism comes from
running many stages at once on Dask), and sorters and metrics run inside
:func:`~kachery_spikesort.seeding.seeded_numpy` so that a stage's result is reproducible.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kachery_tasks import File, load_json
from kachery_tasks.tasks import pure

from .formats import FORMATS, check_binary_size, normalize_binary_meta
from .handles import RecordingRef, SortingRef
from .packing import pack_folder, scratch_dir
from .seeding import seeded_numpy

#: How spikeinterface runs inside a stage unless a sorter's params say otherwise.
JOB_KWARGS: dict[str, Any] = {"n_jobs": 1, "progress_bar": False}
#: Quality metrics computed by default (none of them needs principal components).
DEFAULT_METRICS = ("num_spikes", "firing_rate", "presence_ratio", "snr", "isi_violation")
REFERENCES = (None, "global", "local")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence spikeinterface's user warnings (provenance not saved, short recordings, ...) that
    every stage would otherwise print on every worker."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"spikeinterface\b.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"spikeinterface\b.*")
        yield


# -- helpers (plain functions, shared with the tests and the benchmark baseline) -------------------
def ground_truth_kwargs(seed: int, duration_s: float, num_channels: int, num_units: int,
                        sampling_frequency: float, noise_level: float, firing_rate: float) -> dict[str, Any]:
    """The keyword arguments :func:`generate_recording` gives spikeinterface's generator."""
    return dict(
        durations=[float(duration_s)],
        sampling_frequency=float(sampling_frequency),
        num_channels=int(num_channels),
        num_units=int(num_units),
        seed=int(seed),
        noise_kwargs={"noise_levels": float(noise_level), "strategy": "on_the_fly"},
        generate_sorting_kwargs={"firing_rates": float(firing_rate), "refractory_period_ms": 4.0},
    )


def preprocessing_chain(recording, freq_min: float = 300.0, freq_max: float = 6000.0,
                        reference: str | None = "global", operator: str = "median", whiten: bool = False):
    """The lazy spikeinterface chain :func:`preprocess` saves: band-pass (float32), common
    reference, optional whitening (seeded)."""
    import spikeinterface.preprocessing as spre

    if reference not in REFERENCES:
        raise ValueError(f"reference is one of {REFERENCES}, not {reference!r}")
    out = spre.bandpass_filter(recording, freq_min=float(freq_min), freq_max=float(freq_max), dtype="float32")
    if reference is not None:
        out = spre.common_reference(out, reference=reference, operator=operator)
    if whiten:
        out = spre.whiten(out, dtype="float32", mode="global", seed=0)
    return out


def sorter_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments :func:`sort` gives ``run_sorter``: ``params`` plus ``job_kwargs``
    (one process, no progress bar) when ``params`` has none."""
    merged = dict(params or {})
    merged.setdefault("job_kwargs", dict(JOB_KWARGS))
    return merged


def recording_info(recording) -> dict[str, Any]:
    return {
        "num_channels": int(recording.get_num_channels()),
        "sampling_frequency": float(recording.get_sampling_frequency()),
        "num_samples": int(recording.get_total_samples()),
        "duration_s": float(recording.get_total_duration()),
        "dtype": str(recording.get_dtype()),
    }


def store_recording(recording, ground_truth: SortingRef | None = None, label: str = "recording") -> RecordingRef:
    """Save ``recording`` as a spikeinterface binary folder, pack it and store it."""
    tmp = scratch_dir("rec-")
    try:
        folder = tmp / "folder"
        recording.save(format="binary", folder=folder, verbose=False, **JOB_KWARGS)
        uri = pack_folder(folder, label=f"{label}.tar")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RecordingRef(uri, "si_folder", {}, ground_truth=ground_truth, info=recording_info(recording))


def store_sorting(sorting, label: str = "sorting", info: dict[str, Any] | None = None) -> SortingRef:
    """Save ``sorting`` as a spikeinterface numpy folder, pack it and store it."""
    tmp = scratch_dir("sorting-")
    try:
        folder = tmp / "folder"
        sorting.save(folder=folder)
        uri = pack_folder(folder, label=f"{label}.tar")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SortingRef(uri, info={"num_units": int(len(sorting.unit_ids)), **(info or {})})


def _number(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ground_truth_of(value: RecordingRef | SortingRef) -> SortingRef:
    if isinstance(value, SortingRef):
        return value
    if isinstance(value, RecordingRef) and value.ground_truth is not None:
        return value.ground_truth
    raise ValueError(f"{value!r} carries no ground truth; pass a generated recording or a SortingRef")


# -- stages -----------------------------------------------------------------------------------------
@pure(name="kachery_spikesort.generate_recording", codec="pickle")
def generate_recording(seed: int, duration_s: float = 10.0, num_channels: int = 8, num_units: int = 5,
                       sampling_frequency: float = 30000.0, noise_level: float = 5.0,
                       firing_rate: float = 15.0) -> RecordingRef:
    """A synthetic recording from spikeinterface's ground-truth generator, with its ground-truth
    sorting attached (``ref.ground_truth``)."""
    import spikeinterface as si

    with quiet():
        recording, gt = si.generate_ground_truth_recording(
            **ground_truth_kwargs(seed, duration_s, num_channels, num_units, sampling_frequency, noise_level,
                                  firing_rate)
        )
        gt_ref = store_sorting(gt, label=f"ground-truth-seed{seed}", info={"sorter": "ground_truth"})
        return store_recording(recording, ground_truth=gt_ref, label=f"generated-seed{seed}")


@pure(name="kachery_spikesort.recording_file", codec="pickle")
def recording_file(uri: str | File, format: str = "binary", meta: dict[str, Any] | str | File | None = None) -> RecordingRef:
    """A user's recording file already in the store, named by its URI. ``format="binary"``: a raw
    ``.dat``/``.bin`` file described by ``meta`` (a dict, or the URI of a JSON file in the store;
    keys in :mod:`kachery_spikesort.formats`). Nothing is copied: the handle reads the stored file."""
    file = File(uri)
    if format not in FORMATS:
        raise ValueError(f"unsupported recording format {format!r}; supported: {', '.join(FORMATS)}")
    if meta is None:
        raise ValueError("a binary recording needs meta= (sampling_frequency, num_channels, dtype)")
    if isinstance(meta, str | File):
        meta = load_json(File(meta).uri)
    params = normalize_binary_meta(meta)
    num_samples = check_binary_size(file.path.stat().st_size, params)
    ref = RecordingRef(file.uri, "binary", params)
    recording = ref.load()
    info = recording_info(recording)
    if info["num_samples"] != num_samples:
        raise ValueError(f"spikeinterface reads {info['num_samples']} samples, the file size says {num_samples}")
    ref.info = info
    return ref


@pure(name="kachery_spikesort.preprocess", codec="pickle")
def preprocess(recording: RecordingRef, freq_min: float = 300.0, freq_max: float = 6000.0,
               reference: str | None = "global", operator: str = "median", whiten: bool = False) -> RecordingRef:
    """Band-pass filter, common reference and optionally whiten; saved as float32 traces. The
    recording's ground truth, if any, is carried along."""
    with quiet():
        chain = preprocessing_chain(recording.load(), freq_min, freq_max, reference, operator, whiten)
        return store_recording(chain, ground_truth=recording.ground_truth, label="preprocessed")


@pure(name="kachery_spikesort.sort", ignore_globals=["_LOCK"], codec="pickle")
def sort(recording: RecordingRef, sorter: str, params: dict[str, Any] | None = None, seed: int = 0) -> SortingRef:
    """Run one of spikeinterface's internal sorters (``simple``, ``spykingcircus2``,
    ``tridesclous2``) with ``params``; ``seed`` fixes the randomness no sorter parameter reaches."""
    import spikeinterface.sorters as ss

    kwargs = sorter_params(params)
    rec = recording.load()
    tmp = scratch_dir(f"sort-{sorter}-")
    try:
        start = time.perf_counter()
        with quiet(), seeded_numpy(seed):
            sorting = ss.run_sorter(sorter, rec, folder=str(tmp / "run"), remove_existing_folder=True,
                                    verbose=False, raise_error=True, **kwargs)
        elapsed = time.perf_counter() - start
        with quiet():
            ref = store_sorting(sorting, label=f"sorting-{sorter}",
                                info={"sorter": sorter, "elapsed_s": round(elapsed, 3)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


@pure(name="kachery_spikesort.compare")
def compare(sorting: SortingRef, ground_truth: RecordingRef | SortingRef, delta_time: float = 0.4,
            match_score: float = 0.5, well_detected_score: float = 0.8) -> dict[str, Any]:
    """``compare_sorter_to_ground_truth`` (exhaustive ground truth): per-unit accuracy, precision
    and recall, their means, and the unit counts. ``ground_truth`` is a SortingRef or a recording
    that carries one."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    gt = _ground_truth_of(ground_truth).load()
    tested = sorting.load()
    with quiet():
        cmp = compare_sorter_to_ground_truth(gt, tested, exhaustive_gt=True, delta_time=float(delta_time),
                                             match_score=float(match_score),
                                             well_detected_score=float(well_detected_score))
    perf = cmp.get_performance(method="by_unit")
    columns = ("accuracy", "precision", "recall")
    return {
        "gt_unit_ids": [str(u) for u in perf.index],
        **{col: [_number(v) for v in perf[col]] for col in columns},
        "mean": {col: _number(perf[col].mean()) if len(perf) else None for col in columns},
        "num_gt_units": int(len(gt.unit_ids)),
        "num_units": int(len(tested.unit_ids)),
        "num_well_detected": int(cmp.count_well_detected_units(float(well_detected_score))),
        "num_false_positive": int(cmp.count_false_positive_units()),
        "num_redundant": int(cmp.count_redundant_units()),
        "num_overmerged": int(cmp.count_overmerged_units()),
        "num_bad": int(cmp.count_bad_units()),
    }


@pure(name="kachery_spikesort.quality_metrics", ignore_globals=["_LOCK"])
def quality_metrics(recording: RecordingRef, sorting: SortingRef,
                    metric_names: Sequence[str] = DEFAULT_METRICS, seed: int = 0) -> dict[str, Any]:
    """spikeinterface's quality metrics of ``sorting`` on ``recording``: ``{"unit_ids": [...],
    "metrics": {column: [value per unit]}}`` (NaN as null)."""
    import spikeinterface as si
    from spikeinterface.metrics import compute_quality_metrics

    srt = sorting.load()
    unit_ids = [str(u) for u in srt.unit_ids]
    if not unit_ids:
        return {"unit_ids": [], "metrics": {}}
    with quiet(), seeded_numpy(seed):
        analyzer = si.create_sorting_analyzer(srt, recording.load(), format="memory", sparse=True, seed=seed,
                                              job_kwargs=dict(JOB_KWARGS))
        analyzer.compute(["random_spikes", "waveforms", "templates", "noise_levels"], **JOB_KWARGS)
        table = compute_quality_metrics(analyzer, metric_names=list(metric_names), **JOB_KWARGS)
    return {
        "unit_ids": [str(u) for u in table.index],
        "metrics": {str(col): [_number(v) for v in table[col]] for col in table.columns},
    }


def _median(values: list[float | None]) -> float | None:
    finite = sorted(v for v in values if v is not None)
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


@pure(name="kachery_spikesort.summarize")
def summarize(sorting: SortingRef, comparison: dict[str, Any] | None = None,
              metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the results table for one sort: units found, mean accuracy / precision / recall
    against the ground truth (None without one), well-detected units, median SNR and firing rate,
    and the sorter's own run time when it was computed."""
    row: dict[str, Any] = {
        "num_units": sorting.info.get("num_units"),
        "sort_s": sorting.info.get("elapsed_s"),
        "accuracy": None, "precision": None, "recall": None,
        "num_gt_units": None, "num_well_detected": None, "num_false_positive": None,
        "median_snr": None, "median_firing_rate": None,
    }
    if comparison is not None:
        row.update({key: comparison["mean"][key] for key in ("accuracy", "precision", "recall")})
        row.update({key: comparison[key] for key in ("num_gt_units", "num_well_detected", "num_false_positive")})
    if metrics is not None:
        table = metrics.get("metrics", {})
        row["median_snr"] = _median(table.get("snr", []))
        row["median_firing_rate"] = _median(table.get("firing_rate", []))
    return row
