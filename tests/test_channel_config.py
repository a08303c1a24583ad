"""Channel configs, join strings and pins, the owner's edits, envelopes and the receiving gate (issue 22).

Homes here are separate directories with their own node keys (``home_of``); the command-line tests
run ``kachery`` in subprocesses. What a forged, rolled-back or equivocating config does, and what each
kind of bad message does, is checked against the real signing code: forgeries are made by signing
with a key that is not the owner's, or by editing signed bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from kachery_tasks import config
from kachery_tasks.buckets.layout import channel_config_key
from kachery_tasks.buckets.uri import open_bucket
from kachery_tasks.channels import admin
from kachery_tasks.channels.base import MessageTooLarge
from kachery_tasks.channels.config import ChannelConfigError, Member
from kachery_tasks.channels.envelope import BadEnvelope, Envelope, seal
from kachery_tasks.channels.gate import Gate
from kachery_tasks.channels.membership import Membership, read_published
from kachery_tasks.channels.pins import JoinString, Pins
from kachery_tasks.errors import UserError
from kachery_tasks.identity import KeyPair, canonical_json, init_node, node_identity


@pytest.fixture
def lab(tmp_path: Path):
    """An owner home with channel 'lab' on a directory bucket, and a second home that joined it."""
    bucket_dir = tmp_path / "bucket"
    bucket_dir.mkdir()
    owner_home, member_home = tmp_path / "owner", tmp_path / "member"
    init_node(owner_home, "alice@lab.org", "alice")
    init_node(member_home, "bob@lab.org", "bob")
    cfg, join = admin.create_channel(owner_home, "lab", bucket=f"file://{bucket_dir}", transport="memory://lab")
    Pins(member_home).pin(join)
    return type("Lab", (), {
        "owner": owner_home, "member": member_home, "bucket": open_bucket(f"file://{bucket_dir}"), "join": join,
        "owner_id": node_identity(owner_home).node_id, "member_id": node_identity(member_home).node_id,
        "owner_keys": node_identity(owner_home).keys, "member_keys": node_identity(member_home).keys,
    })


def fresh(home: Path) -> Membership:
    return Membership(home, "lab")


def write_raw(lab, data: bytes) -> None:
    """Overwrite the config object as a bucket writer who is not the owner could."""
    key = channel_config_key("lab")
    info = lab.bucket.stat(key)
    lab.bucket.write_if_generation(key, data, info.generation if info else 0)


# --- configs and the owner's edits --------------------------------------------------------------

def test_create_makes_the_owner_a_member_with_every_permission_and_the_member_reads_it(lab):
    cfg = fresh(lab.member).config()
    assert cfg.version == 1 and cfg.owner_key == lab.owner_id
    assert cfg.permissions_of(lab.owner_id) == frozenset(
        {"request_files", "provide_files", "request_feeds", "provide_feeds", "request_tasks", "provide_tasks"})
    assert not cfg.is_member(lab.member_id)


def test_grant_admits_a_node_with_request_permissions_and_groups_add_theirs(lab):
    admin.grant(lab.owner, "lab", lab.member_id, None, owner="bob@lab.org", label="bob")
    cfg = fresh(lab.member).config()
    assert cfg.permissions_of(lab.member_id) == {"request_files", "request_feeds", "request_tasks"}
    admin.grant(lab.owner, "lab", "@sorters", ["provide_tasks"])
    admin.set_group(lab.owner, "lab", "sorters", lab.member_id, member_of=True)
    cfg = fresh(lab.member).config()
    assert cfg.version == 4 and "provide_tasks" in cfg.permissions_of(lab.member_id)
    assert lab.member_id in cfg.members_with("provide_tasks")
    admin.set_group(lab.owner, "lab", "sorters", lab.member_id, member_of=False)
    assert "provide_tasks" not in fresh(lab.member).config().permissions_of(lab.member_id)


def test_revoking_a_permission_a_group_or_the_member(lab):
    admin.grant(lab.owner, "lab", lab.member_id, ["request_files", "provide_files"], owner="bob@lab.org")
    admin.revoke(lab.owner, "lab", lab.member_id, ["provide_files"])
    assert fresh(lab.member).config().permissions_of(lab.member_id) == {"request_files"}
    admin.grant(lab.owner, "lab", "@g", ["provide_feeds"])
    admin.set_group(lab.owner, "lab", "g", lab.member_id, member_of=True)
    admin.revoke(lab.owner, "lab", "@g")
    cfg = fresh(lab.member).config()
    assert "g" not in cfg.groups and cfg.members[lab.member_id].groups == ()
    admin.revoke(lab.owner, "lab", lab.member_id)
    assert not fresh(lab.member).config().is_member(lab.member_id)
    with pytest.raises(UserError, match="owner cannot be revoked"):
        admin.revoke(lab.owner, "lab", lab.owner_id)


def test_a_change_that_changes_nothing_makes_no_new_version(lab):
    admin.grant(lab.owner, "lab", lab.member_id, None, owner="bob@lab.org")
    before = fresh(lab.member).config().version
    admin.grant(lab.owner, "lab", lab.member_id, ["request_files"])
    assert fresh(lab.member).config().version == before


def test_only_the_owner_edits_and_a_new_member_needs_an_email(lab):
    with pytest.raises(UserError, match="not this node"):
        admin.grant(lab.member, "lab", lab.member_id, None, owner="bob@lab.org")
    with pytest.raises(UserError, match="--owner"):
        admin.grant(lab.owner, "lab", lab.member_id, None)


def test_concurrent_edits_from_two_owner_processes_lose_nothing(lab):
    """Compare-and-swap: twenty grants from two processes at once all land, each in its own version."""
    ids = [KeyPair.generate().public_hex for _ in range(20)]
    code = """
