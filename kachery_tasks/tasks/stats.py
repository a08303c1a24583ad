"""Counters of how calls resolved in this process: hits by tier, computes, waits, stale results.

The Dask plugin and the benchmarks read them; ``snapshot()`` is cheap and thread-safe enough for
counters (a lost increment under a race is acceptable for statistics, never for results).
"""

from __future__ import annotations

from collections import Counter


class Stats:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, what: str, n: int = 1) -> None:
        self._counts[what] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def reset(self) -> None:
        self._counts.clear()


STATS = Stats()
