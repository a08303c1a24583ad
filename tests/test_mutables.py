"""Mutables: JSON values by key in <home>/mutables.sqlite, shared between processes."""

from __future__ import annotations

import pytest

import kachery_tasks as kt
from kachery_tasks.store import current_store


def test_set_get_delete() -> None:
    assert kt.get_mutable("missing") is None
    assert kt.get_mutable("missing", default=7) == 7
    kt.set_mutable("a", {"x": [1, 2, None], "s": "é"})
    assert kt.get_mutable("a") == {"x": [1, 2, None], "s": "é"}
    kt.set_mutable("a", 3)
    assert kt.get_mutable("a") == 3
    assert kt.delete_mutable("a") is True
    assert kt.delete_mutable("a") is False
    assert kt.get_mutable("a") is None


def test_ls_by_prefix_treats_wildcards_literally() -> None:
    for key in ("run/1", "run/2", "run_x", "runXx", "other", "50%"):
        kt.set_mutable(key, key)
    items = current_store().mutables.items
    assert [k for k, _ in items("run/")] == ["run/1", "run/2"]
    assert [k for k, _ in items("run_")] == ["run_x"]  # '_' is not a SQL wildcard here
    assert [k for k, _ in items("50%")] == ["50%"]
    assert len(list(items())) == 6


@pytest.mark.parametrize("value", [object(), float("nan"), {1, 2}, b"bytes"])
def test_non_json_values_are_refused(value) -> None:
    with pytest.raises(kt.UserError, match="not JSON"):
        kt.set_mutable("k", value)
    assert kt.get_mutable("k") is None


@pytest.mark.parametrize("key", ["", None, 5])
def test_bad_keys_are_refused(key) -> None:
    with pytest.raises(kt.UserError):
        kt.set_mutable(key, 1)


def test_shared_between_processes(run_python) -> None:
    kt.set_mutable("from_parent", [1, 2])
    out = run_python(
        "import kachery_tasks as kt\n"
        "print(kt.get_mutable('from_parent'))\n"
        "kt.set_mutable('from_child', {'ok': True})\n"
        "kt.delete_mutable('to_delete')\n"
    )
    assert out.stdout.strip() == "[1, 2]"
    assert kt.get_mutable("from_child") == {"ok": True}


def test_delete_seen_by_another_process(run_python) -> None:
    kt.set_mutable("gone", 1)
    run_python("import kachery_tasks as kt; assert kt.delete_mutable('gone')")
    assert kt.get_mutable("gone") is None
