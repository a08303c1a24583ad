"""The ``kachery`` command, run as a subprocess: good input works, bad input is one line and exit 1."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
import yaml

import kachery_tasks as kt
from kachery_tasks.store import current_store, parse_file_uri

BAD_URI = "sha256://../../etc/passwd"
UNKNOWN_URI = "sha256://" + "0" * 64


def assert_user_error(proc, *needles: str) -> None:
    """Exit 1, exactly one line on stderr starting with 'kachery: error:', no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert err.startswith("kachery: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def sample(home: Path) -> tuple[Path, bytes]:
    data = b"hello kachery\n" * 10
    path = home / "data" / "sample.txt"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, data


def test_help(kachery) -> None:
    out = ok(kachery("-h"))
    for command in ("store", "load", "cat", "info", "verify", "mutable", "node", "config"):
        assert command in out
    assert "--json" in ok(kachery("store", "--help"))


def test_store_load_cat_info(kachery, sample, home: Path) -> None:
    path, data = sample
    uri = ok(kachery("store", str(path))).strip()
    digest = hashlib.sha256(data).hexdigest()
    assert uri == f"sha256://{digest}?label=sample.txt"
    assert Path(ok(kachery("load", uri)).strip()).read_bytes() == data
    assert kachery("cat", uri).stdout == data
    target = home / "out" / "copy.txt"
    target.parent.mkdir()
    assert ok(kachery("load", uri, "-o", str(target))).strip() == str(target)
    assert target.read_bytes() == data
    assert ok(kachery("load", uri, "-o", str(target.parent))).strip() == str(target.parent / "sample.txt")
    info = json.loads(ok(kachery("info", uri, "--json")))
    assert info["size"] == len(data) and info["sha256"] == digest and info["chunks"] == 1
    assert digest[:20] in ok(kachery("info", uri))


def test_store_several_json_label_and_link(kachery, home: Path) -> None:
    (home / "d").mkdir()
    a, b = home / "d" / "a.bin", home / "d" / "b.bin"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    rows = json.loads(ok(kachery("store", str(a), str(b), "--json")))
    assert [r["path"] for r in rows] == [str(a), str(b)]
    assert all(r["uri"].startswith("sha256://") and r["size"] == 100 for r in rows)
    assert ok(kachery("store", str(a), "--label", "x y")).strip().endswith("?label=x%20y")
    uri = ok(kachery("store", str(a), "--link")).strip()
    assert parse_file_uri(uri).sha256 == hashlib.sha256(b"a" * 100).hexdigest()
    assert_user_error(kachery("store", str(a), str(b), "--label", "x"), "--label")


def test_store_big_file_with_progress_threshold(kachery, home: Path) -> None:
    big = home / "big.bin"
    big.write_bytes(os.urandom(2 * 2**20))
    proc = kachery("store", str(big), extra_env={"KACHERY_TASKS_PROGRESS_MIN_BYTES": "1024"})
    uri = ok(proc).strip()  # stderr is not a terminal: no bar, nothing else printed
    assert proc.stderr == b""
    assert kt.load_bytes(uri) == big.read_bytes()


def test_file_commands_bad_input(kachery, home: Path) -> None:
    assert_user_error(kachery("store", str(home / "missing.bin")), "missing.bin")
    assert_user_error(kachery("store", str(home)), "directory")
    for command in (["load"], ["cat"], ["info"]):
        assert_user_error(kachery(*command, BAD_URI), "not a file URI")
        assert_user_error(kachery(*command, "sha256://" + "A" * 64), "not a file URI")
        assert_user_error(kachery(*command, UNKNOWN_URI), "not found in this node's store")
    uri = kt.store_bytes(b"x")
    assert_user_error(kachery("load", uri, "-o", str(home / "no" / "such" / "dir" / "f")), "does not exist")


def test_read_only_store_is_one_line(kachery, sample) -> None:
    assert_user_error(kachery("store", str(sample[0]), extra_env={"KACHERY_TASKS_READ_ONLY": "true"}),
                      "read_only")


def test_verify_reports_and_quarantines(kachery, home: Path) -> None:
    good = kt.store_bytes(b"good bytes")
    bad = kt.store_bytes(b"bad bytes!")
    report = json.loads(ok(kachery("verify", "--json")))
    assert {k: report[k] for k in ("checked", "bytes", "damaged", "temp_files_removed", "broken")} == {
        "checked": 2, "bytes": 20, "damaged": [], "temp_files_removed": 0, "broken": 0}
    assert "2 blobs checked" in ok(kachery("verify"))
    path = current_store().blobs.path(parse_file_uri(bad).sha256)
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(b"B")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the stamp still matches: only a re-hash sees it
    proc = kachery("verify", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [d["sha256"] for d in report["damaged"]] == [parse_file_uri(bad).sha256]
    assert proc.stderr.decode().startswith("kachery: error: 1 damaged") and b"Traceback" not in proc.stderr
    assert not path.exists() and len(list((home / "store" / "quarantine").iterdir())) == 1
    assert ok(kachery("cat", good)) == "good bytes"
    assert_user_error(kachery("cat", bad), "not found")
    assert json.loads(ok(kachery("verify", "--json")))["damaged"] == []


def test_verify_removes_temp_files_of_killed_writers(kachery, home: Path) -> None:
    tmp = current_store().blobs.tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    old, fresh = tmp / "blob-old", tmp / "blob-fresh"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    records = current_store().records.records_dir / "ab"
    records.mkdir(parents=True)
    record_old, record_fresh, record = records / ".tmp-0123", records / ".tmp-4567", records / "ab01.json"
    for path in (record_old, record_fresh, record):
        path.write_bytes(b"{")
    for path in (record_old, record):
        os.utime(path, (time.time() - 86400, time.time() - 86400))
    report = json.loads(ok(kachery("verify", "--json")))
    assert report["temp_files_removed"] == 2
    assert not old.exists() and fresh.exists()  # a live writer's file is left alone
    assert not record_old.exists() and record_fresh.exists() and record.exists()  # never a record


def test_mutable_commands(kachery) -> None:
    ok(kachery("mutable", "set", "run/a", '{"x": 1}'))
    ok(kachery("mutable", "set", "run/b", '"text"'))
    ok(kachery("mutable", "set", "other", "[1, 2]"))
    assert json.loads(ok(kachery("mutable", "get", "run/a"))) == {"x": 1}
    assert kt.get_mutable("run/b") == "text"
    assert json.loads(ok(kachery("mutable", "ls", "--prefix", "run/", "--json"))) == {"run/a": {"x": 1},
                                                                                     "run/b": "text"}
    assert "other" in ok(kachery("mutable", "ls"))
    ok(kachery("mutable", "delete", "other"))
    assert kt.get_mutable("other") is None


def test_mutable_bad_input(kachery) -> None:
    assert_user_error(kachery("mutable", "set", "k", "not json"), "not JSON")
    assert_user_error(kachery("mutable", "set", "k", "NaN"), "not JSON")
    assert_user_error(kachery("mutable", "get", "nope"), "not set")
    assert_user_error(kachery("mutable", "delete", "nope"), "not set")
    assert_user_error(kachery("mutable", "set", "", "1"), "non-empty")


def test_node_init_and_info(kachery, home: Path) -> None:
    node_id = ok(kachery("node", "init", "--owner", "ada@example.org", "--label", "rig-1")).strip()
    info = json.loads(ok(kachery("node", "info", "--json")))
    assert info["node_id"] == node_id and len(node_id) == 64
    assert (info["owner"], info["label"], info["home"]) == ("ada@example.org", "rig-1", str(home))
    assert (info["blobs"], info["bytes"]) == (0, 0)
    kt.store_bytes(b"12345")
    info = json.loads(ok(kachery("node", "info", "--json")))
    assert (info["blobs"], info["bytes"]) == (1, 5)
    assert stat.S_IMODE((home / "node" / "key.pem").stat().st_mode) == 0o600
    assert "ada@example.org" in ok(kachery("node", "info"))


def test_node_init_shared_group(kachery, home: Path) -> None:
    kt.store_bytes(b"before sharing")
    group = grp.getgrgid(os.getgid()).gr_name
    ok(kachery("node", "init", "--owner", "ada@example.org", "--shared-group", group))
    assert yaml.safe_load((home / "config.yaml").read_text()) == {"shared_group": group}
    for d in [home, *(p for p in home.rglob("*") if p.is_dir())]:
        mode = stat.S_IMODE(d.stat().st_mode)
        assert mode & stat.S_ISGID and mode & 0o070 == 0o070, (d, oct(mode))
    assert stat.S_IMODE((home / "node" / "key.pem").stat().st_mode) == 0o600
    rows = {r["key"]: r for r in json.loads(ok(kachery("config", "show", "--json")))}
    assert rows["shared_group"]["value"] == group


def test_node_init_bad_input(kachery, home: Path) -> None:
    assert_user_error(kachery("node", "init", "--owner", "not-an-email"), "e-mail")
    assert_user_error(kachery("node", "init", "--owner", "a@b.org", "--shared-group", "no-such-group-kt"),
                      "not a Unix group")
    assert not (home / "config.yaml").exists()
    proc = kachery("node", "init")  # a usage error from click: exit 2, no traceback
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


def test_config_commands(kachery) -> None:
    assert json.loads(ok(kachery("config", "get", "inline_max_bytes"))) == 8192
    assert "source" in ok(kachery("config", "show"))
    assert_user_error(kachery("config", "get", "inline_max_byte"), "did you mean 'inline_max_bytes'")


def test_config_set_and_unset_write_the_home_file_checked(kachery, home) -> None:
    (home / "config.yaml").write_text("shared_group: null\nnamespace: lab\n")
    ok(kachery("config", "set", "inline_max_bytes", "1MiB"))
    ok(kachery("config", "set", "tiers", "[memory]"))
    written = yaml.safe_load((home / "config.yaml").read_text())
    assert written == {"inline_max_bytes": 2**20, "tiers": ["memory"], "shared_group": None, "namespace": "lab"}
    rows = {r["key"]: r for r in json.loads(ok(kachery("config", "show", "--json")))}
    assert rows["inline_max_bytes"]["value"] == 2**20 and rows["inline_max_bytes"]["source"].endswith("config.yaml")
    # bad keys and values are one line each, and leave the file as it was
    assert_user_error(kachery("config", "set", "inline_max_byte", "5"), "did you mean 'inline_max_bytes'")
    assert_user_error(kachery("config", "set", "read_only", "maybe"), "read_only", "true or false")
    assert_user_error(kachery("config", "set", "tiers", "[memory"), "not valid")
    assert yaml.safe_load((home / "config.yaml").read_text()) == written
    ok(kachery("config", "unset", "tiers"))
    assert "tiers" not in yaml.safe_load((home / "config.yaml").read_text())
    assert json.loads(ok(kachery("config", "get", "tiers"))) == kt.config.DEFAULTS["tiers"]
    assert "nothing to do" in ok(kachery("config", "unset", "tiers"))
    assert_user_error(kachery("config", "unset", "tires"), "did you mean 'tiers'")
    # the environment outranks the file: said, not silently ignored
    proc = kachery("config", "set", "read_only", "true", extra_env={"KACHERY_TASKS_READ_ONLY": "false"})
    assert proc.returncode == 0 and b"outranks" in proc.stderr


def test_bad_env_value_is_one_line(kachery) -> None:
    assert_user_error(kachery("config", "show", extra_env={"KACHERY_TASKS_FORCE": "maybe"}), "force")


def test_home_option(kachery, tmp_path_factory, sample) -> None:
    other = tmp_path_factory.mktemp("other-home")
    uri = ok(kachery("--home", str(other), "store", str(sample[0]))).strip()
    assert (other / "store" / "sha256").is_dir()
    assert_user_error(kachery("cat", uri), "not found")  # not in the default home of this test
    assert kachery("--home", str(other), "cat", uri).stdout == sample[1]
