"""The stale-code report over a large store: `kt.stale()` over 100k records.

The records are written straight into a temp home from one real record (same format, other
arguments and ids, an old code hash), because computing 100k tasks would measure fsync, not the
report. The peer is reading and parsing the same records with the standard library alone, the
floor for any report that must look at every record; the note gives our own scan (os calls and
orjson) alone, the floor of this implementation. Each is timed ``KT_BENCH_STALE_REPEAT`` times,
interleaved, after the new files are synced, and reported by its median.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import kachery_tasks as kt

from ._common import row

RECORDS = int(os.environ.get("KT_BENCH_STALE_RECORDS", "100000"))
#: Reports timed, with the floors between them; the median is reported.
REPEAT = int(os.environ.get("KT_BENCH_STALE_REPEAT", "3"))

MODULE = """
from kachery_tasks import pure

@pure
def scaled(x):
    return x * 2
"""


def _populate(home: Path, n: int) -> None:
    import bench_stale_mod

    from kachery_tasks.hashing import task_id

    bench_stale_mod.scaled(-1)
    store = kt.store.current_store()
    template = next(store.records.iter_records()).to_json()
    fid = bench_stale_mod.scaled.function_id
    old_fid = type(fid)(fid.name, "0" * 32, {})
    root = store.records.records_dir
    for i in range(n):
        tid = task_id("pure", old_fid, {"x": i})
        record = {**template, "task_id": tid,
                  "function": {**template["function"], "code_hash": old_fid.code_hash},
                  "args": {"x": {"hash": kt.hashing.hash_value(i), "json": i}},
                  "result": {"codec": "json", "inline": 2 * i, "size": 4}}
        path = root / tid[:2] / f"{tid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, separators=(",", ":")))


def _floor(root: Path) -> float:
    """Seconds to read and parse every record with the standard library alone."""
    t = time.perf_counter()
    for bucket in os.scandir(root):
        for entry in os.scandir(bucket.path):
            with open(entry.path, "rb") as fh:
                json.loads(fh.read())
    return time.perf_counter() - t


def _scan(store) -> float:
    """Seconds for our own scan of every record (os calls and orjson), the report's part that
    no per-record work can go under."""
    t = time.perf_counter()
    for _ in store.records.iter_records():
        pass
    return time.perf_counter() - t


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run() -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="kt-bench-stale-"))
    try:
        (base / "bench_stale_mod.py").write_text(MODULE)
        sys.path.insert(0, str(base))
        with kt.config.set(home=str(base / "home")):
            _populate(base / "home", RECORDS)
            os.sync()  # the writeback of 100k new files is the setup's, not the report's
            store = kt.store.current_store()
            ours, floor, scan = [], [], []
            for _ in range(REPEAT):  # interleaved: a shared machine's drift hits all three alike
                t = time.perf_counter()
                report = kt.stale()
                ours.append(time.perf_counter() - t)
                assert len(report.records) == RECORDS, len(report.records)
                del report
                floor.append(_floor(store.records.records_dir))
                scan.append(_scan(store))
        spread = f"median of {REPEAT}, {min(ours):.2f}–{max(ours):.2f} s"
        return [row(f"kt.stale() over {RECORDS} records (all stale)", _median(ours), "read + json.loads every record",
                    _median(floor), f"{_median(ours) / RECORDS * 1e6:.1f} µs per record ({spread}); our own "
                    f"read + orjson scan alone {_median(scan):.2f} s", "≤ 3 s")]
    finally:
        sys.path.remove(str(base))
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    for result in run():
        print(result)
