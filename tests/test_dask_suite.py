"""dask's own test suites, run through ``cached()``: no test that passes plainly may fail cached.

dask ships its tests inside the package. Here they run in a separate pytest process with the plugin
``tests/dask_suite/kachery_cached_compute.py``, which sends every ``dask.compute`` and ``.compute()``
through ``cached()`` in one home shared by the whole run, so later tests load what earlier tests
stored (every node is recorded). A test that fails that way is run again plainly; one that then
passes is a defect of ``cached()`` (a false hit, a wrong result, a crash), and fails this test.

This found the five defects of issue 19 (a false hit between library lambdas, the disk shuffle's
state, read-only arrays, dropped dependencies, shared work run twice). Run it alone with
``python -m pytest -m dask_suite``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.dask_suite

HERE = Path(__file__).resolve().parent

SUITES = ["dask.tests.test_delayed", "dask.bag.tests.test_bag"]

#: Tests that fail through cached() by design, each with the reason. Only tests that assert on
#: execution counts or on key names belong here: a cached rerun executes nothing and keys nodes
#: by content, which is the point of cached().
EXPECTED = {
    # counts calls of `inc` across three computes of the same graph: cached, the second and third
    # computes load the recorded result and call nothing
    "test_to_delayed_optimize_graph": "counts executions",
}


def _pytest(args: list[str], home: Path, junit: Path, plugin: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_TASKS_")}
    env["KACHERY_TASKS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "dask_suite"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
           f"--junitxml={junit}", "-o", "addopts=", "--timeout=600"]
    if plugin:
        cmd += ["-p", "kachery_cached_compute"]
    subprocess.run(cmd + args, env=env, cwd=home, capture_output=True, text=True, timeout=1500)


def _failed(junit: Path) -> dict[tuple[str, str], str]:
    """(module, test name with parameters) -> the failure's first line, for each failed test."""
    failed = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            found = case.find(tag)
            if found is not None:
                module = case.get("classname", "").rpartition(".")[2]
                failed[(module, case.get("name", ""))] = (found.get("message") or "").splitlines()[0][:200]
    return failed


def _suite_files() -> dict[str, Path]:
    import dask

    root = Path(dask.__file__).resolve().parent.parent
    return {s.rpartition(".")[2]: root / (s.replace(".", "/") + ".py") for s in SUITES}


def test_dask_suites_pass_through_cached(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    _pytest(["--pyargs", *SUITES], home, tmp_path / "cached.xml", plugin=True)
    suspects = {k: why for k, why in _failed(tmp_path / "cached.xml").items()
                if k[1].partition("[")[0] not in EXPECTED}
    if not suspects:
        return
    # the suspects run again plainly: a test that fails plainly too is dask's or this machine's business
    files = _suite_files()
    _pytest([f"{files[module]}::{name}" for module, name in suspects], home, tmp_path / "plain.xml",
            plugin=False)
    plain = _failed(tmp_path / "plain.xml")
    only_cached = {k: why for k, why in suspects.items() if k not in plain}
    assert not only_cached, "pass plainly, fail through cached():\n" + "\n".join(
        f"{module}::{name}: {why}" for (module, name), why in sorted(only_cached.items()))


def test_expected_failures_still_fail_for_their_reason():
    """The list above is not a place to hide defects: each entry names a test dask still has."""
    sources = "".join(path.read_text() for path in _suite_files().values())
    for name in EXPECTED:
        assert f"def {name}(" in sources, f"{name} is no longer in dask's suites: drop it from EXPECTED"
