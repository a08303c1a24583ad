"""What a providing node does with each request: put the answer in the channel's bucket, then say so.

Each handler answers one request (an admitted envelope, :mod:`kachery_tasks.channels.gate`) for one
channel session. The answer itself is durable: the file, the feed's segments and head, the task record
with its blobs, written to the channel's bucket with create-if-absent (or, for a feed head, by
compare-and-swap); the message that follows (``upload_status``, ``subfeed_count``, ``task_status``)
only wakes the requester, who re-checks the bucket if it is lost. A node answers only what its
permissions let it provide; a node without the thing asked for says ``not_found`` at once, so a
requester whose every online provider lacks it stops waiting.

A node's action log (the task engine's record of what it did to the outside world) is never
provided: it is answered ``not_found``, as a feed the node does not hold.

Handlers are idempotent: a request sent again (same request id, after a lost message) publishes
nothing new, since the bucket already holds what the first one wrote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..buckets.feeds import publish_feed
from ..channels.envelope import Envelope
from ..channels.session import ChannelSession
from ..errors import KacheryError
from ..feeds.feed import Feed
from ..feeds.registry import local_names, stored_feed
from ..store.local import store_for
from ..tasks.actions import LOG_FEED as ACTION_LOG_FEED
from ..tasks.publish import plan_publish, send
from .outcome import Outcome

log = logging.getLogger("kachery_tasks.node")

_HEX64 = frozenset("0123456789abcdef")
#: How often an upload in progress is reported to the requester.
PROGRESS_EVERY_S = 1.0


def provide_file(session: ChannelSession, env: Envelope) -> Outcome:
    sha256 = env.body.get("sha256")
    if not _is_hex64(sha256):
        return _answer(session, env, "upload_status", Outcome("refused", "no valid sha256 in the request"), {"sha256": str(sha256)[:64]})
    if not session.config().allows(session.node_id, "provide_files"):
        return Outcome("refused", "this node lacks provide_files")  # silent: another member answers
    store = store_for(str(session.home))
    if not store.blobs.exists(sha256):
        return _answer(session, env, "upload_status", Outcome("not_found", "not in this node's store"), {"sha256": sha256})
    size = store.blobs.size(sha256)
    _send(session, env, "upload_status", {"sha256": sha256, "status": "started", "size": size})
    out = send(plan_publish(store, f"sha256://{sha256}"), store, session.writable_bucket(),
               progress=_upload_progress(session, env, sha256, size))
    return _answer(session, env, "upload_status", Outcome("finished", f"{size} bytes", out.bytes_sent),
                   {"sha256": sha256, "size": size})


def _upload_progress(session: ChannelSession, env: Envelope, sha256: str, size: int) -> Callable[[int], None]:
    """A progress callback that tells the requester how far an upload is, at most every
    :data:`PROGRESS_EVERY_S` seconds (the requester can show it; a lost one costs nothing)."""
    done = [0, time.monotonic()]

    def progress(nbytes: int) -> None:
        done[0] += nbytes
        now = time.monotonic()
        if now - done[1] >= PROGRESS_EVERY_S and done[0] < size:
            done[1] = now
            _send(session, env, "upload_status", {"sha256": sha256, "status": "uploading", "bytes": done[0], "size": size})

    return progress


def provide_result(session: ChannelSession, env: Envelope) -> Outcome:
    """Publish the records of ``task_ids`` this node holds (with blobs and upstream records)."""
    task_ids = env.body.get("task_ids")
    if not (isinstance(task_ids, list) and task_ids and all(_is_task_id(t) for t in task_ids)):
        return _answer(session, env, "task_status", Outcome("refused", "no valid task_ids in the request"), {})
    if not session.config().allows(session.node_id, "provide_tasks"):
        return Outcome("refused", "this node lacks provide_tasks")
    store = store_for(str(session.home))
    held = [t for t in task_ids if store.records.read(t) is not None]
    if not held:
        return _answer(session, env, "task_status", Outcome("not_found", "no success record here"), {"count": len(task_ids)})
    out = send(plan_publish(store, *held), store, session.writable_bucket())
    new = sum(out.records.values())
    return _answer(session, env, "task_status",
                   Outcome("finished", f"{len(held)} of {len(task_ids)} held, {len(out.records)} record(s) sent, {new} new",
                           out.bytes_sent), {"published": held})


def provide_feed(session: ChannelSession, env: Envelope) -> Outcome:
    feed_id = env.body.get("feed_id")
    if not _is_hex64(feed_id):
        return _answer(session, env, "subfeed_count", Outcome("refused", "no valid feed_id in the request"), {})
    if not session.config().allows(session.node_id, "provide_feeds"):
        return Outcome("refused", "this node lacks provide_feeds")
    feed = stored_feed(feed_id)
    private = feed_id == local_names().get(ACTION_LOG_FEED)
    if feed is None or feed.keys is None or private:  # a reader's copy: only the writer signs the feed's head
        why = ("feed not stored here" if feed is None or private
               else "only a reader's copy here; its writer publishes it")
        return _answer(session, env, "subfeed_count", Outcome("not_found", why), {"feed_id": feed_id})
    counts = republish_feed(session, feed, env.request_id)
    total = sum(counts.values())
    return _answer(session, env, "subfeed_count", Outcome("finished", f"{total} message(s)", count=total),
                   {"feed_id": feed_id, "counts": counts})


def republish_feed(session: ChannelSession, feed: Feed, request_id: str | None = None) -> dict[str, int]:
    """Publish ``feed``'s new messages to the channel's bucket; without a ``request_id`` (a feed that
    grew), announce the new counts to the channel with a ``subfeed_count`` of its own."""
    published = publish_feed(feed, session.writable_bucket())
    counts = {name: entry["messages"] for name, entry in published.subfeeds.items()}
    if request_id is None:
        _send_new(session, "subfeed_count", {"feed_id": feed.feed_id, "counts": counts, "status": "finished"})
    return counts


def feed_size(feed: Feed) -> int:
    """Messages in all of ``feed``'s subfeeds here."""
    return sum(len(feed.subfeed(name)) for name in feed.subfeeds())


