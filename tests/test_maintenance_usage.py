"""``kachery du`` and ``kachery verify [--repair]`` (issue 26, first slice): usage numbers against a
store built here with known sizes and wall seconds, and the scrub and repair against real damage,
through the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_support import one_error_line

import kachery_tasks as kt
from kachery_tasks import config, pure
from kachery_tasks.identity import node_identity, sign_document
from kachery_tasks.store import current_store, parse_file_uri
from kachery_tasks.store.task_record import TaskRecord
from kachery_tasks.store.usage import summarize

Kachery = Callable[..., subprocess.CompletedProcess]


@pure
def make_array(n: int) -> np.ndarray:
    return np.arange(n, dtype="float64")


@pure
def make_dict(x: int) -> dict:
    return {"x": x}


def rewrite(task_id: str, **changes) -> None:
    """Give a record known provenance (``wall_s``) or ``created``, signed again by this node."""
    records = current_store().records
    data = records.read(task_id).to_json()
    if "wall_s" in changes:
        data["provenance"]["wall_s"] = changes.pop("wall_s")
    data.update(changes)
    records.write(TaskRecord.from_json(sign_document(node_identity(config.home()).keys, data)))


def result_sha(task_id: str) -> str:
    return current_store().records.read(task_id).result.sha256


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def built(home: Path) -> dict:
    """Three array results (8000, 80000 and 800 bytes of data), two inline dicts, one file stored
    directly; known wall seconds; one array record written 10 days ago."""
    ids = {n: make_array.task_id(n) for n in (1000, 10000, 100)}
    for n in ids:
        make_array(n)
    dicts = [make_dict.task_id(x) for x in range(2)]
    for x in range(2):
        make_dict(x)
    for task_id, wall in zip(ids.values(), (10.0, 100.0, 1.0), strict=True):
        rewrite(task_id, wall_s=wall)
    rewrite(ids[100], created=time.time() - 10 * 86400)
    for task_id in dicts:
        rewrite(task_id, wall_s=0.5)
    plain = kt.store_bytes(b"x" * 1234)
    return {"arrays": ids, "dicts": dicts, "file": parse_file_uri(plain).sha256}


def test_du_numbers_match_the_store(built: dict, home: Path) -> None:
    usage = summarize(current_store())
    blobs = current_store().blobs
    sizes = {n: blobs.size(result_sha(t)) for n, t in built["arrays"].items()}
    assert sizes[1000] == 8000 + 128 and sizes[10000] == 80000 + 128  # npy: a 128-byte header
    assert (usage.blobs, usage.blob_bytes) == (4, sum(sizes.values()) + 1234)
    assert (usage.records, usage.failed_records, usage.unreadable_records, usage.missing_results) == (5, 0, 0, 0)
    assert usage.saved_s == pytest.approx(10 + 100 + 1 + 2 * 0.5)
    record_files = list((home / "tasks" / "kt1").rglob("*.json"))
    assert usage.record_bytes == sum(p.stat().st_size for p in record_files)
    assert usage.disk_bytes >= usage.blob_bytes + usage.record_bytes
    by_function = {g.name: g for g in usage.by_function}
    arrays, dicts = by_function[make_array.name], by_function[make_dict.name]
    assert (arrays.records, arrays.blobs, arrays.bytes, arrays.saved_s) == (3, 3, sum(sizes.values()), 111.0)
    assert (dicts.records, dicts.blobs, dicts.bytes, dicts.saved_s) == (2, 0, 0, 1.0)
    assert [g.name for g in usage.by_function] == [make_array.name, make_dict.name]  # most saved first
    kinds = {g.name: g for g in usage.by_kind}
    assert (kinds["pure records"].records, kinds["npy results"].blobs, kinds["other files"].bytes) == (5, 3, 1234)
    assert kinds["npy results"].records is None
    ages = {g.name: g for g in usage.by_age}
    assert (ages["today"].records, ages["this month"].records, ages["older"].records) == (4, 1, 0)
    assert ages["this month"].saved_s == 1.0 and ages["today"].blobs == 4  # blobs by their own write time
    assert [r.bytes for r in usage.largest] == sorted(sizes.values(), reverse=True)
    assert usage.largest[0].task_id == built["arrays"][10000] and usage.largest[0].wall_s == 100.0


def test_du_json_shape_and_bad_by_is_one_line(built: dict, kachery: Kachery) -> None:
    report = json.loads(ok(kachery("du", "--json")))
    assert set(report) == {"home", "disk_bytes", "blobs", "records", "other_bytes", "saved_s", "largest"}
    assert report["blobs"]["count"] == 4 and report["records"]["count"] == 5
    assert set(report["largest"][0]) == {"task_id", "function", "kind", "uri", "bytes", "wall_s"}
    for by in ("function", "kind", "age"):
        grouped = json.loads(ok(kachery("du", "--by", by, "--json")))
        assert grouped["by"] == by
        assert all(set(g) == {"name", "records", "blobs", "bytes", "saved_s"} for g in grouped["groups"])
    assert [g["name"] for g in grouped["groups"]] == ["today", "this week", "this month", "older"]
    text = ok(kachery("du", "--by", "function"))
    assert "records: 5, 0 failed" in text and make_array.name in text and "largest results" in text
    line = one_error_line(kachery("du", "--by", "size"))
    assert "function, kind or age" in line and "'size'" in line


def test_du_counts_an_unreadable_record_and_moves_nothing(built: dict, home: Path, kachery: Kachery) -> None:
    path = current_store().records.path(built["dicts"][0])
    path.write_bytes(b"{not json")
    os.unlink(current_store().blobs.path(result_sha(built["arrays"][100])))
    report = json.loads(ok(kachery("du", "--json")))
    assert report["records"]["unreadable"] == 1 and report["records"]["missing_results"] == 1
    assert path.exists()  # du changes nothing


def damage(sha256: str) -> None:
    """Flip a byte of a blob and set its times back, so its verified stamp still matches and only a
    re-hash can see it (bit rot)."""
    path = current_store().blobs.path(sha256)
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_finds_a_flipped_byte_and_a_record_missing_its_blob(built: dict, home: Path, kachery: Kachery) -> None:
    report = json.loads(ok(kachery("verify", "--json")))
    assert report["broken"] == 0 and report["records"] == {"checked": 5, "problems": []}
    flipped, lost = result_sha(built["arrays"][1000]), result_sha(built["arrays"][100])
    damage(flipped)
    os.unlink(current_store().blobs.path(lost))
    proc = kachery("verify", "--json")
    line = one_error_line(proc)
    assert "1 damaged blob(s)" in line and "miss their result blob" in line and "--repair" in line
    report = json.loads(proc.stdout)
    assert [d["sha256"] for d in report["damaged"]] == [flipped]
    problems = {(p["task_id"], p["problem"]) for p in report["records"]["problems"]}
    # the damaged blob is quarantined first, so its record misses it too
    assert problems == {(built["arrays"][1000], "missing result blob"), (built["arrays"][100], "missing result blob")}
    assert not current_store().blobs.exists(flipped)
    assert any(p.name.startswith(flipped) for p in (home / "store" / "quarantine").iterdir())


def test_verify_quarantines_bad_records(built: dict, home: Path, kachery: Kachery) -> None:
    records = current_store().records
    unparsable, forged = built["dicts"]
    records.path(unparsable).write_bytes(b"{not json")
    data = json.loads(records.path(forged).read_bytes())
    data["result"]["inline"] = {"x": 666}  # changed after signing
    records.path(forged).write_text(json.dumps(data))
    proc = kachery("verify")
    assert "2 bad record(s) quarantined" in one_error_line(proc)
    out = proc.stdout.decode()
    assert f"record {forged}: bad signature" in out and f"record {unparsable}: unreadable" in out
    assert not records.path(unparsable).exists() and not records.path(forged).exists()
    assert len(list((home / "tasks" / "quarantine").iterdir())) == 2
    assert json.loads(ok(kachery("verify", "--json")))["broken"] == 0  # set aside: the store is sound again


def test_repair_restores_from_a_directory_bucket_and_says_what_it_cannot(built: dict, tmp_path: Path,
                                                                         kachery: Kachery) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    env = {"KACHERY_TASKS_BUCKET": bucket.as_uri()}
    published, unpublished = built["arrays"][10000], built["arrays"][1000]
    with config.set(bucket=bucket.as_uri()):
        kt.publish(published)
    assert "1 blob(s) (1 new)" in ok(kachery("publish", f"sha256://{built['file']}", extra_env=env))
    good, bad, file = result_sha(published), result_sha(unpublished), built["file"]
    damage(good)
    damage(bad)
    damage(file)
    with pytest.raises(kt.errors.IntegrityError):  # a read found it earlier: quarantined before verify runs
        kt.load_bytes(f"sha256://{file}")
    plain = kachery("verify")  # without --repair: finds the other two, and notes the one quarantined earlier
    assert "2 damaged blob(s)" in one_error_line(plain)
    assert "1 blob(s) quarantined earlier" in plain.stdout.decode()

    proc = kachery("verify", "--repair", extra_env=env)
    out = proc.stdout.decode()
    assert f"repaired sha256://{good} from {bucket.as_uri()}" in out
    assert f"repaired sha256://{file} from {bucket.as_uri()}" in out  # quarantined earlier, by a read
    assert f"not repaired sha256://{bad}: not in {bucket.as_uri()}" in out
    assert "1 record(s) miss their result blob" in one_error_line(proc)
    blobs = current_store().blobs
    assert blobs.exists(good) and blobs.exists(file) and not blobs.exists(bad)
    blobs.scrub(good)  # the repaired copies hash right
    assert kt.load_bytes(f"sha256://{file}") == b"x" * 1234
    assert make_array(10000)[-1] == 9999.0

    # still broken, and said so again: the record whose blob no bucket has
    again = kachery("verify", "--repair", "--json", extra_env=env)
    assert again.returncode == 1
    report = json.loads(again.stdout)
    assert report["damaged"] == [] and [r["sha256"] for r in report["not_repaired"]] == [bad]
    assert [(p["task_id"], p["problem"]) for p in report["records"]["problems"]] == [(unpublished,
                                                                                       "missing result blob")]


def test_repair_without_a_bucket_is_one_line(built: dict, kachery: Kachery) -> None:
    line = one_error_line(kachery("verify", "--repair"))
    assert "no" in line and "bucket" in line and "kachery config set bucket" in line


def test_verify_shows_a_bar_with_a_rate_on_a_terminal(built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared progress bar (cli/output.py), on stderr only when it is a terminal."""
    import io

    from click.testing import CliRunner
    from rich.console import Console

    from kachery_tasks.cli import main, output

    screen = io.StringIO()
    monkeypatch.setattr(output, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=160))
    with config.set(progress_min_bytes=1000):
        result = CliRunner().invoke(main, ["verify"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "verifying blobs" in screen.getvalue() and "/s" in screen.getvalue()  # bytes, speed, objects
    assert "MB/s" in result.output  # and the rate in the summary line, terminal or not
