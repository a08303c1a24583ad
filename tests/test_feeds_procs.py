"""Feeds across processes: torn appends after SIGKILL, tail wake-ups, concurrent writers, name races."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kachery_tasks import config
from kachery_tasks.feeds import create_feed, load_feed, local_feed


def _spawn(home, code: str) -> subprocess.Popen:
    script = "from kachery_tasks import config\nfrom kachery_tasks.feeds import *\n" + (
        f"with config.set(home={str(home)!r}, feed_checkpoint_every=64):\n" + textwrap.indent(textwrap.dedent(code), "    ")
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def home(tmp_path):
    with config.set(home=str(tmp_path), feed_checkpoint_every=64):
        yield tmp_path


def test_sigkill_mid_append_leaves_valid_prefix(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    proc = _spawn(home, f"""
        sub = load_feed({feed.uri!r}).subfeed("s")
        i = 0
        while True:
            sub.append_many([{{"i": i + k, "pad": "x" * 2000}} for k in range(50)])
            i += 50
    """)
    deadline = time.monotonic() + 30
    while sub.path.stat().st_size < 2_000_000 if sub.path.exists() else True:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader = load_feed(feed.uri).subfeed("s")
    report = reader.verify()
    n = report["messages"]
    assert n >= 500
    assert [m["body"]["i"] for m in reader.messages()] == list(range(n))
    # simulate the torn write the kill may or may not have produced, then recover by appending
    with open(sub.path, "ab") as fh:
        fh.write(b'{"body":{"i":')
    assert load_feed(feed.uri).subfeed("s").verify()["torn_bytes"] > 0
    writer = load_feed(feed.uri).subfeed("s")
    assert len(writer) == n
    writer.append({"i": n})
    assert writer.verify() == {**writer.verify(), "messages": n + 1, "torn_bytes": 0}
    assert sub.path.read_bytes().endswith(b"}\n")


def test_tail_wakes_across_processes(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append({"i": 0})
    proc = _spawn(home, f"""
        import time
        time.sleep(0.5)
        load_feed({feed.uri!r}).subfeed("s").append({{"i": 1, "from": "child"}})
    """)
    t0 = time.monotonic()
    got = sub.tail(1, timeout=20)
    waited = time.monotonic() - t0
    assert proc.wait(timeout=20) == 0, proc.stderr.read()
    assert [m["body"] for m in got] == [{"i": 1, "from": "child"}]
    assert 0.3 < waited < 10


def test_two_processes_appending_make_one_chain(home):
    feed = create_feed()
    code = """
        sub = load_feed({uri!r}).subfeed("s")
        for k in range(40):
            if k % 3:
                sub.append({{"w": {w}, "k": k}})
            else:
                sub.append_many([{{"w": {w}, "k": k, "j": j}} for j in range(3)])
    """
    procs = [_spawn(home, code.format(uri=feed.uri, w=w)) for w in (1, 2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    sub = load_feed(feed.uri).subfeed("s")
    per_writer = 40 + 14 * 2
    report = sub.verify()
    assert report["messages"] == 2 * per_writer
    msgs = sub.messages()
    assert [m["seq"] for m in msgs] == list(range(2 * per_writer))
    for w in (1, 2):
        ks = [m["body"]["k"] for m in msgs if m["body"]["w"] == w]
        assert ks == sorted(ks) and len(ks) == per_writer
    assert [cp.size for cp in sub.checkpoints()] == [64, 128]


def test_local_feed_race_gives_one_feed(home):
    procs = [_spawn(home, "print(local_feed('actions').feed_id)") for _ in range(4)]
    ids = set()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids.add(out.strip())
    assert len(ids) == 1
    assert local_feed("actions").feed_id in ids
    names = json.loads((home / "feeds" / "names.json").read_text())
    assert names == {"actions": ids.pop()}
