"""One conformance suite that every Transport implementation passes: ``memory://`` in this process
and ``redis://`` on a real redis-server (redis_fixtures.py), through the same tests. Nothing of
ours is mocked. The Redis-only tests restart and pause the server under a live subscription and
publish from another OS process.

Waiting is always on an event or a queue with a generous timeout; nothing asserts on timing. That a
message did *not* arrive is shown by a later marker that did: a subscriber gets messages in the
order the bus sent them, so once the marker is in, anything sent before it would be too.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from ably_standin import KEY_ENV, transport_uri
from redis_fixtures import DelayProxy, RedisServer, free_port

from kachery_tasks.channels import (
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    Transport,
    TransportError,
    open_transport,
)
from kachery_tasks.errors import InvalidURI, UserError

WAIT = 20.0
KINDS = ["memory", "redis", "ably"]
#: Options by kind. Redis: short timeouts and backoff, so that reconnects take a fraction of a second.
OPTIONS: dict[str, dict] = {
    "memory": {},
    "redis": {"timeout": 2.0, "poll_interval": 0.05, "max_backoff": 0.5},
    "ably": {"timeout": 5.0},
}


class Inbox:
    """A handler that queues what it gets, and an ``on_gap`` that counts."""

    def __init__(self) -> None:
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.gaps = 0
        self.gapped = threading.Event()

    def __call__(self, message: bytes) -> None:
        self.messages.put(message)

    def on_gap(self) -> None:
        self.gaps += 1
        self.gapped.set()

    def get(self, timeout: float = WAIT) -> bytes:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout:g} s") from None

    def take(self, n: int) -> list[bytes]:
        return [self.get() for _ in range(n)]

    def wait_gap(self) -> None:
        assert self.gapped.wait(WAIT), f"on_gap was not called within {WAIT:g} s"


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.01)


def threads_named(part: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if part in t.name and t.is_alive()]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def uri(kind: str, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return f"memory://t-{uuid.uuid4().hex[:12]}"
    if kind == "ably":
        return transport_uri(request.getfixturevalue("ably_server"))
    return request.getfixturevalue("redis_uri")


@pytest.fixture
def connect(uri: str, kind: str, request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Transport]]:
    """Open another transport on the test's URI (another node); all are closed at the end."""
    opened: list[Transport] = []
    if kind == "ably":
        monkeypatch.setenv(KEY_ENV, request.getfixturevalue("ably_server").key.full)

    def open_(**options: object) -> Transport:
        transport = open_transport(uri, **{**OPTIONS[kind], **options})
        opened.append(transport)
        return transport

    yield open_
    for transport in opened:
        transport.close()


@pytest.fixture
def transport(connect: Callable[..., Transport]) -> Transport:
    return connect()


# -- delivery ---------------------------------------------------------------------------------------
def test_a_message_reaches_every_subscriber_of_its_topic_and_no_other(transport: Transport) -> None:
    a1, a2, b, star = Inbox(), Inbox(), Inbox(), Inbox()
    transport.subscribe("a", a1)
    transport.subscribe("a", a2)
    transport.subscribe("b", b)
    transport.subscribe("a*", star)  # a topic, not a pattern
    transport.publish("a", b"hello")
    transport.publish("b", b"to b")
    transport.publish("a*", b"to a*")
    transport.publish("a", b"end")
    assert a1.take(2) == [b"hello", b"end"]
    assert a2.take(2) == [b"hello", b"end"]
    assert b.get() == b"to b"
    assert star.get() == b"to a*"


def test_order_from_one_publisher_is_kept(transport: Transport) -> None:
    inbox = Inbox()
    transport.subscribe("seq", inbox)
    sent = [b"%d" % i for i in range(300)]
    for message in sent:
        transport.publish("seq", message)
    assert inbox.take(len(sent)) == sent


def test_two_transports_on_one_uri_talk(connect: Callable[..., Transport]) -> None:
    one, two = connect(), connect()
    in_one, in_two = Inbox(), Inbox()
    one.subscribe("t", in_one)
    two.subscribe("t", in_two)
    two.publish("t", b"from two")
    assert in_one.get() == b"from two" and in_two.get() == b"from two"
    one.publish("t", b"from one")
    assert in_one.get() == b"from one" and in_two.get() == b"from one"
    one.announce("t", "node-one", b"hi", ttl=60)
    wait_for(lambda: two.present("t") == {"node-one": b"hi"}, "the announcement seen by the other")


