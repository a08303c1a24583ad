"""Asking a channel: the requester's side, with no daemon (the library listens for as long as it waits).

:func:`ask` publishes a request and waits until ``check`` finds the answer. The answer is a durable
object in the channel's bucket (the file, the feed head, the task record), never the message that
announces it: Redis pub/sub loses what is published while a subscriber reconnects, so the requester
re-checks the bucket on every answer, after every gap the transport reports, and once a second, and
sends the request again (same request id, new nonce) every :data:`RESEND_S` seconds in case the
request itself was lost. Providers treat a repeated request id as the same request. A lost message
costs time, never a wrong or missing answer.

It gives up, with one line naming what was asked, of whom and for how long:

- when every member that may provide it and is online has answered that it does not have it;
- when no member that may provide it is online (after :data:`NO_PROVIDER_GRACE_S`, since presence is
  refreshed every few seconds);
- after ``request_timeout`` (config key, seconds) without word from a provider: the time counts
  from the request, and again from each message saying the work goes on (:data:`PROGRESS`: queued,
  running, uploading), so an upload of hours or a task of hours is waited for as long as its
  provider reports on it, and a provider that goes silent is given up on within the timeout.

The file source registered here (``store.files.FETCHERS``) is what makes ``kt.load_file(uri)`` and
``kachery load`` ask the channels this node joined when the store and the buckets miss; the feed
source (``feeds.sources.FETCHERS``) does the same for ``kt.load_feed``.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import config
from ..buckets.base import BucketError, NotFound
from ..buckets.feeds import pull_feed
from ..buckets.transfer import download_blob
from ..errors import UserError
from ..feeds import sources as feed_sources
from ..feeds.registry import stored_feed
from ..store.blobs import BlobStore
from ..store.files import FETCHERS as FILE_FETCHERS
from .envelope import Envelope, new_request_id
from .pins import Pins
from .session import GAP, ChannelSession, session_for

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Statuses of an answer that mean "not from me".
NEGATIVE = frozenset({"not_found", "error", "refused"})
#: Statuses that mean "working on it": each starts the wait for the answer again.
PROGRESS = frozenset({"queued", "running", "started", "uploading"})
#: Send the request again after this long without the answer (it may have been lost).
RESEND_S = 5.0
#: With no provider online, wait this long for one to appear before giving up.
NO_PROVIDER_GRACE_S = 3.0


class RequestFailed(UserError):
    """A request to a channel that got no answer: what, of whom, for how long (one line)."""


def ask(session: ChannelSession, type: str, body: dict[str, Any], *, check: Callable[[list[Envelope]], T | None],
        what: str, provider_permission: str, timeout: float | None = None, request_id: str | None = None,
        renewed: Callable[[], float] | None = None) -> T:
    """Publish request ``type`` and return ``check(answers)`` once it is not None (see the module doc).
    ``request_id``: the caller's own (one whose durable answer ``check`` looks for), else a new one.
    ``check`` may raise to give up sooner (a refusal, a provider that stopped heartbeating).
    ``renewed``: when the caller last started the wait over (a monotonic time: it asked again
    because the provider it waited on died), which the timeout then counts from."""
    limit = float(config.get("request_timeout") if timeout is None else timeout)
    started = time.monotonic()
    deadline = started + limit
    request_id = request_id or new_request_id()
    answers: list[Envelope] = []
    negative: dict[str, str] = {}
    with session.waiting(request_id) as events:
        session.send(type, body, request_id=request_id)
        sent = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                item = events.get(timeout=max(0.0, min(1.0, deadline - now)))
            except queue.Empty:
                item = None
            if isinstance(item, Envelope):
                answers.append(item)
                status = item.body.get("status")
                if status in PROGRESS:
                    deadline = time.monotonic() + limit
                elif status in NEGATIVE:
                    negative[item.from_node] = f"{status}: {item.body.get('detail', '')}".rstrip(": ")
            elif item is GAP:
                log.info("channel %s: the bus reconnected while waiting for %s; re-checking the bucket", session.name, what)
            found = check(answers)
            if found is not None:
                return found
            now = time.monotonic()
            if renewed is not None:
                deadline = max(deadline, renewed() + limit)
            providers = session.present(provider_permission)
            whom = f"{len(providers)} member(s) with {provider_permission} online in channel {session.name!r}"
            if providers and set(providers) <= set(negative):
                reasons = "; ".join(f"{n[:12]}… {r}" for n, r in sorted(negative.items()))
                raise RequestFailed(f"asked {whom} for {what}: none has it ({reasons})")
            if not providers and now - started >= min(NO_PROVIDER_GRACE_S, limit):
                raise RequestFailed(f"asked channel {session.name!r} for {what}: no member with {provider_permission} "
                                    f"is online (start one with `kachery node start --channel {session.name}`)")
            if now >= deadline:
                heard = "no answer" if not answers else "no word from a provider"
                raise RequestFailed(f"asked {whom} for {what}: {heard} in {limit:g} s (config request_timeout)")
            if now - sent >= RESEND_S:
                session.send(type, body, request_id=request_id)
                sent = now


def channels_allowing(home: Path, permission: str) -> list[ChannelSession]:
    """Sessions of the channels ``home`` joined in which this node holds ``permission``."""
    found = []
    for name in Pins(home).names():
        try:  # a channel whose bucket cannot be opened is passed over, with one warning
            session = session_for(home, name)
            if session.config().allows(session.node_id, permission):
                found.append(session)
        except UserError as exc:
            log.warning("channel %s: %s", name, exc)
    return found


# -- files -----------------------------------------------------------------------------------------

def request_file(session: ChannelSession, sha256: str, blobs: BlobStore, *, timeout: float | None = None) -> None:
    """Bring file ``sha256`` into ``blobs`` through the channel: from its bucket, asking a provider
    to upload it there first if it is missing. Verified as every bucket download is."""

    def check(_answers: list[Envelope]) -> bool | None:
        try:
            download_blob(session.bucket, blobs, sha256)
        except NotFound:
            return None
        return True

    if check([]) is None:
        ask(session, "request_file", {"sha256": sha256}, check=check, what=f"sha256://{sha256}",
            provider_permission="provide_files", timeout=timeout)


def fetch_from_channels(sha256: str, blobs: BlobStore) -> bool:
    """The file source of ``store.files.FETCHERS``: ask each joined channel that lets this node
    request files. A channel that was asked and failed raises its one line (naming what was asked,
    of whom, for how long) when no channel had the file."""
    if config.get("read_only"):
        return False
    failure: RequestFailed | None = None
    for session in channels_allowing(config.home(), "request_files"):
        try:
            request_file(session, sha256, blobs)
            return True
        except RequestFailed as exc:
            failure = exc
        except BucketError as exc:
            log.warning("channel %s: %s", session.name, exc)
    if failure is not None:
        raise failure
    return False


# -- feeds -----------------------------------------------------------------------------------------

def request_feed(session: ChannelSession, feed_id: str, *, timeout: float | None = None) -> dict[str, int]:
    """Have a member that holds feed ``feed_id`` publish it to the channel's bucket, then pull it
    (verified: signatures, chain, checkpoints). Returns the messages added per subfeed."""

    def check(answers: list[Envelope]) -> dict[str, int] | None:
        if not any(a.body.get("status") == "finished" for a in answers):
            return None
        return pull_feed(feed_id, session.bucket) or {}

    return ask(session, "request_subfeed", {"feed_id": feed_id}, check=check, what=f"feed {feed_id[:16]}…",
               provider_permission="provide_feeds", timeout=timeout)


def fetch_feed_from_channels(feed_id: str) -> int | None:
    """The feed source of ``feeds.sources.FETCHERS``: messages added from the joined channels, or
    None if none of them has the feed.

    A feed this home does not hold yet is asked for (a provider publishes it to the channel's
    bucket). One it holds is only brought up to date from the channels' buckets, with no request: a
    reader calls ``load_feed`` often, and a provider daemon publishes the feeds it was asked for
    again as they grow."""
    if config.get("read_only"):
        return None
    added: int | None = None
    held = stored_feed(feed_id) is not None
    for session in channels_allowing(config.home(), "request_feeds"):
        try:
            counts = pull_feed(feed_id, session.bucket) if held else request_feed(session, feed_id)
        except RequestFailed as exc:
            log.info("%s", exc)
            continue
        except BucketError as exc:
            log.warning("channel %s: %s", session.name, exc)
            continue
        if counts is not None:
            added = (added or 0) + sum(counts.values())
    return added


FILE_FETCHERS.append(fetch_from_channels)
feed_sources.FETCHERS.append(fetch_feed_from_channels)
