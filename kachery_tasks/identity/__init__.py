"""Ed25519 identities of nodes and feed writers, signing and verifying."""

from .documents import canonical_json, sign_document, verify_document
from .keys import KeyPair, is_public_key_hex, verify
from .node import NodeIdentity, init_node, key_path, node_identity

__all__ = [
    "KeyPair",
    "NodeIdentity",
    "canonical_json",
    "init_node",
    "is_public_key_hex",
    "key_path",
    "node_identity",
    "sign_document",
    "verify",
    "verify_document",
]
