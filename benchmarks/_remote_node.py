"""The tasks benchmarks/remote.py has A serve, and the requesters' side of its cases.

A's daemon serves them (``--serve benchmarks._remote_node:plus_one`` ...); a requester runs
``python -m benchmarks._remote_node MODE ...`` in its own home (``KACHERY_TASKS_HOME``) and prints
one JSON line last. Both sides import this one file, so the code hashes agree. Each requester is a
process of its own, as a laptop calling a server is, and so the benchmark runner's process keeps no
channel session, transport or config of a lab that is gone once the benchmark ends.

Modes:

- ``latency N``: ``plus_one`` (remote query) N times after a warm-up, then ``plus_one_here`` (the
  same body, a local query) N times: ``{"remote": [s, ...], "local": [s, ...]}``.
- ``loop remote|local N OFFSET``: a few warm-up calls, then ``ready`` on stdout; on a line from stdin,
  N calls with arguments OFFSET .. OFFSET+N-1: ``{"t0": ..., "t1": ...}`` (``time.time()``, so two
  processes' times compare).
- ``publish FIRST N``: ``square(i)`` (remote pure) for i in FIRST .. FIRST+N-1, each but the
  first (a warm-up) timed: the provider computes and publishes each. ``{"samples": [...]}``.
- ``fetch FIRST N PROVIDER_ID``: the same calls by a requester that never made them (its local
  tiers miss, the record is in the channel's bucket), timed as in publish; then the bare read of
  each record through a bucket tier over the channel's bucket trusting the provider (no channel, no
  tiers before it): ``{"ours": [...], "bucket_tier": [...]}``.

``square`` appends a line to the file ``KT_BENCH_COUNTER`` names each time it runs (the node's
home name and the task), so the benchmark can tell nothing ran again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import kachery_tasks as kt

from ._common import timed
from ._lab import CHANNEL

WARMUP = 20


@kt.query(service=CHANNEL)
def plus_one(x: int) -> int:
    return x + 1


@kt.query
def plus_one_here(x: int) -> int:
    return x + 1


@kt.pure(service=CHANNEL)
def square(x: int) -> int:
    counter = os.environ.get("KT_BENCH_COUNTER")
    if counter:
        with open(counter, "a") as out:
            out.write(f"{Path(os.environ.get('KACHERY_TASKS_HOME', '?')).name}:square\n")
    return x * x


def _checked(task, x: int) -> None:
    got = task(x)
    if got != x + 1:
        raise RuntimeError(f"{task.name}({x}) gave {got!r}, not {x + 1}")


def latency(n: int) -> dict:
    # Distinct arguments everywhere: a query is never answered from a cache, but no two calls are alike.
    remote = timed(n, lambda i: _checked(plus_one, 1_000_000 + i), WARMUP)
    local = timed(n, lambda i: _checked(plus_one_here, 1_000_000 + i), WARMUP)
    return {"remote": remote, "local": local}


def loop(where: str, n: int, offset: int) -> dict:
    task = plus_one if where == "remote" else plus_one_here
    for i in range(WARMUP):
        _checked(task, -offset - i - 1)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for i in range(offset, offset + n):
        _checked(task, i)
    return {"t0": t0, "t1": time.time()}


def publish(first: int, n: int) -> dict:
    def once(i: int) -> None:
        got = square(first + 1 + i)
        if got != (first + 1 + i) ** 2:
            raise RuntimeError(f"square({first + 1 + i}) gave {got!r}")

    square(first)  # the warm-up: the channel's session, its config, the presence of providers
    return {"samples": timed(n - 1, once, 0)}


def fetch(first: int, n: int, provider: str) -> dict:
    from kachery_tasks.buckets.uri import open_bucket
    from kachery_tasks.channels.pins import Pins
    from kachery_tasks.tasks.tiers import BucketTier, Hit

    def ours(i: int) -> None:
        x = first + 1 + i
        got = square(x)
        if got != x * x:
            raise RuntimeError(f"square({x}) gave {got!r}")

    home = kt.config.home()
    tier = BucketTier(str(home), [open_bucket(Pins(home).get(CHANNEL).join.bucket)], [provider])

    def bare(i: int) -> None:
        x = first + 1 + i
        hit = tier.get(square.job(x).id)
        if not isinstance(hit, Hit) or hit.value != x * x:
            raise RuntimeError(f"the bucket tier has no trusted record of square({x}): {hit!r}")

    square(first)  # the warm-up, as in publish
    got = timed(n - 1, ours, 0)
    bare(-1)
    return {"ours": got, "bucket_tier": timed(n - 1, bare, 0)}


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "latency":
        out = latency(int(args[0]))
    elif mode == "loop":
        out = loop(args[0], int(args[1]), int(args[2]))
    elif mode == "publish":
        out = publish(int(args[0]), int(args[1]))
    elif mode == "fetch":
        out = fetch(int(args[0]), int(args[1]), args[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    # Run as ``-m``, this file is ``__main__``: call the module under its own name, so its tasks are
    # named as the provider serves them (``benchmarks._remote_node.plus_one``).
    from benchmarks._remote_node import main as main_of_module

    main_of_module(sys.argv[1:])
