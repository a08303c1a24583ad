"""The hub's own state, in SQLite: who signed in, the channels it administers, who owns them,
sign-ins under way, sessions, API tokens, one-time join tokens and used proofs.

The channels themselves (members, groups, permissions) are not here: their truth is the signed
config in the channel's bucket, which the hub reads and writes like any owner (hub/channels.py).
Secrets (session ids, tokens) are stored as SHA-256 digests, never as issued, so a copy of the
database signs nobody in.

One connection per call (SQLite serializes writers; WAL lets readers go on), so the app is safe on
uvicorn's thread pool. Rows come back as small frozen records.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, issuer TEXT NOT NULL, subject TEXT NOT NULL, email TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '', created REAL NOT NULL, UNIQUE (issuer, subject));
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, bucket TEXT NOT NULL, transport TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id), created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS owners (
    channel_id TEXT NOT NULL REFERENCES channels(id), user_id INTEGER NOT NULL REFERENCES users(id),
    PRIMARY KEY (channel_id, user_id));
CREATE TABLE IF NOT EXISTS logins (
    state TEXT PRIMARY KEY, nonce TEXT NOT NULL, verifier TEXT NOT NULL, next TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    digest TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), csrf TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_tokens (
    digest TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), label TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    digest TEXT PRIMARY KEY, channel_id TEXT NOT NULL REFERENCES channels(id), permissions TEXT NOT NULL,
    created_by INTEGER NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, used_by TEXT, used REAL);
CREATE TABLE IF NOT EXISTS used_challenges (
    digest TEXT PRIMARY KEY, used REAL NOT NULL);
"""

SESSION_S = 7 * 24 * 3600.0
LOGIN_S = 600.0


