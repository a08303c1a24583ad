"""Batches: recordings x sorters x parameter grid, as one pruned Dask graph of pure tasks.

A batch config (YAML) names recordings, one preprocessing, and sorters each with base ``params``
and an optional ``grid`` of values to sweep. :func:`plan_batch` turns it into jobs (task ids
known before anything runs); :func:`run_batch` computes only the jobs whose results are not in
the store, on a ``distributed`` cluster (a ``LocalCluster`` it starts, or ``scheduler=ADDRESS``),
then writes ``results.csv``, ``results.json`` and ``accuracy.png`` to the output folder (see
:mod:`kachery_spikesort.outputs`). A relative output folder is taken from the current directory,
never from the config file's: a config can be an installed example, and results beside it would
land in a source tree or a site-packages directory. Input files are the config's own, so a relative
``file:`` is taken from the config file's folder. When every result is already recorded no cluster is started at
all, and nothing that only a computation needs (distributed, the sorter registry, matplotlib) is
imported: a rerun is a check of the config, one record read per branch and the files compared.

Config keys (see examples/small.yaml)::

    output: results                # folder for the table and figure, relative to the current directory
    home: null                     # kachery home (default: the one in force)
    seed: 0                        # seed of the sorters' and metrics' otherwise unseeded randomness
    recordings:
      - generate: {seed: [1, 2], duration_s: 10, num_channels: 8, num_units: 5}   # a list of seeds expands
      - name: lab-session
        file: data/session.dat     # stored in the kachery store; identified by its content
        format: binary
        meta: {sampling_frequency: 30000, num_channels: 8, dtype: int16}   # or a JSON file's path
    preprocess: {freq_min: 300, freq_max: 6000, reference: global, whiten: false}
    sorters:
      - sorter: simple
        params: {detect_threshold: 5}
        grid: {detect_threshold: [4.5, 5.5]}          # dotted keys reach nested params
      - sorter: spykingcircus2
        params: {apply_motion_correction: false}
    quality_metrics: true
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import kachery_tasks as kt
from kachery_tasks import File
from kachery_tasks.tasks import Job, has_result

from .errors import ConfigError
from .outputs import TABLE_COLUMNS, plot_accuracy, print_table, write_results
from .sorter_table import check_sorter_params, params_label
from .stages import compare, generate_recording, preprocess, quality_metrics, recording_file, sort, summarize

__all__ = ["BatchConfig", "BatchResult", "Branch", "ConfigError", "TABLE_COLUMNS", "load_config", "parse_config",
           "pending_jobs", "plan_batch", "plot_accuracy", "print_table", "run_batch", "write_results"]

STAGES = ("generate_recording", "recording_file", "preprocess", "sort", "compare", "quality_metrics", "summarize")
GENERATE_KEYS = ("seed", "duration_s", "num_channels", "num_units", "sampling_frequency", "noise_level",
                 "firing_rate")
PREPROCESS_KEYS = ("freq_min", "freq_max", "reference", "operator", "whiten")


# -- config -----------------------------------------------------------------------------------------
@dataclass
class RecordingSpec:
    name: str
    generate: dict[str, Any] | None = None  # generate_recording kwargs
    file: Path | None = None
    format: str = "binary"
    meta: dict[str, Any] | None = None

    @property
    def has_ground_truth(self) -> bool:
        return self.generate is not None


@dataclass
class SortSpec:
    sorter: str
    label: str  # the params that differ from the sorter's defaults, e.g. "detect_threshold=4.5", or "default"
    params: dict[str, Any]


@dataclass
class BatchConfig:
    recordings: list[RecordingSpec]
    sorts: list[SortSpec]
    preprocess: dict[str, Any] = field(default_factory=dict)
    quality_metrics: bool = True
    seed: int = 0
    output: Path = Path("spikesort-results")
    home: str | None = None


def _set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    target = params
    for key in keys[:-1]:
        nested = target.get(key)
        if nested is None:
            nested = target[key] = {}
        elif not isinstance(nested, dict):
            raise ConfigError(f"grid key {dotted!r}: {key!r} is not a dict of parameters")
        target = nested
    target[keys[-1]] = value


def expand_grid(base: dict[str, Any], grid: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    """The params of every combination of the grid's values over ``base``."""
    if not grid:
        return [copy.deepcopy(base)]
    names = list(grid)
    for name in names:
        if not isinstance(grid[name], list) or not grid[name]:
            raise ConfigError(f"grid key {name!r} needs a non-empty list of values")
    out = []
    for values in itertools.product(*(grid[name] for name in names)):
        params = copy.deepcopy(base)
        for name, value in zip(names, values, strict=True):
            _set_dotted(params, name, value)
        out.append(params)
    return out


