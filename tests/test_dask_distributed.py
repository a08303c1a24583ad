"""The Dask layer on a real ``distributed.LocalCluster`` (2 worker processes): pruning, dedupe,
KacheryPlugin statistics, cached() arrays, and a worker killed in the middle of a task."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from execution_log import note, runs  # noqa: E402

from kachery_tasks.dask import KacheryPlugin, cached, stats  # noqa: E402
from kachery_tasks.errors import UserError  # noqa: E402
from kachery_tasks.tasks import pure  # noqa: E402
from kachery_tasks.tasks.resolver import MISS, lookup  # noqa: E402


@pure
def slow_square(x: int, log: str) -> int:
    import time

    note(log, f"square{x}")
    time.sleep(0.05)
    return x * x


@pure
def add_all(xs: list, log: str) -> int:
    note(log, "add")
    return sum(xs)


@pure
def crashy(x: int, marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker dies in the middle of the task, before any record
    return x * 10


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture
def plugin(client, tmp_path):
    import warnings

    with warnings.catch_warnings():  # each test replaces the previous test's plugin (fresh counts)
        warnings.simplefilter("ignore", UserWarning)
        client.register_plugin(KacheryPlugin(home=str(tmp_path)))
    return client


def test_the_plugin_gives_workers_the_sources_of_results_in_force_here(tmp_path):
    from kachery_tasks import config
    from kachery_tasks.errors import ConfigError

    trusted = ["ab" * 32]
    with config.set(bucket=f"file://{tmp_path}", trusted_nodes=trusted, tiers=["memory", "local", "bucket"]):
        settings = KacheryPlugin().worker_settings
    assert settings["bucket"] == f"file://{tmp_path}" and settings["trusted_nodes"] == trusted
    assert KacheryPlugin(bucket="gs://lab-results/kachery").worker_settings["bucket"] == "gs://lab-results/kachery"
    with pytest.raises(ConfigError, match="bucket"):
        KacheryPlugin(bucket="lab-results")


def test_workers_use_the_plugin_home(plugin, tmp_path):
    from kachery_tasks import config

    homes = plugin.run(lambda: str(config.home()))
    assert set(homes.values()) == {str(tmp_path)}


def test_pipeline_pruned_and_stats_match(plugin, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="kachery_tasks.dask")
    log = str(tmp_path / "log")
    out = add_all.delayed([slow_square.delayed(i, log) for i in range(4)], log)
    assert plugin.compute(out).result() == 0 + 1 + 4 + 9
    assert sorted(runs(tmp_path / "log")) == ["add", "square0", "square1", "square2", "square3"]
    first = stats(plugin)
    assert first["misses"] == 5 and first["hits"] == 0 and first["compute_s"] >= 4 * 0.05

    again = add_all.delayed([slow_square.delayed(i, log) for i in range(4)], log)
    assert plugin.compute(again).result() == 14
    assert len(runs(tmp_path / "log")) == 5  # nothing ran
    second = stats(plugin)
    assert second["hits"] == 1 and second["pruned"] == 4 and second["misses"] == 5
    assert second["saved_s"] > 0  # the root's own recorded wall time

    # one parameter changed: only that branch and the sum
    changed = add_all.delayed([slow_square.delayed(i, log) for i in (0, 1, 2, 5)], log)
    assert plugin.persist(changed).compute() == 0 + 1 + 4 + 25
    assert runs(tmp_path / "log")[5:] == ["square5", "add"]
    third = stats(plugin)
    assert third["hits"] == 1 + 3 and third["misses"] == 5 + 2
    assert "kachery graph" in caplog.text  # the scheduler's one line per graph


def test_concurrent_identical_graphs_compute_once(plugin, tmp_path):
    log = str(tmp_path / "log")
    a = add_all.delayed([slow_square.delayed(7, log), 1], log)
    b = add_all.delayed([slow_square.delayed(7, log), 1], log)
    fa, fb = plugin.compute(a), plugin.compute(b)
    assert fa.key == fb.key
    assert fa.result() == fb.result() == 50
    assert runs(tmp_path / "log") == ["square7", "add"]
    f = plugin.submit(lambda v: v + 1, fa)  # our futures compose with submit
    assert f.result() == 51 and runs(tmp_path / "log") == ["square7", "add"]


def test_submit_of_task_hits_store(plugin, tmp_path):
    log = str(tmp_path / "log")
    assert plugin.compute(slow_square.delayed(3, log)).result() == 9
    assert plugin.submit(slow_square, 3, log).result() == 9
    assert runs(tmp_path / "log") == ["square3"]


def _counted_block(block, log):
    note(log, "block")
    return block + 1


def test_cached_array_on_cluster(plugin, tmp_path):
    log = str(tmp_path / "log")
    x = da.from_array(np.arange(36.0).reshape(6, 6), chunks=3).map_blocks(_counted_block, log, dtype=float)
    n0 = len(runs(tmp_path / "log"))
    expected = np.arange(36.0).reshape(6, 6).sum() + 36
    assert plugin.compute(cached(x).sum()).result() == expected
    assert len(runs(tmp_path / "log")) == n0 + 4
    assert plugin.compute(cached(x).sum()).result() == expected
    assert len(runs(tmp_path / "log")) == n0 + 4


def test_worker_killed_mid_task_leaves_no_corrupt_record(plugin, tmp_path):
    marker = str(tmp_path / "marker")
    d = crashy.delayed(4, marker)
    assert plugin.compute(d).result(timeout=60) == 40
    assert os.path.exists(marker)
    assert lookup(crashy.job(4, marker)) == 40
    quarantine = tmp_path / "tasks" / "quarantine"
    assert not quarantine.exists() or not list(quarantine.iterdir())
    assert lookup(crashy.job(5, marker)) is MISS


def test_a_plugin_home_other_than_the_client_home_is_refused(tmp_path):
    with pytest.raises(UserError, match="differs from the home in force here"):
        KacheryPlugin(home=str(tmp_path / "elsewhere"))
    KacheryPlugin(home=str(tmp_path))  # the same home, however written, is fine
    KacheryPlugin(home=str(tmp_path / "." / ""))


def test_records_land_in_the_cluster_home_and_other_homes_are_refused(plugin, tmp_path):
    from kachery_tasks import config
    from kachery_tasks.errors import KacheryError

    log = str(tmp_path / "log")
    assert plugin.compute(slow_square.delayed(7, log)).result() == 49
    assert list((tmp_path / "tasks").rglob("*.json"))  # recorded where the plugin says
    other = tmp_path / "other-home"
    with config.set(home=str(other)):  # the client moved to another home after registering
        job = slow_square.delayed(8, log)
        with pytest.raises(KacheryError, match="this cluster's KacheryPlugin records in"):
            plugin.compute(job).result()
    assert not list(other.rglob("*.json")) if other.exists() else True
    assert runs(log) == ["square7"]  # the refused job never ran
