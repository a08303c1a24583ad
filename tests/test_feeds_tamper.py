"""Every kind of tampering with a stored subfeed is detected, at the right seq, and nothing is dropped."""

from __future__ import annotations

import json

import pytest

from kachery_tasks import config
from kachery_tasks.feeds import FeedTamperError, create_feed, load_feed


@pytest.fixture
def sub(tmp_path):
    with config.set(home=str(tmp_path), feed_checkpoint_every=8):
        s = create_feed().subfeed("log")
        s.append_many([{"i": i, "text": f"entry {i}"} for i in range(20)])  # checkpoints at 8, 16
        yield s


def _lines(sub):
    return sub.path.read_bytes().split(b"\n")[:-1]


def _write(sub, lines):
    sub.path.write_bytes(b"".join(line + b"\n" for line in lines))


def _fails_at(sub, seq, match=None):
    fresh = load_feed(sub.feed.uri).subfeed(sub.name)
    for check in (fresh.verify, lambda: fresh.replay(lambda s, m: s, None)):
        with pytest.raises(FeedTamperError, match=match) as exc:
            check()
        assert exc.value.seq == seq, str(exc.value)
        assert len(str(exc.value).splitlines()) == 1
    return exc.value


def _edit(line, **changes):
    msg = json.loads(line)
    msg.update(changes)
    return json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_clean_feed_verifies(sub):
    assert load_feed(sub.feed.uri).subfeed("log").verify()["messages"] == 20


@pytest.mark.parametrize("seq", [0, 3, 7, 8, 15, 17, 19])
def test_altered_body(sub, seq):
    lines = _lines(sub)
    lines[seq] = _edit(lines[seq], body={"i": seq, "text": "rewritten"})
    _write(sub, lines)
    _fails_at(sub, seq, "altered")


@pytest.mark.parametrize("seq", [0, 5, 12, 19])
def test_altered_signature(sub, seq):
    lines = _lines(sub)
    sig = json.loads(lines[seq])["signature"]
    lines[seq] = _edit(lines[seq], signature=("0" if sig[0] != "0" else "1") + sig[1:])
    _write(sub, lines)
    _fails_at(sub, seq)


def test_altered_prev_and_timestamp(sub):
    lines = _lines(sub)
    lines[18] = _edit(lines[18], timestamp=1)
    _write(sub, lines)
    _fails_at(sub, 18)


def test_non_canonical_rewrite_of_same_content(sub):
    lines = _lines(sub)
    lines[19] = json.dumps(json.loads(lines[19])).encode()  # same message, other spacing
    _write(sub, lines)
    _fails_at(sub, 19, "canonical")


@pytest.mark.parametrize("seq", [0, 4, 19])
def test_removed_line(sub, seq):
    lines = _lines(sub)
    del lines[seq]
    _write(sub, lines)
    # removing the last line leaves a shorter, valid prefix: only a checkpoint could tell, and the
    # last one covers 16, so that case is caught by the truncation test instead
    if seq == 19:
        assert load_feed(sub.feed.uri).subfeed("log").verify()["messages"] == 19
        return
    _fails_at(sub, seq, "missing")


@pytest.mark.parametrize("seq", [0, 6, 18])
def test_reordered_lines(sub, seq):
    lines = _lines(sub)
    lines[seq], lines[seq + 1] = lines[seq + 1], lines[seq]
    _write(sub, lines)
    _fails_at(sub, seq, "missing")


def test_duplicated_line(sub):
    lines = _lines(sub)
    lines.insert(5, lines[4])
    _write(sub, lines)
    _fails_at(sub, 5, "out of place")


@pytest.mark.parametrize("keep", [10, 15, 3])
def test_truncated_after_checkpoint(sub, keep):
    lines = _lines(sub)
    _write(sub, lines[:keep])
    exc = _fails_at(sub, keep, "truncated")
    assert "16" in str(exc)


def test_truncated_mid_line_below_checkpoint_is_not_repaired(sub):
    data = sub.path.read_bytes()
    cut = sum(len(line) + 1 for line in _lines(sub)[:12]) + 10
    sub.path.write_bytes(data[:cut])
    _fails_at(sub, 12, "truncated")
    with pytest.raises(FeedTamperError):
        load_feed(sub.feed.uri).subfeed("log").append({"x": 1})
    assert sub.path.read_bytes() == data[:cut]  # evidence left as found


def test_garbage_line(sub):
    lines = _lines(sub)
    lines[9] = b"{not json"
    _write(sub, lines)
    _fails_at(sub, 9, "JSON")


def test_checkpoint_file_tampering(sub):
    cps = sub.cp_path.read_bytes().split(b"\n")[:-1]
    cp = json.loads(cps[1])
    cp["root"] = "0" * 64
    sub.cp_path.write_bytes(cps[0] + b"\n" + json.dumps(cp).encode() + b"\n")
    with pytest.raises(FeedTamperError, match="checkpoint"):
        load_feed(sub.feed.uri).subfeed("log").verify()


def test_tamper_seen_by_live_reader(sub):
    reader = load_feed(sub.feed.uri).subfeed("log")
    assert len(reader) == 20
    lines = _lines(sub)
    _write(sub, lines[:18])
    with pytest.raises(FeedTamperError) as exc:
        reader.messages()
    assert exc.value.seq == 18
