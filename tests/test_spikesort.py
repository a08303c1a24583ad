"""kachery-spikesort: each stage equals spikeinterface's own result, reruns compute nothing, a changed
parameter recomputes exactly its branch, a real-format file round-trips, results load in a fresh
process. Small synthetic recordings (3 s, 4 channels, 3 units) and the fast ``simple`` sorter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("spikeinterface")
pytest.importorskip("kachery_spikesort")

import spikeinterface as si  # noqa: E402
import spikeinterface.extractors as se  # noqa: E402
import spikeinterface.preprocessing as spre  # noqa: E402
import spikeinterface.sorters as ss  # noqa: E402
from kachery_spikesort import (  # noqa: E402
    RecordingRef,
    compare,
    generate_recording,
    preprocess,
    quality_metrics,
    recording_file,
    seeded_numpy,
    sort,
    summarize,
)
from kachery_spikesort.batch import ConfigError, load_config, parse_config, run_batch  # noqa: E402
from kachery_spikesort.packing import pack_folder, unpacked_folder  # noqa: E402
from kachery_spikesort.sorter_table import (  # noqa: E402
    SORTER_DEFAULTS,
    check_sorter_params,
    params_label,
    spikeinterface_version,
)
from kachery_spikesort.stages import sorter_params  # noqa: E402
from spikeinterface.comparison import compare_sorter_to_ground_truth  # noqa: E402

import kachery_tasks as kt  # noqa: E402
from kachery_tasks.store import current_store  # noqa: E402
from kachery_tasks.store.task_record import TaskRecord  # noqa: E402

GEN = dict(seed=7, duration_s=3.0, num_channels=4, num_units=3)
#: What only a computation needs; a cached rerun and a config check must not import them.
HEAVY_MODULES = ("spikeinterface.sorters", "matplotlib", "distributed", "sklearn", "numba")
SIMPLE = {"detect_threshold": 5.0}


def gen_kwargs(seed=7, duration_s=3.0, num_channels=4, num_units=3):
    """What generate_recording must hand spikeinterface (written out independently here)."""
    return dict(durations=[duration_s], sampling_frequency=30000.0, num_channels=num_channels,
                num_units=num_units, seed=seed, noise_kwargs={"noise_levels": 5.0, "strategy": "on_the_fly"},
                generate_sorting_kwargs={"firing_rates": 15.0, "refractory_period_ms": 4.0})


def records() -> list[TaskRecord]:
    return list(current_store().records.iter_records())


def computed_by_stage(before: list[TaskRecord], after: list[TaskRecord]) -> Counter:
    """Records written between two snapshots (new ids or rewritten ones), by stage name."""
    old = {r.task_id: r.created for r in before}
    return Counter(r.function.name.rsplit(".", 1)[-1] for r in after
                   if old.get(r.task_id) != r.created)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("spikesort-home")
    with kt.config.set(home=str(path)):
        yield path


@pytest.fixture(scope="module")
def chain(home):
    rec = generate_recording.job(**GEN)
    pre = preprocess.job(rec, freq_min=300.0, freq_max=6000.0, reference="global")
    srt = sort.job(pre, "simple", SIMPLE)
    return {"rec": rec, "pre": pre, "sort": srt}


def test_generate_equals_spikeinterface(chain):
    ref = chain["rec"].result()
    assert isinstance(ref, RecordingRef) and ref.kind == "si_folder"
    rec, gt = si.generate_ground_truth_recording(**gen_kwargs())
    ours = ref.load()
    assert ours.get_num_channels() == 4 and ours.get_sampling_frequency() == 30000.0
    np.testing.assert_array_equal(ours.get_traces(), rec.get_traces())
    np.testing.assert_array_equal(ours.get_channel_locations(), rec.get_channel_locations())
    ours_gt = ref.ground_truth.load()
    assert list(map(str, ours_gt.unit_ids)) == list(map(str, gt.unit_ids))
    for a, b in zip(ours_gt.unit_ids, gt.unit_ids, strict=True):
        np.testing.assert_array_equal(ours_gt.get_unit_spike_train(a), gt.get_unit_spike_train(b))


def test_preprocess_equals_spikeinterface(chain):
    raw = chain["rec"].result().load()
    expected = spre.common_reference(spre.bandpass_filter(raw, freq_min=300.0, freq_max=6000.0, dtype="float32"),
                                     reference="global", operator="median")
    ours = chain["pre"].result()
    assert ours.ground_truth == chain["rec"].result().ground_truth  # carried along
    traces = ours.load().get_traces()
    assert traces.dtype == np.float32
    # spikeinterface saves chunk by chunk with filter margins; the whole-range read is the reference
    np.testing.assert_allclose(traces, expected.get_traces(), rtol=0, atol=1e-3 * float(np.std(traces)))


def test_sort_equals_run_sorter(chain, tmp_path):
    ours = chain["sort"].result().load()
    with seeded_numpy(0):
        theirs = ss.run_sorter("simple", chain["pre"].result().load(), folder=str(tmp_path / "run"),
                               remove_existing_folder=True, verbose=False, **sorter_params(SIMPLE))
    assert list(map(str, ours.unit_ids)) == list(map(str, theirs.unit_ids))
    for a, b in zip(ours.unit_ids, theirs.unit_ids, strict=True):
        np.testing.assert_array_equal(ours.get_unit_spike_train(a), theirs.get_unit_spike_train(b))


def test_compare_and_metrics_equal_spikeinterface(chain):
    cmp = compare(chain["sort"], chain["rec"])
    gt = chain["rec"].result().ground_truth.load()
    tested = chain["sort"].result().load()
    theirs = compare_sorter_to_ground_truth(gt, tested, exhaustive_gt=True).get_performance(method="by_unit")
    for col in ("accuracy", "precision", "recall"):
        assert cmp[col] == pytest.approx(list(theirs[col]))
        assert cmp["mean"][col] == pytest.approx(float(theirs[col].mean()))
    assert cmp["num_units"] == len(tested.unit_ids) and cmp["num_gt_units"] == 3

    qm = quality_metrics(chain["pre"], chain["sort"], metric_names=["num_spikes", "firing_rate"])
    assert qm["metrics"]["num_spikes"] == [len(tested.get_unit_spike_train(u)) for u in tested.unit_ids]
    row = summarize(chain["sort"], cmp, qm)
    assert row["accuracy"] == pytest.approx(cmp["mean"]["accuracy"]) and row["num_units"] == len(tested.unit_ids)


def test_handles_are_canonical_and_packing_deterministic(chain, tmp_path):
    ref = chain["pre"].result()
    canon = ref.__kachery_canon__()
    assert str(tmp_path) not in json.dumps(canon) and "/" not in json.dumps(canon).replace("sha256", "")
    folder = unpacked_folder(ref.uri)
    assert pack_folder(folder, "again.tar").split("?")[0] == ref.uri.split("?")[0]
    # a job chained on a job and a call on the loaded handle name the same inputs differently
    # but both are Merkle: the downstream id changes when (and only when) the upstream does
    assert sort.job(chain["pre"], "simple", SIMPLE).id == chain["sort"].id
    assert sort.job(chain["pre"], "simple", {"detect_threshold": 6.0}).id != chain["sort"].id


def test_recording_file_round_trip(home, tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 20, size=(30000, 4))).astype("int16")
    dat = tmp_path / "session.dat"
    data.tofile(dat)
    meta = tmp_path / "session.json"
    meta.write_text(json.dumps({"sampling_frequency": 10000, "num_channels": 4, "dtype": "int16", "gain_to_uV": 0.5}))
    ref = recording_file(kt.File(kt.store_file(dat)), "binary", kt.File(kt.store_file(meta)))
    assert ref.kind == "binary" and ref.info["num_samples"] == 30000
    rec = ref.load()
    np.testing.assert_array_equal(rec.get_traces(), data)
    np.testing.assert_allclose(rec.get_traces(return_in_uV=True), data * 0.5)
    assert rec.has_probe() and rec.get_num_channels() == 4
    direct = se.read_binary(str(dat), sampling_frequency=10000.0, dtype="int16", num_channels=4)
    pre = preprocess(ref, freq_min=300.0, freq_max=3000.0, reference=None)
    expected = spre.bandpass_filter(direct, freq_min=300.0, freq_max=3000.0, dtype="float32").get_traces()
    got = pre.load().get_traces()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * float(np.std(got)))
    with pytest.raises(ValueError, match="whole frames"):
        recording_file(kt.File(kt.store_file(dat)), "binary", {"sampling_frequency": 1, "num_channels": 7,
                                                                  "dtype": "int16"})


def _batch_data(seeds, thresholds, output):
    return {
        "recordings": [{"generate": {"seed": seeds, "duration_s": 3.0, "num_channels": 4, "num_units": 3}}],
        "preprocess": {"freq_min": 300, "freq_max": 6000, "reference": "global"},
        "sorters": [{"sorter": "simple", "params": {"detect_threshold": 5.0},
                     "grid": {"detect_threshold": thresholds}}],
        "quality_metrics": True,
        "output": str(output),
    }


def _batch_cfg(seeds, thresholds, output):
    return parse_config(_batch_data(seeds, thresholds, output))


def run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -m kachery_spikesort ARGS`` in a new interpreter: the result, and the modules it
    imported (from ``-X importtime``)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "kachery_spikesort", *args],
                         capture_output=True, text=True, timeout=300, cwd=str(cwd))
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    out.stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("import time:"))
    return out, imported


def heavy(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if m.partition(".")[0] in HEAVY_MODULES or m in HEAVY_MODULES)


def test_batch_rerun_param_change_and_new_recording(home, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        before = records()
        first = run_batch(_batch_cfg([1, 2], [4.5, 5.5], tmp_path / "a"), scheduler=address, show_progress=False)
        assert len(first.rows) == 4 and all(r["status"] == "computed" for r in first.rows)
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in first.rows)
        assert first.cluster_stats["misses"] == first.computed
        made = computed_by_stage(before, records())
        assert made == {"generate_recording": 2, "preprocess": 2, "sort": 4, "compare": 4,
                        "quality_metrics": 4, "summarize": 4, "accuracy_figure": 1}
        for name in ("results.csv", "results.json", "accuracy.png"):
            assert (tmp_path / "a" / name).stat().st_size > 0

        # rerun: nothing computed, no cluster needed, same table
        snap = records()
        again = run_batch(_batch_cfg([1, 2], [4.5, 5.5], tmp_path / "b"), scheduler="tcp://127.0.0.1:1",
                          show_progress=False)
        assert again.computed == 0 and computed_by_stage(snap, records()) == {}
        assert [r["accuracy"] for r in again.rows] == [r["accuracy"] for r in first.rows]
        assert all(r["status"] == "cached" for r in again.rows)

        # the same rerun as a whole command: the same files, and nothing that only a computation needs
        config = tmp_path / "batch.yaml"
        config.write_text(json.dumps(_batch_data([1, 2], [4.5, 5.5], tmp_path / "cli")))  # JSON is YAML
        out, imported = run_cli("batch", str(config), "--home", str(home), "--no-progress", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "0 task(s) computed" in out.stdout and computed_by_stage(snap, records()) == {}
        for name in ("results.csv", "accuracy.png"):
            assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert json.loads((tmp_path / "cli" / "results.json").read_text())["rows"] == again.rows
        assert heavy(imported) == []
        # again into the same folder: unchanged files are not rewritten
        written = {name: (tmp_path / "cli" / name).stat().st_mtime_ns for name in ("results.csv", "accuracy.png")}
        out, _ = run_cli("batch", str(config), "--home", str(home), "--no-progress", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert {name: (tmp_path / "cli" / name).stat().st_mtime_ns for name in written} == written

        # one parameter value changed: only those sorts and their downstream
        snap = records()
        changed = run_batch(_batch_cfg([1, 2], [4.5, 6.0], tmp_path / "c"), scheduler=address, show_progress=False)
        assert computed_by_stage(snap, records()) == {"sort": 2, "compare": 2, "quality_metrics": 2, "summarize": 2,
                                                      "accuracy_figure": 1}
        assert [r["status"] for r in changed.rows] == ["cached", "computed", "cached", "computed"]

        # a recording added: only its branch
        snap = records()
        added = run_batch(_batch_cfg([1, 2, 3], [4.5, 6.0], tmp_path / "d"), scheduler=address, show_progress=False)
        assert computed_by_stage(snap, records()) == {"generate_recording": 1, "preprocess": 1, "sort": 2,
                                                      "compare": 2, "quality_metrics": 2, "summarize": 2,
                                                      "accuracy_figure": 1}
        assert [r["recording"] for r in added.rows if r["status"] == "computed"] == ["gen-seed3"] * 2


def test_results_load_in_fresh_process(chain, home):
    expected = {str(u): chain["sort"].result().load().get_unit_spike_train(u).tolist()
                for u in chain["sort"].result().load().unit_ids}
    n_before = len(records())
    script = textwrap.dedent(f"""
        import json
        from kachery_tasks.tasks import has_result
        from kachery_spikesort import generate_recording, preprocess, sort
        rec = generate_recording.job(**{GEN!r})
        pre = preprocess.job(rec, freq_min=300.0, freq_max=6000.0, reference="global")
        srt = sort.job(pre, "simple", {SIMPLE!r})
        assert srt.id == {chain["sort"].id!r}, srt.id
        assert has_result(srt)
        sorting = srt.result().load()
        print(json.dumps({{str(u): sorting.get_unit_spike_train(u).tolist() for u in sorting.unit_ids}}))
    """)
    env = {**os.environ, "KACHERY_TASKS_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(home)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
    assert len(records()) == n_before  # loaded, nothing recomputed


def test_concurrent_unpack_of_one_uri(chain, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    uri = chain["rec"].result().uri
    tar = kt.load_file(uri)
    with kt.config.set(home=str(tmp_path / "other-home")):
        fresh = kt.store_file(tar, label="copy.tar")

        def load(_):
            return unpacked_folder(fresh)

        with ThreadPoolExecutor(8) as pool:
            folders = set(pool.map(load, range(8)))
        assert len(folders) == 1
        assert si.load(folders.pop()).get_num_channels() == 4


def test_sorter_table_matches_the_registry():
    """The table that checks parameters without importing the registry says what the registry says,
    for the spikeinterface installed (a new version needs its row: pyproject pins 0.105)."""
    table = SORTER_DEFAULTS.get(spikeinterface_version())
    assert table is not None, f"add spikeinterface {spikeinterface_version()} to sorter_table.SORTER_DEFAULTS"
    assert set(table) <= set(ss.installed_sorters())
    for sorter, defaults in table.items():
        assert defaults == ss.get_default_sorter_params(sorter), sorter  # names and default values
    check_sorter_params("simple", {"detect_threshold": 4.0, "job_kwargs": {}})
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['detect_treshold'\] for sorter 'simple'"):
        check_sorter_params("simple", {"detect_treshold": 4.0})
    with pytest.raises(ConfigError, match="sorter 'kilosort4' is not installed; installed: .*spykingcircus2"):
        check_sorter_params("kilosort4", {})  # not in the table: the registry answers


@pytest.mark.parametrize(("sorters", "message"), [
    ([{"sorter": "simple", "params": {"detect_treshold": 5}}],
     "unknown parameter(s) ['detect_treshold'] for sorter 'simple'"),
    ([{"sorter": "spykingcircus2", "grid": {"apply_motion_corection": [True, False]}}],
     "unknown parameter(s) ['apply_motion_corection'] for sorter 'spykingcircus2'"),
    ([{"sorter": "nosuchsorter"}], "sorter 'nosuchsorter' is not installed; installed: "),
])
def test_bad_config_is_a_one_line_error_before_anything_runs(tmp_path, sorters, message):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({**_batch_data([1], [5.0], tmp_path / "out"), "sorters": sorters}))
    out, imported = run_cli("batch", str(config), "--home", str(tmp_path / "home"), "--no-progress", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr, out.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "out").exists()
    if "not installed" not in message:  # a known sorter is checked from the table
        assert heavy(imported) == []


EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "spikesort" / "examples" / "small.yaml"


def test_params_column_shows_what_differs_from_the_defaults(tmp_path):
    """A sorter given explicit params was labelled 'default' (issue 27 section 6): the table names
    the params that differ from the sorter's defaults, and only those."""
    sorters = [
        {"sorter": "simple", "params": {"detect_threshold": 5}, "grid": {"detect_threshold": [4.5, 5.5]}},
        {"sorter": "spykingcircus2", "params": {"apply_motion_correction": False}},
        {"sorter": "simple", "params": {"detect_threshold": 5, "peak_sign": "pos"}},  # 5 is the default 5.0
        {"sorter": "simple"},
        {"sorter": "spykingcircus2", "params": {"detection": {"method": "matched_filtering"}},
         "grid": {"detection.method_kwargs.detect_threshold": [4]}},
        {"sorter": "tridesclous2", "params": {"debug": 0}},  # 0 is not False to a reader of the table
    ]
    cfg = parse_config({**_batch_data([1], [5.0], tmp_path / "out"), "sorters": sorters})
    assert [s.label for s in cfg.sorts] == [
        "detect_threshold=4.5", "detect_threshold=5.5", "apply_motion_correction=False", "peak_sign=pos",
        "default", "detection.method_kwargs.detect_threshold=4", "debug=0",
    ]
    assert params_label("simple", {"clusterer_kwargs": {}, "job_kwargs": {"n_jobs": 2}}) == "job_kwargs.n_jobs=2"
    assert params_label("spykingcircus2", {"general": {"nope": 1}}) == "general.nope=1"  # no known default: shown


def test_example_writes_under_the_current_directory(tmp_path, monkeypatch):
    """The example wrote small-results/ beside itself, in the source tree (issue 27 section 6): a
    relative output is taken from the current directory; input files stay relative to the config."""
    monkeypatch.chdir(tmp_path)
    assert load_config(EXAMPLE).output == tmp_path / "small-results"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rec.dat").write_bytes(b"\0" * 64)
    config = tmp_path / "configs" / "batch.yaml"
    config.write_text(json.dumps({**_batch_data([1], [5.0], "out"), "recordings": [
        {"file": "rec.dat", "meta": {"sampling_frequency": 30000, "num_channels": 2, "dtype": "int16"}}]}))
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cfg = load_config(config)
    assert cfg.output == tmp_path / "run" / "out"
    assert cfg.recordings[0].file == tmp_path / "configs" / "rec.dat"
    assert parse_config(_batch_data([1], [5.0], "~/x")).output == Path.home() / "x"
