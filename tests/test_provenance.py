"""Provenance in records, the stale-code report with reruns, recheck, and group-shared homes."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from second_user import GID, reachable_dir, run_as_second_user, second_user

from kachery_tasks import config
from kachery_tasks.store import current_store
from kachery_tasks.tasks import pure


def _py(cwd: Path, env: dict[str, str], code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _kachery(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_provenance_fields(home):
    import numpy as np

    @pure
    def f(n):
        return float(np.ones(n).sum())

    f(1000)
    record = current_store().records.read(f.task_id(1000))
    p = record.provenance
    for key in ("python", "platform", "host", "user", "pid", "started", "ended", "wall_s", "cpu_s", "peak_rss"):
        assert key in p, key
    assert p["ended"] >= p["started"] and p["peak_rss"] > 1_000_000
    assert p["packages"].get("numpy") == np.__version__
    assert len(record.signature) == 128 and len(record.node_id) == 64 and record.verify_signature()


def test_git_commit_and_dirty_flag(tmp_path, home, env):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "gitmod.py").write_text("from kachery_tasks import pure\n@pure\ndef f(x):\n    return x\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    out = _py(repo, env, """
        import gitmod, json
        from kachery_tasks.store import current_store
        gitmod.f(1)
        print(json.dumps(current_store().records.read(gitmod.f.task_id(1)).provenance.git))
    """)
    git_state = json.loads(out)
    assert git_state["commit"] == commit and git_state["dirty"] is False
    (repo / "gitmod.py").write_text("from kachery_tasks import pure\n@pure\ndef f(x):\n    return x + 0\n")
    out = _py(repo, env, """
        import gitmod, json
        from kachery_tasks.store import current_store
        gitmod.f(2)
        print(json.dumps(current_store().records.read(gitmod.f.task_id(2)).provenance.git))
    """)
    assert json.loads(out)["dirty"] is True


PIPELINE = """
from kachery_tasks import pure
from helpers_s import scale

@pure
def load(n):
    return list(range(n))

@pure
def scaled(values):
    return [scale(v) for v in values]

@pure
def unrelated(x):
    return x * 3
