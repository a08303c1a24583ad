"""The configuration: precedence default < home file < environment < config.set, and strict keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kachery_tasks as kt
from kachery_tasks import config

_SHOW = (
    "import json; from kachery_tasks import config\n"
    "with config.set(**json.loads({set!r})):\n"
    "    print(json.dumps({{k: [v, s] for k, v, s in config.effective()}}))\n"
)


def _effective(run_python, extra_env=None, set_values=None) -> dict:
    out = run_python(_SHOW.format(set=json.dumps(set_values or {})), extra_env=extra_env)
    return json.loads(out.stdout)


def test_defaults_in_force() -> None:
    assert config.get("inline_max_bytes") == config.DEFAULTS["inline_max_bytes"]
    assert config.get("namespace") == ""


def test_precedence_default_file_env_set(home: Path, run_python) -> None:
    assert _effective(run_python)["inline_max_bytes"] == [8192, "default"]
    (home / "config.yaml").write_text("inline_max_bytes: 100\nnamespace: lab\n")
    found = _effective(run_python)
    assert found["inline_max_bytes"] == [100, str(home / "config.yaml")]
    assert found["namespace"] == ["lab", str(home / "config.yaml")]
    found = _effective(run_python, {"KACHERY_TASKS_INLINE_MAX_BYTES": "200"})
    assert found["inline_max_bytes"] == [200, "env KACHERY_TASKS_INLINE_MAX_BYTES"]
    assert found["namespace"][0] == "lab"  # the file still counts for keys the environment leaves alone
    found = _effective(run_python, {"KACHERY_TASKS_INLINE_MAX_BYTES": "200"}, {"inline_max_bytes": 300})
    assert found["inline_max_bytes"] == [300, "config.set"]


def test_env_values_are_typed(run_python) -> None:
    found = _effective(run_python, {"KACHERY_TASKS_FORCE": "true", "KACHERY_TASKS_NAMESPACE": "123",
                                    "KACHERY_TASKS_TIERS": "[memory]"})
    assert found["force"][0] is True
    assert found["namespace"][0] == "123"  # a string key stays a string
    assert found["tiers"][0] == ["memory"]


def test_set_is_scoped_and_restores_source() -> None:
    with config.set(force=True):
        assert config.get("force") is True
        assert dict((k, s) for k, _, s in config.effective())["force"] == "config.set"
    assert config.get("force") is False
    assert dict((k, s) for k, _, s in config.effective())["force"] == "default"


def test_unknown_key_names_the_closest() -> None:
    with pytest.raises(kt.ConfigError, match="'inline_max_bytes'"), config.set(inline_max_byte=1):
        pass
    with pytest.raises(kt.ConfigError, match="'force'"):
        config.get("forec")


@pytest.mark.parametrize(
    ("key", "value"),
    [("force", "yes"), ("memory_cache_bytes", -1), ("memory_cache_bytes", "ten"), ("tiers", "memory"),
     ("namespace", 5), ("memory_cache_bytes", True)],
)
def test_bad_value_types_are_refused(key: str, value) -> None:
    with pytest.raises(kt.ConfigError, match=key), config.set(**{key: value}):
        pass


#: Every configuration key that holds a size in bytes.
SIZE_KEYS = {"memory_cache_bytes", "inline_max_bytes", "record_args_max_bytes", "record_args_blob_max_bytes",
             "progress_min_bytes"}


def test_size_keys_are_the_byte_options() -> None:
    assert SIZE_KEYS == config.SIZE_KEYS


@pytest.mark.parametrize(("text", "size"), [
    ("1e6", 10**6), ("1_000_000", 10**6), ("2.5e3", 2500), ("0x400", 1024), ("256MiB", 256 * 2**20),
    ("1.5GB", 1_500_000_000), ("512k", 512_000), ("4 KiB", 4096), ("0", 0), (" 7 ", 7),
])
def test_sizes_as_python_writes_numbers_or_with_units(text: str, size: int) -> None:
    """KACHERY_TASKS_MEMORY_CACHE_BYTES=1e6 was refused (issue 27 section 6): every size key takes
    numbers as Python writes them and sizes with units, through config.set as through text."""
    for key in SIZE_KEYS:
        with config.set(**{key: text}):
            assert config.get(key) == size and isinstance(config.get(key), int)
    with config.set(memory_cache_bytes=1e6):
        assert config.get("memory_cache_bytes") == 10**6 and isinstance(config.get("memory_cache_bytes"), int)


@pytest.mark.parametrize("bad", ["", "MB", "-1", "-1k", "1e6.5", "nan", "inf", "1e999", "2**20", "10 parsecs",
                                 float("nan"), float("inf"), -5, [1]])
def test_bad_sizes_are_one_line_naming_the_forms(bad) -> None:
    with pytest.raises(kt.ConfigError) as exc, config.set(inline_max_bytes=bad):
        pass
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and "'inline_max_bytes'" in message
    assert "1e6" in message and "256MiB" in message


def test_sizes_from_environment_and_home_file(home: Path, run_python, kachery) -> None:
    (home / "config.yaml").write_text("inline_max_bytes: 16KiB\nprogress_min_bytes: 1e6\n")
    found = _effective(run_python, {"KACHERY_TASKS_MEMORY_CACHE_BYTES": "1e6",
                                    "KACHERY_TASKS_RECORD_ARGS_MAX_BYTES": "1_000_000",
                                    "KACHERY_TASKS_RECORD_ARGS_BLOB_MAX_BYTES": "1.5GB"})
    assert found["memory_cache_bytes"] == [10**6, "env KACHERY_TASKS_MEMORY_CACHE_BYTES"]
    assert found["record_args_max_bytes"][0] == 10**6
    assert found["record_args_blob_max_bytes"][0] == 1_500_000_000
    assert found["inline_max_bytes"] == [16 * 1024, str(home / "config.yaml")]
    assert found["progress_min_bytes"][0] == 10**6
    proc = kachery("config", "show", extra_env={"KACHERY_TASKS_MEMORY_CACHE_BYTES": "lots"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "KACHERY_TASKS_MEMORY_CACHE_BYTES" in err and "256MiB" in err and "'lots'" in err


def test_home_file_with_unknown_key_is_one_line_error(home: Path, kachery) -> None:
    (home / "config.yaml").write_text("forec: true\n")
    proc = kachery("config", "show")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "did you mean 'force'" in err and "Traceback" not in err


def test_config_show_json_lists_sources(home: Path, kachery) -> None:
    (home / "config.yaml").write_text("namespace: lab\n")
    proc = kachery("config", "show", "--json", extra_env={"KACHERY_TASKS_DASK_MIN_SECONDS": "0.5"})
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == set(config.DEFAULTS)
    assert rows["namespace"]["source"] == str(home / "config.yaml") and rows["namespace"]["value"] == "lab"
    assert rows["dask_min_seconds"] == {"key": "dask_min_seconds", "value": 0.5,
                                        "source": "env KACHERY_TASKS_DASK_MIN_SECONDS"}
    assert rows["force"]["source"] == "default"


def test_home_option_overrides(tmp_path_factory, kachery) -> None:
    other = tmp_path_factory.mktemp("other")
    proc = kachery("--home", str(other), "config", "show", "--json")
    rows = {row["key"]: row for row in json.loads(proc.stdout)}
    assert rows["home"]["value"] == str(other) and rows["home"]["source"] == "--home"


def test_home_option_brings_that_homes_file(tmp_path_factory, kachery) -> None:
    other = tmp_path_factory.mktemp("other")
    (other / "config.yaml").write_text("namespace: other-lab\ninline_max_bytes: 100\n")
    proc = kachery("--home", str(other), "config", "show", "--json",
                   extra_env={"KACHERY_TASKS_INLINE_MAX_BYTES": "200"})
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)}
    assert rows["namespace"] == {"key": "namespace", "value": "other-lab", "source": str(other / "config.yaml")}
    assert rows["inline_max_bytes"]["value"] == 200  # the environment still outranks the file
    (other / "config.yaml").write_text("forec: true\n")
    bad = kachery("--home", str(other), "config", "show")
    err = bad.stderr.decode()
    assert bad.returncode == 1 and "Traceback" not in err and "did you mean 'force'" in err, err
