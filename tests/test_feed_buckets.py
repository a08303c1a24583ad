"""Feeds shared through a bucket (issue 21): the writer's node publishes, other nodes (separate
processes, separate homes) load them verified; the head moves by compare-and-swap only; tampered
and forked copies are reported and never merged.

Nothing is counted through globals: each node is a subprocess that prints JSON, and the bucket is
inspected from the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bucket_fixtures import open_test_bucket

from kachery_tasks import config
from kachery_tasks.buckets import Bucket
from kachery_tasks.buckets.feeds import publish_feed, read_head
from kachery_tasks.buckets.layout import feed_head_key, feed_segment_key
from kachery_tasks.feeds import create_feed, load_feed, stored_feed
from kachery_tasks.feeds.storage import subfeed_stem
from kachery_tasks.identity import KeyPair
from kachery_tasks.identity.documents import canonical_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket_kind() -> str:
    """A directory bucket, unless a test parametrizes ``bucket_kind`` (the round trip: both kinds)."""
    return "directory"


PRELUDE = """import json
import kachery_tasks as kt


def dump(f):
    return {n: f.subfeed(n).messages() for n in f.subfeeds()}
"""


class Node:
    """A home of its own and a bucket; runs Python snippets and the kachery command in subprocesses."""

    def __init__(self, tmp: Path, name: str, bucket: str, **settings: str):
        self.home = tmp / name
        self.home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_TASKS_")}
        self.env.update({"KACHERY_TASKS_HOME": str(self.home), "KACHERY_TASKS_BUCKET": bucket,
                         "KACHERY_TASKS_FEED_CHECKPOINT_EVERY": "4",
                         "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])})
        self.env.update({f"KACHERY_TASKS_{k.upper()}": v for k, v in settings.items()})

    def start(self, code: str) -> subprocess.Popen:
        script = PRELUDE + textwrap.dedent(code)
        return subprocess.Popen([sys.executable, "-c", script], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.home)

    def py(self, code: str, *, ok: bool = True) -> subprocess.CompletedProcess:
        proc = self.start(code)
        out, err = proc.communicate(timeout=180)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if ok:
            assert proc.returncode == 0, err
        return done

    def json(self, code: str):
        return json.loads(self.py(code).stdout.strip().splitlines()[-1])

    def kachery(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=180, cwd=self.home)




def _writer(tmp: Path, bucket_uri: str) -> tuple[Node, str]:
    a = Node(tmp, "a", bucket_uri)
    uri = a.py("""
        f = kt.create_feed(label="lab")
        f.subfeed("notes").append_many([{"i": i} for i in range(10)])
        f.subfeed("other").append({"x": "first"})
        print(f.uri)
    """).stdout.strip()
    return a, uri


# -- the round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("bucket_kind", ["directory", "gcs"])
def test_publish_then_load_verified_then_only_new_messages(tmp_path, bucket_uri, bucket):
    a, uri = _writer(tmp_path, bucket_uri)
    pub = a.kachery("feed", "publish", "lab", "--json")
    assert pub.returncode == 0, pub.stderr
    sent = json.loads(pub.stdout)
    assert sent["subfeeds"] == {"notes": {"messages": 10, "new": 10}, "other": {"messages": 1, "new": 1}}
    assert sent["changed"] and sent["retries"] == 0

    b = Node(tmp_path, "b", bucket_uri)
    mine = a.json(f"print(json.dumps(dump(kt.load_feed({uri!r}))))")
    got = b.json(f"""
        f = kt.load_feed({uri!r})
        assert not f.writable
        assert [r["messages"] for r in f.verify()] == [10, 1]
        print(json.dumps(dump(f)))
    """)
    assert got == mine  # every signed message, byte for byte the same

    # publishing again with nothing new leaves the head where it was
    generation = read_head(bucket, uri[7:])[1]
    again = json.loads(a.kachery("feed", "publish", uri, "--json").stdout)
    assert not again["changed"] and again["generation"] == generation

    # more messages: the head moves; B reads only the new segment (the old ones are gone now)
    a.py(f'kt.load_feed({uri!r}).subfeed("notes").append_many([{{"i": i}} for i in range(10, 15)])')
    assert a.kachery("feed", "publish", uri).returncode == 0
    head, moved = read_head(bucket, uri[7:])
    assert moved != generation and head["subfeeds"][subfeed_stem("notes")]["count"] == 15
    for info in list(bucket.list(f"feeds/{uri[7:]}/")):
        if "/0-" in info.key:
            bucket.delete(info.key)
    got = b.json(f"""
        f = kt.load_feed({uri!r}, pull=False)
        before = len(f.subfeed("notes"))
        added = f.pull()
        print(json.dumps([before, added, [m["body"]["i"] for m in f.subfeed("notes").messages()],
                          f.subfeed("notes").verify()["messages"]]))
    """)
    assert got == [10, 5, list(range(15)), 15]


def test_cli_pull_and_read_only_publish(tmp_path, bucket_uri):
    a, uri = _writer(tmp_path, bucket_uri)
    assert a.kachery("feed", "publish", "lab").returncode == 0
    b = Node(tmp_path, "b", bucket_uri)
    pulled = b.kachery("feed", "pull", uri)
    assert pulled.returncode == 0, pulled.stderr
    assert "11 new message(s)" in pulled.stdout
    assert "0 new message(s)" in b.kachery("feed", "pull", uri[7:]).stdout
    refused = b.kachery("feed", "publish", uri)
    assert refused.returncode == 1 and "read-only here" in refused.stderr and "Traceback" not in refused.stderr
    missing = b.kachery("feed", "pull", "feed://" + "0" * 64)
    assert missing.returncode == 1 and "nor in a configured bucket" in missing.stderr


# -- compare-and-swap -------------------------------------------------------------------------------
def test_two_writer_processes_publishing_at_once_lose_nothing(tmp_path, bucket_uri, bucket):
    a, uri = _writer(tmp_path, bucket_uri)
    go = tmp_path / "go"
    code = f"""
        import os, time
        from kachery_tasks.buckets.feeds import publish_feed
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        f = kt.load_feed({uri!r})
        retries = 0
        for k in range(15):
            f.subfeed(SUB).append({{"k": k, "who": WHO}})
            retries += publish_feed(f).retries
        print(json.dumps(retries))
    """
    procs = [a.start(f"SUB, WHO = {sub!r}, {who}\n" + textwrap.dedent(code))
             for who, sub in enumerate(["notes", "notes", "other"])]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    head, _ = read_head(bucket, uri[7:])
    counts = {e["name"]: e["count"] for e in head["subfeeds"].values()}
    assert counts == {"notes": 40, "other": 16}

    b = Node(tmp_path, "b", bucket_uri)
    mine = a.json(f"print(json.dumps(dump(kt.load_feed({uri!r}))))")
    assert b.json(f"print(json.dumps(dump(kt.load_feed({uri!r}))))") == mine


class _RaceBucket(Bucket):
    """Delegates to a bucket; before the first head CAS, runs ``before`` (another process publishing)."""

    def __init__(self, inner: Bucket, before):
        super().__init__(inner.uri)
        self.inner, self.before, self.cas = inner, before, 0

    def stat(self, key):
        return self.inner.stat(key)

    def read(self, key, start=0, end=None):
        return self.inner.read(key, start, end)

    def write(self, key, data):
        return self.inner.write(key, data)

    def write_if_generation(self, key, data, generation):
        self.cas += 1
        if self.cas == 1:
            self.before()
        return self.inner.write_if_generation(key, data, generation)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        return self.inner.delete(key)


def test_a_head_moved_between_read_and_write_is_retried(tmp_path, bucket_uri, bucket, home):
    feed = create_feed()
    feed.subfeed("notes").append_many([{"i": i} for i in range(3)])
    other = Node(tmp_path, "other-process", bucket_uri)
    other.env["KACHERY_TASKS_HOME"] = str(home)  # the same writer: another process of this node

    def meanwhile():
        other.py(f"""
            from kachery_tasks.buckets.feeds import publish_feed
            f = kt.load_feed({feed.uri!r})
            f.subfeed("notes").append({{"i": "meanwhile"}})
            f.subfeed("late").append({{"x": 1}})
            assert publish_feed(f).changed
        """)
        feed.subfeed("notes").append({"i": "after"})  # what only the retry can publish

    racing = _RaceBucket(open_test_bucket(bucket_uri), meanwhile)
    out = publish_feed(feed, racing)
    assert out.retries == 1 and out.changed and racing.cas == 2
    head, _ = read_head(bucket, feed.feed_id)
    counts = {e["name"]: e["count"] for e in head["subfeeds"].values()}
    assert counts == {"notes": 5, "late": 1} == {n: len(feed.subfeed(n)) for n in feed.subfeeds()}
    spans = [(s["start"], s["end"]) for s in head["subfeeds"][subfeed_stem("notes")]["segments"]]
    assert spans == [(0, 4), (4, 5)]  # built on the other process's head, not over it


# -- tampered copies ---------------------------------------------------------------------------------
def _segment_keys(bucket: Bucket, feed_id: str, name: str) -> list[str]:
    return [i.key for i in bucket.list(f"feeds/{feed_id}/{subfeed_stem(name)}/")]


def test_a_segment_altered_in_the_bucket_is_reported_and_nothing_stored(tmp_path, bucket_uri, bucket):
    a, uri = _writer(tmp_path, bucket_uri)
    assert a.kachery("feed", "publish", uri).returncode == 0
    [key] = _segment_keys(bucket, uri[7:], "notes")
    data = b"".join(bucket.read(key)).replace(b'{"i":3}', b'{"i":4}')
    bucket.delete(key)
    bucket.write(key, data)
    b = Node(tmp_path, "b", bucket_uri)
    failed = b.py(f"kt.load_feed({uri!r})", ok=False)
    assert failed.returncode != 0
    assert "FeedObjectTampered" in failed.stderr and key in failed.stderr and "altered" in failed.stderr
    with config.set(home=str(b.home)):
        assert stored_feed(uri) is None  # nothing of the copy was kept, not even the other subfeed


def test_a_validly_hashed_segment_with_a_forged_message_is_reported_and_nothing_merged(tmp_path, bucket_uri,
                                                                                          bucket):
    a, uri = _writer(tmp_path, bucket_uri)
    fid = uri[7:]
    assert a.kachery("feed", "publish", uri).returncode == 0
    b = Node(tmp_path, "b", bucket_uri)
    assert b.json(f'print(len(kt.load_feed({uri!r}).subfeed("notes")))') == 10
    a.py(f'kt.load_feed({uri!r}).subfeed("notes").append_many([{{"i": i}} for i in range(10, 14)])')
    assert a.kachery("feed", "publish", uri).returncode == 0

    # someone holding the key's head-signing power but forging a message: the segment's name and the
    # head agree with its bytes, so only the message's own signature can catch it
    keys = KeyPair.load(a.home / "keys" / "feeds" / f"{fid}.pem")
    head, generation = read_head(bucket, fid)
    stem = subfeed_stem("notes")
    entry = head["subfeeds"][stem]
    seg = entry["segments"][-1]
    assert (seg["start"], seg["end"]) == (10, 14)
    lines = b"".join(bucket.read(feed_segment_key(fid, stem, 10, 14, seg["sha256"]))).split(b"\n")[:-1]
    msg = json.loads(lines[2])
    msg["body"] = {"i": 999}
    lines[2] = canonical_json(msg)
    data = b"".join(line + b"\n" for line in lines)
    seg["sha256"] = __import__("hashlib").sha256(data).hexdigest()
    bad_key = feed_segment_key(fid, stem, 10, 14, seg["sha256"])
    bucket.write(bad_key, data)
    unsigned = {k: v for k, v in head.items() if k != "signature"}
    bucket.write_if_generation(feed_head_key(fid), canonical_json({**unsigned, "signature": keys.sign(
        canonical_json(unsigned))}), generation)

    failed = b.py(f"kt.load_feed({uri!r})", ok=False)
    assert "FeedObjectTampered" in failed.stderr and "message 12 fails its signature" in failed.stderr
    assert bad_key in failed.stderr
    # nothing merged: B still holds its 10 verified messages, not 10..11 before the forged one
    assert b.json(f"""
        f = kt.load_feed({uri!r}, pull=False)
        print(json.dumps([len(f.subfeed("notes")), f.subfeed("notes").verify()["messages"], f.forks()]))
    """) == [10, 10, []]


def test_a_forged_head_is_reported(tmp_path, bucket_uri, bucket):
    a, uri = _writer(tmp_path, bucket_uri)
    assert a.kachery("feed", "publish", uri).returncode == 0
    key = feed_head_key(uri[7:])
    head = json.loads(b"".join(bucket.read(key)))
    head["subfeeds"][subfeed_stem("notes")]["count"] = 9
    bucket.write_if_generation(key, canonical_json(head), bucket.stat(key).generation)
    failed = Node(tmp_path, "b", bucket_uri).py(f"kt.load_feed({uri!r})", ok=False)
    assert "not validly signed by the feed's key" in failed.stderr and key in failed.stderr


# -- forks --------------------------------------------------------------------------------------------
def test_a_forked_copy_is_reported_never_merged(tmp_path):
    b1, b2 = tmp_path / "bucket1", tmp_path / "bucket2"
    b1.mkdir()
    b2.mkdir()
    a, uri = _writer(tmp_path, b1.as_uri())
    fid = uri[7:]
    assert a.kachery("feed", "publish", uri).returncode == 0

    # C holds a copy of the same key and signs another history of "other" (short of a checkpoint, so
    # only the chain and the head's last hash can tell the histories apart)
    c = Node(tmp_path, "c", b2.as_uri())
    (c.home / "keys" / "feeds").mkdir(parents=True)
    shutil.copy(a.home / "keys" / "feeds" / f"{fid}.pem", c.home / "keys" / "feeds")
    c.py(f"""
        from kachery_tasks.feeds import load_feed
        f = load_feed({uri!r}, create=True)
        f.subfeed("other").append_many([{{"fork": i}} for i in range(2)])
    """)
    assert c.kachery("feed", "publish", uri).returncode == 0  # into its own, empty bucket

    # B holds A's history, then also reads bucket2 (which holds more of "other" than B): the fork is
    # reported, nothing of C's is stored
    b = Node(tmp_path, "b", b1.as_uri())
    assert b.json(f'print(len(kt.load_feed({uri!r}).subfeed("other")))') == 1
    b.env["KACHERY_TASKS_READ_BUCKETS"] = json.dumps([b2.as_uri()])
    failed = b.py(f"kt.load_feed({uri!r})", ok=False)
    assert "ForkedFeedError" in failed.stderr and "another history signed by the same key" in failed.stderr
    with config.set(home=str(b.home)):
        f = load_feed(uri, pull=False)
        [evidence] = f.forks()
        assert evidence["subfeed"] == "other" and evidence["remote"]["body"] == {"fork": 1}
        assert evidence["local"]["body"] == {"x": "first"}
        f.resolve_fork(keep="local")  # only now readable again: A's messages, none of C's
        assert [m["body"] for m in f.subfeed("other").messages()] == [{"x": "first"}]
        assert len(f.subfeed("notes")) == 10

    # C publishing into A's bucket (whose head holds less of "other" than C): refused, head untouched
    with open_test_bucket(b1.as_uri()) as bucket1:
        before = read_head(bucket1, fid)
        c.env["KACHERY_TASKS_BUCKET"] = b1.as_uri()
        refused = c.kachery("feed", "publish", uri)
        assert refused.returncode == 1 and "another history" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert read_head(bucket1, fid) == before
        assert len(_segment_keys(bucket1, fid, "other")) == 1
    with config.set(home=str(c.home)):
        forked = stored_feed(uri)
        assert forked.forks()  # C's feed is frozen with the evidence
        assert forked.subfeeds() == ["other"]  # and took none of A's "notes" on the way


def test_load_feed_of_a_feed_no_bucket_has(tmp_path, bucket_uri):
    b = Node(tmp_path, "b", bucket_uri)
    failed = b.py(f"kt.load_feed('feed://{'1' * 64}')", ok=False)
    assert "NotFoundError" in failed.stderr and "nor in a configured bucket" in failed.stderr
    assert not (b.home / "feeds" / ("1" * 64)).exists()
