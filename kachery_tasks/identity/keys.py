"""Ed25519 key pairs: the identity of nodes and feed writers.

A public key in hex is the id of a node (and of a feed). Private keys live in PEM files of mode
0600, written atomically, so a crash never leaves half a key and no other user can read one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import UserError
from ..fs import write_atomic

_HEX = set("0123456789abcdef")


def is_public_key_hex(text: str) -> bool:
    """True if ``text`` is 64 lowercase hex characters (an Ed25519 public key)."""
    return len(text) == 64 and set(text) <= _HEX


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 private key with its public half; signs bytes."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @cached_property
    def public_hex(self) -> str:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()

    def sign(self, message: bytes) -> str:
        """Signature of ``message`` as 128 hex characters."""
        return self.private_key.sign(message).hex()

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, path: Path) -> None:
        """Write the private key to ``path`` (mode 0600), atomically; never overwrites a key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Never group-readable, even in a shared home (share=False); overwrite=False links the temp
        # file into place, which fails if the name exists: two processes racing to create a key keep the first.
        write_atomic(path, self.to_pem(), mode=0o600, share=False, overwrite=False)

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"no key file at {path}; create one with `kachery node init`") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise UserError(f"{path} is not a readable PEM private key ({exc}); restore it from a backup") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise UserError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> KeyPair:
        """The key at ``path``, generated on first use; safe when processes race."""
        if not path.exists():
            try:
                cls.generate().save(path)
            except FileExistsError:
                pass  # another process won the race: use its key
        return cls.load(path)


def verify(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """True if ``signature_hex`` is a valid signature of ``message`` by ``public_hex``."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        public.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True
