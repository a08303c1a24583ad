"""`kachery feed ...`: create, list, append to, show, follow, verify, publish and pull signed feeds.

Errors are raised as :class:`kachery_tasks.errors.KacheryError` subclasses; the main group prints
them as one line on stderr with exit code 1.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

import click
from rich.console import Console
from rich.table import Table

from ..buckets.feeds import publish_feed
from ..errors import UserError
from ..feeds import (
    Feed,
    create_feed,
    is_feed_id,
    list_feeds,
    load_feed,
    parse_feed_id,
    resolve_feed,
    stored_feed,
)
from ..feeds.errors import FeedTamperError
from ..feeds.ids import PREFIX

feed = click.Group("feed", help="Signed append-only feeds: create, append, show, tail, verify.\n\n"
                   "FEED is feed://<id>, the bare id, a local name, or a label only one feed has.")


def _console() -> Console:
    return Console(soft_wrap=True)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print_messages(messages: list[dict], as_json: bool) -> None:
    if as_json:
        for m in messages:
            click.echo(json.dumps(m, sort_keys=True, ensure_ascii=False))
        return
    table = Table("seq", "time (UTC)", "body")
    for m in messages:
        table.add_row(str(m["seq"]), _when(m["timestamp"]), json.dumps(m["body"], ensure_ascii=False))
    _console().print(table)


@feed.command("create")
@click.option("--label", default=None, help="A human label kept with the feed; names it as FEED while no other feed has it.")
def create_cmd(label: str | None) -> None:
    """Create a feed with a new writer key; prints its feed:// URI."""
    click.echo(create_feed(label=label).uri)


