"""The hub's secret, the challenges it issues for node proofs, and the checks every request passes.

**Challenges** are stateless: ``ktc1.<payload>.<mac>``, the payload naming the channel, the user it
was shown to and when it expires, the MAC keyed with the hub's secret. Showing one changes nothing
(a page is a GET); using one records it, so a proof is good once (:meth:`HubDB.use_challenge`).

**CSRF**: every form carries the session's token, compared in constant time; a POST without it is
refused. The API takes a bearer token instead, which a browser never sends on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from pathlib import Path

from ..fs import write_atomic

CHALLENGE_PREFIX = "ktc1."
CHALLENGE_S = 600


def load_secret(root: Path) -> bytes:
    """The hub's secret key (``<root>/secret``, mode 0600), made on first start."""
    path = Path(root) / "secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        try:
            write_atomic(path, secrets.token_bytes(32).hex().encode(), mode=0o600, share=False, overwrite=False)
        except FileExistsError:
            pass  # another hub process made it first: use its secret
        return bytes.fromhex(path.read_text().strip())


def _mac(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()[:32]


def make_challenge(secret: bytes, channel_id: str, user_id: int, now: float | None = None) -> str:
    body = {"c": channel_id, "u": user_id, "e": int((now or time.time()) + CHALLENGE_S), "r": secrets.token_hex(8)}
    payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")
    return f"{CHALLENGE_PREFIX}{payload}.{_mac(secret, payload)}"


def check_challenge(secret: bytes, challenge: str, channel_id: str, user_id: int) -> str | None:
    """None if the hub issued ``challenge`` on this channel's page to this user and it has not
    expired; else what is wrong (one line). Whether it was used before is the database's part."""
    if not challenge.startswith(CHALLENGE_PREFIX):
        return "the proof answers no challenge of this hub"
    payload, _, mac = challenge[len(CHALLENGE_PREFIX):].rpartition(".")
    if not payload or not hmac.compare_digest(mac, _mac(secret, payload)):
        return "the proof answers a challenge this hub did not issue"
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return "the proof answers a damaged challenge"
    if body.get("c") != channel_id or body.get("u") != user_id:
        return "the proof answers a challenge shown for another channel or another user; use the one on this page"
    if body.get("e", 0) < time.time():
        return "the challenge has expired (they last ten minutes); reload the page and prove again"
    return None


def same_token(given: str | None, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine only."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dev_sign_in_allowed(bound_host: str, client_host: str | None) -> bool:
    """The dev sign-in works only on a hub bound to loopback, for a client on loopback."""
    return is_loopback(bound_host) and is_loopback(client_host) and os.environ.get("KACHERY_HUB_NO_DEV") is None
