"""A batch's outputs: ``results.csv``, ``results.json`` and ``accuracy.png`` in the output folder.

The figure is a pure function of the accuracies it shows, so it is a pure task like any other
result (:func:`accuracy_figure`, its PNG in the store): a rerun whose accuracies have not changed
loads the stored PNG instead of importing matplotlib and drawing it again. The tables are not
tasks: rendering them takes microseconds, and they hold what this run did (``status``,
``computed_stages``, ``wall_s``), which is not a function of the results.

Every file is written only when it is missing or its bytes differ, through a temporary file
renamed into place, so a rerun leaves an unchanged file (and its mtime) alone and a reader never
sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from kachery_tasks import File, store_bytes
from kachery_tasks.tasks import pure

TABLE_COLUMNS = ("recording", "sorter", "params", "num_units", "accuracy", "precision", "recall",
                 "num_gt_units", "num_well_detected", "num_false_positive", "median_snr", "sort_s",
                 "status", "computed_stages", "sort_task_id")
SHOWN_COLUMNS = ("recording", "sorter", "params", "num_units", "accuracy", "precision", "recall", "sort_s",
                 "status")


def write_if_differs(path: str | os.PathLike, data: bytes) -> bool:
    """Give ``path`` exactly ``data``; returns whether it had to be written."""
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def table_csv(rows: list[dict[str, Any]]) -> bytes:
    """``results.csv``: every column of :data:`TABLE_COLUMNS`, None as an empty cell."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in TABLE_COLUMNS})
    return buffer.getvalue().encode()


def figure_groups(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """What the figure shows, in table order: ``[sorter, params, [accuracy per recording]]`` per
    sorter and parameter set (recordings without ground truth add no accuracy)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        values = groups.setdefault((row["sorter"], row["params"]), [])
        if row.get("accuracy") is not None:
            values.append(float(row["accuracy"]))
    return [[sorter, params, values] for (sorter, params), values in groups.items()]


@pure(name="kachery_spikesort.accuracy_figure", codec="pickle")
def accuracy_figure(groups: list[list[Any]]) -> File:
    """The accuracy figure of :func:`figure_groups`' groups as a stored PNG: per sorter and
    parameter set a bar at the mean and one dot per recording."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{sorter}\n{params}" for sorter, params, _ in groups]
    sorters = sorted({sorter for sorter, _, _ in groups})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sorters)}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.5))
    for i, (sorter, _, values) in enumerate(groups):
        mean = sum(values) / len(values) if values else 0.0
        ax.bar(i, mean, color=colors[sorter], alpha=0.6, label=sorter)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right")
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy vs ground truth")
    ax.set_title("Accuracy per sorter and parameter set\n(bars: mean, dots: recordings)", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return File(store_bytes(png.getvalue(), label="accuracy.png"))


def plot_accuracy(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the accuracy figure of ``rows`` to ``path`` (drawn only if not already stored)."""
    write_if_differs(path, accuracy_figure(figure_groups(rows)).read_bytes())
    return Path(path)


def write_results(rows: list[dict[str, Any]], output: str | os.PathLike,
                  meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the table (CSV, and JSON with ``meta``) and the figure to ``output``, in the home in
    force (where the figure is stored)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = output / "results.csv", output / "results.json", output / "accuracy.png"
    write_if_differs(csv_path, table_csv(rows))
    write_if_differs(json_path, json.dumps({"rows": rows, **(meta or {})}, indent=2).encode())
    plot_accuracy(rows, png_path)
    return {"csv": csv_path, "json": json_path, "png": png_path}


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The table's main columns on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="spike sorting batch")
    for col in SHOWN_COLUMNS:
        table.add_column(col, overflow="fold",
                         justify="right" if col not in ("recording", "sorter", "params", "status") else "left")
    for row in rows:
        cells = []
        for col in SHOWN_COLUMNS:
            value = row.get(col)
            cells.append("-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    console.print(table)
