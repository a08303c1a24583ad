"""Single-flight locks (store/flight.py): OFD byte locks, the holders' info files, the flock fallback."""

from __future__ import annotations

import os
import threading
import time

import pytest
from execution_log import note, runs

from kachery_tasks.store import current_store, flight
from kachery_tasks.store.flight import SHOW_AFTER_S, FlightLock
from kachery_tasks.tasks import pure


def _locks_dir():
    return current_store().records.locks_dir


def running():
    return current_store().records.running()


@pytest.fixture(params=["ofd", "flock"])
def lock_kind(request, monkeypatch):
    if request.param == "ofd" and not flight.OFD:
        pytest.skip("OFD locks are Linux-only")
    if request.param == "flock":
        monkeypatch.setattr(flight, "OFD", False)  # the path taken where OFD locks are missing
    return request.param


def test_a_lock_excludes_other_descriptions_and_is_free_again_after_release(home, lock_kind):
    first, second = FlightLock(_locks_dir(), "ab" * 16), FlightLock(_locks_dir(), "ab" * 16)
    assert first.acquire()
    assert not second.acquire(blocking=False)  # another thread or process: it waits
    assert FlightLock(_locks_dir(), "cd" * 16).acquire(blocking=False)  # other ids are not held up
    first.release(done=True)
    assert second.acquire(blocking=False)
    second.release(done=True)


def test_threads_compute_once(home, tmp_path, lock_kind):
    log = str(tmp_path / "calls.txt")

    @pure
    def slow(x):
        note(log, "ran")
        time.sleep(0.3)
        return x * 3

    results = []
    threads = [threading.Thread(target=lambda: results.append(slow(7))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [21] * 6 and len(runs(log)) == 1


def test_short_computations_create_no_file_per_task(home):
    if not flight.OFD:
        pytest.skip("without OFD locks the per-task file is the lock")

    @pure
    def quick(x):
        return x + 1

    assert [quick(i) for i in range(50)] == list(range(1, 51))
    time.sleep(SHOW_AFTER_S + 0.3)  # past the moment a long holder would have shown itself
    assert sorted(p.name for p in _locks_dir().iterdir()) == ["flight.lock"]


def test_a_long_holder_is_listed_while_it_runs_and_then_gone(home, tmp_path, lock_kind):
    started = threading.Event()

    @pure(ignore_globals=["started"])
    def long(x):
        started.set()
        time.sleep(SHOW_AFTER_S + 1.0)
        return x

    worker = threading.Thread(target=long, args=(5,))
    worker.start()
    started.wait(10)
    time.sleep(SHOW_AFTER_S + 0.4)
    listed = running()
    assert [(r["task_id"], r["pid"]) for r in listed] == [(long.task_id(5), os.getpid())]
    assert listed[0]["started"] <= time.time() - SHOW_AFTER_S  # the time it took the lock
    worker.join()
    assert running() == []
    assert not list(_locks_dir().glob("*/*.lock"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_lock_after_release(home, lock_kind):
    """A task that forks shares its lock's descriptor with the child: release must unlock, not
    only close, or the child would hold every waiter until it exits."""
    lock = FlightLock(_locks_dir(), "ef" * 16)
    lock.acquire()
    pid = os.fork()
    if pid == 0:  # the child: outlives the release, holding a copy of the descriptor
        time.sleep(5)
        os._exit(0)
    try:
        lock.release(done=False)
        assert FlightLock(_locks_dir(), "ef" * 16).acquire(blocking=False)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_lock_files_are_group_writable_whatever_the_umask(home, lock_kind):
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name
    old = os.umask(0o077)
    try:
        from kachery_tasks import config

        with config.set(shared_group=group):
            lock = FlightLock(_locks_dir(), "12" * 16)
            lock.acquire()
            made = _locks_dir() / "flight.lock" if lock_kind == "ofd" else lock.path
            mode = stat.S_IMODE(made.stat().st_mode)
            lock.release(done=False)
    finally:
        os.umask(old)
    assert mode & 0o060 == 0o060  # another member of the group can open it to lock
