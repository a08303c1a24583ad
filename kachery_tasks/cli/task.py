"""``kachery task …``: list, show, explain, remove, rerun and recheck task records; settle actions.

Functions are imported by module name with the current directory on ``sys.path``, as ``python -m``
does, so run these commands from the directory your pipeline runs from. Functions of a script run as
``python pipeline.py`` (recorded as ``__main__.…``) are loaded from the script's recorded path, from
any directory (tasks/scripts.py). Tables show task ids by their first 12 hex characters
(``SHORT_ID``), which every command accepts; ``--json`` gives the full ids.
"""

from __future__ import annotations

import random
import shlex
import time
from typing import Any

import click

from ..config import home_str
from ..errors import UserError
from ..store.local import current_store
from ..store.task_record import ArgEntry, TaskRecord
from ..tasks.actions import action_log
from ..tasks.explain import explain
from ..tasks.names import function_matches
from ..tasks.replay import find_record, job_from_record
from ..tasks.stale import recheck, stale
from ..tasks.stale import rerun as rerun_calls  # `kachery task stale --rerun` names its flag rerun
from .output import print_json, print_listing, print_mapping

#: Hex characters of a task id shown in tables: 32 would wrap a row over three lines in 80 columns.
SHORT_ID = 12


def _short_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "task_id": r["task_id"][:SHORT_ID]} for r in rows]


@click.group("task", help="Task records: list, show, explain, stale, rerun, recheck; actions.")
def task() -> None:
    pass


def _summary(record: TaskRecord, failed: bool = False) -> dict[str, Any]:
    row = {
        "task_id": record.task_id,
        "function": record.function.name,
        "kind": record.kind,
        "status": record.status,
        "wall_s": record.provenance["wall_s"],  # as recorded (the table and --json print it as it is)
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)),
        "namespace": record.namespace,
    }
    if failed and record.error is not None:
        row["error"] = f"{record.error.type.rsplit('.', 1)[-1]}: {record.error.message}"[:120]
    return row


@task.command("ls")
@click.option("--function", "pattern", default=None,
              help="Only functions named this (a glob; with a dot, against module.qualname).")
@click.option("--failed", is_flag=True, help="Only tasks whose latest outcome is a failure.")
@click.option("--running", is_flag=True, help="Only tasks being computed right now (for 0.5 s or more), with who computes them.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", type=int, default=None, help="At most this many rows (most costly first).")
def ls_cmd(pattern: str | None, failed: bool, running: bool, as_json: bool, limit: int | None) -> None:
    """List task records, most costly first."""
    store = current_store()
    if running:
        rows = store.records.running()
        for r in rows:
            r["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("started", 0)))
        print_listing(rows if as_json else _short_ids(rows), ["task_id", "host", "pid", "started"], as_json,
                      title="running tasks")
        return
    rows = [_summary(r, failed) for r in store.records.iter_records(failures=failed)
            if not pattern or function_matches(r.function.name, pattern)]
    if not rows and not failed and _say_failures(store, pattern, as_json) and not as_json:
        return
    rows.sort(key=lambda r: -(r["wall_s"] or 0.0))
    if limit is not None:
        rows = rows[:limit]
    columns = ["task_id", "function", "kind", "status", "wall_s", "created"] + (["error"] if failed else [])
    print_listing(rows if as_json else _short_ids(rows), columns, as_json,
                  title="failed tasks" if failed else "task records")


def _say_failures(store: Any, pattern: str | None, as_json: bool) -> bool:
    """With no successful task to list, say how many failed (on stderr under ``--json``), rather
    than leave an empty table that reads as "nothing ran"; returns whether there were any."""
    failures = sum(1 for r in store.records.iter_records(failures=True)
                   if not pattern or function_matches(r.function.name, pattern))
    if failures:
        more = f" --function {shlex.quote(pattern)}" if pattern else ""
        click.echo(f"no successful tasks; {failures} failed (kachery task ls --failed{more})", err=as_json)
    return failures > 0


def _record(task_id: str) -> TaskRecord:
    return find_record(current_store(), task_id)


@task.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
def show_cmd(task_id: str, as_json: bool) -> None:
    """Show a record: function, arguments, result, provenance."""
    record = _record(task_id)
    if as_json:
        print_json(record.to_json())
        return
    function = record.function
    provenance = record.provenance
    shown = {
        "task_id": record.task_id,
        "kind": record.kind,
        "status": record.status,
        "function": f"{function.name} (code {function.code_hash})",
        "namespace": record.namespace,
        "arguments": ", ".join(f"{k}={_arg_text(v)}" for k, v in record.args.items()),
        "result": _result_text(record),
        "node": record.node_id,
        "host": f"{provenance.user}@{provenance.host} pid {provenance.pid}",
        "python": f"{provenance.python} on {provenance.platform}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(provenance.started)),
        "wall_s / cpu_s": f"{provenance['wall_s']} / {provenance['cpu_s']}",
        "peak_rss": provenance.peak_rss,
        "packages": ", ".join(f"{k}=={v}" for k, v in provenance.packages.items()) or "-",
        "git": _git_text(provenance.git),
        "depends on": ", ".join(sorted(function.deps)) or "-",
    }
    print_mapping(shown, False, title="task record")


def _arg_text(entry: ArgEntry) -> str:
    form = entry.form
    if form == "json":
        return repr(entry.value)[:60]
    if form in ("file", "job"):
        return f"{form}:{entry.value!r}"
    if form == "blob":  # a large argument kept in the store (tasks/arg_blobs.py)
        return f"{entry.codec} {entry.size} bytes {entry.value}"
    return "<pickled>" if form == "pickle" else f"<{entry.value}>"


def _result_text(record: TaskRecord) -> str:
    if record.error is not None:
        return f"failed: {record.error.type}: {record.error.message}"
    result = record.result
    return f"{result.codec} {result.size} bytes {result.uri or 'inline'}"


def _git_text(git: dict[str, Any] | None) -> str:
    if not git:
        return "-"
    return f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''} in {git.get('root')}"


