"""What every benchmark shares: timing and the row format the runner prints.

``ratio`` is always ``peer_s / ours_s``: above 1, we are that many times faster than the peer (or,
where the peer is a hardware or library limit, that many times under it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in seconds (the least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def per_call(fn: Callable[[], Any], calls: int, repeat: int = 3) -> float:
    """Seconds per call of ``fn``, best of ``repeat`` loops of ``calls`` calls."""
    return best_of(lambda: [fn() for _ in range(calls)], repeat) / calls


def row(case: str, ours_s: float, peer: str, peer_s: float | None, note: str = "", target: str = "") -> dict:
    ratio = peer_s / ours_s if peer_s and ours_s else None
    return {"case": case, "ours_s": ours_s, "peer": peer, "peer_s": peer_s,
            "ratio": None if ratio is None else round(ratio, 3), "note": note, "target": target}
