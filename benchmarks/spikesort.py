"""Batch spike sorting: kachery-spikesort against the same batch as a plain spikeinterface loop.

Every case is timed as a whole command in a new interpreter (``python -m kachery_spikesort batch
CONFIG.yaml``), as a user runs it: imports, the config check, the task ids and writing the files
count, not only ``run_batch``. In a fresh kachery home:

- first run of the batch: 8 synthetic recordings (10 s, 8 channels, 5 units) x 2 sorters
  (``simple``, ``spykingcircus2``), band-pass + common median reference, comparison to ground
  truth and quality metrics for every sort, on a LocalCluster of 2 worker processes (each worker
  pays numba's compilation of the sorters once, as the loop's process does);
- full rerun: the same command again, the median of several (no cluster is started, nothing that
  only a computation needs is imported);
- one-parameter change: simple's ``detect_threshold`` changed, so its 8 sorts and what follows
  them are recomputed, nothing else;
- the example, ``plugins/spikesort/examples/small.yaml``: its first run against the median of its
  all-cached reruns (the ratio the docs quote; target >= 50);
- the peer: one Python process running ``generate_ground_truth_recording`` -> preprocessing ->
  ``run_sorter`` -> ``compare_sorter_to_ground_truth`` -> quality metrics in a loop, which is what
  every rerun costs without a cache.

The accuracy figure of the first run is written to ``benchmarks/results/spikesort-accuracy.png``.
Set ``KT_BENCH_SPIKESORT_RECORDINGS`` / ``KT_BENCH_SPIKESORT_SECONDS`` to change the batch size and
``KT_BENCH_SPIKESORT_RERUNS`` (default 7) the number of timed reruns.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

from ._common import row

N_RECORDINGS = int(os.environ.get("KT_BENCH_SPIKESORT_RECORDINGS", 8))
DURATION_S = float(os.environ.get("KT_BENCH_SPIKESORT_SECONDS", 10.0))
RERUNS = int(os.environ.get("KT_BENCH_SPIKESORT_RERUNS", 7))
SORTERS = [
    {"sorter": "simple", "params": {"detect_threshold": 5.0}},
    {"sorter": "spykingcircus2", "params": {"apply_motion_correction": False}},
]
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "plugins" / "spikesort" / "examples" / "small.yaml"


def _write_config(path: Path, simple_threshold: float = 5.0) -> Path:
    sorters = [dict(s, params=dict(s["params"])) for s in SORTERS]
    sorters[0]["params"]["detect_threshold"] = simple_threshold
    path.write_text(yaml.safe_dump({
        "recordings": [{"generate": {"seed": list(range(1, N_RECORDINGS + 1)), "duration_s": DURATION_S,
                                     "num_channels": 8, "num_units": 5}}],
        "preprocess": {"freq_min": 300, "freq_max": 6000, "reference": "global"},
        "sorters": sorters,
        "quality_metrics": True,
    }, sort_keys=False))
    return path


def _batch(config: Path, home: Path, output: Path) -> tuple[float, dict]:
    """Run the batch command once; its wall time and the ``results.json`` it wrote."""
    cmd = [sys.executable, "-m", "kachery_spikesort", "batch", str(config), "--home", str(home),
           "--output", str(output), "--no-progress"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return elapsed, json.loads((output / "results.json").read_text())


def _reruns(config: Path, home: Path, output: Path) -> tuple[float, float, float, dict]:
    """Median, min and max wall time of ``RERUNS`` all-cached reruns; the last run's results."""
    times = []
    for _ in range(RERUNS):
        elapsed, results = _batch(config, home, output)
        times.append(elapsed)
    return statistics.median(times), min(times), max(times), results


def _plain_loop(workdir: Path) -> list[float]:
    """The same batch with spikeinterface calls in a loop, nothing cached; the mean accuracies."""
    import spikeinterface as si
    import spikeinterface.preprocessing as spre
    import spikeinterface.sorters as ss
    from kachery_spikesort.stages import DEFAULT_METRICS, ground_truth_kwargs
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.metrics import compute_quality_metrics

    job = {"n_jobs": 1, "progress_bar": False}
    accuracies = []
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
    return accuracies


def _peer(workdir: Path) -> tuple[float, list[float]]:
    """The plain loop as a whole command (``python -m benchmarks.spikesort --peer DIR``)."""
    cmd = [sys.executable, "-m", "benchmarks.spikesort", "--peer", str(workdir)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"the spikeinterface loop failed:\n{out.stderr}")
    return elapsed, json.loads(out.stdout.strip().splitlines()[-1])


def _spread(median: float, low: float, high: float) -> str:
    return f"median of {RERUNS}, {low:.2f}–{high:.2f} s"


def run() -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="kt-bench-spikesort-"))
    try:
        home, out = root / "home", root / "out"
        config = _write_config(root / "batch.yaml")
        first_s, first = _batch(config, home, out / "first")
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "first" / "accuracy.png", RESULTS / "spikesort-accuracy.png")
        rerun_s, rerun_min, rerun_max, rerun = _reruns(config, home, out / "rerun")
        changed_s, changed = _batch(_write_config(root / "changed.yaml", simple_threshold=5.5), home, out / "changed")

        example_home = root / "example-home"
        example_first_s, _ = _batch(EXAMPLE, example_home, out / "example")
        example_s, example_min, example_max, example = _reruns(EXAMPLE, example_home, out / "example")

        peer_s, peer_acc = _peer(root / "loop")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n_sorts = N_RECORDINGS * len(SORTERS)
    ours_acc = [r["accuracy"] for r in first["rows"]]
    batch = f"{N_RECORDINGS} recordings x {len(SORTERS)} sorters ({DURATION_S:g} s, 8 ch)"
    peer = "spikeinterface loop"
    return [
        row(f"first run, {batch}", first_s, peer, peer_s,
            f"{first['computed']} tasks computed on a 2-worker LocalCluster; {n_sorts} sorts; mean accuracy ours "
            f"{sum(ours_acc) / len(ours_acc):.3f}, loop {sum(peer_acc) / len(peer_acc):.3f}"),
        row("full rerun (whole command)", rerun_s, peer, peer_s,
            f"{rerun['computed']} computed, {rerun['cached']} cached, no cluster started; "
            f"{_spread(rerun_s, rerun_min, rerun_max)}; {first_s / rerun_s:.1f}x faster than the first run",
            "ratio ≥ 50"),
        row("one parameter changed (simple detect_threshold)", changed_s, peer, peer_s,
            f"{changed['computed']} tasks recomputed (the {N_RECORDINGS} simple sorts and their compare/"
            f"metrics/summary), {changed['cached']} cached"),
        row("examples/small.yaml rerun (whole command)", example_s, "its first run", example_first_s,
            f"{example['computed']} computed, {example['cached']} cached; {_spread(example_s, example_min, example_max)}",
            "ratio ≥ 50"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peer"]:
        print(json.dumps(_plain_loop(Path(sys.argv[2]))))
    else:
        for result in run():
            print(result)
