"""The hub through FastAPI's test client: sign-in (the mock issuer and the loopback dev sign-in),
channels created and changed with every change a signed config in the bucket, node proofs, join
tokens, the access rules, CSRF, and the faults the hub must refuse."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from kachery_tasks.channels.config import ChannelConfig
from kachery_tasks.hub.app import create_app
from kachery_tasks.hub.security import make_challenge
from kachery_tasks.identity import init_node
from kachery_tasks.identity.proofs import prove

LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture
def lab(tmp_path: Path):
    """A hub (state in tmp/hub) and a directory bucket."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    app = create_app(tmp_path / "hub", public_url="http://testserver")
    return app, bucket


def client(app, host=LOOPBACK) -> TestClient:
    return TestClient(app, client=host)


def sign_in(tc: TestClient, email: str) -> str:
    """Dev sign-in as ``email``; returns the session's CSRF token."""
    response = tc.post("/dev-login", data={"email": email, "name": email.split("@")[0]})
    assert response.status_code == 200, response.text
    return csrf_of(tc.get("/").text)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def create(tc: TestClient, csrf: str, bucket: Path, name: str = "lab") -> str:
    response = tc.post("/channels", data={"name": name, "bucket": bucket.as_uri(), "transport": "memory://hub-test",
                                          "csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("/", 1)[-1]


def stored(bucket: Path, name: str = "lab") -> ChannelConfig:
    path = bucket / "channels" / name / "config.json"
    return ChannelConfig.from_bytes(path.read_bytes(), str(path))


def api_token(tc: TestClient, csrf: str) -> str:
    """A new API token of the signed-in user, made on the page /tokens."""
    return re.search(r'id="api-token">([^<]+)<', tc.post("/tokens", data={"csrf": csrf}).text).group(1)


def challenge_on(tc: TestClient, channel_id: str) -> str:
    return re.search(r"kachery node prove (\S+)</code>", tc.get(f"/c/{channel_id}").text).group(1)


def node(tmp_path: Path, name: str, owner: str = "bob@lab.org", label: str | None = None):
    return init_node(tmp_path / name, owner=owner, label=label if label is not None else name)


def admit(tc, csrf, channel_id, proof, perms=("request_files", "request_feeds", "request_tasks")):
    return tc.post(f"/c/{channel_id}/admit", data={"proof": proof, "perm": list(perms), "csrf": csrf},
                   follow_redirects=False)


# -- sign-in ---------------------------------------------------------------------------------------
def test_sign_in_through_the_issuer_with_pkce_and_nonce(tmp_path, oidc_issuer):
    app = create_app(tmp_path / "hub", issuer=oidc_issuer.url, client_id="kachery-hub", client_secret="s3cret",
                     public_url="http://testserver")
    oidc_issuer.set_user("alice", email="alice@lab.org", name="Alice", email_verified=True)
    tc = client(app)
    start = tc.post("/login", data={"next": "/channels/new"}, follow_redirects=False)
    assert start.status_code == 303 and start.headers["location"].startswith(oidc_issuer.url)
    asked = parse_qs(urlparse(start.headers["location"]).query)
    assert asked["code_challenge_method"] == ["S256"] and asked["nonce"] and asked["state"]
    assert "kt_session" not in tc.cookies  # nothing of the sign-in in a cookie: state is server-side
    back = httpx.post(start.headers["location"], data={"sub": "alice"}, follow_redirects=False)
    landed = tc.get(back.headers["location"].replace("http://testserver", ""), follow_redirects=False)
    assert landed.status_code == 303 and landed.headers["location"] == "/channels/new"
    assert "alice@lab.org" in tc.get("/").text
    assert oidc_issuer.last("token")["code_verifier"]
    # the same callback again: the state was good once
    again = tc.get(back.headers["location"].replace("http://testserver", ""))
    assert again.status_code == 400 and "sign in again" in again.text


def test_an_issuer_that_is_down_gets_a_clear_page_and_nothing_is_written(tmp_path, dead_issuer_url):
    app = create_app(tmp_path / "hub", issuer=dead_issuer_url, client_id="kachery-hub", client_secret="x",
                     public_url="http://testserver")
    tc = client(app)
    response = tc.post("/login", follow_redirects=False)
    assert response.status_code == 503 and "cannot be reached" in response.text
    db = app.state.hub.db
    with db._connect() as conn:
        assert conn.execute("SELECT COUNT(*) FROM logins").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0


def test_the_dev_sign_in_only_on_loopback(tmp_path):
    remote = client(create_app(tmp_path / "a", public_url="http://testserver"), host=("10.1.2.3", 5000))
    assert remote.post("/dev-login", data={"email": "eve@x.org"}).status_code == 403
    exposed = client(create_app(tmp_path / "b", public_url="http://testserver", bound_host="0.0.0.0"))
    assert exposed.post("/dev-login", data={"email": "eve@x.org"}).status_code == 403
    assert "Dev sign-in" not in exposed.get("/").text


# -- channels and nodes ----------------------------------------------------------------------------
def test_create_admit_change_and_revoke_each_a_signed_version_in_the_bucket(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    first = stored(bucket)
    assert first.version == 1 and first.signature_ok()
    assert first.owner_key == app.state.hub.channels.channel_key(app.state.hub.db.channel(cid))

    bob = node(tmp_path, "bob-laptop")
    assert admit(tc, csrf, cid, prove(bob, challenge_on(tc, cid))).status_code == 303
    cfg = stored(bucket)
    assert cfg.version == 2 and cfg.signature_ok()
    assert cfg.members[bob.node_id].owner == "bob@lab.org" and cfg.members[bob.node_id].label == "bob-laptop"
    assert set(cfg.members[bob.node_id].permissions) == {"request_files", "request_feeds", "request_tasks"}

    shown = list(cfg.members[bob.node_id].permissions)
    response = tc.post(f"/c/{cid}/nodes/{bob.node_id}/permissions", follow_redirects=False,
                       data={"perm": ["request_files", "provide_files"], "shown": shown, "csrf": csrf})
    assert response.status_code == 303
    assert set(stored(bucket).members[bob.node_id].permissions) == {"request_files", "provide_files"}

    assert tc.post(f"/c/{cid}/nodes/{bob.node_id}/revoke", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    final = stored(bucket)
    assert bob.node_id not in final.members and final.version == 4 and final.signature_ok()
    audit = tc.get(f"/c/{cid}/audit").text
    for action in ("create", "admit", "permissions", "revoke"):
        assert f"<td>{action}</td>" in audit
    assert audit.count("alice@lab.org") >= 4


def test_forged_replayed_foreign_and_expired_proofs_are_refused(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    other = create(tc, csrf, bucket, name="other")
    bob = node(tmp_path, "bob")
    good = prove(bob, challenge_on(tc, cid))

    import base64
    doc = json.loads(base64.urlsafe_b64decode(good[5:] + "=" * (-len(good[5:]) % 4)))
    doc["node_id"] = node(tmp_path, "mallory").node_id  # claims another node, with bob's signature
    forged = "ktp1." + base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
    response = admit(tc, csrf, cid, forged)
    assert response.status_code == 400 and "does not verify" in response.text

    response = admit(tc, csrf, other, good)  # a proof of this channel's challenge, pasted on another
    assert response.status_code == 400 and "another channel" in response.text

    expired = make_challenge(app.state.hub.secret, cid, 1, now=time.time() - 3600)
    response = admit(tc, csrf, cid, prove(bob, expired))
    assert response.status_code == 400 and "expired" in response.text

    made_up = "ktc1.eyJjIjoiYWJjIn0.0123456789abcdef0123456789abcdef"
    response = admit(tc, csrf, cid, prove(bob, made_up))
    assert response.status_code == 400 and "did not issue" in response.text

    assert admit(tc, csrf, cid, good).status_code == 303
    response = admit(tc, csrf, cid, good)
    assert response.status_code == 400 and "used already" in response.text
    assert stored(bucket).version == 2  # one admission, nothing else written


def test_two_owners_editing_at_once_lose_nothing(lab, tmp_path):
    app, bucket = lab
    alice, carol = client(app), client(app)
    a_csrf = sign_in(alice, "alice@lab.org")
    c_csrf = sign_in(carol, "carol@lab.org")
    cid = create(alice, a_csrf, bucket)
    assert alice.post(f"/c/{cid}/owners", data={"email": "carol@lab.org", "csrf": a_csrf},
                      follow_redirects=False).status_code == 303
    nodes = [node(tmp_path, f"n{i}") for i in range(2)]
    for n in nodes:
        assert admit(alice, a_csrf, cid, prove(n, challenge_on(alice, cid))).status_code == 303
    shown = sorted(stored(bucket).members[nodes[0].node_id].permissions)
    # both pages show the same version; alice adds provide_files, carol (at once) takes request_feeds
    # from the same node and adds provide_tasks to the other
    results = []

    def edit(tc, csrf, node_id, ticked):
        results.append(tc.post(f"/c/{cid}/nodes/{node_id}/permissions", follow_redirects=False,
                               data={"perm": ticked, "shown": shown, "csrf": csrf}).status_code)

    threads = [threading.Thread(target=edit, args=(alice, a_csrf, nodes[0].node_id, shown + ["provide_files"])),
               threading.Thread(target=edit, args=(carol, c_csrf, nodes[0].node_id,
                                                   [p for p in shown if p != "request_feeds"])),
               threading.Thread(target=edit, args=(carol, c_csrf, nodes[1].node_id, shown + ["provide_tasks"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [303, 303, 303]
    cfg = stored(bucket)
    assert set(cfg.members[nodes[0].node_id].permissions) == {"request_files", "request_tasks", "provide_files"}
    assert "provide_tasks" in cfg.members[nodes[1].node_id].permissions
    assert cfg.version == 3 + 3 and cfg.signature_ok()


# -- access rules ----------------------------------------------------------------------------------
def test_outsiders_see_nothing_members_look_owners_change(lab, tmp_path):
    app, bucket = lab
    alice, bob, eve = client(app), client(app), client(app)
    a_csrf = sign_in(alice, "alice@lab.org")
    b_csrf = sign_in(bob, "bob@lab.org")
    e_csrf = sign_in(eve, "eve@else.org")
    cid = create(alice, a_csrf, bucket, name="secret-project")
    bob_node = node(tmp_path, "bob-node", owner="bob@lab.org")
    assert admit(alice, a_csrf, cid, prove(bob_node, challenge_on(alice, cid))).status_code == 303

    # eve: a 404 everywhere, the name never shown
    for path in (f"/c/{cid}", f"/c/{cid}/audit", f"/c/{cid}/nodes/{bob_node.node_id}"):
        response = eve.get(path)
        assert response.status_code == 404 and "secret-project" not in response.text
    response = eve.post(f"/c/{cid}/nodes/{bob_node.node_id}/revoke", data={"csrf": e_csrf})
    assert response.status_code == 404 and "secret-project" not in response.text
    assert "secret-project" not in eve.get("/").text
    assert eve.get("/c/0123456789abcdef").status_code == 404  # the same answer as a channel that does not exist

    # bob, whose node is a member: sees it, cannot change it
    assert "secret-project" in bob.get("/").text
    page = bob.get(f"/c/{cid}")
    assert page.status_code == 200 and "kachery node prove" not in page.text
    response = bob.post(f"/c/{cid}/nodes/{bob_node.node_id}/revoke", data={"csrf": b_csrf})
    assert response.status_code == 403
    assert bob_node.node_id in stored(bucket, "secret-project").members

    # the same rules through the API
    def bearer(tc, csrf):
        return {"Authorization": f"Bearer {api_token(tc, csrf)}"}

    as_eve, as_bob = bearer(eve, e_csrf), bearer(bob, b_csrf)
    assert eve.get("/api/channels", headers=as_eve).json() == []
    for response in (eve.get(f"/api/channels/{cid}", headers=as_eve),
                     eve.post(f"/api/channels/{cid}/revoke", headers=as_eve, json={"target": bob_node.node_id})):
        assert response.status_code == 404 and "secret-project" not in response.text
    assert bob.get(f"/api/channels/{cid}", headers=as_bob).json()["role"] == "member"
    assert bob.post(f"/api/channels/{cid}/revoke", headers=as_bob, json={"target": bob_node.node_id}).status_code == 403
    assert bob_node.node_id in stored(bucket, "secret-project").members


def test_forms_need_their_csrf_token_and_no_get_changes_anything(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    bob = node(tmp_path, "bob")
    proof = prove(bob, challenge_on(tc, cid))
    for data in ({"proof": proof}, {"proof": proof, "csrf": "forged"}):
        response = tc.post(f"/c/{cid}/admit", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    response = tc.post("/channels", data={"name": "x", "bucket": bucket.as_uri(), "transport": "memory://x"})
    assert response.status_code == 403
    for path in (f"/c/{cid}/admit", f"/c/{cid}/nodes/{bob.node_id}/revoke", f"/c/{cid}/tokens", "/channels",
                 f"/c/{cid}/owners", "/logout", "/api/join"):
        assert tc.get(path).status_code in (404, 405)
    assert stored(bucket).version == 1


def test_html_in_a_label_or_owner_is_shown_as_text(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    evil = node(tmp_path, "evil", owner="<b>x</b>@lab.org", label="<script>alert(1)</script>")
    assert admit(tc, csrf, cid, prove(evil, challenge_on(tc, cid))).status_code == 303
    page = tc.get(f"/c/{cid}").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x</b>" not in page
    bad = tc.post("/channels", data={"name": "<i>x</i>", "bucket": bucket.as_uri(), "transport": "memory://x",
                                     "csrf": csrf})
    assert bad.status_code == 400 and "<i>x</i>" not in bad.text


# -- join tokens and the API -----------------------------------------------------------------------
def test_a_join_token_admits_one_node_once_and_expires(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    page = tc.post(f"/c/{cid}/tokens", data={"perm": ["request_files", "provide_files"], "hours": "1", "csrf": csrf})
    token = re.search(r"kachery channel join (\S+)</code>", page.text).group(1)
    from kachery_tasks.hub.join import parse_token
    _, secret = parse_token(token)
    server = node(tmp_path, "server", owner="ops@lab.org")
    answer = tc.post("/api/join", json={"proof": prove(server, secret)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["channel"] == "lab"
    assert set(stored(bucket).members[server.node_id].permissions) == {"request_files", "provide_files"}
    again = tc.post("/api/join", json={"proof": prove(node(tmp_path, "thief"), secret)})
    assert again.status_code == 403 and "used already" in again.json()["detail"]
    stale = app.state.hub.db.add_join_token(cid, "request_files", app.state.hub.db.owners(cid)[0], -1)
    late = tc.post("/api/join", json={"proof": prove(node(tmp_path, "late"), stale)})
    assert late.status_code == 403 and "expired" in late.json()["detail"]
    assert stored(bucket).version == 2


def test_the_api_with_a_bearer_token_and_without(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    token = api_token(tc, csrf)
    api = client(app)  # no cookie: the token alone
    headers = {"Authorization": f"Bearer {token}"}
    assert api.get("/api/channels", headers=headers).json() == [{"id": cid, "name": "lab", "role": "owner"}]
    bob = node(tmp_path, "bob")
    answer = api.post(f"/api/channels/{cid}/grant", headers=headers,
                      json={"target": bob.node_id, "owner": "bob@lab.org", "label": "bob", "permissions": ["request_files"]})
    assert answer.json() == {"version": 2}
    assert api.post(f"/api/channels/{cid}/revoke", headers=headers, json={"target": bob.node_id}).json() == {"version": 3}
    assert api.get("/api/channels", headers={"Authorization": "Bearer kth_nope"}).status_code == 401
    assert api.get("/api/channels").status_code == 401
    # the cookie without the CSRF header may read, not change
    assert tc.get("/api/channels").status_code == 200
    assert tc.post(f"/api/channels/{cid}/grant", json={"target": bob.node_id}).status_code == 403


def test_the_command_line_signs_in_and_grants_through_the_hub(lab, tmp_path, kachery):
    from hub_fixtures import serve_asgi

    def run_kachery(*args: str, check: bool = True):
        proc = kachery(*args)
        proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    token = api_token(tc, csrf)
    bob = node(tmp_path, "bob")
    with serve_asgi(app) as base:
        bad = run_kachery("hub", "login", base, "--token", "kth_wrong", check=False)
        assert bad.returncode == 1 and "unknown or expired" in bad.stderr and "Traceback" not in bad.stderr
        assert "signed in to" in run_kachery("hub", "login", base, "--token", token).stdout
        out = run_kachery("channel", "grant", "lab", bob.node_id, "--owner", "bob@lab.org", "--perm", "request_files",
                          "--hub", base)
        assert "version 2" in out.stdout
        assert stored(bucket).members[bob.node_id].permissions == ("request_files",)
        out = run_kachery("channel", "revoke", "lab", bob.node_id, "--hub", base)
        assert "version 3" in out.stdout and bob.node_id not in stored(bucket).members
        missing = run_kachery("channel", "grant", "nope", bob.node_id, "--hub", base, check=False)
        assert missing.returncode == 1 and "no channel called 'nope'" in missing.stderr
    assert "channel lab" in tc.get(f"/c/{cid}/audit").text


def test_file_buckets_only_where_the_hubs_admin_allows(tmp_path):
    allowed = tmp_path / "shared"
    allowed.mkdir()
    app = create_app(tmp_path / "hub", public_url="http://testserver", bound_host="127.0.0.1",
                     file_bucket_roots=(allowed,))
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    outside = tmp_path / "elsewhere"
    response = tc.post("/channels", data={"name": "lab", "bucket": outside.as_uri(), "transport": "memory://x",
                                          "csrf": csrf})
    assert response.status_code == 400 and "only under" in response.text and not outside.exists()
    (allowed / "lab-bucket").mkdir()
    assert create(tc, csrf, allowed / "lab-bucket")
    exposed = create_app(tmp_path / "hub2", public_url="http://testserver", bound_host="0.0.0.0")
    token = exposed.state.hub.db.new_api_token(exposed.state.hub.db.user_for("x", "a", "a@x.org", ""), "t")
    answer = client(exposed).post("/api/channels", headers={"Authorization": f"Bearer {token}"},
                                  json={"name": "lab", "bucket": outside.as_uri(), "transport": "memory://x"})
    assert answer.status_code == 400 and "no channels on file://" in answer.json()["detail"]
    assert not outside.exists() and not list((tmp_path / "hub2").glob("channels/*"))


def test_groups_get_permissions_and_members_each_a_signed_version(lab, tmp_path):
    app, bucket = lab
    tc = client(app)
    csrf = sign_in(tc, "alice@lab.org")
    cid = create(tc, csrf, bucket)
    ana = node(tmp_path, "ana")
    assert admit(tc, csrf, cid, prove(ana, challenge_on(tc, cid)), perms=()).status_code == 303
    assert tc.post(f"/c/{cid}/groups", data={"group": "analysts", "perm": ["request_files", "request_tasks"],
                                             "csrf": csrf}, follow_redirects=False).status_code == 303
    assert stored(bucket).groups["analysts"] == ("request_files", "request_tasks")
    assert tc.post(f"/c/{cid}/groups/analysts/members", data={"node_id": ana.node_id, "action": "add", "csrf": csrf},
                   follow_redirects=False).status_code == 303
    cfg = stored(bucket)
    assert cfg.members[ana.node_id].groups == ("analysts",)
    assert cfg.permissions_of(ana.node_id) == {"request_files", "request_tasks"}
    # untick one of the group's permissions: the member loses it through the group
    assert tc.post(f"/c/{cid}/groups", data={"group": "analysts", "perm": ["request_files"],
                                             "shown": ["request_files", "request_tasks"], "csrf": csrf},
                   follow_redirects=False).status_code == 303
    assert stored(bucket).permissions_of(ana.node_id) == {"request_files"}
    assert tc.post(f"/c/{cid}/groups/analysts/members", data={"node_id": ana.node_id, "action": "remove",
                                                              "csrf": csrf}, follow_redirects=False).status_code == 303
    final = stored(bucket)
    assert final.permissions_of(ana.node_id) == set() and final.signature_ok() and final.version == 6
    page = tc.get(f"/c/{cid}").text
    assert "@analysts" in page
    bad = tc.post(f"/c/{cid}/groups", data={"group": "Bad Name!", "perm": ["request_files"], "csrf": csrf})
    assert bad.status_code == 400 and stored(bucket).version == 6
