"""`kachery feed ...` with good and bad input, run through a group that wraps errors like the main one."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from kachery_tasks import config
from kachery_tasks.cli.feed import feed
from kachery_tasks.errors import KacheryError


class _Main(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KacheryError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


main = _Main("kachery")
main.add_command(feed)


@pytest.fixture
def run(tmp_path):
    with config.set(home=str(tmp_path), feed_checkpoint_every=4):
        runner = CliRunner()

        def invoke(*args, input=None):
            return runner.invoke(main, ["feed", *args], input=input)

        yield invoke


def test_create_append_show_verify(run):
    r = run("create", "--label", "lab")
    assert r.exit_code == 0, r.output
    uri = r.output.strip()
    assert uri.startswith("feed://") and len(uri) == 71
    assert run("append", uri, "notes", '{"a": 1}').output.strip() == "appended seq 0"
    r = run("append", uri, "notes", "-", input='{"b": 2}\n\n[3]\n')
    assert r.exit_code == 0 and "seq 1..2" in r.output
    r = run("show", uri, "notes", "--json")
    assert [json.loads(line)["body"] for line in r.output.splitlines()] == [{"a": 1}, {"b": 2}, [3]]
    r = run("show", uri, "notes", "--start", "1", "--end", "2", "--json")
    assert [json.loads(line)["seq"] for line in r.output.splitlines()] == [1]
    r = run("show", uri[7:], "notes")
    assert r.exit_code == 0 and '{"a": 1}' in r.output
    r = run("ls", "--json")
    rows = json.loads(r.output)
    assert rows[0]["label"] == "lab" and rows[0]["subfeeds"] == ["notes"]
    assert "lab" in run("ls").output
    r = run("verify", uri)
    assert r.exit_code == 0 and "ok" in r.output
    r = run("tail", uri, "notes", "--start", "1", "--timeout", "0.1")
    assert r.exit_code == 0 and [json.loads(line)["seq"] for line in r.output.splitlines()] == [1, 2]


def test_verify_fails_with_seq(run, tmp_path):
    uri = run("create").output.strip()
    run("append", uri, "s", "-", input="".join(f'{{"i": {i}}}\n' for i in range(10)))
    path = next(p for p in (tmp_path / "feeds" / uri[7:]).glob("*.jsonl") if "checkpoints" not in p.name)
    lines = path.read_bytes().splitlines()
    msg = json.loads(lines[6])
    msg["body"] = {"i": 600}
    lines[6] = json.dumps(msg, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = run("verify", uri)
    assert r.exit_code == 1
    assert "message 6" in r.output and "TAMPERED at seq 6" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ("append", "feed://" + "Z" * 64, "s", "{}"),
        ("show", "feed://../../etc", "s"),
        ("show", "feed://" + "a" * 64, "s"),
        ("show", "no-such-name", "s"),
        ("verify", "feed://" + "a" * 64 + "x"),
    ],
)
def test_bad_feed_refs_one_line_errors(run, args):
    r = run(*args)
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert not isinstance(r.exception, KacheryError) or r.exit_code == 1


def test_a_feed_by_its_label_or_bare_id(run):
    """`feed create --label lab` then `feed show lab notes` works; a label two feeds share is a
    one-line error listing both ids (issue 27 section 6)."""
    uri = run("create", "--label", "lab").output.strip()
    assert run("append", "lab", "notes", '{"a": 1}').exit_code == 0
    for ref in ("lab", uri, uri[len("feed://"):]):
        r = run("show", ref, "notes", "--json")
        assert r.exit_code == 0, r.output
        assert [json.loads(line)["body"] for line in r.output.splitlines()] == [{"a": 1}]
    assert run("verify", "lab").exit_code == 0
    other = run("create", "--label", "lab").output.strip()
    r = run("show", "lab", "notes")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "names 2 feeds" in r.output and uri in r.output and other in r.output
    assert run("show", uri, "notes").exit_code == 0


def test_bad_json_and_read_only(run, tmp_path):
    uri = run("create").output.strip()
    r = run("append", uri, "s", "{not json")
    assert r.exit_code == 1 and "not valid JSON" in r.output and len(r.output.strip().splitlines()) == 1
    r = run("append", uri, "s", "-", input="")
    assert r.exit_code == 1 and "nothing to append" in r.output
    r = run("append", uri, "s", '{"nan": NaN}')
    assert r.exit_code == 1 and "not plain JSON" in r.output
    for key in (tmp_path / "keys" / "feeds").iterdir():
        key.unlink()
    r = run("append", uri, "s", "{}")
    assert r.exit_code == 1 and "read-only" in r.output
    r = run("show", uri, "s", "--start", "-1")
    assert r.exit_code == 2


def test_resolve_command(run):
    from kachery_tasks.feeds import load_feed
    from kachery_tasks.feeds.messages import sign_message

    uri = run("create").output.strip()
    run("append", uri, "s", "-", input='{"i": 0}\n{"i": 1}\n')
    f = load_feed(uri)
    prev = f.subfeed("s").messages()[1]["prev"]
    f.subfeed("s").ingest([json.loads(sign_message(f.keys, 1, prev, {"i": "x"}))])
    r = run("append", uri, "s", "{}")
    assert r.exit_code == 1 and "forked" in r.output
    assert run("verify", uri).exit_code == 1
    r = run("resolve", uri)
    assert r.exit_code == 0 and "resolved 1" in r.output
    assert run("append", uri, "s", "{}").exit_code == 0
