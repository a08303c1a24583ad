"""The Ably stand-in (tests/ably_standin.py) spoken to by the unmodified ``ably`` SDK, and nothing else.

Each test runs its own event loop (``asyncio.run``); the server runs in its own thread and loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ably import AblyRealtime, AblyRest
from ably.types.channelstate import ChannelState, ChannelStateChange
from ably.types.connectionstate import ConnectionState, ConnectionStateChange
from ably.util.exceptions import AblyException
from ably_standin import AblyStandin

WAIT = 5.0


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 25))


FULL_KEY = object()


async def connected(server: AblyStandin, key: Any = FULL_KEY, **options: Any) -> AblyRealtime:
    """A realtime client (with ``key=None``: no key, token auth from the options) once CONNECTED."""
    client = AblyRealtime(**server.client_options(server.key if key is FULL_KEY else key, **options))
    await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), WAIT)
    return client


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def inbox(channel) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()
    await channel.subscribe(queue.put_nowait)
    return queue


@pytest.mark.parametrize(("a_binary", "b_binary"), [(False, False), (True, True), (False, True)],
                         ids=["json-json", "msgpack-msgpack", "json-msgpack"])
def test_publish_and_subscribe_both_ways(ably_server: AblyStandin, a_binary: bool, b_binary: bool) -> None:
    async def main() -> None:
        a = await connected(ably_server, binary=a_binary, client_id="alice")
        b = await connected(ably_server, binary=b_binary, client_id="bob")
        ca, cb = a.channels.get("room"), b.channels.get("room")
        await ca.attach()
        await cb.attach()
        qa, qb = await inbox(ca), await inbox(cb)

        await ca.publish("from-a", {"n": 1, "s": "é"})
        got = await asyncio.wait_for(qb.get(), WAIT)
        assert (got.name, got.data, got.client_id) == ("from-a", {"n": 1, "s": "é"}, "alice")
        assert got.connection_id == a.connection.connection_manager.connection_id
        assert got.id.startswith(got.connection_id + ":")
        assert (await asyncio.wait_for(qa.get(), WAIT)).name == "from-a"  # echo is on by default

        await cb.publish("from-b", b"\x00\xffbytes")
        got = await asyncio.wait_for(qa.get(), WAIT)
        assert (got.name, bytes(got.data), got.client_id) == ("from-b", b"\x00\xffbytes", "bob")
        await cb.publish("text", "plain")
        assert (await asyncio.wait_for(qa.get(), WAIT)).data == "plain"

        assert ably_server.counters["acks"] == 3
        await a.close()
        await b.close()

    run(main)


def test_echo_false_keeps_own_messages_away(ably_server: AblyStandin) -> None:
    async def main() -> None:
        a = await connected(ably_server, transport_params={"echo": "false"})
        b = await connected(ably_server)
        ca, cb = a.channels.get("quiet"), b.channels.get("quiet")
        await ca.attach()
        await cb.attach()
        qa, qb = await inbox(ca), await inbox(cb)
        await ca.publish("one", "1")
        await cb.publish("two", "2")
        assert (await asyncio.wait_for(qb.get(), WAIT)).name == "one"
        assert (await asyncio.wait_for(qa.get(), WAIT)).name == "two"
        assert (await asyncio.wait_for(qb.get(), WAIT)).name == "two"
        assert qa.empty()
        await a.close()
        await b.close()

    run(main)


def test_presence_enter_get_and_leave_on_close(ably_server: AblyStandin) -> None:
    async def main() -> None:
        a = await connected(ably_server, client_id="alice")
        b = await connected(ably_server, binary=True, client_id="bob")
        ca = a.channels.get("lobby")
        await ca.attach()
        await ca.presence.enter({"status": "here"})
        await ca.presence.update({"status": "busy"})

        cb = b.channels.get("lobby")
        events: list[tuple[str, str]] = []
        await cb.presence.subscribe(lambda m: events.append((m.action, m.client_id)))
        await cb.attach()  # attaches with HAS_PRESENCE, then a SYNC
        members = await cb.presence.get()
        assert [(m.client_id, m.data) for m in members] == [("alice", {"status": "busy"})]
        assert members[0].connection_id == a.connection.connection_manager.connection_id

        await cb.presence.enter()
        await until(lambda: len(ably_server.presence_members("lobby")) == 2, "bob to be present")
        assert sorted(m.client_id for m in await ca.presence.get()) == ["alice", "bob"]

        await a.close()  # CLOSE: alice's member leaves at once
        await until(lambda: (3, "alice") in events, "alice's leave")  # PresenceAction.LEAVE == 3
        assert [m.client_id for m in await cb.presence.get()] == ["bob"]
        await cb.presence.leave()
        await until(lambda: ably_server.presence_members("lobby") == [], "bob's leave")
        await b.close()

    run(main)


def test_presence_of_a_vanished_connection_times_out_and_comes_back(ably_server: AblyStandin) -> None:
    async def main() -> None:
        a = await connected(ably_server, client_id="alice")
        b = await connected(ably_server, client_id="bob")
        ca, cb = a.channels.get("lobby"), b.channels.get("lobby")
        await ca.attach()
        await cb.attach()
        events: list[tuple[int, str]] = []
        await cb.presence.subscribe(lambda m: events.append((m.action, m.client_id)))
        await ca.presence.enter("hi")
        await until(lambda: (2, "alice") in events, "alice's enter")

        ably_server.drop_connections(refuse_for=ably_server.presence_timeout + 1.5)  # an outage
        await until(lambda: ably_server.counters["presence_left_by_server"] == 1, "the presence timeout")
        assert ably_server.presence_members("lobby") == []  # the server let alice go ...
        assert a.connection.state != ConnectionState.CONNECTED
        await until(lambda: (3, "alice") in events, "alice's leave (queued for bob, then resumed)")
        # ... and once back (resumed), the SDK re-enters her member by itself (RTP17g)
        await until(lambda: [m["clientId"] for m in ably_server.presence_members("lobby")] == ["alice"],
                    "alice's re-entry")
        await until(lambda: events.count((2, "alice")) == 2, "bob seeing alice enter again")
        assert ably_server.counters["resumed"] == 2
        await a.close()
        await b.close()

    run(main)


def test_publish_without_publish_capability_is_refused(ably_server: AblyStandin) -> None:
    async def main() -> None:
        client = await connected(ably_server, key=ably_server.key_no_publish)
        channel = client.channels.get("read-only")
        await channel.attach()  # subscribe is allowed
        assert channel.state == ChannelState.ATTACHED
        with pytest.raises(AblyException) as info:
            await channel.publish("nope", "x")
        assert info.value.code == 40160
        assert info.value.status_code == 401
        assert "publish" in info.value.message
        assert ably_server.counters["nack:40160"] == 1
        assert client.connection.state == ConnectionState.CONNECTED  # a NACK, not a connection error
        await client.close()

    run(main)


def test_oversized_messages_are_refused(ably_server: AblyStandin) -> None:
    async def main() -> None:
        client = await connected(ably_server)
        channel = client.channels.get("big")
        await channel.attach()
        # over 64 KiB: the SDK refuses it itself (ably/util/helper.py validate_message_size), 40009
        with pytest.raises(AblyException) as info:
            await channel.publish("huge", "x" * 70_000)
        assert info.value.code == 40009
        assert ably_server.counters["recv:MESSAGE"] == 0

        # a server with a lower limit than the SDK's hard-coded 65536: the server NACKs, 40009
        ably_server.max_message_size = 10_000
        with pytest.raises(AblyException) as info:
            await channel.publish("large", "y" * 20_000)
        assert (info.value.code, info.value.status_code) == (40009, 400)
        assert ably_server.counters["nack:40009"] == 1
        await channel.publish("small", "z" * 9_000)
        await client.close()

    run(main)


def test_resume_delivers_what_was_published_while_disconnected(ably_server: AblyStandin) -> None:
    async def main() -> None:
        a = await connected(ably_server)
        b = await connected(ably_server, binary=True)
        rest = AblyRest(**ably_server.client_options(ably_server.key, use_token_auth=True))
        ca, cb = a.channels.get("stream"), b.channels.get("stream")
        await ca.attach()
        await cb.attach()
        qb = await inbox(cb)
        changes: list[ChannelStateChange] = []
        cb.on(lambda change: changes.append(change))
        b_id = b.connection.connection_manager.connection_id
        await ca.publish("before", "0")
        assert (await asyncio.wait_for(qb.get(), WAIT)).name == "before"

        assert ably_server.drop_connections(refuse_for=0.8) == 2
        await rest.channels.get("stream").publish("during-rest", "1")
        publish_a = asyncio.create_task(ca.publish("during-a", "2"))  # queued by the SDK, sent on resume
        await until(lambda: ably_server.counters["backlogged"] >= 1, "a message queued for b")
        assert b.connection.state != ConnectionState.CONNECTED

        names = [(await asyncio.wait_for(qb.get(), WAIT)).name for _ in range(2)]
        assert sorted(names) == ["during-a", "during-rest"]
        await asyncio.wait_for(publish_a, WAIT)
        assert b.connection.connection_manager.connection_id == b_id  # the same connection
        assert ably_server.counters["resumed"] == 2
        # the queued messages come right after CONNECTED, the SDK's re-ATTACH (RESUMED) after them
        await until(lambda: any(c.current == ChannelState.ATTACHED for c in changes), "b's re-attach")
        reattached = [c for c in changes if c.current == ChannelState.ATTACHED]
        assert all(c.resumed for c in reattached)
        await ca.publish("after", "3")
        assert (await asyncio.wait_for(qb.get(), WAIT)).name == "after"
        assert qb.empty()
        await rest.close()
        await a.close()
        await b.close()

    run(main)


def test_lost_resume_shows_as_attached_without_resumed(ably_server: AblyStandin) -> None:
    async def main() -> None:
        client = await connected(ably_server)
        channel = client.channels.get("stream")
        await channel.attach()
        old_id = client.connection.connection_manager.connection_id
        channel_changes: list[ChannelStateChange] = []
        connection_changes: list[ConnectionStateChange] = []
        channel.on(lambda change: channel_changes.append(change))
        client.connection.on(lambda change: connection_changes.append(change))

        ably_server.lose_resume()
        ably_server.drop_connections()
        await until(lambda: any(c.current == ChannelState.ATTACHED for c in channel_changes), "a re-attach")
        back = [c for c in channel_changes if c.current == ChannelState.ATTACHED][-1]
        assert back.previous == ChannelState.ATTACHING and back.resumed is False
        assert client.connection.connection_manager.connection_id != old_id
        assert ably_server.counters["resume_failed"] == 1
        reconnected = [c for c in connection_changes if c.current == ConnectionState.CONNECTED][-1]
        assert reconnected.reason is not None and reconnected.reason.code == 80008
        await client.close()

    run(main)


def test_token_auth_through_auth_callback_and_renewal(ably_server: AblyStandin) -> None:
    async def main() -> None:
        signer = AblyRest(**ably_server.client_options(ably_server.key))  # holds the key, never calls out
        calls: list[dict] = []

        async def auth_callback(token_params: dict):
            calls.append(token_params)
            if len(calls) == 3:  # an app server may hand out TokenDetails too
                return ably_server.issue_token(client_id="carol", ttl=60_000)
            return await signer.auth.create_token_request(
                {"client_id": "carol", "ttl": 60_000, "capability": {"tokens:*": ["publish", "subscribe"]}})

        client = await connected(ably_server, key=None, auth_callback=auth_callback, binary=True)
        assert ably_server.counters["tokens_issued"] == 1 and len(calls) == 1
        assert client.auth.client_id == "carol"
        channel = client.channels.get("tokens:one")
        await channel.attach()
        queue = await inbox(channel)
        await channel.publish("first", "1")
        assert (await asyncio.wait_for(queue.get(), WAIT)).client_id == "carol"
        with pytest.raises(AblyException) as info:  # the token's capability, not the key's
            await client.channels.get("elsewhere").attach()
        assert info.value.code == 40160
        conn_id = client.connection.connection_manager.connection_id
        states: list[ConnectionStateChange] = []
        client.connection.on(lambda change: states.append(change))

        assert ably_server.expire_tokens() == 1  # DISCONNECTED 40142 -> auth_callback -> resume
        # (the SDK calls auth_callback while its state still says CONNECTED over a disposed transport:
        # wait for DISCONNECTED -> CONNECTING -> CONNECTED, not for the callback)
        await until(lambda: [c.current for c in states][-3:] == [
            ConnectionState.DISCONNECTED, ConnectionState.CONNECTING, ConnectionState.CONNECTED], "a resume")
        assert len(calls) == 2
        assert states[0].reason is not None and states[0].reason.code == 40142
        assert client.connection.connection_manager.connection_id == conn_id
        await until(lambda: channel.state == ChannelState.ATTACHED, "the channel back")
        await channel.publish("second", "2")
        assert (await asyncio.wait_for(queue.get(), WAIT)).name == "second"

        updates: list[ConnectionStateChange] = []
        client.connection.on("update", lambda change: updates.append(change))
        assert ably_server.request_reauth() == 1  # AUTH from the server -> in-band AUTH from the SDK
        await until(lambda: len(calls) == 3 and ably_server.counters["reauth"] == 1, "in-band re-auth")
        await until(lambda: len(updates) == 1, "the connection's update event")
        await channel.publish("third", "3")
        assert (await asyncio.wait_for(queue.get(), WAIT)).name == "third"
        assert ably_server.counters["disconnected_token_expired"] == 1
        await client.close()
        await signer.close()

    run(main)


def test_rest_client_token_request_time_and_presence(ably_server: AblyStandin) -> None:
    async def main() -> None:
        rest = AblyRest(**ably_server.client_options(ably_server.key, binary=True, use_token_auth=True))
        server_ms = await rest.time()
        assert abs(server_ms - time.time() * 1000) < 5_000
        a = await connected(ably_server, client_id="dave")
        channel = a.channels.get("rest-side")
        await channel.attach()
        await channel.presence.enter("x")
        await until(lambda: len(ably_server.presence_members("rest-side")) == 1, "dave present")
        members = await rest.channels.get("rest-side").presence.get()
        assert [m.client_id for m in members.items] == ["dave"]
        assert ably_server.counters["tokens_issued"] == 1

        # a forged TokenRequest is refused
        forger = AblyRest(**ably_server.client_options(f"{ably_server.key.name}:wrong-secret"))
        forged = await forger.auth.create_token_request({"client_id": "eve"})
        victim = AblyRest(**ably_server.client_options(auth_callback=_returning(forged)))
        with pytest.raises(AblyException) as info:
            await victim.auth.authorize()
        assert info.value.code == 40101
        # a replayed (genuine) TokenRequest too
        genuine = await rest.auth.create_token_request({"client_id": "eve"})
        first = AblyRest(**ably_server.client_options(auth_callback=_returning(genuine)))
        await first.auth.authorize()
        replay = AblyRest(**ably_server.client_options(auth_callback=_returning(genuine)))
        with pytest.raises(AblyException) as info:
            await replay.auth.authorize()
        assert info.value.code == 40105
        for client in (forger, victim, first, replay):
            await client.close()
        await rest.close()
        await a.close()

    run(main)


def _returning(value: Any) -> Callable[[dict], Awaitable[Any]]:
    async def callback(_params: dict) -> Any:
        return value
    return callback


def test_detach_stops_delivery_and_ping_is_echoed(ably_server: AblyStandin) -> None:
    async def main() -> None:
        a = await connected(ably_server)
        b = await connected(ably_server, binary=True)
        ca, cb = a.channels.get("d"), b.channels.get("d")
        await ca.attach()
        await cb.attach()
        qb = await inbox(cb)
        assert await a.connection.ping() >= 0  # HEARTBEAT with an id, echoed
        assert await b.connection.ping() >= 0
        await cb.detach()
        assert cb.state == ChannelState.DETACHED
        assert ably_server.counters["recv:DETACH"] == 1
        await ca.publish("unseen", "x")
        await cb.attach()
        await ca.publish("seen", "y")
        assert (await asyncio.wait_for(qb.get(), WAIT)).name == "seen"
        await a.close()
        await b.close()

    run(main)


def test_server_heartbeats_keep_an_idle_connection_up(ably_server: AblyStandin) -> None:
    async def main() -> None:
        ably_server.max_idle_interval = 200  # the SDK's idle timer: 200 + realtime_request_timeout ms
        ably_server.heartbeat_interval = 0.1
        client = await connected(ably_server, realtime_request_timeout=300)
        changes: list[ConnectionStateChange] = []
        client.connection.on(lambda change: changes.append(change))
        await asyncio.sleep(1.2)
        assert changes == []  # heartbeats arrive: nothing happens

        ably_server.heartbeat_interval = 30  # the server goes silent
        await until(lambda: any(c.current == ConnectionState.DISCONNECTED for c in changes), "the idle timeout")
        lost = next(c for c in changes if c.current == ConnectionState.DISCONNECTED)
        assert lost.reason is not None and lost.reason.code == 80003
        await client.close()

    run(main)


def test_connecting_with_an_expired_token_renews_it(ably_server: AblyStandin) -> None:
    async def main() -> None:
        tokens = [ably_server.issue_token(ttl=-1000), ably_server.issue_token(ttl=60_000)]
        calls: list[dict] = []

        async def auth_callback(token_params: dict) -> Any:
            calls.append(token_params)
            return tokens[len(calls) - 1]["token"]  # a bare token string

        client = await connected(ably_server, key=None, auth_callback=auth_callback)
        assert len(calls) == 2
        assert ably_server.counters["connect_refused:40142"] == 1
        channel = client.channels.get("t")
        await channel.attach()
        await channel.publish("ok", "1")
        await client.close()

    run(main)


def test_realtime_host_with_a_port_reaches_the_standin(ably_server: AblyStandin) -> None:
    """What an Ably transport configured only with ``realtime_host`` gets (REST would not work: see
    ably_standin's docstring); and a key with a narrower capability from ``add_key``."""
    async def main() -> None:
        narrow = ably_server.add_key("narrow", {"chat-*": ["subscribe", "publish"]})
        client = AblyRealtime(key=narrow.full, realtime_host=ably_server.host, tls=False)
        await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), WAIT)
        await client.channels.get("chat-1").publish("hello", "there")
        with pytest.raises(AblyException) as info:
            await client.channels.get("other").attach()
        assert info.value.code == 40160
        await client.close()

    run(main)


