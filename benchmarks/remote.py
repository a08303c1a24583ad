"""Remote tasks (docs/remote.md): a call served by another node against the same call made here.

Setup (benchmarks/_lab.py, all in a temp dir removed at the end): a redis-server of its own, a
directory bucket, home A (owner of channel "lab") and requester homes B and C. A's ``kachery node
start --channel lab`` runs as a separate process with :data:`PROVIDER_ARGS` and serves the tasks of
benchmarks/_remote_node.py; each requester is a process of its own running that module in its home
(the runner's process keeps nothing of the lab).

Cases:
- trivial call: B calls ``plus_one`` (``@kt.query(service="lab")``, returns x + 1) :data:`CALLS`
  times with distinct arguments; p50 and p99 per call against the same body as a local query (no
  ``service``) in B's process.
- throughput: B and C each call ``plus_one`` :data:`LOOP` times, started together, against the one
  provider; the wall time of all the calls (calls/s in the note) against the same calls made
  locally (``plus_one_here`` in two processes of B's and C's homes, started together).
- pure from the bucket: C calls ``square`` (``@kt.pure(service="lab")``) for :data:`PURE` arguments
  (A computes and publishes each: its own row), then B, which never called them, calls them: its
  local tiers miss and the record is read from the channel's bucket. A counter file the task
  appends to says nothing ran again. The peer is the bare read of the same records through a
  bucket tier over the channel's bucket (the floor of "answered from the bucket").

``ratio`` is ``peer_s / ours_s``: below 1, how many times slower than the local (or bare) peer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kachery_tasks.channels.uri import open_transport
from kachery_tasks.identity import node_identity

from ._common import ms, pct, row
from ._lab import CHANNEL, daemon, make_lab, node_env, redis_server, tail

#: The provider's flags, besides ``--channel`` and ``--serve``: two served tasks run at once (as two workers).
PROVIDER_ARGS = ("--concurrency", "2")
SERVED = "benchmarks._remote_node"
SERVE = ("--serve", f"{SERVED}:plus_one", "--serve", f"{SERVED}:square")
#: Timed remote (and local) calls of case 1.
CALLS = 300
#: Calls per requester process in case 2 (two processes).
LOOP = 500
#: Pure tasks published by C and then fetched by B (the first of each is a warm-up).
PURE = 41
#: Seconds a requester process may take before the case is abandoned with the daemon's log.
WAIT_S = 120.0


class Lab:
    def __init__(self, tmp: Path, home_a: Path, requesters: dict[str, Path]) -> None:
        self.tmp, self.home_a, self.requesters = tmp, home_a, requesters
        self.counter = tmp / "runs.txt"
        self.daemon_log = tmp / "daemon-a.log"

    def env(self, home: Path) -> dict[str, str]:
        return node_env(home, KT_BENCH_COUNTER=str(self.counter))

    def runs(self) -> list[str]:
        return self.counter.read_text().split() if self.counter.exists() else []

    def start(self, name: str, *args: object) -> subprocess.Popen:
        """``python -m benchmarks._remote_node ARGS`` in requester ``name``'s home."""
        home = self.requesters[name]
        with open(self.tmp / f"{name}.stderr", "ab") as err:
            return subprocess.Popen([sys.executable, "-m", SERVED, *map(str, args)], env=self.env(home), cwd=home,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def failed(self, name: str, what: str) -> RuntimeError:
        return RuntimeError(f"requester {name} ({what}) failed: {tail(self.tmp / f'{name}.stderr', 5)} | "
                            f"daemon A: {tail(self.daemon_log, 5)}")

    def result(self, name: str, process: subprocess.Popen, what: str) -> dict:
        try:
            out, _ = process.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise self.failed(name, f"{what}: no end in {WAIT_S:g} s") from None
        if process.returncode:
            raise self.failed(name, what)
        return json.loads(out.decode().strip().splitlines()[-1])

    def call(self, name: str, *args: object) -> dict:
        return self.result(name, self.start(name, *args), " ".join(map(str, args)))


def _wait_serving(redis_uri: str, lab: Lab) -> None:
    """Until A's presence announces the served tasks (a requester asks only a member announcing them)."""
    deadline = time.monotonic() + 30
    with open_transport(redis_uri) as bus:
        while True:
            serves = [json.loads(raw).get("serves", {}) for raw in bus.present(f"channel/{CHANNEL}").values()]
            if any(f"{SERVED}.plus_one" in s and f"{SERVED}.square" in s for s in serves):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"A's daemon never announced serving the tasks: {tail(lab.daemon_log)}")
            time.sleep(0.05)


