"""The RFC 6962 tree, checked against a deliberately naive reference, with mutated proofs rejected."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kachery_tasks.feeds.merkle import (
    EMPTY_ROOT,
    MerkleLog,
    leaf_hash,
    node_hash,
    verify_consistency_path,
    verify_inclusion_path,
)


def mth(data: list[bytes]) -> bytes:
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(data[:k]) + mth(data[k:])).digest()


def build(n: int) -> tuple[list[bytes], MerkleLog]:
    data = [f"leaf {i}".encode() for i in range(n)]
    log = MerkleLog()
    for d in data:
        log.append(leaf_hash(d))
    return data, log


def test_known_vectors():
    # RFC 6962 empty-tree hash, and the structure of small trees
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data, log = build(3)
    assert log.root() == node_hash(node_hash(leaf_hash(data[0]), leaf_hash(data[1])), leaf_hash(data[2]))


def test_roots_and_proofs_match_reference_exhaustively():
    data, log = build(40)
    for n in range(1, 41):
        root = mth(data[:n])
        assert log.root(n) == root
        for m in range(n):
            path = log.inclusion_path(m, n)
            assert verify_inclusion_path(m, n, leaf_hash(data[m]), path, root)
            assert not verify_inclusion_path(m, n, leaf_hash(data[m] + b"!"), path, root)
            if path:
                assert not verify_inclusion_path(m, n, leaf_hash(data[m]), path[:-1], root)
                assert not verify_inclusion_path(m, n, leaf_hash(data[m]), path + [path[0]], root)
        for m in range(1, n + 1):
            path = log.consistency_path(m, n)
            assert verify_consistency_path(m, n, mth(data[:m]), root, path)
            if m < n:
                assert not verify_consistency_path(m, n, mth(data[:m]), mth(data[: n - 1]), path)
                assert not verify_consistency_path(m, n, root, mth(data[:m]), path)  # swapped roots
                assert not verify_consistency_path(m, n, mth(data[:m]), root, path[:-1])
                assert not verify_consistency_path(m, n, mth(data[:m]), root, [b"\0" * 32] + path)
    assert not verify_consistency_path(0, 5, EMPTY_ROOT, mth(data[:5]), [])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_bit_flips_rejected(n, draw):
    data, log = build(n)
    m = draw.draw(st.integers(0, n - 1))
    path = log.inclusion_path(m, n)
    if path:
        i = draw.draw(st.integers(0, len(path) - 1))
        bit = draw.draw(st.integers(0, 255))
        flipped = bytearray(path[i])
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad = path[:i] + [bytes(flipped)] + path[i + 1 :]
        assert not verify_inclusion_path(m, n, leaf_hash(data[m]), bad, log.root(n))
    old = draw.draw(st.integers(1, n))
    cpath = log.consistency_path(old, n)
    assert verify_consistency_path(old, n, log.root(old), log.root(n), cpath)
    if cpath:
        i = draw.draw(st.integers(0, len(cpath) - 1))
        flipped = bytearray(cpath[i])
        flipped[0] ^= 1
        bad = cpath[:i] + [bytes(flipped)] + cpath[i + 1 :]
        assert not verify_consistency_path(old, n, log.root(old), log.root(n), bad)