def test_break_continuity_shows_as_an_update_without_resumed(ably_server: AblyStandin) -> None:
    async def main() -> None:
        client = await connected(ably_server)
        channel = client.channels.get("c")
        await channel.attach()
        updates: list[ChannelStateChange] = []
        channel.on("update", lambda change: updates.append(change))
        assert ably_server.break_continuity("c") == 1
        await until(lambda: len(updates) == 1, "the channel's update event")
        assert (updates[0].current, updates[0].resumed) == (ChannelState.ATTACHED, False)
        assert updates[0].reason is not None and updates[0].reason.code == 91005
        await client.close()

    run(main)


def test_a_token_running_out_under_a_live_connection(ably_server: AblyStandin) -> None:
    async def main() -> None:
        ttls = [1_000, 60_000]
        calls: list[dict] = []

        async def auth_callback(token_params: dict) -> Any:
            calls.append(token_params)
            return ably_server.issue_token(ttl=ttls[len(calls) - 1])  # TokenDetails as a dict

        client = await connected(ably_server, key=None, auth_callback=auth_callback)
        conn_id = client.connection.connection_manager.connection_id
        await until(lambda: ably_server.counters["disconnected_token_expired"] == 1, "the token's expiry")
        await until(lambda: len(calls) == 2 and ably_server.counters["resumed"] == 1, "a renewal and a resume")
        await until(lambda: client.connection.state == ConnectionState.CONNECTED, "CONNECTED again")
        assert client.connection.connection_manager.connection_id == conn_id
        await client.close()

    run(main)
