"""``kachery config show | get``: every option in force and the layer it came from."""

from __future__ import annotations

import click

from .. import config
from .output import print_json, print_listing


@click.group("config")
def config_group() -> None:
    """The configuration in force and where each value came from."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {key, value, source}.")
def show(as_json: bool) -> None:
    """Every option's value in force and where it came from."""
    rows = [{"key": key, "value": value, "source": source} for key, value, source in config.effective()]
    print_listing(rows, ["key", "value", "source"], as_json)


@config_group.command("get")
@click.argument("key")
def get_cmd(key: str) -> None:
    """Print one option's value in force as JSON."""
    print_json(config.get(key))
