"""Mutables: a small key-value database of JSON values in ``<home>/mutables.sqlite``.

SQLite in WAL mode lets several processes read while one writes; each call is its own transaction,
so a killed process never leaves a half-written value.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fs import make_dirs

_SCHEMA = "CREATE TABLE IF NOT EXISTS mutables (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL)"


class Mutables:
    """The mutables of one home. One SQLite connection per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            make_dirs(self.path.parent)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._local.conn = conn
        return conn

    def set(self, key: str, value: Any) -> None:
        _check_key(key)
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise UserError(f"mutable {key!r}: value is not JSON ({exc}); store plain data or a file URI") from None
        self._connection().execute(
            "INSERT INTO mutables(key, value, updated) VALUES (?, ?, julianday('now')) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated=excluded.updated",
            (key, text),
        )

    def get(self, key: str, default: Any = None) -> Any:
        _check_key(key)
        row = self._connection().execute("SELECT value FROM mutables WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        _check_key(key)
        cursor = self._connection().execute("DELETE FROM mutables WHERE key = ?", (key,))
        return cursor.rowcount > 0

    def items(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._connection().execute(
            "SELECT key, value FROM mutables WHERE key LIKE ? ESCAPE '\\' ORDER BY key", (escaped + "%",)
        ).fetchall()
        for key, value in rows:
            yield key, json.loads(value)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise UserError(f"a mutable key is a non-empty string, not {key!r}")
