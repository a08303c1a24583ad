"""Feeds: round trips, replay, checkpoints, proofs, ingest, forks, URIs, keys."""

from __future__ import annotations

import json
import stat

import pytest

from kachery_tasks import config
from kachery_tasks.errors import InvalidURI, NotFoundError, UserError
from kachery_tasks.feeds import (
    ZERO_HASH,
    Checkpoint,
    ConsistencyProof,
    FeedReadOnlyError,
    ForkedFeedError,
    InclusionProof,
    InvalidMessageError,
    canonical,
    create_feed,
    list_feeds,
    load_feed,
    local_feed,
    resolve_feed,
    verify_consistency,
    verify_inclusion,
)
from kachery_tasks.feeds.messages import sign_message
from kachery_tasks.feeds.storage import key_path
from kachery_tasks.identity import KeyPair, verify


@pytest.fixture
def home(tmp_path):
    with config.set(home=str(tmp_path), feed_checkpoint_every=8):
        yield tmp_path


def test_round_trip_and_message_format(home):
    feed = create_feed(label="lab")
    sub = feed.subfeed("notes")
    m0 = sub.append({"a": 1, "ü": [1.5, None, True]})
    more = sub.append_many([{"i": i} for i in range(3)])
    assert len(sub) == 4 and [m["seq"] for m in more] == [1, 2, 3]
    got = sub.messages()
    assert got[0] == m0 and got[0]["body"] == {"a": 1, "ü": [1.5, None, True]}
    assert got[0]["prev"] == ZERO_HASH
    assert sub.messages(2, 3) == [more[1]] and sub.messages(10) == []
    # on disk: one canonical signed message per line, prev = sha256 of the previous line
    lines = sub.path.read_bytes().splitlines()
    assert len(lines) == 4 and all(canonical(json.loads(line)) == line for line in lines)
    import hashlib

    assert json.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()
    unsigned = {k: v for k, v in got[1].items() if k != "signature"}
    assert verify(feed.feed_id, canonical(unsigned), got[1]["signature"])
    # a second Feed object (as in another process) reads the same
    again = load_feed(feed.uri)
    assert again.writable and again.label == "lab" and again.subfeed("notes").messages() == got
    assert feed.subfeeds() == ["notes"]


def test_replay_rebuilds_state(home):
    sub = create_feed().subfeed("ledger")
    ops = [("deposit", 10), ("withdraw", 3), ("deposit", 5), ("withdraw", 1)] * 5
    sub.append_many([{"op": op, "amount": n} for op, n in ops])

    def reducer(balance, msg):
        b = msg["body"]
        return balance + (b["amount"] if b["op"] == "deposit" else -b["amount"])

    assert sub.replay(reducer, 0) == 11 * 5
    assert sub.replay(reducer, 0, verify=False) == 11 * 5
    assert sub.replay(lambda seen, m: seen + [m["seq"]], []) == list(range(20))


def test_checkpoints_every_n_and_on_demand(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(20)])
    sizes = [cp.size for cp in sub.checkpoints()]
    assert sizes == [8, 16]
    cp = sub.checkpoint()
    assert cp.size == 20 and cp.signed_by(feed.feed_id) and sub.checkpoint() == cp
    assert not cp.signed_by(KeyPair.generate().public_hex)
    report = sub.verify()
    assert report["by_checkpoint"] == 20 and report["by_signature"] == 0
    sub.append({"i": 20})
    assert sub.verify()["by_signature"] == 1


def test_inclusion_and_consistency_proofs(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(21)])
    sub.checkpoint()
    msgs = sub.messages()
    for seq in range(21):
        proof = sub.inclusion_proof(seq)
        wire = InclusionProof.from_dict(json.loads(json.dumps(proof.to_dict())))
        assert verify_inclusion(feed.feed_id, msgs[seq], wire)
    proof = sub.inclusion_proof(5)
    other = KeyPair.generate().public_hex
    assert not verify_inclusion(other, msgs[5], proof)  # wrong key
    assert not verify_inclusion(feed.feed_id, msgs[6], proof)  # wrong message
    altered = {**msgs[5], "body": {"i": 99}}
    assert not verify_inclusion(feed.feed_id, altered, proof)
    bad_path = InclusionProof(proof.seq, proof.size, [proof.path[0][::-1]] + proof.path[1:], proof.checkpoint)
    assert not verify_inclusion(feed.feed_id, msgs[5], bad_path)
    short = InclusionProof(proof.seq, proof.size, proof.path[:-1], proof.checkpoint)
    assert not verify_inclusion(feed.feed_id, msgs[5], short)
    forged_cp = Checkpoint(**{**proof.checkpoint.to_dict(), "size": 16})
    assert not verify_inclusion(feed.feed_id, msgs[5], InclusionProof(5, 16, proof.path, forged_cp))

    cons = sub.consistency_proof(8)
    assert cons.old.size == 8 and cons.new.size == 21
    assert verify_consistency(feed.feed_id, ConsistencyProof.from_dict(json.loads(json.dumps(cons.to_dict()))))
    assert verify_consistency(feed.feed_id, sub.consistency_proof(8, 16), old=sub.checkpoints()[0])
    assert not verify_consistency(feed.feed_id, cons, old=sub.checkpoints()[1])
    assert not verify_consistency(other, cons)
    assert not verify_consistency(feed.feed_id, ConsistencyProof(cons.old, cons.new, cons.path[1:]))
    assert not verify_consistency(feed.feed_id, ConsistencyProof(cons.old, cons.new, list(reversed(cons.path))))
    # a validly signed checkpoint of another history is not consistent
    keys = feed.keys
    fake_new = Checkpoint.create(keys, "s", 21, bytes(32))
    assert not verify_consistency(feed.feed_id, ConsistencyProof(cons.old, fake_new, cons.path))
    with pytest.raises(UserError):
        sub.consistency_proof(3)
    sub.append({"i": 21})
    with pytest.raises(UserError, match="not covered"):
        sub.inclusion_proof(21)


