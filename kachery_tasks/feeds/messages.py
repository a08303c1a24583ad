"""Signed feed messages: canonical JSON, message hashes, signing and checking.

The canonical JSON of a value is ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` (UTF-8). A signed message is the canonical JSON of
``{seq, prev, timestamp, body}`` signed with Ed25519; the signature is added as the field
``signature``. Each message is stored as the canonical JSON of the signed message, so the bytes on
disk are exactly the bytes whose SHA-256 the next message names as ``prev``: verifying the chain is
one hash per line, with no re-encoding.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from ..identity import KeyPair, canonical_json, verify
from .errors import InvalidMessageError

ZERO_HASH = "0" * 64
MESSAGE_FIELDS = frozenset({"seq", "prev", "timestamp", "body", "signature"})
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX128 = re.compile(r"[0-9a-f]{128}")


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of ``value`` (sorted keys, no spaces, UTF-8, no NaN)."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise InvalidMessageError(
            f"feed message body is not plain JSON ({exc}); use dicts with string keys, lists, "
            "strings, finite numbers, booleans and None"
        ) from None
    except UnicodeEncodeError:
        raise InvalidMessageError("feed message body holds a lone surrogate character; encode it as valid UTF-8 text") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_ms() -> int:
    """Timestamps are integer milliseconds since the epoch: integers encode the same everywhere."""
    return time.time_ns() // 1_000_000


def sign_message(keys: KeyPair, seq: int, prev: str, body: Any, timestamp: int | None = None) -> bytes:
    """The stored line (canonical JSON of the signed message, no newline) for a new message."""
    unsigned = {"seq": seq, "prev": prev, "timestamp": now_ms() if timestamp is None else timestamp, "body": body}
    payload = canonical(unsigned)
    unsigned["signature"] = keys.sign(payload)
    return canonical(unsigned)


def unsigned_payload(message: dict) -> bytes:
    """The bytes a message's signature covers: its canonical JSON without ``signature``."""
    return canonical({k: v for k, v in message.items() if k != "signature"})


def check_shape(message: Any) -> str | None:
    """Why ``message`` is not a well-formed signed message, or None if it is."""
    if not isinstance(message, dict):
        return "is not a JSON object"
    if set(message) != MESSAGE_FIELDS:
        return f"has fields {sorted(message)}, expected {sorted(MESSAGE_FIELDS)}"
    seq = message["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return "has a seq that is not a non-negative integer"
    if not isinstance(message["prev"], str) or not HEX64.fullmatch(message["prev"]):
        return "has a prev that is not 64 lowercase hex"
    ts = message["timestamp"]
    if not isinstance(ts, int) or isinstance(ts, bool):
        return "has a timestamp that is not an integer"
    if not isinstance(message["signature"], str) or not HEX128.fullmatch(message["signature"]):
        return "has a signature that is not 128 lowercase hex"
    return None


def signature_ok(public_hex: str, message: dict) -> bool:
    """True if ``message`` is well formed and signed by ``public_hex``."""
    if check_shape(message) is not None:
        return False
    try:
        payload = unsigned_payload(message)
    except InvalidMessageError:
        return False
    return verify(public_hex, payload, message["signature"])
