"""Channels: a request's round trip over a real redis-server and over the Ably stand-in, a file
fetched through a provider, and the gate's rate of checking envelopes, each against the bare
operation underneath.

Setup (benchmarks/_lab.py; all in a temp dir, removed at the end): a redis-server of its own on a
free loopback port (no persistence), a directory bucket, homes A and B; A creates channel "lab" and admits B with the
requester permissions. A second channel, "lab-ably", in the same bucket with the same members, has
for its transport the Ably stand-in of the tests (``tests/ably_standin.py``, put on ``sys.path`` from
the repository's ``tests/`` directory: test support code, run here as the peer bus), a local Python
server speaking Ably's realtime protocol to the unmodified ``ably`` SDK, in a process of its own as
redis-server is; its ``ably://`` URI names the variable holding the key (``key_env``), which A's
process is given. A's ``kachery node start --channel lab --channel lab-ably`` (one daemon serving
both) runs as a separate process, as in real use; B is this process.

Cases:
- round trip: B sends ``request_file`` for a SHA-256 A does not hold and waits for A's
  ``upload_status`` ``not_found`` (one long-lived subscription, as a script asking many things
  keeps; :data:`REQUESTS` requests, p50 and p99). The peer is a bare redis-py publish, echoed by a
  responder in another process on another pub/sub channel, with a payload of the envelope's size
  (targets: p50 <= 2 ms, p99 <= 10 ms). Then the same request through :func:`ask`, which is what
  ``request_file`` (and so ``kt.load_bytes``) does: the session's one subscription for requests
  serves it (no subscribe or close per request).
- round trip over Ably: the same ``request_file`` -> ``not_found`` on channel lab-ably, against the
  Redis round trip of the same run (ratio = redis / ably), and against the bare SDK: two
  ``AblyRealtime`` clients (this process and a responder process) through the stand-in, publish ->
  subscriber -> publish back, same payload size, binary protocol as the transport. The stand-in is
  not Ably's service: the figure is the SDK and protocol overhead on loopback, not Ably's network
  latency (add a network round trip or two to Ably's nearest region for that).
- file: ``request_file`` of 1 MB and 100 MB of random bytes A holds and the bucket does not, from
  the request to the verified blob in B's store. The peer is a copy of the same bytes straight out
  of the bucket (``shutil.copyfileobj`` of its objects), once the file is there.
- gate: ``Gate.check`` (parse, channel, membership and permission, clock window, nonce, signature)
  on :data:`ENVELOPES` distinct envelopes sealed by B, against ``Ed25519PublicKey.verify`` of the
  same signed bytes with the key already loaded: the floor of any check that trusts signatures.

Numbers are seconds (per request, per file, per message); ``ratio`` is ``peer_s / ours_s`` as in
every benchmark, so below 1 is how much slower than the bare operation we are.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kachery_tasks import config
from kachery_tasks.buckets.layout import blob_key, manifest_key
from kachery_tasks.channels.envelope import Envelope, new_request_id, seal
from kachery_tasks.channels.gate import Gate
from kachery_tasks.channels.membership import Membership
from kachery_tasks.channels.requests import ask, request_file
from kachery_tasks.channels.session import ChannelSession
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.identity import canonical_json, node_identity
from kachery_tasks.store.local import store_for

from ._common import best_of, ms, pct, row, timed
from ._lab import CHANNEL, ably_standin, add_channel, daemon, make_lab, node_env, redis_server, stop, tail

#: Timed round trips (after :data:`WARMUP` untimed ones), for ours and for the bare peer.
REQUESTS = 300
WARMUP = 20
#: Round trips through ``ask``.
ASKS = 50
#: File sizes (bytes) and how many distinct files of each are fetched (the fastest is kept).
FILES = ((10**6, 5), (100 * 10**6, 2))
ENVELOPES = 5000
#: Seconds any single wait may take before the case is abandoned with the daemon's log.
WAIT_S = 30.0
#: The channel on the Ably stand-in (same bucket, same members as "lab").
ABLY_CHANNEL = "lab-ably"

RESPONDER = """
import sys, redis
r = redis.Redis(port=int(sys.argv[1]), protocol=2)
p = r.pubsub(ignore_subscribe_messages=True)
p.subscribe("bench:ping")
print("ready", flush=True)
for m in p.listen():
    r.publish("bench:pong", m["data"])
