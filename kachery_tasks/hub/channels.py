"""The channels the hub administers: each has a key of its own, held by the hub, and every change is
a new config signed with it, written to the channel's bucket with compare-and-swap.

Each channel gets a home of its own under the hub's directory, ``channels/<id>/home``: its node
key is the channel's key (the ``owner_key`` nodes pin when they join), and the owner functions of
:mod:`kachery_tasks.channels.admin` do every change there, exactly as `kachery channel grant` does
on an owner's node. So two owners clicking at once, or the hub and a script, cannot lose each
other's changes (the slower write starts again from the faster one's version), and a node that
pinned the key adopts each version at its next refresh. The hub never sees a node's private key.

**Audit.** Every change is appended to a feed of the channel's home, signed with the channel's key
(``hub-audit``): who (the signed-in user's e-mail), what, the config version it made, when. The
feed is the same signed append-only log as any kachery feed, so the history cannot be edited
without breaking its chain.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..buckets.uri import open_bucket
from ..channels import admin
from ..channels.config import ChannelConfig, check_name
from ..channels.membership import read_published
from ..channels.pins import Pins
from ..errors import KacheryError, UserError
from ..feeds.registry import local_feed
from ..identity import init_node, node_identity
from .db import Channel, HubDB, User

AUDIT_FEED = "hub-audit"
#: A channel's config is read from its bucket at most this often per channel (pages list many).
CONFIG_TTL_S = 2.0


@dataclass(frozen=True)
class AuditEntry:
    user: str
    action: str
    detail: str
    version: int | None
    time: float


class HubChannels:
    """The channels of the hub whose directory is ``root``."""

    def __init__(self, root: Path, db: HubDB) -> None:
        self.root = Path(root)
        self.db = db
        self._configs: dict[str, tuple[float, ChannelConfig]] = {}
        self._lock = threading.Lock()

    def home(self, channel: Channel) -> Path:
        return self.root / "channels" / channel.id / "home"

    # -- reading -----------------------------------------------------------------------------------
    def config(self, channel: Channel, *, fresh: bool = False) -> ChannelConfig:
        """The channel's config in force (read from its bucket, checked against its key)."""
        now = time.monotonic()
        with self._lock:
            held = self._configs.get(channel.id)
        if held is not None and not fresh and now - held[0] < CONFIG_TTL_S:
            return held[1]
        pin = Pins(self.home(channel)).get(channel.name)
        found = read_published(open_bucket(channel.bucket), pin)
        if found is None:
            raise UserError(f"{channel.bucket} has no config for channel {channel.name!r} any more")
        with self._lock:
            self._configs[channel.id] = (now, found[0])
        return found[0]

    def join_string(self, channel: Channel) -> str:
        return Pins(self.home(channel)).get(channel.name).join.encode()

    def role(self, channel: Channel, user: User) -> str | None:
        """``owner``, ``member`` (a node of the channel is run by the user's e-mail) or None: the
        channel is not the user's business, and the hub says it does not exist."""
        if user.id in self.db.owner_ids(channel.id):
            return "owner"
        try:
            members = self.config(channel).members.values()
        except (KacheryError, OSError):  # its bucket unreadable now: only its owners see it
            return None
        return "member" if any(m.owner.lower() == user.email.lower() for m in members) else None

    def visible(self, user: User) -> list[tuple[Channel, str]]:
        """The channels ``user`` owns or belongs to, with the role."""
        found = []
        for channel in self.db.channels():
            role = self.role(channel, user)
            if role is not None:
                found.append((channel, role))
        return found

    # -- changing ----------------------------------------------------------------------------------
    def create(self, user: User, name: str, bucket: str, transport: str) -> Channel:
        """A new channel with a key of its own, version 1 written to ``bucket``; ``user`` owns it.
        A refusal (a bad name or URI, a bucket that cannot be written or already holds the name)
        leaves nothing: no key, no row, nothing in the bucket."""
        check_name(name, "channel name")
        channel = Channel(secrets.token_hex(8), name, bucket.strip(), transport.strip(), user.id, time.time())
        home = self.home(channel)
        try:
            init_node(home, owner=user.email, label=f"hub: {name}")
            admin.create_channel(home, name, bucket=channel.bucket, transport=channel.transport)
            self.db.add_channel(channel)
        except BaseException:
            shutil.rmtree(home.parent, ignore_errors=True)
            raise
        self._audit(channel, user, "create", f"channel {name} on {channel.bucket} via {channel.transport}", 1)
        return channel

    def admit(self, channel: Channel, user: User, node_id: str, owner: str, label: str,
              permissions: list[str] | None) -> ChannelConfig:
        cfg = self._change(channel, lambda home: admin.grant(home, channel.name, node_id, permissions, owner=owner,
                                                             label=label))
        perms = ", ".join(cfg.members[node_id].permissions)
        self._audit(channel, user, "admit", f"node {node_id} ({owner}, {label or 'no label'}): {perms}", cfg.version)
        return cfg

    def change_permissions(self, channel: Channel, user: User, node_id: str, add: set[str],
                           remove: set[str]) -> ChannelConfig:
        cfg = self._change(channel, lambda home: admin.change_permissions(home, channel.name, node_id, add=add,
                                                                          remove=remove))
        said = "; ".join(x for x in (f"+{', '.join(sorted(add))}" if add else "",
                                     f"-{', '.join(sorted(remove))}" if remove else "") if x)
        self._audit(channel, user, "permissions", f"node {node_id}: {said}", cfg.version)
        return cfg

    def revoke(self, channel: Channel, user: User, node_id: str) -> ChannelConfig:
        cfg = self._change(channel, lambda home: admin.revoke(home, channel.name, node_id))
        self._audit(channel, user, "revoke", f"node {node_id}", cfg.version)
        return cfg

    def set_group_permissions(self, channel: Channel, user: User, group: str, add: set[str],
                              remove: set[str]) -> ChannelConfig:
        def change(home: Path) -> ChannelConfig:
            cfg = admin.grant(home, channel.name, f"@{group}", sorted(add))
            return admin.revoke(home, channel.name, f"@{group}", sorted(remove)) if remove else cfg
        cfg = self._change(channel, change)
        self._audit(channel, user, "group", f"@{group}: {', '.join(cfg.groups.get(group, ())) or 'no permissions'}",
                    cfg.version)
        return cfg

    def set_group(self, channel: Channel, user: User, group: str, node_id: str, member_of: bool) -> ChannelConfig:
        cfg = self._change(channel, lambda home: admin.set_group(home, channel.name, group, node_id,
                                                                 member_of=member_of))
        self._audit(channel, user, "group member", f"node {node_id} {'joins' if member_of else 'leaves'} @{group}",
                    cfg.version)
        return cfg

    def _change(self, channel: Channel, change: Any) -> ChannelConfig:
        cfg = change(self.home(channel))
        with self._lock:
            self._configs[channel.id] = (time.monotonic(), cfg)
        return cfg

    # -- audit -------------------------------------------------------------------------------------
    def _audit(self, channel: Channel, user: User, action: str, detail: str, version: int | None) -> None:
        with config.scoped(home=str(self.home(channel))):
            local_feed(AUDIT_FEED).subfeed("audit").append(
                {"user": user.email, "action": action, "detail": detail, "version": version})

    def audit_log(self, channel: Channel) -> list[AuditEntry]:
        """The channel's audit entries, newest first (their signatures and chain checked on read)."""
        with config.scoped(home=str(self.home(channel))):
            messages = local_feed(AUDIT_FEED).subfeed("audit").messages()
        entries = []
        for message in messages:
            body = message.get("body", {})
            entries.append(AuditEntry(str(body.get("user", "")), str(body.get("action", "")),
                                      str(body.get("detail", "")), body.get("version"), message["timestamp"] / 1000))
        return entries[::-1]

    def audit_feed_uri(self, channel: Channel) -> str:
        with config.scoped(home=str(self.home(channel))):
            return local_feed(AUDIT_FEED).uri

    def channel_key(self, channel: Channel) -> str:
        return node_identity(self.home(channel)).node_id
