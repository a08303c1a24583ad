"""The task engine reaches the Dask layer, which sits above it, only through what that layer
registers (kachery_tasks.tasks.dask_layer): ``f.delayed`` and ``rerun`` of many calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kachery_tasks import pure
from kachery_tasks.errors import UserError
from kachery_tasks.store import current_store
from kachery_tasks.tasks import dask_layer
from kachery_tasks.tasks.stale import rerun


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_importing_the_task_engine_imports_no_dask(env):
    done = _python("""
        import sys
        import kachery_tasks.tasks, kachery_tasks.tasks.stale
        assert "kachery_tasks.dask" not in sys.modules and "dask" not in sys.modules, sorted(
            m for m in sys.modules if "dask" in m)
    """, env)
    assert done.returncode == 0, done.stderr


def test_delayed_works_after_importing_kachery_tasks_alone(env):
    done = _python("""
        import sys
        import kachery_tasks as kt

        @kt.pure
        def add(a, b):
            return a + b

        assert "kachery_tasks.dask" not in sys.modules
        total = add.delayed(add.delayed(1, 2), 4)  # the Dask layer is loaded by the first call
        assert "kachery_tasks.dask" in sys.modules
        assert total.key == f"add-{add.job(add.job(1, 2), 4).id}", total.key
        print(total.compute())
    """, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"


def test_no_dask_layer_is_a_clear_error(monkeypatch):
    @pure
    def f(x):
        return x

    monkeypatch.setattr(dask_layer, "_layer", None)

    def no_dask():
        raise ModuleNotFoundError("No module named 'dask'", name="dask")

    monkeypatch.setattr(dask_layer, "_loader", no_dask)
    with pytest.raises(UserError, match=r"f\.delayed and rerun of many calls need kachery_tasks\.dask.*No module named 'dask'"):
        f.delayed(1)
    monkeypatch.setattr(dask_layer, "_loader", None)
    with pytest.raises(UserError, match="no Dask layer is registered"):
        f.delayed(1)


def test_a_loader_that_registers_a_layer_serves_delayed(monkeypatch):
    @pure
    def f(x):
        return x

    made = []
    layer = dask_layer.DaskLayer(delayed=lambda job, fresh: made.append((job.id, fresh)) or "node",
                                 run_many=lambda jobs: None)
    monkeypatch.setattr(dask_layer, "_layer", None)
    monkeypatch.setattr(dask_layer, "_loader", lambda: dask_layer.register(layer))
    assert f.delayed(3) == "node"
    assert made == [(f.task_id(3), True)]
    assert dask_layer.dask_layer() is layer


@pure
def _square(x):
    return x * x


def test_rerun_of_many_calls_goes_through_the_registered_runner(monkeypatch):
    ids = [_square.task_id(i) for i in range(3)]
    for i in range(3):
        _square(i)
    store = current_store()
    assert rerun(ids, store, use_dask=True) == ids  # the real Dask layer
    ran: list[list[str]] = []
    real = dask_layer.dask_layer()
    monkeypatch.setattr(dask_layer, "_layer", dask_layer.DaskLayer(
        delayed=real.delayed, run_many=lambda jobs: ran.append([j.id for j in jobs])))
    assert rerun(ids, store, use_dask=True) == ids
    assert ran == [ids]
    assert rerun(ids, store, use_dask=False) == ids and len(ran) == 1  # one by one: no runner