def _recordings(items: Any, base: Path) -> list[RecordingSpec]:
    if not isinstance(items, list) or not items:
        raise ConfigError("'recordings' needs a non-empty list")
    specs: list[RecordingSpec] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or ("generate" in item) == ("file" in item):
            raise ConfigError(f"recordings[{i}] needs exactly one of 'generate' or 'file'")
        if "generate" in item:
            gen = dict(item["generate"] or {})
            unknown = sorted(set(gen) - set(GENERATE_KEYS))
            if unknown:
                raise ConfigError(f"recordings[{i}].generate: unknown key(s) {unknown}; allowed: {list(GENERATE_KEYS)}")
            seeds = gen.pop("seed", 0)
            seeds = seeds if isinstance(seeds, list) else [seeds]
            for key in ("duration_s", "sampling_frequency", "noise_level", "firing_rate"):
                if key in gen:
                    gen[key] = float(gen[key])
            for seed in seeds:
                name = item.get("name") if len(seeds) == 1 and item.get("name") else f"{item.get('name', 'gen')}-seed{seed}"
                specs.append(RecordingSpec(name=name, generate={"seed": int(seed), **gen}))
        else:
            path = (base / item["file"]).resolve()
            if not path.is_file():
                raise ConfigError(f"recordings[{i}].file: {path} is not a file")
            meta = item.get("meta")
            if isinstance(meta, str):
                meta = json.loads((base / meta).read_text())
            if not isinstance(meta, dict):
                raise ConfigError(f"recordings[{i}].meta: a dict or the path of a JSON file")
            specs.append(RecordingSpec(name=item.get("name", path.stem), file=path,
                                       format=item.get("format", "binary"), meta=meta))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"recording names must be unique: {names}")
    return specs


