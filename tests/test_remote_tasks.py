"""Remote tasks (issue 23, first slice): nodes in separate processes on a real redis-server and a
directory bucket. The owner serves tasks (``kachery node start --serve``), the member calls them with
``service=``; executions are counted in a file (``KT_TEST_COUNTER``), one line per run naming the
node that ran it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from channel_nodes import make_lab, stop_all, wait_for

from kachery_tasks.buckets.uri import open_bucket
from kachery_tasks.channels.envelope import seal
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.identity import KeyPair, node_identity
from kachery_tasks.identity.documents import sign_document

SERVICE = '''
import os, time
import kachery_tasks as kt

FACTOR = int(os.environ.get("KT_FACTOR", "2"))


def _count(name):
    with open(os.environ["KT_TEST_COUNTER"], "a") as fh:
        fh.write(os.path.basename(os.environ["KACHERY_TASKS_HOME"]) + ":" + name + "\\n")
    with open(os.environ["KT_TEST_COUNTER"] + ".pids", "a") as fh:
        fh.write(str(os.getpid()) + "\\n")


@kt.pure(service="lab")
def scaled(x):
    _count("scaled")
    return x * FACTOR


@kt.query(service="lab")
def lookup(key):
    _count("lookup")
    time.sleep(float(os.environ.get("KT_SLOW", "0")))
    with open(os.environ["KT_DB"]) as fh:
        return {"key": key, "value": fh.read().strip()}


@kt.action(service="lab")
def notify(who):
    _count("notify")
    time.sleep(float(os.environ.get("KT_SLOW", "0")))


@kt.pure(service="lab")
def digest(signal, raw, doc):
    _count("digest")
    return [float(signal.sum()), len(raw), len(doc.read_bytes()), signal.shape[0]]


@kt.query(service="lab")
def unserved(key):
    _count("unserved")
    return key


@kt.pure(service="lab")
def unserved_pure(x):
    _count("unserved_pure")
    return x + 1
'''
SERVE = ("--serve", "lab_service:scaled", "--serve", "lab_service:lookup", "--serve", "lab_service:notify",
         "--serve", "lab_service:digest")


def _lab(tmp_path: Path, transport: str):
    (tmp_path / "lab_service.py").write_text(SERVICE)
    (tmp_path / "db.txt").write_text("one")
    owner, member, outsider, bucket = make_lab(tmp_path, transport, tmp_path / "runs.txt", request_timeout="20")
    for node in (owner, member, outsider):
        node.env["KT_DB"] = str(tmp_path / "db.txt")
    return owner, member, outsider, bucket


@pytest.fixture
def lab(tmp_path: Path, redis_uri: str):
    nodes = _lab(tmp_path, redis_uri)
    yield nodes
    stop_all(*nodes[:3])


@pytest.fixture
def any_lab(tmp_path: Path, bus_uri: str):
    """The lab on each bus: a real redis-server, and the Ably stand-in through the ably SDK."""
    nodes = _lab(tmp_path, bus_uri)
    yield nodes
    stop_all(*nodes[:3])


def runs(tmp_path: Path) -> list[str]:
    counter = tmp_path / "runs.txt"
    return counter.read_text().split() if counter.exists() else []


def ran_in(tmp_path: Path) -> set[int]:
    """The process ids the served tasks ran in."""
    return {int(p) for p in (tmp_path / "runs.txt.pids").read_text().split()}


def daemon_pid(node) -> int:
    assert node.daemon is not None
    return node.daemon.pid


def call(node, expr: str, *, check: bool = True, **extra: str):
    code = ("import warnings, lab_service as s\nwarnings.simplefilter('always')\n"
            f"print(repr({expr}))")
    return node.py(code, check=check, **extra)


def answers(bucket: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in bucket.glob("channels/lab/answers/*/*.json")]


def raw_request(redis_uri: str, keys: KeyPair, body: dict) -> str:
    env = seal(keys, "request_task", "lab", body)
    with open_transport(redis_uri) as bus:
        bus.publish("channel/lab", env.to_bytes())
    return env.request_id


def served_hash(redis_uri: str, owner_id: str, name: str) -> str:
    with open_transport(redis_uri) as bus:
        return json.loads(bus.present("channel/lab")[owner_id])["serves"][name]


def test_remote_pure_runs_on_the_provider_and_a_second_call_runs_nothing(any_lab, tmp_path):
    owner, member, _, bucket = any_lab
    owner.start_daemon("lab", *SERVE)
    assert call(member, "s.scaled(21)").stdout.strip() == "42"
    assert runs(tmp_path) == ["owner:scaled"]  # the member computed nothing
    assert list(bucket.glob("records/*/*.json")), "the record was published to the channel's bucket"
    assert "request_task task lab_service.scaled" in owner.log_text() and ": finished" in owner.log_text()
    # a second call, in a new process: answered with nothing run anywhere
    assert call(member, "s.scaled(21)").stdout.strip() == "42"
    assert runs(tmp_path) == ["owner:scaled"]
    # the outsider's own store is empty; its request would be dropped: it is not a member, so it computes here
    assert call(member, "s.scaled.job(21).id").stdout == call(owner, "s.scaled.job(21).id").stdout


def test_arrays_bytes_and_files_travel_through_the_bucket_never_pickled(lab, tmp_path):
    owner, member, _, bucket = lab
    owner.start_daemon("lab", *SERVE)
    code = ("import numpy as np, kachery_tasks as kt, lab_service as s\n"
            "doc = kt.File(kt.store_bytes(b'hello world'))\n"
            "print(s.digest(np.arange(10000, dtype='f8'), b'x' * 9000, doc))")
    assert member.py(code).stdout.strip() == str([float(sum(range(10000))), 9000, 11, 10000])
    assert runs(tmp_path) == ["owner:digest"]
    assert len(list(bucket.glob("sha256/*/*/*"))) >= 3  # the array, the bytes and the file went as blobs


def test_a_pure_request_already_in_the_bucket_is_answered_from_there(lab, tmp_path, redis_uri):
    owner, member, _, bucket = lab
    owner.start_daemon("lab", *SERVE)
    assert call(member, "s.scaled(5)").stdout.strip() == "10"
    task_id = call(member, "s.scaled.job(5).id").stdout.strip().strip("'")
    keys = node_identity(member.home).keys
    body = {"name": "lab_service.scaled", "code_hash": served_hash(redis_uri, owner.node_id, "lab_service.scaled"),
            "kind": "pure", "task_id": task_id, "namespace": "", "args": {"x": {"json": 5}}}
    rid = raw_request(redis_uri, keys, body)
    found = wait_for(lambda: [a for a in answers(bucket) if a["request_id"] == rid], what="the answer")
    assert found[0]["status"] == "finished" and "nothing run" in found[0]["detail"]
    assert runs(tmp_path) == ["owner:scaled"]


def test_remote_query_is_fresh_then_stale_when_its_provider_is_gone(any_lab, tmp_path):
    owner, member, _, _ = any_lab
    owner.start_daemon("lab", *SERVE)
    assert call(member, "s.lookup('a')").stdout.strip() == "{'key': 'a', 'value': 'one'}"
    (tmp_path / "db.txt").write_text("two")
    out = call(member, "s.lookup('a')")
    assert out.stdout.strip() == "{'key': 'a', 'value': 'two'}" and "StaleResultWarning" not in out.stderr
    assert runs(tmp_path) == ["owner:lookup", "owner:lookup"]
    owner.stop_daemon()
    (tmp_path / "db.txt").write_text("three")
    out = call(member, "s.lookup('a')", KACHERY_TASKS_REQUEST_TIMEOUT="2")
    assert out.stdout.strip() == "{'key': 'a', 'value': 'two'}"
    assert "StaleResultWarning" in out.stderr
    # never asked before, and no provider: one line, no stale value to return
    out = call(member, "s.lookup('never')", check=False, KACHERY_TASKS_REQUEST_TIMEOUT="2")
    assert out.returncode != 0 and "lookup" in out.stderr.strip().splitlines()[-1]


def test_an_action_requested_twice_with_one_key_runs_once(any_lab, tmp_path):
    owner, member, _, _ = any_lab
    owner.start_daemon("lab", *SERVE)
    first = call(member, "s.notify.call('bob', key='k-1')").stdout.strip()
    second = call(member, "s.notify.call('bob', key='k-1')").stdout.strip()
    assert "ok=True" in first and "replayed=False" in first
    assert "ok=True" in second and "replayed=True" in second
    assert runs(tmp_path) == ["owner:notify"]
    actions = owner.kachery("task", "actions").stdout
    assert "k-1" in actions


def test_a_provider_killed_mid_action_leaves_it_unknown_and_it_is_not_run_again(lab, tmp_path):
    owner, member, _, _ = lab
    owner.start_daemon("lab", *SERVE, "--heartbeat", "0.5", KT_SLOW="60")
    result: list = []
    caller = threading.Thread(target=lambda: result.append(
        call(member, "s.notify.call('ann', key='k-9')", check=False, KACHERY_TASKS_REQUEST_TIMEOUT="20")))
    caller.start()
    wait_for(lambda: runs(tmp_path) == ["owner:notify"], what="the action to start")
    time.sleep(2)  # heartbeats with word of the running action reach the requester
    owner.stop_daemon(signal.SIGKILL)
    killed = time.monotonic()
    caller.join(60)
    out = result[0]
    last = out.stderr.strip().splitlines()[-1]
    # told in one line which provider, which action, since when; long before the 20 s timeout
    assert out.returncode != 0 and "stopped heartbeating" in last and "running since" in last, out.stderr
    assert owner.node_id[:12] in last and "k-9" in last and "outcome is unknown" in last
    assert time.monotonic() - killed < 15
    assert "unknown" in owner.kachery("task", "actions").stdout
    owner.start_daemon("lab", *SERVE)
    again = call(member, "s.notify.call('ann', key='k-9')").stdout.strip()
    assert "state='unknown'" in again and "replayed=True" in again
    assert runs(tmp_path) == ["owner:notify"]  # not run again until settled


def test_a_code_mismatch_names_both_hashes(lab, tmp_path):
    owner, member, _, _ = lab
    assert "no member online serves tasks" in member.kachery("channel", "services", "lab").stdout
    owner.start_daemon("lab", *SERVE)
    listed = json.loads(member.kachery("channel", "services", "lab", "--json").stdout)
    served = {row["task"]: row for row in listed}
    assert "lab_service.scaled" in served and served["lab_service.scaled"]["node"] == owner.node_id
    out = call(member, "s.scaled(3)", check=False, KT_FACTOR="3")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "code_mismatch" in last, out.stderr
    ours = call(owner, "s.scaled.function_id.code_hash").stdout.strip().strip("'")
    theirs = call(member, "s.scaled.function_id.code_hash", KT_FACTOR="3").stdout.strip().strip("'")
    assert ours in last and theirs in last and ours != theirs
    assert runs(tmp_path) == []


def test_an_unregistered_name_and_arguments_that_do_not_bind(lab, tmp_path, redis_uri):
    owner, member, _, bucket = lab
    owner.start_daemon("lab", *SERVE)
    # the requester asks only members that announce the name: none does, so it fails fast
    out = call(member, "s.unserved('a')", check=False)
    assert out.returncode != 0 and "no member online serves it" in out.stderr.strip().splitlines()[-1]
    # a pure task with no provider is computed here: its result is the same wherever it is computed
    assert call(member, "s.unserved_pure(1)").stdout.strip() == "2"
    assert runs(tmp_path) == ["member:unserved_pure"]
    keys = node_identity(member.home).keys
    code_hash = served_hash(redis_uri, owner.node_id, "lab_service.scaled")
    base = {"code_hash": code_hash, "kind": "pure", "task_id": "0" * 32, "namespace": ""}
    rid1 = raw_request(redis_uri, keys, {**base, "name": "lab_service.unserved", "args": {"key": {"json": 1}}})
    rid2 = raw_request(redis_uri, keys, {**base, "name": "lab_service.scaled", "args": {"nope": {"json": 1}}})
    rid3 = raw_request(redis_uri, keys, {**base, "name": "lab_service.scaled", "args": {"x": {"json": 1}, "nope": {"json": 1}}})
    got = wait_for(lambda: {a["request_id"]: a for a in answers(bucket)} if len(answers(bucket)) >= 3 else None,
                   what="the three answers")
    assert got[rid1]["status"] == "rejected" and "not served here" in got[rid1]["detail"]
    assert got[rid2]["status"] == "rejected" and "missing a required argument: 'x'" in got[rid2]["detail"]
    assert got[rid3]["status"] == "rejected" and "'nope'" in got[rid3]["detail"]
    assert runs(tmp_path) == ["member:unserved_pure"]


def test_two_providers_racing_for_requests_run_each_once(lab, tmp_path, redis_uri):
    owner, member, outsider, bucket = lab
    owner.kachery("channel", "grant", "lab", outsider.node_id, "--owner", "eve@else.org", "--perm", "provide_tasks")
    owner.start_daemon("lab", *SERVE)
    outsider.start_daemon("lab", *SERVE)
    wait_for(lambda: len([i for i in open_transport(redis_uri).present("channel/lab").values()
                          if b"serves" in i]) == 2, what="both providers present")
    code = "import lab_service as s\nprint([s.scaled(i) for i in range(6)])"
    assert member.py(code).stdout.strip() == str([i * 2 for i in range(6)])
    done = runs(tmp_path)
    assert len(done) == 6, done
    assert len(list(bucket.glob("channels/lab/claims/*.json"))) == 6


def test_forged_answers_and_status_from_non_providers_are_ignored(lab, tmp_path, redis_uri):
    owner, member, outsider, bucket = lab
    owner.start_daemon("lab", *SERVE, KT_SLOW="1.5")  # the forgeries land while the query runs
    forgers = [node_identity(outsider.home).keys, node_identity(member.home).keys]  # not a member; no provide_tasks
    writable = open_bucket(bucket.as_uri())
    seen: list[str] = []

    def forge(data: bytes) -> None:
        if b'"request_task"' not in data or seen:
            return
        rid = json.loads(data)["request_id"]
        seen.append(rid)
        for keys in forgers:
            doc = sign_document(keys, {"status": "failed", "detail": "forged", "request_id": rid, "node_id": keys.public_hex})
            writable.write(f"channels/lab/answers/{rid}/{keys.public_hex}.json", orjson.dumps(doc))
            bus.publish("channel/lab", seal(keys, "task_status", "lab", {"status": "failed"}, request_id=rid).to_bytes())

    with open_transport(redis_uri) as bus:
        sub = bus.subscribe("channel/lab", lambda m: threading.Thread(target=forge, args=(m,)).start())
        time.sleep(0.3)
        out = call(member, "s.lookup('z')")
        sub.close()
    assert seen, "the request was seen"
    assert out.stdout.strip() == "{'key': 'z', 'value': 'one'}", out.stderr
    assert runs(tmp_path) == ["owner:lookup"]


def test_a_requester_without_request_tasks_is_refused(lab, tmp_path, redis_uri):
    owner, member, _, bucket = lab
    owner.kachery("channel", "revoke", "lab", member.node_id, "--perm", "request_tasks")
    owner.start_daemon("lab", *SERVE)
    out = call(member, "s.lookup('a')", check=False)
    assert out.returncode != 0 and "lacks request_tasks" in out.stderr.strip().splitlines()[-1]
    # asked anyway, by hand: the provider's gate drops it, nothing runs
    keys = node_identity(member.home).keys
    raw_request(redis_uri, keys, {"name": "lab_service.lookup", "code_hash": "x", "kind": "query",
                                  "task_id": "0" * 32, "namespace": "", "args": {"key": {"json": "a"}}})
    wait_for(lambda: owner.status()["channels"]["lab"]["dropped"].get("not_permitted"), what="the drop")
    assert runs(tmp_path) == [] and answers(bucket) == []


# -- liveness, takeover, the queue and cancel, Dask ------------------------------------------------
def test_a_task_longer_than_request_timeout_is_waited_for_while_its_provider_reports(lab, tmp_path):
    owner, member, _, _ = lab
    owner.start_daemon("lab", *SERVE, "--heartbeat", "0.5", KT_SLOW="5")
    out = call(member, "s.lookup('slow')", KACHERY_TASKS_REQUEST_TIMEOUT="2")
    assert out.stdout.strip() == "{'key': 'slow', 'value': 'one'}" and "StaleResultWarning" not in out.stderr
    assert runs(tmp_path) == ["owner:lookup"]


def test_a_provider_killed_mid_query_is_named_and_another_provider_takes_it_over(lab, tmp_path):
    owner, member, outsider, bucket = lab
    owner.kachery("channel", "grant", "lab", outsider.node_id, "--owner", "eve@else.org", "--perm", "provide_tasks")
    for node in (owner, outsider):
        node.start_daemon("lab", *SERVE, "--heartbeat", "0.5", KT_SLOW="4")
    nodes = {"owner": owner, "outsider": outsider}
    result: list = []
    caller = threading.Thread(target=lambda: result.append(call(member, "s.lookup('t')", check=False)))
    caller.start()
    first = wait_for(lambda: runs(tmp_path), what="the query to start")[0].split(":")[0]
    time.sleep(1)  # word of the running query reaches the requester
    nodes[first].stop_daemon(signal.SIGKILL)
    caller.join(90)
    out = result[0]
    other = "outsider" if first == "owner" else "owner"
    assert out.returncode == 0 and out.stdout.strip() == "{'key': 't', 'value': 'one'}", out.stderr
    assert "StaleResultWarning" not in out.stderr
    told = [line for line in out.stderr.splitlines() if "stopped heartbeating" in line]
    assert told and nodes[first].node_id[:12] in told[0] and "running since" in told[0], out.stderr
    assert runs(tmp_path) == [f"{first}:lookup", f"{other}:lookup"]
    claims = [json.loads(p.read_text()) for p in bucket.glob("channels/lab/claims/*.json")]
    assert [c["node_id"] for c in claims] == [nodes[other].node_id]
    assert claims[0]["taken_from"] == nodes[first].node_id


def test_a_queued_request_is_cancelled_when_its_requester_gives_up(lab, tmp_path):
    owner, member, _, bucket = lab
    owner.start_daemon("lab", *SERVE, "--heartbeat", "0.5", "--concurrency", "1", KT_SLOW="4")
    first: list = []
    caller = threading.Thread(target=lambda: first.append(call(member, "s.lookup('first')")))
    caller.start()
    wait_for(lambda: runs(tmp_path) == ["owner:lookup"], what="the first query to run")
    code = "import lab_service as s\ns.lookup('second')"
    second = subprocess.Popen([sys.executable, "-c", code], env=member.env, cwd=member.home.parent,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: owner.status()["tasks"]["queued"] == 1, what="the second query to queue")
    second.send_signal(signal.SIGINT)  # the requester gives up: Ctrl-C
    _, err = second.communicate(timeout=60)
    assert second.returncode != 0 and "KeyboardInterrupt" in err
    wait_for(lambda: any(a["status"] == "cancelled" for a in answers(bucket)), what="the cancelled answer")
    caller.join(60)
    assert first[0].stdout.strip() == "{'key': 'first', 'value': 'one'}"
    time.sleep(1)
    assert runs(tmp_path) == ["owner:lookup"]  # the second never ran
    assert "cancelled" in owner.log_text()


def test_served_tasks_run_on_a_local_cluster_started_by_the_daemon(lab, tmp_path):
    owner, member, _, _ = lab
    owner.start_daemon("lab", *SERVE, "--workers", "1")
    assert call(member, "s.scaled(5)").stdout.strip() == "10"
    assert call(member, "s.lookup('c')").stdout.strip() == "{'key': 'c', 'value': 'one'}"
    assert "ok=True" in call(member, "s.notify.call('cat', key='k-c')").stdout
    assert "ok=True" in call(member, "s.notify.call('cat', key='k-c')").stdout
    assert runs(tmp_path) == ["owner:scaled", "owner:lookup", "owner:notify"]
    assert "served tasks run on Dask scheduler" in owner.log_text() and "(1 worker thread(s))" in owner.log_text()
    assert daemon_pid(owner) not in ran_in(tmp_path)  # in the cluster's worker process, not the daemon
    assert "k-c" in owner.kachery("task", "actions").stdout


def test_served_tasks_run_on_an_existing_cluster(lab, tmp_path):
    owner, member, _, _ = lab
    script = ("from distributed import LocalCluster\n"
              "c = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)\n"
              "print(c.scheduler_address, flush=True)\ninput()\n")
    cluster = subprocess.Popen([sys.executable, "-c", script], env=owner.env, cwd=owner.home.parent,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("tcp://"), address
        owner.start_daemon("lab", *SERVE, "--dask-scheduler", address)
        assert call(member, "s.scaled(7)").stdout.strip() == "14"
        assert runs(tmp_path) == ["owner:scaled"]
        assert f"served tasks run on Dask scheduler {address}" in owner.log_text()
        assert daemon_pid(owner) not in ran_in(tmp_path)
    finally:
        cluster.kill()
        cluster.wait(30)
