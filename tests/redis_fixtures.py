"""Pytest plugin (registered in conftest.py): a real redis-server for the transport tests.

- ``redis_server``: one ``redis-server`` process for the session, on a free loopback port, with no
  persistence (``--save '' --appendonly no``) and its files in a temporary directory. It has
  ``.uri``, ``.port``, ``.stop()``, ``.start()`` and ``.restart()`` (stop, then start again on the
  same port: what a subscriber sees when its server restarts), and ``.pause()``/``.resume()``
  (SIGSTOP/SIGCONT: a server that keeps its sockets open but stops answering).
- ``redis_uri``: the server's URI for one test, with the server running and its database empty.
- ``far_redis``: a proxy in front of that server that holds every request for a while: a node far
  from the server, next to one that is near (``redis_uri``).

The binary is not optional: a machine without it fails here, saying how to get it, rather than
skipping the tests and passing.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process that tests can stop, start and pause, always on the same port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.uri = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis-server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.log), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        with redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, protocol=2) as client:
            while True:
                if self.process.poll() is not None:
                    self.process = None
                    raise RuntimeError(f"redis-server exited at start; its log {self.log}:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT:g} s; its log "
                                       f"{self.log}:\n{self._log_tail()}")
                time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGCONT)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


class DelayProxy:
    """A TCP proxy to ``127.0.0.1:port`` that holds each client-to-server chunk for ``delay`` seconds."""

    def __init__(self, port: int, delay: float) -> None:
        self.target = port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uri = f"redis://127.0.0.1:{self.port}/0"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for source, sink, delay in ((client, upstream, self.delay), (upstream, client, 0.0)):
                threading.Thread(target=self._pump, args=(source, sink, delay), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (not on PATH); .ci/run installs it with "
                    "apt-get install -y redis-server", pytrace=False)
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_uri(redis_server: RedisServer) -> str:
    """The session server's URI, with the server running (a test may have stopped it) and empty."""
    if redis_server.process is None:
        redis_server.start()
    else:
        redis_server.resume()
    with redis.Redis(port=redis_server.port, socket_timeout=5, protocol=2) as client:
        client.flushdb()
    return redis_server.uri


@pytest.fixture
def far_redis(redis_uri: str, redis_server: RedisServer) -> Iterator[DelayProxy]:
    """The test's server behind a proxy that delays every request by 0.3 s."""
    proxy = DelayProxy(redis_server.port, 0.3)
    yield proxy
    proxy.close()