def test_closing_a_subscription_stops_delivery_and_is_idempotent(transport: Transport) -> None:
    closed, open_ = Inbox(), Inbox()
    topic = f"c-{uuid.uuid4().hex[:8]}"
    subscription = transport.subscribe(topic, closed)
    transport.subscribe(topic, open_)
    transport.publish(topic, b"1")
    assert closed.get() == b"1" and open_.get() == b"1"
    subscription.close()
    subscription.close()
    transport.publish(topic, b"2")
    transport.publish(topic, b"3")
    assert open_.take(2) == [b"2", b"3"]
    assert closed.messages.empty()
    transport.close()
    transport.close()
    subscription.close()
    assert threads_named(topic) == [], "close() left a subscription's thread running"
    for call in (lambda: transport.publish(topic, b"x"), lambda: transport.subscribe(topic, Inbox()),
                 lambda: transport.present(topic)):
        with pytest.raises(TransportError) as e:
            call()
        assert transport.uri in one_line(e.value)


def test_closing_the_transport_stops_its_subscriptions(connect: Callable[..., Transport]) -> None:
    one, two = connect(), connect()
    in_one, in_two = Inbox(), Inbox()
    one.subscribe("t", in_one)
    two.subscribe("t", in_two)
    one.close()
    two.publish("t", b"after")
    two.publish("t", b"end")
    assert in_two.take(2) == [b"after", b"end"]
    assert in_one.messages.empty()


