"""Pytest plugin (registered in conftest.py): an OpenID Connect issuer, an ASGI server and a browser.

For the hub's tests (a FastAPI app whose users sign in with OpenID Connect):

- ``oidc_issuer`` (session): oidc-provider-mock, served by werkzeug in a thread on a free loopback
  port (127.0.0.1, never ``localhost``). It has ``.url`` (the issuer; discovery is at
  ``{url}/.well-known/openid-configuration``), ``.metadata_url``, ``.set_user(sub, email=, name=)``
  (the claims the issuer puts in the ID token and userinfo for that subject), and ``.requests``
  (what clients sent to its authorize and token endpoints, newest last). It requires a nonce and,
  unlike the bare mock (which ignores PKCE), checks PKCE: an authorization request without an S256
  ``code_challenge`` is refused, and so is a token request whose ``code_verifier`` does not match.
  Any client id and secret are accepted, and any redirect URI.
- ``dead_issuer_url``: an issuer URL on a loopback port where nothing listens (an issuer that is down).
- ``serve_asgi(app)``: a context manager (a plain function) that serves an ASGI app with uvicorn in
  a thread on a free 127.0.0.1 port and yields its base URL (``http://127.0.0.1:PORT``, no slash).
- ``browser`` (session): headless Chromium (Debian's ``/usr/bin/chromium``) through Playwright's
  sync API; ``page``: a fresh context and page for one test, with every request not to 127.0.0.1
  aborted. ``screenshot(page, path)`` saves a PNG.

The mock's sign-in page (``/oauth2/authorize``) is a form: type the subject into
``input[name=sub]`` and press the ``Authorize`` button (``sign_in_at_issuer(page, sub)`` does both).
A subject never given to ``set_user`` signs in with the claims ``{"email": sub}``.

Chromium is not optional: a machine without it fails here, saying how to get it, rather than
skipping the browser tests and passing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

START_TIMEOUT = 20.0
CHROMIUM = "/usr/bin/chromium"
_NOT_LOOPBACK = re.compile(r"^(?!https?://127\.0\.0\.1[:/]|data:|about:)")


def pytest_configure(config: pytest.Config) -> None:
    # oidc-provider-mock 0.3.4 calls authlib's get_jwt_config, deprecated in authlib 1.9, for every
    # token it issues: its warning, not ours.
    config.addinivalue_line("filterwarnings", "ignore:get_jwt_config:DeprecationWarning")


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} at {url} did not answer within {START_TIMEOUT:g} s") from None
            time.sleep(0.02)


# --- the OpenID Connect issuer ----------------------------------------------------------------------


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class _PKCE:
    """WSGI middleware around the mock: records authorize and token requests and enforces PKCE S256.

    The mock issues codes without looking at ``code_challenge``; this remembers the challenge of
    each authorization request, reads the code from the redirect the mock answers with, and refuses
    (400 invalid_grant) a token request whose ``code_verifier`` does not hash to that challenge.
    """

    def __init__(self, app: Any, requests: list[dict[str, Any]]) -> None:
        self.app = app
        self.requests = requests
        self.challenges: dict[str, str] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/oauth2/authorize":
            query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            with self.lock:
                self.requests.append({"endpoint": "authorize", "method": environ["REQUEST_METHOD"], **query})
            if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
                return self._error(start_response, "invalid_request",
                                   "PKCE required: code_challenge with code_challenge_method=S256")

            def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                for name, value in headers:
                    if name.lower() == "location":
                        code = parse_qs(urlsplit(value).query).get("code")
                        if code:
                            with self.lock:
                                self.challenges[code[0]] = query["code_challenge"]
                return start_response(status, headers, *exc)

            return self.app(environ, start)
        if path == "/oauth2/token" and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            with self.lock:
                self.requests.append({"endpoint": "token", "method": "POST", **form})
                challenge = self.challenges.pop(form.get("code", ""), None)
            if form.get("grant_type") == "authorization_code" and (
                    challenge is None or _s256(form.get("code_verifier", "")) != challenge):
                return self._error(start_response, "invalid_grant", "PKCE: code_verifier does not match")
            environ["wsgi.input"] = io.BytesIO(body)
            return self.app(environ, start_response)
        return self.app(environ, start_response)

    @staticmethod
    def _error(start_response: Any, error: str, description: str) -> list[bytes]:
        body = json.dumps({"error": error, "error_description": description}).encode()
        start_response("400 Bad Request", [("Content-Type", "application/json"),
                                           ("Content-Length", str(len(body)))])
        return [body]


@dataclass
class OidcIssuer:
    """A running oidc-provider-mock: its URL, its users, and what clients asked of it."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metadata_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    def set_user(self, sub: str, *, email: str | None = None, name: str | None = None,
                 **claims: Any) -> None:
        """Define (or redefine) the claims the issuer gives ``sub`` when it signs in."""
        body = {**claims, **({"email": email} if email is not None else {}),
                **({"name": name} if name is not None else {})}
        response = httpx.put(f"{self.url}/users/{sub}", json=body, timeout=5.0)
        response.raise_for_status()

    def last(self, endpoint: str) -> dict[str, Any]:
        """The parameters of the newest request to ``endpoint`` ("authorize" or "token")."""
        return next(r for r in reversed(self.requests) if r["endpoint"] == endpoint)


@pytest.fixture(scope="session")
def oidc_issuer() -> Iterator[OidcIssuer]:
    """oidc-provider-mock on 127.0.0.1 in a thread, for the whole session (nonce and PKCE required)."""
    import authlib.deprecate  # noqa: F401  (first: it installs an "always" filter for its warnings)
    import werkzeug.serving

    with warnings.catch_warnings():  # the mock imports authlib.jose, deprecated in authlib 1.9
        warnings.filterwarnings("ignore", message="authlib.jose module is deprecated")
        import oidc_provider_mock

    requests: list[dict[str, Any]] = []
    app = _PKCE(oidc_provider_mock.app(require_nonce=True), requests)
    server = werkzeug.serving.make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="oidc-issuer", daemon=True)
    thread.start()
    issuer = OidcIssuer(url=f"http://127.0.0.1:{server.server_port}", requests=requests)
    try:
        _wait_until_answers(issuer.metadata_url, "the OIDC issuer")
        yield issuer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def dead_issuer_url() -> str:
    """An issuer URL on a loopback port where nothing listens: an issuer that is down."""
    return f"http://127.0.0.1:{free_port()}"


# --- an ASGI app served by uvicorn ------------------------------------------------------------------


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="asgi-server",
                              daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited at start (see its log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT:g} s")
            time.sleep(0.01)
        _wait_until_answers(base_url + "/", "the ASGI app")
        yield base_url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 10 s")


# --- a browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium (``/usr/bin/chromium``) through Playwright's sync API, for the session."""
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if executable is None:
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and a page in it, closed after the test.

    Requests anywhere but 127.0.0.1 are aborted (the mock's pages link a stylesheet on a CDN): the
    tests never depend on the network, and never wait for it.
    """
    context = browser.new_context()
    context.set_default_timeout(10_000)
    context.route(_NOT_LOOPBACK, lambda route: route.abort())
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def sign_in_at_issuer(page: Any, sub: str) -> None:
    """On the mock issuer's sign-in page, sign in as ``sub`` (then the issuer redirects back)."""
    page.locator("input[name=sub]").fill(sub)
    page.get_by_role("button", name="Authorize").click()


def screenshot(page: Any, path: str | Path, *, full_page: bool = True) -> Path:
    """Save a PNG of ``page`` at ``path`` (its directory made if missing); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path
