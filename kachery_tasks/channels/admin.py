"""What a channel's owner does: create it, admit and revoke nodes, manage groups.

Every change is one compare-and-swap on ``channels/<name>/config.json``: read the config (checked as
any member checks it), apply the change, bump the version, sign, and write on the generation that
was read. Two owners' processes editing at once (two terminals, a script and the hub) cannot lose
each other's changes: the slower write fails its precondition, and it starts again from the config
the faster one wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..buckets.base import AlreadyExists, PreconditionFailed
from ..buckets.layout import channel_config_key, check_layout
from ..buckets.uri import open_bucket
from ..errors import UserError
from ..identity import node_identity
from .config import (
    PERMISSIONS,
    REQUESTER_PERMISSIONS,
    ChannelConfig,
    Member,
    check_name,
    check_node_id,
    merge_permissions,
    new_config,
)
from .membership import read_published
from .pins import JoinString, Pins

_ATTEMPTS = 20


def create_channel(home: Path, name: str, *, bucket: str, transport: str) -> tuple[ChannelConfig, JoinString]:
    """Write version 1 of channel ``name`` (this node owns it, with every permission) and pin it."""
    check_name(name, "channel name")
    identity = node_identity(home)
    if not identity.owner:
        raise UserError("this node has no owner e-mail, which a channel lists for every member; "
                        "set it with `kachery node init --owner EMAIL`")
    _check_transport_uri(transport)
    store = open_bucket(bucket)
    check_layout(store, write=True)
    config = new_config(name, identity.node_id, owner_email=identity.owner, owner_label=identity.label or "",
                        bucket=bucket, transport=transport).signed_by(identity.keys)
    join = JoinString(name, identity.node_id, bucket, transport)
    pins = Pins(home)
    if name in pins.names() and pins.get(name).join.owner_key != identity.node_id:
        raise UserError(f"this node already joined another channel named {name!r}; "
                        f"leave it first (`kachery channel leave {name}`) or choose another name")
    try:
        store.write(channel_config_key(name), config.to_bytes())
    except AlreadyExists:
        raise UserError(f"{bucket} already holds a channel named {name!r}; choose another name "
                        f"(or, if it is yours, `kachery channel join` its join string)") from None
    pins.pin(join)
    pins.remember(name, config)
    return config, join


def update_channel(home: Path, name: str, change: Callable[[ChannelConfig], ChannelConfig]) -> ChannelConfig:
    """Apply ``change`` to the channel's current config as one new signed version (owner only)."""
    identity = node_identity(home)
    pins = Pins(home)
    pin = pins.get(name)
    if pin.join.owner_key != identity.node_id:
        raise UserError(f"channel {name!r} is owned by node {pin.join.owner_key[:12]}…, not this node "
                        f"({identity.node_id[:12]}…); ask its owner to make the change")
    store = open_bucket(pin.join.bucket)
    key = channel_config_key(name)
    for _ in range(_ATTEMPTS):
        found = read_published(store, pin)
        if found is None:
            raise UserError(f"{pin.join.bucket} has no config for channel {name!r} (was it deleted?); "
                            "nothing changed")
        current, generation = found
        updated = change(current)
        if updated is current:
            return current  # nothing to change: no new version
        signed = updated.signed_by(identity.keys)
        try:
            store.write_if_generation(key, signed.to_bytes(), generation)
        except PreconditionFailed:
            pin = pins.remember(name, current)  # another process changed it first: start from its version
            continue
        pins.remember(name, signed)
        return signed
    raise UserError(f"channel {name!r}: the config kept changing under this update ({_ATTEMPTS} tries); try again")


def grant(home: Path, name: str, target: str, permissions: Iterable[str] | None, *, owner: str | None = None,
          label: str | None = None) -> ChannelConfig:
    """Admit node ``target`` (or give ``@group``) ``permissions``; a new node needs its owner's e-mail."""
    if target.startswith("@"):
        group = check_name(target[1:], "group name")
        perms = tuple(permissions or ())

        def change(config: ChannelConfig) -> ChannelConfig:
            merged = merge_permissions(config.groups.get(group, ()), perms)
            if group in config.groups and merged == config.groups[group]:
                return config
            return config.edited(groups={**config.groups, group: merged})
        return update_channel(home, name, change)

    node_id = check_node_id(target)

    def change(config: ChannelConfig) -> ChannelConfig:
        member = config.members.get(node_id)
        if member is None:
            if not owner:
                raise UserError(f"node {node_id[:12]}… is not a member of {name!r} yet: give its owner's e-mail "
                                "with --owner (as `kachery channel join` printed it)")
            member = Member(owner=owner, label=label or "")
            perms = tuple(permissions) if permissions is not None else REQUESTER_PERMISSIONS
        else:
            perms = tuple(permissions or ())
        updated = Member(owner=owner or member.owner, label=label if label is not None else member.label,
                         groups=member.groups, permissions=merge_permissions(member.permissions, perms))
        if updated == config.members.get(node_id):
            return config
        return config.with_member(node_id, updated)
    return update_channel(home, name, change)


