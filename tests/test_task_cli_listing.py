"""``kachery task ls`` when only failures exist, and ``--function`` matching function names (issue 27 §6)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kachery_tasks.tasks import pure


def _kachery(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_ls_says_how_many_failed_when_nothing_succeeded(home, tmp_path, env):
    @pure
    def fragile(x):
        raise ValueError(f"bad {x}")

    for x in range(3):
        with pytest.raises(ValueError):
            fragile(x)
    listing = _kachery(tmp_path, env, "task", "ls")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "no successful tasks; 3 failed (kachery task ls --failed)"
    named = _kachery(tmp_path, env, "task", "ls", "--function", "fragile")
    assert named.stdout.strip() == "no successful tasks; 3 failed (kachery task ls --failed --function fragile)"
    as_json = _kachery(tmp_path, env, "task", "ls", "--json")
    assert json.loads(as_json.stdout) == [] and "3 failed" in as_json.stderr
    failed = _kachery(tmp_path, env, "task", "ls", "--failed", "--json")
    assert len(json.loads(failed.stdout)) == 3 and all("bad" in r["error"] for r in json.loads(failed.stdout))
    assert "no successful tasks" not in _kachery(tmp_path, env, "task", "ls", "--function", "other").stdout


PIPE = {
    "rcpipe/__init__.py": "",
    "rcpipe/core.py": """
        from kachery_tasks import pure

        @pure
        def noisy(n):
            return n * 2
    """,
    "rcpipe/noisy.py": """
        from kachery_tasks import pure

        @pure
        def tol(n):
            return n + 1
    """,
}


def test_function_pattern_matches_names_unless_it_has_a_dot(tmp_path, home, env):
    for name, source in PIPE.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(source))
    made = subprocess.run([sys.executable, "-c", "import rcpipe.core, rcpipe.noisy; rcpipe.core.noisy(2); "
                           "rcpipe.noisy.tol(2)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr

    def rechecked(pattern: str) -> list[str]:
        out = _kachery(tmp_path, env, "task", "recheck", "--function", pattern, "--json")
        assert out.returncode in (0, 1), out.stderr
        return sorted(r["function"] for r in json.loads(out.stdout)) if out.returncode == 0 else []

    def listed(pattern: str) -> list[str]:
        out = _kachery(tmp_path, env, "task", "ls", "--function", pattern, "--json")
        assert out.returncode == 0, out.stderr
        return sorted(r["function"] for r in json.loads(out.stdout))

    for matches in (rechecked, listed):
        assert matches("noisy") == ["rcpipe.core.noisy"]  # not rcpipe.noisy.tol: a module path
        assert matches("no*") == ["rcpipe.core.noisy"]
        assert matches("tol") == ["rcpipe.noisy.tol"]
        assert matches("noisy.tol") == ["rcpipe.noisy.tol"]  # a dot: the dotted name, its last parts
        assert matches("rcpipe.noisy.*") == ["rcpipe.noisy.tol"]
        assert matches("rcpipe.*") == ["rcpipe.core.noisy", "rcpipe.noisy.tol"]
        assert matches("rcpipe.noisy") == []  # no function has that dotted name
        assert matches("oisy") == []  # a name, not a substring of one
    nothing = _kachery(tmp_path, env, "task", "recheck", "--function", "rcpipe.noisy")
    assert nothing.returncode == 1 and nothing.stderr.startswith("kachery: error: nothing to recheck")


def test_stale_function_pattern_matches_names_as_ls_does(tmp_path, home, env):
    """``task stale --function`` (and ``kt.stale(function=)``) select as ``ls`` and ``recheck`` do:
    ``noisy`` is not a substring search that also finds ``rcpipe.noisy.tol``."""
    for name, source in PIPE.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(source))
    made = subprocess.run([sys.executable, "-c", "import rcpipe.core, rcpipe.noisy; rcpipe.core.noisy(2); "
                           "rcpipe.noisy.tol(2)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    for name, old, new in (("rcpipe/core.py", "n * 2", "n * 3"), ("rcpipe/noisy.py", "n + 1", "n + 2")):
        path = tmp_path / name
        path.write_text(path.read_text().replace(old, new))

    def stale(pattern: str) -> list[str]:
        out = _kachery(tmp_path, env, "task", "stale", "--function", pattern, "--json")
        assert out.returncode == 0, out.stderr
        return sorted(json.loads(out.stdout)["functions"])

    assert stale("*") == ["rcpipe.core.noisy", "rcpipe.noisy.tol"]
    assert stale("noisy") == ["rcpipe.core.noisy"]  # not rcpipe.noisy.tol: a module path
    assert stale("tol") == ["rcpipe.noisy.tol"]
    assert stale("noisy.tol") == ["rcpipe.noisy.tol"]
    assert stale("rcpipe.noisy.*") == ["rcpipe.noisy.tol"]
    assert stale("rcpipe.noisy") == []
    assert stale("oisy") == []  # a name, not a substring of one
