"""Run benchmarks: ``python -m benchmarks [NAME...]`` (default: every module in this folder).

A benchmark is any module here with a ``run() -> list[dict]`` function. Results go to a rich table
and to ``benchmarks/results/<name>.json`` with the machine they ran on, so figures in docs and
issues can be traced to a run.

Peers run out of the box. Those installed with this project (``pip install -e '.[bench]'``: joblib,
pandas) run in this interpreter; a peer that pins releases this project cannot share an
environment with (graphchain: ``cloudpickle<3``) gets its own venv under ``benchmarks/.peers/``
(ignored by git), made with pip on its first run (network access to PyPI needed once), and runs
there as a subprocess (see ``_common.peer_python``). Delete that folder to rebuild them. A peer
that cannot run is said in its row's note; the benchmark still reports our own figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ("case", "ours_s", "peer", "peer_s", "ratio", "target", "note")


def discover() -> list[str]:
    """Names of the benchmark modules in this folder (files not starting with an underscore)."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("_"))


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def run_one(name: str, console: Console) -> bool:
    module = importlib.import_module(f"benchmarks.{name}")
    if not callable(getattr(module, "run", None)):
        console.print(f"[yellow]benchmarks.{name} has no run(); skipped[/]")
        return True
    started = time.time()
    try:
        rows = module.run()
    except Exception:
        console.print(f"[red]benchmark {name} failed[/]\n{traceback.format_exc()}")
        return False
    table = Table(title=f"benchmark: {name}")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column.endswith(("_s", "ratio")) else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(column)) for column in COLUMNS))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    record = {
        "benchmark": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 3),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    console.print(f"wrote {out.relative_to(HERE.parent)}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(discover())})")
    args = parser.parse_args(argv)
    available = discover()
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    # A wide console when piped (CI logs, tee): rich would otherwise fold the table to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    ok = True
    for name in args.names or available:
        ok = run_one(name, console) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
