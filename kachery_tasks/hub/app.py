"""The hub's web app: server-rendered pages for people, a JSON API for the command line.

Routes that change anything are POSTs: a page (a GET) never changes state. Forms carry the
session's CSRF token; the API takes a bearer token (``kachery hub login``) or the session cookie
with the CSRF token in an ``X-CSRF-Token`` header. A channel the signed-in user neither owns nor
belongs to answers 404, as a channel that does not exist does: names are not leaked. A member may
look at its channel; only owners change it (403 for a member).

Every page is rendered by Jinja2 with autoescaping, so a label or an owner's address holding HTML
is shown as text.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlparse

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from ..channels.config import PERMISSIONS, REQUESTER_PERMISSIONS, check_node_id
from ..channels.session import shared_transport, topic_of
from ..errors import KacheryError, UserError
from ..identity.proofs import read_proof, timed_challenge_problem
from .ably_tokens import CHALLENGE_WINDOW_S, token_request
from .ably_tokens import PURPOSE as ABLY_PURPOSE
from .channels import HubChannels
from .db import Channel, HubDB, Session, User
from .join import encode_token
from .oidc import OIDC, IssuerUnavailable
from .security import (
    check_challenge,
    dev_sign_in_allowed,
    is_loopback,
    load_secret,
    make_challenge,
    same_token,
)

log = logging.getLogger("kachery_tasks.hub")

COOKIE = "kt_session"
HERE = Path(__file__).parent
JOIN_TOKEN_HOURS = 24.0


@dataclass
class Hub:
    """What the routes share: the database, the channels, the issuer, the secret, how it is served."""

    root: Path
    db: HubDB
    channels: HubChannels
    oidc: OIDC | None
    secret: bytes
    public_url: str
    bound_host: str
    file_bucket_roots: tuple[Path, ...] = ()
    ably_key: str | None = None

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")


class HTTPProblem(Exception):
    """A request refused with ``status`` and a one-line ``message`` (a page, or JSON for the API)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SignInNeeded(Exception):
    pass


