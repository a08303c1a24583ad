"""What every benchmark shares: timing, the row format the runner prints, and peers' own venvs.

``ratio`` is always ``peer_s / ours_s``: above 1, we are that many times faster than the peer (or,
where the peer is a hardware or library limit, that many times under it).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Peers' own virtual environments (ignored by git): ``benchmarks/.peers/<name>/``.
PEERS = Path(__file__).resolve().parent / ".peers"


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


def pct(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def timed(n: int, once: Callable[[int], Any], warmup: int = 20) -> list[float]:
    """Seconds of each of ``n`` calls ``once(i)`` (i = 0 .. n-1), after ``warmup`` untimed ones
    (i = -warmup .. -1)."""
    samples = []
    for i in range(-warmup, n):
        t0 = time.perf_counter()
        once(i)
        if i >= 0:
            samples.append(time.perf_counter() - t0)
    return samples


def row(case: str, ours_s: float, peer: str, peer_s: float | None, note: str = "", target: str = "") -> dict:
    ratio = peer_s / ours_s if peer_s and ours_s else None
    return {"case": case, "ours_s": ours_s, "peer": peer, "peer_s": peer_s,
            "ratio": None if ratio is None else round(ratio, 3), "note": note, "target": target}


def peer_python(name: str, requirements: Sequence[str]) -> Path:
    """The Python of peer ``name``'s own virtual environment, ``benchmarks/.peers/<name>/``, made on
    first use with ``requirements`` pip-installed into it (network access to the package index).

    Why a venv of its own: a peer may pin releases this project cannot install beside it
    (graphchain 1.3 wants ``cloudpickle<3``, kachery-tasks ``>=3``), and a benchmark's peer must
    run out of the box: a fresh checkout's ``python -m benchmarks`` installs it rather than
    reporting it missing. The requirements are written into the venv once they are installed, so
    a venv whose install did not finish, or made for other requirements, is made again; a lock
    keeps two benchmark runs from building it at once. Delete the folder to rebuild it."""
    venv = PEERS / name
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    stamp = venv / "kachery-bench-requirements.json"
    wanted = json.dumps(sorted(requirements))
    PEERS.mkdir(exist_ok=True)
    with open(PEERS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        print(f"benchmarks: making {name}'s own venv in {venv.relative_to(PEERS.parents[1])} (first use): "
              f"pip install {' '.join(requirements)}", file=sys.stderr, flush=True)
        _checked([sys.executable, "-m", "venv", "--clear", str(venv)], f"python -m venv for {name}")
        _checked([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
                  *requirements], f"pip install for {name}")
        stamp.write_text(wanted)
    return python


def json_from(python: str | Path, code: str, cwd: str | Path | None = None) -> dict:
    """Run ``code`` in a new interpreter ``python`` and return the JSON its last output line holds.

    A new interpreter is how a peer living in its own venv runs at all, and how a rerun is
    measured fairly (a rerun is a new process in real life)."""
    done = _checked([str(python), "-c", code], "a benchmark subprocess", cwd=cwd)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _checked(command: list[str], what: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``command``, output captured; a failure raises with the end of its stderr, so a benchmark
    row's note says why (no network, a peer's own error) instead of an exit status alone."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        tail = " | ".join(([line for line in lines if not line.startswith("WARNING:")] or lines)[-3:])
        raise RuntimeError(f"{what} exited {done.returncode}: {tail}")
    return done