#: Request types this daemon answers, with their handler.
HANDLERS: dict[str, Callable[[ChannelSession, Envelope], Outcome]] = {
    "request_file": provide_file,
    "request_result": provide_result,
    "request_subfeed": provide_feed,
}  # request_task: node/serving.py admits it and node/runner.py runs it (daemon.py)


def handle(session: ChannelSession, env: Envelope) -> Outcome:
    """Answer ``env``; an error while answering becomes an ``error`` answer, never a dead daemon."""
    handler = HANDLERS[env.type]
    try:
        return handler(session, env)
    except KacheryError as exc:
        kind = {"request_file": "upload_status", "request_result": "task_status"}.get(env.type, "subfeed_count")
        return _answer(session, env, kind, Outcome("error", str(exc).splitlines()[0][:300]), {})


def _answer(session: ChannelSession, env: Envelope, type: str, outcome: Outcome, body: dict) -> Outcome:
    payload = {**body, "status": outcome.status}
    if outcome.detail and outcome.status != "finished":
        payload["detail"] = outcome.detail
    _send(session, env, type, payload)
    return outcome


def _send(session: ChannelSession, env: Envelope, type: str, body: dict) -> None:
    try:
        session.send(type, body, request_id=env.request_id)
    except KacheryError as exc:  # the answer is in the bucket; the requester finds it there
        log.warning("channel %s: could not send %s for request %s: %s", session.name, type, env.request_id[:8], exc)


def _send_new(session: ChannelSession, type: str, body: dict) -> None:
    try:
        session.send(type, body)
    except KacheryError as exc:
        log.warning("channel %s: could not send %s: %s", session.name, type, exc)


def _is_task_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and set(value) <= _HEX64


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64
