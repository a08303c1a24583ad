"""Progress bars of bucket transfers on the command line (cli/output.py): what they count, and that
they appear on a terminal only. A pipe, a log file or a test sees no bar redraws."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kachery_tasks import config
from kachery_tasks.buckets import open_bucket
from kachery_tasks.buckets.transfer import download_blob, upload_blob
from kachery_tasks.cli import output
from kachery_tasks.cli.output import PROGRESS_MIN_OBJECTS, Bar, byte_progress
from kachery_tasks.store.local import store_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """stderr as a terminal that writes into a string."""
    screen = io.StringIO()
    monkeypatch.setattr(output, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=160))
    return screen


def test_the_bar_counts_the_bytes_of_a_real_upload_and_download(terminal: io.StringIO, tmp_path: Path):
    data = os.urandom(300_000)
    here, there = store_for(tmp_path / "a").blobs, store_for(tmp_path / "b").blobs
    digest = here.put_bytes(data)
    (tmp_path / "bucket").mkdir()
    bucket = open_bucket((tmp_path / "bucket").as_uri())
    with config.set(progress_min_bytes=1000):
        with byte_progress(len(data), "publishing", objects=2) as up:
            assert isinstance(up, Bar)
            upload_blob(bucket, here, digest, up, chunk_size=64 * 2**10)  # 5 chunks, 4 in flight
            up.objects(2)
        with byte_progress(len(data), "downloading") as down:
            download_blob(bucket, there, digest, down)
    assert (up.bytes_done, up.objects_done, down.bytes_done) == (len(data), 2, len(data))
    assert "publishing" in terminal.getvalue() and "2/2 objects" in terminal.getvalue()
    assert "downloading" in terminal.getvalue()


def test_no_bar_off_a_terminal_or_below_the_thresholds(terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch):
    with byte_progress(config.get("progress_min_bytes") - 1, "small", objects=PROGRESS_MIN_OBJECTS - 1) as bar:
        assert bar is None
    with byte_progress(0, "records", objects=PROGRESS_MIN_OBJECTS) as bar:  # many records, few bytes
        assert bar is not None
        for _ in range(PROGRESS_MIN_OBJECTS):
            bar.objects()
        assert bar.detail() == f"{PROGRESS_MIN_OBJECTS}/{PROGRESS_MIN_OBJECTS} objects, 0 B"
    monkeypatch.setattr(output, "stderr_console", lambda: Console(file=io.StringIO()))  # a pipe
    with byte_progress(2**40, "huge", objects=10**6) as bar:
        assert bar is None


def _kachery(env: dict[str, str], *args: str, tty: bool) -> tuple[int, str, str]:
    """Run ``kachery ARGS`` with stderr piped, or on a pseudo-terminal; (status, stdout, stderr)."""
    if not tty:
        done = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kachery_tasks.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    screen = b""
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not block:
            break
        screen += block
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), out, screen.decode(errors="replace")


@pytest.mark.parametrize("tty", [False, True], ids=["piped", "terminal"])
def test_publish_and_load_show_bars_on_a_terminal_only(tmp_path: Path, env: dict[str, str], tty: bool):
    (tmp_path / "bucket").mkdir()
    data = os.urandom(200_000)
    (tmp_path / "rec.dat").write_bytes(data)
    env = {**env, "KACHERY_TASKS_BUCKET": (tmp_path / "bucket").as_uri(), "KACHERY_TASKS_PROGRESS_MIN_BYTES": "1k",
           "TERM": "xterm"}
    a, b = {**env, "KACHERY_TASKS_HOME": str(tmp_path / "a")}, {**env, "KACHERY_TASKS_HOME": str(tmp_path / "b")}
    uri = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "store", str(tmp_path / "rec.dat")], env=a,
                         capture_output=True, text=True).stdout.strip()
    status, out, err = _kachery(a, "publish", uri, tty=tty)
    assert status == 0 and out.startswith("published to "), err
    status, out, err2 = _kachery(b, "load", uri, tty=tty)
    assert status == 0 and Path(out.strip()).read_bytes() == data, err2
    if tty:
        assert "publishing" in err and "1/1 objects" in err and "downloading rec.dat" in err2
    else:
        assert err == err2 == "", "no bar, and nothing else, on a pipe"