@task.command("explain")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def explain_cmd(task_id: str, as_json: bool) -> None:
    """Rebuild a recorded call under the code of now and say whether it hits, and if not, why."""
    record = _record(task_id)
    explanation = explain(job_from_record(current_store(), record))
    if as_json:
        print_json(explanation.as_dict())
    else:
        click.echo(str(explanation))


@task.command("rm")
@click.argument("task_ids", nargs=-1, required=True)
def rm_cmd(task_ids: tuple[str, ...]) -> None:
    """Remove records (success and failure) of TASK_IDS. Their blobs stay in the store: there is no
    garbage collection yet."""
    store = current_store()
    for task_id in task_ids:
        record = _record(task_id)
        store.records.delete(record.task_id)
        click.echo(f"removed {record.task_id}")


@task.command("stale")
@click.option("--function", "pattern", default=None, help="Only functions named this (a glob; with a dot, against module.qualname).")
@click.option("--rerun", is_flag=True, help="Recompute the stale records that can be replayed.")
@click.option("--json", "as_json", is_flag=True)
def stale_cmd(pattern: str | None, rerun: bool, as_json: bool) -> None:
    """Records computed by code that has changed since, grouped by function."""
    report = stale(pattern)
    if as_json:
        print_json(report.as_dict())
    else:
        rows = [
            {"function": name, "stale": len(items), "compute_s": round(sum(i.wall_s for i in items), 3),
             "replayable": sum(i.replayable for i in items), "what changed": "; ".join(sorted({i.reason for i in items}))}
            for name, items in report.by_function().items()
        ]
        print_listing(rows, ["function", "stale", "compute_s", "replayable", "what changed"], False, title="stale records")
        for name, why in report.unimportable.items():
            click.echo(f"cannot check {name}: {why}", err=True)
    if rerun:
        replayable = [r.task_id for r in report.records if r.replayable]
        for r in report.records:
            if not r.replayable:
                click.echo(f"cannot rerun {r.task_id} ({r.function}): {r.why_not}", err=True)
        new_ids = rerun_calls(replayable)
        click.echo(f"reran {len(new_ids)} call(s)", err=as_json)


@task.command("rerun")
@click.argument("task_ids", nargs=-1, required=True)
def rerun_cmd(task_ids: tuple[str, ...]) -> None:
    """Rerun recorded calls with the code as it is now, upstream first."""
    ids = [_record(t).task_id for t in task_ids]
    for old, new in zip(ids, rerun_calls(ids), strict=True):
        click.echo(f"{old} -> {new}")


