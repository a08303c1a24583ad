"""Task engine: cache-hit overhead and big-array hits, against joblib.Memory and plain recompute.

Targets (issue 5, kept by issue 15 with completeness checks and provenance on): a hit for small
arguments from the store ≤ 40 µs and ≥ 5× faster than joblib's hit; from memory ≤ 10 µs; a hit whose
argument is a 128 MB array ≥ 13× faster than joblib.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import kachery_tasks as kt
from kachery_tasks.tasks import MEMORY


def _per_call(fn, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _row(case: str, ours: float, peer: str, peer_s: float, note: str = "", target: str = "") -> dict:
    return {"case": case, "ours_s": ours, "peer": peer, "peer_s": peer_s,
            "ratio": peer_s / ours if ours else float("inf"), "note": note, "target": target}


def small(a, b=2, opts=None):
    return {"sum": a + b, "opts": opts}


def array_sum(x):
    return float(x.sum())


def big_result(n):
    return np.ones(n, dtype=np.float64)


def run() -> list[dict]:
    from joblib import Memory

    rows = []
    base = Path(tempfile.mkdtemp(prefix="kt-bench-tasks-"))
    try:
        memory = Memory(str(base / "joblib"), verbose=0)
        j_small = memory.cache(small)
        j_array = memory.cache(array_sum)
        with kt.config.set(home=str(base / "home")):
            k_small = kt.pure(small)
            k_array = kt.pure(array_sum)
            k_big = kt.pure(big_result)
            opts = {"mode": "fast", "levels": [1, 2, 3]}
            k_small(1, opts=opts)
            j_small(1, opts=opts)
            joblib_hit = _per_call(lambda: j_small(1, opts=opts), 2000)
            memory_hit = _per_call(lambda: k_small(1, opts=opts), 5000)

            def store_hit():
                MEMORY.clear()
                k_small(1, opts=opts)

            store_s = _per_call(store_hit, 3000)
            recompute = _per_call(lambda: small(1, opts=opts), 100000)
            rows.append(_row("hit, small args, from store", store_s, "joblib.Memory hit", joblib_hit,
                             f"plain call {recompute * 1e6:.2f} µs", "≤ 40 µs, ≥ 5×"))
            rows.append(_row("hit, small args, from memory", memory_hit, "joblib.Memory hit", joblib_hit,
                             "", "≤ 10 µs"))

            x = np.random.default_rng(0).random(16 * 2**20)  # 128 MiB float64
            k_array(x)
            j_array(x)
            ours = _best(lambda: k_array(x))
            theirs = _best(lambda: j_array(x))
            plain = _best(lambda: array_sum(x))
            rows.append(_row("hit, 128 MiB array argument", ours, "joblib.Memory hit", theirs,
                             f"plain recompute {plain * 1e3:.1f} ms", "≥ 13×"))

            n = 2**27  # 1 GiB float64
            first = _best(lambda: k_big(n), repeat=1)
            MEMORY.clear()
            hit = _best(lambda: k_big(n))
            plain = _best(lambda: big_result(n), repeat=1)
            rows.append(_row("1 GiB array result: first call (compute + store)", first, "plain compute", plain))
            rows.append(_row("1 GiB array result: hit (memory map)", hit, "plain compute", plain))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
