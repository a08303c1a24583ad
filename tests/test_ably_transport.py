"""The Ably transport's own faults, against the stand-in (tests/ably_standin.py) through the real
ably SDK: a connection dropped mid-stream (resumed, nothing lost), a lost resume (a gap, so the
requester re-checks the bucket), token auth renewed through ``auth_callback``, a key without the
publish capability, missing credentials and bad URIs (one line each). The conformance suite
(test_transports.py) and the node scenarios (test_channel_nodes.py, test_remote_tasks.py) run on
this transport too."""

from __future__ import annotations

import threading
import time

import pytest
from ably_standin import KEY_ENV, transport_uri

from kachery_tasks.channels.base import TransportError
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.errors import InvalidURI

WAIT = 10.0


class Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.gaps = 0
        self.cond = threading.Condition()

    def __call__(self, message: bytes) -> None:
        with self.cond:
            self.items.append(message)
            self.cond.notify_all()

    def on_gap(self) -> None:
        with self.cond:
            self.gaps += 1
            self.cond.notify_all()

    def wait(self, predicate, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), f"timed out waiting for {what}"


@pytest.fixture
def uri(ably_server, monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, ably_server.key.full)
    return transport_uri(ably_server)


def test_a_dropped_connection_resumes_with_nothing_lost(ably_server, uri):
    with open_transport(uri) as reader, open_transport(uri) as writer:
        inbox = Inbox()
        reader.subscribe("channel/lab", inbox, inbox.on_gap)
        writer.publish("channel/lab", b"before")
        inbox.wait(lambda: inbox.items == [b"before"], "the first message")
        ably_server.drop_connections(refuse_for=0.5)  # both connections gone for half a second
        sent = [b"during-%d" % i for i in range(5)]
        for message in sent:  # queued by the writer's SDK, delivered once it is back
            writer.publish("channel/lab", message)
        inbox.wait(lambda: len(inbox.items) == 6, "the messages published while disconnected")
        assert inbox.items == [b"before", *sent] and inbox.gaps == 0
        assert ably_server.counters["dropped"] >= 2


def test_a_lost_resume_is_a_gap(ably_server, uri):
    with open_transport(uri) as reader, open_transport(uri) as writer:
        inbox = Inbox()
        reader.subscribe("channel/lab", inbox, inbox.on_gap)
        writer.publish("channel/lab", b"one")
        inbox.wait(lambda: inbox.items == [b"one"], "the first message")
        ably_server.lose_resume()
        ably_server.drop_connections()
        inbox.wait(lambda: inbox.gaps >= 1, "the gap")
        writer.publish("channel/lab", b"two")  # and delivery goes on
        inbox.wait(lambda: inbox.items[-1:] == [b"two"], "a message after the gap")


def test_a_continuity_lost_on_a_live_channel_is_a_gap(ably_server, uri):
    with open_transport(uri) as reader:
        inbox = Inbox()
        reader.subscribe("channel/lab", inbox, inbox.on_gap)
        assert ably_server.break_continuity("channel/lab") == 1
        inbox.wait(lambda: inbox.gaps == 1, "the gap")


def test_token_auth_through_auth_callback_is_renewed_when_the_token_expires(ably_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    calls: list[object] = []

    def auth_callback(params):
        calls.append(params)  # in a real lab: the hub hands out a short-lived, restricted token
        return ably_server.issue_token(ttl=60_000, capability={"channel/*": ["publish", "subscribe", "presence"]})

    with open_transport(transport_uri(ably_server), auth_callback=auth_callback) as transport:
        inbox = Inbox()
        transport.subscribe("channel/lab", inbox, inbox.on_gap)
        transport.publish("channel/lab", b"first")
        inbox.wait(lambda: inbox.items == [b"first"], "the first message")
        assert len(calls) == 1
        assert ably_server.expire_tokens() == 1
        deadline = time.monotonic() + WAIT
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) == 2
        transport.publish("channel/lab", b"after renewal")
        inbox.wait(lambda: inbox.items[-1:] == [b"after renewal"], "a message on the renewed token")
        with pytest.raises(TransportError) as refused:  # the token's capability holds
            transport.publish("elsewhere", b"x")
        assert "capability" in str(refused.value) and "\n" not in str(refused.value)


def test_a_key_without_publish_is_one_line_naming_the_capability(ably_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, ably_server.key_no_publish.full)
    with open_transport(transport_uri(ably_server)) as transport, pytest.raises(TransportError) as refused:
        transport.publish("channel/lab", b"hello")
    text = str(refused.value)
    assert "40160" in text and "capability" in text and "publish" in text and "\n" not in text


def test_missing_credentials_and_bad_options_are_one_line(ably_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(TransportError) as missing:
        open_transport(transport_uri(ably_server))
    assert KEY_ENV in str(missing.value) and "\n" not in str(missing.value)
    monkeypatch.setenv(KEY_ENV, "standinApp.fullKey:wrong-secret")
    with pytest.raises(TransportError) as wrong:
        open_transport(transport_uri(ably_server), timeout=5)
    assert "API key" in str(wrong.value) and "\n" not in str(wrong.value)
    monkeypatch.setenv(KEY_ENV, ably_server.key.full)
    for bad in (f"ably://{ably_server.host}/?tls=maybe", f"ably://{ably_server.host}/?colour=red"):
        with pytest.raises(TransportError) as option:
            open_transport(bad)
        assert "\n" not in str(option.value) and ("tls" in str(option.value) or "colour" in str(option.value))
    with pytest.raises(InvalidURI):
        open_transport("ablyy://x")


def test_an_expired_first_token_is_renewed_and_a_refused_callback_fails_at_once(ably_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    calls: list[object] = []

    def auth_callback(params):
        calls.append(params)
        if len(calls) == 1:  # already expired when the connection presents it
            token = ably_server.issue_token(ttl=1)
            time.sleep(0.05)
            return token
        return ably_server.issue_token(ttl=60_000)

    with open_transport(transport_uri(ably_server), auth_callback=auth_callback) as transport:
        transport.publish("channel/lab", b"on the renewed token")
    assert len(calls) >= 2

    def refusing(params):
        raise RuntimeError("the hub said no")

    started = time.monotonic()
    with pytest.raises(TransportError) as refused:
        open_transport(transport_uri(ably_server), auth_callback=refusing)
    text = str(refused.value)
    assert time.monotonic() - started < 5 and "the hub said no" in text and "\n" not in text
