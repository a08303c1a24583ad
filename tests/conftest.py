"""Fixtures shared by every test: a temporary home for each test, and helpers for subprocesses.

The ``home`` fixture is autouse, so no test ever reads or writes ``~/.kachery-tasks``: each test runs
inside ``config.set(home=<its tmp_path>)``, and subprocesses get the same home through ``env``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kachery_tasks import config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def home(tmp_path: Path) -> Iterator[Path]:
    """This test's home directory (its tmp_path), in force for the whole test."""
    with config.set(home=str(tmp_path)):
        yield tmp_path


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    """A copy of os.environ for subprocesses: same home, no other KACHERY_TASKS_* settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    environ[config.ENV_PREFIX + "HOME"] = str(home)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    return environ


@pytest.fixture
def run_python(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -c code`` in the test's home; returns the completed process (text output)."""

    def run(code: str, *, extra_env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", code], env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def kachery(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run the ``kachery`` command (``python -m kachery_tasks.cli``) in the test's home."""

    def run(*args: str, input: bytes | None = None, extra_env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], input=input,
                              env={**env, **(extra_env or {})}, capture_output=True, timeout=timeout,
                              cwd=REPO)

    return run


# --- buckets (issue 21): fixtures for the bucket conformance suite live in bucket_fixtures.py -----
# --- transports: the redis-server fixtures of the transport conformance suite, in redis_fixtures.py
# --- hub: an OIDC issuer, an ASGI server and a headless browser, in hub_fixtures.py
# --- ably: a local stand-in for Ably's realtime service (the ably_server fixture), in ably_standin.py
pytest_plugins = ["bucket_fixtures", "redis_fixtures", "hub_fixtures", "ably_standin"]
# --- end buckets ----------------------------------------------------------------------------------


# --- channels over each bus: the node scenarios run on Redis and on the Ably stand-in ---------------
@pytest.fixture(params=["redis", "ably"])
def bus_uri(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A channel transport URI on a real redis-server, or on the Ably stand-in (its key in the
    environment, where the nodes started as subprocesses find it)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_uri")
    from ably_standin import KEY_ENV, transport_uri

    server = request.getfixturevalue("ably_server")
    monkeypatch.setenv(KEY_ENV, server.key.full)
    return transport_uri(server)