@task.command("recheck")
@click.argument("task_ids", nargs=-1)
@click.option("--function", "pattern", default=None,
              help="Recheck records of functions named this (a glob; with a dot, against module.qualname).")
@click.option("--sample", type=int, default=None, help="Recheck at most N records (chosen at random).")
@click.option("--json", "as_json", is_flag=True)
def recheck_cmd(task_ids: tuple[str, ...], pattern: str | None, sample: int | None, as_json: bool) -> None:
    """Recompute recorded calls in scratch and compare with the recorded results."""
    store = current_store()
    ids = [_record(t).task_id for t in task_ids]
    if pattern:
        ids += [r.task_id for r in store.records.iter_records()
                if function_matches(r.function.name, pattern)]
    if not ids:
        raise UserError("nothing to recheck: give task ids or --function PATTERN")
    if sample is not None and sample < len(ids):
        ids = random.sample(ids, sample)
    results = recheck(ids, store)
    rows = [{"task_id": r.task_id, "function": r.function,
             "reproducible": {True: "yes", False: "NO", None: "?"}[r.reproducible], "detail": r.detail} for r in results]
    print_listing(rows if as_json else _short_ids(rows), ["task_id", "function", "reproducible", "detail"], as_json,
                  title="recheck")
    if any(r.reproducible is False for r in results):
        raise SystemExit(2)


@task.command("actions")
@click.option("--json", "as_json", is_flag=True)
@click.option("--unknown", is_flag=True, help="Only calls whose outcome is unknown.")
def actions_cmd(as_json: bool, unknown: bool) -> None:
    """Actions in the action log with their state (succeeded, failed, running, unknown).

    ``settled`` says how an outcome came to be recorded: by the action's ``run``, by a ``resolve``
    of an unknown outcome, or by an ``override`` of an earlier outcome (named, with the note).
    """
    states = action_log(home_str()).states()
    rows = [{"key": s.key, "state": s.state, "settled": s.settled_by, "overrides": _overrides(s.overrides),
             "function": s.function, "task_id": s.task_id,
             "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time)), "error": s.error or "",
             "note": s.note or "", "user": s.user or ""}
            for s in states if not unknown or s.state == "unknown"]
    if as_json:
        print_json(rows)
        return
    columns = ["key", "state", "settled", "function", "time", "error"]
    if any(r["note"] and r["note"] != r["error"] for r in rows):
        columns.append("note")
    for r in rows:  # an override says what it replaced: "override of failed"
        if r["overrides"]:
            r["settled"] = f"override of {r['overrides']['outcome']}"
    print_listing(rows, columns, False, title="actions")


def _overrides(previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an override replaced, with its time readable (as every time in this table)."""
    if not previous:
        return None
    return {**previous, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous["time"]))}


@task.command("resolve")
@click.argument("key")
@click.option("--succeeded", is_flag=True, help="The action did take effect.")
@click.option("--failed", is_flag=True, help="The action did not take effect.")
@click.option("--note", default=None, help="Why (kept in the action log); required with --override.")
@click.option("--override", is_flag=True,
              help="Replace a settled outcome that is wrong; logged as an override, with --note and your user name.")
def resolve_cmd(key: str, succeeded: bool, failed: bool, note: str | None, override: bool) -> None:
    """Settle an action whose outcome is unknown, once, after checking the outside world.

    A settled outcome is refused: the action log records what happened to the outside world, and
    is never rewritten. ``--override --note WHY`` appends a correction that names what it replaces.
    """
    if succeeded and failed:
        raise click.UsageError("--succeeded and --failed contradict each other: give one")
    if not (succeeded or failed):
        raise click.UsageError("say what happened: --succeeded or --failed")
    if override and not (note or "").strip():
        raise click.UsageError("--override needs --note saying why the recorded outcome is wrong")
    outcome = "succeeded" if succeeded else "failed"
    action_log(home_str()).resolve(key, outcome, note, override=override)
    click.echo(f"{key}: {outcome}{' (override, logged)' if override else ''}")