def test_ingest_continuations_duplicates_forgeries(home):
    src = create_feed()
    a = src.subfeed("s")
    a.append_many([{"i": i} for i in range(5)])
    msgs = a.messages()
    # a copy of this feed without the key, as another node would hold it
    key_path(src.feed_id).rename(home / "moved.pem")
    mirror = load_feed(src.uri)
    assert not mirror.writable
    with pytest.raises(FeedReadOnlyError):
        mirror.subfeed("t").append({"x": 1})
    b = mirror.subfeed("t")
    r = b.ingest(msgs[:3])
    assert (r.appended, r.duplicates, r.forked) == (3, 0, False)
    r = b.ingest(msgs)  # overlapping delivery
    assert (r.appended, r.duplicates) == (2, 3) and b.messages() == msgs
    # forged: same content signed by another key
    thief = KeyPair.generate()
    forged = json.loads(sign_message(thief, 5, "0" * 64, {"evil": True}))
    r = b.ingest([forged, json.dumps({**msgs[0], "body": {"i": 7}}), "not json", {"seq": 9}])
    assert r.appended == 0 and len(r.rejected) == 4 and not r.forked
    assert r.rejected[0][0] == 5 and "signature" in r.rejected[0][1]
    assert len(b) == 5 and b.verify()["messages"] == 5


def test_fork_evidence_freezes_feed_until_resolved(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(4)])
    msgs = sub.messages()
    other = json.loads(sign_message(feed.keys, 2, msgs[2]["prev"], {"i": "other"}))
    r = sub.ingest([other])
    assert r.forked and r.forks == [2]
    ev = feed.forks()
    assert len(ev) == 1 and ev[0]["seq"] == 2 and ev[0]["local"] == msgs[2] and ev[0]["remote"] == other
    for use in (lambda: sub.append({"x": 1}), sub.messages, lambda: len(sub), lambda: sub.tail(0, 0),
                lambda: load_feed(feed.uri).subfeed("s").messages(), feed.verify):
        with pytest.raises(ForkedFeedError, match="forked"):
            use()
    assert [f["forked"] for f in list_feeds()] == [True]
    cleared = feed.resolve_fork(keep="local")
    assert len(cleared) == 1 and feed.forks() == []
    assert sub.messages() == msgs
    sub.append({"i": 4})
    assert len(sub) == 5
    with pytest.raises(UserError):
        feed.resolve_fork()


def test_fork_resolved_for_remote_history(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(10)])  # checkpoint at 8
    msgs = sub.messages()
    theirs = json.loads(sign_message(feed.keys, 3, msgs[3]["prev"], {"i": "theirs"}))
    assert sub.ingest([theirs]).forked
    feed.resolve_fork("s", keep="remote")
    got = sub.messages()
    assert got[:3] == msgs[:3] and got[3] == theirs and len(got) == 4
    assert sub.verify()["messages"] == 4
    sub.append({"i": "next"})
    assert sub.verify()["messages"] == 5


def test_prev_mismatch_at_head_is_fork_evidence(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(3)])
    stray = json.loads(sign_message(feed.keys, 3, "ab" * 32, {"i": 3}))
    r = sub.ingest([stray])
    assert r.forks == [2]
    with pytest.raises(ForkedFeedError):
        sub.append({})


def test_conflicting_checkpoint_is_fork_evidence(home):
    feed = create_feed()
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(10)])
    good = sub.checkpoints()[0]
    assert sub.ingest_checkpoints([good]).duplicates == 1
    forged = Checkpoint.create(KeyPair.generate(), "s", 8, bytes(32))
    assert len(sub.ingest_checkpoints([forged.to_dict()]).rejected) == 1
    conflicting = Checkpoint.create(feed.keys, "s", 8, bytes(32))
    assert sub.ingest_checkpoints([conflicting]).forks == [7]
    with pytest.raises(ForkedFeedError):
        sub.messages()
    feed.resolve_fork(keep="local")
    assert len(sub.messages()) == 10


def test_bad_bodies_and_names(home):
    sub = create_feed().subfeed("s")
    for bad in ({1: "x", "a": 2}, {"f": float("nan")}, {"o": object()}, {"s": {1, 2}}):
        with pytest.raises(InvalidMessageError):
            sub.append(bad)
    assert len(sub) == 0
    with pytest.raises(UserError):
        sub.messages(-1)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "a/b", "", "\x00", "ÄÖ" * 200, ".."])
