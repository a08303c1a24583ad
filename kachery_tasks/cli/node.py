"""``kachery node init | info | start | status``: this home's identity (Ed25519 key, owner, label) and store size.

``init --shared-group GROUP`` prepares a home that the Unix users of GROUP share: the group goes into
``<home>/config.yaml`` (so every later write makes setgid, group-writable directories, see
``kachery_tasks/fs.py``) and the directories that already exist are converted now.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from pathlib import Path

import click

from .. import config
from ..errors import UserError
from ..fs import group_id
from ..identity import init_node, node_identity
from ..identity.node import key_path
from ..identity.proofs import prove
from ..node.daemon import NodeDaemon, read_status
from ..node.executors import DaskExecution, run_here
from ..node.serving import import_served
from ..store import current_store
from .config_cmd import update_home_file
from .output import print_json, print_mapping, print_table


@click.group()
def node() -> None:
    """This node: its identity and its store."""


@node.command("init")
@click.option("--owner", required=True, metavar="EMAIL", help="E-mail address of the node's owner.")
@click.option("--label", default=None, metavar="NAME", help="A name for this node (channel members will see it once channels exist).")
@click.option("--shared-group", default=None, metavar="GROUP",
              help="Unix group that shares this home: directories become setgid and group-writable.")
def init_cmd(owner: str, label: str | None, shared_group: str | None) -> None:
    """Create the node key if missing and record owner and label."""
    home = config.home()
    gid = group_id(shared_group) if shared_group else None  # refuse an unknown group before any write
    identity = init_node(home, owner, label)
    if shared_group:
        update_home_file(home, {"shared_group": shared_group})
        share_tree(home, gid)
    click.echo(identity.node_id)


def share_tree(home: Path, gid: int) -> None:
    """Give the home's existing directories and files to ``gid``, as fs.make_dirs/share_fd would.

    Directories: setgid, group-writable. Files: group-readable, and group-writable where the owner
    may write (the mutables database, records). The node key stays 0600: it is never shared.
    """
    private = key_path(home)
    for root, dirs, files in os.walk(home):
        for name in dirs:
            _share(Path(root) / name, gid, directory=True)
        for name in files:
            path = Path(root) / name
            if path != private and not path.is_symlink():
                _share(path, gid, directory=False)
    _share(home, gid, directory=True)


def _share(path: Path, gid: int, directory: bool) -> None:
    try:
        os.chown(path, -1, gid)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if directory:
            os.chmod(path, mode | 0o2070)
        else:
            os.chmod(path, mode | 0o040 | (0o020 if mode & 0o200 else 0))
    except PermissionError as exc:
        raise UserError(f"cannot share {path} with group {gid}: {exc.strerror}; run as its owner") from None


@node.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info_cmd(as_json: bool) -> None:
    """Node id, owner, label, home and store size."""
    home = config.home()
    identity = node_identity(home)
    count, size = current_store().blobs.total_size()
    print_mapping(
        {
            "node_id": identity.node_id,
            "owner": identity.owner,
            "label": identity.label,
            "home": str(home),
            "blobs": count,
            "bytes": size,
        },
        as_json,
    )


@node.command("prove")
@click.argument("challenge")
def prove_cmd(challenge: str) -> None:
    """Sign CHALLENGE (shown on a hub's channel page) with this node's key; paste the line it prints there."""
    click.echo(prove(node_identity(config.home()), challenge))


@node.command("start")
@click.option("--channel", "channels", multiple=True, required=True, metavar="NAME",
              help="A joined channel to serve (repeat for several).")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests answered at once (file uploads, feeds, checks and claims of served tasks).")
@click.option("--grace", default=30.0, show_default=True, help="Seconds in-flight requests get to finish on SIGTERM.")
@click.option("--heartbeat", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds between heartbeats (and word to requesters on their tasks in flight).")
@click.option("--serve", "serve", multiple=True, metavar="MODULE:FUNCTION",
              help="A task to run for the channels' members (repeat for several; see docs/remote.md).")
@click.option("--concurrency", type=click.IntRange(1, 4096), default=None,
              help="Served tasks run at once; more wait in a queue [default: config serve_concurrency, "
                   "else the cluster's threads, else 4].")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Run served tasks on a distributed.LocalCluster of this many worker processes.")
@click.option("--dask-scheduler", "scheduler", metavar="ADDRESS", default=None,
              help="Run served tasks on the distributed cluster whose scheduler is at ADDRESS (tcp://host:8786).")
def start_cmd(channels: tuple[str, ...], threads: int, grace: float, heartbeat: float, serve: tuple[str, ...],
              concurrency: int | None, workers: int | None, scheduler: str | None) -> None:
    """Run this node as a provider: answer the channels' requests for files, feeds, results and tasks until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("kachery_tasks.channels.membership").setLevel(logging.WARNING)
    if workers is not None and scheduler is not None:
        raise UserError("give --workers (a LocalCluster started here) or --dask-scheduler (an existing cluster), not both")
    tasks = [import_served(spec) for spec in serve]
    execution = None
    if workers is not None or scheduler is not None:
        if not tasks:
            raise UserError("--workers and --dask-scheduler run served tasks: name them with --serve MODULE:FUNCTION")
        execution = DaskExecution.connect(scheduler) if scheduler else DaskExecution.local(workers or 1)
        logging.getLogger("kachery_tasks.node").info("served tasks run on %s", execution.describe())
    try:
        limit = concurrency or int(config.get("serve_concurrency")) or (execution.threads() if execution else None)
        daemon = NodeDaemon(config.home(), list(channels), threads=threads, grace_s=grace, heartbeat_s=heartbeat,
                            serve=tasks, concurrency=limit, execute=execution or run_here).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop())
        daemon.run_until_stopped()
    finally:
        if execution is not None:
            execution.close()


@node.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def status_cmd(as_json: bool) -> None:
    """The node daemon of this home: its channels, the peers seen, requests served and in flight."""
    status = read_status(config.home())
    if status is None:
        if as_json:
            print_json({"running": False, "state": "never started"})
            return
        click.echo(f"no node daemon has run on {config.home()}; start one with `kachery node start --channel NAME`")
        return
    if as_json:
        print_json(status)
        return
    click.echo(f"node {status['node_id']}  {status['state']}  pid {status['pid']}")
    for name, channel in status["channels"].items():
        served = ", ".join(f"{k} {v}" for k, v in sorted(channel["served"].items())) or "none"
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(channel["dropped"].items())) or "none"
        click.echo(f"channel {name}: config version {channel['config_version']}; served: {served}; dropped: {dropped}")
        rows = [{"node": n, "label": p["label"], "owner": p["owner"], "last heartbeat (s ago)": p["seconds_ago"]}
                for n, p in channel["peers"].items()]
        if rows:
            print_table(rows, ["node", "label", "owner", "last heartbeat (s ago)"], title=f"peers seen in {name}")
    if status["in_flight"]:
        print_table([{"state": "", **row} for row in status["in_flight"]],
                    ["channel", "type", "subject", "state", "from", "seconds"], title="in flight")
    tasks = status.get("tasks") or {}
    if tasks.get("serves"):
        click.echo(f"serves {len(tasks['serves'])} task(s): {tasks['running']} running, {tasks['queued']} queued, "
                   f"at most {tasks['concurrency']} at once")
