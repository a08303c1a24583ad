"""The task engine: pure, query, action semantics, single flight, explain, cache control."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from execution_log import note, runs

import kachery_tasks as kt
from kachery_tasks import config
from kachery_tasks.errors import (
    CodecError,
    ReadOnlyStoreError,
    StaleResultWarning,
    UnhashableArgument,
    UserError,
)
from kachery_tasks.store import current_store
from kachery_tasks.tasks import MEMORY, ActionResult, action, explain, pure, query


def _module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def _run(tmp_path: Path, env: dict[str, str], code: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


# -- pure ------------------------------------------------------------------------------------------
def test_pure_computes_once_and_binds_defaults(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def add(x, y=2):
        note(log, f"{x}")
        return x + y

    assert add(1) == 3
    assert add(x=1) == 3
    assert add(1, y=2) == 3
    assert add(1, 2) == 3
    assert len(runs(log)) == 1
    assert add.task_id(1) == add.task_id(x=1, y=2)
    assert add.task_id(1) != add.task_id(2)
    MEMORY.clear()
    assert add(1) == 3  # from the store
    assert len(runs(log)) == 1
    record = current_store().records.read(add.task_id(1))
    assert record.status == "succeeded" and record.result.form == "inline" and record.result.value == 3
    assert record.args["x"].to_json() == {"hash": record.args["x"].hash, "json": 1}


def test_jobs_are_merkle_and_nothing_runs(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def source(n):
        note(log, "source")
        return list(range(n))

    @pure
    def total(values):
        return sum(values)

    job = total.job(source.job(10))
    other = total.job(source.job(11))
    assert job.id != other.id
    assert len(runs(log)) == 0
    assert job.result() == 45
    assert len(runs(log)) == 1
    # the downstream id is the same whether the upstream is a job or a job made again
    assert total.job(source.job(10)).id == job.id


def test_npy_results_come_back_mapped_copy_on_write(home):
    @pure
    def ramp(n):
        return np.arange(n, dtype=np.float64)

    first = ramp(100_000)
    assert isinstance(first, np.ndarray)
    MEMORY.clear()
    again = ramp(100_000)
    assert type(again) is np.ndarray and again.flags.writeable  # as on the computing call
    assert isinstance(again.base, np.memmap) and again.base.mode == "c"  # loaded by a private map
    np.testing.assert_array_equal(again, np.arange(100_000, dtype=np.float64))
    again[:] = -1
    MEMORY.clear()
    np.testing.assert_array_equal(ramp(100_000), np.arange(100_000, dtype=np.float64))  # blob untouched


def test_results_of_every_codec_round_trip(home):
    @pure(codec="pickle")
    def as_pickle(x):
        return {"tuple": (x, x), "set": {x}}

    @pure
    def big_json(n):
        return {"values": list(range(n))}

    assert as_pickle(3) == {"tuple": (3, 3), "set": {3}}
    assert big_json(10_000)["values"][-1] == 9999
    MEMORY.clear()
    assert as_pickle(3) == {"tuple": (3, 3), "set": {3}}
    assert big_json(10_000)["values"][-1] == 9999
    record = current_store().records.read(big_json.task_id(10_000))
    assert record.result.uri is not None  # too large to inline


def test_mutating_a_result_does_not_change_the_cache(home):
    @pure
    def make():
        return [1, 2, 3]

    first = make()
    first.append(4)
    assert make() == [1, 2, 3]


def test_codec_that_cannot_encode_is_a_clear_error(home):
    @pure(codec="json")
    def not_json():
        return (1, 2)

    with pytest.raises(CodecError, match="codec 'json'"):
        not_json()
    with pytest.raises(UserError, match="unknown codec"):
        pure(codec="yaml")(lambda: 1)


def test_unhashable_argument_raises_before_running(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def f(x):
        Path(log).write_text("ran")
        return 1

    with pytest.raises(UnhashableArgument):
        f(object())
    assert not Path(log).exists()


def test_corrupt_record_is_quarantined_and_recomputed(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def f(x):
        note(log, "x")
        return x * 2

    assert f(4) == 8
    path = current_store().records.path(f.task_id(4))
    path.write_text("{not json")
    MEMORY.clear()
    assert f(4) == 8
    assert len(runs(log)) == 2
    assert list((home / "tasks" / "quarantine").iterdir())


def test_record_whose_blob_is_missing_recomputes(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def f(n):
        note(log, "x")
        return np.ones(n)

    f(1000)
    record = current_store().records.read(f.task_id(1000))
    sha = record.result.sha256
    current_store().blobs.path(sha).unlink()
    MEMORY.clear()
    assert f(1000).sum() == 1000
    assert len(runs(log)) == 2
    assert current_store().blobs.exists(sha)  # the recompute put the blob back


def test_damaged_blob_is_replaced_by_the_recompute(home, tmp_path):
    @pure
    def f(n):
        return np.ones(n)

    f(1000)
    record = current_store().records.read(f.task_id(1000))
    sha = record.result.sha256
    blob = current_store().blobs.path(sha)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    data += b"x"  # a different size: the record is incomplete at once
    blob.write_bytes(bytes(data))
    MEMORY.clear()
    assert f(1000).sum() == 1000
    assert current_store().blobs.verified_path(sha, rehash=True)


# -- cache control ---------------------------------------------------------------------------------
def test_force_recomputes_and_replaces(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def f(x):
        note(log, "x")
        return time.time()

    first = f(1)
    forced = f.options(force=True)(1)
    assert forced != first
    assert len(runs(log)) == 2
    MEMORY.clear()
    assert f(1) == forced  # the record was replaced
    with config.set(force=True):
        f(1)
    assert len(runs(log)) == 3


def test_cache_false_leaves_no_record(home):
    @pure
    def f(x):
        return x + 1

    assert f.options(cache=False)(1) == 2
    assert not list(current_store().records.iter_records())
    with config.set(cache=False):
        assert f(5) == 6
    assert not list(current_store().records.iter_records())


def test_read_only_uses_hits_and_never_writes(home):
    @pure
    def f(x):
        return x + 1

    f(1)
    with config.set(read_only=True):
        assert f(1) == 2
        assert f(2) == 3  # computed, not stored
    assert current_store().records.read(f.task_id(2)) is None
    with config.set(read_only=True), pytest.raises(ReadOnlyStoreError):
        kt.store_bytes(b"x")


def test_read_only_home_on_disk(home, tmp_path, env):
    """A home on a read-only file system still serves hits (a read-only bind mount in a private
    mount namespace: as root, permission bits alone would not stop a write)."""
    import shutil

    if os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount the home read-only")
    _module(tmp_path, "romod", """
        from kachery_tasks import pure
        @pure
        def f(x):
            return x * 10
    """)
    done = _run(tmp_path, env, "import romod; print(romod.f(3))")
    assert done.returncode == 0, done.stderr
    code = "import romod, kachery_tasks as kt\nwith kt.config.set(read_only=True):\n    print(romod.f(3), romod.f(4))"
    script = (f"mount --bind {home} {home} && mount -o remount,ro,bind {home} && "
              f"touch {home}/probe 2>/dev/null && echo WRITABLE; exec {sys.executable} -c '{code}'")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    if "mount" in result.stderr and result.returncode != 0 and "romod" not in result.stderr:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    assert "WRITABLE" not in result.stdout
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["30", "40"]


def test_namespace_disowns_results_and_explain_says_why(home):
    @pure
    def f(x):
        return x

    f(1)
    with config.set(namespace="v2"):
        job = f.job(1)
        assert explain(job).hit is False
        assert "namespace" in str(explain(job))
    assert f.options(namespace="v2").task_id(1) != f.task_id(1)
    assert explain(f.job(1)).hit is True


def test_unknown_option_is_refused(home):
    @pure
    def f(x):
        return x

    with pytest.raises(UserError, match="unknown task option"):
        f.options(forse=True)


# -- failures --------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def test_failure_is_recorded_not_served_and_superseded(home, tmp_path):
    flag = str(tmp_path / "fail")
    Path(flag).write_text("1")

    @pure
    def fragile(x):
        if os.path.exists(flag):
            raise Boom(f"broken on {x}")
        return x

    with pytest.raises(Boom):
        fragile(7)
    store = current_store()
    failures = list(store.records.iter_records(failures=True))
    assert [f.error.message for f in failures] == ["broken on 7"]
    assert failures[0].error.type.endswith("Boom")
    with pytest.raises(Boom):  # computes again, not served
        fragile(7)
    assert "failed" in str(explain(fragile.job(7)))
    os.unlink(flag)
    assert fragile(7) == 7
    assert not list(store.records.iter_records(failures=True))


def test_cache_errors_serves_the_recorded_exception(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure(cache_errors=True)
    def bad(x):
        note(log, "x")
        raise Boom("nope")

    with pytest.raises(Boom):
        bad(1)
    with pytest.raises(Boom):
        bad(1)
    assert len(runs(log)) == 1


# -- query -----------------------------------------------------------------------------------------
def test_query_runs_every_time_and_falls_back_when_it_fails(home, tmp_path):
    state = str(tmp_path / "state.txt")
    Path(state).write_text("1")

    @query
    def read_state():
        with open(state) as fh:
            return int(fh.read())

    assert read_state() == 1
    Path(state).write_text("2")
    assert read_state() == 2
    os.unlink(state)
    with pytest.warns(StaleResultWarning):
        assert read_state() == 2
    with pytest.raises(FileNotFoundError):
        read_state.job().result(allow_stale=False)


def test_query_without_record_propagates(home):
    @query
    def broken():
        raise Boom("down")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Boom):
            broken()


# -- explain ---------------------------------------------------------------------------------------
def test_explain_names_changed_argument_and_upstream(home):
    @pure
    def load(n):
        return list(range(n))

    @pure
    def stat(values, scale=1.0):
        return sum(values) * scale

    stat(load.job(5), scale=2.0)
    e = explain(stat.job(load.job(5), scale=3.0))
    assert not e.hit and any("'scale'" in d for d in e.differences)
    e = explain(stat.job(load.job(6), scale=2.0))
    assert any("upstream" in d for d in e.differences)
    assert "values" in e.upstream and any("'n'" in d for d in e.upstream["values"].differences)
    assert explain(stat.job(load.job(5), scale=2.0)).hit


def test_explain_names_the_changed_helper(tmp_path, home, env):
    _module(tmp_path, "helpers_x", "def helper(x):\n    return x + 1\n")
    _module(tmp_path, "pipeline_x", """
        from kachery_tasks import pure
        from helpers_x import helper
        @pure
        def f(x):
            return helper(x)
    """)
    first = _run(tmp_path, env, "import pipeline_x; print(pipeline_x.f(1))")
    assert first.returncode == 0, first.stderr
    (tmp_path / "helpers_x.py").write_text("def helper(x):\n    return x + 2\n")
    second = _run(tmp_path, env, "import pipeline_x, kachery_tasks as kt; print(kt.explain(pipeline_x.f.job(1)))")
    assert second.returncode == 0, second.stderr
    assert "miss" in second.stdout and "helpers_x.helper" in second.stdout


def _start_and_wait_until_running(code: str, cwd: Path, env: dict[str, str], log: str) -> subprocess.Popen:
    """Start ``python -c code`` and return once its task has logged that it runs."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env)
    deadline = time.time() + 30
    while len(runs(log)) < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert len(runs(log)) == 1, "the task never started"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# -- single flight ---------------------------------------------------------------------------------
