"""Channel configs: who is in a channel and what each member may do, signed by the channel's owner.

A channel config is JSON (docs/channels.md, "Channel config") that every member reads from the
channel's bucket. Its signature is the owner's Ed25519 signature over the canonical JSON of the rest
(:mod:`kachery_tasks.identity.documents`), so the bucket and the transport need not be trusted: a
bucket writer who is not the owner can delete a config but not forge or alter one. Three rules keep
a node from being steered by an old or foreign config (:meth:`ChannelConfig.check_successor`):

- **Pinned owner.** A node pins the owner key when it joins (from the join string) and refuses a
  config signed by anyone else, or naming another owner or another channel.
- **No rollback.** ``version`` only grows. A node refuses a config older than one it has seen, so a
  revocation cannot be undone by writing an old config back into the bucket.
- **No equivocation.** Two different configs with the same version are refused: the owner writes
  each version once (by compare-and-swap on the bucket object), so a second one is a forgery or a
  bug, never an update.

Permissions are the original network's six, granted to a member directly or to a group the member
is in. A member's permissions are the union of both. Being a member (with no permission at all) lets
a node send heartbeats and be seen, nothing more.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ..errors import UserError
from ..identity import KeyPair, canonical_json, is_public_key_hex, verify_document

FORMAT = "kachery-channel/1"

PERMISSIONS: tuple[str, ...] = (
    "request_files", "provide_files", "request_feeds", "provide_feeds", "request_tasks", "provide_tasks",
)
#: What a node admitted with ``kachery channel grant`` and no ``--perm`` may do: ask, not provide.
REQUESTER_PERMISSIONS: tuple[str, ...] = ("request_files", "request_feeds", "request_tasks")

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_RULE = "1-63 characters: lowercase letters, digits, '.', '_', '-', starting with a letter or digit"

Permission = Literal[
    "request_files", "provide_files", "request_feeds", "provide_feeds", "request_tasks", "provide_tasks",
]
_NodeId = Annotated[str, Meta(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")]
_Name = Annotated[str, Meta(pattern=_NAME.pattern)]
_Signature = Annotated[str, Meta(min_length=128, max_length=128, pattern="^[0-9a-f]{128}$")]
_STRICT = {"frozen": True, "forbid_unknown_fields": True}


class ChannelConfigError(UserError):
    """A channel config that does not parse, is not signed by the pinned owner, or goes back in version."""


class Member(Struct, **_STRICT):
    """A node admitted to the channel, with the e-mail of the person who runs it."""

    owner: Annotated[str, Meta(min_length=3, pattern=r"^[^@\s]+@[^@\s]+$")]
    label: str = ""
    groups: tuple[_Name, ...] = ()
    permissions: tuple[Permission, ...] = ()


class ChannelConfig(Struct, **_STRICT):
    """One signed version of a channel's config; build changed copies with :meth:`edited`."""

    format: Literal["kachery-channel/1"]
    channel: _Name
    owner_key: _NodeId
    bucket: Annotated[str, Meta(min_length=1)]
    transport: Annotated[str, Meta(min_length=1)]
    version: Annotated[int, Meta(ge=1)]
    issued_at_ms: Annotated[int, Meta(ge=0)]
    members: dict[_NodeId, Member]
    groups: dict[_Name, tuple[Permission, ...]] = {}
    signature: _Signature | None = None

    # -- reading ---------------------------------------------------------------------------------

    def is_member(self, node_id: str) -> bool:
        return node_id in self.members

    def permissions_of(self, node_id: str) -> frozenset[str]:
        """The member's own permissions and those of its groups; empty for a non-member."""
        member = self.members.get(node_id)
        if member is None:
            return frozenset()
        granted = set(member.permissions)
        for group in member.groups:
            granted.update(self.groups.get(group, ()))
        return frozenset(granted)

    def allows(self, node_id: str, permission: str) -> bool:
        return permission in self.permissions_of(node_id)

    def members_with(self, permission: str) -> frozenset[str]:
        """Node ids of the members holding ``permission`` (directly or through a group)."""
        return frozenset(n for n in self.members if permission in self.permissions_of(n))

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def to_bytes(self) -> bytes:
        """The config as stored in the bucket: indented JSON (the signature is over the canonical form)."""
        return msgspec.json.format(msgspec.json.encode(self.to_json()), indent=2) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ChannelConfig:
        """Parse and check the fields of a stored config; :class:`ChannelConfigError` names ``where``."""
        try:
            config = msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise ChannelConfigError(f"{where} is not a channel config ({exc})") from None
        if config.signature is None:
            raise ChannelConfigError(f"{where}: the channel config is not signed")
        for node_id, member in config.members.items():
            for group in member.groups:
                if group not in config.groups:
                    raise ChannelConfigError(f"{where}: member {node_id[:12]}… is in group {group!r}, "
                                             "which the config does not define")
        return config

    # -- signing and checking --------------------------------------------------------------------

    def signed_by(self, keys: KeyPair) -> ChannelConfig:
        if keys.public_hex != self.owner_key:
            raise ChannelConfigError(f"channel {self.channel!r} is owned by {self.owner_key[:12]}…; "
                                     f"this node ({keys.public_hex[:12]}…) cannot sign its config")
        body = {k: v for k, v in self.to_json().items() if k != "signature"}
        return msgspec.structs.replace(self, signature=keys.sign(canonical_json(body)))

    def signature_ok(self) -> bool:
        return verify_document(self.to_json(), self.owner_key)

    def check_successor(self, *, pinned_owner: str, channel: str, seen: ChannelConfig | None,
                        where: str) -> None:
        """Refuse this config unless a node that pinned ``pinned_owner`` and saw ``seen`` may adopt it."""
        if self.channel != channel:
            raise ChannelConfigError(f"{where} is the config of channel {self.channel!r}, not {channel!r}")
        if self.owner_key != pinned_owner:
            raise ChannelConfigError(f"{where} names owner {self.owner_key[:12]}…, but this node pinned "
                                     f"{pinned_owner[:12]}… when it joined {channel!r}; refused")
        if not self.signature_ok():
            raise ChannelConfigError(f"{where}: the signature does not verify against the owner key; "
                                     "refused (the object was altered or forged)")
        if seen is None:
            return
        if self.version < seen.version:
            raise ChannelConfigError(f"{where} is version {self.version}, older than version {seen.version} "
                                     "this node has seen; refused (rollback)")
        if self.version == seen.version and self.signature != seen.signature:
            raise ChannelConfigError(f"{where}: a second, different config under version {self.version}; "
                                     "refused (the owner writes each version once)")

    # -- editing (the owner) ---------------------------------------------------------------------

    def edited(self, **changes: Any) -> ChannelConfig:
        """A copy with ``changes``, the next version, issued now, unsigned."""
        return msgspec.structs.replace(self, **changes, version=self.version + 1,
                                       issued_at_ms=_now_ms(), signature=None)

    def with_member(self, node_id: str, member: Member) -> ChannelConfig:
        return self.edited(members={**self.members, node_id: member})

    def without_member(self, node_id: str) -> ChannelConfig:
        return self.edited(members={k: v for k, v in self.members.items() if k != node_id})