"""


def test_stale_lists_dependents_of_an_edited_helper_and_rerun_fixes_them(tmp_path, home, env):
    (tmp_path / "helpers_s.py").write_text("def scale(v):\n    return v * 2\n")
    (tmp_path / "pipe_s.py").write_text(PIPELINE)
    _py(tmp_path, env, """
        import pipe_s
        for n in (3, 4):
            pipe_s.scaled(pipe_s.load.job(n))
        pipe_s.unrelated(1)
    """)
    report = _kachery(tmp_path, env, "task", "stale", "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["functions"] == {}
    (tmp_path / "helpers_s.py").write_text("def scale(v):\n    return v * 5\n")
    report = _kachery(tmp_path, env, "task", "stale", "--json")
    assert report.returncode == 0, report.stderr
    functions = json.loads(report.stdout)["functions"]
    assert set(functions) == {"pipe_s.scaled"}
    assert functions["pipe_s.scaled"]["count"] == 2
    assert any("helpers_s.scale" in r for r in functions["pipe_s.scaled"]["reasons"])
    rerun = _kachery(tmp_path, env, "task", "stale", "--rerun")
    assert rerun.returncode == 0, rerun.stderr
    after = json.loads(_kachery(tmp_path, env, "task", "stale", "--json").stdout)
    assert after["functions"] == {}
    out = _py(tmp_path, env, "import pipe_s\nprint(pipe_s.scaled(pipe_s.load.job(3)))")
    assert out.strip() == "[0, 5, 10]"
    # the old records stay as history
    names = [r.function.name for r in current_store().records.iter_records()]
    assert names.count("pipe_s.scaled") == 4 and names.count("pipe_s.unrelated") == 1


def test_stale_reports_functions_that_cannot_be_imported(tmp_path, home, env):
    (tmp_path / "gone_mod.py").write_text("from kachery_tasks import pure\n@pure\ndef f(x):\n    return x\n")
    _py(tmp_path, env, "import gone_mod; gone_mod.f(1)")
    (tmp_path / "gone_mod.py").unlink()
    report = _kachery(tmp_path, env, "task", "stale", "--json")
    assert report.returncode == 0, report.stderr
    assert "gone_mod.f" in json.loads(report.stdout)["unimportable"]


def test_recheck_passes_deterministic_and_flags_random(tmp_path, home, env):
    (tmp_path / "rc_mod.py").write_text(textwrap.dedent("""
        import numpy as np
        from kachery_tasks import pure

        @pure
        def steady(n):
            return np.arange(n, dtype=float) / 3

        @pure
        def noisy(n):
            return np.random.default_rng().normal(size=n)

        @pure(rtol=1e-6, atol=1e-9)
        def almost(n):
            return np.arange(n, dtype=float) + np.random.default_rng().normal(size=n) * 1e-12
    """))
    _py(tmp_path, env, "import rc_mod\nrc_mod.steady(100); rc_mod.noisy(100); rc_mod.almost(100)")
    out = _kachery(tmp_path, env, "task", "recheck", "--function", "rc_mod.*", "--json")
    assert out.returncode == 2  # something is not reproducible
    rows = {r["function"]: r for r in json.loads(out.stdout)}
    assert rows["rc_mod.steady"]["reproducible"] == "yes"
    assert rows["rc_mod.almost"]["reproducible"] == "yes"
    assert rows["rc_mod.noisy"]["reproducible"] == "NO" and "max difference" in rows["rc_mod.noisy"]["detail"]
    # recheck touched no record
    assert len(list(current_store().records.iter_records())) == 3


def test_task_ls_failed_and_show(tmp_path, home, env):
    (tmp_path / "fail_mod.py").write_text(textwrap.dedent("""
        from kachery_tasks import pure
        @pure
        def f(x):
            if x < 0:
                raise ValueError(f"negative: {x}")
            return x
    """))
    _py(tmp_path, env, """
        import fail_mod
        for x in (1, 2, -1):
            try:
                fail_mod.f(x)
            except ValueError:
                pass
    """)
    failed = _kachery(tmp_path, env, "task", "ls", "--failed", "--json")
    assert failed.returncode == 0, failed.stderr
    rows = json.loads(failed.stdout)
    assert len(rows) == 1 and "negative: -1" in rows[0]["error"]
    listing = json.loads(_kachery(tmp_path, env, "task", "ls", "--json").stdout)
    assert len(listing) == 2
    show = _kachery(tmp_path, env, "task", "show", listing[0]["task_id"][:10])
    assert show.returncode == 0 and "fail_mod.f" in show.stdout
    bad = _kachery(tmp_path, env, "task", "show", "zz")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_shared_group_home_is_group_writable(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    home = tmp_path / "shared"
    old = os.umask(0o077)
    try:
        with config.set(home=str(home), shared_group=group):
            @pure
            def f(x):
                return list(range(x))

            f(5000)
            record_path = current_store().records.path(f.task_id(5000))
    finally:
        os.umask(old)
    tasks_dir = record_path.parent
    assert tasks_dir.stat().st_mode & stat.S_ISGID and tasks_dir.stat().st_mode & stat.S_IWGRP
    assert record_path.stat().st_mode & stat.S_IRGRP
    blob_dirs = list((home / "store" / "sha256").iterdir())
    assert blob_dirs and all(d.stat().st_mode & stat.S_ISGID for d in blob_dirs)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "skipped until now (the second user could not run the interpreter); running, it shows that the second "
    "user cannot add a record: the node key is mode 0600 and never group-readable, even in a shared home "
    "(identity/keys.py), so it cannot sign. Which way to go is the identity layer's decision"))
def test_two_users_share_one_home(env):
    """Root computes into a group-shared home; user nobody (group nogroup) hits it and adds a record."""
    found = second_user()
    if isinstance(found, str):
        pytest.skip(found)
    group = grp.getgrgid(GID).gr_name
    with reachable_dir("kt-shared-") as base:
        (base / "shared_mod.py").write_text("from kachery_tasks import pure\n@pure\ndef f(x):\n    return x * 7\n")
        os.chmod(base / "shared_mod.py", 0o644)
        env = {**env, "KACHERY_TASKS_HOME": str(base / "home"), "KACHERY_TASKS_SHARED_GROUP": group}
        first = subprocess.run([sys.executable, "-c", "import shared_mod; print(shared_mod.f(1))"], cwd=base, env=env,
                               capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        code = "import shared_mod\nfrom kachery_tasks.tasks import explain\nprint(explain(shared_mod.f.job(1)).hit, shared_mod.f(2))"
        second = run_as_second_user(["-c", code], env, cwd=base)
        assert second.returncode == 0, second.stderr
        assert second.stdout.split() == ["True", "14"]


def test_large_arguments_are_kept_by_hash_only(home):
    import numpy as np

    @pure
    def total(x):
        return float(x.sum())

    big = np.ones(100_000)  # 800 kB > record_args_max_bytes
    total(big)
    entry = current_store().records.read(total.task_id(big)).args["x"].to_json()
    assert set(entry) == {"hash", "omitted"} and "800000 bytes" in entry["omitted"]
