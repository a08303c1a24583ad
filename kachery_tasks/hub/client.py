"""Calling a hub's JSON API from a node or the command line, with the standard library's HTTP client
(a node joins, and an owner grants, with no web stack installed). A refusal is the hub's one line;
a hub that cannot be reached is one line too."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ..errors import UserError

TIMEOUT_S = 30.0


def call_hub(base: str, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
    """``method path`` at the hub ``base`` with a JSON ``body``; the decoded JSON answer."""
    base = base.rstrip("/")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - the hub's URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise UserError(f"the hub at {base} refused: {detail or exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"cannot reach the hub at {base} ({exc}); is it running?") from None