import sys
from pathlib import Path
from kachery_tasks.channels import admin
for node in sys.argv[1:]:
    admin.grant(Path({home!r}), "lab", node, None, owner="x@lab.org")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code.format(home=str(lab.owner)), *part],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
             for part in (ids[:10], ids[10:])]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cfg = fresh(lab.member).config()
    assert set(ids) <= set(cfg.members) and cfg.version == 21


# --- what a member refuses ----------------------------------------------------------------------

def test_a_config_signed_by_another_key_is_refused_and_the_old_one_kept(lab, caplog):
    cfg = fresh(lab.member).config()
    mallory = KeyPair.generate()
    forged = cfg.edited(members={**cfg.members, mallory.public_hex: Member(owner="m@x.org", permissions=("provide_tasks",))})
    body = {k: v for k, v in forged.to_json().items() if k != "signature"}
    forged = msgspec.structs.replace(forged, signature=mallory.sign(canonical_json(body)))
    write_raw(lab, forged.to_bytes())
    with caplog.at_level(logging.WARNING):
        kept = fresh(lab.member).config()
    assert kept.version == 1 and not kept.is_member(mallory.public_hex)
    assert "signature does not verify" in caplog.text


def test_a_config_naming_another_owner_is_refused(lab):
    mallory = KeyPair.generate()
    cfg = fresh(lab.member).config()
    theirs = msgspec.structs.replace(cfg, owner_key=mallory.public_hex, version=9,
                                     members={mallory.public_hex: Member(owner="m@x.org")}, signature=None)
    with pytest.raises(ChannelConfigError):
        theirs.signed_by(lab.owner_keys)
    theirs = theirs.signed_by(mallory)
    with pytest.raises(ChannelConfigError, match="pinned"):
        theirs.check_successor(pinned_owner=lab.owner_id, channel="lab", seen=cfg, where="x")


def test_a_rollback_is_refused_even_after_a_restart(lab):
    admin.grant(lab.owner, "lab", lab.member_id, None, owner="bob@lab.org")
    old = lab.bucket.read(channel_config_key("lab"))
    old = b"".join(old)
    admin.revoke(lab.owner, "lab", lab.member_id)
    assert not fresh(lab.member).config().is_member(lab.member_id)  # the member has seen version 3
    write_raw(lab, old)  # version 2, correctly signed, written back
    assert fresh(lab.member).config().version == 3  # a new Membership: what was seen is on disk
    with pytest.raises(ChannelConfigError, match="rollback"):
        read_published(lab.bucket, Pins(lab.member).get("lab"))


def test_two_configs_under_one_version_are_refused(lab):
    fresh(lab.member).config()
    cfg = Pins(lab.owner).get("lab").config
    twin = msgspec.structs.replace(cfg, transport="memory://other", signature=None).signed_by(lab.owner_keys)
    with pytest.raises(ChannelConfigError, match="second, different config under version 1"):
        twin.check_successor(pinned_owner=lab.owner_id, channel="lab", seen=cfg, where="x")


