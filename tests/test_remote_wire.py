"""Remote tasks in one process: what a request carries (entries, never a pickle), signed answers and
who is trusted, the serving registry, and ``service=`` staying out of the task's identity."""

from __future__ import annotations

import numpy as np
import pytest

import kachery_tasks as kt
from kachery_tasks.buckets.layout import check_layout
from kachery_tasks.buckets.uri import open_bucket
from kachery_tasks.errors import UserError
from kachery_tasks.identity import KeyPair
from kachery_tasks.node.serving import Registry, import_served
from kachery_tasks.store import current_store
from kachery_tasks.tasks.remote_wire import (
    NotSendable,
    decode_value,
    encode_value,
    read_answers,
    write_answer,
)


@kt.pure
def plain(x):
    return x


@pytest.fixture
def bucket(tmp_path):
    (tmp_path / "bucket").mkdir()
    b = open_bucket((tmp_path / "bucket").as_uri())
    check_layout(b, write=True)
    return b


@pytest.mark.parametrize("value", [
    3, "text", {"a": [1, 2, None]}, b"x" * 10_000, bytearray(b"yz"), np.arange(5000, dtype="i4"),
    {"big": list(range(5000))},
])
def test_values_round_trip_through_entries_and_the_bucket(value, bucket, tmp_path):
    blobs = current_store().blobs
    entry = encode_value("v", value, blobs, bucket)
    assert "pickle" not in entry
    fresh = type(blobs)(tmp_path / "other-blobs")  # the provider's own store: blobs come from the bucket
    back = decode_value("v", entry, fresh, bucket)
    if isinstance(value, np.ndarray):
        assert np.array_equal(back, value) and back.dtype == value.dtype
    else:
        assert back == value and type(back) is type(value)


def test_a_file_travels_as_its_uri_with_its_bytes_in_the_bucket(bucket):
    uri = kt.store_bytes(b"hello")
    entry = encode_value("f", kt.File(uri), current_store().blobs, bucket)
    assert entry == {"file": uri}
    assert any(bucket.list("sha256/"))


def test_what_cannot_be_rebuilt_from_data_is_refused_in_one_line(bucket):
    with pytest.raises(NotSendable, match="argument 'v' of type object cannot be sent"):
        encode_value("v", object(), current_store().blobs, bucket)
    with pytest.raises(NotSendable, match="is a job"):
        encode_value("j", plain.job(1), current_store().blobs, bucket)
    with pytest.raises(UserError, match="unknown entry form"):
        decode_value("v", {"pickle": "gASV"}, current_store().blobs, bucket)


def test_answers_are_read_only_from_trusted_signers_with_a_good_signature(bucket):
    provider, stranger = KeyPair.generate(), KeyPair.generate()
    rid = "ab" * 16
    write_answer(bucket, provider, "lab", rid, {"status": "finished"})
    write_answer(bucket, stranger, "lab", rid, {"status": "failed"})
    found = read_answers(bucket, "lab", rid, frozenset({provider.public_hex}))
    assert list(found) == [provider.public_hex] and found[provider.public_hex]["status"] == "finished"
    # a second answer to the same request keeps the first (create-if-absent)
    write_answer(bucket, provider, "lab", rid, {"status": "failed"})
    assert read_answers(bucket, "lab", rid, frozenset({provider.public_hex}))[provider.public_hex]["status"] == "finished"


def test_service_is_not_part_of_the_task_identity():
    def f(x):
        return x + 1

    local, remote = kt.Task(f, "pure"), kt.Task(f, "pure", service="lab")
    assert local.function_id == remote.function_id and local.task_id(1) == remote.task_id(1)
    assert remote.service == "lab"
    with pytest.raises(UserError, match="service= takes a non-empty string"):
        kt.Task(f, "pure", service="")


def test_the_registry_serves_a_copy_without_service_and_announces_name_and_code_hash():
    registry = Registry()
    task = kt.Task(plain.func, "pure", service="lab")
    served = registry.add(task)
    assert served.service is None and registry.get(task.name) is served
    assert registry.serves() == {task.name: task.function_id.code_hash}
    with pytest.raises(UserError, match="only tasks"):
        registry.add(len)


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "takes module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("json:no_such_attr", "json has no no_such_attr"),
    ("json:dumps", "is not a task"),
])
def test_serve_specs_that_name_no_task_are_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        import_served(spec)