"""


# -- case 1: round trips ----------------------------------------------------------------------------
def _ours_round_trips(session: ChannelSession, log: Path) -> tuple[list[float], int]:
    """Round trips of request_file -> upload_status not_found on one long-lived subscription."""
    answers: queue.Queue[tuple[str, str]] = queue.Queue()

    def on_message(env: Envelope) -> None:
        if env.type == "upload_status":
            answers.put((env.request_id, str(env.body.get("status"))))

    size = 0

    def once(_i: int) -> None:
        nonlocal size
        request_id = new_request_id()
        sent = session.send("request_file", {"sha256": os.urandom(32).hex()}, request_id=request_id)
        size = len(sent.to_bytes())
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                got_id, status = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no upload_status from the node daemon in {WAIT_S:g} s: {tail(log)}") from None
            if got_id == request_id:
                if status != "not_found":
                    raise RuntimeError(f"the daemon answered {status!r} for a file it does not hold")
                return

    subscription = session.listen(on_message)
    try:
        return timed(REQUESTS, once, WARMUP), size
    finally:
        subscription.close()


def _bare_round_trips(port: int, size: int, tmp: Path) -> list[float]:
    """Round trips of a redis-py PUBLISH echoed by a responder process on another pub/sub channel."""
    log = tmp / "responder.log"
    with open(log, "wb") as err:
        responder = subprocess.Popen([sys.executable, "-c", RESPONDER, str(port)], stdout=subprocess.PIPE,
                                     stderr=err, env=node_env(tmp))
    client = redis.Redis(port=port, socket_timeout=WAIT_S, protocol=2)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe("bench:pong")
        if responder.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the redis-py responder did not start: {tail(log)}")
        deadline = time.monotonic() + WAIT_S
        while dict(client.pubsub_numsub("bench:ping")).get(b"bench:ping", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the redis-py responder never subscribed")
            time.sleep(0.01)

        def once(i: int) -> None:
            token = f"{i:08d}".encode()
            client.publish("bench:ping", token + b"x" * max(0, size - len(token)))
            deadline = time.monotonic() + WAIT_S
            while True:
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is not None and message["data"][:len(token)] == token:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no echo from the redis-py responder in {WAIT_S:g} s")

        return timed(REQUESTS, once, WARMUP)
    finally:
        pubsub.close()
        client.close()
        stop(responder)


ABLY_RESPONDER = """
import asyncio, json, sys
from ably import AblyRealtime

async def main():
    client = AblyRealtime(**json.loads(sys.argv[1]))
    pong = client.channels.get("bench-pong")

    async def echo(message):
        await pong.publish("echo", message.data)

    await client.channels.get("bench-ping").subscribe(echo)
    await pong.attach()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until SIGTERM

asyncio.run(main())
"""


def _bare_ably_round_trips(options: dict, size: int, tmp: Path) -> list[float]:
    """Round trips of an ably SDK publish (ACKed) echoed by a responder process's SDK client on
    another Ably channel, both through the stand-in: the bare SDK, on this process's own loop."""
    log = tmp / "ably-responder.log"
    with open(log, "wb") as err:
        responder = subprocess.Popen([sys.executable, "-c", ABLY_RESPONDER, json.dumps(options)],
                                     stdout=subprocess.PIPE, stderr=err, env=node_env(tmp))

    async def measure() -> list[float]:
        from ably import AblyRealtime

        client = AblyRealtime(**options)
        try:
            inbox: asyncio.Queue[bytes] = asyncio.Queue()
            await client.channels.get("bench-pong").subscribe(lambda m: inbox.put_nowait(bytes(m.data)))
            ping = client.channels.get("bench-ping")
            await ping.attach()
            ready = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, responder.stdout.readline),
                                           WAIT_S)
            if ready.strip() != b"ready":
                raise RuntimeError(f"the ably SDK responder did not start: {tail(log)}")
            samples = []
            for i in range(-WARMUP, REQUESTS):
                token = f"{i + WARMUP:08d}".encode()
                t0 = time.perf_counter()
                await ping.publish("ping", token + b"x" * max(0, size - len(token)))
                while True:
                    try:
                        data = await asyncio.wait_for(inbox.get(), WAIT_S)
                    except TimeoutError:
                        raise RuntimeError(f"no echo from the ably SDK responder in {WAIT_S:g} s: {tail(log)}") from None
                    if data[:len(token)] == token:
                        break
                if i >= 0:
                    samples.append(time.perf_counter() - t0)
            return samples
        finally:
            await client.close()

    try:
        return asyncio.run(measure())
    finally:
        stop(responder)
        responder.stdout.close()


