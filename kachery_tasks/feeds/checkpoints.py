"""Signed tree heads ("checkpoints") over a subfeed, and proofs checked against them.

A checkpoint says: the first ``size`` messages of subfeed ``subfeed`` of feed ``feed`` have the RFC
6962 Merkle root ``root``. It is signed by the feed's key like a message, over its canonical JSON
without ``signature``. Because one signature covers a whole prefix, verifying a long subfeed costs
hashing plus one signature per checkpoint, not one per message (the idea of Hypercore's signed tree
and of Certificate Transparency's signed tree heads). The name and feed id inside the signed bytes
keep a checkpoint from being replayed for another subfeed or feed.

Proofs travel with the checkpoint they were made against, so that anyone who knows only the feed's
public key can check them: :func:`verify_inclusion` (this message is message ``seq`` of the log the
checkpoint signs) and :func:`verify_consistency` (the newer checkpoint extends the older one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..identity import KeyPair, verify
from .ids import parse_feed_id
from .merkle import leaf_hash, verify_consistency_path, verify_inclusion_path
from .messages import HEX64, HEX128, canonical, now_ms

CHECKPOINT_TYPE = "kachery-feed-checkpoint/1"
_FIELDS = frozenset({"type", "feed", "subfeed", "size", "root", "timestamp", "signature"})


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head: ``size`` messages of ``subfeed`` have Merkle root ``root`` (hex)."""

    feed: str
    subfeed: str
    size: int
    root: str
    timestamp: int
    signature: str = ""
    type: str = CHECKPOINT_TYPE

    @classmethod
    def create(cls, keys: KeyPair, subfeed: str, size: int, root: bytes) -> Checkpoint:
        unsigned = cls(feed=keys.public_hex, subfeed=subfeed, size=size, root=root.hex(), timestamp=now_ms())
        return cls(**{**asdict(unsigned), "signature": keys.sign(unsigned.payload())})

    def payload(self) -> bytes:
        """The bytes the signature covers."""
        return canonical({k: v for k, v in asdict(self).items() if k != "signature"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint | None:
        """The checkpoint in ``data``, or None if it is not a well-formed one (signature unchecked)."""
        if not isinstance(data, dict) or set(data) != _FIELDS or data["type"] != CHECKPOINT_TYPE:
            return None
        size, ts = data["size"], data["timestamp"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        if not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(data["subfeed"], str):
            return None
        for key, pattern in (("feed", HEX64), ("root", HEX64), ("signature", HEX128)):
            if not isinstance(data[key], str) or not pattern.fullmatch(data[key]):
                return None
        return cls(**data)

    def signed_by(self, feed_id: str) -> bool:
        """True if this checkpoint names ``feed_id`` (``feed://<id>`` or ``<id>``) and carries its
        valid signature; something that is not a feed id raises :class:`InvalidURI`."""
        feed_id = parse_feed_id(feed_id)
        return self.feed == feed_id and verify(feed_id, self.payload(), self.signature)


@dataclass(frozen=True)
class InclusionProof:
    """Audit path showing message ``seq`` is in the first ``size`` messages signed by ``checkpoint``."""

    seq: int
    size: int
    path: list[str]
    checkpoint: Checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "size": self.size, "path": list(self.path), "checkpoint": self.checkpoint.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InclusionProof:
        cp = Checkpoint.from_dict(data.get("checkpoint"))
        if cp is None:
            raise ValueError("inclusion proof holds no well-formed checkpoint")
        return cls(seq=data["seq"], size=data["size"], path=list(data["path"]), checkpoint=cp)


@dataclass(frozen=True)
class ConsistencyProof:
    """Proof that the log signed by ``new`` extends the log signed by ``old``."""

    old: Checkpoint
    new: Checkpoint
    path: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.to_dict(), "new": self.new.to_dict(), "path": list(self.path)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConsistencyProof:
        old, new = Checkpoint.from_dict(data.get("old")), Checkpoint.from_dict(data.get("new"))
        if old is None or new is None:
            raise ValueError("consistency proof holds no well-formed checkpoints")
        return cls(old=old, new=new, path=list(data["path"]))


def _hashes(path: list[str]) -> list[bytes] | None:
    try:
        out = [bytes.fromhex(h) for h in path]
    except (TypeError, ValueError):
        return None
    return out if all(len(h) == 32 for h in out) else None


def verify_inclusion(feed_id: str, message: dict | bytes, proof: InclusionProof, checkpoint: Checkpoint | None = None) -> bool:
    """True if ``message`` (a signed message, or its stored line) is message ``proof.seq`` of the log
    whose head ``checkpoint`` (default: the one in the proof) is validly signed by ``feed_id``.

    Needs only the public key: no feed files, no other messages. ``feed_id`` is ``feed://<id>`` or
    the bare ``<id>``; anything else raises :class:`InvalidURI` (a False would read as tampering).
    """
    feed_id = parse_feed_id(feed_id)
    cp = checkpoint or proof.checkpoint
    if checkpoint is not None and checkpoint != proof.checkpoint:
        return False
    if not cp.signed_by(feed_id) or cp.size != proof.size:
        return False
    line = message if isinstance(message, bytes) else canonical(message)
    if not isinstance(message, bytes) and message.get("seq") != proof.seq:
        return False
    path = _hashes(proof.path)
    if path is None:
        return False
    return verify_inclusion_path(proof.seq, proof.size, leaf_hash(line), path, bytes.fromhex(cp.root))


def verify_consistency(feed_id: str, proof: ConsistencyProof, old: Checkpoint | None = None) -> bool:
    """True if both checkpoints are signed by ``feed_id`` for the same subfeed and the newer log
    extends the older one. Pass ``old`` (a checkpoint you trusted before) to pin the starting point.
    ``feed_id`` is ``feed://<id>`` or the bare ``<id>``; anything else raises :class:`InvalidURI`.
    """
    feed_id = parse_feed_id(feed_id)
    if old is not None and old != proof.old:
        return False
    a, b = proof.old, proof.new
    if a.subfeed != b.subfeed or not a.signed_by(feed_id) or not b.signed_by(feed_id):
        return False
    path = _hashes(proof.path)
    if path is None:
        return False
    return verify_consistency_path(a.size, b.size, bytes.fromhex(a.root), bytes.fromhex(b.root), path)
