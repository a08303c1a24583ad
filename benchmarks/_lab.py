"""A channel lab for the benchmarks that need one (channels.py, remote.py), all in a temp dir.

A redis-server of its own on a free loopback port (no persistence), a directory bucket, home A (the
owner of channel "lab", holding every permission) and requester homes admitted with the requester
permissions, each made through the library as the CLI's commands would; A's ``kachery node start
--channel lab`` runs as a separate process, as in real use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

from kachery_tasks.channels.admin import create_channel, grant
from kachery_tasks.channels.pins import Pins
from kachery_tasks.identity import init_node, node_identity
from kachery_tasks.node.daemon import status_path

REPO = Path(__file__).resolve().parents[1]
CHANNEL = "lab"


def free_port() -> int:
    """A loopback port nothing listens on now: the server must not meet another test's or a real one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not end within 10 s (its own grace is shorter)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def redis_server(tmp: Path) -> Iterator[int]:
    """A redis-server of this benchmark's own (no persistence); yields its port once it answers PING."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    log = tmp / "redis-server.log"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp), "--logfile", str(log), "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, protocol=2) as client:
            deadline = time.monotonic() + 20
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start: {tail(log)}")
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer PING in 20 s: {tail(log)}") from None
                    time.sleep(0.02)
        yield port
    finally:
        stop(process)


def node_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a node's process: its home and this checkout, no other kachery setting
    (plus ``extra`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_TASKS_")}
    env["KACHERY_TASKS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextmanager
def daemon(home: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``kachery node start --channel lab [args]`` for ``home`` (in ``env``, else :func:`node_env`),
    yielded once its status says running; stopped at the end."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kachery_tasks.cli", "node", "start", "--channel", CHANNEL,
                                    *args], env=env or node_env(home), stdout=out, stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the node daemon exited ({process.returncode}): {tail(log)}")
            try:
                if json.loads(status_path(home).read_text()).get("state") == "running":
                    break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node daemon did not say running in 60 s: {tail(log)}")
            time.sleep(0.05)
        yield process
    finally:
        stop(process)


def make_lab(tmp: Path, redis_uri: str, requesters: Sequence[str] = ("b",)) -> tuple[Path, list[Path], Path]:
    """Home A (owner, provides everything), a home per name in ``requesters`` (admitted with the
    requester permissions), and the directory bucket of channel lab."""
    bucket, home_a = tmp / "bucket", tmp / "a"
    bucket.mkdir()
    init_node(home_a, "alice@lab.org", "a")
    homes = []
    for name in requesters:
        init_node(tmp / name, f"{name}@lab.org", name)
        homes.append(tmp / name)
    add_channel(home_a, homes, CHANNEL, bucket, redis_uri)
    return home_a, homes, bucket


def add_channel(home_a: Path, homes: Sequence[Path], name: str, bucket: Path, transport: str) -> None:
    """Channel ``name`` owned by A in the directory ``bucket`` on ``transport``, with each of
    ``homes`` joined and admitted with the requester permissions."""
    _, join = create_channel(home_a, name, bucket=bucket.as_uri(), transport=transport)
    for home in homes:
        node = node_identity(home)
        Pins(home).pin(join)
        grant(home_a, name, node.node_id, None, owner=node.owner, label=node.label)


#: The repository's test support code: ``ably_standin.py`` is run from there as a peer bus.
TESTS = REPO / "tests"

_STANDIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ably_standin import KEY_ENV, AblyStandin, transport_uri
server = AblyStandin().start()
print(json.dumps({"uri": transport_uri(server), "key_env": KEY_ENV, "key": server.key.full,
                  "options": server.client_options(server.key, binary=True)}), flush=True)
sys.stdin.read()  # until the benchmark closes this pipe (or ends)
server.stop()
"""


@contextmanager
def ably_standin(tmp: Path) -> Iterator[dict]:
    """The Ably stand-in of the tests (``tests/ably_standin.py``, a local Python server speaking
    Ably's realtime protocol to the unmodified SDK) in a process of its own, as redis-server is;
    yields its transport ``uri``, the ``key_env`` that URI names, the ``key`` and SDK ``options``."""
    log = tmp / "ably-standin.log"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-c", _STANDIN, str(TESTS)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=err, env=node_env(tmp))
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ably stand-in did not start: {tail(log)}")
        yield json.loads(line)
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            stop(process)
        process.stdout.close()
