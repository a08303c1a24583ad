"""The README's stale example reruns: large array and bytes arguments are kept as blobs (issue 27, §4).

The README tour passes an in-memory array to its first task. Its record keeps the array as a
content-addressed blob of the store, so ``kachery task stale --rerun`` can replay the calls after a
helper changed; an argument above ``record_args_blob_max_bytes`` makes the rerun name both the task
that kept no copy and the task that cannot rerun because of it. The script runs as its own process and
the command line as another, from another directory, as a user runs them; executions are counted
through a file (tests/execution_log.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from execution_log import runs
from test_full_disk import (
    PRELUDE,
    ShimDisk,
    TmpfsDisk,
    assert_one_full_warning,
    assert_store_consistent,
    prime,
)

from kachery_tasks import config, pure
from kachery_tasks.store import current_store
from kachery_tasks.tasks.replay import NotReplayable, job_from_record

TESTS = Path(__file__).resolve().parent
N = 40_000  # float64: 320 000 bytes, as in the issue

PIPELINE = '''
import json
import sys

import numpy as np

sys.path.insert(0, {tests!r})
from execution_log import note

import kachery_tasks as kt

LOG = {log!r}


def taper(signal):
    return signal * np.hanning(len(signal))


def threshold_of(x, k):
    return k * float(np.median(np.abs(x))) / 0.6745


@kt.pure
def bandpass(signal, low=300.0, high=6000.0):
    note(LOG, "bandpass")
    return taper(signal - signal.mean())


@kt.pure
def detect(filtered, threshold=5.0):
    note(LOG, "detect")
    return int((np.abs(filtered) > threshold_of(filtered, threshold)).sum())


if __name__ == "__main__":
    job = detect.job(bandpass.job(np.load("rec.npy")), threshold=4.5)
    print(json.dumps({{"result": job.result(), "detect": job.id, "bandpass": job.args["filtered"].id}}))
'''


def _recording() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N)


def _script(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    work.mkdir()
    np.save(work / "rec.npy", _recording())
    log = tmp_path / "executions.log"
    script = work / "pipeline.py"
    script.write_text(PIPELINE.format(tests=str(TESTS), log=str(log)))
    return script, log


def _run(env: dict[str, str], script: Path, **extra: str) -> dict:
    done = subprocess.run([sys.executable, str(script)], cwd=script.parent, env={**env, **extra},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _edit(script: Path, old: str, new: str) -> None:
    text = script.read_text()
    assert old in text
    script.write_text(text.replace(old, new))


def test_the_readme_pipeline_reruns_after_a_helper_changes(tmp_path, env, kachery):
    script, log = _script(tmp_path)
    first = _run(env, script)
    assert runs(log) == ["bandpass", "detect"]
    store = current_store()
    kept = store.records.read(first["bandpass"]).args["signal"].to_json()
    assert kept["codec"] == "npy" and kept["size"] == 320_000 + 128 and kept["blob"].startswith("sha256://")
    assert set(kept) == {"hash", "blob", "codec", "size"}
    shown = kachery("task", "show", first["bandpass"][:12], extra_env={"COLUMNS": "300"}).stdout.decode()
    assert f"npy 320128 bytes {kept['blob']}" in shown and "not kept" not in shown

    _edit(script, "signal * np.hanning(len(signal))", "signal * np.hamming(len(signal))")
    done = kachery("task", "stale", "--rerun")
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "cannot rerun" not in err and "reran 2 call(s)" in out
    assert runs(log) == ["bandpass", "detect"] * 2  # both calls recomputed by the command line

    second = _run(env, script)
    assert runs(log) == ["bandpass", "detect"] * 2  # the script's next run: all hits
    assert second["bandpass"] != first["bandpass"] and second["detect"] != first["detect"]
    assert json.loads(kachery("task", "stale", "--json").stdout) == {"functions": {}, "unimportable": {}}


def test_an_argument_above_the_blob_limit_names_both_functions(tmp_path, env, kachery):
    script, log = _script(tmp_path)
    limit = {config.ENV_PREFIX + "RECORD_ARGS_BLOB_MAX_BYTES": "100000"}
    first = _run(env, script, **limit)
    assert current_store().records.read(first["bandpass"]).args["signal"].form == "omitted"

    _edit(script, "/ 0.6745", "/ 0.675")  # a helper of detect only: bandpass stays a hit
    done = kachery("task", "stale", "--rerun", extra_env=limit)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "reran 0 call(s)" in done.stdout.decode()
    assert err.splitlines() == [
        f"cannot rerun {first['detect']} (__main__.detect): its upstream __main__.bandpass kept no copy of "
        "argument 'signal' (320000 bytes > record_args_blob_max_bytes=100000)"
    ]
    done = kachery("task", "rerun", first["detect"], extra_env=limit)
    err = done.stderr.decode()
    assert done.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "__main__.detect: its upstream __main__.bandpass kept no copy of argument 'signal'" in err
    assert runs(log) == ["bandpass", "detect"]


# -- in this process: tasks at module level, where a rerun can import them ---------------------------
@pure
def mean_of(x):
    return float(np.mean(x))


@pure
def peak_of(x):
    return float(np.max(x))


@pure
def length_of(data):
    return len(data)


def test_the_same_array_passed_to_two_tasks_is_stored_once(run_python):
    x = _recording()
    mean_of(x)
    peak_of(x.copy())  # another object, the same bytes
    store = current_store()
    a = store.records.read(mean_of.task_id(x)).args["x"].to_json()
    b = store.records.read(peak_of.task_id(x)).args["x"].to_json()
    assert a["blob"] == b["blob"]
    assert list(store.blobs.iter_hashes()) == [a["blob"].removeprefix("sha256://")]
    # another process, which has not seen it: stored once still, by its SHA-256
    run_python(f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
               "import numpy as np, test_replay_large_args as t\n"
               f"t.length_of(np.random.default_rng(0).standard_normal({N}))")
    c = store.records.read(length_of.task_id(x)).args["data"].to_json()
    assert c["blob"] == a["blob"] and len(list(store.blobs.iter_hashes())) == 1


def test_the_task_id_is_unchanged_and_replay_rebuilds_it():
    x = _recording()
    data = x.tobytes()
    mean_of(x)
    length_of(data)
    store = current_store()
    for task, value in ((mean_of, x), (length_of, data)):
        task_id = task.task_id(value)
        record = store.records.read(task_id)
        assert record.task_id == task_id
        (entry,) = record.args.values()
        assert entry.codec == ("npy" if task is mean_of else "bytes")
        rebuilt = job_from_record(store, record)
        assert rebuilt.id == task_id  # the value read back hashes as the one passed
        assert type(next(iter(rebuilt.args.values()))) is type(value)
    # a blob that is gone makes the call not replayable, never another call
    digest = store.records.read(mean_of.task_id(x)).args["x"].blob.removeprefix("sha256://")
    os.chmod(store.blobs.path(digest), 0o644)
    store.blobs.path(digest).write_bytes(b"damaged")
    with pytest.raises(NotReplayable, match="mean_of: kept no readable copy of argument 'x' .sha256://.*do not match"):
        job_from_record(store, store.records.read(mean_of.task_id(x)))


# -- a full disk: the call returns its value, the argument is recorded as not kept -------------------
ARGTASKS = '''
import numpy as np
import kachery_tasks as kt


@kt.pure
def mean_of(x):
    return float(np.mean(x))
'''

CALL = f"""
    import argtasks
    x = np.random.default_rng(0).standard_normal({N})
    out["mean"] = call(argtasks.mean_of, x)
    out["task_id"] = argtasks.mean_of.task_id(x)