def test_a_handler_that_raises_does_not_stop_later_deliveries(transport: Transport,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()

    def handler(message: bytes) -> None:
        inbox(message)
        if message == b"bad":
            raise RuntimeError("handler failed")

    transport.subscribe("h", handler)
    for message in (b"good", b"bad", b"good again"):
        transport.publish("h", message)
    assert inbox.take(3) == [b"good", b"bad", b"good again"]
    assert any("raised" in r.getMessage() and r.exc_info for r in caplog.records), caplog.text


def test_a_handler_that_publishes_neither_deadlocks_nor_recurses(transport: Transport) -> None:
    echo, other = Inbox(), Inbox()
    depth = threading.local()

    def handler(message: bytes) -> None:
        assert getattr(depth, "inside", False) is False, "handler called from inside itself"
        depth.inside = True
        try:
            echo(message)
            if message == b"ping":
                transport.publish("echo", b"pong")  # its own topic
                transport.publish("other", b"pong")
        finally:
            depth.inside = False

    transport.subscribe("echo", handler)
    transport.subscribe("other", other)
    publisher = threading.Thread(target=transport.publish, args=("echo", b"ping"), daemon=True)
    publisher.start()  # on a thread of its own, so that a deadlock fails the test instead of hanging it
    publisher.join(WAIT)
    assert not publisher.is_alive(), "publish deadlocked"
    assert echo.take(2) == [b"ping", b"pong"]
    assert other.get() == b"pong"


def test_a_subscription_closed_from_its_own_handler(transport: Transport) -> None:
    first, second = Inbox(), Inbox()
    subscriptions = []

    def close_on_first(message: bytes) -> None:
        first(message)
        subscriptions[0].close()

    subscriptions.append(transport.subscribe("s", close_on_first))
    transport.subscribe("s", second)
    transport.publish("s", b"1")
    transport.publish("s", b"2")
    assert second.take(2) == [b"1", b"2"]
    assert first.get() == b"1"
    assert first.messages.empty()


def test_an_oversized_message_is_refused_and_nothing_is_sent(transport: Transport) -> None:
    inbox = Inbox()
    transport.subscribe("big", inbox)
    with pytest.raises(MessageTooLarge) as e:
        transport.publish("big", b"x" * (MAX_MESSAGE_BYTES + 1))
    assert "bucket" in one_line(e.value)
    largest = b"y" * MAX_MESSAGE_BYTES
    transport.publish("big", largest)
    assert inbox.get() == largest


def test_messages_are_bytes(transport: Transport) -> None:
    with pytest.raises(TypeError):
        transport.publish("t", "text")  # type: ignore[arg-type]
    inbox = Inbox()
    transport.subscribe("t", inbox)
    transport.publish("t", bytearray(b"\x00\xff"))
    assert inbox.get() == b"\x00\xff"


@pytest.mark.parametrize("topic", ["", "a b", "tab\t", "x" * 201, 7])
def test_invalid_topics_are_refused(transport: Transport, topic: object) -> None:
    for call in (lambda: transport.publish(topic, b"m"), lambda: transport.subscribe(topic, Inbox()),
                 lambda: transport.present(topic)):
        with pytest.raises(ValueError) as e:
            call()
        assert transport.uri in one_line(e.value)


# -- presence ---------------------------------------------------------------------------------------
def test_announce_then_present_lists_the_member_with_its_info(connect: Callable[..., Transport]) -> None:
    node, other = connect(), connect()
    node.announce("p", "node-a", b"info a", ttl=60)
    node.announce("p", "node-b", b"info b", ttl=60)
    # presence travels like messages: another node sees it within the bus's propagation (at once
    # on Redis and in memory; Ably sends it to the other connection)
    wait_for(lambda: other.present("p") == {"node-a": b"info a", "node-b": b"info b"}, "both members")
    node.announce("p", "node-a", b"newer", ttl=60)
    wait_for(lambda: other.present("p") == {"node-a": b"newer", "node-b": b"info b"}, "the newer info")
    assert other.present("nobody-here") == {}


def test_presence_is_per_topic_exactly(transport: Transport) -> None:
    """A topic that extends another, or looks like a glob, keeps its own members."""
    transport.announce("p", "in-p", b"1", ttl=60)
    transport.announce("p:q", "in-p-q", b"2", ttl=60)
    transport.announce("pz", "in-pz", b"3", ttl=60)
    transport.announce("p*", "in-p-star", b"4", ttl=60)
    transport.announce("p[a-z]", "in-p-class", b"5", ttl=60)
    assert transport.present("p") == {"in-p": b"1"}
    assert transport.present("p:q") == {"in-p-q": b"2"}
    assert transport.present("p*") == {"in-p-star": b"4"}
    assert transport.present("p[a-z]") == {"in-p-class": b"5"}


def test_a_member_disappears_after_its_ttl(transport: Transport) -> None:
    transport.announce("p", "leaving", b"l", ttl=60)
    transport.announce("p", "staying", b"s", ttl=60)
    assert set(transport.present("p")) == {"leaving", "staying"}
    transport.announce("p", "leaving", b"l", ttl=0.3)
    wait_for(lambda: "leaving" not in transport.present("p"), "the member with a 0.3 s ttl left")
    assert transport.present("p") == {"staying": b"s"}


@pytest.mark.parametrize("member, ttl", [("a:b", 60), ("", 60), ("a b", 60), ("ok", 0), ("ok", -1),
                                         ("ok", float("inf"))])
def test_invalid_presence_is_refused(transport: Transport, member: str, ttl: float) -> None:
    with pytest.raises(ValueError) as e:
        transport.announce("p", member, b"", ttl=ttl)
    assert transport.uri in one_line(e.value)


# -- URIs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    "", "nonsense", "memory://", "memory://a b", "memory://a/b", "ftp://host/x", "redis://",
    "redis://:6379/0", "redis://host:port/0", "redis://host:99999/0", "redis://host:6379/x",
    "redis://host:6379/0/1", "redis://host:6379/0?timeout=1", "rediss://host:6379/0#f", None,
])
def test_bad_uris_raise_invalid_uri_in_one_line(bad: str) -> None:
    with pytest.raises(InvalidURI) as e:
        open_transport(bad)
    text = one_line(e.value)
    assert repr(bad) in text or (bad and bad in text), text
    assert "memory://NAME" in text or "redis://" in text


def test_a_password_is_never_shown() -> None:
    with pytest.raises(InvalidURI) as e:
        open_transport("redis://:s3cret@host:notaport/0")
    assert "s3cret" not in one_line(e.value) and ":***@" in str(e.value)
    with open_transport(f"redis://:s3cret@127.0.0.1:{free_port()}/0", timeout=2.0) as transport:
        assert "s3cret" not in transport.uri and "s3cret" not in repr(transport)
        with pytest.raises(TransportError) as e:
            transport.publish("t", b"m")
        assert "s3cret" not in one_line(e.value)


def test_an_invalid_uri_is_a_user_error() -> None:
    with pytest.raises(UserError):
        open_transport("gopher://x")


