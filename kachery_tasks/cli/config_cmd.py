"""``kachery config show | get | set | unset``: every option in force and the layer it came from,
and the home's own ``config.yaml``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
import yaml

from .. import config
from ..fs import write_atomic
from .output import print_json, print_listing


def update_home_file(home: Path, values: Mapping[str, Any], unset: Iterable[str] = ()) -> None:
    """Merge ``values`` into ``<home>/config.yaml`` and drop the keys in ``unset``, keeping whatever
    else it holds; the file is replaced atomically, so a crash leaves the old one or the new one."""
    current = config.read_home_file(home)
    current.update(values)
    for key in unset:
        current.pop(key, None)
    write_atomic(Path(home) / "config.yaml", yaml.safe_dump(current, sort_keys=True).encode())


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


@config_group.command("set")
@click.argument("key")
@click.argument("value")
def set_cmd(key: str, value: str) -> None:
    """Set KEY to VALUE in this home's config.yaml (VALUE is YAML: true, 5, 1GB, [memory, local])."""
    where = f"kachery config set {key}"
    config.check_key(key, where)
    parsed = config.checked(key, config.parse_text(key, value, f"{key}={value!r}"), where)
    home = config.home()
    path = home / "config.yaml"
    update_home_file(home, {key: parsed})
    click.echo(f"{key} = {parsed!r} in {path}")
    _note_if_overridden(key)


@config_group.command("unset")
@click.argument("key")
def unset_cmd(key: str) -> None:
    """Remove KEY from this home's config.yaml (its default, or another layer's value, applies)."""
    config.check_key(key, "kachery config unset")
    home = config.home()
    if key not in config.read_home_file(home):
        click.echo(f"{key} is not set in {home / 'config.yaml'}; nothing to do")
        return
    update_home_file(home, {}, unset=[key])
    click.echo(f"{key} removed from {home / 'config.yaml'}")
    _note_if_overridden(key)


def _note_if_overridden(key: str) -> None:
    """Say so when the environment outranks the home file for ``key`` (the change has no effect)."""
    env = f"{config.ENV_PREFIX}{key.upper()}"
    if env in os.environ:
        click.echo(f"note: {env} is set in the environment and outranks config.yaml for {key}", err=True)
