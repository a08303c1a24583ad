"""A JSON call over HTTP with the standard library's client, its failures one line each: how a node
asks a hub (a join, an Ably token) and the command line calls a hub's API, with no web stack
installed. Below every layer that calls out, so the channel layer and the hub share it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .errors import UserError

TIMEOUT_S = 30.0


def call_json(url: str, method: str = "GET", body: Any = None, *, token: str | None = None,
              timeout: float = TIMEOUT_S) -> Any:
    """``method url`` with a JSON ``body`` (and a bearer ``token``); the decoded JSON answer. A
    refusal is the server's ``detail`` (FastAPI's error field) in one line; no answer, one line."""
    base = url.split("/api/", 1)[0]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise UserError(f"the hub at {base} refused: {detail or exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"cannot reach the hub at {base} ({exc}); is it running?") from None