def test_redis_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now fails as if not installed
    monkeypatch.delitem(sys.modules, "kachery_tasks.channels.redis", raising=False)
    with pytest.raises(UserError) as e:
        open_transport("redis://:s3cret@127.0.0.1:6379/0")
    text = one_line(e.value)
    assert "pip install 'kachery-tasks[redis]'" in text and "s3cret" not in text, text


# -- Redis only -------------------------------------------------------------------------------------
def open_redis(uri: str, **options: object) -> Transport:
    return open_transport(uri, **{**OPTIONS["redis"], **options})


def test_redis_restart_under_a_live_subscription_reports_the_gap(redis_server: RedisServer,
                                                                redis_uri: str) -> None:
    with open_redis(redis_uri) as transport:
        inbox = Inbox()
        transport.subscribe("r", inbox, inbox.on_gap)
        transport.publish("r", b"before")
        assert inbox.get() == b"before"
        redis_server.restart()
        inbox.wait_gap()
        transport.publish("r", b"after")
        assert inbox.get() == b"after"
        assert inbox.gaps == 1


def test_redis_subscribe_returns_once_the_server_confirmed(far_redis: DelayProxy, redis_uri: str) -> None:
    """A subscriber far from the server (its requests take 0.3 s to arrive) and a publisher next to
    it: what is published as soon as subscribe returns still reaches the subscriber."""
    with open_redis(far_redis.uri) as far, open_redis(redis_uri) as near:
        inbox = Inbox()
        far.subscribe("c", inbox)
        near.publish("c", b"right after")
        assert inbox.get() == b"right after"


def test_redis_server_that_stops_answering_is_noticed(redis_server: RedisServer, redis_uri: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP keeps the sockets open but answers nothing (a host gone, a NAT that forgot the flow):
    the subscription's PING goes unanswered, so it reconnects and reports the gap once it can."""
    with open_redis(redis_uri, timeout=1.0, ping_interval=0.2) as transport:
        inbox = Inbox()
        transport.subscribe("r", inbox, inbox.on_gap)
        redis_server.pause()
        try:
            wait_for(lambda: any("no answer to PING" in r.getMessage() for r in caplog.records),
                     "the subscription noticed the silent server")
        finally:
            redis_server.resume()
        inbox.wait_gap()
        transport.publish("r", b"after")
        assert inbox.get() == b"after"
        assert inbox.gaps == 1


def test_redis_unreachable_is_a_transport_error_in_one_line() -> None:
    uri = f"redis://127.0.0.1:{free_port()}/0"
    with open_redis(uri) as transport:
        for call in (lambda: transport.publish("t", b"m"), lambda: transport.announce("t", "me", b"", 1),
                     lambda: transport.present("t"), lambda: transport.subscribe("t", Inbox())):
            with pytest.raises(TransportError) as e:
                call()
            text = one_line(e.value)
            assert text.startswith(uri) and "cannot connect" in text and "redis-server" in text, text


def test_redis_messages_from_another_process_arrive(redis_uri: str, run_python: Callable) -> None:
    with open_redis(redis_uri) as transport:
        inbox = Inbox()
        transport.subscribe("proc", inbox)
        run_python("from kachery_tasks.channels import open_transport\n"
                   f"with open_transport({redis_uri!r}) as t:\n"
                   "    t.announce('proc', 'child', b'here', ttl=60)\n"
                   "    t.publish('proc', b'from the child')\n", timeout=60)
        assert inbox.get() == b"from the child"
        assert transport.present("proc") == {"child": b"here"}


# -- memory only ------------------------------------------------------------------------------------
def test_memory_subscriber_that_falls_behind_loses_messages_and_gets_a_gap() -> None:
    with open_transport(f"memory://t-{uuid.uuid4().hex[:12]}", max_queue=4) as transport:
        got: list[bytes] = []
        release = threading.Event()
        gaps = Inbox()

        def slow(message: bytes) -> None:
            got.append(message)
            if message == b"0":
                release.wait(WAIT)

        transport.subscribe("q", slow, gaps.on_gap)
        transport.publish("q", b"0")
        wait_for(lambda: got == [b"0"], "the handler is busy with the first message")
        for i in range(1, 11):
            transport.publish("q", b"%d" % i)  # 1-4 queued, 5-10 lost
        release.set()
        gaps.wait_gap()
        transport.publish("q", b"after")
        wait_for(lambda: got[-1:] == [b"after"], "a message after the gap arrives")
        assert got == [b"0", b"1", b"2", b"3", b"4", b"after"] and gaps.gaps == 1
