"""Typed task records (store/task_record.py): real records, written by the real code paths, parse
into a TaskRecord and back to exactly the same JSON; unknown fields survive with their signature;
invalid records are refused with a message naming the problem, and set aside by the store."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orjson
import pytest
from execution_log import note, runs

import kachery_tasks as kt
from kachery_tasks import config
from kachery_tasks.errors import InvalidRecord
from kachery_tasks.identity import node_identity, sign_document
from kachery_tasks.store import current_store
from kachery_tasks.store import task_record as task_record_module
from kachery_tasks.store.task_record import RECORD_VERSION, TaskRecord
from kachery_tasks.tasks import MEMORY, pure


def _raw(task_id: str, failure: bool = False) -> dict:
    """A record's JSON as it is on disk."""
    records = current_store().records
    return orjson.loads((records.failure_path(task_id) if failure else records.path(task_id)).read_bytes())


def _round_trips(data: dict) -> TaskRecord:
    record = TaskRecord.from_json(copy.deepcopy(data))
    assert record.to_json() == data
    assert orjson.dumps(record.to_json()) == orjson.dumps(data)  # same keys in the same order, too
    assert record.verify_signature()
    return record


@pure
def inline_json(x, scale=2.0):
    return {"x": x * scale}


@pure
def inline_pickle(x):
    return {x, x + 1}  # a set: no JSON form


@pure
def big_json(n):
    return list(range(n))


@pure
def array_of(n):
    return np.arange(n, dtype=np.float64)


@pure
def total(x):
    return float(np.asarray(x).sum())


@pure
def size_of_file(f):
    return len(f.read_bytes())


@pure
def count(items):
    return len(items)


@pure
def fails(x):
    raise ValueError(f"no good: {x}")


def test_records_of_every_kind_round_trip_exactly(home, tmp_path):
    inline_json(3)
    record = _round_trips(_raw(inline_json.task_id(3)))
    assert (record.result.codec, record.result.form, record.result.value) == ("json", "inline", {"x": 6.0})
    assert record.record_version == RECORD_VERSION and record.status == "succeeded" and record.error is None
    assert record.args["x"].form == "json" and record.args["scale"].value == 2.0
    assert record.provenance.wall_s >= 0 and record.function.name.endswith("inline_json")

    inline_pickle(4)
    record = _round_trips(_raw(inline_pickle.task_id(4)))
    assert (record.result.codec, record.result.form) == ("pickle", "inline_b64")

    big_json(20_000)
    record = _round_trips(_raw(big_json.task_id(20_000)))
    assert (record.result.codec, record.result.form) == ("json", "uri") and record.result.sha256

    array_of(1000)
    record = _round_trips(_raw(array_of.task_id(1000)))
    assert (record.result.codec, record.result.shape, record.result.dtype) == ("npy", (1000,), "<f8")

    big = np.ones(100_000)  # larger than record_args_max_bytes: kept as a blob
    total(big)
    record = _round_trips(_raw(total.task_id(big)))
    entry = record.args["x"]
    assert (entry.form, entry.codec, entry.size) == ("blob", "npy", entry.size) and entry.blob.startswith("sha256://")

    upstream = array_of.job(10)  # a job argument
    total(upstream)
    record = _round_trips(_raw(total.task_id(upstream)))
    assert record.args["x"].job == upstream.id and record.upstream == (upstream.id,)

    path = tmp_path / "data.bin"
    path.write_bytes(b"abc" * 10)
    file = kt.File(kt.store_file(path))
    size_of_file(file)
    record = _round_trips(_raw(size_of_file.task_id(file)))
    assert record.args["f"].form == "file" and record.args["f"].file == file.uri

    items = tuple(range(1000))  # no JSON form, and its pickle is over the limit: kept by hash only
    with config.set(record_args_max_bytes=100):
        count(items)
    record = _round_trips(_raw(count.task_id(items)))
    assert record.args["items"].form == "omitted" and "> record_args_max_bytes=100" in record.args["items"].omitted
    assert not record.args["items"].kept


def test_a_failure_record_round_trips_and_rebuilds_its_error(home):
    with pytest.raises(ValueError):
        fails(1)
    record = _round_trips(_raw(fails.task_id(1), failure=True))
    assert record.status == "failed" and record.result is None
    assert record.error.type == "builtins.ValueError" and record.error.message == "no good: 1"
    from kachery_tasks.tasks.recording import rebuild_error

    rebuilt = rebuild_error(record)
    assert isinstance(rebuilt, ValueError) and str(rebuilt) == "no good: 1"


