"""Resolution tiers: the places a result may already be, in the order the config key ``tiers``
names them (see base.py for the protocol, one module per tier).

:func:`tiers_for` builds a home's tier objects once per configuration generation; the resolver
asks them in order and knows none of them by name. A new tier is a module here and one line in
:data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable

from ... import config
from ...errors import UserError
from .base import ABSENT, Fetched, Hit, Miss, Tier
from .bucket import BucketTier
from .channel import ChannelTier
from .local import LocalTier
from .memory import MEMORY, MemoryTier

#: The tiers this version has, by the name the config key ``tiers`` uses; each made for one home, or
#: None where the configuration gives it nothing to ask (no bucket configured: no bucket tier).
KINDS: dict[str, Callable[[str], Tier | None]] = {
    "memory": MemoryTier, "local": LocalTier, "bucket": BucketTier.for_home, "channel": ChannelTier.for_home,
}

_built: dict[str, tuple[object, tuple[Tier, ...]]] = {}


def tiers_for(home: str) -> tuple[Tier, ...]:
    """The tiers in force for ``home``, built once per configuration generation (on the hit path)."""
    generation = config.generation()
    found = _built.get(home)
    if found is not None and found[0] == generation:
        return found[1]
    names = config.get("tiers")
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise UserError(
            f"unknown resolution tier {unknown[0]!r} in config 'tiers'; this version has {', '.join(KINDS)}"
        )
    made = ((name, KINDS[name](home)) for name in names)
    tiers = tuple(_named(tier, name) for name, tier in made if tier is not None)
    _built[home] = (generation, tiers)
    return tiers


def _named(tier: Tier, name: str) -> Tier:
    """The tier under the name the configuration gives it (its hits are counted under that name,
    and ``explain`` names it so)."""
    tier.name, tier.hit_stat = name, f"hit_{name}"
    return tier


__all__ = ["ABSENT", "KINDS", "BucketTier", "ChannelTier", "Fetched", "MEMORY", "Hit", "LocalTier", "MemoryTier", "Miss", "Tier",
           "tiers_for"]
