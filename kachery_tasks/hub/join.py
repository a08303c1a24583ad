"""Joining a hub's channel with a one-time token: how a headless node (a server, a cluster job) joins
without anyone pasting a proof into a page.

An owner makes a token on the channel's page (with the permissions the node will get and how long
the token lasts). The token text is ``kachery-hub-join-1.<payload>``, the payload naming the hub's
URL and the secret. On the node, ``kachery channel join TOKEN`` signs the secret with the node's key
(a proof, identity/proofs.py) and posts it to the hub's ``/api/join``; the hub checks the signature,
uses the token (once: a second use, even a racing one, is refused), admits the node with its
owner and label, and answers the channel's join string, which the node pins as any join.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ..channels.membership import Membership
from ..channels.pins import JoinString, Pins
from ..errors import UserError
from ..identity import node_identity
from ..identity.proofs import prove
from ..jsonhttp import call_json

TOKEN_PREFIX = "kachery-hub-join-1."


def encode_token(hub_url: str, secret: str) -> str:
    body = json.dumps({"hub": hub_url.rstrip("/"), "token": secret}, separators=(",", ":")).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def parse_token(text: str) -> tuple[str, str]:
    """``(hub URL, secret)`` of a join token; a one-line error if it is not one."""
    payload = text.strip()[len(TOKEN_PREFIX):]
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        hub, secret = body["hub"], body["token"]
    except (ValueError, KeyError, TypeError):
        raise UserError("the hub join token is damaged; copy the whole token the channel's page showed") from None
    if not (isinstance(hub, str) and hub.startswith(("http://", "https://")) and isinstance(secret, str)):
        raise UserError("the hub join token is damaged; copy the whole token the channel's page showed")
    return hub, secret


def is_token(text: str) -> bool:
    return text.strip().startswith(TOKEN_PREFIX)


def join_with_token(home: Path, text: str) -> tuple[JoinString, list[str]]:
    """Have the hub admit this node with the token ``text``; pin the channel. Returns the join
    string and the permissions granted."""
    hub, secret = parse_token(text)
    identity = node_identity(home)
    if not identity.owner:
        raise UserError("set this node's owner first (`kachery node init --owner EMAIL`): the channel lists it")
    answer = call_json(f"{hub}/api/join", "POST", {"proof": prove(identity, secret)})
    join = JoinString.parse(answer["join"])
    Pins(home).pin(join)
    Membership(home, join.channel).refresh()
    return join, list(answer.get("permissions", []))
