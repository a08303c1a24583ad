"""Node identity: an Ed25519 key at <home>/node/key.pem (0600) whose public key in hex is the node id."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import kachery_tasks as kt
from kachery_tasks.identity import init_node, is_public_key_hex, node_identity, sign_document, verify_document


def test_key_file_mode_and_node_id(home: Path) -> None:
    identity = node_identity(home)
    key_file = home / "node" / "key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert identity.node_id == public.hex()
    assert is_public_key_hex(identity.node_id)


def test_identity_is_stable_across_processes(home: Path, run_python) -> None:
    here = node_identity(home).node_id
    out = run_python("from kachery_tasks import config; from kachery_tasks.identity import node_identity;"
                     "print(node_identity(config.home()).node_id)")
    assert out.stdout.strip() == here


def test_init_node_records_owner_and_label(home: Path) -> None:
    identity = init_node(home, "ada@example.org", "lab-1")
    assert (identity.owner, identity.label) == ("ada@example.org", "lab-1")
    again = init_node(home, None, None)  # keeps what was recorded
    assert (again.owner, again.label, again.node_id) == ("ada@example.org", "lab-1", identity.node_id)


@pytest.mark.parametrize("owner", ["not-an-email", "a b@example.org", ""])
def test_init_node_refuses_bad_email(home: Path, owner: str) -> None:
    with pytest.raises(kt.UserError, match="e-mail"):
        init_node(home, owner, None)
    assert not (home / "node" / "node.json").exists()


def test_signed_documents(home: Path) -> None:
    identity = node_identity(home)
    doc = sign_document(identity.keys, {"a": 1, "b": [1, 2]})
    assert verify_document(doc, identity.node_id)
    assert not verify_document({**doc, "a": 2}, identity.node_id)
