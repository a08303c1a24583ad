"""The hub's test fixtures work: the OIDC issuer (nonce and PKCE), serve_asgi, and the browser.

No hub here: the fixtures are checked on their own, with raw HTTP and a tiny inline Starlette app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hub_fixtures import screenshot, serve_asgi
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

REDIRECT_URI = "http://127.0.0.1:1/auth"


def _claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _authorize(issuer, sub: str, **params: str) -> httpx.Response:
    """Sign in as ``sub`` at the issuer the way its form does (a POST to the authorize URL)."""
    query = {"client_id": "hub", "response_type": "code", "scope": "openid email profile",
             "redirect_uri": REDIRECT_URI, "state": "st", **params}
    return httpx.post(f"{issuer.url}/oauth2/authorize", params=query, data={"sub": sub})


def test_issuer_serves_its_discovery_document_on_loopback(oidc_issuer):
    metadata = httpx.get(oidc_issuer.metadata_url).json()
    assert metadata["issuer"] == oidc_issuer.url
    assert oidc_issuer.url.startswith("http://127.0.0.1:")
    for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri", "end_session_endpoint"):
        assert metadata[endpoint].startswith(oidc_issuer.url + "/")


def test_issuer_signs_users_in_with_their_claims_nonce_and_pkce(oidc_issuer):
    oidc_issuer.set_user("alice", email="alice@lab.org", name="Alice")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    pkce = {"code_challenge": challenge, "code_challenge_method": "S256"}

    # Without PKCE, or without a nonce, the issuer refuses.
    refused = httpx.get(f"{oidc_issuer.url}/oauth2/authorize", params={
        "client_id": "hub", "response_type": "code", "scope": "openid", "redirect_uri": REDIRECT_URI,
        "state": "st", "nonce": "n"})
    assert refused.status_code == 400 and "PKCE" in refused.text
    no_nonce = _authorize(oidc_issuer, "alice", **pkce)
    assert "error=invalid_request" in no_nonce.headers["location"]

    def code() -> str:
        response = _authorize(oidc_issuer, "alice", nonce="n-1", **pkce)
        assert response.status_code == 302 and response.headers["location"].startswith(REDIRECT_URI)
        return parse_qs(urlsplit(response.headers["location"]).query)["code"][0]

    token = {"grant_type": "authorization_code", "redirect_uri": REDIRECT_URI}
    wrong = httpx.post(f"{oidc_issuer.url}/oauth2/token", auth=("hub", "secret"),
                       data={**token, "code": code(), "code_verifier": "not-the-verifier"})
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"

    issued = httpx.post(f"{oidc_issuer.url}/oauth2/token", auth=("hub", "secret"),
                        data={**token, "code": code(), "code_verifier": verifier})
    assert issued.status_code == 200, issued.text
    claims = _claims(issued.json()["id_token"])
    assert claims["iss"] == oidc_issuer.url and claims["aud"] in ("hub", ["hub"])
    assert (claims["sub"], claims["email"], claims["name"], claims["nonce"]) == (
        "alice", "alice@lab.org", "Alice", "n-1")
    assert oidc_issuer.last("token")["code_verifier"] == verifier


def test_dead_issuer_refuses_connections(dead_issuer_url):
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{dead_issuer_url}/.well-known/openid-configuration", timeout=2)


async def _hello(request):
    return HTMLResponse("<h1 id=greeting>hello from the hub harness</h1>")


def test_serve_asgi_serves_an_app_and_stops():
    app = Starlette(routes=[Route("/", _hello)])
    with serve_asgi(app) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        assert "hello from the hub harness" in httpx.get(base_url + "/").text
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url + "/", timeout=2)


def test_browser_loads_a_served_page_and_takes_a_screenshot(page, tmp_path: Path):
    app = Starlette(routes=[Route("/", _hello)])
    with serve_asgi(app) as base_url:
        page.goto(base_url + "/")
        assert page.locator("#greeting").inner_text() == "hello from the hub harness"
        shot = screenshot(page, tmp_path / "shots" / "hello.png")
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Nothing but loopback: a request elsewhere is aborted, not sent.
    failed = page.evaluate("fetch('https://example.org/').then(() => 'sent', () => 'aborted')")
    assert failed == "aborted"
