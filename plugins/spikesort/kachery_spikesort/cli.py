"""``spikesort`` commands: a click group the ``kachery`` command line can mount
(``kachery spikesort ...``), also run as ``python -m kachery_spikesort``."""

from __future__ import annotations

import sys

import click


@click.group("spikesort", help="Batch spike sorting with spikeinterface as cached kachery tasks.")
def spikesort() -> None:
    pass


@spikesort.command("batch")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="A running Dask scheduler; default: start a LocalCluster when something must be computed.")
@click.option("--workers", default=2, show_default=True, help="Worker processes of the LocalCluster.")
@click.option("--home", default=None, help="kachery home (default: the config's 'home', else the one in force).")
@click.option("--output", default=None, type=click.Path(file_okay=False),
              help="Folder for results.csv, results.json and accuracy.png (default: the config's 'output', "
                   "relative to the current directory).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def batch_command(config_path: str, scheduler: str | None, workers: int, home: str | None, output: str | None,
                  progress: bool) -> None:
    """Sort every recording of CONFIG.yaml with every sorter and parameter set; compute only what
    is not already in the store."""
    from pathlib import Path

    from rich.console import Console

    from .batch import ConfigError, load_config, print_table, run_batch

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        cfg = load_config(config_path)
    except (ConfigError, ValueError, OSError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    if home is not None:
        cfg.home = str(Path(home).expanduser().resolve())
    if output is not None:
        cfg.output = Path(output).resolve()
    result = run_batch(cfg, scheduler=scheduler, workers=workers, show_progress=progress)
    print_table(result.rows, console)
    console.print(f"{result.computed} task(s) computed, {result.cached} cached, {result.wall_s:.1f} s")
    for kind, path in result.outputs.items():
        console.print(f"{kind}: {path}")


def main(argv: list[str] | None = None) -> None:
    spikesort.main(args=argv if argv is not None else sys.argv[1:], prog_name="python -m kachery_spikesort")


if __name__ == "__main__":
    main()