def new_config(channel: str, owner_key: str, *, owner_email: str, owner_label: str, bucket: str,
               transport: str) -> ChannelConfig:
    """Version 1 of a channel: its owner is the only member, with every permission (unsigned)."""
    check_name(channel, "channel name")
    return ChannelConfig(
        format=FORMAT, channel=channel, owner_key=owner_key, bucket=bucket, transport=transport,
        version=1, issued_at_ms=_now_ms(),
        members={owner_key: Member(owner=owner_email, label=owner_label, permissions=PERMISSIONS)},
    )


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{what} {name!r} is not allowed; use {NAME_RULE}")
    return name


def check_node_id(node_id: str) -> str:
    if not is_public_key_hex(node_id):
        raise UserError(f"{node_id!r} is not a node id (64 lowercase hex characters, as `kachery node info` "
                        "or `kachery channel join` prints)")
    return node_id


def parse_permissions(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"request_files,provide_tasks"`` (or a list) as permissions in canonical order; refuses unknown ones."""
    words = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    unknown = [w for w in words if w not in PERMISSIONS]
    if unknown:
        raise UserError(f"unknown permission {unknown[0]!r}; permissions are {', '.join(PERMISSIONS)}")
    if not words:
        raise UserError(f"no permission given; choose from {', '.join(PERMISSIONS)}")
    return tuple(p for p in PERMISSIONS if p in words)


def merge_permissions(have: Iterable[str], add: Iterable[str] = (), remove: Iterable[str] = ()) -> tuple[str, ...]:
    kept = (set(have) | set(add)) - set(remove)
    return tuple(p for p in PERMISSIONS if p in kept)


def _now_ms() -> int:
    return int(time.time() * 1000)
