"""Tasks of a script run as ``python pipeline.py`` (recorded as ``__main__.…``) in ``kachery task``.

Every test runs the script as its own process, edits the file between runs, and asks the command
line (another process, started from another directory) about it, as a user does. Also: ``task ls``
shows 12-hex ids in a table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from kachery_tasks.store import current_store
from kachery_tasks.tasks.explain import explain
from kachery_tasks.tasks.replay import job_from_record
from kachery_tasks.tasks.stale import recheck, rerun, stale

PIPELINE = '''
import enum
import json
import sys
import kachery_tasks as kt

class Mode(enum.Enum):
    FAST = 1
    SLOW = 2

MODE = Mode.FAST  # a constant of a type defined in the script: its type name is __main__.Mode


class Scaler:
    def __init__(self, k):
        self.k = k

    def apply(self, x):
        return x * self.k


def helper(x):
    return Scaler(2).apply(x)


@kt.pure
def detect(x, mode=Mode.FAST):
    return helper(x) + 1


@kt.pure
def make(d):
    return d * 10 if MODE is Mode.FAST else 0


if __name__ == "__main__":
    print("the pipeline ran", file=sys.stderr)
    job = make.job(detect.job(3))
    print(json.dumps({"result": job.result(), "make": job.id, "detect": job.args["d"].id,
                      "unreachable": kt.stale().unimportable if "--check" in sys.argv else None}))
'''


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _run_script(env: dict[str, str], script: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(script), *args], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _cli(kachery, *args: str) -> tuple[int, str, str]:
    done = kachery(*args)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _stale_json(kachery) -> dict:
    code, out, err = _cli(kachery, "task", "stale", "--json")
    assert code == 0, err
    assert "the pipeline ran" not in out + err  # its __main__ block did not run
    return json.loads(out)


def _records(name: str) -> list[dict]:
    return [r for r in current_store().records.iter_records() if r.function.name == name]


def test_a_script_tasks_are_checked_explained_and_rerun_from_another_directory(tmp_path, env, kachery):
    script = _write(tmp_path / "pipeline.py", PIPELINE)
    first = json.loads(_run_script(env, script).stdout)
    assert first["result"] == 70

    record = current_store().records.read(first["make"])
    assert record.function.name == "__main__.make" and record.function.module == "__main__"
    assert record.function.origin == {"kind": "script", "path": str(script), "module": "pipeline"}

    # unchanged script: nothing stale, nothing unreachable, every call hits
    assert _stale_json(kachery) == {"functions": {}, "unimportable": {}}
    for task_id in (first["make"], first["detect"]):
        code, out, err = _cli(kachery, "task", "explain", task_id[:12])
        assert code == 0, err
        assert ": hit: a record exists" in out

    # a helper edited: both calls are stale, and explain names the helper
    script.write_text(script.read_text().replace("Scaler(2).apply(x)", "Scaler(3).apply(x)"))
    report = _stale_json(kachery)
    assert report["unimportable"] == {}
    functions = report["functions"]
    assert set(functions) == {"__main__.detect", "__main__.make"}
    assert functions["__main__.detect"]["reasons"] == ["code: __main__.helper changed"]
    assert functions["__main__.detect"]["records"] == [first["detect"]]
    assert functions["__main__.make"]["reasons"] == [f"upstream __main__.detect {first['detect'][:12]} is stale"]
    code, out, err = _cli(kachery, "task", "stale")
    assert code == 0 and err == "" and "__main__.detect" in out
    code, out, err = _cli(kachery, "task", "explain", first["make"])
    assert code == 0, err
    assert "__main__.make" in out and ": miss: " in out and "code changed: __main__.helper changed" in out

    # recheck compares with the code of now: detect's result moved, make's (from recorded upstream) did not
    code, out, err = _cli(kachery, "task", "recheck", first["make"], first["detect"], "--json")
    assert code == 2, err
    rows = {r["function"]: r for r in json.loads(out)}
    assert rows["__main__.make"]["reproducible"] == "yes"
    assert rows["__main__.detect"]["reproducible"] == "NO" and "the code changed" in rows["__main__.detect"]["detail"]

    # rerun from the command line records exactly what the script itself then hits
    code, out, err = _cli(kachery, "task", "stale", "--rerun")
    assert code == 0, err
    assert "reran 2 call(s)" in out
    assert _stale_json(kachery) == {"functions": {}, "unimportable": {}}
    count = len(list(current_store().records.iter_records()))
    second = json.loads(_run_script(env, script).stdout)
    assert second["result"] == 100
    assert len(list(current_store().records.iter_records())) == count  # all hits
    rerun_record = current_store().records.read(second["make"])
    assert rerun_record.function.origin == record.function.origin
    assert rerun_record.function.module == "__main__"


def test_the_python_functions_reach_a_script_as_the_command_line_does(tmp_path, env):
    script = _write(tmp_path / "pipeline.py", PIPELINE)
    first = json.loads(_run_script(env, script).stdout)
    store = current_store()
    assert stale().records == [] and stale().unimportable == {}
    script.write_text(script.read_text().replace("Scaler(2).apply(x)", "Scaler(3).apply(x)"))
    report = stale()
    assert report.unimportable == {}
    assert {r.task_id for r in report.records} == {first["make"], first["detect"]}
    explanation = explain(job_from_record(store, store.records.read(first["make"])))
    assert not explanation.hit and "code changed: __main__.helper changed" in str(explanation)
    checked = {r.function: r.reproducible for r in recheck([first["make"], first["detect"]], store)}
    assert checked == {"__main__.make": True, "__main__.detect": False}
    [new_make] = rerun([first["make"]], store)
    assert stale().records == []
    assert json.loads(_run_script(env, script).stdout)["make"] == new_make


def test_a_gone_or_broken_script_gives_one_line_per_function(tmp_path, env, kachery):
    script = _write(tmp_path / "pipeline.py", PIPELINE)
    first = json.loads(_run_script(env, script).stdout)

    script.write_text(script.read_text() + "\nraise RuntimeError('config.yaml\\nis missing')\n")
    code, out, err = _cli(kachery, "task", "stale")
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 2, err
    for name, line in zip(("__main__.detect", "__main__.make"), sorted(lines), strict=True):
        assert line.startswith(f"cannot check {name}: its script {script} fails to load "
                               "(RuntimeError: config.yaml is missing)"), line
        assert line.count("__main__.") == 1  # the name is not repeated inside its own reason
    code, out, err = _cli(kachery, "task", "explain", first["make"])
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == [err.rstrip("\n")]
    assert err.startswith(f"kachery: error: __main__.make: its script {script} fails to load")
    for args in (("rerun", first["make"]), ("recheck", first["make"], "--json")):
        code, out, err = _cli(kachery, "task", *args)
        assert "Traceback" not in err and "fails to load" in err + out

    script.rename(tmp_path / "moved.py")
    code, out, err = _cli(kachery, "task", "stale")
    assert code == 0
    assert sorted(err.splitlines()) == [
        f"cannot check __main__.{name}: its script {script} is not there now (moved or deleted); "
        "run the script from where it is now to record its tasks again"
        for name in ("detect", "make")
    ]
    code, out, err = _cli(kachery, "task", "explain", first["detect"])
    assert code == 1 and err.count("\n") == 1 and "is not there now" in err


def test_a_record_older_than_origins_says_how_to_reach_it(tmp_path, env, kachery):
    script = _write(tmp_path / "pipeline.py", PIPELINE)
    first = json.loads(_run_script(env, script).stdout)
    store = current_store()
    for task_id in (first["make"], first["detect"]):  # as written before function.origin existed
        path = store.records.path(task_id)
        record = json.loads(path.read_text())
        del record["function"]["origin"]
        path.write_text(json.dumps(record))
    report = _stale_json(kachery)
    assert report["functions"] == {}
    assert set(report["unimportable"]) == {"__main__.make", "__main__.detect"}
    assert all(why.startswith("recorded before kachery-tasks kept the path of a script's tasks; check it from "
                              "the script") for why in report["unimportable"].values())
    code, out, err = _cli(kachery, "task", "explain", first["make"])
    assert code == 1 and err.count("\n") == 1 and "kachery task rm" in err
    # the script itself still reaches them, as before
    assert json.loads(_run_script(env, script, "--check").stdout)["unreachable"] == {}


def test_code_with_no_file_is_named_unreachable_with_the_call_to_use(tmp_path, env, kachery):
    cell = textwrap.dedent("""
        import kachery_tasks as kt

        @kt.pure
        def {name}(x):
            return x + 1

        {name}(1)
        assert "__main__.{name}" not in kt.stale().unimportable  # in the session, kt.stale() reaches its cells
    """)
    subprocess.run([sys.executable, "-c", cell.format(name="typed")], env=env, check=True, timeout=120)
    # a Jupyter kernel's cells: __main__ without a file, ipykernel loaded (stood in for here: not installed)
    kernel = "import sys, types\nsys.modules['ipykernel'] = types.ModuleType('ipykernel')\n" + cell.format(name="cell")
    subprocess.run([sys.executable, "-"], input=kernel, text=True, env=env, check=True, timeout=120)
    assert _records("__main__.cell")[0].function.origin == {"kind": "notebook"}
    assert _records("__main__.typed")[0].function.origin == {"kind": "interactive"}

    report = _stale_json(kachery)
    assert "defined in a notebook cell, which the command line cannot reach" in report["unimportable"]["__main__.cell"]
    assert "kt.stale()" in report["unimportable"]["__main__.cell"]
    assert "python -c" in report["unimportable"]["__main__.typed"]
    code, out, err = _cli(kachery, "task", "explain", _records("__main__.cell")[0].task_id)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("kachery: error: __main__.cell: defined in a notebook cell") and "kt.explain(job)" in err


def test_no_form_of_main_guard_runs_and_python_m_scripts_load_with_their_package(tmp_path, env, kachery):
    marker = tmp_path / "ran"
    package = tmp_path / "lab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write(package / "scaling.py", "def scale(v):\n    return v * 2\n")
    _write(package / "run.py", f"""
        import pathlib
        import kachery_tasks as kt
        from .scaling import scale

        @kt.pure
        def scaled(values):
            return [scale(v) for v in values]

        if "__main__" == __name__ and True:
            scaled([1, 2])
            pathlib.Path({str(marker)!r}).write_text("ran")
        status = "main" if __name__ == "__main__" else "imported"
        while __name__ == "__main__":
            pathlib.Path({str(marker)!r}).write_text("ran")
            break
    """)
    subprocess.run([sys.executable, "-m", "lab.run"], cwd=tmp_path, env=env, check=True, timeout=120)
    assert marker.read_text() == "ran"
    marker.unlink()
    [record] = _records("__main__.scaled")
    assert record.function.origin == {"kind": "script", "path": str(package / "run.py"), "module": "lab.run"}

    assert _stale_json(kachery) == {"functions": {}, "unimportable": {}}
    assert not marker.exists()
    _write(package / "scaling.py", "def scale(v):\n    return v * 3\n")
    report = _stale_json(kachery)
    assert report["functions"]["__main__.scaled"]["reasons"] == ["code: lab.scaling.scale changed"]
    assert not marker.exists()


def test_task_ls_shows_12_hex_ids_in_80_columns_and_full_ids_in_json(tmp_path, env, kachery):
    script = _write(tmp_path / "pipeline.py", PIPELINE)
    _run_script(env, script)
    code, out, err = _cli(kachery, "task", "ls", "--json")
    assert code == 0, err
    full = {r["task_id"] for r in json.loads(out)}
    assert len(full) == 2 and all(len(i) == 32 for i in full)
    done = kachery("task", "ls", extra_env={"COLUMNS": "80"})
    table = done.stdout.decode()
    assert done.returncode == 0 and max(len(line) for line in table.splitlines()) <= 80
    shown = re.findall(r"(?<![0-9a-f])[0-9a-f]{12,}(?![0-9a-f])", table)
    assert sorted(shown) == sorted(i[:12] for i in full)  # one whole 12-hex id per row, never wrapped
    for short in shown:
        code, out, err = _cli(kachery, "task", "show", short, "--json")
        assert code == 0 and json.loads(out)["task_id"].startswith(short)
