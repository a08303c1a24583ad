"""``kachery mutable get | set | delete | ls``: the home's small key-value database of JSON values."""

from __future__ import annotations

import json

import click

from ..errors import NotFoundError, UserError
from ..store import current_store
from .output import print_json, print_listing

_MISSING = object()


@click.group()
def mutable() -> None:
    """Mutables: named JSON values, such as the URI of the latest result."""


@mutable.command("get")
@click.argument("key")
def get_cmd(key: str) -> None:
    """Print KEY's value as JSON (exit status 1 if it is not set)."""
    value = current_store().mutables.get(key, _MISSING)
    if value is _MISSING:
        raise NotFoundError(f"mutable {key!r} is not set; set it with `kachery mutable set {key} JSON`")
    print_json(value)


@mutable.command("set")
@click.argument("key")
@click.argument("value", metavar="JSON")
def set_cmd(key: str, value: str) -> None:
    """Set KEY to the JSON value JSON (quote strings: '"text"')."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise UserError(f"{value!r} is not JSON ({exc}); a string needs quotes, e.g. '\"text\"'") from None
    current_store().mutables.set(key, parsed)


@mutable.command("delete")
@click.argument("key")
def delete_cmd(key: str) -> None:
    """Remove KEY (exit status 1 if it was not set)."""
    if not current_store().mutables.delete(key):
        raise NotFoundError(f"mutable {key!r} is not set; nothing deleted")


@mutable.command("ls")
@click.option("--prefix", default="", help="Only keys that start with this.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object {key: value}.")
def ls_cmd(prefix: str, as_json: bool) -> None:
    """List mutables and their values, sorted by key."""
    items = list(current_store().mutables.items(prefix))
    if as_json:
        print_json(dict(items))
    else:
        print_listing([{"key": k, "value": v} for k, v in items], ["key", "value"], False)
