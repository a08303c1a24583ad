"""Signed JSON documents: task records, channel configs, envelopes.

A document is signed over its canonical JSON (sorted keys, no spaces, UTF-8) without the
``signature`` field, so any reader in any language can check it from the text alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .keys import KeyPair, verify


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_document(keys: KeyPair, doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with ``signature`` set (any earlier signature is replaced)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return {**body, "signature": keys.sign(canonical_json(body))}


def verify_document(doc: Mapping[str, Any], public_hex: str) -> bool:
    """True if ``doc['signature']`` is ``public_hex``'s signature of the rest of ``doc``."""
    signature = doc.get("signature")
    if not isinstance(signature, str):
        return False
    body = {k: v for k, v in doc.items() if k != "signature"}
    return verify(public_hex, canonical_json(body), signature)
