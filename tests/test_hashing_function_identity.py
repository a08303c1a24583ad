"""Function identity and task ids: what counts as code, what does not, and the escape hatches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hashing_fixtures import samples
from hashing_fixtures.loader import load_module

from kachery_tasks.hashing import (
    FunctionId,
    UnhashableArgument,
    bind_arguments,
    function_id,
    hash_value,
    task_id,
)

TASK = """
import numpy as np
THRESHOLD = 3

def helper(x):
    return x * THRESHOLD

def task(a, b=2):
    '''Docstring.'''
    # a comment
    return helper(a) + np.sum(b)
"""


def _cid(tmp_path, source, attr="task", **kw):
    return function_id(getattr(load_module(tmp_path, source), attr), **kw).code_hash


def test_helper_edit_changes_id_comment_and_docstring_do_not(tmp_path):
    base = _cid(tmp_path, TASK)
    assert _cid(tmp_path, TASK) == base
    cosmetic = TASK.replace("# a comment", "# another comment").replace("Docstring.", "Other doc.")
    cosmetic = cosmetic.replace("return x * THRESHOLD", "return x  *  THRESHOLD  # spaced")
    assert _cid(tmp_path, cosmetic) == base
    assert _cid(tmp_path, TASK.replace("return x * THRESHOLD", "return x + THRESHOLD")) != base
    assert _cid(tmp_path, TASK.replace("THRESHOLD = 3", "THRESHOLD = 4")) != base
    assert _cid(tmp_path, TASK.replace("return helper(a)", "return helper(a) + 1")) != base


def test_deps_name_each_reached_piece(tmp_path):
    mod = load_module(tmp_path, TASK)
    deps = function_id(mod.task).deps
    assert deps[f"{mod.__name__}.helper"].startswith("ast:")
    assert f"{mod.__name__}.THRESHOLD" in deps
    assert deps["numpy"] == f"numpy=={np.__version__}"
    assert f"{mod.__name__}.task" in deps


def test_package_callee_counts_by_version(tmp_path, monkeypatch):
    from kachery_tasks.hashing import function_identity as F

    mod = load_module(tmp_path, TASK)
    before = function_id(mod.task).code_hash
    F._FID_CACHE.clear()
    monkeypatch.setattr(F, "package_version", lambda m: ("numpy", "numpy==0.0.1") if m.startswith("numpy")
                        else F.package_version.__wrapped__(m))
    assert function_id(mod.task).code_hash != before
    fid = function_id(np.mean)
    assert fid.name == "numpy.mean"


def test_module_attribute_chain_and_from_import(tmp_path):
    helper = load_module(tmp_path, "def helper(x):\n    return x + 1\n", "helper")
    src = f"import {helper.__name__} as h\nfrom {helper.__name__} import helper\n"
    src += "def via_attr(x):\n    return h.helper(x)\n\ndef via_name(x):\n    return helper(x)\n"
    mod = load_module(tmp_path, src)
    for fn in (mod.via_attr, mod.via_name):
        assert f"{helper.__name__}.helper" in function_id(fn).deps


def test_cycles_among_user_functions(tmp_path):
    src = "def even(n):\n    return n == 0 or odd(n - 1)\n\ndef odd(n):\n    return n != 0 and even(n - 1)\n"
    mod = load_module(tmp_path, src)
    fid = function_id(mod.even)
    assert set(fid.deps) == {f"{mod.__name__}.even", f"{mod.__name__}.odd"}


def test_closures_defaults_partials_decorators(tmp_path):
    src = """
    import functools
    def deco(f):
        @functools.wraps(f)
        def wrapper(*a):
            return f(*a)
        return wrapper
    @deco
    def helper(x):
        return x + K
    K = 1
    part = functools.partial(helper, 2)
    def make(n):
        def inner(x):
            return helper(x) + n
        return inner
    def with_default(x, fn=helper):
        return fn(x)
    def uses_partial():
        return part()
    """
    for old, new in [("x + K", "x - K"), ("K = 1", "K = 2")]:
        a, b = load_module(tmp_path, src), load_module(tmp_path, src.replace(old, new))
        for name in ("with_default", "uses_partial"):
            assert function_id(getattr(a, name)).code_hash != function_id(getattr(b, name)).code_hash
        assert function_id(a.make(1)).code_hash != function_id(b.make(1)).code_hash
    mod = load_module(tmp_path, src)
    assert function_id(mod.make(1)).code_hash != function_id(mod.make(2)).code_hash
    assert function_id(mod.make(1)).code_hash == function_id(mod.make(1)).code_hash


def test_user_class_methods_count(tmp_path):
    src = """
    class Model:
        scale = 2
        def fit(self, x):
            return x * self.scale
    def task(x):
        return Model().fit(x)
    """
    base = _cid(tmp_path, src)
    assert _cid(tmp_path, src.replace("x * self.scale", "x / self.scale")) != base
    assert _cid(tmp_path, src.replace("scale = 2", "scale = 3")) != base


def test_other_task_counts_by_its_function_id(tmp_path):
    src = """
    from hashing_fixtures.samples import Task
    from kachery_tasks.hashing import FunctionId
    callee = Task(FunctionId("lab.callee", "version:1"))
    def task(x):
        return callee(x)
    """
    fid = function_id(load_module(tmp_path, src).task)
    assert fid.deps["lab.callee"] == "version:1"
    assert _cid(tmp_path, src.replace("version:1", "version:2")) != fid.code_hash


def test_unhashable_global_names_it_and_remedies(tmp_path):
    src = "import threading\nclient = threading.Lock()\ndef task(x):\n    return client\n"
    mod = load_module(tmp_path, src)
    with pytest.raises(UnhashableArgument, match=r"client.*version=.*ignore_globals=\['client'\]"):
        function_id(mod.task)
    assert function_id(mod.task, ignore_globals=["client"]).code_hash
    assert function_id(mod.task, version="1").code_hash == "version:1"


def test_exempt_globals(tmp_path):
    src = """
    import logging, typing
    log = logging.getLogger(__name__)
    T = typing.TypeVar("T")
    Opt = typing.Optional[int]
    def task(x: T) -> Opt:
        log.info("x")
        return typing.cast(int, x)
    """
    assert function_id(load_module(tmp_path, src).task).code_hash


def test_version_and_name_overrides(tmp_path):
    mod = load_module(tmp_path, TASK)
    fid = function_id(mod.task, version="3", name="lab.task")
    assert fid == FunctionId("lab.task", "version:3", {})
    assert fid.deps == {}
    assert function_id(mod.task).name == f"{mod.__name__}.task"


def test_name_override_survives_a_move(tmp_path):
    a = load_module(tmp_path, TASK, "a")
    b = load_module(tmp_path, TASK, "b")
    assert function_id(a.task, name="lab.t").code_hash == function_id(b.task, name="lab.t").code_hash


def test_redefinition_gives_fresh_id_and_repeat_is_cheap():
    ns: dict = {"__name__": "__main__"}
    exec("def f(x):\n    return x + 1\n", ns)
    first = function_id(ns["f"])
    exec("def f(x):\n    return x + 2\n", ns)
    assert function_id(ns["f"]).code_hash != first.code_hash
    f = samples.double
    function_id(f)
    t = time.perf_counter()
    for _ in range(1000):
        function_id(f)
    assert (time.perf_counter() - t) / 1000 < 50e-6


def test_global_rebinding_seen_in_place_mutation_documented(tmp_path):
    mod = load_module(tmp_path, "P = [1]\ndef task():\n    return P\n")
    first = function_id(mod.task).code_hash
    mod.P = [2]
    assert function_id(mod.task).code_hash != first
    second = function_id(mod.task).code_hash
    mod.P.append(3)  # in-place mutation: not seen (docs/hashing.md says so)
    assert function_id(mod.task).code_hash == second


def test_exec_code_without_source_uses_bytecode():
    ns1: dict = {"__name__": "generated"}
    ns2: dict = {"__name__": "generated"}
    exec("def g(x):\n    return x * 2\n", ns1)
    exec("def g(x):\n    return x * 3\n", ns2)
    assert function_id(ns1["g"]).code_hash != function_id(ns2["g"]).code_hash


def test_builtins_and_ufuncs():
    assert function_id(len).name == "builtins.len"
    assert function_id(np.add).name == "numpy.add"
    assert hash_value(np.add) != hash_value(np.subtract)


def test_ids_identical_across_fresh_processes(tmp_path):
    (tmp_path / "kt_proc_mod.py").write_text(textwrap.dedent(TASK))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kt_proc_mod as m;"
        "from kachery_tasks.hashing import function_id, task_id, bind_arguments;"
        "f = function_id(m.task); print(f.code_hash, task_id('pure', f, bind_arguments(m.task, (1,), {}),"
        " 'ns'), sorted(f.deps.items()))"
    )
    outs = set()
    for seed in ("0", "7", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             check=True, env=env)
        outs.add(out.stdout)
    assert len(outs) == 1


# --- task ids -------------------------------------------------------------------------------


def f3(x, y=2, *args, **kwargs):
    return x


def test_bind_arguments_defaults_and_var_args():
    assert bind_arguments(f3, (1,), {}) == {"x": 1, "y": 2, "args": (), "kwargs": {}}
    assert bind_arguments(f3, (1, 2, 3), {"z": 4}) == {"x": 1, "y": 2, "args": (3,), "kwargs": {"z": 4}}
    with pytest.raises(TypeError):
        bind_arguments(f3, (), {})


def test_task_id_equivalences_and_distinctions():
    fid = function_id(f3)
    same = {task_id("pure", fid, bind_arguments(f3, a, k)) for a, k in
            [((1,), {}), ((), {"x": 1}), ((1, 2), {}), ((1,), {"y": 2})]}
    assert len(same) == 1
    base = same.pop()
    assert task_id("pure", fid, bind_arguments(f3, (1.0,), {})) != base
    assert task_id("query", fid, bind_arguments(f3, (1,), {})) != base
    assert task_id("pure", fid, bind_arguments(f3, (1,), {}), namespace="n") != base
    assert task_id("pure", FunctionId(fid.name, "other"), bind_arguments(f3, (1,), {})) != base
    assert task_id("pure", FunctionId("x.f3", fid.code_hash), bind_arguments(f3, (1,), {})) != base
    bound = bind_arguments(f3, (1,), {})
    assert base == hash_value(("kt1", "", "pure", fid.name, fid.code_hash, bound))


def test_task_id_error_names_parameter():
    fid = function_id(f3)
    bound = bind_arguments(f3, (1,), {"opts": {"params": [1, 2, threading.Lock()]}})
    with pytest.raises(UnhashableArgument, match=r"kwargs\['opts'\]\['params'\]\[2\]"):
        task_id("pure", fid, bound)
    with pytest.raises(UnhashableArgument, match=r"cannot hash x:"):
        task_id("pure", fid, {"x": object()})


def test_job_like_objects_make_merkle_ids():
    class Job:
        def __init__(self, tid):
            self.tid = tid

        def __kachery_canon__(self):
            return self.tid

    fid = function_id(f3)
    a = task_id("pure", fid, bind_arguments(f3, (Job("a" * 32),), {}))
    b = task_id("pure", fid, bind_arguments(f3, (Job("b" * 32),), {}))
    assert a != b


def test_small_task_id_is_fast():
    fid = function_id(f3)
    bound = {"x": 1, "y": 2.5, "name": "abc", "flag": True}
    t = time.perf_counter()
    for _ in range(2000):
        task_id("pure", fid, bound)
    assert (time.perf_counter() - t) / 2000 < 40e-6


def test_local_import_of_a_package_counts_the_same_before_and_after_it_is_imported():
    """A package imported inside a function body is identified by its version whether or not the
    process has imported it yet (a fresh process and a busy one must agree)."""
    code = textwrap.dedent('''
        import sys
        from kachery_tasks.hashing import function_id
        def f():
            import locket
            return locket
        assert "locket" not in sys.modules
        before = function_id(f)
        import locket
        after = function_id(f)
        assert before.code_hash == after.code_hash, (before.deps, after.deps)
        assert any(v.startswith("locket==") for v in after.deps.values()), after.deps
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
