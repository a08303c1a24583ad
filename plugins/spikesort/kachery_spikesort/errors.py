"""The plugin's user error, in a module of its own so that config checks can raise it without
importing the batch runner."""

from __future__ import annotations


class ConfigError(ValueError):
    """A batch config that cannot be run; the message names the key."""
