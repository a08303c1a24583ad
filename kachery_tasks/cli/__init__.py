"""The ``kachery`` command: files, mutables, the node and its configuration.

``main`` is a click group whose ``invoke`` turns every :class:`~kachery_tasks.errors.KacheryError`
into one line on stderr (``kachery: error: ...``) and exit status 1: a user who gave a bad URI
needs the message, not a traceback. So does a disk that is full, over quota or read-only, whichever
command was writing (``errors.as_store_full``). Other exceptions are bugs and keep their traceback.

One module per command group, each added here; installed plugins add their own groups through the
``kachery_tasks.cli`` entry point.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sqlite3
from typing import Any

import click

from .. import __version__, config
from ..errors import KacheryError, as_store_full
from .bucket import bucket, publish_cmd
from .channel import channel
from .config_cmd import config_group
from .demo import demo
from .feed import feed
from .files import cat, info, load, store
from .hub import hub
from .maintenance import du, verify
from .mutable import mutable
from .node import node
from .task import task

#: The entry-point group through which installed plugins add command groups.
PLUGIN_ENTRY_POINTS = "kachery_tasks.cli"


def error_line(exc: BaseException) -> str:
    """The one line printed for a user error (a message with newlines is folded)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"kachery: error: {text or type(exc).__name__}"


class KacheryGroup(click.Group):
    """A click group that reports KacheryError as one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KacheryError as exc:
            click.echo(error_line(exc), err=True)
            ctx.exit(1)
        except (OSError, sqlite3.Error) as exc:
            # A full, over-quota or read-only disk is the user's to fix, whichever command wrote:
            # the store, a feed, the mutables database, the node key. Other OS errors are bugs.
            full = as_store_full(exc, config.home_str())
            if full is None:
                raise
            click.echo(error_line(full), err=True)
            ctx.exit(1)


@click.group(cls=KacheryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", metavar="PATH", default=None,
              help="Home directory to use instead of the configured one (config key 'home').")
@click.version_option(__version__, "-V", "--version", prog_name="kachery")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """kachery: content-addressed files, mutables and task results of this node."""
    if home is not None:
        # Held for the whole command: that home with its own config.yaml, environment above it
        ctx.with_resource(config.home_layers(home))


def _add_groups() -> None:
    for command in (store, load, cat, info, verify, du, publish_cmd, bucket, channel, mutable, node, config_group, feed, task, demo, hub):
        main.add_command(command)
    # Installed plugins add their own groups (kachery-spikesort adds `kachery spikesort`).
    for entry in importlib.metadata.entry_points(group=PLUGIN_ENTRY_POINTS):
        try:
            main.add_command(entry.load(), entry.name)
        except Exception as exc:  # a broken plugin must not take the whole command down
            logging.getLogger("kachery_tasks").warning(
                "plugin command %r could not be loaded (%s: %s); reinstall it", entry.name, type(exc).__name__, exc)


_add_groups()

__all__ = ["KacheryGroup", "main"]
