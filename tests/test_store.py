"""The local store: round trips, idempotence, links, damage and quarantine, races, crashes, URIs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

import kachery_tasks as kt
from kachery_tasks.store import CHUNK_SIZE, BlobStore, current_store, parse_file_uri


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _blob_files(home: Path) -> list[Path]:
    base = home / "store" / "sha256"
    return sorted(p for p in base.rglob("*") if p.is_file() and len(p.name) == 64) if base.exists() else []


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE + 12345])
def test_round_trip(home: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    src = _write(home / "data" / "in.bin", data)
    uri = kt.store_file(src)
    digest = hashlib.sha256(data).hexdigest()
    assert uri == f"sha256://{digest}?label=in.bin"
    assert kt.load_file(uri).read_bytes() == data
    assert kt.load_bytes(uri) == data
    info = kt.file_info(uri)
    assert info["size"] == size and info["sha256"] == digest
    manifest = current_store().blobs.manifest_path(digest)
    if size > CHUNK_SIZE:
        m = current_store().blobs.manifest(digest)
        assert m is not None and m.size == size and m.sha256 == digest
        assert len(m.chunks) == 2 == info["chunks"]
        for chunk in m.chunks:
            assert chunk.xxh3_128 == xxhash.xxh3_128(data[chunk.offset : chunk.offset + chunk.size]).hexdigest()
        assert [c.size for c in m.chunks] == [CHUNK_SIZE, 12345]
    else:
        assert not manifest.exists()
        assert info["chunks"] == 1


def test_bytes_json_npy_round_trip() -> None:
    assert kt.load_bytes(kt.store_bytes(b"abc")) == b"abc"
    value = {"a": [1, 2.5, None, "x"], "b": True}
    assert kt.load_json(kt.store_json(value, label="v.json")) == value
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    loaded = kt.load_npy(kt.store_npy(array))
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
    with pytest.raises(kt.UserError, match="not a JSON file"):
        kt.load_json(kt.store_bytes(b"\xff\x00"))


def test_store_json_refuses_what_would_not_load_back_and_says_what_to_do() -> None:
    for value, where in [((1, 2), "value is the tuple"), ({"a": [1, (2,)]}, "value['a'][1] is the tuple"),
                         ({1: "x"}, "the key 1 of value"), (float("nan"), "value is the float nan")]:
        with pytest.raises(kt.CodecError) as info:
            kt.store_json(value)
        message = str(info.value)
        assert where in message and "convert it first" in message
        assert "codec=" not in message  # store_json takes no codec
    assert current_store().blobs.total_size() == (0, 0)


def test_restore_is_idempotent(home: Path) -> None:
    src = _write(home / "data" / "f.bin", os.urandom(4096))
    uri = kt.store_file(src)
    blob = kt.load_file(uri)
    before = blob.stat()
    time.sleep(0.01)
    assert kt.store_file(src) == uri
    after = blob.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert len(_blob_files(home)) == 1
    assert list((home / "store" / "tmp").iterdir()) == []


def test_link_true_shares_inode_and_detects_edits(home: Path) -> None:
    src = _write(home / "data" / "linked.bin", b"linked content" * 100)
    uri = kt.store_file(src, link=True)
    blob = kt.load_file(uri)
    assert blob.stat().st_ino == src.stat().st_ino
    assert kt.load_bytes(uri) == b"linked content" * 100
    # The documented caveat: editing the source in place damages the blob; the next read sees it.
    with open(src, "r+b") as fh:
        fh.write(b"X")
    with pytest.raises(kt.IntegrityError):
        kt.load_bytes(uri)
    assert not blob.exists()


def _flip_byte(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # whatever the clock granularity


def test_corrupted_blob_is_quarantined_and_repaired(home: Path) -> None:
    data = os.urandom(10_000)
    src = _write(home / "data" / "good.bin", data)
    uri = kt.store_file(src)
    blob = kt.load_file(uri)
    _flip_byte(blob, 5000)
    with pytest.raises(kt.IntegrityError, match="do not match"):
        kt.load_bytes(uri)
    assert not blob.exists()
    quarantined = list((home / "store" / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() != data
    with pytest.raises(kt.NotFoundError):
        kt.load_file(uri)
    assert kt.store_file(src) == uri  # storing the right bytes again repairs the store
    assert kt.load_bytes(uri) == data


def test_corruption_seen_by_a_fresh_store_and_by_rehash(home: Path) -> None:
    data = os.urandom(3000)
    uri = kt.store_bytes(data)
    digest = parse_file_uri(uri).sha256
    path = current_store().blobs.path(digest)
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(b"\x00\x01\x02")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the stamp still matches
    fresh = BlobStore(home / "store")
    with pytest.raises(kt.IntegrityError):
        fresh.verified_path(digest, rehash=True)  # what `kachery verify` does
    assert not path.exists()


def test_damaged_blob_is_replaced_by_a_new_store(home: Path) -> None:
    data = b"payload" * 50
    uri = kt.store_bytes(data)
    blob = kt.load_file(uri)
    _flip_byte(blob)
    assert kt.store_bytes(data) == uri  # _install sees the damage, quarantines it, installs the good copy
    assert kt.load_bytes(uri) == data


_STORER = """
import sys, kachery_tasks as kt
print(kt.store_file(sys.argv[1]))
"""


def test_concurrent_storers_leave_one_valid_blob(home: Path, env: dict) -> None:
    data = os.urandom(3 * 2**20 + 7)
    src = _write(home / "data" / "shared.bin", data)
    procs = [
        subprocess.Popen([sys.executable, "-c", _STORER, str(src)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    blobs = _blob_files(home)
    assert len(blobs) == 1 and blobs[0].read_bytes() == data
    assert list((home / "store" / "tmp").iterdir()) == []
    assert kt.load_bytes(outs[0]) == data


_SLOW_WRITER = """
import os, sys, time
from kachery_tasks.store import current_store
marker = sys.argv[1]
def blocks():
    for i in range(1000):
        yield os.urandom(1 << 20)
        if i == 3:
            open(marker, "w").close()
        time.sleep(0.02)
