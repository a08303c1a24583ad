"""Opening a transport by URI: ``memory://NAME`` (:mod:`.memory`), ``redis://[:password@]host:port/db``
and ``rediss://`` for TLS (:mod:`.redis`, needs the ``redis`` extra), or ``ably://[HOST[:PORT]]/``
(:mod:`.ably`, needs the ``ably`` extra); an extra is imported only when such a transport is opened.

The URI is parsed here, whatever the implementation, so that a malformed one is reported the same
way whether or not the extra is installed. A password never appears in a message: every URI shown
(errors, the transport's ``uri``, its logs) has it replaced by ``***``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from ..errors import InvalidURI, UserError
from .base import Transport
from .memory import MemoryTransport

_FORMS = "memory://NAME, redis://[:password@]host:port/db (rediss:// for TLS) or ably://[HOST[:PORT]]/"
_REDIS_FORM = "redis://[:password@]host:port/db"
_MEMORY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*)@")


def open_transport(uri: str, **options: Any) -> Transport:
    """The transport at ``uri``; ``options`` go to the implementation (timeouts, intervals).

    A URI that does not parse or has an unknown scheme is :class:`~kachery_tasks.errors.InvalidURI`;
    a ``redis://`` URI without the redis extra installed is a :class:`~kachery_tasks.errors.UserError`
    saying what to install. Both are one line naming the URI."""
    if not isinstance(uri, str) or "://" not in uri:
        raise InvalidURI(f"{shown(uri)!r} is not a transport URI; use {_FORMS}")
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        if not _MEMORY_NAME.match(rest):
            raise InvalidURI(f"{uri!r}: a memory transport's NAME is 1-200 letters, digits, '.', '_', '-'; "
                             "use memory://NAME")
        return MemoryTransport(uri, **options)
    if scheme in ("redis", "rediss"):
        address = _redis_address(uri, scheme)
        try:
            from .redis import RedisTransport  # here: redis-py is an optional extra
        except ModuleNotFoundError as e:
            if e.name != "redis":
                raise
            raise UserError(f"{shown(uri)} needs redis-py: pip install 'kachery-tasks[redis]'") from None
        return RedisTransport(shown(uri), **address, **options)
    if scheme == "ably":
        from .ably import AblyTransport  # imports the ably SDK only when it is opened

        return AblyTransport(uri, **options)
    raise InvalidURI(f"{shown(uri)!r}: unknown transport scheme {scheme!r}; use {_FORMS}")


def shown(uri: object) -> str:
    """``uri`` as it may be shown: with the password (all of the user info but a user name) masked."""
    if not isinstance(uri, str):
        return repr(uri)

    def mask(m: re.Match) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    return _USERINFO.sub(mask, uri, count=1)


def _redis_address(uri: str, scheme: str) -> dict[str, Any]:
    """The keyword arguments of :class:`~.redis.RedisTransport` that ``uri`` gives."""
    bad = f"{shown(uri)!r}"
    parts: SplitResult = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise InvalidURI(f"{bad}: the port is not a number from 0 to 65535; use {_REDIS_FORM}") from None
    if not parts.hostname:
        raise InvalidURI(f"{bad} names no host; use {_REDIS_FORM}")
    if parts.query or parts.fragment:
        raise InvalidURI(f"{bad}: a transport URI has no '?' or '#' part; use {_REDIS_FORM}")
    db = re.fullmatch(r"/?|/(\d{1,5})", parts.path)
    if db is None:
        raise InvalidURI(f"{bad}: the path is the database number, as /0; use {_REDIS_FORM}")
    return {"host": parts.hostname, "port": 6379 if port is None else port,
            "db": int(db.group(1) or 0),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "tls": scheme == "rediss"}
