"""Channels: communities of nodes with signed configs and permissions, talking through a transport.

``open_transport(uri)`` opens a channel's message bus: ``memory://NAME`` (:mod:`.memory`) or
``redis://host:port/db`` (:mod:`.redis`, needs the ``redis`` extra). The protocol is in :mod:`.base`.
"""

from __future__ import annotations

from .base import (
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    Subscription,
    Transport,
    TransportError,
)
from .uri import open_transport

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MessageTooLarge",
    "Subscription",
    "Transport",
    "TransportError",
    "open_transport",
]