"""


def _run_on(disk, body: str) -> dict:
    (disk.mods / "argtasks.py").write_text(ARGTASKS)
    code = PRELUDE.format(mods=str(disk.mods)) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], env=disk.env, capture_output=True, text=True,
                          timeout=180, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(params=[TmpfsDisk, ShimDisk], ids=lambda cls: cls.name)
def disk(request, tmp_path, env):
    made = request.param(tmp_path, env)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def tmpfs(tmp_path, env):
    made = TmpfsDisk(tmp_path, env)
    try:
        yield made
    finally:
        made.close()


def test_an_argument_blob_that_does_not_fit_is_recorded_as_not_kept(tmpfs):
    prime(tmpfs)
    tmpfs.fill()
    size = tmpfs.filler.stat().st_size
    os.truncate(tmpfs.filler, size - 96 * 1024)  # room for a record, not for the argument's 320 kB
    done = _run_on(tmpfs, CALL)
    expected = float(np.mean(_recording()))
    assert done["mean"] == {"value": expected, "error": None, "warnings": []}
    tmpfs.free()
    with config.set(home=str(tmpfs.home)):
        entry = current_store().records.read(done["task_id"]).args["x"].to_json()
    assert set(entry) == {"hash", "omitted"}
    assert entry["omitted"].startswith("320000 bytes, not stored: ") and str(tmpfs.home) in entry["omitted"]
    assert_store_consistent(tmpfs)


def test_a_full_disk_still_returns_the_value_with_one_warning(disk):
    prime(disk)
    disk.fill()
    done = _run_on(disk, CALL)
    assert done["mean"]["value"] == float(np.mean(_recording()))
    assert_one_full_warning(done["mean"], disk, needs=False)
    assert_store_consistent(disk)
