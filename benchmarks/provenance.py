"""The stale-code report over a large store: `kt.stale()` over 100k records.

The records are written straight into a temp home from one real record (same format, other
arguments and ids, an old code hash), because computing 100k tasks would measure fsync, not the
report. The peer is reading and parsing the same records with the standard library alone, the
floor for any report that must look at every record.
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
    template = next(store.records.iter_records())
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


def run() -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="kt-bench-stale-"))
    try:
        (base / "bench_stale_mod.py").write_text(MODULE)
        sys.path.insert(0, str(base))
        with kt.config.set(home=str(base / "home")):
            _populate(base / "home", RECORDS)
            t = time.perf_counter()
            report = kt.stale()
            ours = time.perf_counter() - t
            assert len(report.records) == RECORDS, len(report.records)
            root = kt.store.current_store().records.records_dir
            t = time.perf_counter()
            count = 0
            for bucket in os.scandir(root):
                for entry in os.scandir(bucket.path):
                    with open(entry.path, "rb") as fh:
                        json.loads(fh.read())
                    count += 1
            floor = time.perf_counter() - t
        return [row(f"kt.stale() over {RECORDS} records (all stale)", ours, "read + json.loads every record",
                    floor, f"{ours / RECORDS * 1e6:.1f} µs per record")]
    finally:
        sys.path.remove(str(base))
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    for result in run():
        print(result)
