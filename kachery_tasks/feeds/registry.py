"""Creating, finding and listing feeds in the home directory in force.

Every path is computed from :func:`kachery_tasks.config.home` at call time, so two homes can be
used side by side in one process.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidURI, NotFoundError, UserError
from ..identity import KeyPair
from .feed import Feed
from .messages import now_ms
from .storage import feed_dir, feeds_root, flocked, key_path, read_json, write_json_atomic

_HEX = frozenset("0123456789abcdef")


def parse_feed_uri(uri: str) -> str:
    """The feed id in ``feed://<64 lowercase hex>``; anything else raises :class:`InvalidURI`."""
    if not isinstance(uri, str) or not uri.startswith("feed://"):
        raise InvalidURI(f"{uri!r} is not a feed URI; expected feed://<64 lowercase hex characters>")
    feed_id = uri[len("feed://") :]
    if len(feed_id) != 64 or not set(feed_id) <= _HEX:
        raise InvalidURI(f"{uri!r} is not a feed URI; expected feed://<64 lowercase hex characters> and nothing else")
    return feed_id


def _open(feed_id: str) -> Feed:
    path = key_path(feed_id)
    keys = KeyPair.load(path) if path.exists() else None
    if keys is not None and keys.public_hex != feed_id:
        raise UserError(f"{path} holds the key of another feed; move it away")
    meta = read_json(feed_dir(feed_id) / "feed.json", {})
    return Feed(feed_id, feed_dir(feed_id), keys, meta.get("label"))


def create_feed(label: str | None = None) -> Feed:
    """A new feed with a fresh Ed25519 writer key, kept at ``<home>/keys/feeds/<id>.pem`` (0600)."""
    keys = KeyPair.generate()
    feed_id = keys.public_hex
    kdir = key_path(feed_id).parent
    kdir.mkdir(parents=True, exist_ok=True)
    os.chmod(kdir, 0o700)
    keys.save(key_path(feed_id))
    write_json_atomic(feed_dir(feed_id) / "feed.json", {"feed": feed_id, "label": label, "created": now_ms()})
    return _open(feed_id)


def load_feed(uri: str, create: bool = False) -> Feed:
    """The feed ``feed://<id>``: writable if this node holds its key, read-only otherwise.

    A feed not stored here raises :class:`NotFoundError`, unless ``create`` (to ingest a feed that
    another node writes).
    """
    feed_id = parse_feed_uri(uri)
    d = feed_dir(feed_id)
    if not d.is_dir():
        if not create:
            raise NotFoundError(f"feed {uri} is not stored in {feeds_root()}; list feeds with `kachery feed ls`")
        write_json_atomic(d / "feed.json", {"feed": feed_id, "label": None, "created": now_ms()})
    return _open(feed_id)


def local_feed(name: str) -> Feed:
    """The feed this node writes under ``name`` (e.g. the task engine's action log), created on
    first use. Safe when processes race: the name table is changed under a lock and written
    atomically, so both end up with the same feed."""
    if not isinstance(name, str) or not name:
        raise UserError("a local feed name is a non-empty string")
    names_path = feeds_root() / "names.json"
    feed_id = read_json(names_path, {}).get(name)
    if feed_id is None:
        with flocked(feeds_root() / ".names.lock"):
            names = read_json(names_path, {})
            feed_id = names.get(name)
            if feed_id is None:
                feed_id = create_feed(label=name).feed_id
                names[name] = feed_id
                write_json_atomic(names_path, names)
    feed = _open(feed_id)
    if not feed.writable:
        raise UserError(f"local feed {name!r} ({feed.uri}) has no key in this home; restore keys/feeds/{feed_id}.pem")
    return feed


def local_names() -> dict[str, str]:
    """Local feed names -> feed ids."""
    return dict(read_json(feeds_root() / "names.json", {}))


def resolve_feed(ref: str) -> Feed:
    """A feed named by URI, bare id or local name (for the command line)."""
    if ref.startswith("feed://"):
        return load_feed(ref)
    if len(ref) == 64 and set(ref) <= _HEX:
        return load_feed("feed://" + ref)
    feed_id = local_names().get(ref)
    if feed_id is None:
        raise NotFoundError(f"no feed named {ref!r}; give feed://<id> or a name from `kachery feed ls`")
    return load_feed("feed://" + feed_id)


def list_feeds() -> list[dict[str, Any]]:
    """Every feed stored here: feed id, uri, label, local names, writable, subfeeds."""
    root = feeds_root()
    if not root.is_dir():
        return []
    by_id: dict[str, list[str]] = {}
    for n, fid in local_names().items():
        by_id.setdefault(fid, []).append(n)
    out = []
    for d in sorted(root.iterdir()):
        if not (d.is_dir() and len(d.name) == 64 and set(d.name) <= _HEX):
            continue
        feed = _open(d.name)
        out.append({
            "feed": feed.feed_id,
            "uri": feed.uri,
            "label": feed.label,
            "names": sorted(by_id.get(feed.feed_id, [])),
            "writable": feed.writable,
            "subfeeds": feed.subfeeds(),
            "forked": bool(feed.forks()),
        })
    return out
