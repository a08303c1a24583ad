"""``kachery du`` and ``kachery verify [--repair]``: what the store holds, and whether it is sound.

``du`` prints the numbers of ``store.usage`` (one pass over the records, a ``stat`` per file, no
blob read). ``verify`` runs the checks of ``store.scrub`` (every blob re-hashed, every record
checked) and, with ``--repair``, fetches what was lost from the configured buckets
(``buckets.repair``). Progress bars are the shared ones (output.py): stderr, terminals only.
See docs/maintenance.md.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from .. import config
from ..buckets.fetch import configured_buckets
from ..buckets.repair import Repair, repair_blobs
from ..errors import ReadOnlyStoreError, UserError, human_bytes
from ..store import current_store
from ..store.scrub import (
    MISSING_ARGUMENT,
    MISSING_RESULT,
    QUARANTINED,
    check_records,
    quarantined_missing,
    scrub_blobs,
)
from ..store.usage import GROUPINGS, Group, Usage, summarize
from .output import bars_shown, byte_progress, print_json, print_table

# -- du ---------------------------------------------------------------------------------------------


@click.command()
@click.option("--by", "by", default=None, metavar="function|kind|age",
              help="Also group: per function, per record and blob kind, or by age (write time).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def du(by: str | None, as_json: bool) -> None:
    """Store size, blobs and records, compute seconds saved, the largest results."""
    if by is not None and by not in GROUPINGS:
        raise UserError(f"--by takes {', '.join(GROUPINGS[:-1])} or {GROUPINGS[-1]}, not {by!r}")
    usage = summarize(current_store())
    if as_json:
        print_json(usage_json(usage, by))
        return
    click.echo(f"store of {usage.home}: {human_bytes(usage.disk_bytes)} on disk")
    click.echo(f"  blobs:   {usage.blobs} ({human_bytes(usage.blob_bytes)})")
    click.echo(f"  records: {usage.records}, {usage.failed_records} failed, {usage.unreadable_records} unreadable "
               f"({human_bytes(usage.record_bytes)})")
    click.echo(f"  other:   {human_bytes(usage.other_bytes)} (stamps, manifests, quarantine, temp files, indexes)")
    click.echo(f"  saved:   {human_seconds(usage.saved_s)} of compute (recorded wall time of the records)")
    if usage.missing_results:
        click.echo(f"  {usage.missing_results} record(s) miss their result blob: kachery verify --repair")
    if by is not None:
        title = {"function": "by function", "kind": "by record and blob kind",
                 "age": "by age (records by creation, blobs by modification time)"}[by]
        print_table([_row(g) for g in usage.groups(by)], [by, "records", "blobs", "bytes", "saved"], title)
        click.echo("")
    if usage.largest:
        print_table([{"task": r.task_id[:12], "function": r.function, "kind": r.kind, "bytes": human_bytes(r.bytes),
                      "saved": human_seconds(r.wall_s)} for r in usage.largest],
                    ["task", "function", "kind", "bytes", "saved"], "largest results")


def usage_json(usage: Usage, by: str | None) -> dict[str, Any]:
    """``kachery du --json``: the totals and largest results, and the grouping asked for."""
    out: dict[str, Any] = {
        "home": usage.home,
        "disk_bytes": usage.disk_bytes,
        "blobs": {"count": usage.blobs, "bytes": usage.blob_bytes},
        "records": {"count": usage.records, "failed": usage.failed_records, "unreadable": usage.unreadable_records,
                    "bytes": usage.record_bytes, "missing_results": usage.missing_results},
        "other_bytes": usage.other_bytes,
        "saved_s": usage.saved_s,
        "largest": [asdict(r) for r in usage.largest],
    }
    if by is not None:
        out["by"] = by
        out["groups"] = [asdict(g) for g in usage.groups(by)]
    return out


def _row(group: Group) -> dict[str, Any]:
    return {"function": group.name, "kind": group.name, "age": group.name, "records": group.records,
            "blobs": group.blobs, "bytes": human_bytes(group.bytes),
            "saved": human_seconds(group.saved_s) if group.records is not None else None}


def human_seconds(s: float) -> str:
    """``0.4 s``, ``12.0 s``, ``3 min 20 s``, ``5 h 02 min``, ``2 d 03 h``."""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


# -- verify -----------------------------------------------------------------------------------------


@click.command()
@click.option("--repair", is_flag=True,
              help="Fetch good copies of damaged or missing blobs from the configured buckets.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object {checked, bytes, damaged, records, repaired, ...}.")
def verify(repair: bool, as_json: bool) -> None:
    """Re-hash every blob and check every record; quarantine what is bad (exit status 1 if anything
    is left broken). With --repair, fetch lost blobs from the buckets (config bucket, read_buckets)."""
    store = current_store()
    buckets = _repair_buckets() if repair else []  # before the scrub: a repair that cannot run fails at once
    blobs = store.blobs
    count, total = blobs.total_size()
    with byte_progress(total, "verifying blobs", objects=count) as bar:
        scrub = scrub_blobs(blobs, bar, None if bar is None else bar.objects)
    records_total = sum(1 for _ in store.records.iter_files()) if bars_shown() else 0
    with byte_progress(0, "checking records", objects=records_total) as bar:
        check = check_records(store.records, blobs, None if bar is None else bar.objects)
    leftovers = blobs.clean_tmp() + store.records.clean_tmp()

    # what was lost: True if something cannot serve without it, False if only a replay needs it
    lost: dict[str, bool] = {d.sha256: True for d in scrub.damaged}
    for p in check.problems:
        if p.sha256 is not None:
            lost[p.sha256] = lost.get(p.sha256, False) or p.problem == MISSING_RESULT
    earlier = [h for h in quarantined_missing(blobs) if h not in lost]
    repairs: list[Repair] = []
    if repair:
        for h in earlier:
            lost[h] = True
        repairs = repair_blobs(sorted(lost), blobs, buckets)
    fixed = {r.sha256 for r in repairs if r.repaired}

    broken_blobs = [d for d in scrub.damaged if d.sha256 not in fixed]
    bad_records = [p for p in check.problems if p.problem in QUARANTINED]
    unserved = [p for p in check.problems if p.problem == MISSING_RESULT and p.sha256 not in fixed]
    unrepaired = [r for r in repairs if not r.repaired and lost[r.sha256]]
    broken = len({d.sha256 for d in broken_blobs} | {r.sha256 for r in unrepaired}) + len(bad_records) + len(unserved)

    if as_json:
        print_json({
            "checked": scrub.checked, "bytes": scrub.bytes, "seconds": round(scrub.seconds, 3),
            "mb_per_s": round(scrub.rate / 1e6, 1),
            "damaged": [asdict(d) for d in scrub.damaged],
            "records": {"checked": check.checked, "problems": [asdict(p) for p in check.problems]},
            "quarantined_earlier": earlier,
            "repaired": [{"sha256": r.sha256, "bucket": r.bucket, "size": r.size} for r in repairs if r.repaired],
            "not_repaired": [{"sha256": r.sha256, "reasons": list(r.reasons), "needed": lost[r.sha256]}
                             for r in repairs if not r.repaired],
            "temp_files_removed": leftovers,
            "broken": broken,
        })
    else:
        for d in scrub.damaged:
            click.echo(f"damaged sha256://{d.sha256} ({human_bytes(d.size)}): moved to quarantine")
        for p in check.problems:
            click.echo(f"record {p.task_id}{' (failure)' if p.failure else ''}: {p.problem}: {p.detail}")
        for r in repairs:
            click.echo(r.line())
        click.echo(f"{scrub.checked} blobs checked ({human_bytes(scrub.bytes)}) in {scrub.seconds:.1f} s "
                   f"({scrub.rate / 1e6:.1f} MB/s), {len(scrub.damaged)} damaged, "
                   f"{leftovers} temp file(s) of interrupted writes removed")
        missing_args = sum(p.problem == MISSING_ARGUMENT for p in check.problems)
        click.echo(f"{check.checked} records checked, {len(bad_records)} quarantined, "
                   f"{sum(p.problem == MISSING_RESULT for p in check.problems)} missing their result blob"
                   + (f", {missing_args} missing an argument blob (replay only)" if missing_args else ""))
        if earlier and not repair:
            click.echo(f"{len(earlier)} blob(s) quarantined earlier are not back in the store: "
                       "kachery verify --repair fetches them from the buckets")
    if broken:
        click.echo(f"kachery: error: {_broken_line(broken_blobs, bad_records, unserved, unrepaired, repair, blobs)}",
                   err=True)
        raise click.exceptions.Exit(1)


def _repair_buckets():
    """The buckets a repair reads, or a one-line error saying why there can be no repair."""
    if config.get("read_only"):
        raise ReadOnlyStoreError("the configuration says read_only: --repair would write to the store; "
                                 "unset read_only to repair")
    buckets = configured_buckets()
    if not buckets:
        raise UserError("--repair fetches from a bucket and none is configured; set one with "
                        "`kachery config set bucket file:///shared/kachery` (or read_buckets)")
    return buckets


def _broken_line(damaged: list, bad_records: list, unserved: list, unrepaired: list, repair: bool, blobs) -> str:
    parts = []
    if damaged:
        parts.append(f"{len(damaged)} damaged blob(s) moved to {blobs.quarantine_dir}")
    if bad_records:
        parts.append(f"{len(bad_records)} bad record(s) quarantined")
    if unserved:
        parts.append(f"{len(unserved)} record(s) miss their result blob")
    extra = [r for r in unrepaired if r.sha256 not in {d.sha256 for d in damaged} | {p.sha256 for p in unserved}]
    if extra:
        parts.append(f"{len(extra)} quarantined blob(s) not repaired")
    what = "; ".join(parts)
    if not (damaged or unserved or extra):
        return f"{what} (see the lines above; kept for inspection, the tasks compute again when called)"
    if repair:
        return f"{what} (see the lines above); store the files again, or publish them from a node that has them"
    return f"{what}; kachery verify --repair fetches blobs from the configured buckets, or store the files again"


__all__ = ["du", "human_seconds", "usage_json", "verify"]
