"""Verified reads: no read hands out a byte that does not match its hash (docs/files.md).

Damage is made the way it looks on a disk: one byte flipped, the blob's mtime put back. Bit rot goes
further and leaves the whole verified stamp as it was; ``_rot(..., restamp=True)`` re-stamps the
damaged blob to show what a stamp cannot see and what the reads that hash as they go still catch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from execution_log import note, runs

import kachery_tasks as kt
from kachery_tasks.store import CHUNK_SIZE, BlobStore, current_store, parse_file_uri
from kachery_tasks.store.blobs import Stamp
from kachery_tasks.tasks import MEMORY, pure


def _blob(uri: str) -> Path:
    return current_store().blobs.path(parse_file_uri(uri).sha256)


def _rot(uri: str, offset: int, xor: int = 0xFF, *, restamp: bool = False) -> Path:
    """Flip bits of one byte of ``uri``'s blob and put its mtime back; with ``restamp``, also make
    its verified stamp vouch for the damaged bytes (bit rot changes none of size, mtime, ctime)."""
    path = _blob(uri)
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ xor]))
    os.chmod(path, 0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    if restamp:
        current_store().blobs._write_stamp(parse_file_uri(uri).sha256, Stamp.of(path.stat()))
    return path


def _quarantined(home: Path) -> list[Path]:
    directory = home / "store" / "quarantine"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _one_line_error(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert err.startswith("kachery: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- kachery cat ----------------------------------------------------------------------------------
def test_cat_refuses_a_flipped_byte_with_mtime_put_back(home: Path, kachery) -> None:
    data = os.urandom(10_000)
    uri = kt.store_bytes(data)
    kt.load_file(uri)  # verified once: the blob has a stamp
    path = _rot(uri, 1)
    proc = kachery("cat", uri)
    err = _one_line_error(proc)
    assert proc.stdout == b""
    assert "do not match" in err
    assert not path.exists() and len(_quarantined(home)) == 1


def test_cat_refuses_bit_rot_under_a_stamp_that_vouches(home: Path, kachery) -> None:
    data = os.urandom(5000)
    uri = kt.store_bytes(data)
    _rot(uri, 4999, restamp=True)
    proc = kachery("cat", uri)
    _one_line_error(proc)
    assert proc.stdout == b""
    assert len(_quarantined(home)) == 1


def test_cat_of_a_large_blob_stops_before_the_damaged_chunk(home: Path, kachery) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 1000)
    uri = kt.store_bytes(data)
    _rot(uri, CHUNK_SIZE + 7, restamp=True)  # in the second chunk
    proc = kachery("cat", uri)
    _one_line_error(proc)
    assert proc.stdout == data[:CHUNK_SIZE]  # the first chunk checked out; nothing after it was written
    assert len(_quarantined(home)) == 1


def test_cat_of_a_large_blob_without_manifest_hashes_it_first(home: Path, kachery) -> None:
    data = os.urandom(CHUNK_SIZE + 1000)
    uri = kt.store_bytes(data)
    current_store().blobs.manifest_path(parse_file_uri(uri).sha256).unlink()
    _rot(uri, CHUNK_SIZE + 999, restamp=True)  # the very last byte
    proc = kachery("cat", uri)
    _one_line_error(proc)
    assert proc.stdout == b""
    assert len(_quarantined(home)) == 1


def test_cat_catches_a_forgery_that_rewrote_the_manifest_too(home: Path, kachery) -> None:
    """Chunk hashes live in the same store as the blob: a forger can rewrite both. The SHA-256 of the
    whole, checked at the end, still fails the command; the line says the output is not the file."""
    data = os.urandom(CHUNK_SIZE + 1000)
    uri = kt.store_bytes(data)
    digest = parse_file_uri(uri).sha256
    path = _rot(uri, 3, restamp=True)
    from kachery_tasks.store.manifest import ChunkHasher

    hasher = ChunkHasher()
    hasher.update(path.read_bytes())
    forged = hasher.manifest(digest)
    manifest = current_store().blobs.manifest_path(digest)
    os.chmod(manifest, 0o644)
    manifest.write_text(forged.to_json())
    proc = kachery("cat", uri)
    err = _one_line_error(proc)
    assert "standard output" in err
    assert len(proc.stdout) == len(data) and proc.stdout != data
    assert len(_quarantined(home)) == 1


def test_load_output_copy_refuses_rot_and_leaves_no_file(home: Path, kachery, tmp_path: Path) -> None:
    uri = kt.store_bytes(os.urandom(3000))
    _rot(uri, 10, restamp=True)
    target = tmp_path / "out"
    target.mkdir()
    proc = kachery("load", uri, "-o", str(target / "copy.bin"))
    _one_line_error(proc)
    assert list(target.iterdir()) == []  # neither the copy nor its temp file
    assert len(_quarantined(home)) == 1


# -- load_bytes, load_json --------------------------------------------------------------------------
def test_load_bytes_and_load_json_raise_integrity_error(home: Path) -> None:
    value = {"threshold": 1234, "labels": list(range(100))}
    uri = kt.store_json(value)
    kt.load_json(uri)
    offset = _blob(uri).read_bytes().index(b"1234") + 3
    _rot(uri, offset, xor=0x01)  # "1234" -> "1235": still JSON, another value
    with pytest.raises(kt.IntegrityError, match="do not match"):
        kt.load_json(uri)
    assert len(_quarantined(home)) == 1
    with pytest.raises(kt.NotFoundError):
        kt.load_json(uri)

    raw = kt.store_bytes(b"raw bytes " * 100)
    _rot(raw, 0, restamp=True)
    with pytest.raises(kt.IntegrityError):
        kt.load_bytes(raw)
    assert len(_quarantined(home)) == 2


def test_a_stamp_vouches_for_paths_and_maps_only(home: Path) -> None:
    """What each kind of read checks: ``load_file`` and memory maps trust a stamp that matches (the
    documented limit: ``kachery verify`` is the scrub for rot under it); reads of every byte hash."""
    np = pytest.importorskip("numpy")
    uri = kt.store_npy(np.arange(1000, dtype=np.int64))
    _rot(uri, 200, restamp=True)
    assert kt.load_file(uri).exists()
    assert kt.load_npy(uri).shape == (1000,)
    with pytest.raises(kt.IntegrityError):
        kt.load_bytes(uri)
    assert len(_quarantined(home)) == 1


# -- stamps ---------------------------------------------------------------------------------------
def test_a_ctime_change_alone_forces_a_rehash(home: Path) -> None:
    uri = kt.store_bytes(os.urandom(4000))
    path = _rot(uri, 100, restamp=True)
    assert kt.load_file(uri) == path  # the stamp vouches: the fast path serves the path unhashed
    os.chmod(path, 0o444)  # same mode, same bytes, same mtime: only ctime moves
    with pytest.raises(kt.IntegrityError):
        kt.load_file(uri)
    assert not path.exists() and len(_quarantined(home)) == 1


def test_a_stamp_without_ctime_is_unverified_not_an_error(home: Path) -> None:
    good = kt.store_bytes(b"good bytes" * 10)
    bad = kt.store_bytes(b"bad bytes" * 10)
    bad_path = _rot(bad, 5)
    for uri in (good, bad):  # stamps as older versions wrote them, matching the blob as it is now
        st = _blob(uri).stat()
        stamp = current_store().blobs.path(parse_file_uri(uri).sha256).with_suffix(".ok")
        stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}))
    fresh = BlobStore(home / "store")  # no stamps remembered in memory
    with pytest.raises(kt.IntegrityError):
        fresh.verified_path(parse_file_uri(bad).sha256)
    assert not bad_path.exists()
    good_digest = parse_file_uri(good).sha256
    assert fresh.verified_path(good_digest).read_bytes() == b"good bytes" * 10
    rewritten = json.loads(fresh.path(good_digest).with_suffix(".ok").read_text())
    assert rewritten["ctime_ns"] == fresh.path(good_digest).stat().st_ctime_ns


# -- task results -----------------------------------------------------------------------------------
def test_pure_results_whose_blob_rotted_are_recomputed(home: Path, tmp_path: Path) -> None:
    log = str(tmp_path / "calls.txt")

    @pure
    def numbers(n):
        note(log, "numbers")
        return list(range(n))  # json, over inline_max_bytes: a blob

    @pure
    def payload(n):
        note(log, "payload")
        return {"payload": b"A" * n}  # not JSON: pickle, a blob

    assert numbers(5000)[1234] == 1234
    assert payload(20_000)["payload"] == b"A" * 20_000
    records = current_store().records
    json_uri = records.read(numbers.task_id(5000)).result.uri
    pickle_uri = records.read(payload.task_id(20_000)).result.uri
    assert records.read(numbers.task_id(5000)).result.codec == "json"
    assert records.read(payload.task_id(20_000)).result.codec == "pickle"
    _rot(json_uri, _blob(json_uri).read_bytes().index(b"1234") + 3, xor=0x01, restamp=True)  # 1234 -> 1235
    _rot(pickle_uri, _blob(pickle_uri).read_bytes().index(b"AAAA") + 100, xor=0x01, restamp=True)  # A -> @
    MEMORY.clear()
    assert numbers(5000) == list(range(5000))
    assert payload(20_000)["payload"] == b"A" * 20_000
    assert sorted(runs(log)) == ["numbers", "numbers", "payload", "payload"]
    assert len(_quarantined(home)) == 2  # the rotted blobs, kept for inspection
    assert len(list((home / "tasks" / "quarantine").iterdir())) == 2  # the records set aside
    for uri in (json_uri, pickle_uri):  # the recompute stored the right bytes again
        assert current_store().blobs.verified_path(parse_file_uri(uri).sha256, rehash=True).exists()
