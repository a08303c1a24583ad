"""``kachery channel create | join | grant | revoke | group | show | ls | services | leave``.

Onboarding a node is two commands: the node runs ``kachery channel join JOIN_STRING`` and prints the
one command its owner runs (``kachery channel grant …``). Both ends print what they did; the join
string is alone on the last line of ``create``'s output, so a script can take it with ``tail -n 1``.
"""

from __future__ import annotations

import shlex
from datetime import datetime, timezone

import click

from .. import config
from ..channels import admin
from ..channels.config import PERMISSIONS, ChannelConfig, parse_permissions
from ..channels.membership import Membership
from ..channels.pins import JoinString, Pins
from ..channels.session import session_for
from ..errors import UserError
from ..hub.join import is_token as is_hub_token
from ..hub.join import join_with_token
from ..identity import node_identity
from .hub import call_api
from .output import print_json, print_listing, print_table

_PERM_HELP = "Comma-separated permissions: " + ", ".join(PERMISSIONS) + "."


@click.group("channel")
def channel() -> None:
    """Channels: communities of nodes sharing a bucket and a message bus, with signed permissions."""


@channel.command("create")
@click.argument("name")
@click.option("--bucket", "bucket_uri", required=True, metavar="URI", help="The channel's bucket (file:///path or gs://…).")
@click.option("--transport", required=True, metavar="URI", help="The channel's message bus (redis://host:port/db).")
def create_cmd(name: str, bucket_uri: str, transport: str) -> None:
    """Create channel NAME owned by this node and print its join string (last line)."""
    home = config.home()
    cfg, join = admin.create_channel(home, name, bucket=bucket_uri, transport=transport)
    click.echo(f"created channel {name!r} (version {cfg.version}), owned by this node {cfg.owner_key}")
    click.echo("members join with `kachery channel join` and this join string (it grants nothing by itself):")
    click.echo(join.encode())


@channel.command("join")
@click.argument("join_string", metavar="JOIN_STRING|HUB_TOKEN")
def join_cmd(join_string: str) -> None:
    """Join a channel from the join string its owner gave you (prints the command the owner runs to
    admit you), or from a hub's one-time join token (admitted at once)."""
    home = config.home()
    if is_hub_token(join_string):
        join, perms = join_with_token(home, join_string)
        click.echo(f"joined channel {join.channel!r} through its hub, with permissions: {', '.join(perms)}")
        return
    join = JoinString.parse(join_string)
    Pins(home).pin(join)
    me = node_identity(home)
    membership = Membership(home, join.channel)
    cfg = membership.refresh()
    click.echo(f"joined channel {join.channel!r} (owner {join.owner_key[:16]}…, bucket {join.bucket})")
    click.echo(f"this node: {me.node_id}")
    if cfg is not None and cfg.is_member(me.node_id):
        perms = ", ".join(sorted(cfg.permissions_of(me.node_id))) or "none"
        click.echo(f"already a member, with permissions: {perms}")
        return
    if not me.owner:
        click.echo("set this node's owner first (`kachery node init --owner EMAIL`): the owner lists it for every member")
        owner = "EMAIL"
    else:
        owner = me.owner
    label = f" --label {shlex.quote(me.label)}" if me.label else ""
    click.echo("the channel's owner admits this node with:")
    click.echo(f"kachery channel grant {join.channel} {me.node_id} --owner {shlex.quote(owner)}{label}")


@channel.command("grant")
@click.argument("name")
@click.argument("target", metavar="NODE_ID|@GROUP")
@click.option("--perm", "perms", default=None, metavar="LIST",
              help=_PERM_HELP + " A new member without --perm gets request_files, request_feeds, request_tasks.")
@click.option("--owner", default=None, metavar="EMAIL", help="E-mail of the node's owner (needed to admit a new node).")
@click.option("--label", default=None, metavar="TEXT", help="A name for the node in listings.")
@click.option("--hub", "hub_url", default=None, metavar="URL",
              help="Make the change through the hub at URL, which holds the channel's key (`kachery hub login` first).")
def grant_cmd(name: str, target: str, perms: str | None, owner: str | None, label: str | None,
              hub_url: str | None) -> None:
    """Admit a node or give it (or a @group) permissions (owner only)."""
    parsed = parse_permissions(perms) if perms is not None else None
    if target.startswith("@") and parsed is None:
        raise click.UsageError("give the group's permissions with --perm")
    if hub_url:
        body = {"target": target, "permissions": list(parsed) if parsed is not None else None,
                "owner": owner or "", "label": label or ""}
        answer = call_api("POST", f"/api/channels/{_hub_channel(hub_url, name)}/grant", body, url=hub_url)
        click.echo(f"channel {name!r} is now at version {answer['version']} (through the hub {hub_url})")  # type: ignore[index]
        return
    cfg = admin.grant(config.home(), name, target, parsed, owner=owner, label=label)
    _say_change(cfg, target)


def _hub_channel(hub_url: str, name: str) -> str:
    """The id at the hub of the channel called ``name`` that the signed-in user owns."""
    owned = [c for c in call_api("GET", "/api/channels", url=hub_url)  # type: ignore[union-attr]
             if c["name"] == name and c["role"] == "owner"]
    if not owned:
        raise UserError(f"you own no channel called {name!r} at the hub {hub_url}")
    if len(owned) > 1:
        raise UserError(f"you own {len(owned)} channels called {name!r} at the hub {hub_url}; use its page")
    return str(owned[0]["id"])


