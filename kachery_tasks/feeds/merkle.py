"""RFC 6962 / RFC 9162 Merkle tree hashes and proofs over a subfeed's messages.

Leaves are the stored lines (canonical JSON of signed messages). ``leaf = SHA-256(0x00 ‖ line)``,
``node = SHA-256(0x01 ‖ left ‖ right)``; the tree of ``n`` leaves splits at the largest power of two
below ``n``. The domain bytes keep a leaf from being passed off as an inner node.

:class:`MerkleLog` keeps every level of the tree as packed 32-byte hashes, appended incrementally
(two hashes per message, amortised), so the root at any size and any proof cost ``O(log n)``
lookups: a reader can check each new checkpoint the moment it appears, and a writer can sign one in
the middle of a batch, without rehashing the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    h = hashlib.sha256(b"\x00")
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleLog:
    """All levels of the Merkle tree over the leaves appended so far."""

    def __init__(self) -> None:
        self.levels: list[bytearray] = [bytearray()]

    def __len__(self) -> int:
        return len(self.levels[0]) // 32

    def append(self, leaf: bytes) -> None:
        levels = self.levels
        levels[0] += leaf
        level, h = 0, leaf
        while (len(levels[level]) // 32) % 2 == 0:
            h = node_hash(levels[level][-64:-32], h)
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += h

    def leaf(self, index: int) -> bytes:
        return bytes(self.levels[0][32 * index : 32 * index + 32])

    def subtree(self, lo: int, hi: int) -> bytes:
        """MTH of leaves ``[lo, hi)``."""
        n = hi - lo
        if n <= 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and lo % n == 0:
            level = n.bit_length() - 1
            i = lo >> level
            return bytes(self.levels[level][32 * i : 32 * i + 32])
        k = _split(n)
        return node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        size = len(self) if size is None else size
        if size > len(self):
            raise ValueError(f"tree has {len(self)} leaves, not {size}")
        return self.subtree(0, size)

    def inclusion_path(self, index: int, size: int) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size])."""
        if not 0 <= index < size <= len(self):
            raise ValueError(f"no leaf {index} in a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.subtree(lo, lo + k))
                lo = lo + k
        path.reverse()
        return path

    def consistency_path(self, old: int, new: int) -> list[bytes]:
        """RFC 6962 PROOF(old, D[0:new])."""
        if not 0 < old <= new <= len(self):
            raise ValueError(f"no consistency proof from size {old} to size {new}")
        path: list[bytes] = []
        lo, hi, m, whole = 0, new, old, True
        while True:
            n = hi - lo
            if m == n:
                if not whole:
                    path.append(self.subtree(lo, hi))
                break
            k = _split(n)
            if m <= k:
                path.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.subtree(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        path.reverse()
        return path


def root_of(leaves: Sequence[bytes]) -> bytes:
    """Root over leaf hashes, for one-off use."""
    log = MerkleLog()
    for leaf in leaves:
        log.append(leaf)
    return log.root()


def verify_inclusion_path(index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency_path(old: int, new: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2 (a proof from the empty tree is meaningless and fails)."""
    if old == new:
        return not path and old_root == new_root
    if old <= 0 or old > new or not path:
        return False
    path = list(path)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