def _asked_round_trips(session: ChannelSession) -> list[float]:
    """The same round trip through ``ask`` (the session's shared subscription for requests)."""

    def once(_i: int) -> None:
        ask(session, "request_file", {"sha256": os.urandom(32).hex()}, check=lambda answers: answers or None,
            what="a missing file", provider_permission="provide_files", timeout=WAIT_S)

    return timed(ASKS, once, 2)


def _round_trip_rows(session: ChannelSession, port: int, tmp: Path, log: Path,
                     ably_session: ChannelSession, ably_options: dict) -> list[dict]:
    ours, size = _ours_round_trips(session, log)
    bare = _bare_round_trips(port, size, tmp)
    asked = _asked_round_trips(session)
    ably, ably_size = _ours_round_trips(ably_session, log)
    sdk = _bare_ably_round_trips(ably_options, ably_size, tmp)
    o50, o99, b50, b99 = pct(ours, 50), pct(ours, 99), pct(bare, 50), pct(bare, 99)
    a50 = pct(asked, 50)
    y50, y99, s50, s99 = pct(ably, 50), pct(ably, 99), pct(sdk, 50), pct(sdk, 99)
    standin = ("the stand-in is a local Python server (tests/ably_standin.py), not Ably's service: SDK + "
               "protocol overhead on loopback, not Ably's network latency")
    return [
        row("round trip p50 (request_file -> not_found)", o50, "redis-py pub/sub echo p50", b50, target="<= 2 ms",
            note=f"ours {ms(o50)} vs bare {ms(b50)}; {REQUESTS} requests, {size}-byte envelopes, daemon in "
                 "its own process"),
        row("round trip p99 (request_file -> not_found)", o99, "redis-py pub/sub echo p99", b99, target="<= 10 ms",
            note=f"ours {ms(o99)} vs bare {ms(b99)}; max ours {ms(max(ours))}, bare {ms(max(bare))}"),
        row("round trip through ask() p50", a50, "redis-py pub/sub echo p50", b50, target="<= 2 ms",
            note=f"p99 {ms(pct(asked, 99))} over {ASKS}; the session's one subscription serves every request"),
        row("round trip over Ably stand-in p50 (request_file -> not_found)", y50,
            "round trip over Redis p50 (same run)", o50,
            note=f"ably {ms(y50)} vs redis {ms(o50)}; {REQUESTS} requests, {ably_size}-byte envelopes, same daemon "
                 f"serving both channels; {standin}"),
        row("round trip over Ably stand-in p99 (request_file -> not_found)", y99,
            "round trip over Redis p99 (same run)", o99,
            note=f"ably {ms(y99)} vs redis {ms(o99)}; max ably {ms(max(ably))}, redis {ms(max(ours))}; local "
                 "stand-in, not Ably's service (loopback)"),
        row("round trip over Ably stand-in p50, vs the bare SDK", y50, "ably SDK echo p50 (2 AblyRealtime)", s50,
            note=f"ours {ms(y50)} vs SDK echo {ms(s50)} (p99 {ms(y99)} vs {ms(s99)}); echo: publish (ACKed) -> "
                 f"responder process's subscriber -> publish back, {ably_size} bytes, msgpack; local stand-in, "
                 "not Ably's service (loopback)"),
    ]


# -- case 2: files ----------------------------------------------------------------------------------
def _copy_from_bucket(bucket: Path, sha256: str, dst: Path) -> None:
    """The file's bytes straight out of a directory bucket: its object, or its chunks in order."""
    single = bucket / blob_key(sha256)
    if single.exists():
        shutil.copyfile(single, dst)
        return
    manifest = json.loads((bucket / manifest_key(sha256)).read_bytes())
    with open(dst, "wb") as out:
        for chunk in manifest["chunks"]:
            with open(bucket / blob_key(chunk["sha256"]), "rb") as src:
                shutil.copyfileobj(src, out, 2**20)


