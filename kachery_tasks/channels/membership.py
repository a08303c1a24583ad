"""A joined channel's current config, read from its bucket, checked against the pin, kept fresh.

Every node of a channel reads the same object, ``channels/<name>/config.json``, and believes it only
if the pinned owner signed it and it is not older than what the node has seen
(:meth:`ChannelConfig.check_successor`). :class:`Membership` re-reads it at most every
``channel_refresh_seconds`` (default 60), so a member the owner revoked loses its rights everywhere
within that time, with no restart. A refresh that fails keeps the config already accepted: an
unreachable bucket, a deleted config or a forged one never widens anyone's rights, and the refusal is
logged once per distinct reason.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from .. import config as kconfig
from ..buckets.base import Bucket, BucketError
from ..buckets.layout import channel_config_key
from ..buckets.uri import open_bucket
from ..errors import UserError
from .config import ChannelConfig, ChannelConfigError
from .pins import Pin, Pins

log = logging.getLogger(__name__)

#: A config larger than this is refused unread (about 10,000 members fit in 4 MiB).
MAX_CONFIG_BYTES = 4 * 2**20


def read_published(bucket: Bucket, pin: Pin) -> tuple[ChannelConfig, int] | None:
    """The config in ``bucket`` and its generation, checked against ``pin``; None if there is none."""
    key = channel_config_key(pin.name)
    where = f"{bucket.uri} {key}"
    info = bucket.stat(key)  # stat before read: the bytes are at least as new as the generation
    if info is None:
        return None
    if info.size > MAX_CONFIG_BYTES:
        raise ChannelConfigError(f"{where} is {info.size} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a channel config")
    data = b"".join(bucket.read(key, 0, MAX_CONFIG_BYTES))
    config = ChannelConfig.from_bytes(data, where)
    config.check_successor(pinned_owner=pin.join.owner_key, channel=pin.name, seen=pin.config, where=where)
    return config, info.generation


class Membership:
    """The current config of channel ``name`` for the node at ``home``; thread-safe."""

    def __init__(self, home: Path, name: str, *, bucket: Bucket | None = None) -> None:
        self.pins = Pins(home)
        self.pin = self.pins.get(name)
        self.name = name
        self.bucket = bucket if bucket is not None else open_bucket(self.pin.join.bucket, read_only=True)
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._logged: set[str] = set()

    def config(self) -> ChannelConfig:
        """The config in force, re-read from the bucket when the refresh interval has passed."""
        if self.pin.config is None or time.monotonic() - self._checked >= float(kconfig.get("channel_refresh_seconds")):
            self.refresh()
        if self.pin.config is None:
            raise UserError(f"channel {self.name!r} has no config this node can accept yet in "
                            f"{self.pin.join.bucket}; ask its owner to check it (`kachery channel show {self.name}`)")
        return self.pin.config

    def refresh(self) -> ChannelConfig | None:
        """Read the bucket's config now; keep the current one if that fails (and say why, once)."""
        with self._lock:  # a second caller waits for this read rather than finding no config yet
            try:
                found = read_published(self.bucket, self.pin)
            except (ChannelConfigError, BucketError, UserError, OSError) as exc:
                self._once(f"channel {self.name!r}: kept config version "
                           f"{self.pin.config.version if self.pin.config else '(none)'}: {exc}")
                return self.pin.config
            finally:
                self._checked = time.monotonic()  # after the read: a caller meanwhile waited on the lock
            if found is None:
                self._once(f"channel {self.name!r}: no config in {self.bucket.uri} "
                           f"{channel_config_key(self.name)}; kept what this node had")
                return self.pin.config
            config, _generation = found
            if self.pin.config is None or config.version > self.pin.config.version:
                self.pin = self.pins.remember(self.name, config)
            return self.pin.config

    def _once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning(message)


_memberships: dict[tuple[Path, str], Membership] = {}
_memberships_lock = threading.Lock()


def membership_for(home: Path, name: str) -> Membership:
    """The process's :class:`Membership` of channel ``name`` for ``home`` (made once, refreshed as due)."""
    key = (Path(home), name)
    with _memberships_lock:
        found = _memberships.get(key)
        if found is None:
            found = _memberships[key] = Membership(Path(home), name)
        return found


def members_with(home: Path, permission: str) -> frozenset[str]:
    """Node ids holding ``permission`` in any channel ``home`` joined, by the configs in force (each
    refreshed when due, so a revocation is seen within ``channel_refresh_seconds``). A channel whose
    config cannot be read adds no one."""
    found: set[str] = set()
    for name in Pins(home).names():
        try:
            found |= membership_for(home, name).config().members_with(permission)
        except UserError as exc:
            log.debug("channel %s: %s", name, exc)
    return frozenset(found)