def create_app(root: Path, *, issuer: str | None = None, client_id: str | None = None,
               client_secret: str | None = None, public_url: str = "http://127.0.0.1:8080",
               bound_host: str = "127.0.0.1", file_bucket_roots: tuple[Path, ...] = (),
               ably_key: str | None = None) -> FastAPI:
    """The hub whose state lives in ``root``. ``issuer``/``client_id``: the OpenID Connect provider
    (without one, only the dev sign-in, on loopback). ``public_url``: where browsers reach the hub
    (the redirect URI is ``<public_url>/auth/callback``). ``file_bucket_roots``: directories under
    which users may put ``file://`` buckets (the hub writes there as itself); with none, a hub bound
    to loopback allows any, and any other allows none. ``ably_key``: an Ably API key from which the
    hub hands its channels' nodes tokens (hub/ably_tokens.py)."""
    root = Path(root)
    db = HubDB(root / "hub.db")
    oidc = OIDC(issuer, client_id or "", client_secret) if issuer and client_id else None
    hub = Hub(root, db, HubChannels(root, db), oidc, load_secret(root), public_url.rstrip("/"), bound_host,
              tuple(Path(r).resolve() for r in file_bucket_roots), ably_key)
    app = FastAPI(title="kachery hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["PERMISSIONS"] = PERMISSIONS
    templates.env.filters["utc"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = _session(request)
        context.setdefault("user", session.user if session else None)
        context.setdefault("csrf", session.csrf if session else "")
        context.setdefault("dev_sign_in", dev_sign_in_allowed(hub.bound_host, _client(request)))
        context.setdefault("has_issuer", hub.oidc is not None)
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.exception_handler(HTTPProblem)
    def problem(request: Request, exc: HTTPProblem) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        return render(request, "error.html", exc.status, message=exc.message)

    @app.exception_handler(SignInNeeded)
    def sign_in_needed(request: Request, exc: SignInNeeded) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "sign in first: `kachery hub login URL`"}, status_code=401)
        return RedirectResponse(f"/signin?next={quote(request.url.path)}", status_code=303)

    # -- who is asking -----------------------------------------------------------------------------
    def _session(request: Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        return db.session(sid) if sid else None

    def page_user(request: Request) -> Session:
        session = _session(request)
        if session is None:
            raise SignInNeeded()
        return session

    def form_user(request: Request, csrf: str) -> User:
        session = page_user(request)
        if not same_token(csrf, session.csrf):
            raise HTTPProblem(403, "this form was not sent by the hub's own page (its CSRF token is missing or "
                                   "stale); reload the page and try again")
        return session.user

    def api_user(request: Request, *, changing: bool) -> User:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            user = db.api_user(auth[7:].strip())
            if user is None:
                raise HTTPProblem(401, "the API token is unknown or expired; make a new one with `kachery hub login`")
            return user
        session = _session(request)
        if session is None:
            raise SignInNeeded()
        if changing and not same_token(request.headers.get("x-csrf-token"), session.csrf):
            raise HTTPProblem(403, "a change through the API with the session cookie needs the X-CSRF-Token header")
        return session.user

    def channel_for(channel_id: str, user: User, *, owner: bool) -> tuple[Channel, str]:
        channel = db.channel(channel_id)
        role = hub.channels.role(channel, user) if channel is not None else None
        if channel is None or role is None:
            raise HTTPProblem(404, "no such channel")
        if owner and role != "owner":
            raise HTTPProblem(403, "only the channel's owners change it")
        return channel, role

    def check_bucket(uri: str) -> None:
        """A ``file://`` bucket is a directory the hub writes as itself: only where its admin allows."""
        parsed = urlparse(uri.strip())
        if parsed.scheme != "file":
            return
        if not hub.file_bucket_roots:
            if is_loopback(hub.bound_host):
                return
            raise UserError("this hub makes no channels on file:// buckets (its admin allows directories with "
                            "`kachery hub serve --file-buckets DIR`); use a gs:// bucket")
        path = Path(unquote(parsed.path)).resolve()
        if not any(path == r or r in path.parents for r in hub.file_bucket_roots):
            roots = ", ".join(str(r) for r in hub.file_bucket_roots)
            raise UserError(f"this hub makes file:// buckets only under {roots}; choose a directory there")

    # -- sign-in -----------------------------------------------------------------------------------
    @app.get("/signin", response_class=HTMLResponse)
    def signin(request: Request, next: str = "/") -> Response:
        return render(request, "signin.html", next=_local(next))

    @app.post("/login")
    def login(request: Request, next: Annotated[str, Form()] = "/") -> Response:
        if hub.oidc is None:
            raise HTTPProblem(400, "this hub has no identity provider configured (kachery hub serve --issuer URL "
                                   "--client-id ID)")
        try:
            url = hub.oidc.begin(db, f"{hub.public_url}/auth/callback", _local(next))
        except IssuerUnavailable as exc:
            raise HTTPProblem(503, str(exc)) from None
        return RedirectResponse(url, status_code=303)

    @app.get("/auth/callback")
    def callback(request: Request, state: str = "", code: str = "", error: str = "") -> Response:
        if hub.oidc is None:
            raise HTTPProblem(404, "no identity provider is configured")
        if error:
            db.take_login(state)
            raise HTTPProblem(400, f"the identity provider did not sign you in ({error[:100]}); sign in again")
        try:
            identity, next_url = hub.oidc.finish(db, f"{hub.public_url}/auth/callback", state, code)
        except IssuerUnavailable as exc:
            raise HTTPProblem(503, str(exc)) from None
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        user = db.user_for(identity.issuer, identity.subject, identity.email, identity.name)
        return _signed_in(user, next_url)

    @app.post("/dev-login")
    def dev_login(request: Request, email: Annotated[str, Form()], name: Annotated[str, Form()] = "",
                  next: Annotated[str, Form()] = "/") -> Response:
        if not dev_sign_in_allowed(hub.bound_host, _client(request)):
            raise HTTPProblem(403, "the dev sign-in works only on a hub bound to loopback (127.0.0.1), from loopback")
        email = email.strip()
        if "@" not in email or any(c.isspace() for c in email):
            raise HTTPProblem(400, f"{email!r} is not an e-mail address")
        user = db.user_for("dev", email.lower(), email, name.strip())
        return _signed_in(user, _local(next))

    def _signed_in(user: User, next_url: str) -> Response:
        response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(COOKIE, db.new_session(user), httponly=True, samesite="lax", secure=hub.secure_cookies,
                            max_age=7 * 24 * 3600, path="/")
        return response

    @app.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        form_user(request, csrf)
        db.end_session(request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages -------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        session = _session(request)
        if session is None:
            return render(request, "signin.html", next="/")
        return render(request, "index.html", channels=hub.channels.visible(session.user))

    @app.get("/channels/new", response_class=HTMLResponse)
    def new_channel(request: Request) -> Response:
        page_user(request)
        return render(request, "new_channel.html", form={})

    @app.post("/channels")
    def create_channel(request: Request, name: Annotated[str, Form()], bucket: Annotated[str, Form()],
                       transport: Annotated[str, Form()], csrf: Annotated[str, Form()] = "") -> Response:
        user = form_user(request, csrf)
        try:
            check_bucket(bucket)
            channel = hub.channels.create(user, name.strip(), bucket, transport)
        except UserError as exc:
            return render(request, "new_channel.html", 400, error=str(exc),
                          form={"name": name, "bucket": bucket, "transport": transport})
        return RedirectResponse(f"/c/{channel.id}", status_code=303)

    @app.get("/c/{channel_id}", response_class=HTMLResponse)
    def channel_page(request: Request, channel_id: str) -> Response:
        session = page_user(request)
        channel, role = channel_for(channel_id, session.user, owner=False)
        return _channel_page(request, channel, role, session)

    def _channel_page(request: Request, channel: Channel, role: str, session: Session, status: int = 200,
                      **extra: Any) -> Response:
        try:
            cfg = hub.channels.config(channel, fresh=True)
        except (KacheryError, OSError) as exc:
            raise HTTPProblem(502, f"the channel's bucket cannot be read: {exc}") from None
        challenge = make_challenge(hub.secret, channel.id, session.user.id) if role == "owner" else ""
        return render(request, "channel.html", status, channel=channel, role=role, config=cfg,
                      owners=db.owners(channel.id), challenge=challenge, channel_key=cfg.owner_key,
                      join_string=hub.channels.join_string(channel), requester=REQUESTER_PERMISSIONS, **extra)

    def _change(request: Request, channel_id: str, csrf: str, act: Any) -> Response:
        user = form_user(request, csrf)
        channel, role = channel_for(channel_id, user, owner=True)
        try:
            act(channel, user)
        except UserError as exc:
            session = page_user(request)
            return _channel_page(request, channel, role, session, 400, error=str(exc))
        return RedirectResponse(f"/c/{channel.id}", status_code=303)

    @app.post("/c/{channel_id}/admit")
    def admit(request: Request, channel_id: str, proof: Annotated[str, Form()],
              perm: Annotated[list[str] | None, Form()] = None, csrf: Annotated[str, Form()] = "") -> Response:
        def act(channel: Channel, user: User) -> None:
            node = read_proof(proof)
            why = check_challenge(hub.secret, node.challenge, channel.id, user.id)
            if why is not None:
                raise UserError(why)
            if not db.use_challenge(node.challenge):
                raise UserError("this proof was used already (a replay); reload the page and prove again")
            if not node.owner:
                raise UserError("the node has no owner e-mail; run `kachery node init --owner EMAIL` on it, then prove again")
            # the form's boxes are what the node gets: none ticked is no permissions (groups may give some)
            hub.channels.admit(channel, user, node.node_id, node.owner, node.label, _perms(perm) or [])
        return _change(request, channel_id, csrf, act)

    @app.post("/c/{channel_id}/nodes/{node_id}/permissions")
    def permissions(request: Request, channel_id: str, node_id: str,
                    perm: Annotated[list[str] | None, Form()] = None, shown: Annotated[list[str] | None, Form()] = None,
                    csrf: Annotated[str, Form()] = "") -> Response:
        def act(channel: Channel, user: User) -> None:
            ticked, before = set(_perms(perm) or ()), set(_perms(shown) or ())
            hub.channels.change_permissions(channel, user, check_node_id(node_id), ticked - before, before - ticked)
        return _change(request, channel_id, csrf, act)

    @app.post("/c/{channel_id}/nodes/{node_id}/revoke")
    def revoke(request: Request, channel_id: str, node_id: str, csrf: Annotated[str, Form()] = "") -> Response:
        return _change(request, channel_id, csrf,
                       lambda channel, user: hub.channels.revoke(channel, user, check_node_id(node_id)))

    @app.post("/c/{channel_id}/groups")
    def group(request: Request, channel_id: str, group: Annotated[str, Form()],
              perm: Annotated[list[str] | None, Form()] = None, shown: Annotated[list[str] | None, Form()] = None,
              csrf: Annotated[str, Form()] = "") -> Response:
        def act(channel: Channel, user: User) -> None:
            ticked, before = set(_perms(perm) or ()), set(_perms(shown) or ())
            hub.channels.set_group_permissions(channel, user, group.strip(), ticked - before, before - ticked)
        return _change(request, channel_id, csrf, act)

    @app.post("/c/{channel_id}/groups/{group}/members")
    def group_member(request: Request, channel_id: str, group: str, node_id: Annotated[str, Form()],
                     action: Annotated[str, Form()] = "add", csrf: Annotated[str, Form()] = "") -> Response:
        return _change(request, channel_id, csrf, lambda channel, user: hub.channels.set_group(
            channel, user, group, check_node_id(node_id.strip()), action != "remove"))

    @app.post("/c/{channel_id}/owners")
    def add_owner(request: Request, channel_id: str, email: Annotated[str, Form()],
                  csrf: Annotated[str, Form()] = "") -> Response:
        def act(channel: Channel, user: User) -> None:
            if db.add_owner(channel.id, email.strip()) is None:
                raise UserError(f"nobody has signed in to this hub as {email.strip()} yet; they sign in once first")
        return _change(request, channel_id, csrf, act)

    @app.post("/c/{channel_id}/tokens", response_class=HTMLResponse)
    def join_token(request: Request, channel_id: str, perm: Annotated[list[str] | None, Form()] = None,
                   hours: Annotated[float, Form()] = JOIN_TOKEN_HOURS, csrf: Annotated[str, Form()] = "") -> Response:
        user = form_user(request, csrf)
        channel, _ = channel_for(channel_id, user, owner=True)
        if not 0 < hours <= 24 * 30:
            raise HTTPProblem(400, "a join token lasts between a minute and 30 days (hours: 0.02 to 720)")
        perms = _perms(perm) or list(REQUESTER_PERMISSIONS)
        secret = db.add_join_token(channel.id, ",".join(perms), user, hours * 3600)
        return render(request, "token.html", channel=channel, token=encode_token(hub.public_url, secret),
                      permissions=perms, hours=hours)

    @app.get("/c/{channel_id}/audit", response_class=HTMLResponse)
    def audit(request: Request, channel_id: str) -> Response:
        session = page_user(request)
        channel, role = channel_for(channel_id, session.user, owner=False)
        return render(request, "audit.html", channel=channel, role=role, entries=hub.channels.audit_log(channel),
                      feed=hub.channels.audit_feed_uri(channel))

    @app.get("/c/{channel_id}/nodes/{node_id}", response_class=HTMLResponse)
    def node_page(request: Request, channel_id: str, node_id: str) -> Response:
        session = page_user(request)
        channel, role = channel_for(channel_id, session.user, owner=False)
        cfg = hub.channels.config(channel)
        member = cfg.members.get(node_id)
        if member is None:
            raise HTTPProblem(404, "no such node in this channel")
        return render(request, "node.html", channel=channel, role=role, node_id=node_id, member=member,
                      permissions=sorted(cfg.permissions_of(node_id)), presence=_presence(channel, node_id))

    @app.get("/tokens", response_class=HTMLResponse)
    def tokens_page(request: Request) -> Response:
        page_user(request)
        return render(request, "tokens.html", token=None)

    @app.post("/tokens", response_class=HTMLResponse)
    def new_api_token(request: Request, label: Annotated[str, Form()] = "command line",
                      csrf: Annotated[str, Form()] = "") -> Response:
        user = form_user(request, csrf)
        return render(request, "tokens.html", token=db.new_api_token(user, label.strip()[:100] or "command line"))

    # -- the API -----------------------------------------------------------------------------------
    @app.get("/api/me")
    def api_me(request: Request) -> dict[str, Any]:
        user = api_user(request, changing=False)
        return {"email": user.email, "name": user.name}

    @app.get("/api/channels")
    def api_channels(request: Request) -> list[dict[str, Any]]:
        user = api_user(request, changing=False)
        return [{"id": c.id, "name": c.name, "role": role} for c, role in hub.channels.visible(user)]

    @app.post("/api/channels")
    def api_create(request: Request, body: dict[str, str]) -> dict[str, Any]:
        user = api_user(request, changing=True)
        try:
            check_bucket(str(body.get("bucket", "")))
            channel = hub.channels.create(user, str(body.get("name", "")), str(body.get("bucket", "")),
                                          str(body.get("transport", "")))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        return {"id": channel.id, "name": channel.name, "join": hub.channels.join_string(channel)}

    @app.get("/api/channels/{channel_id}")
    def api_channel(request: Request, channel_id: str) -> dict[str, Any]:
        user = api_user(request, changing=False)
        channel, role = channel_for(channel_id, user, owner=False)
        return {"id": channel.id, "name": channel.name, "role": role, "config": hub.channels.config(channel).to_json()}

    @app.post("/api/channels/{channel_id}/grant")
    def api_grant(request: Request, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
        user = api_user(request, changing=True)
        channel, _ = channel_for(channel_id, user, owner=True)
        target, perms = str(body.get("target", "")), body.get("permissions")
        try:
            if target.startswith("@"):
                cfg = hub.channels.set_group_permissions(channel, user, target[1:], set(_perms(perms) or ()), set())
            elif target in hub.channels.config(channel, fresh=True).members:
                cfg = hub.channels.change_permissions(channel, user, check_node_id(target), set(_perms(perms) or ()), set())
            else:
                cfg = hub.channels.admit(channel, user, check_node_id(target), str(body.get("owner", "")),
                                         str(body.get("label", "")), _perms(perms))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        return {"version": cfg.version}

    @app.post("/api/channels/{channel_id}/revoke")
    def api_revoke(request: Request, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
        user = api_user(request, changing=True)
        channel, _ = channel_for(channel_id, user, owner=True)
        target, perms = str(body.get("target", "")), body.get("permissions")
        try:
            if perms:
                cfg = hub.channels.change_permissions(channel, user, check_node_id(target), set(), set(_perms(perms) or ()))
            else:
                cfg = hub.channels.revoke(channel, user, check_node_id(target))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        return {"version": cfg.version}

    @app.post("/api/ably-token")
    def api_ably_token(body: dict[str, Any]) -> dict[str, Any]:
        """An Ably token for a node of this hub's channels, on the proof it signs (hub/ably_tokens.py)."""
        if not hub.ably_key:
            raise HTTPProblem(404, "this hub hands out no Ably tokens (kachery hub serve --ably-key-env NAME)")
        try:
            node = read_proof(str(body.get("proof", "")))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        why = timed_challenge_problem(node.challenge, ABLY_PURPOSE, CHALLENGE_WINDOW_S)
        if why is not None:
            raise HTTPProblem(400, why)
        if not db.use_challenge(node.challenge):
            raise HTTPProblem(403, "this proof was used already (a replay)")
        names = []
        for channel in db.channels():
            if not channel.transport.startswith("ably:"):
                continue
            try:
                if node.node_id in hub.channels.config(channel).members:
                    names.append(channel.name)
            except (KacheryError, OSError):
                continue
        if not names:
            raise HTTPProblem(403, "this node is a member of no Ably channel of this hub")
        return token_request(hub.ably_key, node.node_id, names)

    @app.post("/api/join")
    def api_join(body: dict[str, Any]) -> dict[str, Any]:
        """A node joining with a one-time token (hub/join.py): its proof signs the token."""
        try:
            node = read_proof(str(body.get("proof", "")))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        if not node.owner:
            raise HTTPProblem(400, "the node has no owner e-mail; run `kachery node init --owner EMAIL` on it first")
        used = db.use_join_token(node.challenge, node.node_id)
        if isinstance(used, str):
            raise HTTPProblem(403, used)
        channel = db.channel(used[0])
        if channel is None:
            raise HTTPProblem(404, "the token's channel is gone")
        creator = next((u for u in db.owners(channel.id)), None)
        actor = User(0, f"join token ({creator.email if creator else 'an owner'})", "")
        try:
            hub.channels.admit(channel, actor, node.node_id, node.owner, node.label, used[1].split(","))
        except UserError as exc:
            raise HTTPProblem(400, str(exc)) from None
        return {"join": hub.channels.join_string(channel), "channel": channel.name, "permissions": used[1].split(",")}

    return app


def _perms(values: Any) -> list[str] | None:
    """Permissions from a form or a JSON body, each checked; None if none were given."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",") if v]
    unknown = [v for v in values if v not in PERMISSIONS]
    if unknown:
        raise HTTPProblem(400, f"unknown permission(s) {', '.join(map(str, unknown))[:200]}; "
                               f"they are {', '.join(PERMISSIONS)}")
    return list(values)


def _local(next_url: str) -> str:
    """``next_url`` if it is a path of this site, else ``/`` (no open redirect)."""
    parsed = urlparse(next_url)
    if parsed.scheme or parsed.netloc or not next_url.startswith("/") or next_url.startswith("//"):
        return "/"
    return next_url


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _presence(channel: Channel, node_id: str) -> dict[str, Any] | None:
    """What the node last announced on the channel's bus (online if present), or None."""
    try:
        raw = shared_transport(channel.transport).present(topic_of(channel.name)).get(node_id)
    except (KacheryError, OSError) as exc:
        return {"error": str(exc)}
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        return {}
    if isinstance(info.get("since"), int | float):
        info["since_text"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"]))
    if isinstance(info.get("beat"), int | float):
        info["beat_text"] = time.strftime("%H:%M:%S UTC", time.gmtime(info["beat"]))
        info["beat_ago"] = max(0, round(time.time() - info["beat"]))
    return info
