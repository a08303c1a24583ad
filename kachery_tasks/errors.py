"""Exceptions shared by every layer.

Every error a user can cause derives from :class:`UserError`: its message is one line that says what
was wrong and what to do, so the command line can print it without a traceback.
"""

from __future__ import annotations


class KacheryError(Exception):
    """Base of every error raised on purpose by kachery-tasks."""


class UserError(KacheryError):
    """Bad input or a situation the user can fix; the message says how."""


class ConfigError(UserError, KeyError):
    """An unknown or malformed configuration key or value."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidURI(UserError, ValueError):
    """A URI that does not follow the formats in docs/files.md."""


class NotFoundError(UserError, LookupError):
    """Something named by id or URI is not in this node's store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IntegrityError(KacheryError):
    """Stored bytes no longer match their hash; the bad copy was moved to quarantine."""


class ReadOnlyStoreError(UserError):
    """A write was attempted while the configuration says ``read_only``."""


class UnhashableArgument(UserError, TypeError):
    """A value that has no canonical encoding, so no task id can be computed for it."""


class CodecError(UserError, TypeError):
    """A result that the chosen codec cannot encode."""


class StaleResultWarning(UserWarning):
    """A query failed and its last cached result was returned instead."""
