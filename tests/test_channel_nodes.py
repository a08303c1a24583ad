"""Three nodes in separate processes on a real redis-server and a directory bucket (issue 22): an owner
that provides (``kachery node start``), a member that asks (no daemon), and an outsider that joined
but was never admitted. Files and feeds are asked for and delivered verified; refusals, forgeries,
replays, revocation, a daemon killed mid-upload and a restarted Redis are each checked from the
outside (exit codes, one-line errors, the daemon's status and log).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from channel_nodes import make_lab, stop_all, wait_for

from kachery_tasks.channels.envelope import seal
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.identity import KeyPair

STORE_FILE = "import sys, kachery_tasks as kt\nprint(kt.store_bytes(bytes.fromhex(sys.argv[1]) * int(sys.argv[2])))"


@pytest.fixture
def lab(tmp_path: Path, redis_uri: str):
    owner, member, outsider, bucket = make_lab(tmp_path, redis_uri, tmp_path / "runs.txt")
    yield owner, member, outsider, bucket
    stop_all(owner, member, outsider)


@pytest.fixture
def any_lab(tmp_path: Path, bus_uri: str):
    """The lab on each bus: a real redis-server, and the Ably stand-in through the ably SDK."""
    owner, member, outsider, bucket = make_lab(tmp_path, bus_uri, tmp_path / "runs.txt")
    yield owner, member, outsider, bucket
    stop_all(owner, member, outsider)


def store(node, data_hex: str, times: int = 1) -> str:
    return node.py(STORE_FILE.replace("sys.argv[1]", repr(data_hex)).replace("sys.argv[2]", str(times))).stdout.strip()


def load(node, uri: str, *, check: bool = True, **extra: str):
    """``kt.load_bytes(uri)`` on ``node`` (a subprocess); its output is the bytes in hex."""
    return node.py(f"import kachery_tasks as kt\nprint(kt.load_bytes({uri!r}).hex())", check=check, **extra)


def test_a_file_is_requested_uploaded_by_its_holder_and_loaded_verified(any_lab):
    owner, member, _, bucket = any_lab
    uri = store(owner, "c0ffee", 1000)
    assert not any(bucket.glob("sha256/*/*/*"))  # never published: only the owner has it
    owner.start_daemon()
    out = load(member, uri)
    assert out.stdout.strip() == "c0ffee" * 1000
    wait_for(lambda: owner.status()["channels"]["lab"]["served"] == {"finished": 1}, what="the status to count it")
    assert "request_file sha256://" in owner.log_text() and "(member)" in owner.log_text()
    # a second node asking for the same file: the bucket already has it, nothing is uploaded again
    assert load(member, uri).stdout.strip() == "c0ffee" * 1000


def test_a_file_no_provider_has_fails_fast_in_one_line(any_lab):
    owner, member, _, _ = any_lab
    owner.start_daemon()
    missing = "sha256://" + "ab" * 32
    out = load(member, missing, check=False)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "none has it" in last and "provide_files online in channel 'lab'" in last and "not_found" in last


def test_with_no_provider_online_the_error_says_so(lab):
    _, member, _, _ = lab
    out = load(member, "sha256://" + "cd" * 32, check=False)
    assert out.returncode != 0 and "no member with provide_files is online" in out.stderr


def test_the_outsider_is_refused_and_its_raw_requests_are_dropped(any_lab, bus_uri):
    owner, _, outsider, _ = any_lab
    uri = store(owner, "beef", 10)
    owner.start_daemon()
    out = load(outsider, uri, check=False)  # not a member: it does not ask at all
    assert out.returncode != 0
    keys = KeyPair.generate()
    with open_transport(bus_uri) as bus:
        bus.publish("channel/lab", seal(keys, "request_file", "lab", {"sha256": uri[9:]}).to_bytes())
    wait_for(lambda: owner.status()["channels"]["lab"]["dropped"].get("not_member"), what="the drop")
    assert owner.status()["channels"]["lab"]["served"] == {}


def test_forged_and_replayed_requests_are_dropped(any_lab, bus_uri):
    owner, member, _, _ = any_lab
    uri = store(owner, "feed", 10)
    owner.start_daemon()
    captured: list[bytes] = []
    with open_transport(bus_uri) as bus:
        sub = bus.subscribe("channel/lab", lambda m: captured.append(m) if b'"request_file"' in m else None)
        load(member, uri)
        sub.close()
        assert captured
        served = wait_for(lambda: owner.status()["channels"]["lab"]["served"], what="the status to count it")
        bus.publish("channel/lab", captured[0])  # the very bytes again: a replay
        forged = json.loads(captured[0])
        forged["body"]["sha256"] = "00" * 32  # the member's request, altered, with a fresh nonce
        forged["nonce"] = "11" * 16
        bus.publish("channel/lab", json.dumps(forged).encode())
        wait_for(lambda: {"replay", "bad_signature"} <= set(owner.status()["channels"]["lab"]["dropped"]),
                 what="both drops")
    assert owner.status()["channels"]["lab"]["served"] == served


def test_a_revoked_member_is_refused_after_the_refresh(any_lab, bus_uri):
    owner, member, _, _ = any_lab
    uri = store(owner, "aa55", 10)
    owner.start_daemon(KACHERY_TASKS_CHANNEL_REFRESH_SECONDS="0.5")
    assert load(member, uri).stdout.strip() == "aa55" * 10
    owner.kachery("channel", "revoke", "lab", member.node_id, "--perm", "request_files")
    # the member's own library now knows it may not ask: it fails without asking anyone
    other = store(owner, "bb66", 10)
    out = load(member, other, check=False)
    assert out.returncode != 0 and "no answer" not in out.stderr
    # a request signed with the member's key anyway (an old config, a modified client) is dropped
    keys = KeyPair.load(member.home / "node" / "key.pem")
    time.sleep(1.0)  # past the daemon's refresh interval
    with open_transport(bus_uri) as bus:
        bus.publish("channel/lab", seal(keys, "request_file", "lab", {"sha256": other[9:]}).to_bytes())
        wait_for(lambda: owner.status()["channels"]["lab"]["dropped"].get("not_permitted"), what="the refusal")
    assert owner.status()["channels"]["lab"]["served"] == {"finished": 1}


def test_a_feed_is_replicated_on_demand_and_then_live(any_lab):
    owner, member, _, _ = any_lab
    feed = owner.py("import kachery_tasks as kt\nf = kt.create_feed(label='spikes')\n"
                    "f.subfeed('main').append_many([{'i': i} for i in range(5)])\nprint(f.uri)").stdout.strip()
    owner.start_daemon("lab", "--heartbeat", "0.5")
    read = f"import kachery_tasks as kt\nprint(len(kt.load_feed({feed!r}).subfeed('main')))"
    assert member.py(read).stdout.strip() == "5"
    owner.py(f"import kachery_tasks as kt\nkt.load_feed({feed!r}).subfeed('main').append_many([{{'i': i}} for i in range(5, 8)])")
    wait_for(lambda: member.py(read).stdout.strip() == "8", what="the new messages to reach the member")


def test_sigterm_stops_cleanly_and_status_says_so(lab):
    owner, _, _, _ = lab
    owner.start_daemon()
    assert owner.status()["running"] is True
    assert owner.stop_daemon(signal.SIGTERM) == 0
    status = owner.status()
    assert status["state"] == "stopped" and status["running"] is False
    assert "node stopped" in owner.log_text()


def test_a_second_daemon_on_the_same_home_is_refused(lab):
    owner, _, _, _ = lab
    owner.start_daemon()
    out = owner.kachery("node", "start", "--channel", "lab", check=False, timeout=60)
    assert out.returncode == 1 and "already running" in out.stderr and "Traceback" not in out.stderr


def test_a_daemon_killed_mid_upload_leaves_nothing_corrupt_and_a_restart_serves(lab, redis_uri):
    owner, member, _, bucket = lab
    uri = owner.py("import os, kachery_tasks as kt\nprint(kt.store_bytes(os.urandom(96 * 2**20)))").stdout.strip()
    owner.start_daemon()
    started = threading.Event()  # the provider's upload_status "started", sent just before the upload
    with open_transport(redis_uri) as bus:
        bus.subscribe("channel/lab", lambda m: started.set() if b'"status":"started"' in m else None)
        proc = subprocess.Popen([sys.executable, "-c", f"import kachery_tasks as kt\nkt.load_bytes({uri!r})"],
                                env={**member.env, "KACHERY_TASKS_REQUEST_TIMEOUT": "8"}, stderr=subprocess.PIPE,
                                text=True)
        assert started.wait(60), "the upload never started"
        owner.stop_daemon(signal.SIGKILL)  # at once: polling the bucket for a first chunk let it finish
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and ("in 8 s (config request_timeout)" in err or "no member with provide_files" in err), err
    manifests = list(bucket.glob("manifests/*/*/*.json"))
    assert not manifests or uri[9:] not in manifests[0].name  # the manifest is written last: never half a file
    owner.start_daemon()
    assert len(bytes.fromhex(load(member, uri).stdout.strip())) == 96 * 2**20


def test_redis_restarted_under_a_running_daemon(lab, redis_server):
    owner, member, _, _ = lab
    uri = store(owner, "0102", 100)
    owner.start_daemon()
    redis_server.restart()
    time.sleep(0.5)
    assert load(member, uri).stdout.strip() == "0102" * 100
    assert "reconnected" in owner.log_text()


def test_an_unreachable_transport_is_one_line(tmp_path):
    from redis_fixtures import free_port
    owner, member, _, _ = make_lab(tmp_path / "dead", f"redis://127.0.0.1:{free_port()}/0", tmp_path / "runs.txt")
    out = member.kachery("load", "sha256://" + "ef" * 32, check=False)
    assert out.returncode == 1 and "cannot connect" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = owner.kachery("node", "start", "--channel", "lab", check=False, timeout=60)
    assert out.returncode == 1 and "cannot connect" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # a pure call is not held up by a channel it cannot reach: it computes, with one warning
    (tmp_path / "dead" / "pipeline.py").write_text(PIPELINE)
    out = member.py("import pipeline\nprint(pipeline.square(4))")
    assert out.stdout.strip() == "16" and "cannot connect" in out.stderr


PIPELINE = '''
import os
import kachery_tasks as kt


def _count(name):
    with open(os.environ["KT_TEST_COUNTER"], "a") as fh:
        fh.write(name + "\\n")


@kt.pure
def square(x):
    _count("square")
    return x * x


@kt.pure
def add(a, b):
    _count("add")
    return a + b
'''


def runs(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def test_a_result_is_requested_by_task_id_and_nothing_is_computed(lab, tmp_path):
    owner, member, outsider, _ = lab
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    call = "import pipeline\nprint(pipeline.add(pipeline.square.job(7), 1))"
    assert owner.py(call).stdout.strip() == "50"
    assert runs(counter) == ["square", "add"]
    owner.start_daemon()
    assert member.py(call).stdout.strip() == "50"
    assert runs(counter) == ["square", "add"]  # the member computed nothing
    assert "request_result task" in owner.log_text()
    # the outsider is not a member: it asks nobody and computes
    assert outsider.py(call).stdout.strip() == "50"
    assert runs(counter) == ["square", "add", "square", "add"]


def test_a_dask_graph_asks_once_for_all_its_results(lab, tmp_path):
    owner, member, _, _ = lab
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    graph = ("import dask, pipeline\n"
             "parts = [pipeline.square.delayed(i) for i in range(40)]\n"
             "total = parts[0]\n"
             "for p in parts[1:]:\n    total = pipeline.add.delayed(total, p)\n"
             "print(dask.compute(total, scheduler='threads')[0])")
    expected = str(sum(i * i for i in range(40)))
    assert owner.py(graph).stdout.strip() == expected
    computed = len(runs(counter))
    owner.start_daemon()
    assert member.py(graph).stdout.strip() == expected
    assert len(runs(counter)) == computed  # nothing computed on the member
    served = [line for line in owner.log_text().splitlines() if "request_result" in line]
    assert len(served) == 1, served  # one request (the root's record brings its upstream), not one per node


def test_a_revoked_providers_records_stop_being_trusted(lab, tmp_path):
    owner, member, _, _ = lab
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    # the member provides, the owner asks
    owner.kachery("channel", "grant", "lab", member.node_id, "--perm", "provide_tasks")
    call = "import pipeline\nprint(pipeline.square(12))"
    assert member.py(call).stdout.strip() == "144"
    member.start_daemon()
    assert owner.py(call).stdout.strip() == "144"
    assert runs(counter) == ["square"]  # a hit from the member's record
    member.stop_daemon()
    owner.kachery("channel", "revoke", "lab", member.node_id, "--perm", "provide_tasks")
    explain = owner.py("import pipeline, kachery_tasks as kt\nprint(kt.explain(pipeline.square.job(12)))")
    # the record is in the channel's bucket, signed by a node no longer trusted: computed again
    assert owner.py(call + "\nimport kachery_tasks as kt", KACHERY_TASKS_TIERS='["memory", "channel"]').stdout.strip() == "144"
    assert runs(counter) == ["square", "square"], explain.stdout


def test_the_bucket_tier_trusts_channel_members_that_provide_tasks(lab, tmp_path):
    """No daemon and no trusted_nodes: a record a member with provide_tasks published to the shared
    bucket is a hit for the others; once revoked, it is refused (explain says why) and recomputed."""
    owner, member, _, bucket = lab
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    counter = tmp_path / "runs.txt"
    shared = {"KACHERY_TASKS_BUCKET": bucket.as_uri(), "KACHERY_TASKS_TIERS": '["memory", "local", "bucket"]'}
    call = "import pipeline\nprint(pipeline.square(9))"
    assert member.py(call, KACHERY_TASKS_PUBLISH="true", **shared).stdout.strip() == "81"
    assert owner.py(call, **shared).stdout.strip() == "81"
    assert runs(counter) == ["square"] * 2, "the member is not trusted yet: the owner computed too"
    owner.kachery("channel", "grant", "lab", member.node_id, "--perm", "provide_tasks")
    again = "import pipeline\nprint(pipeline.square(10))"
    assert member.py(again, KACHERY_TASKS_PUBLISH="true", **shared).stdout.strip() == "100"
    assert owner.py(again, **shared).stdout.strip() == "100"
    assert runs(counter) == ["square"] * 3, "a hit from the member's published record"
    member.py("import pipeline\npipeline.square(11)", KACHERY_TASKS_PUBLISH="true", **shared)
    owner.kachery("channel", "revoke", "lab", member.node_id, "--perm", "provide_tasks")
    said = owner.py("import pipeline, kachery_tasks as kt\nprint(kt.explain(pipeline.square.job(11)))", **shared).stdout
    assert "not trusted" in said, said
    assert owner.py("import pipeline\nprint(pipeline.square(11))", **shared).stdout.strip() == "121"
    assert runs(counter) == ["square"] * 5


def test_a_nodes_action_log_is_never_provided(lab):
    owner, member, _, _ = lab
    log_id = owner.py("import kachery_tasks as kt\n@kt.action\ndef ping(x):\n    return True\n"
                      "ping.call(1, key='k1')\n"
                      "from kachery_tasks.feeds.registry import local_names\nprint(local_names()['action-log'])").stdout.strip()
    owner.start_daemon()
    out = member.py(f"import kachery_tasks as kt\nkt.load_feed('feed://{log_id}')", check=False)
    assert out.returncode != 0
    assert "request_subfeed" in owner.log_text() and "not_found" in owner.log_text()
