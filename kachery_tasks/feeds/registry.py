"""Creating, finding and listing feeds in the home directory in force.

Every path is computed from :func:`kachery_tasks.config.home` at call time, so two homes can be
used side by side in one process.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import NotFoundError, UserError
from ..identity import KeyPair
from . import sources
from .feed import Feed
from .ids import PREFIX, is_feed_id, parse_feed_id
from .messages import now_ms
from .storage import feed_dir, feeds_root, flocked, key_path, read_json, write_json_atomic


def parse_feed_uri(uri: str) -> str:
    """The bare feed id of ``feed://<id>`` or ``<id>``; anything else raises :class:`InvalidURI`
    (kept under its old name: :func:`.ids.parse_feed_id` is the same function)."""
    return parse_feed_id(uri)


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


def load_feed(uri: str, create: bool = False, pull: bool = True) -> Feed:
    """The feed ``feed://<id>`` (or the bare ``<id>``): writable if this node holds its key,
    read-only otherwise.

    Only ids, never labels: a program names a feed exactly (:func:`resolve_feed` also takes a name
    or a label, for people). A feed not stored here is fetched from the configured buckets
    (``bucket``, then ``read_buckets``; see :mod:`.sources`), every message verified against the
    feed id before it is kept; one that no bucket has raises :class:`NotFoundError`, unless
    ``create`` (to ingest a feed that another node writes). A read-only feed stored here is brought
    up to date from the buckets on each call (``pull=False``: the local copy only, no bucket read).
    """
    feed_id = parse_feed_id(uri)
    d = feed_dir(feed_id)
    if not d.is_dir():
        if pull and sources.fetch(feed_id) is not None and d.is_dir():
            return _open(feed_id)
        if not create:
            raise NotFoundError(f"feed {PREFIX}{feed_id} is not stored in {feeds_root()} nor in a configured "
                                "bucket; list feeds with `kachery feed ls`, or publish it from its writer's node "
                                "with `kachery feed publish`")
        write_json_atomic(d / "feed.json", {"feed": feed_id, "label": None, "created": now_ms()})
        return _open(feed_id)
    feed = _open(feed_id)
    if pull and not feed.writable:
        sources.fetch(feed_id)
    return feed


def stored_feed(uri: str) -> Feed | None:
    """The feed if it is stored in this home, else None; never asks a bucket."""
    feed_id = parse_feed_id(uri)
    return _open(feed_id) if feed_dir(feed_id).is_dir() else None


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
    """A feed named by URI, bare id, local name (:func:`local_feed`) or label (``create_feed``).

    What the command line calls FEED. A label is not unique (two feeds can be created with the
    same one), so a name or label that matches more than one feed is refused with the ids it
    matches, rather than picking one.
    """
    if not isinstance(ref, str) or ref.startswith(PREFIX) or is_feed_id(ref):
        return load_feed(ref)
    matches = {fid for fid in [local_names().get(ref)] if fid is not None}
    matches |= {fid for fid, label in _labels().items() if label == ref}
    if not matches:
        raise NotFoundError(f"no feed named {ref!r}; give feed://<id>, an id, or a name or label from `kachery feed ls`")
    if len(matches) > 1:
        ids = ", ".join(PREFIX + fid for fid in sorted(matches))
        raise UserError(f"{ref!r} names {len(matches)} feeds: {ids}; give one of these ids")
    return load_feed(matches.pop())


def _feed_ids() -> list[str]:
    root = feeds_root()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and is_feed_id(d.name))


def _labels() -> dict[str, str | None]:
    """Feed id -> label, for every feed stored here."""
    return {fid: read_json(feed_dir(fid) / "feed.json", {}).get("label") for fid in _feed_ids()}


def list_feeds() -> list[dict[str, Any]]:
    """Every feed stored here: feed id, uri, label, local names, writable, subfeeds."""
    by_id: dict[str, list[str]] = {}
    for n, fid in local_names().items():
        by_id.setdefault(fid, []).append(n)
    out = []
    for feed_id in _feed_ids():
        feed = _open(feed_id)
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
