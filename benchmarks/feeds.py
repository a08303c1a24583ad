"""Feeds: append and verify-on-replay throughput against raw Ed25519 sign/verify, same run.

Each row gives seconds per message (ours_s) against seconds per Ed25519 operation (peer_s), so
ratio < 1 on verification means replay is faster than checking one signature per message, which is
what signed checkpoints are for.
"""

from __future__ import annotations

import os
import tempfile
import time

from kachery_tasks import config
from kachery_tasks.feeds import create_feed
from kachery_tasks.identity import KeyPair, verify

from ._common import row

N_SINGLE = 300
N_BATCHED = 20_000
N_REPLAY = 100_000


def _body(i: int) -> dict:
    return {"event": "succeeded", "task": f"{i:032x}", "wall_s": 0.25, "n": i}


def _ed25519(n: int = 3000) -> tuple[float, float]:
    keys = KeyPair.generate()
    msg = b'{"body":{"event":"succeeded"},"prev":"' + b"0" * 64 + b'","seq":1,"timestamp":1}'
    t = time.perf_counter()
    sigs = [keys.sign(msg) for _ in range(n)]
    sign_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for s in sigs:
        verify(keys.public_hex, msg, s)
    return sign_s, (time.perf_counter() - t) / n


def run() -> list[dict]:
    sign_s, verify_s = _ed25519()
    rows = []
    with tempfile.TemporaryDirectory() as home, config.set(home=home):
        feed = create_feed(label="bench")
        sub = feed.subfeed("single")
        t = time.perf_counter()
        for i in range(N_SINGLE):
            sub.append(_body(i))
        single = (time.perf_counter() - t) / N_SINGLE
        rows.append(row("append (one message, fsync each)", single, "ed25519 sign", sign_s,
                        f"{1 / single:,.0f} appends/s vs {1 / sign_s:,.0f} signs/s"))

        sub = feed.subfeed("batched")
        t = time.perf_counter()
        for lo in range(0, N_BATCHED, 1000):
            sub.append_many([_body(i) for i in range(lo, lo + 1000)])
        batched = (time.perf_counter() - t) / N_BATCHED
        rows.append(row("append_many (1000 per batch)", batched, "ed25519 sign", sign_s,
                        f"{1 / batched:,.0f} msgs/s; one signature per message is the floor"))

        sub = feed.subfeed("replay")
        for lo in range(0, N_REPLAY, 1000):
            sub.append_many([_body(i) for i in range(lo, lo + 1000)])
        size = os.path.getsize(sub.path)
        t = time.perf_counter()
        count = sub.replay(lambda n, m: n + 1, 0)
        replay = (time.perf_counter() - t) / count
        rows.append(row(f"replay with verification ({count:,} msgs, {size / 2**20:.0f} MiB)", replay,
                        "ed25519 verify", verify_s,
                        f"{1 / replay:,.0f} msgs/s vs {1 / verify_s:,.0f} verifies/s; "
                        f"checkpoint every {config.get('feed_checkpoint_every')}", "≥ 50k msgs/s"))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
