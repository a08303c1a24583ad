"""Storing and loading big files: kachery's store against ``sha256sum`` + ``cp`` of the same file.

Cases (1 GiB, generated into a temp dir, page cache warm for both sides):
- store: ``store_file`` (hash + copy into a temp file + fsync + rename, one pass over the bytes)
  against ``sha256sum f`` then ``cp f dst`` run as subprocesses in the same run; target >= 1.2 GB/s.
- re-store: the same file again (hash only, no copy) against ``sha256sum``.
- load_file: the verified-stamp path (no re-hash) against re-hashing with ``sha256sum``; microseconds.
- load_npy: a cached 1 GB array by memory map against ``np.load(mmap_mode='r')`` of a plain file;
  target <= 10 ms, measured with the stamp in memory and read from disk (a fresh process).

Set ``KT_BENCH_STORE_BYTES`` to try another size.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import kachery_tasks as kt
from kachery_tasks.store import current_store

from ._common import row

SIZE = int(os.environ.get("KT_BENCH_STORE_BYTES", 2**30))


def _make_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    block = 64 * 2**20
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(block, left)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kt-bench-store-") as tmp:
        tmp = Path(tmp)
        src = tmp / "big.bin"
        _make_file(src, SIZE)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        gb = SIZE / 1e9

        def peer_store() -> None:
            subprocess.run(["sha256sum", str(src)], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(["cp", str(src), str(tmp / "copy.bin")], check=True)

        peer_s, _ = _timed(peer_store)
        with kt.config.set(home=str(tmp / "home")):
            ours_s, uri = _timed(lambda: kt.store_file(src))
            rows.append(row(f"store {SIZE / 2**30:.2g} GiB", ours_s, "sha256sum + cp", peer_s,
                             note=f"{gb / ours_s:.2f} GB/s (peer {gb / peer_s:.2f} GB/s); ours fsyncs",
                             target=">= 1.2 GB/s"))

            again_s, _ = _timed(lambda: kt.store_file(src))
            hash_s, _ = _timed(lambda: subprocess.run(["sha256sum", str(src)], stdout=subprocess.DEVNULL,
                                                      check=True))
            rows.append(row("re-store (already stored)", again_s, "sha256sum", hash_s,
                             note=f"{gb / again_s:.2f} GB/s, no second copy"))

            kt.load_file(uri)
            load_s = _median_time(lambda: kt.load_file(uri), 200)
            rows.append(row("load_file (stamp)", load_s, "sha256sum (re-verify)", hash_s,
                             note=f"{load_s * 1e6:.0f} µs"))

            array = np.random.default_rng(1).standard_normal(SIZE // 8)
            npy_uri = kt.store_npy(array)
            plain = tmp / "plain.npy"
            np.save(plain, array)
            del array
            kt.load_npy(npy_uri)
            warm_s = _median_time(lambda: kt.load_npy(npy_uri), 50)
            peer_npy = _median_time(lambda: np.load(plain, mmap_mode="r"), 50)
            rows.append(row("load_npy 1 GB (stamp in memory)", warm_s, "np.load mmap", peer_npy,
                             note=f"{warm_s * 1e3:.2f} ms", target="<= 10 ms"))

            blobs = current_store().blobs

            def cold() -> None:
                blobs._stamps.clear()  # as in a fresh process: the stamp is read from disk
                kt.load_npy(npy_uri)

            cold_s = _median_time(cold, 50)
            rows.append(row("load_npy 1 GB (stamp from disk)", cold_s, "np.load mmap", peer_npy,
                             note=f"{cold_s * 1e3:.2f} ms", target="<= 10 ms"))
        shutil.rmtree(tmp / "home", ignore_errors=True)
    return rows
