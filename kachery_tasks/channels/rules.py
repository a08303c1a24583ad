"""What every transport does the same way: the names and payloads it accepts, how it calls handlers.

A channel that works on one transport must work on every other, so the name rule is the strictest
any of them needs: no whitespace or control characters (they break logs and some buses' naming),
at most :data:`MAX_NAME_CHARS` characters, and no ``:`` in a member name, because Redis keeps
presence under ``kachery:presence:{topic}:{member}`` and reads the member back as what follows the
topic's prefix; a ``:`` there would make topic ``a`` list the members of topic ``a:b``.

Handlers run on the transport's threads; :func:`call_handler` keeps one that raises from ending the
subscription (the base module's promise) and logs it under the transport's own logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

MAX_NAME_CHARS = 200


def check_topic(uri: str, topic: str) -> str:
    """``topic`` if a transport may carry it, else ValueError (one line naming the transport)."""
    problem = _problem(topic)
    if problem:
        raise ValueError(f"{uri}: invalid topic {topic!r}: {problem}")
    return topic


def check_member(uri: str, member: str) -> str:
    """``member`` if it may be announced as present, else ValueError (one line)."""
    problem = _problem(member) or (":" in member and "it contains ':'")
    if problem:
        raise ValueError(f"{uri}: invalid member name {member!r}: {problem}")
    return member


def check_bytes(uri: str, what: str, value: bytes) -> bytes:
    """``value`` as immutable bytes; a str or other object is a TypeError, not silently encoded."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{uri}: a {what} is bytes, not {type(value).__name__}")
    return bytes(value)


def check_ttl(uri: str, ttl: float) -> float:
    """``ttl`` if it is a positive, finite number of seconds, else ValueError."""
    if not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise ValueError(f"{uri}: a presence ttl is a positive number of seconds, not {ttl!r}")
    return float(ttl)


def check_announcement(uri: str, topic: str, member: str, info: bytes, ttl: float) -> tuple[bytes, float]:
    """The checks of ``Transport.announce``, one place for every transport: ``(info, ttl)``."""
    check_topic(uri, topic)
    check_member(uri, member)
    return check_bytes(uri, "presence info", info), check_ttl(uri, ttl)


def _problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"a name is a str, not {type(name).__name__}"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"it is longer than {MAX_NAME_CHARS} characters"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "it contains whitespace or a control character"
    return None


def call_handler(log: logging.Logger, uri: str, topic: str, handler: Callable[..., None], *args: bytes) -> None:
    """``handler(*args)``; an exception in it is logged and swallowed, so delivery goes on."""
    try:
        handler(*args)
    except Exception:
        what = "on_message" if args else "on_gap"
        log.exception("%s: the %s handler of topic %r raised; the subscription goes on", uri, what, topic)
