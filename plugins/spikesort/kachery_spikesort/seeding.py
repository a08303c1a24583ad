"""Reproducible randomness for spikeinterface's internal sorters.

A pure task must give the same result for the same inputs. spikeinterface 0.105's internal sorters
draw random data chunks (noise levels, z-scoring, peak selection) from ``np.random.default_rng(None)``
in places no sorter parameter reaches, so two runs of ``run_sorter`` with identical parameters differ
by a few spikes. :func:`seeded_numpy` makes them reproducible: inside it, every
``np.random.default_rng()`` called without a seed gets a generator seeded from the block's seed,
the calling line and how many times that line asked before, and numpy's legacy global generator is
seeded too (scikit-learn draws from it when given no ``random_state``).

Keying by call site keeps results stable when a module imported lazily during the first call of a
process draws numbers of its own. The patch is process-wide, so blocks are serialised by a lock;
code that passes an explicit seed is unaffected.
"""

from __future__ import annotations

import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_LOCK = threading.RLock()


@contextmanager
def seeded_numpy(seed: int = 0) -> Iterator[None]:
    """Within the block, unseeded numpy randomness is a deterministic function of ``seed``."""
    with _LOCK:
        original = np.random.default_rng
        counters: dict[int, int] = {}

        def default_rng(seed_arg=None, *args, **kwargs):
            if "seed" in kwargs:
                seed_arg = kwargs.pop("seed")
            if seed_arg is None:
                frame = sys._getframe(1)
                where = f"{frame.f_globals.get('__name__')}:{frame.f_code.co_name}:{frame.f_lineno}"
                site = zlib.crc32(where.encode())
                n = counters.get(site, 0)
                counters[site] = n + 1
                seed_arg = np.random.SeedSequence([int(seed), site, n])
            return original(seed_arg, *args, **kwargs)

        legacy_state = np.random.get_state()
        np.random.default_rng = default_rng
        np.random.seed(int(seed) % 2**32)
        try:
            yield
        finally:
            np.random.default_rng = original
            np.random.set_state(legacy_state)
