"""Sign-in through an OpenID Connect issuer: the authorization code flow with PKCE, state and nonce.

authlib's OAuth 2 client (over httpx2, which authlib 1.9 prefers to httpx) makes the authorization
URL (with the S256 code challenge) and exchanges the code; joserfc (authlib's JOSE library)
verifies the ID token against the issuer's keys and checks its issuer, audience, expiry and nonce.

State, nonce and code verifier are kept **server-side** (the hub's database, keyed by the state,
good once for ten minutes), not in the session cookie: authlib's Starlette integration keeps them
in the session cookie, where a rewritten cookie fails with "mismatching state" and abandoned
sign-ins grow it past 4 KB (authlib issues 376, 334, 441, 622). The browser carries only the
state, in the redirect.

An issuer that cannot be reached raises :class:`IssuerUnavailable` before anything is written.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

import httpx2
from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..errors import UserError
from .db import HubDB

TIMEOUT_S = 10.0
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")


class IssuerUnavailable(UserError):
    """The identity provider could not be reached or answered nonsense (one line)."""


class SignInFailed(UserError):
    """The sign-in came back unusable: unknown or used state, a refused code, a bad ID token."""


@dataclass(frozen=True)
class Identity:
    """Who signed in, as the issuer says."""

    issuer: str
    subject: str
    email: str
    name: str


class OIDC:
    """The hub's client at one issuer."""

    def __init__(self, issuer: str, client_id: str, client_secret: str | None) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            if self._metadata is None:
                meta = self._get_json(f"{self.issuer}/.well-known/openid-configuration")
                missing = [k for k in ("authorization_endpoint", "token_endpoint", "jwks_uri") if not meta.get(k)]
                if missing:
                    raise IssuerUnavailable(f"the identity provider {self.issuer} has no {', '.join(missing)}")
                self._metadata = meta
            return self._metadata

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = httpx2.get(url, timeout=TIMEOUT_S)
            response.raise_for_status()
            data = response.json()
        except (httpx2.HTTPError, ValueError) as exc:
            raise IssuerUnavailable(f"the identity provider {self.issuer} cannot be reached ({type(exc).__name__}: "
                                    f"{str(exc)[:120]}); try again later") from None
        if not isinstance(data, dict):
            raise IssuerUnavailable(f"the identity provider {self.issuer} answered {url} with no JSON object")
        return data

    def _client(self, redirect_uri: str) -> OAuth2Client:
        return OAuth2Client(self.client_id, self.client_secret, scope="openid email profile",
                            redirect_uri=redirect_uri, code_challenge_method="S256", timeout=TIMEOUT_S,
                            token_endpoint_auth_method="client_secret_post" if self.client_secret else "none")

    def begin(self, db: HubDB, redirect_uri: str, next_url: str) -> str:
        """The issuer's authorization URL for a new sign-in (its state, nonce and verifier kept in ``db``)."""
        meta = self.metadata()
        state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=state, nonce=nonce,
                                                     code_verifier=verifier)
        db.add_login(state, nonce, verifier, next_url)
        return url

    def finish(self, db: HubDB, redirect_uri: str, state: str, code: str) -> tuple[Identity, str]:
        """The identity of a sign-in that came back with ``state`` and ``code``, and where it was going."""
        login = db.take_login(state)
        if login is None:
            raise SignInFailed("this sign-in is unknown, was used already, or took over ten minutes; sign in again")
        meta = self.metadata()
        try:
            with self._client(redirect_uri) as client:
                token = client.fetch_token(meta["token_endpoint"], code=code, code_verifier=login.verifier,
                                           grant_type="authorization_code")
        except httpx2.HTTPError as exc:
            raise IssuerUnavailable(f"the identity provider {self.issuer} cannot be reached ({type(exc).__name__}); "
                                    "try again later") from None
        except Exception as exc:  # noqa: BLE001 - authlib raises OAuthError subclasses and ValueError
            raise SignInFailed(f"the identity provider refused the sign-in ({str(exc)[:160]}); sign in again") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("the identity provider sent no ID token; is the client allowed the openid scope?")
        keys = KeySet.import_key_set(self._get_json(meta["jwks_uri"]))  # type: ignore[arg-type]
        try:
            claims = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS)).claims
            jwt.JWTClaimsRegistry(
                leeway=60, iss={"essential": True, "value": meta.get("issuer", self.issuer)},
                aud={"essential": True, "value": self.client_id}, nonce={"essential": True, "value": login.nonce},
                sub={"essential": True}, exp={"essential": True},
            ).validate(claims)
        except (JoseError, ValueError) as exc:
            raise SignInFailed(f"the ID token did not verify ({type(exc).__name__}: {str(exc)[:120]}); sign in again") from None
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise SignInFailed("the identity provider gave no e-mail address; the hub needs the email scope")
        if claims.get("email_verified") is False:
            raise SignInFailed(f"the identity provider has not verified {email}; verify it there, then sign in again")
        name = claims.get("name") if isinstance(claims.get("name"), str) else ""
        return Identity(str(claims.get("iss", self.issuer)), str(claims["sub"]), email, name or ""), login.next
