"""Pinned vectors: a value built from an expression must keep its hash while SCHEME is kt1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kachery_tasks.hashing as hashing
from kachery_tasks.hashing import SCHEME, hash_value

VECTORS = json.loads((Path(hashing.__file__).parent / "vectors.json").read_text())


def _namespace() -> dict:
    ns: dict = {}
    exec(VECTORS["prelude"], ns)
    return ns


def test_vectors_belong_to_this_scheme():
    # changing the encoding must change SCHEME and regenerate the vectors together
    assert VECTORS["scheme"] == SCHEME
    assert len(VECTORS["vectors"]) >= 40


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=[v["expr"][:40] for v in VECTORS["vectors"]])
def test_vector(vector):
    assert hash_value(eval(vector["expr"], _namespace())) == vector["hash"]


def test_vectors_are_distinct():
    hashes = [v["hash"] for v in VECTORS["vectors"]]
    assert len(set(hashes)) == len(hashes)
