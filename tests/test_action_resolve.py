"""``kachery task resolve`` settles an unknown action outcome once and never rewrites the action log.

Unknown outcomes are made the way they happen: a process killed with SIGKILL inside the action.
Races are run between processes, because the lock that decides them is a kernel lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import one_error_line
from execution_log import note, runs

from kachery_tasks import config
from kachery_tasks.tasks import action

ACTIONS = """
    import os, threading, time
    from kachery_tasks import action
    LOG = os.environ["CALL_LOG"]
    @action
    def send(message):
        with open(LOG, "a") as fh:
            fh.write(message + "\\n")
        time.sleep(float(os.environ.get("SLEEP", "0")))
"""


def _log_messages(home: Path) -> list[dict]:
    """Every body in the action log, as stored (read in this process, so it sees other processes')."""
    from kachery_tasks.tasks.actions import action_log

    log = action_log(str(home))
    with config.set(home=str(home)):
        return [m["body"] for m in log._subfeed.messages()]


def _kill_inside_actions(tmp_path: Path, env: dict[str, str], keys: list[str]) -> None:
    """Start one process that runs an action per key (in threads), and SIGKILL it mid-action."""
    (tmp_path / "actmod_r.py").write_text(textwrap.dedent(ACTIONS))
    code = ("import threading, actmod_r\n"
            + "".join(f"threading.Thread(target=actmod_r.send.call, args=({k!r},), kwargs={{'key': {k!r}}}).start()\n"
                      for k in keys))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env={**env, "SLEEP": "60"})
    deadline = time.time() + 60
    while len(runs(env["CALL_LOG"])) < len(keys) and time.time() < deadline:
        time.sleep(0.05)
    assert len(runs(env["CALL_LOG"])) == len(keys), "the actions never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _replay(tmp_path: Path, env: dict[str, str], key: str) -> str:
    """The next call of the action with ``key``, in a new process: ``ok state replayed``."""
    out = subprocess.run([sys.executable, "-c", f"import actmod_r; r = actmod_r.send.call({key!r}, key={key!r}); "
                          "print(r.ok, r.state, r.replayed)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def env_log(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**env, "CALL_LOG": str(tmp_path / "calls.txt")}


def test_contradictory_flags_are_a_usage_error(home, tmp_path, kachery):
    log = str(tmp_path / "calls.txt")

    @action
    def send(message):
        note(log, message)

    assert send.call("hi", key="invoice-7").ok
    before = _log_messages(home)
    for flags in (["--succeeded", "--failed"], ["--failed", "--succeeded"], []):
        proc = kachery("task", "resolve", "invoice-7", *flags)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("Error:")] and "--succeeded" in err
    assert _log_messages(home) == before
    again = send.call("hi", key="invoice-7")
    assert again.ok and again.replayed and len(runs(log)) == 1


def test_resolving_a_success_is_refused_and_it_still_replays(home, tmp_path, kachery):
    log = str(tmp_path / "calls.txt")

    @action
    def send(message):
        note(log, message)

    assert send.call("pay", key="invoice-42").ok
    before = _log_messages(home)
    line = one_error_line(kachery("task", "resolve", "invoice-42", "--failed"))
    assert "already succeeded" in line and "recorded by its run at" in line and "--override" in line
    from kachery_tasks.tasks.actions import ActionSettledError, action_log

    with pytest.raises(ActionSettledError, match="already succeeded"):  # the API keeps the same rule
        action_log(str(home)).resolve("invoice-42", "failed")
    assert _log_messages(home) == before
    again = send.call("pay", key="invoice-42")
    assert again.ok and again.state == "succeeded" and again.replayed and len(runs(log)) == 1


def test_unknown_outcome_is_settled_once(home, tmp_path, env_log, kachery):
    _kill_inside_actions(tmp_path, env_log, ["invoice-9"])
    assert _replay(tmp_path, env_log, "invoice-9") == "False unknown True"
    settle = kachery("task", "resolve", "invoice-9", "--failed", "--note", "bank says no payment")
    assert settle.returncode == 0, settle.stderr
    line = one_error_line(kachery("task", "resolve", "invoice-9", "--succeeded"))
    assert "already failed" in line and "recorded by a resolve at" in line
    assert _replay(tmp_path, env_log, "invoice-9") == "False failed True"
    settling = [m for m in _log_messages(home) if m["key"] == "invoice-9" and m["state"] != "started"]
    assert [(m["state"], m["outcome"], m["note"]) for m in settling] == [("resolved", "failed", "bank says no payment")]
    listing = json.loads(kachery("task", "actions", "--json").stdout)
    assert [(r["key"], r["state"], r["settled"]) for r in listing] == [("invoice-9", "failed", "resolve")]
    assert len(runs(env_log["CALL_LOG"])) == 1  # never run again


def test_override_is_logged_shown_and_needs_a_note(home, tmp_path, env_log, kachery):
    from kachery_tasks.errors import UserError
    from kachery_tasks.tasks.actions import action_log

    _kill_inside_actions(tmp_path, env_log, ["invoice-5"])
    assert kachery("task", "resolve", "invoice-5", "--failed").returncode == 0
    no_note = kachery("task", "resolve", "invoice-5", "--succeeded", "--override")
    assert no_note.returncode == 2 and b"--note" in no_note.stderr
    with pytest.raises(UserError, match="note"):
        action_log(str(home)).resolve("invoice-5", "succeeded", override=True)
    before = _log_messages(home)
    fixed = kachery("task", "resolve", "invoice-5", "--succeeded", "--override", "--note", "paid after all")
    assert fixed.returncode == 0, fixed.stderr
    after = _log_messages(home)
    assert after[:len(before)] == before and len(after) == len(before) + 1  # appended, nothing rewritten
    entry = after[-1]
    assert entry["state"] == "overridden" and entry["outcome"] == "succeeded" and entry["note"] == "paid after all"
    assert entry["overrides"]["outcome"] == "failed" and entry["user"]
    assert _replay(tmp_path, env_log, "invoice-5") == "True succeeded True"
    row = json.loads(kachery("task", "actions", "--json").stdout)[0]
    assert (row["state"], row["settled"], row["overrides"]["outcome"], row["note"]) == (
        "succeeded", "override", "failed", "paid after all")
    assert b"override of failed" in kachery("task", "actions", extra_env={"COLUMNS": "200"}).stdout
    assert "nothing to override" in one_error_line(
        kachery("task", "resolve", "invoice-5", "--succeeded", "--override", "--note", "again"))


RACER = """
import os, sys, time
from kachery_tasks import config
from kachery_tasks.tasks.actions import action_log
log = action_log(config.home_str())
keys, outcome, go = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
log.latest(keys[0])  # warm: both racers are ready before the start
open(go + "." + outcome, "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
for key in keys:
    try:
        log.resolve(key, outcome)
        print(key, "settled")
    except Exception as exc:
        print(key, type(exc).__name__, str(exc).replace(chr(10), " "))
"""


def test_racing_resolves_end_with_one_settlement(home, tmp_path, env_log):
    keys = ["race-0", "race-1", "race-2"]
    _kill_inside_actions(tmp_path, env_log, keys)
    go = str(tmp_path / "go")
    racers = {outcome: subprocess.Popen([sys.executable, "-c", RACER, ",".join(keys), outcome, go], cwd=tmp_path,
                                        env=env_log, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for outcome in ("succeeded", "failed")}
    deadline = time.time() + 60
    while not all(os.path.exists(f"{go}.{o}") for o in racers) and time.time() < deadline:
        time.sleep(0.01)
    Path(go).touch()
    said = {}
    for outcome, proc in racers.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        for line in out.splitlines():
            key, verdict = line.split(" ", 1)
            said[key, outcome] = verdict
    messages = _log_messages(home)
    for key in keys:
        winners = [o for o in racers if said[key, o] == "settled"]
        assert len(winners) == 1, {o: said[key, o] for o in racers}
        loser = next(o for o in racers if o != winners[0])
        assert said[key, loser].startswith(f"ActionSettledError action {key!r} already {winners[0]}"), said[key, loser]
        settling = [m for m in messages if m["key"] == key and m["state"] != "started"]
        assert [(m["state"], m["outcome"]) for m in settling] == [("resolved", winners[0])]
        expected = "True succeeded True" if winners[0] == "succeeded" else "False failed True"
        assert _replay(tmp_path, env_log, key) == expected
    assert len(runs(env_log["CALL_LOG"])) == len(keys)