def revoke(home: Path, name: str, target: str, permissions: Iterable[str] | None = None) -> ChannelConfig:
    """Take ``permissions`` from a node or ``@group``; with none given, remove the node (or the group)."""
    if target.startswith("@"):
        group = check_name(target[1:], "group name")

        def change(config: ChannelConfig) -> ChannelConfig:
            if group not in config.groups:
                raise UserError(f"channel {name!r} has no group {group!r}")
            if permissions is None:
                members = {n: _leave_group(m, group) for n, m in config.members.items()}
                return config.edited(groups={g: p for g, p in config.groups.items() if g != group},
                                     members=members)
            return config.edited(groups={**config.groups,
                                         group: merge_permissions(config.groups[group], remove=permissions)})
        return update_channel(home, name, change)

    node_id = check_node_id(target)

    def change(config: ChannelConfig) -> ChannelConfig:
        member = config.members.get(node_id)
        if member is None:
            raise UserError(f"node {node_id[:12]}… is not a member of channel {name!r}")
        if node_id == config.owner_key:
            raise UserError("the owner cannot be revoked from its own channel")
        if permissions is None:
            return config.without_member(node_id)
        kept = merge_permissions(member.permissions, remove=permissions)
        return config.with_member(node_id, Member(owner=member.owner, label=member.label, groups=member.groups,
                                                  permissions=kept))
    return update_channel(home, name, change)


def change_permissions(home: Path, name: str, node_id: str, *, add: Iterable[str] = (),
                       remove: Iterable[str] = ()) -> ChannelConfig:
    """Give member ``node_id`` the permissions ``add`` and take ``remove``, as one new version.

    A form that shows a member's permissions sends what was ticked and what was shown; the
    difference is applied to the config in force when it is written, so a change another owner
    made meanwhile (to other permissions, or other members) is kept, never overwritten."""
    check_node_id(node_id)
    add, remove = tuple(add), tuple(remove)

    def change(config: ChannelConfig) -> ChannelConfig:
        member = config.members.get(node_id)
        if member is None:
            raise UserError(f"node {node_id[:12]}… is not a member of channel {name!r}")
        if node_id == config.owner_key and remove:
            raise UserError("the channel's own key keeps every permission")
        kept = merge_permissions(member.permissions, add, remove)
        if kept == member.permissions:
            return config
        return config.with_member(node_id, Member(owner=member.owner, label=member.label, groups=member.groups,
                                                  permissions=kept))
    return update_channel(home, name, change)


def set_group(home: Path, name: str, group: str, node_id: str, *, member_of: bool) -> ChannelConfig:
    """Put member ``node_id`` into ``group`` (created with no permissions if new), or take it out."""
    check_name(group, "group name")
    check_node_id(node_id)

    def change(config: ChannelConfig) -> ChannelConfig:
        member = config.members.get(node_id)
        if member is None:
            raise UserError(f"node {node_id[:12]}… is not a member of channel {name!r}; admit it first "
                            f"with `kachery channel grant {name} {node_id} --owner EMAIL`")
        groups = set(member.groups) | {group} if member_of else set(member.groups) - {group}
        if groups == set(member.groups):
            return config
        updated = Member(owner=member.owner, label=member.label, groups=tuple(sorted(groups)),
                         permissions=member.permissions)
        groups_defined = config.groups if group in config.groups or not member_of else {**config.groups, group: ()}
        return config.edited(members={**config.members, node_id: updated}, groups=groups_defined)
    return update_channel(home, name, change)


def leave(home: Path, name: str) -> None:
    """Forget channel ``name`` on this node (its pin and accepted config); the channel is unchanged."""
    Pins(home).remove(name)


def _leave_group(member: Member, group: str) -> Member:
    if group not in member.groups:
        return member
    return Member(owner=member.owner, label=member.label, groups=tuple(g for g in member.groups if g != group),
                  permissions=member.permissions)


def _check_transport_uri(uri: str) -> None:
    if not isinstance(uri, str) or "://" not in uri:
        raise UserError(f"{uri!r} is not a transport URI; use redis://host:port/db (or memory://NAME in one process)")


__all__ = ["PERMISSIONS", "create_channel", "grant", "leave", "revoke", "set_group", "update_channel"]