def digest(secret: str) -> str:
    """How a secret is kept: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    id: int
    email: str
    name: str


@dataclass(frozen=True)
class Channel:
    id: str
    name: str
    bucket: str
    transport: str
    created_by: int
    created: float


@dataclass(frozen=True)
class Login:
    state: str
    nonce: str
    verifier: str
    next: str


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str


class HubDB:
    """The hub's database at ``path`` (created with its schema on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- users -------------------------------------------------------------------------------------
    def user_for(self, issuer: str, subject: str, email: str, name: str) -> User:
        """The user signed in as ``subject`` at ``issuer``, created or with its e-mail and name updated."""
        with self._connect() as db:
            db.execute("INSERT INTO users (issuer, subject, email, name, created) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (issuer, subject) DO UPDATE SET email = excluded.email, name = excluded.name",
                       (issuer, subject, email, name, time.time()))
            row = db.execute("SELECT id, email, name FROM users WHERE issuer = ? AND subject = ?",
                             (issuer, subject)).fetchone()
        return User(*row)

    # -- sign-in and sessions ----------------------------------------------------------------------
    def add_login(self, state: str, nonce: str, verifier: str, next_url: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM logins WHERE created < ?", (time.time() - LOGIN_S,))
            db.execute("INSERT INTO logins VALUES (?, ?, ?, ?, ?)", (state, nonce, verifier, next_url, time.time()))

    def take_login(self, state: str) -> Login | None:
        """The sign-in begun with ``state``, removed (a state is good once, for :data:`LOGIN_S`)."""
        with self._connect() as db:
            row = db.execute("SELECT state, nonce, verifier, next, created FROM logins WHERE state = ?",
                             (state,)).fetchone()
            db.execute("DELETE FROM logins WHERE state = ?", (state,))
        if row is None or row[4] < time.time() - LOGIN_S:
            return None
        return Login(*row[:4])

    def new_session(self, user: User) -> str:
        """A new session for ``user``; returns its secret id (the cookie's value)."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                       (digest(sid), user.id, secrets.token_urlsafe(24), now, now + SESSION_S))
        return sid

    def session(self, sid: str) -> Session | None:
        with self._connect() as db:
            row = db.execute("SELECT u.id, u.email, u.name, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id "
                             "WHERE s.digest = ? AND s.expires > ?", (digest(sid), time.time())).fetchone()
        return None if row is None else Session(User(*row[:3]), row[3])

    def end_session(self, sid: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE digest = ?", (digest(sid),))

    def new_api_token(self, user: User, label: str, days: float = 90.0) -> str:
        token = "kth_" + secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO api_tokens VALUES (?, ?, ?, ?, ?)",
                       (digest(token), user.id, label, now, now + days * 86400))
        return token

    def api_user(self, token: str) -> User | None:
        with self._connect() as db:
            row = db.execute("SELECT u.id, u.email, u.name FROM api_tokens t JOIN users u ON u.id = t.user_id "
                             "WHERE t.digest = ? AND t.expires > ?", (digest(token), time.time())).fetchone()
        return None if row is None else User(*row)

    # -- channels ----------------------------------------------------------------------------------
    def add_channel(self, channel: Channel) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO channels VALUES (?, ?, ?, ?, ?, ?)",
                       (channel.id, channel.name, channel.bucket, channel.transport, channel.created_by,
                        channel.created))
            db.execute("INSERT INTO owners VALUES (?, ?)", (channel.id, channel.created_by))

    def channel(self, channel_id: str) -> Channel | None:
        with self._connect() as db:
            row = db.execute("SELECT id, name, bucket, transport, created_by, created FROM channels WHERE id = ?",
                             (channel_id,)).fetchone()
        return None if row is None else Channel(*row)

    def channels(self) -> list[Channel]:
        with self._connect() as db:
            rows = db.execute("SELECT id, name, bucket, transport, created_by, created FROM channels "
                              "ORDER BY name, created").fetchall()
        return [Channel(*row) for row in rows]

    def owner_ids(self, channel_id: str) -> set[int]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT user_id FROM owners WHERE channel_id = ?", (channel_id,))}

    def owners(self, channel_id: str) -> list[User]:
        with self._connect() as db:
            rows = db.execute("SELECT u.id, u.email, u.name FROM owners o JOIN users u ON u.id = o.user_id "
                              "WHERE o.channel_id = ? ORDER BY u.email", (channel_id,)).fetchall()
        return [User(*row) for row in rows]

    def add_owner(self, channel_id: str, email: str) -> User | None:
        """Make the user signed in with ``email`` an owner too; None if no such user signed in yet."""
        with self._connect() as db:
            row = db.execute("SELECT id, email, name FROM users WHERE email = ? ORDER BY id LIMIT 1", (email,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR IGNORE INTO owners VALUES (?, ?)", (channel_id, row[0]))
        return User(*row)

    # -- join tokens and proofs --------------------------------------------------------------------
    def add_join_token(self, channel_id: str, permissions: str, user: User, expires_s: float) -> str:
        token = secrets.token_urlsafe(24)
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO join_tokens (digest, channel_id, permissions, created_by, created, expires) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (digest(token), channel_id, permissions, user.id, now, now + expires_s))
        return token

    def use_join_token(self, token: str, node_id: str) -> tuple[str, str] | str:
        """``(channel id, permissions)`` of an unused, unexpired token, now used by ``node_id``; else
        why not (one line). Used once, even by two nodes racing: the update is conditional."""
        now = time.time()
        with self._connect() as db:
            row = db.execute("SELECT channel_id, permissions, expires, used FROM join_tokens WHERE digest = ?",
                             (digest(token),)).fetchone()
            if row is None:
                return "this join token is not known to the hub (mistyped, or from another hub)"
            if row[3] is not None:
                return "this join token was used already; ask the channel's owner for a new one"
            if row[2] < now:
                return "this join token has expired; ask the channel's owner for a new one"
            db.execute("UPDATE join_tokens SET used = ?, used_by = ? WHERE digest = ? AND used IS NULL",
                       (now, node_id, digest(token)))
        return row[0], row[1]

    def use_challenge(self, challenge: str) -> bool:
        """True the first time ``challenge`` is used; False after (a replayed proof)."""
        with self._connect() as db:
            try:
                db.execute("INSERT INTO used_challenges VALUES (?, ?)", (digest(challenge), time.time()))
            except sqlite3.IntegrityError:
                return False
        return True