def parse_config(data: dict[str, Any], base: Path = Path(".")) -> BatchConfig:
    """A :class:`BatchConfig` from the YAML's data; relative input paths are taken from ``base``,
    a relative ``output`` from the current directory."""
    if not isinstance(data, dict):
        raise ConfigError("a batch config is a mapping")
    unknown = sorted(set(data) - {"output", "home", "seed", "recordings", "preprocess", "sorters", "quality_metrics"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}")
    pre = dict(data.get("preprocess") or {})
    bad = sorted(set(pre) - set(PREPROCESS_KEYS))
    if bad:
        raise ConfigError(f"preprocess: unknown key(s) {bad}; allowed: {list(PREPROCESS_KEYS)}")
    if isinstance(pre.get("reference"), str) and pre["reference"].lower() == "none":
        pre["reference"] = None
    for key in ("freq_min", "freq_max"):  # 300 and 300.0 are one setting: one task id
        if key in pre:
            pre[key] = float(pre[key])
    sorters = data.get("sorters")
    if not isinstance(sorters, list) or not sorters:
        raise ConfigError("'sorters' needs a non-empty list")
    sorts: list[SortSpec] = []
    for i, item in enumerate(sorters):
        if isinstance(item, str):
            item = {"sorter": item}
        if not isinstance(item, dict) or "sorter" not in item:
            raise ConfigError(f"sorters[{i}] needs 'sorter'")
        for params in expand_grid(dict(item.get("params") or {}), item.get("grid")):
            check_sorter_params(item["sorter"], params)
            sorts.append(SortSpec(item["sorter"], params_label(item["sorter"], params), params))
    output = Path(data.get("output", "spikesort-results"))
    return BatchConfig(
        recordings=_recordings(data.get("recordings"), base),
        sorts=sorts,
        preprocess=pre,
        quality_metrics=bool(data.get("quality_metrics", True)),
        seed=int(data.get("seed", 0)),
        output=output.expanduser().resolve(),
        home=data.get("home"),
    )


def load_config(path: str | Path) -> BatchConfig:
    path = Path(path)
    with open(path) as fh:
        data = yaml.safe_load(fh)
    cfg = parse_config(data, base=path.parent.resolve())
    if cfg.home is not None and not Path(cfg.home).expanduser().is_absolute():
        cfg.home = str((path.parent / cfg.home).resolve())
    return cfg


# -- plan -------------------------------------------------------------------------------------------
@dataclass
class Branch:
    """One row of the table: a recording sorted by one sorter with one parameter set."""

    recording: str
    sorter: str
    label: str
    jobs: dict[str, Job]  # stage name -> job

    @property
    def summary(self) -> Job:
        return self.jobs["summarize"]


def _recording_job(spec: RecordingSpec) -> Job:
    if spec.generate is not None:
        return generate_recording.job(**spec.generate)
    uri = kt.store_file(spec.file)
    return recording_file.job(File(uri), spec.format, spec.meta)


def plan_batch(cfg: BatchConfig) -> list[Branch]:
    """The jobs of every branch (in the home in force); nothing runs except storing input files."""
    branches = []
    for rec_spec in cfg.recordings:
        rec = _recording_job(rec_spec)
        pre = preprocess.job(rec, **cfg.preprocess)
        for sort_spec in cfg.sorts:
            jobs: dict[str, Job] = {rec.task.func.__name__: rec, "preprocess": pre}
            srt = jobs["sort"] = sort.job(pre, sort_spec.sorter, sort_spec.params, seed=cfg.seed)
            cmp = jobs["compare"] = compare.job(srt, rec) if rec_spec.has_ground_truth else None
            qm = jobs["quality_metrics"] = quality_metrics.job(pre, srt, seed=cfg.seed) if cfg.quality_metrics else None
            jobs["summarize"] = summarize.job(srt, cmp, qm)
            branches.append(Branch(rec_spec.name, sort_spec.sorter, sort_spec.label,
                                   {k: v for k, v in jobs.items() if v is not None}))
    return branches


# -- run --------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    computed: int  # jobs computed in this run
    cached: int  # jobs of the batch already recorded
    wall_s: float
    outputs: dict[str, Path]
    cluster_stats: dict[str, Any] | None = None


def _stage(job: Job) -> str:
    return job.task.func.__name__


def pending_jobs(roots: list[Job]) -> list[Job]:
    """The jobs that must run to give ``roots`` a result: walking upstream from each root, a job
    with a recorded result stops the walk (its own upstream is never needed)."""
    pending: dict[str, Job] = {}
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        job = stack.pop()
        if job.id in seen:
            continue
        seen.add(job.id)
        if has_result(job):
            continue
        pending[job.id] = job
        stack.extend(job.upstream())
    return list(pending.values())


def _has_kachery_plugin(dask_scheduler: Any) -> bool:
    return "kachery" in dask_scheduler.plugins


def _compute_pending(pending: list[Job], scheduler: str | None, workers: int, home: str,
                     show_progress: bool) -> dict[str, Any]:
    """Compute ``pending`` jobs on a cluster; returns the KacheryPlugin's statistics."""
    import logging

    from distributed import Client, LocalCluster, as_completed

    from kachery_tasks.dask import KacheryPlugin, job_delayed, stats

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(scheduler if scheduler is not None else cluster)
    try:
        registered = client.run_on_scheduler(_has_kachery_plugin)
        if not registered:
            client.register_plugin(KacheryPlugin(home=home))
        before = stats(client)
        futures = client.compute([job_delayed(job) for job in pending])
        stage_of = {f.key: _stage(job) for f, job in zip(futures, pending, strict=True)}
        if show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), transient=False) as bar:
                task = bar.add_task("computing", total=len(futures))
                for future in as_completed(futures):
                    future.result()  # raises the task's error here
                    bar.update(task, advance=1, description=f"computed {stage_of[future.key]}")
        else:
            for future in as_completed(futures):
                future.result()
        after = stats(client)
        return {key: round(value - before.get(key, 0), 6) if isinstance(value, int | float) else value
                for key, value in after.items()}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_batch(cfg: BatchConfig, *, scheduler: str | None = None, workers: int = 2, show_progress: bool = True,
              write_outputs: bool = True) -> BatchResult:
    """Run the batch: compute what is missing, load the rest, write the table and figure."""
    start = time.perf_counter()
    with kt.config.set(home=cfg.home) if cfg.home else nullcontext():
        home = str(kt.config.home())
        branches = plan_batch(cfg)
        unique: dict[str, Job] = {}
        for branch in branches:
            for job in branch.jobs.values():
                unique.setdefault(job.id, job)
        pending = pending_jobs([branch.summary for branch in branches])
        pending_ids = {job.id for job in pending}
        cluster_stats = None
        if pending:
            cluster_stats = _compute_pending(pending, scheduler, workers, home, show_progress)
        rows = [_row(branch, pending_ids) for branch in branches]
        wall = time.perf_counter() - start
        outputs: dict[str, Path] = {}
        if write_outputs:  # in the batch's home, where the figure is stored
            outputs = write_results(rows, cfg.output, meta={"wall_s": round(wall, 3), "computed": len(pending),
                                                            "cached": len(unique) - len(pending), "home": home})
    return BatchResult(rows, len(pending), len(unique) - len(pending), wall, outputs, cluster_stats)


def _row(branch: Branch, pending_ids: set[str]) -> dict[str, Any]:
    summary = branch.summary.result()
    computed = [stage for stage, job in branch.jobs.items() if job.id in pending_ids]
    sort_job = branch.jobs["sort"]
    return {
        "recording": branch.recording,
        "sorter": branch.sorter,
        "params": branch.label,
        **{key: summary.get(key) for key in ("num_units", "accuracy", "precision", "recall", "num_gt_units",
                                              "num_well_detected", "num_false_positive", "median_snr", "sort_s")},
        "status": "cached" if sort_job.id not in pending_ids else "computed",
        "computed_stages": ",".join(computed),
        "sort_task_id": sort_job.id,
    }
