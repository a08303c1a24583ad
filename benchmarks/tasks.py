"""Task engine: cache-hit overhead and big-array hits, against joblib.Memory and plain recompute.

Targets (issue 5, kept by issue 15 with completeness checks and provenance on): a hit for small
arguments from the store ≤ 40 µs and ≥ 5× faster than joblib's hit; from memory ≤ 10 µs; a hit whose
argument is a 128 MB array ≥ 13× faster than joblib.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import kachery_tasks as kt
from kachery_tasks.tasks import MEMORY

from ._common import best_of, per_call, row


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
            joblib_hit = per_call(lambda: j_small(1, opts=opts), 2000)
            memory_hit = per_call(lambda: k_small(1, opts=opts), 5000)

            def store_hit():
                MEMORY.clear()
                k_small(1, opts=opts)

            store_s = per_call(store_hit, 3000)
            recompute = per_call(lambda: small(1, opts=opts), 100000)
            rows.append(row("hit, small args, from store", store_s, "joblib.Memory hit", joblib_hit,
                             f"plain call {recompute * 1e6:.2f} µs", "≤ 40 µs, ≥ 5×"))
            rows.append(row("hit, small args, from memory", memory_hit, "joblib.Memory hit", joblib_hit,
                             "", "≤ 10 µs"))

            x = np.random.default_rng(0).random(16 * 2**20)  # 128 MiB float64
            k_array(x)
            j_array(x)
            ours = best_of(lambda: k_array(x))
            theirs = best_of(lambda: j_array(x))
            plain = best_of(lambda: array_sum(x))
            rows.append(row("hit, 128 MiB array argument", ours, "joblib.Memory hit", theirs,
                             f"plain recompute {plain * 1e3:.1f} ms", "≥ 13×"))

            n = 2**27  # 1 GiB float64
            first = best_of(lambda: k_big(n), repeat=1)
            MEMORY.clear()
            hit = best_of(lambda: k_big(n))
            plain = best_of(lambda: big_result(n), repeat=1)
            rows.append(row("1 GiB array result: first call (compute + store)", first, "plain compute", plain))
            rows.append(row("1 GiB array result: hit (memory map)", hit, "plain compute", plain))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for result in run():
        print(result)