SLOW = """
    import os, time
    from kachery_tasks import pure
    LOG = os.environ["CALL_LOG"]
    @pure
    def slow(x):
        with open(LOG, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(float(os.environ.get("SLEEP", "1.0")))
        return x * 2
"""


def test_eight_processes_compute_once(tmp_path, home, env):
    _module(tmp_path, "slowmod", SLOW)
    log = str(tmp_path / "calls.txt")
    env = {**env, "CALL_LOG": str(log)}
    procs = [subprocess.Popen([sys.executable, "-c", "import slowmod; print(slowmod.slow(21))"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    assert [o[0].strip() for o in outputs] == ["42"] * 8
    assert len(runs(log)) == 1


def test_threads_compute_once(home, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = str(tmp_path / "calls.txt")

    @pure
    def slow(x):
        note(log, "x")
        time.sleep(0.5)
        return x

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(slow, [5] * 6)) == [5] * 6
    assert len(runs(log)) == 1


def test_killed_computer_is_taken_over(tmp_path, home, env):
    _module(tmp_path, "slowmod2", SLOW)
    log = str(tmp_path / "calls.txt")
    env = {**env, "CALL_LOG": str(log), "SLEEP": "30"}
    victim = _start_and_wait_until_running("import slowmod2; slowmod2.slow(1)", tmp_path, env, log)
    deadline = time.time() + 15
    while True:  # a holder shows itself once it has computed for flight.SHOW_AFTER_S
        listing = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "task", "ls", "--running", "--json"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        if json.loads(listing.stdout) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert [r["pid"] for r in json.loads(listing.stdout)] == [victim.pid]
    env_fast = {**env, "SLEEP": "0"}
    waiter = subprocess.Popen([sys.executable, "-c", "import slowmod2; print(slowmod2.slow(1))"], cwd=tmp_path,
                              env=env_fast, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # waiting for the computing process
    _kill(victim)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    after = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "task", "ls", "--running", "--json"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert json.loads(after.stdout) == []
    assert out.strip() == "2"
    assert len(runs(log)) == 2
    records = list(current_store().records.iter_records())
    assert len(records) == 1 and records[0].result.value == 2


# -- actions ---------------------------------------------------------------------------------------
ACTIONS = """
    import os, time
    from kachery_tasks import action
    LOG = os.environ["CALL_LOG"]
    @action
    def send(message):
        with open(LOG, "a") as fh:
            fh.write(message + "\\n")
        time.sleep(float(os.environ.get("SLEEP", "0")))
        if message == "bad":
            raise ValueError("refused")
"""


def test_action_runs_once_across_processes_and_restarts(tmp_path, home, env):
    _module(tmp_path, "actmod", ACTIONS)
    log = str(tmp_path / "calls.txt")
    env = {**env, "CALL_LOG": str(log), "SLEEP": "0.5"}
    code = "import actmod; r = actmod.send('hello'); print(r.ok)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    assert [o[0].strip() for o in outputs] == ["True"] * 4
    assert len(runs(log)) == 1
    again = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.stdout.strip() == "True" and len(runs(log)) == 1


def test_action_failure_is_recorded_and_returned(tmp_path, home):
    log = str(tmp_path / "calls.txt")

    @action
    def send(message):
        note(log, message)
        if message == "bad":
            raise ValueError("refused")

    result = send("bad")
    assert isinstance(result, ActionResult) and not result.ok and "refused" in result.error
    again = send("bad")
    assert not again.ok and again.replayed and len(runs(log)) == 1
    retried = send.call("bad", retry=True)
    assert not retried.ok and len(runs(log)) == 2
    assert send.call("other", key="k1").ok and send.call("different", key="k1").replayed
    assert len(runs(log)) == 3


def test_action_killed_midway_is_unknown_until_settled(tmp_path, home, env):
    _module(tmp_path, "actmod2", ACTIONS)
    log = str(tmp_path / "calls.txt")
    env = {**env, "CALL_LOG": str(log), "SLEEP": "30"}
    _kill(_start_and_wait_until_running("import actmod2; actmod2.send('x')", tmp_path, env, log))
    env["SLEEP"] = "0"
    check = subprocess.run([sys.executable, "-c", "import actmod2; r = actmod2.send('x'); print(r.state)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "unknown", check.stderr
    listing = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "task", "actions", "--unknown", "--json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listing.returncode == 0 and '"unknown"' in listing.stdout
    key = __import__("json").loads(listing.stdout)[0]["key"]
    settle = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "task", "resolve", key, "--succeeded"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert settle.returncode == 0, settle.stderr
    check = subprocess.run([sys.executable, "-c", "import actmod2; r = actmod2.send('x'); print(r.ok, r.state)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "True succeeded"
    assert len(runs(log)) == 1


# -- stability -------------------------------------------------------------------------------------
def test_ids_are_stable_across_processes(tmp_path, home, env):
    _module(tmp_path, "stable_mod", """
        from kachery_tasks import pure
        @pure
        def f(x, opts=None):
            return x
    """)
    code = "import stable_mod; print(stable_mod.f.task_id(1.5, opts={'a': [1, (2, 3)], 'b': {4}}))"
    ids = {subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONHASHSEED": str(seed)},
                          capture_output=True, text=True).stdout.strip() for seed in (1, 2, 3)}
    assert len(ids) == 1 and len(ids.pop()) == 32


def test_two_homes_side_by_side(tmp_path):
    @pure
    def f(x):
        return x

    a, b = tmp_path / "a", tmp_path / "b"
    with config.set(home=str(a)):
        f(1)
    with config.set(home=str(b)):
        job = f.job(1)
        assert not explain(job).hit
    with config.set(home=str(a)):
        assert explain(f.job(1)).hit
    assert job.settings.home == str(b)


def test_tiers_choose_where_hits_come_from(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def f(x):
        note(log, "x")
        return x

    f(1)
    MEMORY.clear()
    with config.set(tiers=["memory"]):  # the store is not consulted: computes again
        f(1)
    assert len(runs(log)) == 2
    with config.set(tiers=["memory", "local", "cloud"]), pytest.raises(UserError, match="unknown resolution tier"):
        f(1)


def test_tasks_pickle_by_reference_with_their_options(tmp_path, env):
    """A worker must compute the same function id: tasks travel as references to their module."""
    _module(tmp_path, "picklemod", """
        from kachery_tasks import pure
        @pure
        def f(x):
            return x
    """)
    code = textwrap.dedent("""
        import cloudpickle, picklemod
        data = cloudpickle.dumps((picklemod.f, picklemod.f.options(force=True)))
        assert b"picklemod" in data and len(data) < 600, len(data)
        plain, forced = cloudpickle.loads(data)
        assert plain is picklemod.f and forced.func is picklemod.f.func
        assert forced.call_options == {"force": True}
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_import_stays_free_of_dask_until_used():
    code = ("import sys, kachery_tasks as kt\n"
            "assert 'dask' not in sys.modules and 'distributed' not in sys.modules\n"
            "assert kt.cached.__module__ == 'kachery_tasks.dask.cached'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_big_integers_come_back_exact(home):
    @pure
    def big(n):
        return {"value": 10**n, "list": [2**64, -(2**70)]}

    expected = {"value": 10**30, "list": [2**64, -(2**70)]}
    assert big(30) == expected
    MEMORY.clear()
    assert big(30) == expected  # from the store: not turned into floats
    record = current_store().records.read(big.task_id(30))
    assert record.result.codec == "pickle"


def test_methods_are_tasks_bound_to_their_instance(home, tmp_path):
    import dataclasses

    log = str(tmp_path / "calls.txt")

    @dataclasses.dataclass(frozen=True)
    class Filter:
        low: float

        @pure
        def apply(self, values):
            note(log, "x")
            return [v for v in values if v >= self.low]

    assert Filter(2.0).apply([1, 2, 3]) == [2, 3]
    assert Filter(2.0).apply([1, 2, 3]) == [2, 3]
    assert len(runs(log)) == 1
    assert Filter(2.0).apply.task_id([1]) != Filter(3.0).apply.task_id([1])
    assert Filter(1.0).apply.options(cache=False)([1]) == [1]

    class Opaque:
        @pure
        def value(self):
            return 1

    with pytest.raises(UnhashableArgument, match="self"):
        Opaque().value()


def test_read_only_action_replays_or_refuses_and_writes_nothing(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @action
    def send(message):
        note(log, message)

    with config.set(read_only=True), pytest.raises(ReadOnlyStoreError, match="no recorded outcome"):
        send("a")
    assert not (home / "feeds").exists() and len(runs(log)) == 0
    assert send("a").ok
    with config.set(read_only=True):
        assert send("a").replayed
    assert len(runs(log)) == 1


@pytest.mark.parametrize("make", [
    lambda: np.arange(6).astype("datetime64[s]"),
    lambda: np.arange(6).astype("timedelta64[ms]").reshape(2, 3).T,  # Fortran order too
    lambda: np.zeros(3, dtype=[("t", "M8[ns]"), ("x", "<f4")]),
    lambda: np.array(["", "a", "bb"], dtype=np.dtypes.StringDType()),  # variable width: pickled
])
def test_array_results_of_every_dtype_round_trip(home, make):
    """datetime64 and timedelta64 have no buffer format: storing them failed the call."""
    @pure
    def made(tag):
        return make()

    first = made("x")
    MEMORY.clear()
    again = made("x")
    assert again.dtype == first.dtype
    assert again.tolist() == first.tolist()
