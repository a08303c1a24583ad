"""Group commit of task records (store/durability.py): what a crash can and cannot do to them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from execution_log import note, runs

from kachery_tasks import config
from kachery_tasks.errors import ConfigError
from kachery_tasks.store import current_store
from kachery_tasks.store.durability import GROUP_COMMIT, GroupCommit, sync_filesystem
from kachery_tasks.tasks import MEMORY, pure


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_cheap_records_are_synced_together_within_the_window(home, tmp_path):
    @pure
    def double(x):
        return 2 * x

    GROUP_COMMIT.flush()
    syncs_before = GROUP_COMMIT.syncs
    with config.set(record_sync_seconds=0.3):
        assert [double(i) for i in range(50)] == [2 * i for i in range(50)]
        assert GROUP_COMMIT.pending() == 1  # fifty records, one directory to sync
        assert _wait_until(lambda: GROUP_COMMIT.syncs > syncs_before, timeout=5)
    assert GROUP_COMMIT.pending() == 0
    time.sleep(0.4)
    assert GROUP_COMMIT.syncs == syncs_before + 1


def test_a_computation_longer_than_the_window_is_fsynced_at_once(home):
    @pure
    def slow(x):
        time.sleep(0.06)
        return x

    GROUP_COMMIT.flush()
    with config.set(record_sync_seconds=0.05):
        assert slow(1) == 1
        assert GROUP_COMMIT.pending() == 0


def test_window_zero_fsyncs_every_record(home):
    @pure
    def f(x):
        return x

    GROUP_COMMIT.flush()
    with config.set(record_sync_seconds=0):
        f(1)
        assert GROUP_COMMIT.pending() == 0


def test_the_window_is_checked_like_every_key(home):
    with pytest.raises(ConfigError, match="record_sync_seconds.*non-negative"), config.set(record_sync_seconds=-1):
        pass


@pytest.mark.parametrize("left_by_crash", [b"", b"\0" * 700, b'{"task_id": "ab'])
def test_a_record_a_machine_crash_left_behind_reads_as_absent(home, tmp_path, left_by_crash):
    """Empty, zero-filled or cut short: what a power loss can leave of an unsynced record."""
    log = str(tmp_path / "calls.txt")

    @pure
    def f(x):
        note(log, "ran")
        return {"value": x}

    assert f(3) == {"value": 3}
    path = current_store().records.path(f.task_id(3))
    path.write_bytes(left_by_crash)
    MEMORY.clear()
    assert f(3) == {"value": 3}
    assert len(runs(log)) == 2
    assert path.read_bytes() != left_by_crash  # the recompute wrote a whole record again
    MEMORY.clear()
    assert f(3) == {"value": 3} and len(runs(log)) == 2


def test_a_deferred_record_survives_its_writer_being_killed(tmp_path, home, env):
    """A process crash loses nothing: the record is in the kernel's page cache once renamed."""
    (tmp_path / "crashmod.py").write_text(textwrap.dedent("""
        import os
        from kachery_tasks import pure
        @pure
        def f(x):
            with open(os.environ["CALL_LOG"], "a") as fh:
                fh.write("ran\\n")
            return x + 1
    """))
    log = tmp_path / "calls.txt"
    env = {**env, "CALL_LOG": str(log), "KACHERY_TASKS_RECORD_SYNC_SECONDS": "600"}
    writer = subprocess.Popen(
        [sys.executable, "-c", "import crashmod, os, signal, time; crashmod.f(41); print('done', flush=True); "
         "time.sleep(60)"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "done"
    os.kill(writer.pid, signal.SIGKILL)  # no atexit, no group commit
    writer.wait(timeout=30)
    reader = subprocess.run([sys.executable, "-c", "import crashmod; print(crashmod.f(41))"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == "42"
    assert log.read_text().split() == ["ran"]


def test_flush_at_exit_and_sync_of_a_missing_directory(tmp_path):
    commit = GroupCommit()
    commit.defer(str(tmp_path / "gone"), 600)  # removed before the sync: skipped, not an error
    commit.defer(str(tmp_path), 600)
    assert commit.pending() == 2
    commit.flush()
    assert commit.pending() == 0 and commit.syncs == 2
    with pytest.raises(OSError):
        sync_filesystem(str(tmp_path / "gone"))


def _child_computes_and_reports(home: str, report: str) -> None:
    """Runs in a multiprocessing child, which ends with os._exit (no atexit)."""
    import multiprocessing.util

    from kachery_tasks import config, pure
    from kachery_tasks.store.durability import GROUP_COMMIT

    @pure
    def f(x):
        return x

    def write_report():  # a lower exit priority than the flush: runs after it
        with open(report, "w") as fh:
            fh.write(f"{GROUP_COMMIT.pending()} {GROUP_COMMIT.syncs}")

    with config.set(home=home, record_sync_seconds=600):
        f(1)
        multiprocessing.util.Finalize(None, write_report, exitpriority=1)


def test_a_multiprocessing_child_flushes_before_it_exits(tmp_path, home):
    import multiprocessing

    report = tmp_path / "report.txt"
    proc = multiprocessing.get_context("spawn").Process(target=_child_computes_and_reports,
                                                        args=(str(home), str(report)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    pending, syncs = report.read_text().split()
    assert pending == "0" and int(syncs) >= 1
