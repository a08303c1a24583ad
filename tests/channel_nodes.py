"""Test support for channels: nodes in separate processes, each with its own home, one directory
bucket and one real redis-server (``redis_server`` from redis_fixtures.py).

A :class:`Node` runs ``kachery`` and Python in subprocesses with its home; :meth:`Node.start_daemon`
runs ``kachery node start`` as a long-lived process and waits until its status says ``running``.
:func:`make_lab` builds the usual three: an owner that provides, a member that requests, and an
outsider that joined but was never admitted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kachery_tasks.channels import admin
from kachery_tasks.channels.pins import Pins
from kachery_tasks.identity import init_node, node_identity

REPO = Path(__file__).resolve().parents[1]


class Node:
    """One node: its own home (and key), talking to the lab's bucket and redis."""

    def __init__(self, tmp: Path, name: str, counter: Path, **config: str) -> None:
        self.name = name
        self.home = tmp / name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_TASKS_")}
        self.env.update({
            "KACHERY_TASKS_HOME": str(self.home),
            "KT_TEST_COUNTER": str(counter),
            "PYTHONPATH": os.pathsep.join([str(tmp), str(REPO)]),
            **{f"KACHERY_TASKS_{k.upper()}": v for k, v in config.items()},
        })
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = tmp / f"{name}-daemon.log"

    def kachery(self, *args: str, check: bool = True, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], env={**self.env, **extra},
                              capture_output=True, text=True, timeout=timeout, cwd=self.home.parent)
        if check:
            assert proc.returncode == 0, f"kachery {' '.join(args)}: {proc.stderr}"
        return proc

    def py(self, code: str, *, check: bool = True, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", code], env={**self.env, **extra}, capture_output=True,
                              text=True, timeout=timeout, cwd=self.home.parent)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    @property
    def node_id(self) -> str:
        return node_identity(self.home).node_id

    def start_daemon(self, channel: str = "lab", *args: str, **extra: str) -> subprocess.Popen:
        status = self.home / "node" / "daemon.json"
        if status.exists():
            status.unlink()
        log = open(self.daemon_log, "ab")  # noqa: SIM115 - the process keeps it
        self.daemon = subprocess.Popen([sys.executable, "-m", "kachery_tasks.cli", "node", "start", "--channel",
                                        channel, *args], env={**self.env, **extra}, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=self.home.parent)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError(f"daemon exited ({self.daemon.returncode}): {self.daemon_log.read_text()}")
            try:
                if json.loads(status.read_text()).get("state") == "running":
                    return self.daemon
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start: {self.daemon_log.read_text()}")

    def stop_daemon(self, sig: int = signal.SIGTERM) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        code = self.daemon.wait(60)
        self.daemon = None
        return code

    def status(self) -> dict:
        return json.loads(self.kachery("node", "status", "--json").stdout)

    def log_text(self) -> str:
        return self.daemon_log.read_text() if self.daemon_log.exists() else ""


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """``predicate()``'s first true value, polled every 0.1 s; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def make_lab(tmp: Path, transport: str, counter: Path, **config: str) -> tuple[Node, Node, Node, Path]:
    """Owner (admitted to everything, provides), member (requests only), outsider (joined, not admitted).

    Set up in this process with the functions the commands call (``kachery node init``,
    ``channel create``, ``join`` and ``grant``: channels/admin.py, channels/pins.py): seven command
    processes cost 3.4 s a test. The commands themselves are tested in test_channel_config.py."""
    bucket = tmp / "bucket"
    bucket.mkdir(parents=True)
    owner, member, outsider = (Node(tmp, n, counter, **config) for n in ("owner", "member", "outsider"))
    for node, email in ((owner, "alice@lab.org"), (member, "bob@lab.org"), (outsider, "eve@else.org")):
        init_node(node.home, owner=email, label=node.name)
    _, join = admin.create_channel(owner.home, "lab", bucket=bucket.as_uri(), transport=transport)
    for node in (member, outsider):
        Pins(node.home).pin(join)
    admin.grant(owner.home, "lab", node_identity(member.home).node_id, None, owner="bob@lab.org", label="member")
    return owner, member, outsider, bucket


def stop_all(*nodes: Node) -> None:
    for node in nodes:
        if node.daemon is not None and node.daemon.poll() is None:
            node.daemon.kill()
            node.daemon.wait(30)
