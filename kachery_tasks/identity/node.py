"""The node's own identity: its key pair plus owner and label, kept in the home.

``<home>/node/key.pem`` (mode 0600) holds the private key; ``<home>/node/node.json`` holds the owner
e-mail and label. The key is generated on first use, so a fresh home works with no setup step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fs import write_atomic
from .keys import KeyPair

_cache: dict[Path, NodeIdentity] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class NodeIdentity:
    keys: KeyPair
    owner: str | None
    label: str | None
    home: Path

    @property
    def node_id(self) -> str:
        return self.keys.public_hex


def key_path(home: Path) -> Path:
    return home / "node" / "key.pem"


def _info_path(home: Path) -> Path:
    return home / "node" / "node.json"


def _read_info(home: Path) -> dict:
    try:
        return json.loads(_info_path(home).read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise UserError(f"{_info_path(home)} is not valid JSON; fix it or run `kachery node init` again") from None


def node_identity(home: Path) -> NodeIdentity:
    """This home's identity, created on first use and cached per home."""
    home = Path(home)
    with _lock:
        found = _cache.get(home)
        if found is None:
            keys = KeyPair.load_or_create(key_path(home))
            info = _read_info(home)
            found = NodeIdentity(keys, info.get("owner"), info.get("label"), home)
            _cache[home] = found
        return found


def init_node(home: Path, owner: str | None, label: str | None) -> NodeIdentity:
    """Create the key if missing and record owner and label (``kachery node init``)."""
    if owner is not None and ("@" not in owner or " " in owner.strip()):
        raise UserError(f"--owner {owner!r} is not an e-mail address; give the address of the node's owner")
    home = Path(home)
    KeyPair.load_or_create(key_path(home))
    info = _read_info(home)
    if owner is not None:
        info["owner"] = owner
    if label is not None:
        info["label"] = label
    path = _info_path(home)
    write_atomic(path, (json.dumps(info, indent=2) + "\n").encode(), mode=0o644)
    with _lock:
        _cache.pop(home, None)
    return node_identity(home)