@channel.command("revoke")
@click.argument("name")
@click.argument("target", metavar="NODE_ID|@GROUP")
@click.option("--perm", "perms", default=None, metavar="LIST", help=_PERM_HELP + " Without it the node (or group) is removed.")
@click.option("--hub", "hub_url", default=None, metavar="URL",
              help="Make the change through the hub at URL, which holds the channel's key (`kachery hub login` first).")
def revoke_cmd(name: str, target: str, perms: str | None, hub_url: str | None) -> None:
    """Take permissions from a node or @group, or remove it (owner only)."""
    parsed = parse_permissions(perms) if perms is not None else None
    if hub_url:
        body = {"target": target, "permissions": list(parsed) if parsed is not None else None}
        answer = call_api("POST", f"/api/channels/{_hub_channel(hub_url, name)}/revoke", body, url=hub_url)
        click.echo(f"channel {name!r} is now at version {answer['version']} (through the hub {hub_url})")  # type: ignore[index]
        return
    cfg = admin.revoke(config.home(), name, target, parsed)
    _say_change(cfg, target)


@channel.group("group")
def group() -> None:
    """Put members into groups and take them out (permissions go to groups with `grant NAME @GROUP`)."""


@group.command("add")
@click.argument("name")
@click.argument("group_name", metavar="GROUP")
@click.argument("node_id")
def group_add_cmd(name: str, group_name: str, node_id: str) -> None:
    """Put member NODE_ID into GROUP of channel NAME."""
    cfg = admin.set_group(config.home(), name, group_name, node_id, member_of=True)
    _say_change(cfg, node_id)


@group.command("rm")
@click.argument("name")
@click.argument("group_name", metavar="GROUP")
@click.argument("node_id")
def group_rm_cmd(name: str, group_name: str, node_id: str) -> None:
    """Take member NODE_ID out of GROUP of channel NAME."""
    cfg = admin.set_group(config.home(), name, group_name, node_id, member_of=False)
    _say_change(cfg, node_id)


@channel.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the config as JSON.")
def show_cmd(name: str, as_json: bool) -> None:
    """The channel's current config: owner, bucket, transport, version, members and groups."""
    cfg = Membership(config.home(), name).config()
    if as_json:
        print_json({**cfg.to_json(), "permissions": {n: sorted(cfg.permissions_of(n)) for n in cfg.members}})
        return
    issued = datetime.fromtimestamp(cfg.issued_at_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    click.echo(f"channel {cfg.channel}  version {cfg.version}  issued {issued}")
    click.echo(f"owner {cfg.owner_key}\nbucket {cfg.bucket}\ntransport {cfg.transport}")
    rows = [{"node": n, "owner": m.owner, "label": m.label, "groups": ",".join(m.groups),
             "permissions": ", ".join(sorted(cfg.permissions_of(n)))} for n, m in sorted(cfg.members.items())]
    print_table(rows, ["node", "owner", "label", "groups", "permissions"], title="members")
    if cfg.groups:
        print_table([{"group": g, "permissions": ",".join(p)} for g, p in sorted(cfg.groups.items())],
                    ["group", "permissions"], title="groups")


@channel.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_cmd(as_json: bool) -> None:
    """The channels this node joined, with the version of their config it holds and its own permissions."""
    home = config.home()
    pins = Pins(home)
    me = node_identity(home).node_id
    rows = []
    for name in pins.names():
        pin = pins.get(name)
        cfg = pin.config
        rows.append({"channel": name, "owner": pin.join.owner_key, "owned": pin.join.owner_key == me,
                     "version": cfg.version if cfg else None,
                     "permissions": ",".join(sorted(cfg.permissions_of(me))) if cfg else "",
                     "bucket": pin.join.bucket, "transport": pin.join.transport})
    print_listing(rows, ["channel", "owned", "version", "permissions", "bucket", "transport"], as_json,
                  title="channels joined")


@channel.command("services")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def services_cmd(name: str, as_json: bool) -> None:
    """Who serves what in channel NAME: the tasks each member online announces, with their code hashes."""
    session = session_for(config.home(), name)
    cfg = session.config()
    rows = []
    for node_id, info in sorted(session.present("provide_tasks").items()):
        serves = info.get("serves") if isinstance(info.get("serves"), dict) else {}
        member = cfg.members[node_id]
        for task_name, code_hash in sorted(serves.items()):
            rows.append({"task": task_name, "code_hash": code_hash, "node": node_id,
                         "label": member.label or member.owner})
    if not rows and not as_json:
        click.echo(f"no member online serves tasks in channel {name!r} "
                   f"(a provider runs `kachery node start --channel {name} --serve module:function`)")
        return
    print_listing(rows, ["task", "code_hash", "node", "label"], as_json, title=f"served in {name}")


@channel.command("leave")
@click.argument("name")
def leave_cmd(name: str) -> None:
    """Forget channel NAME on this node (the channel itself and its members are unchanged)."""
    admin.leave(config.home(), name)
    click.echo(f"left channel {name!r} on this node")


def _say_change(cfg: ChannelConfig, target: str) -> None:
    if target.startswith("@"):
        perms = ",".join(cfg.groups.get(target[1:], ())) if target[1:] in cfg.groups else "(removed)"
        click.echo(f"channel {cfg.channel} version {cfg.version}: group {target[1:]}: {perms or 'no permissions'}")
    elif cfg.is_member(target):
        perms = ",".join(sorted(cfg.permissions_of(target))) or "no permissions"
        groups = ",".join(cfg.members[target].groups)
        click.echo(f"channel {cfg.channel} version {cfg.version}: {target[:16]}… "
                   f"{perms}{' (groups ' + groups + ')' if groups else ''}")
    else:
        click.echo(f"channel {cfg.channel} version {cfg.version}: {target[:16]}… is no longer a member")
