"""Output helpers shared by every ``kachery`` command: tables or JSON on stdout, progress on stderr.

Listings go to stdout (a rich table for people, ``--json`` for scripts); progress bars go to stderr
and only when it is a terminal, so piping a command's output never mixes in bar redraws.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .. import config
from ..store.blobs import Progress as ProgressCallback


def stdout_console() -> Console:
    # Created per call: click's test runner swaps sys.stdout, and a cached console would keep the old one.
    return Console(file=sys.stdout, soft_wrap=True)


def stderr_console() -> Console:
    return Console(file=sys.stderr)


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON on stdout (plain text, no colour codes)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """Print ``rows`` (dicts) as a rich table with ``columns`` in that order."""
    table = Table(title=title, show_lines=False)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(name)) for name in columns))
    stdout_console().print(table)


def print_listing(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool,
                  title: str | None = None) -> None:
    """The one way a command prints a listing: JSON (a list of objects) or a table."""
    if as_json:
        print_json(list(rows))
    else:
        print_table(rows, columns, title)


def print_mapping(mapping: dict[str, Any], as_json: bool, title: str | None = None) -> None:
    """A single record: JSON object, or a two-column table of field and value."""
    if as_json:
        print_json(mapping)
    else:
        print_table([{"field": k, "value": v} for k, v in mapping.items()], ["field", "value"], title)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


@contextmanager
def byte_progress(total: int, description: str) -> Iterator[ProgressCallback | None]:
    """A progress callback ``(nbytes) -> None`` for work on ``total`` bytes, or None if not worth one.

    A bar appears only for at least ``config progress_min_bytes`` and when stderr is a terminal.
    """
    console = stderr_console()
    if total < config.get("progress_min_bytes") or not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


