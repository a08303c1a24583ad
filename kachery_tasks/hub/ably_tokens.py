"""Ably tokens the hub hands to its channels' nodes, so no node holds the Ably key.

A channel whose transport is ``ably://…?token_url=<hub>/api/ably-token`` makes each node's Ably
connection ask the hub for a token (channels/ably.py): the node signs a fresh challenge
``ably-token.<unix seconds>.<random>`` with its key (identity/proofs.py); the hub checks the
signature, that the challenge is recent and never used, and answers a TokenRequest signed with the
hub's Ably key: for that node only (its node id is the token's clientId), for the channels of this
hub it is a member of (``channel/<name>``: publish, subscribe, presence), for an hour. The node's
SDK exchanges it with Ably and asks again when it expires. A revoked node gets no new token.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

TOKEN_TTL_MS = 3600 * 1000
#: The purpose of the challenges nodes sign to ask for a token, and how far their time may be
#: from the hub's clock.
PURPOSE = "ably-token"
CHALLENGE_WINDOW_S = 120


def token_request(key: str, node_id: str, channels: list[str], ttl_ms: int = TOKEN_TTL_MS) -> dict[str, Any]:
    """A TokenRequest (as JSON) signed with ``key``, for ``node_id`` on ``channels`` only."""
    from ably.types.capability import Capability
    from ably.types.tokenrequest import TokenRequest

    name, _, secret = key.partition(":")
    capability = Capability({f"channel/{c}": ["publish", "subscribe", "presence"] for c in sorted(channels)})
    request = TokenRequest(key_name=name, client_id=node_id, nonce=secrets.token_hex(16),
                           timestamp=int(time.time() * 1000), ttl=ttl_ms, capability=str(capability))
    request.sign_request(secret.encode())
    return request.to_dict()