def test_hostile_subfeed_names_stay_inside(home, name):
    feed = create_feed()
    sub = feed.subfeed(name)
    sub.append({"n": name})
    assert sub.path.parent == feed.dir and len(sub.path.name) == 64 + len(".jsonl")
    assert name in feed.subfeeds()
    assert load_feed(feed.uri).subfeed(name).messages()[0]["body"] == {"n": name}


@pytest.mark.parametrize(
    "uri",
    ["feed://" + "A" * 64, "feed://" + "a" * 63, "feed://" + "a" * 65, "feed://../../" + "a" * 58,
     "feed://" + "a" * 64 + "\n", " feed://" + "a" * 64, "FEED://" + "a" * 64, "sha256://" + "a" * 64,
     "feed://" + "g" * 64, "feed://" + "a" * 64 + "/x", "feed:/" + "a" * 64, "", None, 5],
)
def test_hostile_feed_uris_rejected(home, uri):
    with pytest.raises(InvalidURI) as exc:
        load_feed(uri)
    assert len(str(exc.value).splitlines()) == 1


def test_both_forms_of_a_feed_id_everywhere(home):
    """feed://<id> and the bare <id> name the same feed in every function; what is neither raises,
    never a silent False from a proof check (issue 27 section 6)."""
    feed = create_feed(label="lab")
    sub = feed.subfeed("s")
    sub.append_many([{"i": i} for i in range(5)])
    sub.checkpoint()
    proof = sub.inclusion_proof(2)
    for ref in (feed.uri, feed.feed_id):
        assert load_feed(ref).feed_id == feed.feed_id
        assert resolve_feed(ref).feed_id == feed.feed_id
        assert verify_inclusion(ref, sub.messages()[2], proof)
        assert proof.checkpoint.signed_by(ref)
    sub.append_many([{"i": i} for i in range(5, 9)])
    sub.checkpoint()
    cons = sub.consistency_proof(5)
    assert verify_consistency(feed.uri, cons) and verify_consistency(feed.feed_id, cons)
    for bad in ("lab", feed.uri.upper(), feed.feed_id[:-1], " " + feed.uri, feed, None):
        with pytest.raises(InvalidURI, match="not a feed id") as exc:
            verify_inclusion(bad, sub.messages()[2], proof)
        assert len(str(exc.value).splitlines()) == 1
        with pytest.raises(InvalidURI, match="not a feed id"):
            verify_consistency(bad, cons)
        with pytest.raises(InvalidURI, match="not a feed id"):
            load_feed(bad)


def test_a_unique_label_names_a_feed(home):
    lab = create_feed(label="lab")
    assert resolve_feed("lab").feed_id == lab.feed_id
    actions = local_feed("actions")
    assert resolve_feed("actions").feed_id == actions.feed_id  # a local name (also its label)
    twin = create_feed(label="lab")
    with pytest.raises(UserError) as exc:
        resolve_feed("lab")
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and "names 2 feeds" in message
    assert lab.uri in message and twin.uri in message
    with pytest.raises(NotFoundError, match="no feed named 'nothing'"):
        resolve_feed("nothing")


def test_unknown_feed_not_found(home):
    with pytest.raises(NotFoundError, match="feed ls"):
        load_feed("feed://" + "a" * 64)
    assert not load_feed("feed://" + "a" * 64, create=True).writable


def test_key_file_mode_0600(home):
    feed = create_feed()
    path = key_path(feed.feed_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not str(path).startswith(str(feed.dir))
    assert KeyPair.load(path).public_hex == feed.feed_id


def test_local_feed_found_again_by_name(home, tmp_path_factory):
    a = local_feed("actions")
    assert local_feed("actions").feed_id == a.feed_id and a.writable
    assert local_feed("other").feed_id != a.feed_id
    rows = {r["feed"]: r for r in list_feeds()}
    assert rows[a.feed_id]["names"] == ["actions"]
    with config.set(home=str(tmp_path_factory.mktemp("h2"))):
        assert local_feed("actions").feed_id != a.feed_id
    with pytest.raises(UserError):
        local_feed("")


def test_tail_returns_at_once_or_times_out(home):
    sub = create_feed().subfeed("s")
    assert sub.tail(0, timeout=0.05) == []
    sub.append({"i": 0})
    assert [m["seq"] for m in sub.tail(0, timeout=0)] == [0]
    import threading

    t = threading.Timer(0.1, lambda: sub.append({"i": 1}))
    t.start()
    assert [m["seq"] for m in sub.tail(1, timeout=5)] == [1]
    t.join()


def test_message_longer_than_read_chunk(home):
    feed = create_feed()
    sub = feed.subfeed("big")
    sub.append_many([{"i": 0}, {"blob": "x" * (9 * 2**20)}, {"i": 2}])
    reader = load_feed(feed.uri).subfeed("big")
    assert [len(m["body"].get("blob", "")) for m in reader.messages()] == [0, 9 * 2**20, 0]
    assert reader.verify()["messages"] == 3
