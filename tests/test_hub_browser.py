"""The hub in a real browser (Debian's chromium through Playwright), with real nodes in separate
processes on a real redis-server: an owner signs in through the issuer, creates a channel, admits a
node with the proof the node signs, a headless node joins with a one-time token on the command line,
and a permission the owner unticks is obeyed by the running node after its refresh.

Screenshots of the pages go to ``docs/images/hub-*.png`` when ``KT_HUB_SCREENSHOTS`` names that
folder (docs/hub.md shows them); otherwise to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from channel_nodes import Node, stop_all, wait_for
from hub_fixtures import screenshot, serve_asgi, sign_in_at_issuer

from kachery_tasks.channels.envelope import seal
from kachery_tasks.channels.uri import open_transport
from kachery_tasks.hub.app import create_app
from kachery_tasks.identity import node_identity


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("KT_HUB_SCREENSHOTS") or tmp_path / "shots")


def test_an_owner_runs_a_channel_from_the_browser_and_a_running_node_obeys(tmp_path, oidc_issuer, page,
                                                                        redis_uri, shots):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    counter = tmp_path / "runs.txt"
    server = Node(tmp_path, "server", counter, channel_refresh_seconds="1")
    laptop = Node(tmp_path, "laptop", counter, channel_refresh_seconds="1")
    server.kachery("node", "init", "--owner", "ops@lab.org", "--label", "server")
    laptop.kachery("node", "init", "--owner", "bob@lab.org", "--label", "bob's <laptop>")
    oidc_issuer.set_user("alice", email="alice@lab.org", name="Alice", email_verified=True)
    app = create_app(tmp_path / "hub", issuer=oidc_issuer.url, client_id="kachery-hub", client_secret="s3cret")
    try:
        with serve_asgi(app) as base:
            app.state.hub.public_url = base
            # sign in through the issuer
            page.goto(base + "/")
            screenshot(page, shots / "hub-signin.png")
            page.click("#sign-in")
            sign_in_at_issuer(page, "alice")
            page.wait_for_url(base + "/")
            assert "alice@lab.org" in page.content()

            # create a channel
            page.click("text=new channel")
            page.fill("#name", "lab")
            page.fill("#bucket", bucket.as_uri())
            page.fill("#transport", redis_uri)
            page.click("#create")
            page.wait_for_url(re.compile(r".*/c/[0-9a-f]+$"))
            channel_url = page.url
            assert page.inner_text("#config-version") == "1"

            # admit the server with the proof it signs (it joins with the join string first)
            server.kachery("channel", "join", page.inner_text("#join-string").strip())
            challenge = page.inner_text("#prove-command").split()[-1]
            proof = server.kachery("node", "prove", challenge).stdout.strip()
            page.fill("#proof", proof)
            page.check("#a-provide_files")
            page.click("#admit")
            page.wait_for_url(channel_url)
            assert page.inner_text("#config-version") == "2"
            server_id = server.node_id
            assert server_id[:12] in page.inner_text("#nodes")

            # a headless node joins with a one-time token, on the command line
            page.click("#make-token")
            token = page.inner_text("#join-token").split()[-1]
            joined = laptop.kachery("channel", "join", token)
            assert "joined channel 'lab' through its hub" in joined.stdout
            reused = Node(tmp_path, "thief", counter)
            reused.kachery("node", "init", "--owner", "eve@else.org")
            out = reused.kachery("channel", "join", token, check=False)
            assert out.returncode != 0 and "used already" in out.stderr and "Traceback" not in out.stderr
            page.goto(channel_url)
            assert "bob&#39;s &lt;laptop&gt;" in page.content() or "bob's <laptop>" in page.inner_text("#nodes")
            screenshot(page, shots / "hub-channel.png")

            # the server provides a file to the laptop
            uri = server.py("import kachery_tasks as kt\nprint(kt.store_bytes(b'hub-test ' * 1000))").stdout.strip()
            server.start_daemon("lab", "--heartbeat", "0.5")
            got = laptop.py(f"import kachery_tasks as kt\nprint(len(kt.load_bytes({uri!r})))").stdout.strip()
            assert got == "9000"

            # the server's page: online, with its last heartbeat
            page.goto(f"{channel_url}/nodes/{server_id}")
            assert "Online: last heartbeat at" in page.inner_text("#presence")
            page.goto(channel_url)

            # untick the server's provide_files: the running daemon obeys after its refresh
            row = page.locator(f'tr[data-node="{server_id}"]')
            row.locator('input[type=checkbox][value="provide_files"]').uncheck()
            row.locator("button.save").click()
            page.wait_for_url(channel_url)
            assert page.inner_text("#config-version") == "4"  # created, server admitted, laptop joined, now
            cfg = json.loads((bucket / "channels" / "lab" / "config.json").read_text())
            assert "provide_files" not in cfg["members"][server_id]["permissions"]
            wait_for(lambda: server.status()["channels"]["lab"]["config_version"] == 4, what="the daemon's refresh")
            keys = node_identity(laptop.home).keys
            env = seal(keys, "request_file", "lab", {"sha256": "ab" * 32})
            with open_transport(redis_uri) as bus:
                bus.publish("channel/lab", env.to_bytes())
            wait_for(lambda: server.status()["channels"]["lab"]["served"].get("refused"), what="the refusal")

            # the audit log shows every change, by whom
            page.click("text=audit log")
            audit = page.inner_text("#audit")
            for action in ("create", "admit", "permissions"):
                assert action in audit
            assert "alice@lab.org" in audit and "join token" in audit
            screenshot(page, shots / "hub-audit.png")
    finally:
        stop_all(server, laptop)


def test_a_second_user_cannot_see_or_change_the_first_users_channel(tmp_path, oidc_issuer, page, browser):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    oidc_issuer.set_user("alice", email="alice@lab.org", email_verified=True)
    oidc_issuer.set_user("eve", email="eve@else.org", email_verified=True)
    app = create_app(tmp_path / "hub", issuer=oidc_issuer.url, client_id="kachery-hub", client_secret="s3cret")
    with serve_asgi(app) as base:
        app.state.hub.public_url = base
        page.goto(base + "/")
        page.click("#sign-in")
        sign_in_at_issuer(page, "alice")
        page.wait_for_url(base + "/")
        page.goto(base + "/channels/new")
        page.fill("#name", "private")
        page.fill("#bucket", bucket.as_uri())
        page.fill("#transport", "memory://private")
        page.click("#create")
        page.wait_for_url(re.compile(r".*/c/[0-9a-f]+$"))
        channel_url = page.url

        other = browser.new_context()
        other.route(re.compile(r"^(?!http://127\.0\.0\.1)"), lambda route: route.abort())
        eve = other.new_page()
        try:
            eve.goto(base + "/")
            eve.click("#sign-in")
            sign_in_at_issuer(eve, "eve")
            eve.wait_for_url(base + "/")
            assert "private" not in eve.inner_text("main")
            response = eve.goto(channel_url)
            assert response.status == 404 and "private" not in eve.content()
            # a form of alice's page posted from eve's session: refused, nothing changed
            response = eve.request.post(channel_url + "/owners", form={"email": "eve@else.org", "csrf": "x"})
            assert response.status in (403, 404)
        finally:
            other.close()
        assert [u.email for u in app.state.hub.db.owners(channel_url.rsplit("/", 1)[-1])] == ["alice@lab.org"]