def _file_rows(session: ChannelSession, home_a: Path, home_b: Path, bucket: Path, tmp: Path) -> list[dict]:
    """``request_file`` of files only A holds; when A's ``finished`` arrived is noted apart (what
    follows it is B's verified download)."""
    finished: dict[str, float] = {}

    def on_message(env: Envelope) -> None:
        if env.type == "upload_status" and env.body.get("status") == "finished":
            finished[str(env.body.get("sha256"))] = time.perf_counter()

    rows = []
    copy = tmp / "copy.bin"
    # A session of its own for the watcher: the subscriptions of one session share its gate, which
    # admits each message once, so a second listener on ``session`` would take answers from ``ask``.
    watcher = ChannelSession(home_b, CHANNEL, transport=session.transport).listen(on_message)
    try:
        for size, count in FILES:
            best = float("inf")
            best_upload = 0.0
            sha256 = ""
            for _ in range(count):
                sha256 = store_for(home_a).blobs.put_bytes(os.urandom(size))  # A's store only
                t0 = time.perf_counter()
                request_file(session, sha256, store_for(home_b).blobs, timeout=WAIT_S * 4)
                took = time.perf_counter() - t0
                store_for(home_b).blobs.verified_path(sha256)  # raises unless the blob is whole and sound
                if took < best:
                    best, best_upload = took, finished.get(sha256, t0) - t0
            peer_s = best_of(lambda s=sha256: _copy_from_bucket(bucket, s, copy))
            copy.unlink()
            label = f"{size / 1e6:g} MB"
            rows.append(row(f"file {label}: request_file to B's verified store", best, "copy from the bucket", peer_s,
                            note=f"best of {count} files; A's 'finished' at {ms(best_upload)}, then B's download "
                                 f"{ms(best - best_upload)}; {size / 1e6 / best:.0f} MB/s vs copy "
                                 f"{size / 1e6 / peer_s:.0f} MB/s; ours hashes and fsyncs twice, the copy neither"))
    finally:
        watcher.close()
    return rows


# -- case 3: the gate -------------------------------------------------------------------------------
def _gate_rows(home_a: Path, home_b: Path) -> list[dict]:
    """Gate.check of distinct envelopes from B, as A's daemon admits them, against bare Ed25519 verify."""
    keys = node_identity(home_b).keys
    envelopes = [seal(keys, "request_file", CHANNEL, {"sha256": os.urandom(32).hex()}) for _ in range(ENVELOPES)]
    data = [e.to_bytes() for e in envelopes]
    current_config = Membership(home_a, CHANNEL).config  # A's view, refreshed when due, as its daemon's gate

    def check_all() -> None:
        gate = Gate(CHANNEL, current_config)  # a fresh gate each time: every nonce is new to it
        for d in data:
            gate.check(d)

    signed = []
    for e in envelopes:
        doc = {k: v for k, v in json.loads(e.to_bytes()).items() if k != "signature"}
        signed.append((bytes.fromhex(e.signature), canonical_json(doc)))
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys.public_hex))

    def verify_all() -> None:
        for signature, message in signed:
            public.verify(signature, message)

    ours = best_of(check_all) / ENVELOPES
    bare = best_of(verify_all) / ENVELOPES
    return [row("envelope check (Gate.check)", ours, "Ed25519PublicKey.verify", bare,
                note=f"{1 / ours:,.0f} msgs/s vs {1 / bare:,.0f} verifies/s; {ENVELOPES} envelopes of "
                     f"{len(data[0])} bytes (signed part {len(signed[0][1])} bytes), best of 3")]


def run() -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kt-bench-channels-") as tmp_name:
        tmp = Path(tmp_name)
        with redis_server(tmp) as port, ably_standin(tmp) as standin:
            redis_uri = f"redis://127.0.0.1:{port}/0"
            home_a, (home_b,), bucket = make_lab(tmp, redis_uri)
            add_channel(home_a, [home_b], ABLY_CHANNEL, bucket, standin["uri"])
            log = tmp / "daemon.log"
            env = node_env(home_a, **{standin["key_env"]: standin["key"]})
            with config.home_layers(home_b), daemon(home_a, log, "--channel", ABLY_CHANNEL, env=env):
                # Transports of its own, not the process's shared ones: they are closed at the end.
                session = ChannelSession(home_b, CHANNEL, transport=open_transport(redis_uri))
                ably_session = None
                try:
                    ably_session = ChannelSession(home_b, ABLY_CHANNEL,
                                                  transport=open_transport(standin["uri"], key=standin["key"]))
                    rows += _round_trip_rows(session, port, tmp, log, ably_session, standin["options"])
                    rows += _file_rows(session, home_a, home_b, bucket, tmp)
                finally:
                    session.transport.close()
                    if ably_session is not None:
                        ably_session.transport.close()
            rows += _gate_rows(home_a, home_b)
    return rows
