"""Envelopes: every message on a channel, signed by its sender, with a timestamp and a nonce.

::

    {"type": "request_file", "channel": "lab", "from_node": "<64 hex>", "timestamp": <ms since epoch>,
     "nonce": "<32 hex>", "request_id": "<32 hex>", "body": {...}, "signature": "<128 hex>"}

The signature is the sender's Ed25519 signature over the canonical JSON of the rest
(:mod:`kachery_tasks.identity.documents`), so the transport is not trusted with anything. The
original network signed ``{body, fromNodeId}`` only: a recorded message could be replayed forever,
and into another channel. Here the channel, the time and a random nonce are under the signature, and
a receiver (:mod:`.gate`) refuses a message for another channel, outside its clock window, or with
a nonce it has seen. ``request_id`` ties answers to their request and keys the durable answer in the
bucket; an answer carries its request's id.

Bodies are small (ids, sizes, statuses): data goes through the bucket. An envelope larger than
:data:`~.base.MAX_MESSAGE_BYTES` is refused when it is made.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ..identity import KeyPair, canonical_json, verify
from .base import MAX_MESSAGE_BYTES, MessageTooLarge

#: Message types and the permission a sender needs for each (None: being a member is enough).
REQUIRED_PERMISSION: dict[str, str | None] = {
    "request_file": "request_files",
    "upload_status": "provide_files",
    "request_subfeed": "request_feeds",
    "subfeed_count": "provide_feeds",
    "request_result": "request_tasks",
    "request_task": "request_tasks",
    "task_status": "provide_tasks",
    "cancel": "request_tasks",
    "heartbeat": None,
}
MessageType = Literal[
    "request_file", "upload_status", "request_subfeed", "subfeed_count", "request_result", "request_task",
    "task_status", "cancel", "heartbeat",
]
_Hex32 = Annotated[str, Meta(pattern="^[0-9a-f]{32}$")]
_NodeId = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class BadEnvelope(ValueError):
    """A message that is not a well-formed envelope (the reason is the message)."""


class Envelope(Struct, frozen=True, forbid_unknown_fields=True):
    type: MessageType
    channel: Annotated[str, Meta(min_length=1, max_length=63)]
    from_node: _NodeId
    timestamp: Annotated[int, Meta(ge=0)]
    nonce: _Hex32
    request_id: _Hex32
    body: dict[str, Any]
    signature: Annotated[str, Meta(pattern="^[0-9a-f]{128}$")]

    def to_bytes(self) -> bytes:
        return canonical_json(msgspec.to_builtins(self))

    def signature_ok(self) -> bool:
        doc = msgspec.to_builtins(self)
        del doc["signature"]
        try:
            return verify(self.from_node, canonical_json(doc), self.signature)
        except (ValueError, TypeError):
            return False

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        if len(data) > MAX_MESSAGE_BYTES:
            raise BadEnvelope(f"{len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            return _decode(data)
        except msgspec.DecodeError as exc:
            raise BadEnvelope(f"not an envelope ({exc})") from None


_decode = msgspec.json.Decoder(Envelope).decode


def new_request_id() -> str:
    return os.urandom(16).hex()


def seal(keys: KeyPair, type: str, channel: str, body: dict[str, Any], *, request_id: str | None = None,
         now_ms: int | None = None) -> Envelope:
    """A signed envelope from the node of ``keys``; a new request id unless answering one."""
    if type not in REQUIRED_PERMISSION:
        raise ValueError(f"unknown message type {type!r}")
    doc = {
        "type": type, "channel": channel, "from_node": keys.public_hex,
        "timestamp": int(time.time() * 1000) if now_ms is None else now_ms,
        "nonce": os.urandom(16).hex(), "request_id": request_id or new_request_id(), "body": body,
    }
    signed = canonical_json(doc)
    if len(signed) + 150 > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"a {type} envelope of {len(signed)} bytes is over the {MAX_MESSAGE_BYTES}-byte "
                              "limit; put the data in the bucket and send its key")
    return Envelope(**doc, signature=keys.sign(signed))