# -- case 1 -----------------------------------------------------------------------------------------
def _latency_rows(lab: Lab) -> list[dict]:
    got = lab.call("b", "latency", CALLS)
    remote, local = got["remote"], got["local"]
    r50, r99, l50, l99 = pct(remote, 50), pct(remote, 99), pct(local, 50), pct(local, 99)
    return [
        row("remote query p50 (B calls A's plus_one)", r50, "same query, local, p50", l50,
            note=f"{CALLS} calls, distinct args; ours {ms(r50)} vs local {ms(l50)}; A's daemon in its own process"),
        row("remote query p99", r99, "same query, local, p99", l99,
            note=f"ours {ms(r99)} vs local {ms(l99)}; max ours {ms(max(remote))}, local {ms(max(local))}"),
    ]


# -- case 2 -----------------------------------------------------------------------------------------
def _loops(lab: Lab, where: str) -> tuple[float, list[float]]:
    """Wall seconds of ``LOOP`` calls in each of B and C, started together; and each one's own."""
    processes = {name: lab.start(name, "loop", where, LOOP, offset)
                 for name, offset in (("b", 2_000_000), ("c", 3_000_000))}
    try:
        for name, process in processes.items():
            if process.stdout.readline().strip() != b"ready":
                process.wait(WAIT_S)
                raise lab.failed(name, f"loop {where}: not ready")
        for process in processes.values():
            process.stdin.write(b"go\n")
            process.stdin.flush()
        done = [lab.result(name, process, f"loop {where}") for name, process in processes.items()]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return max(d["t1"] for d in done) - min(d["t0"] for d in done), [d["t1"] - d["t0"] for d in done]


def _throughput_rows(lab: Lab) -> list[dict]:
    remote, each_remote = _loops(lab, "remote")
    local, each_local = _loops(lab, "local")
    calls = 2 * LOOP
    return [row(f"throughput: {calls} remote queries, 2 requesters, 1 provider", remote,
                f"same {calls} queries, local", local,
                note=f"{calls / remote:,.0f} calls/s vs local {calls / local:,.0f} calls/s; provider "
                     f"{' '.join(PROVIDER_ARGS)}; per requester {', '.join(f'{LOOP / s:,.0f}' for s in each_remote)} "
                     f"calls/s (local {', '.join(f'{LOOP / s:,.0f}' for s in each_local)})")]


# -- case 3 -----------------------------------------------------------------------------------------
def _pure_rows(lab: Lab, remote_p50: float) -> list[dict]:
    first = 4_000_000
    published = lab.call("c", "publish", first, PURE)["samples"]
    after_publish = lab.runs()
    if after_publish != ["a:square"] * PURE:
        raise RuntimeError(f"C's {PURE} calls of square ran {after_publish}, not once each on A")
    got = lab.call("b", "fetch", first, PURE, node_identity(lab.home_a).node_id)
    if lab.runs() != after_publish:
        raise RuntimeError(f"B's calls of square, published already, ran again: {lab.runs()[PURE:]}")
    ours, bare = got["ours"], got["bucket_tier"]
    p50, b50 = pct(ours, 50), pct(bare, 50)
    n = PURE - 1
    return [
        row("remote pure, first call (A computes + publishes) p50", pct(published, 50),
            "remote query p50 (case 1)", remote_p50,
            note=f"C's {n} calls of square, distinct args; p99 {ms(pct(published, 99))}; each is one request_task "
                 "(after a read of the channel's bucket); the peer publishes nothing"),
        row("remote pure answered from the bucket p50 (B)", p50, "bucket tier read p50", b50,
            note=f"{n} records A published, B never called them; p99 {ms(pct(ours, 99))} vs {ms(pct(bare, 99))}; "
                 f"counter: square ran {len(after_publish)} times, all on A, none for B's calls (B reads the "
                 "channel's bucket through the channel tier's view, A is not asked); peer: BucketTier over the channel's bucket trusting A"),
    ]


def run() -> list[dict]:
    rows: list[dict] = []

    with tempfile.TemporaryDirectory(prefix="kt-bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        with redis_server(tmp) as port:
            redis_uri = f"redis://127.0.0.1:{port}/0"
            home_a, (home_b, home_c), _bucket = make_lab(tmp, redis_uri, ("b", "c"))
            lab = Lab(tmp, home_a, {"b": home_b, "c": home_c})
            with daemon(home_a, lab.daemon_log, *PROVIDER_ARGS, *SERVE, env=lab.env(home_a)):
                _wait_serving(redis_uri, lab)
                rows += _latency_rows(lab)
                rows += _throughput_rows(lab)
                rows += _pure_rows(lab, rows[0]["ours_s"])
    return rows
