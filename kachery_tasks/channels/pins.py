"""Join strings and pins: how a node learns a channel's owner key once and holds on to it.

The owner (``kachery channel create``) prints a **join string**. It carries the channel's name, the
owner's public key, and the bucket and transport URIs, and nothing secret: it grants nothing by
itself (the owner still has to admit the node), so it may travel by e-mail or chat. Its checksum
catches a string cut short in copying.

``kachery channel join`` **pins** what the string says in ``<home>/channels/<name>.json``, together
with the newest config this node has accepted (so a rollback is refused even after a restart). The
pin is the trust anchor: a config is believed only if the pinned key signed it. A second join of
the same name with a different owner key is refused: that is how a swapped join string shows up.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fs import make_dirs, write_atomic
from ..identity import is_public_key_hex
from .config import ChannelConfig, ChannelConfigError, check_name

JOIN_PREFIX = "kachery-join-1."


@dataclass(frozen=True)
class JoinString:
    """What a node needs to find a channel and to know who may sign its config."""

    channel: str
    owner_key: str
    bucket: str
    transport: str

    def encode(self) -> str:
        body = json.dumps({"channel": self.channel, "owner_key": self.owner_key, "bucket": self.bucket,
                           "transport": self.transport}, sort_keys=True, separators=(",", ":")).encode()
        text = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{JOIN_PREFIX}{text}.{_checksum(text)}"

    @classmethod
    def parse(cls, text: str) -> JoinString:
        text = text.strip()
        hint = "copy the whole line that `kachery channel create` printed"
        if not text.startswith(JOIN_PREFIX):
            raise UserError(f"{_short(text)} is not a join string (they start with {JOIN_PREFIX!r}); {hint}")
        payload, _, checksum = text[len(JOIN_PREFIX):].rpartition(".")
        if not payload or checksum != _checksum(payload):
            raise UserError(f"the join string is damaged (its checksum does not match); {hint}")
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            join = cls(**{k: data[k] for k in ("channel", "owner_key", "bucket", "transport")})
        except (ValueError, KeyError, TypeError):
            raise UserError(f"the join string does not hold a channel's name, owner, bucket and transport; {hint}") from None
        check_name(join.channel, "channel name")
        if not is_public_key_hex(join.owner_key):
            raise UserError(f"the join string's owner key {join.owner_key!r} is not a node id; {hint}")
        return join


@dataclass(frozen=True)
class Pin:
    """A joined channel as this node knows it: the join string's facts and the newest accepted config."""

    join: JoinString
    config: ChannelConfig | None

    @property
    def name(self) -> str:
        return self.join.channel


class Pins:
    """The channels a home has joined (``<home>/channels/<name>.json``)."""

    def __init__(self, home: Path) -> None:
        self.root = Path(home) / "channels"

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name, 'channel name')}.json"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def get(self, name: str) -> Pin:
        path = self.path(name)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            joined = ", ".join(self.names()) or "none"
            raise UserError(f"this node has not joined a channel named {name!r} (joined: {joined}); "
                            "join it with `kachery channel join JOIN_STRING`") from None
        except ValueError:
            raise UserError(f"{path} is not valid JSON; join the channel again to rewrite it") from None
        try:
            join = JoinString(**raw["join"])
            config = None if raw.get("config") is None else ChannelConfig.from_bytes(
                json.dumps(raw["config"]).encode(), str(path))
        except (KeyError, TypeError, ChannelConfigError) as exc:
            raise UserError(f"{path} is damaged ({exc}); join the channel again to rewrite it") from None
        return Pin(join, config)

    def pin(self, join: JoinString) -> Pin:
        """Record ``join`` (idempotent); refuses a different owner key for a name already joined."""
        with self._locked():
            if self.path(join.channel).exists():
                have = self.get(join.channel)
                if have.join.owner_key != join.owner_key:
                    raise UserError(
                        f"this node already joined a channel {join.channel!r} owned by {have.join.owner_key[:12]}…; "
                        f"this join string names owner {join.owner_key[:12]}…. If that is intended, leave the "
                        f"old one first (`kachery channel leave {join.channel}`)")
                if have.join == join:
                    return have
                pin = Pin(join, have.config)  # the owner moved the bucket or transport: keep what was seen
            else:
                pin = Pin(join, None)
            self._write(pin)
            return pin

    def remember(self, name: str, config: ChannelConfig) -> Pin:
        """Keep ``config`` as the newest seen, unless another process already kept a newer one."""
        with self._locked():
            pin = self.get(name)
            if pin.config is not None and pin.config.version >= config.version:
                return pin
            pin = Pin(pin.join, config)
            self._write(pin)
            return pin

    def remove(self, name: str) -> None:
        with self._locked():
            self.get(name)  # a one-line error for a name not joined
            self.path(name).unlink()

    def _write(self, pin: Pin) -> None:
        data = {"join": pin.join.__dict__, "config": None if pin.config is None else pin.config.to_json()}
        write_atomic(self.path(pin.name), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of pins at a time across processes, so a slower refresh never writes an older config back."""
        make_dirs(self.root)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")
