"""``kachery publish`` and ``kachery bucket ls | rm``: this node's files and results in its bucket.

"What this node published" is one rule for both kinds: an object under this node's id, a record
``records/<task id>/<node id>.json`` or a file's marker ``files/…/<sha256>/<node id>.json``
(buckets/layout.py). ``ls`` lists them; ``rm`` removes only them.
"""

from __future__ import annotations

import click

from .. import config
from ..buckets import NotFound
from ..buckets.fetch import configured_bucket
from ..buckets.layout import RECORDS_PREFIX, record_key
from ..buckets.published import published_files, remove_file
from ..errors import human_bytes
from ..identity import node_identity
from ..store.local import current_store
from ..store.task_record import TaskRecord
from ..store.uris import parse_file_uri
from ..tasks.publish import plan_publish, send
from ..tasks.replay import find_record
from .output import byte_progress, print_json, print_listing


@click.command("publish")
@click.argument("targets", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print what was sent as JSON.")
def publish_cmd(targets: tuple[str, ...], as_json: bool) -> None:
    """Publish files (sha256:// URIs) and task results (task ids) to the configured bucket.

    A result goes with its blobs and the records of the jobs it consumed; what the bucket already
    has is not sent again. On a terminal, a progress bar counts objects and bytes."""
    store = current_store()
    bucket = configured_bucket(write=True)
    plan = plan_publish(store, *targets)
    with byte_progress(plan.bytes, "publishing", objects=plan.objects) as bar:
        out = send(plan, store, bucket, bar, None if bar is None else bar.objects)
    if as_json:
        print_json({"bucket": out.bucket, "blobs": out.blobs, "records": out.records, "bytes_sent": out.bytes_sent})
        return
    click.echo(out.summary())


@click.group("bucket")
def bucket() -> None:
    """This node's results and files in its bucket (config key `bucket`)."""


@bucket.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_cmd(as_json: bool) -> None:
    """The task records and files this node published to the bucket, with their sizes."""
    target = configured_bucket(write=False)
    me = node_identity(config.home()).node_id
    rows = []
    for info in target.list(RECORDS_PREFIX):
        if not info.key.endswith(f"/{me}.json"):
            continue
        try:
            record = TaskRecord.from_bytes(b"".join(target.read(info.key)))
        except (NotFound, ValueError):
            continue
        size = record.result.size if record.result is not None else 0
        rows.append({"kind": "record", "id": record.task_id, "function": record.function.name, "bytes": size})
    for sha256, size in published_files(target, me):
        rows.append({"kind": "file", "id": f"sha256://{sha256}", "function": None, "bytes": size})
    if not as_json:
        rows = [{**row, "bytes": human_bytes(row["bytes"])} for row in rows]
    print_listing(rows, ["kind", "id", "function", "bytes"], as_json, title=f"published by this node to {target.uri}")


@bucket.command("rm")
@click.argument("targets", nargs=-1, required=True, metavar="URI|TASK_ID...")
@click.option("--force", is_flag=True,
              help="Remove a file even if task records in the bucket name it (they then miss, as incomplete).")
def rm_cmd(targets: tuple[str, ...], force: bool) -> None:
    """Remove files (sha256:// URIs) and task records (task ids) this node published from the bucket.

    A task id removes this node's record of it (other nodes' records stay). A file is removed only
    if no task record in the bucket, of any node, names it (unless --force); a chunked file goes
    with its manifest and the chunks no other file uses; bytes another node also published stay."""
    target = configured_bucket(write=True)
    me = node_identity(config.home()).node_id
    store = current_store()
    for text in targets:
        if text.startswith("sha256://"):
            sha256 = parse_file_uri(text).sha256
            removed = remove_file(target, sha256, me, force=force)
            if removed.kept_for:
                click.echo(f"removed this node's mark of sha256://{sha256}; its bytes stay: node(s) "
                           f"{', '.join(n[:12] for n in removed.kept_for)} published it too")
            else:
                shared = f", {removed.shared_chunks} chunk(s) kept for other files" if removed.shared_chunks else ""
                click.echo(f"removed sha256://{sha256} ({len(removed.deleted)} object(s){shared})")
            continue
        task_id = find_record(store, text).task_id if len(text) != 32 else text
        removed = target.delete(record_key(task_id, me))
        click.echo(f"{'removed' if removed else 'not in the bucket:'} {task_id}")
