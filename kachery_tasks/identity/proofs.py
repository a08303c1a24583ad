"""Proof that a node holds its key: its signature of a challenge someone else chose.

The hub shows a challenge on a channel's page; the node's owner runs ``kachery node prove CHALLENGE``
on the node and pastes what it prints. The proof is a signed document
``{purpose, challenge, node_id, owner, label, signature}``, so the hub learns the node's id, owner
and label from the node itself and never sees its private key. A proof answers exactly one challenge
(the challenge is in what is signed); the hub refuses a challenge used before, one it did not issue,
and one that expired.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .documents import sign_document, verify_document
from .keys import is_public_key_hex
from .node import NodeIdentity

PROOF_PREFIX = "ktp1."
PURPOSE = "kachery-node-proof"


@dataclass(frozen=True)
class NodeProof:
    """A parsed proof whose signature verified (it says nothing yet of the challenge's freshness)."""

    challenge: str
    node_id: str
    owner: str
    label: str


def prove(identity: NodeIdentity, challenge: str) -> str:
    """The proof text ``identity`` gives for ``challenge`` (what ``kachery node prove`` prints)."""
    challenge = challenge.strip()
    if not challenge or len(challenge) > 1000 or any(c.isspace() for c in challenge):
        raise UserError("give the challenge exactly as the page shows it (one word, no spaces)")
    doc = sign_document(identity.keys, {"purpose": PURPOSE, "challenge": challenge, "node_id": identity.node_id,
                                        "owner": identity.owner or "", "label": identity.label or ""})
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return PROOF_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def read_proof(text: str) -> NodeProof:
    """The proof in ``text`` if it parses and its signature is the node's; else a one-line error."""
    text = text.strip()
    hint = "paste the whole line `kachery node prove CHALLENGE` printed on the node"
    if not text.startswith(PROOF_PREFIX):
        raise UserError(f"that is not a node proof (they start with {PROOF_PREFIX!r}); {hint}")
    try:
        payload = text[len(PROOF_PREFIX):]
        doc: Any = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        raise UserError(f"the node proof is damaged; {hint}") from None
    fields = ("purpose", "challenge", "node_id", "owner", "label")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in fields):
        raise UserError(f"the node proof lacks its challenge, node id, owner or label; {hint}")
    if doc["purpose"] != PURPOSE or not is_public_key_hex(doc["node_id"]):
        raise UserError(f"that is not a node proof; {hint}")
    if not verify_document(doc, doc["node_id"]):
        raise UserError("the node proof's signature does not verify: it was altered, or not made by that node's key")
    return NodeProof(doc["challenge"], doc["node_id"], doc["owner"], doc["label"])


def timed_challenge(purpose: str, now: float | None = None) -> str:
    """A challenge a node makes for itself, ``<purpose>.<unix seconds>.<random>``: where no server
    issued one (a node asking a hub for an Ably token), freshness is its time, and the server
    remembers it so it is good once."""
    return f"{purpose}.{int(time.time() if now is None else now)}.{secrets.token_hex(8)}"


def timed_challenge_problem(challenge: str, purpose: str, window_s: float, now: float | None = None) -> str | None:
    """None if ``challenge`` is a :func:`timed_challenge` for ``purpose`` within ``window_s`` of
    now; else what is wrong (one line)."""
    parts = challenge.split(".")
    if len(parts) != 3 or parts[0] != purpose or not parts[1].isdigit():
        return f"the proof answers no {purpose} challenge"
    if abs(int(parts[1]) - (time.time() if now is None else now)) > window_s:
        return f"the {purpose} challenge is more than {window_s:g} s from this clock (check the node's clock)"
    return None