current_store().blobs.put_stream(blocks())
"""


def test_killed_writer_leaves_no_partial_blob(home: Path, env: dict) -> None:
    marker = home / "started"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _blob_files(home) == []  # partial bytes only ever sit in store/tmp
    leftovers = list((home / "store" / "tmp").iterdir())
    assert all(p.name.startswith("blob-") for p in leftovers)


@pytest.mark.parametrize(
    "uri",
    [
        "sha256://../../etc/passwd",
        "sha256://" + "A" * 64,
        "sha256://" + "a" * 63,
        "sha256://" + "a" * 65,
        "sha256://" + "a" * 64 + "?label=x&evil=1",
        "sha256://" + "a" * 64 + "/../x",
        "md5://" + "a" * 32,
        "/etc/passwd",
        "",
    ],
)
def test_malformed_uris_are_rejected(uri: str) -> None:
    with pytest.raises(kt.InvalidURI):
        parse_file_uri(uri)
    with pytest.raises(kt.InvalidURI):
        kt.load_file(uri)


@pytest.mark.parametrize("value", [None, 123, b"sha256://" + b"a" * 64, ["sha256://" + "a" * 64]])
def test_non_string_uris_are_rejected(value) -> None:
    with pytest.raises(kt.InvalidURI):
        kt.load_bytes(value)


def test_unknown_hash_is_not_found() -> None:
    uri = "sha256://" + "0" * 64
    for fn in (kt.load_file, kt.load_bytes, kt.file_info):
        with pytest.raises(kt.NotFoundError, match="not found in this node's store"):
            fn(uri)


def test_store_refuses_missing_file_and_directory(home: Path) -> None:
    with pytest.raises(kt.UserError, match="not found"):
        kt.store_file(home / "missing.bin")
    with pytest.raises(kt.UserError, match="directory"):
        kt.store_file(home)


def test_read_only_refuses_writes() -> None:
    with kt.config.set(read_only=True), pytest.raises(kt.ReadOnlyStoreError):
        kt.store_bytes(b"x")


def test_streamed_reads_of_sound_blobs(home: Path, kachery) -> None:
    """`cat` and `load -o` hash what they stream (tests/test_verified_reads.py for damage): sound
    blobs of every shape come out whole, and a manifest that is wrong about a sound blob fails
    nothing and quarantines nothing (the blob is hashed whole instead)."""
    big = os.urandom(2 * CHUNK_SIZE + 5)
    for data in (b"", b"small", os.urandom(CHUNK_SIZE), big):
        uri = kt.store_bytes(data)
        proc = kachery("cat", uri)
        assert proc.returncode == 0 and proc.stdout == data, proc.stderr
    digest = hashlib.sha256(big).hexdigest()
    manifest = current_store().blobs.manifest_path(digest)
    os.chmod(manifest, 0o644)
    manifest.write_text(manifest.read_text().replace('"xxh3_128":"', '"xxh3_128":"0', 1))
    proc = kachery("cat", f"sha256://{digest}")
    assert proc.returncode == 0 and proc.stdout == big, proc.stderr
    target = home / "copy.bin"
    proc = kachery("load", f"sha256://{digest}", "-o", str(target))
    assert proc.returncode == 0 and target.read_bytes() == big, proc.stderr
    assert not (home / "store" / "quarantine").exists()


def test_a_full_read_stamps_the_blob(home: Path) -> None:
    """load_bytes hashes every byte; a match leaves a stamp (with ctime) so the next map skips it."""
    uri = kt.store_bytes(b"stamp me" * 100)
    blobs = BlobStore(home / "store")  # a fresh process's view: no stamps remembered in memory
    digest = parse_file_uri(uri).sha256
    stamp = blobs.path(digest).with_suffix(".ok")
    stamp.unlink()
    assert blobs.read_bytes(digest) == b"stamp me" * 100
    st = blobs.path(digest).stat()
    assert json.loads(stamp.read_text()) == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                             "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
