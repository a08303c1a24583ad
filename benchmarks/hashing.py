"""Hashing speed against joblib.hash and dask.base.tokenize (best of 3 each).

``run()`` returns rows ``{"case", "ours_s", "peer", "peer_s", "ratio"}`` with ratio = peer_s / ours_s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import best_of, row


def _cases() -> dict[str, Any]:
    import pandas as pd

    rng = np.random.default_rng(0)
    arr = rng.random(16 * 1024 * 1024)  # 128 MiB of float64
    n = 1_000_000
    return {
        "ndarray 128MB float64": arr,
        "ndarray 128MB float64, Fortran order": np.asfortranarray(arr.reshape(4096, 4096)),
        "dict 1e6 str->int/float": {f"k{i}": (i if i % 2 else i * 0.5) for i in range(n)},
        "dict 1e6 str->float": {f"k{i}": i * 0.5 for i in range(n)},
        "list 1e5 tuples (int, str, float)": [(i, f"s{i}", i * 0.25) for i in range(100_000)],
        "DataFrame 1e6 rows (4 float, 1 int, 1 str)": pd.DataFrame(
            {
                **{f"f{j}": rng.random(n) for j in range(4)},
                "i": np.arange(n),
                "s": [f"name{i % 1000}" for i in range(n)],
            }
        ),
    }


def run() -> list[dict]:
    import joblib
    from dask.base import tokenize

    from kachery_tasks.hashing import hash_value

    peers = {"joblib.hash": joblib.hash, "dask.base.tokenize": tokenize}
    rows = []
    for case, value in _cases().items():
        ours = best_of(lambda v=value: hash_value(v))
        for peer, fn in peers.items():
            peer_s = best_of(lambda v=value, f=fn: f(v))
            rows.append(row(case, ours, peer, peer_s))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
