"""``kachery publish`` and ``kachery bucket ls | rm``: this node's files and results in its bucket."""

from __future__ import annotations

import click

from .. import config
from ..buckets import NotFound
from ..buckets.fetch import configured_bucket
from ..buckets.layout import record_key
from ..identity import node_identity
from ..store.local import current_store
from ..store.task_record import TaskRecord
from ..tasks.publish import plan_publish, send
from ..tasks.replay import find_record
from .output import byte_progress, print_json, print_listing


@click.command("publish")
@click.argument("targets", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print what was sent as JSON.")
def publish_cmd(targets: tuple[str, ...], as_json: bool) -> None:
    """Publish files (sha256:// URIs) and task results (task ids) to the configured bucket.

    A result goes with its blobs and the records of the jobs it consumed; what the bucket already
    has is not sent again."""
    store = current_store()
    bucket = configured_bucket(write=True)
    plan = plan_publish(store, *targets)
    with byte_progress(plan.bytes, "publishing") as progress:
        out = send(plan, store, bucket, progress)
    if as_json:
        print_json({"bucket": out.bucket, "blobs": out.blobs, "records": out.records, "bytes_sent": out.bytes_sent})
        return
    click.echo(out.summary())


@click.group("bucket")
def bucket() -> None:
    """This node's results in its bucket (config key `bucket`)."""


@bucket.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_cmd(as_json: bool) -> None:
    """The task records this node published to the bucket, with their functions and result sizes."""
    target = configured_bucket(write=False)
    me = node_identity(config.home()).node_id
    rows = []
    for info in target.list("records/"):
        if not info.key.endswith(f"/{me}.json"):
            continue
        try:
            record = TaskRecord.from_bytes(b"".join(target.read(info.key)))
        except (NotFound, ValueError):
            continue
        size = record.result.size if record.result is not None else 0
        rows.append({"task_id": record.task_id, "function": record.function.name, "result_bytes": size,
                     "record_bytes": info.size})
    print_listing(rows, ["task_id", "function", "result_bytes", "record_bytes"], as_json,
                  title=f"published by this node to {target.uri}")


@bucket.command("rm")
@click.argument("task_ids", nargs=-1, required=True)
def rm_cmd(task_ids: tuple[str, ...]) -> None:
    """Remove this node's records of TASK_IDS from the bucket (other nodes' records stay)."""
    target = configured_bucket(write=True)
    me = node_identity(config.home()).node_id
    store = current_store()
    for text in task_ids:
        task_id = find_record(store, text).task_id if len(text) != 32 else text
        removed = target.delete(record_key(task_id, me))
        click.echo(f"{'removed' if removed else 'not in the bucket:'} {task_id}")