def test_a_script_record_keeps_its_origin(home, env, tmp_path):
    script = tmp_path / "pipe.py"
    script.write_text(textwrap.dedent("""
        import kachery_tasks as kt

        @kt.pure
        def make(n):
            return n + 1

        if __name__ == "__main__":
            print(make.task_id(4), make(4))
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.split()[0]
    record = _round_trips(_raw(task_id))
    assert record.function.module == "__main__"
    assert record.function.origin == {"kind": "script", "path": str(script), "module": "pipe"}


def test_a_record_without_a_version_reads_as_version_1(home):
    inline_json(5)
    data = _raw(inline_json.task_id(5))
    del data["record_version"]  # as records were written before versions were carried
    record = TaskRecord.from_json(data)
    assert record.record_version is None and record.version == 1 and record.to_json() == data


def _resigned(data: dict) -> dict:
    return sign_document(node_identity(current_store().home).keys, data)


def test_an_integer_stays_an_integer(home):
    inline_json(12)
    data = _raw(inline_json.task_id(12))
    data["created"] = int(data["created"])  # a number may be an integer: not read back as 1796...0
    data["provenance"]["wall_s"] = 0
    data = _resigned(data)
    record = TaskRecord.from_bytes(orjson.dumps(data))
    assert type(record.created) is int and orjson.dumps(record.to_json()) == orjson.dumps(data)
    assert record.verify_signature()


def test_unknown_fields_survive_a_round_trip_and_the_signature_still_verifies(home):
    inline_json(6)
    data = _raw(inline_json.task_id(6))
    data["lineage"] = {"from": "a newer writer"}
    data["function"]["entry_point"] = "pkg:main"
    data["args"]["x"]["shape_hint"] = [1]
    data["result"]["compression"] = None
    data["provenance"]["gpu"] = "none"
    data = _resigned(data)
    for record in (TaskRecord.from_json(copy.deepcopy(data)), TaskRecord.from_bytes(orjson.dumps(data))):
        assert record.extra == {"lineage": {"from": "a newer writer"}}
        assert record.function.extra == {"entry_point": "pkg:main"}
        assert record.args["x"].extra == {"shape_hint": [1]} and record.args["scale"].extra == {}
        assert record.result.extra == {"compression": None}
        assert record.provenance["gpu"] == "none" and "gpu" in record.provenance and record.provenance.wall_s >= 0
        assert record.to_json() == data  # the same fields; a newer writer's may come back in another order
        assert record.verify_signature()


def test_unknown_fields_of_a_failure_survive_too(home):
    with pytest.raises(ValueError):
        fails(2)
    data = _raw(fails.task_id(2), failure=True)
    data["error"]["cause"] = "ValueError"
    data = _resigned(data)
    record = TaskRecord.from_bytes(orjson.dumps(data))
    assert record.error.extra == {"cause": "ValueError"} and record.extra == {}
    assert record.to_json() == data and record.verify_signature()


def test_a_tampered_record_fails_its_signature(home):
    inline_json(7)
    data = _raw(inline_json.task_id(7))
    assert TaskRecord.from_json(data).verify_signature()
    data["result"]["value"] = 1  # an extra field: still a valid record, no longer what was signed
    assert not TaskRecord.from_json(data).verify_signature()
    data = _raw(inline_json.task_id(7))
    data["result"]["inline"] = {"x": 1e9}
    assert not TaskRecord.from_json(data).verify_signature()
    data = _raw(inline_json.task_id(7))
    data["node_id"] = "0" * 64  # someone else's name on it
    assert not TaskRecord.from_json(data).verify_signature()


def _broken(change, data: dict) -> dict:
    data = copy.deepcopy(data)
    change(data)
    return data


@pytest.fixture
def good(home) -> dict:
    inline_json(8)
    return _raw(inline_json.task_id(8))


INVALID = {
    "missing field": (lambda d: d["function"].pop("code_hash"), "missing field 'function.code_hash'"),
    "missing top-level field": (lambda d: d.pop("created"), "missing field 'created'"),
    "wrong type": (lambda d: d.update(created="yesterday"), "created: expected `int | float`, got `str`"),
    "wrong nested type": (lambda d: d["provenance"].update(wall_s=None),
                          "provenance.wall_s: expected `int | float`, got `null`"),
    "wrong type in an entry": (lambda d: d["args"]["x"].update(pickle=3) or d["args"]["x"].pop("json"),
                               "args['x'].pickle: expected `str`, got `int`"),
    "unknown status": (lambda d: d.update(status="done"), "unknown status 'done' (succeeded or failed)"),
    "malformed task id": (lambda d: d.update(task_id="ABC123"), "task_id is not 32 lowercase hex"),
    "uppercase task id": (lambda d: d.update(task_id=d["task_id"].upper()), "is not 32 lowercase hex"),
    "malformed upstream": (lambda d: d.update(upstream=["A" * 32]), "upstream 'AAAA"),
    "malformed job": (lambda d: d["args"]["x"].update(job="z" * 32) or d["args"]["x"].pop("json"), "args['x'].job 'zzzz"),
    "unknown scheme": (lambda d: d.update(scheme="kt2"), "unknown scheme 'kt2'"),
    "unknown kind": (lambda d: d.update(kind="daily"), "unknown kind 'daily'"),
    "malformed arg hash": (lambda d: d["args"]["x"].update(hash="x" * 32), "args['x'].hash 'xxxx"),
    "two result forms": (lambda d: d["result"].update(uri="sha256://" + "a" * 64),
                         "result has 2 forms (inline and uri); a result has exactly one"),
    "two arg forms": (lambda d: d["args"]["x"].update(pickle="gAU="), "args['x'] has 2 forms (json and pickle)"),
    "codec without a blob": (lambda d: d["args"]["x"].update(codec="npy"), "args['x'] has codec or size"),
    "blob without codec": (lambda d: d["args"]["x"].update(blob="sha256://" + "a" * 64) or d["args"]["x"].pop("json"),
                           "missing field \"args['x'].codec\""),
    "inline npy": (lambda d: d["result"].update(codec="npy"), "result.inline holds json, not npy"),
    "bad result uri": (lambda d: d["result"].update(uri="sha256://abc") or d["result"].pop("inline"), "result.uri"),
    "bad origin": (lambda d: d["function"].update(origin={"kind": "cloud"}), "function.origin.kind 'cloud'"),
    "no arg form": (lambda d: d["args"]["x"].pop("json"), "args['x'] has no value form"),
    "result of a failure": (lambda d: d.update(status="failed"), "missing field 'error'"),
    "unknown codec": (lambda d: d["result"].update(codec="msgpack"), "result.codec: invalid enum value 'msgpack'"),
    "newer version": (lambda d: d.update(record_version=RECORD_VERSION + 1),
                      f"written by a newer kachery-tasks (record_version {RECORD_VERSION + 1}; this one reads up to "
                      f"{RECORD_VERSION}): upgrade kachery-tasks"),
    "newer version, other shape": (lambda d: d.update(record_version=RECORD_VERSION + 1, status=3),
                                   f"written by a newer kachery-tasks (record_version {RECORD_VERSION + 1}"),
    "an unknown field and an error": (lambda d: d.update(lineage=1, created="x"), "created: expected"),
    "bad signature text": (lambda d: d.update(signature="zz"), "signature is not 128 lowercase hex"),
    "not an object": (lambda d: d.update(args=[]), "args: expected `object`, got `array`"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_each_kind_of_invalid_record_is_refused_naming_the_problem(good, case):
    change, message = INVALID[case]
    data = _broken(change, good)
    with pytest.raises(InvalidRecord) as caught:
        TaskRecord.from_json(copy.deepcopy(data))
    assert message in str(caught.value), str(caught.value)
    # the bytes the store reads are refused the same way (msgspec decodes them, no dict first)
    with pytest.raises(InvalidRecord) as from_bytes:
        TaskRecord.from_bytes(orjson.dumps(data))
    assert from_bytes.value.reason == caught.value.reason


@pytest.mark.parametrize("text", [b"", b"{", b"[1, 2]", b"null", b'"kt1"'])
def test_what_is_no_json_object_is_refused(text):
    with pytest.raises(InvalidRecord, match="not JSON|a task record is a JSON object"):
        TaskRecord.from_bytes(text)


def test_the_fast_and_the_slow_path_agree_on_real_records(home):
    inline_json(9)
    array_of(9)
    total(array_of.job(9))
    with pytest.raises(ValueError):
        fails(9)
    records = current_store().records
    seen = 0
    for record in [*records.iter_records(), *records.iter_records(failures=True)]:
        path = records.failure_path(record.task_id) if record.status == "failed" else records.path(record.task_id)
        text = path.read_bytes()
        fast = task_record_module._decode(text)  # the usual record decodes in one pass, no slow path
        task_record_module._check(fast)
        assert fast == record == TaskRecord.from_json(orjson.loads(text)) == task_record_module._parse(orjson.loads(text))
        seen += 1
    assert seen == 4


def test_an_invalid_record_on_disk_is_quarantined_and_the_task_recomputes(home, tmp_path):
    log = str(tmp_path / "calls.txt")

    @pure
    def counted(x):
        note(log, str(x))
        return x * 10

    assert counted(2) == 20
    path = current_store().records.path(counted.task_id(2))
    data = orjson.loads(path.read_bytes())
    data["status"] = "finished"  # parses as JSON, but is no task record
    path.write_bytes(orjson.dumps(data))
    MEMORY.clear()
    assert counted(2) == 20
    assert len(runs(log)) == 2  # read as absent: computed again
    (set_aside,) = (home / "tasks" / "quarantine").iterdir()
    assert set_aside.name.startswith(path.name) and b"finished" in set_aside.read_bytes()
    assert current_store().records.read(counted.task_id(2)).status == "succeeded"  # a whole record again


def test_a_record_under_another_ids_name_is_quarantined(home, caplog):
    inline_json(10)
    inline_json(11)
    records = current_store().records
    Path(records.path(inline_json.task_id(11))).write_bytes(records.path(inline_json.task_id(10)).read_bytes())
    assert records.read(inline_json.task_id(11)) is None
    assert "set aside" in caplog.text and inline_json.task_id(10) in caplog.text
    assert [p.name.split(".")[0] for p in (home / "tasks" / "quarantine").iterdir()] == [inline_json.task_id(11)]
