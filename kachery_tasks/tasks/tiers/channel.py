"""The channel tier: ask the channels this node joined for results that neither the local store nor the
buckets have.

Asked after the bucket tier. For each joined channel in which this node holds ``request_tasks``, a
miss is a ``request_result`` on the channel's transport: a member holding ``provide_tasks`` whose
store has the record publishes it to the channel's bucket with its blobs and upstream records, and
says so (``task_status``). The answer is then read from that bucket by a :class:`BucketTier` over it,
with every check of the bucket tier (signature, completeness, every byte verified), and trusted only
if its signer is this node, in ``trusted_nodes``, or a member holding ``provide_tasks`` in the
channel's config in force: a revoked member's records stop being served at the next refresh.

Asking costs a round trip, so it is done only when it can help: not when no member that may provide
is online (presence), and for a Dask graph once for all its ids (``missing`` sends their ids in
batches), not once per node. A channel that does not answer in time is a miss with the reason, and
the task is computed here: a pure result can always be computed, so a slow channel costs time, never
the run.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from pathlib import Path

from ... import config
from ...channels.envelope import Envelope
from ...channels.pins import Pins
from ...channels.requests import RequestFailed, ask, channels_allowing
from ...channels.session import ChannelSession
from ...errors import KacheryError
from ...identity import node_identity
from .base import ABSENT, Fetched, Hit, Miss, Tier
from .bucket import BucketTier

log = logging.getLogger("kachery_tasks")

#: Task ids per request (an envelope stays well under the transport's 60,000-byte limit).
IDS_PER_REQUEST = 1000


class ChannelTier(Tier):
    name = "channel"

    def __init__(self, home: str):
        self.home = home
        self.me = node_identity(Path(home)).node_id
        self._views: dict[str, tuple[int, BucketTier]] = {}  # channel -> (config version, tier over its bucket)

    @classmethod
    def for_home(cls, home: str) -> ChannelTier | None:
        """The tier when this home joined a channel, else None (nothing to ask)."""
        return cls(home) if Pins(Path(home)).names() else None

    # -- the protocol ----------------------------------------------------------------------------
    def get(self, task_id: str) -> Hit | Miss:
        reasons: list[str] = []
        for session in self._sessions():
            try:
                found = self._get(session, task_id, reasons)
            except KacheryError as exc:  # the channel unreachable: a miss that says so, then compute
                log.warning("channel %s: %s", session.name, exc)
                reasons.append(f"channel {session.name!r}: {exc}")
                continue
            if found is not None:
                return found
        return Miss("; ".join(reasons)) if reasons else ABSENT

    def _get(self, session: ChannelSession, task_id: str, reasons: list[str]) -> Hit | None:
        """The channel's answer for ``task_id``: from its bucket, else asked of its providers."""
        view = self.view(session)
        found = view.get(task_id)  # published to the channel's bucket already?
        if isinstance(found, Hit):
            return found
        if found.reason:  # records there, refused (untrusted, damaged): a provider would send the same
            reasons.append(found.reason)
            return None
        if not session.present("provide_tasks"):
            return None
        try:
            return ask(session, "request_result", {"task_ids": [task_id]}, check=lambda _a: _hit(view, task_id),
                       what=f"the result of task {task_id}", provider_permission="provide_tasks")
        except RequestFailed as exc:
            if "none has it" not in str(exc):
                reasons.append(str(exc))
            return None

    def missing(self, task_ids: Collection[str]) -> set[str]:
        left = set(task_ids)
        for session in self._sessions():
            if not left:
                break
            try:
                left = self._missing(session, left)
            except KacheryError as exc:  # unreachable: what it would have had is computed instead
                log.warning("channel %s: %s", session.name, exc)
        return left

    def _missing(self, session: ChannelSession, ids: set[str]) -> set[str]:
        """Of ``ids``, those the channel does not have after its providers were asked for them all."""
        view = self.view(session)
        left = view.missing(ids)
        if not left or not session.present("provide_tasks"):
            return left
        ordered = sorted(left)
        for start in range(0, len(ordered), IDS_PER_REQUEST):
            batch = ordered[start:start + IDS_PER_REQUEST]
            try:
                ask(session, "request_result", {"task_ids": batch}, check=lambda answers: _all_answered(session, answers),
                    what=f"the results of {len(batch)} task(s)", provider_permission="provide_tasks")
            except RequestFailed as exc:
                if "none has it" not in str(exc):
                    log.warning("%s", exc)
        return view.missing(left)

    def prefetch(self, task_ids: Collection[str]) -> Iterator[tuple[str, Fetched | Miss]]:
        """What ``missing`` had the providers publish, fetched in parallel from the channels' buckets
        (the bucket tier's prefetch, with its checks and the channel's trust)."""
        left = set(task_ids)
        for session in self._sessions():
            if not left:
                return
            try:
                for task_id, found in self.view(session).prefetch(sorted(left)):
                    if isinstance(found, Fetched):
                        left.discard(task_id)
                    yield task_id, found
            except KacheryError as exc:  # what is left is fetched, or computed, one by one
                log.warning("channel %s: %s", session.name, exc)

    def put(self, task_id: str, hit: Hit) -> None:
        """Nothing: a node publishes by its own choice (publish.py), or when a member asks."""

    # -- channels --------------------------------------------------------------------------------
    def _sessions(self) -> Iterator[ChannelSession]:
        if config.get("read_only"):
            return
        try:
            yield from channels_allowing(Path(self.home), "request_tasks")
        except KacheryError as exc:
            log.warning("channels: %s", exc)

    def view(self, session: ChannelSession) -> BucketTier:
        """A bucket tier over the channel's bucket, trusting its members with ``provide_tasks`` as
        the config in force says (rebuilt when the config changes, so revocation takes effect)."""
        cfg = session.config()
        held = self._views.get(session.name)
        if held is not None and held[0] == cfg.version:
            return held[1]
        trusted = [self.me] + [n for n in config.get("trusted_nodes") if n != self.me]
        trusted += sorted(cfg.members_with("provide_tasks") - set(trusted))
        view = BucketTier(self.home, [session.bucket], trusted)
        self._views[session.name] = (cfg.version, view)
        return view


def _hit(view: BucketTier, task_id: str) -> Hit | None:
    found = view.look_again(task_id)
    return found if isinstance(found, Hit) else None


def _all_answered(session: ChannelSession, answers: list[Envelope]) -> bool | None:
    """True once every provider online has answered (published what it had, or has none)."""
    providers = set(session.present("provide_tasks"))
    answered = {a.from_node for a in answers if a.body.get("status") in ("finished", "not_found", "error")}
    return True if providers and providers <= answered else None
