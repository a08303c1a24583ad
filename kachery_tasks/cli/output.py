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
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .. import config
from ..errors import human_bytes

#: A transfer of at least this many objects (``kachery publish`` of many records) shows a bar
#: whatever its bytes.
PROGRESS_MIN_OBJECTS = 100


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


def bars_shown() -> bool:
    """Whether progress bars are drawn at all: only when stderr is a terminal, so that a pipe, a
    log file or a test never gets bar redraws."""
    return stderr_console().is_terminal


class Bar:
    """What :func:`byte_progress` yields. ``bar(n)`` adds ``n`` bytes done, so it is a store
    ``Progress`` callback that transfers call; ``bar.objects(n)`` adds objects done, for a transfer
    of many (``kachery publish``: blobs and records). ``bytes_done`` and ``objects_done`` count."""

    def __init__(self, progress: Progress, description: str, total: int, objects: int | None, by_objects: bool):
        self._progress = progress
        self._objects_total = objects
        self._by_objects = by_objects
        self.bytes_done = 0
        self.objects_done = 0
        self._task = progress.add_task(description, total=objects if by_objects else total, detail=self.detail())

    def __call__(self, n: int) -> None:
        self.bytes_done += n
        if self._by_objects:
            self._progress.update(self._task, detail=self.detail())
        else:
            self._progress.advance(self._task, n)

    def objects(self, n: int = 1) -> None:
        self.objects_done += n
        if self._by_objects:
            self._progress.advance(self._task, n)
        self._progress.update(self._task, detail=self.detail())

    def detail(self) -> str:
        """``k/n objects`` (and the bytes so far, when the bar measures objects)."""
        if self._objects_total is None:
            return ""
        text = f"{self.objects_done}/{self._objects_total} objects"
        return f"{text}, {human_bytes(self.bytes_done)}" if self._by_objects else text


@contextmanager
def byte_progress(total: int, description: str, *, objects: int | None = None) -> Iterator[Bar | None]:
    """A progress bar for work on ``total`` bytes (and ``objects`` objects, if given), or None if
    not worth one: the callback ``bar(nbytes)`` (and ``bar.objects(n)``), see :class:`Bar`.

    The bar shows bytes done, speed and time left, and ``k/n objects`` when ``objects`` is given.
    It appears only when stderr is a terminal, and for at least ``config progress_min_bytes`` bytes
    or :data:`PROGRESS_MIN_OBJECTS` objects; a transfer of many objects but few bytes (records)
    measures its bar in objects.
    """
    by_bytes = total >= config.get("progress_min_bytes")
    by_objects = not by_bytes and objects is not None and objects >= PROGRESS_MIN_OBJECTS
    if not (by_bytes or by_objects) or not bars_shown():
        yield None
        return
    columns: list[ProgressColumn | str] = [TextColumn("{task.description}"), BarColumn()]
    if by_bytes:
        columns += [DownloadColumn(), TransferSpeedColumn()]
    if objects is not None:
        columns.append(TextColumn("{task.fields[detail]}"))
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        yield Bar(progress, description, total, objects, by_objects)


