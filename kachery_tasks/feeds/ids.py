"""Feed ids as people and programs write them: ``feed://<id>`` or the bare ``<id>``.

A feed id is the 64 lowercase hex characters of its writer's Ed25519 public key. ``kachery feed
create`` prints the URI form and ``Feed.feed_id`` holds the bare form, so both reach every function
that names a feed; each takes either, through :func:`parse_feed_id`. Anything else is an error
here, at the door: a URI handed to a check that compared it with the bare id would otherwise make
every proof "fail", which reads as tampering when it is a typo.
"""

from __future__ import annotations

import re

from ..errors import InvalidURI

_HEX64 = re.compile(r"[0-9a-f]{64}")
PREFIX = "feed://"


def is_feed_id(ref: object) -> bool:
    """True if ``ref`` is a feed id in either form."""
    if not isinstance(ref, str):
        return False
    bare = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
    return _HEX64.fullmatch(bare) is not None


def parse_feed_id(ref: object) -> str:
    """The bare feed id of ``feed://<id>`` or ``<id>`` (64 lowercase hex); anything else raises
    :class:`~kachery_tasks.errors.InvalidURI`, one line saying what is expected."""
    if isinstance(ref, str):
        bare = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
        if _HEX64.fullmatch(bare):
            return bare
    raise InvalidURI(
        f"{ref!r} is not a feed id; expected feed://<64 lowercase hex characters> or the 64 characters alone"
    )
