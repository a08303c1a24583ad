"""``kachery hub``: serve the web hub, and sign the command line in to one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from .. import config
from ..errors import UserError
from ..fs import write_atomic
from ..jsonhttp import call_json


@click.group()
def hub() -> None:
    """The web hub where channel owners admit nodes and grant permissions (docs/hub.md)."""


@hub.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Where the hub keeps its database and channel keys [default: <home>/hub].")
@click.option("--issuer", default=None, metavar="URL", help="OpenID Connect issuer (https://accounts.google.com).")
@click.option("--client-id", default=None, help="The hub's client id at the issuer.")
@click.option("--client-secret-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A file holding the client secret (or set KACHERY_HUB_CLIENT_SECRET).")
@click.option("--public-url", default=None, metavar="URL",
              help="Where browsers reach the hub (for the sign-in redirect) [default: http://HOST:PORT].")
@click.option("--file-buckets", "file_buckets", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="A directory under which users may make file:// buckets (repeat; default: any on loopback, "
                   "none otherwise).")
@click.option("--ably-key-env", default=None, metavar="NAME",
              help="An environment variable holding an Ably API key: the hub hands its channels' nodes tokens.")
def serve_cmd(host: str, port: int, root: str | None, issuer: str | None, client_id: str | None,
              client_secret_file: str | None, public_url: str | None, file_buckets: tuple[str, ...],
              ably_key_env: str | None) -> None:
    """Serve the hub until interrupted. Without --issuer, only the dev sign-in, and only on loopback."""
    try:
        import uvicorn

        from ..hub.app import create_app
    except ImportError as exc:
        raise UserError(f"the hub needs its extra ({exc.name} is missing): pip install 'kachery-tasks[hub]'") from None
    if bool(issuer) != bool(client_id):
        raise UserError("give --issuer and --client-id together (the hub's registration at the identity provider)")
    secret = os.environ.get("KACHERY_HUB_CLIENT_SECRET")
    if client_secret_file:
        secret = Path(client_secret_file).read_text().strip()
    ably_key = os.environ.get(ably_key_env) if ably_key_env else None
    if ably_key_env and not ably_key:
        raise UserError(f"--ably-key-env {ably_key_env}: that variable is not set (it holds the Ably API key)")
    hub_root = Path(root) if root else config.home() / "hub"
    app = create_app(hub_root, issuer=issuer, client_id=client_id, client_secret=secret,
                     public_url=public_url or f"http://{host}:{port}", bound_host=host,
                     file_bucket_roots=tuple(Path(d) for d in file_buckets), ably_key=ably_key)
    click.echo(f"kachery hub on http://{host}:{port} (state in {hub_root})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _credentials_path() -> Path:
    return config.home() / "hub" / "credentials.json"


def credentials() -> dict[str, str]:
    """The hub this home signed in to: ``{"url", "token"}`` (one line to fix it if none)."""
    try:
        data = json.loads(_credentials_path().read_text())
    except (FileNotFoundError, ValueError):
        raise UserError("the command line is not signed in to a hub: `kachery hub login URL --token TOKEN` "
                        "(make the token on the hub's page /tokens)") from None
    return data


def call_api(method: str, path: str, body: dict | None = None, *, url: str | None = None) -> Any:
    """Call the signed-in hub's API (at ``url`` if given) with this home's token."""
    creds = credentials()
    return call_json(f"{(url or creds['url']).rstrip('/')}{path}", method, body, token=creds["token"])


@hub.command("login")
@click.argument("url")
@click.option("--token", required=True, help="An API token made on the hub's page /tokens.")
def login_cmd(url: str, token: str) -> None:
    """Sign the command line in to the hub at URL with an API token (kept in <home>/hub, mode 0600)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"{url!r} is not a hub URL (http:// or https://)")
    path = _credentials_path()
    previous = path.read_bytes() if path.exists() else None
    write_atomic(path, json.dumps({"url": url, "token": token.strip()}).encode(), mode=0o600, share=False)
    try:
        me = call_api("GET", "/api/me")
    except UserError:
        if previous is None:
            path.unlink()
        else:
            write_atomic(path, previous, mode=0o600, share=False)
        raise
    click.echo(f"signed in to {url} as {me['email']}")  # type: ignore[index]
