"""The receiving side of a channel: which messages a node acts on, and why it drops the others.

A message is acted on only if it is a well-formed envelope (:mod:`.envelope`) for this channel,
from a member that holds the permission its type needs in the config in force (refreshed, so a
revocation takes effect within ``channel_refresh_seconds``), timestamped within
``clock_window_seconds`` of this node's clock, with a nonce not seen in that window, and signed by
its sender. The cheap checks come first and the signature last; a nonce is remembered only once the
signature holds, so forged messages cannot fill the nonce memory or block a real sender's nonce.

A nonce needs remembering only for the width of the window: after that the timestamp check refuses a
replay by itself. Memory is therefore bounded by the message rate times twice the window.

Drops are logged at debug with their reason, and counted (:attr:`Gate.dropped`) for
``kachery node status``. One exception is louder: a message outside the clock window says by how
much, once per sender, at warning level, and when two or more members are off in the same direction
by about the same amount, the likely culprit is this node's own clock, and it says so. (kachery-cloud
rejected requests 42 s off with no explanation; users could not tell which clock was wrong.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from .. import config as kconfig
from .config import ChannelConfig
from .envelope import REQUIRED_PERMISSION, BadEnvelope, Envelope

log = logging.getLogger(__name__)


class Dropped(Exception):
    """Why a message is not acted on (one line)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


class Gate:
    """Checks messages for one channel against its current config (``current_config`` is called per message)."""

    def __init__(self, channel: str, current_config: Callable[[], ChannelConfig], *,
                 window_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.channel = channel
        self.current_config = current_config
        self.window_s = float(kconfig.get("clock_window_seconds") if window_s is None else window_s)
        self.clock = clock
        self.dropped: Counter[str] = Counter()
        self._nonces: dict[tuple[str, str], float] = {}
        self._prune_at = 0.0
        self._skews: dict[str, float] = {}
        self._warned_own_clock = False
        self._lock = threading.Lock()

    def admit(self, data: bytes) -> Envelope | None:
        """The envelope if it may be acted on, else None (the reason logged at debug and counted)."""
        try:
            return self.check(data)
        except Dropped as exc:
            self.dropped[exc.kind] += 1
            log.debug("channel %s: dropped a message: %s", self.channel, exc)
            return None

    def check(self, data: bytes) -> Envelope:
        """The envelope, or :class:`Dropped` saying why not."""
        try:
            env = Envelope.from_bytes(data)
        except BadEnvelope as exc:
            raise Dropped(f"malformed: {exc}", "malformed") from None
        sender = env.from_node[:12] + "…"
        if env.channel != self.channel:
            raise Dropped(f"{env.type} from {sender} is for channel {env.channel!r}", "wrong_channel")
        config = self.current_config()
        if not config.is_member(env.from_node):
            raise Dropped(f"{env.type} from {sender}: not a member of {self.channel!r}", "not_member")
        needed = REQUIRED_PERMISSION[env.type]
        if needed is not None and not config.allows(env.from_node, needed):
            raise Dropped(f"{env.type} from {sender}: the member lacks {needed}", "not_permitted")
        now = self.clock()
        skew = env.timestamp / 1000 - now
        if abs(skew) > self.window_s:
            self._note_skew(env.from_node, skew)
            where = "ahead of" if skew > 0 else "behind"
            raise Dropped(f"{env.type} from {sender} is {abs(skew):.1f} s {where} this node's clock "
                          f"(clock_window_seconds {self.window_s:g})", "clock")
        key = (env.from_node, env.nonce)
        with self._lock:
            if key in self._nonces:
                raise Dropped(f"{env.type} from {sender}: nonce already seen (a replay)", "replay")
        if not env.signature_ok():
            raise Dropped(f"{env.type} claiming to be from {sender}: bad signature", "bad_signature")
        with self._lock:
            if key in self._nonces:  # the same message twice at once: the second is the replay
                raise Dropped(f"{env.type} from {sender}: nonce already seen (a replay)", "replay")
            self._nonces[key] = now + 2 * self.window_s
            if now >= self._prune_at:
                self._nonces = {k: t for k, t in self._nonces.items() if t > now}
                self._prune_at = now + self.window_s
        return env

    def _note_skew(self, node_id: str, skew: float) -> None:
        with self._lock:
            first = node_id not in self._skews
            self._skews[node_id] = skew
            agreeing = [s for s in self._skews.values() if (s > 0) == (skew > 0) and abs(s - skew) < self.window_s / 2]
        where = "ahead of" if skew > 0 else "behind"
        if len(agreeing) >= 2 and not self._warned_own_clock:
            self._warned_own_clock = True
            own = "behind" if skew > 0 else "ahead of"
            log.warning("channel %s: this node's clock seems about %.0f s %s the others' (%d members agree); "
                        "messages are refused outside clock_window_seconds %g: set the time right (NTP)",
                        self.channel, abs(skew), own, len(agreeing), self.window_s)
        elif first:
            log.warning("channel %s: refused messages from %s…: their timestamps are %.1f s %s this node's "
                        "clock (clock_window_seconds %g); one of the two clocks is wrong: check NTP on both",
                        self.channel, node_id[:12], abs(skew), where, self.window_s)