@feed.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls_cmd(as_json: bool) -> None:
    """List the feeds stored in this home."""
    rows = list_feeds()
    if as_json:
        click.echo(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    table = Table("feed", "label", "names", "writable", "subfeeds", "forked")
    for r in rows:
        table.add_row(r["uri"], r["label"] or "", ", ".join(r["names"]), "yes" if r["writable"] else "no",
                      str(len(r["subfeeds"])), "FORKED" if r["forked"] else "")
    _console().print(table)


@feed.command("append")
@click.argument("feed_ref", metavar="FEED")
@click.argument("subfeed")
@click.argument("body", metavar="JSON|-")
def append_cmd(feed_ref: str, subfeed: str, body: str) -> None:
    """Append one JSON body (or one per line from stdin with -) to SUBFEED of FEED."""
    texts = [line for line in sys.stdin.read().splitlines() if line.strip()] if body == "-" else [body]
    bodies = []
    for i, text in enumerate(texts):
        try:
            bodies.append(json.loads(text))
        except ValueError as exc:
            where = f"line {i + 1} of stdin" if body == "-" else "the message"
            raise UserError(f"{where} is not valid JSON ({exc}); quote it, e.g. '{{\"a\": 1}}'") from None
    if not bodies:
        raise UserError("nothing to append: stdin held no JSON lines")
    msgs = resolve_feed(feed_ref).subfeed(subfeed).append_many(bodies)
    click.echo(f"appended seq {msgs[0]['seq']}" + (f"..{msgs[-1]['seq']}" if len(msgs) > 1 else ""))


@feed.command("show")
@click.argument("feed_ref", metavar="FEED")
@click.argument("subfeed")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--end", type=click.IntRange(min=0), default=None)
@click.option("--json", "as_json", is_flag=True, help="One signed message per line, as JSON.")
def show_cmd(feed_ref: str, subfeed: str, start: int, end: int | None, as_json: bool) -> None:
    """Show messages START <= seq < END of SUBFEED."""
    sub = resolve_feed(feed_ref).subfeed(subfeed)
    _print_messages(sub.messages(start, end), as_json)


@feed.command("tail")
@click.argument("feed_ref", metavar="FEED")
@click.argument("subfeed")
@click.option("--start", type=click.IntRange(min=0), default=None, help="First seq to print (default: new ones only).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds without news.")
def tail_cmd(feed_ref: str, subfeed: str, start: int | None, timeout: float | None) -> None:
    """Print messages as they are appended (by any process), one JSON line each."""
    sub = resolve_feed(feed_ref).subfeed(subfeed)
    pos = len(sub) if start is None else start
    while True:
        msgs = sub.tail(pos, timeout)
        if not msgs:
            return
        _print_messages(msgs, True)
        sys.stdout.flush()
        pos = msgs[-1]["seq"] + 1


@feed.command("verify")
@click.argument("feed_ref", metavar="FEED")
def verify_cmd(feed_ref: str) -> None:
    """Verify every subfeed of FEED from disk; exits non-zero naming the first bad seq."""
    f = resolve_feed(feed_ref)
    f.check_not_forked()
    table = Table("subfeed", "messages", "checkpoints", "by checkpoint", "by signature")
    table.add_column("status", no_wrap=True)
    failure: FeedTamperError | None = None
    for name in f.subfeeds():
        try:
            r = f.subfeed(name).verify()
        except FeedTamperError as exc:
            failure = failure or exc
            table.add_row(name, "", "", "", "", f"TAMPERED at seq {exc.seq}")
            continue
        table.add_row(name, str(r["messages"]), str(r["checkpoints"]), str(r["by_checkpoint"]),
                      str(r["by_signature"]), "ok" + (f" (torn tail {r['torn_bytes']} B)" if r["torn_bytes"] else ""))
    Console(stderr=failure is not None, soft_wrap=True).print(table)
    if failure is not None:
        raise failure


@feed.command("resolve")
@click.argument("feed_ref", metavar="FEED")
@click.option("--subfeed", default=None, help="Only this subfeed (default: all).")
@click.option("--keep", type=click.Choice(["local", "remote"]), default="local", show_default=True)
def resolve_cmd(feed_ref: str, subfeed: str | None, keep: str) -> None:
    """Settle recorded fork evidence and unfreeze the feed."""
    cleared = resolve_feed(feed_ref).resolve_fork(subfeed, keep=keep)
    click.echo(f"resolved {len(cleared)} fork record(s), kept {keep} history")


@feed.command("publish")
@click.argument("feed_ref", metavar="FEED")
@click.option("--json", "as_json", is_flag=True, help="Print what was sent as JSON.")
def publish_cmd(feed_ref: str, as_json: bool) -> None:
    """Upload FEED's new messages and checkpoints to the configured bucket and move its head there
    (compare-and-swap); another node then reads it with load_feed(feed://<id>) or `kachery feed pull`."""
    out = publish_feed(resolve_feed(feed_ref))
    if as_json:
        click.echo(json.dumps({"bucket": out.bucket, "feed": out.feed, "subfeeds": out.subfeeds,
                               "segments_written": out.segments_written, "retries": out.retries,
                               "generation": out.generation, "changed": out.changed}, indent=1))
        return
    parts = ", ".join(f"{name}: {s['messages']} ({s['new']} new)" for name, s in sorted(out.subfeeds.items()))
    click.echo(f"published {out.feed} to {out.bucket}: {parts or 'no subfeeds'}"
               + ("" if out.changed else " (the bucket had all of it)"))


@feed.command("pull")
@click.argument("feed_ref", metavar="FEED")
def pull_cmd(feed_ref: str) -> None:
    """Fetch FEED from the configured buckets, or bring its new messages, every message verified
    against the feed id before it is kept (a feed not stored here is named by feed://<id> or id)."""
    feed_id = parse_feed_id(feed_ref) if feed_ref.startswith(PREFIX) or is_feed_id(feed_ref) else \
        resolve_feed(feed_ref).feed_id
    stored = stored_feed(feed_id)
    before = _count(stored) if stored is not None else 0
    if stored is None:
        f = load_feed(feed_id)  # fetches it, or says no bucket has it
    else:
        f = stored
        f.pull()
    click.echo(f"{f.uri}: {_count(f) - before} new message(s); subfeeds: {', '.join(f.subfeeds()) or 'none'}")


def _count(f: Feed) -> int:
    return sum(len(f.subfeed(name)) for name in f.subfeeds())