@pytest.mark.parametrize("damage", ["flip", "truncate", "not_json", "other_channel"])
def test_damaged_configs_are_refused(lab, damage):
    raw = b"".join(lab.bucket.read(channel_config_key("lab")))
    if damage == "flip":
        bad = raw.replace(b'"version": 1', b'"version": 7')
    elif damage == "truncate":
        bad = raw[: len(raw) // 2]
    elif damage == "not_json":
        bad = b"\x00\xff garbage"
    else:
        bad = json.dumps({**json.loads(raw), "channel": "other"}).encode()
    write_raw(lab, bad)
    membership = fresh(lab.member)
    assert membership.refresh() is None  # nothing accepted yet, nothing taken from the damage
    with pytest.raises(UserError, match="no config this node can accept"):
        membership.config()


def test_refresh_follows_the_owner_within_the_refresh_interval(lab):
    membership = fresh(lab.member)
    with config.set(channel_refresh_seconds=3600):
        assert not membership.config().is_member(lab.member_id)
        admin.grant(lab.owner, "lab", lab.member_id, None, owner="bob@lab.org")
        assert not membership.config().is_member(lab.member_id)  # not re-read within the hour
    with config.set(channel_refresh_seconds=0):
        assert membership.config().is_member(lab.member_id)


# --- join strings and pins ----------------------------------------------------------------------

def test_join_strings_round_trip_and_damage_is_one_line(lab):
    text = lab.join.encode()
    assert JoinString.parse(text) == lab.join and "\n" not in text
    for bad, why in [(text[:-3], "damaged"), (text[:40], "damaged"), ("hello", "not a join string"),
                     (text.replace(text[20], "A" if text[20] != "A" else "B", 1), "damaged")]:
        with pytest.raises(UserError, match=why) as info:
            JoinString.parse(bad)
        assert "\n" not in str(info.value)


def test_a_join_string_with_another_owner_for_a_joined_name_is_refused(lab):
    other = JoinString("lab", KeyPair.generate().public_hex, lab.join.bucket, lab.join.transport)
    with pytest.raises(UserError, match="already joined"):
        Pins(lab.member).pin(other)
    assert Pins(lab.member).get("lab").join.owner_key == lab.owner_id


def test_unknown_channel_is_one_line(lab):
    with pytest.raises(UserError, match="has not joined a channel named 'nope'.*joined: lab"):
        Membership(lab.member, "nope")


# --- envelopes and the gate ---------------------------------------------------------------------

@pytest.fixture
def gate_lab(lab):
    admin.grant(lab.owner, "lab", lab.member_id, None, owner="bob@lab.org")
    membership = fresh(lab.owner)
    with config.set(channel_refresh_seconds=0):
        yield lab, Gate("lab", membership.config, window_s=60)


def test_a_good_message_is_admitted_once(gate_lab):
    lab, gate = gate_lab
    msg = seal(lab.member_keys, "request_file", "lab", {"uri": "sha256://" + "a" * 64}).to_bytes()
    env = gate.admit(msg)
    assert env is not None and env.body["uri"].endswith("a" * 64)
    assert gate.admit(msg) is None and gate.dropped["replay"] == 1


def test_forged_tampered_stale_and_misdirected_messages_are_dropped(gate_lab):
    lab, gate = gate_lab
    now = int(time.time() * 1000)
    good = seal(lab.member_keys, "request_file", "lab", {"uri": "x"})
    cases = {
        "bad_signature": msgspec.structs.replace(good, body={"uri": "y"}).to_bytes(),  # tampered body
        "wrong_channel": seal(lab.member_keys, "request_file", "other", {}).to_bytes(),
        "clock": seal(lab.member_keys, "request_file", "lab", {}, now_ms=now - 120_000).to_bytes(),
        "malformed": b'{"type": "request_file"}',
        "not_member": seal(KeyPair.generate(), "request_file", "lab", {}).to_bytes(),
        "not_permitted": seal(lab.member_keys, "upload_status", "lab", {}).to_bytes(),
    }
    # a message claiming to be from the member, signed by someone else
    impostor = KeyPair.generate()
    forged = seal(impostor, "request_file", "lab", {})
    cases["forged"] = msgspec.structs.replace(forged, from_node=lab.member_id).to_bytes()
    for kind, data in cases.items():
        assert gate.admit(data) is None, kind
    assert gate.dropped == {"bad_signature": 2, "wrong_channel": 1, "clock": 1, "malformed": 1,
                            "not_member": 1, "not_permitted": 1}
    assert gate.admit(good.to_bytes()) is not None  # the real message still passes


def test_a_forged_copy_does_not_burn_the_real_senders_nonce(gate_lab):
    lab, gate = gate_lab
    good = seal(lab.member_keys, "request_file", "lab", {"uri": "x"})
    forged = msgspec.structs.replace(good, body={"uri": "evil"})
    assert gate.admit(forged.to_bytes()) is None
    assert gate.admit(good.to_bytes()) is not None


def test_a_revoked_member_is_refused_after_the_refresh(gate_lab):
    lab, gate = gate_lab
    assert gate.admit(seal(lab.member_keys, "request_file", "lab", {}).to_bytes()) is not None
    admin.revoke(lab.owner, "lab", lab.member_id)
    assert gate.admit(seal(lab.member_keys, "request_file", "lab", {}).to_bytes()) is None
    assert gate.dropped["not_member"] == 1


def test_clock_skew_is_named_and_a_wrong_own_clock_is_recognised(lab, caplog):
    others = [KeyPair.generate() for _ in range(2)]
    for keys in others:
        admin.grant(lab.owner, "lab", keys.public_hex, None, owner="o@lab.org")
    membership = fresh(lab.owner)
    gate = Gate("lab", membership.config, window_s=30, clock=lambda: time.time() - 42)  # this clock is 42 s slow
    with caplog.at_level(logging.WARNING):
        assert gate.admit(seal(others[0], "request_file", "lab", {}).to_bytes()) is None
        assert "42" in caplog.text and "ahead of this node's clock" in caplog.text
        assert gate.admit(seal(others[1], "request_file", "lab", {}).to_bytes()) is None
    assert "this node's clock seems about 42 s behind" in caplog.text


def test_nonce_memory_is_bounded_by_the_window(gate_lab):
    lab, _ = gate_lab
    now = [1_000_000.0]
    gate = Gate("lab", fresh(lab.owner).config, window_s=10, clock=lambda: now[0])
    for _ in range(50):
        now[0] += 1
        assert gate.admit(seal(lab.member_keys, "heartbeat", "lab", {}, now_ms=int(now[0] * 1000)).to_bytes())
    assert len(gate._nonces) <= 31  # 2 windows of one message a second, plus the batch not yet pruned


def test_envelopes_reject_unknown_types_fields_and_oversize(lab):
    with pytest.raises(ValueError, match="unknown message type"):
        seal(lab.member_keys, "shutdown", "lab", {})
    with pytest.raises(MessageTooLarge):
        seal(lab.member_keys, "request_file", "lab", {"blob": "x" * 70_000})
    data = json.loads(seal(lab.member_keys, "heartbeat", "lab", {}).to_bytes())
    data["extra"] = 1
    with pytest.raises(BadEnvelope):
        Envelope.from_bytes(json.dumps(data).encode())


# --- the command line ---------------------------------------------------------------------------

def test_two_commands_onboard_a_node(tmp_path, env):
    def kachery(home: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "--home", str(home), *args], env=env,
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "b").mkdir()
    owner, node = tmp_path / "o", tmp_path / "n"
    assert kachery(owner, "node", "init", "--owner", "alice@lab.org").returncode == 0
    assert kachery(node, "node", "init", "--owner", "bob@lab.org", "--label", "cluster 7").returncode == 0
    created = kachery(owner, "channel", "create", "lab", "--bucket", f"file://{tmp_path / 'b'}",
                      "--transport", "redis://127.0.0.1:6379/0")
    assert created.returncode == 0, created.stderr
    joined = kachery(node, "channel", "join", created.stdout.strip().splitlines()[-1])
    assert joined.returncode == 0, joined.stderr
    command = joined.stdout.strip().splitlines()[-1]
    assert command.startswith("kachery channel grant lab ") and "--owner bob@lab.org" in command
    granted = kachery(owner, *shlex.split(command)[1:])
    assert granted.returncode == 0, granted.stderr
    shown = json.loads(kachery(node, "channel", "show", "lab", "--json").stdout)
    node_id = shlex.split(command)[4]
    assert shown["members"][node_id]["label"] == "cluster 7"
    assert shown["permissions"][node_id] == ["request_feeds", "request_files", "request_tasks"]
    listed = json.loads(kachery(node, "channel", "ls", "--json").stdout)
    assert listed[0]["channel"] == "lab" and listed[0]["owned"] is False
    for args, why in [(("channel", "join", "kachery-join-1.xyz.00"), "damaged"),
                      (("channel", "show", "nope"), "has not joined"),
                      (("channel", "grant", "lab", node_id), "not this node"),
                      (("channel", "create", "Bad Name", "--bucket", "file:///tmp", "--transport", "x"), "not allowed")]:
        out = kachery(node, *args)
        assert out.returncode == 1 and "Traceback" not in out.stderr and why in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_leave_forgets_the_channel(lab):
    admin.leave(lab.member, "lab")
    assert Pins(lab.member).names() == []
