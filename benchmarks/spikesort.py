"""Batch spike sorting: kachery-spikesort against the same batch as a plain spikeinterface loop.

The batch: 8 synthetic recordings (10 s, 8 channels, 5 units) x 2 sorters (``simple``,
``spykingcircus2``), band-pass + common median reference, comparison to ground truth and quality
metrics for every sort. Cases, in a fresh kachery home:

- first run: everything computed on a LocalCluster of 2 worker processes (each worker pays
  numba's compilation of the sorters once, as the loop's process does);
- full rerun: the same config again; target >= 50x faster than the loop (no cluster is started);
- one-parameter change: simple's ``detect_threshold`` changed, so its 8 sorts and what follows
  them are recomputed, nothing else;
- the peer: one Python process running ``generate_ground_truth_recording`` -> preprocessing ->
  ``run_sorter`` -> ``compare_sorter_to_ground_truth`` -> quality metrics in a loop, which is what
  every rerun costs without a cache.

The accuracy figure of the first run is written to ``benchmarks/results/spikesort-accuracy.png``.
Set ``KT_BENCH_SPIKESORT_RECORDINGS`` / ``KT_BENCH_SPIKESORT_SECONDS`` to change the batch size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from ._common import row

N_RECORDINGS = int(os.environ.get("KT_BENCH_SPIKESORT_RECORDINGS", 8))
DURATION_S = float(os.environ.get("KT_BENCH_SPIKESORT_SECONDS", 10.0))
SORTERS = [
    {"sorter": "simple", "params": {"detect_threshold": 5.0}},
    {"sorter": "spykingcircus2", "params": {"apply_motion_correction": False}},
]
RESULTS = Path(__file__).resolve().parent / "results"


def _config(home: Path, output: Path, simple_threshold: float = 5.0):
    from kachery_spikesort.batch import parse_config

    sorters = [dict(s, params=dict(s["params"])) for s in SORTERS]
    sorters[0]["params"]["detect_threshold"] = simple_threshold
    cfg = parse_config({
        "recordings": [{"generate": {"seed": list(range(1, N_RECORDINGS + 1)), "duration_s": DURATION_S,
                                     "num_channels": 8, "num_units": 5}}],
        "preprocess": {"freq_min": 300, "freq_max": 6000, "reference": "global"},
        "sorters": sorters,
        "quality_metrics": True,
        "output": str(output),
    })
    cfg.home = str(home)
    return cfg


def _plain_loop(workdir: Path) -> tuple[float, list[float]]:
    """The same batch with spikeinterface calls in a loop, nothing cached."""
    import spikeinterface as si
    import spikeinterface.preprocessing as spre
    import spikeinterface.sorters as ss
    from kachery_spikesort.stages import DEFAULT_METRICS, ground_truth_kwargs
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.metrics import compute_quality_metrics

    job = {"n_jobs": 1, "progress_bar": False}
    accuracies = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(1, N_RECORDINGS + 1):
            rec, gt = si.generate_ground_truth_recording(**ground_truth_kwargs(seed, DURATION_S, 8, 5, 30000.0, 5.0, 15.0))
            pre = spre.common_reference(spre.bandpass_filter(rec, freq_min=300, freq_max=6000, dtype="float32"))
            pre = pre.save(format="binary", folder=workdir / f"pre{seed}", **job)
            for spec in SORTERS:
                sorting = ss.run_sorter(spec["sorter"], pre, folder=str(workdir / f"{spec['sorter']}{seed}"),
                                        remove_existing_folder=True, verbose=False, job_kwargs=job, **spec["params"])
                perf = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
                accuracies.append(float(perf["accuracy"].mean()))
                analyzer = si.create_sorting_analyzer(sorting, pre, format="memory", sparse=True, job_kwargs=job)
                analyzer.compute(["random_spikes", "waveforms", "templates", "noise_levels"], **job)
                compute_quality_metrics(analyzer, metric_names=list(DEFAULT_METRICS), **job)
    return time.perf_counter() - start, accuracies


def run() -> list[dict]:
    from kachery_spikesort.batch import run_batch

    root = Path(tempfile.mkdtemp(prefix="kt-bench-spikesort-"))
    try:
        home, out = root / "home", root / "out"
        t0 = time.perf_counter()
        first = run_batch(_config(home, out / "first"), show_progress=False)
        first_s = time.perf_counter() - t0
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(first.outputs["png"], RESULTS / "spikesort-accuracy.png")

        t0 = time.perf_counter()
        rerun = run_batch(_config(home, out / "rerun"), show_progress=False)
        rerun_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        changed = run_batch(_config(home, out / "changed", simple_threshold=5.5), show_progress=False)
        changed_s = time.perf_counter() - t0

        peer_s, peer_acc = _plain_loop(root / "loop")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n_sorts = N_RECORDINGS * len(SORTERS)
    ours_acc = [r["accuracy"] for r in first.rows]
    batch = f"{N_RECORDINGS} recordings x {len(SORTERS)} sorters ({DURATION_S:g} s, 8 ch)"
    peer = "spikeinterface loop"
    return [
        row(f"first run, {batch}", first_s, peer, peer_s,
            f"{first.computed} tasks computed on a 2-worker LocalCluster; {n_sorts} sorts; mean accuracy ours "
            f"{sum(ours_acc) / len(ours_acc):.3f}, loop {sum(peer_acc) / len(peer_acc):.3f}"),
        row("full rerun", rerun_s, peer, peer_s,
            f"{rerun.computed} computed, {rerun.cached} cached, no cluster started", "ratio ≥ 50"),
        row("one parameter changed (simple detect_threshold)", changed_s, peer, peer_s,
            f"{changed.computed} tasks recomputed (the {N_RECORDINGS} simple sorts and their compare/"
            f"metrics/summary), {changed.cached} cached"),
    ]


if __name__ == "__main__":
    for result in run():
        print(result)
