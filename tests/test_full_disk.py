"""A full disk loses no computed value and prints no traceback (issue 19, section 6).

Every scenario runs in subprocesses against a home on a "disk" that the test fills and frees:

- ``tmpfs``: a real 2 MiB tmpfs mounted on the home (root only; skipped where mounting is not
  allowed). Filling writes a filler file until the kernel says ENOSPC; freeing removes it and
  remounts the tmpfs at 16 MiB.
- ``shim``: where mounting is not allowed, a ``sitecustomize`` put on the subprocess's path stands
  in for the operating system: ``os.write`` to a file under the home raises ``OSError(ENOSPC)`` once
  a byte budget is spent (a short write first, as the kernel does). In its ``fsync`` mode writes
  pass and ``os.fsync`` reports the error, as network file systems do. No kachery_tasks function is
  patched: the shim replaces the kernel, not our code.

After each full-disk call: the value is returned with exactly one warning naming the home,
``kachery verify`` passes, no temp file is left in the store, and once space is freed a second call
records the result (a third is a hit).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kachery_tasks import config

REPO = Path(__file__).resolve().parents[1]

SHIM = r'''
"""Test shim (tests/test_full_disk.py): a disk that is full past a byte budget, for files under
KT_FULL_HOME. The budget file holds a number of bytes ("inf": unlimited), re-read when replaced."""
import errno
import os

_HOME = os.path.realpath(os.environ["KT_FULL_HOME"]) + os.sep
_BUDGET = os.environ["KT_FULL_BUDGET"]
_MODE = os.environ.get("KT_FULL_MODE", "write")  # "write": write refuses; "fsync": fsync reports it
_write, _fsync = os.write, os.fsync
_state = {"stamp": None, "left": None, "late": set()}


def _left():
    try:
        st = os.stat(_BUDGET)
    except FileNotFoundError:
        return None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if stamp != _state["stamp"]:
        with open(_BUDGET) as fh:
            text = fh.read().strip()
        _state["stamp"], _state["left"] = stamp, None if text == "inf" else int(text)
    return _state["left"]


def _under_home(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(_HOME)
    except OSError:
        return False


def _full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write(fd, data):
    if not _under_home(fd):
        return _write(fd, data)
    left = _left()
    n = memoryview(data).nbytes
    if left is None or n <= left:
        if left is not None:
            _state["left"] = left - n
        return _write(fd, data)
    if _MODE == "fsync":
        st = os.fstat(fd)
        _state["late"].add((st.st_dev, st.st_ino))
        _state["left"] = 0
        return _write(fd, data)
    if left <= 0:
        raise _full()
    _state["left"] = 0
    return _write(fd, memoryview(data).cast("B")[:left])


def fsync(fd):
    if _MODE == "fsync" and _under_home(fd):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in _state["late"]:
            raise _full()
    return _fsync(fd)


os.write = write
os.fsync = fsync
'''

TASKS = r'''
import os
import time

import numpy as np

import kachery_tasks as kt

N = 400_000  # 3.05 MiB as npy: more than the full disk has


@kt.pure
def big(n):
    return np.arange(n, dtype="float64")


@kt.pure
def small(x):  # inline: only its record needs space
    return {"x": x, "squares": [i * i for i in range(x)]}


@kt.query
def latest(n):
    return np.arange(n, dtype="float64") * 2


@kt.pure
def fails(x):
    raise ValueError(f"boom {x}")


@kt.pure
def slow(n):
    time.sleep(0.5)
    return np.arange(n, dtype="float64")


@kt.action
def act(marker, fill):
    """Changes the outside world (appends to ``marker``), and the disk fills while it runs."""
    with open(marker, "a") as fh:
        fh.write("ran\n")
    if fill.get("budget"):
        tmp = fill["budget"] + ".new"
        with open(tmp, "w") as fh:
            fh.write("0")
        os.replace(tmp, fill["budget"])
    if fill.get("filler"):
        with open(fill["filler"], "ab") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
'''

PRELUDE = r'''
import json, sys, warnings
import numpy as np
sys.path.insert(0, {mods!r})
import fulltasks as ft
from kachery_tasks.tasks.stats import STATS
out = {{}}

def summary(value):
    if isinstance(value, np.ndarray):
        return float(value.sum())
    if hasattr(value, "ok") and hasattr(value, "state"):
        return {{"ok": value.ok, "state": value.state}}
    return value

def call(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value, error = summary(fn(*args, **kwargs)), None
        except Exception as exc:
            value, error = None, f"{{type(exc).__name__}}: {{exc}}"
    return {{"value": value, "error": error,
            "warnings": [[w.category.__name__, str(w.message)] for w in caught]}}
'''

N = 400_000
BIG_SUM = float(N * (N - 1) / 2)


# -- the disks -------------------------------------------------------------------------------------
class Disk:
    """A home on a disk that can be filled and freed; ``env`` runs subprocesses there."""

    name = ""

    def __init__(self, root: Path, base_env: dict[str, str]):
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        self.mods = root / "mods"
        self.mods.mkdir()
        (self.mods / "fulltasks.py").write_text(TASKS)
        self.env = {**base_env, config.ENV_PREFIX + "HOME": str(self.home)}

    def fill(self) -> None:
        raise NotImplementedError

    def free(self) -> None:
        raise NotImplementedError

    def fill_spec(self) -> dict[str, str]:
        """What the ``act`` task does to fill the disk while it runs."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class TmpfsDisk(Disk):
    name = "tmpfs"

    def __init__(self, root: Path, base_env: dict[str, str]):
        super().__init__(root, base_env)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root; the shim variant covers this")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(self.home)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the shim variant covers this")
        self.filler = self.home / "filler.bin"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,size=16m", str(self.home)], check=True)

    def fill_spec(self) -> dict[str, str]:
        return {"filler": str(self.filler)}

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.home)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.home)], capture_output=True)


class ShimDisk(Disk):
    name = "shim"
    mode = "write"

    def __init__(self, root: Path, base_env: dict[str, str]):
        super().__init__(root, base_env)
        shim_dir = root / "shim"
        shim_dir.mkdir()
        (shim_dir / "sitecustomize.py").write_text(SHIM)
        self.budget = root / "budget"
        self.env["PYTHONPATH"] = os.pathsep.join([str(shim_dir), self.env["PYTHONPATH"]])
        self.env.update(KT_FULL_HOME=str(self.home), KT_FULL_BUDGET=str(self.budget), KT_FULL_MODE=self.mode)
        self.free()

    def _set(self, text: str) -> None:
        tmp = self.root / "budget.new"
        tmp.write_text(text)
        os.replace(tmp, self.budget)

    def fill(self) -> None:
        self._set("0")

    def free(self) -> None:
        self._set("inf")

    def fill_spec(self) -> dict[str, str]:
        return {"budget": str(self.budget)}


class LateShimDisk(ShimDisk):
    """Writes pass, ``fsync`` fails: a full disk as a network file system reports it."""

    name = "shim-fsync"
    mode = "fsync"


@pytest.fixture(params=[TmpfsDisk, ShimDisk], ids=lambda cls: cls.name)
def disk(request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str]) -> Iterator[Disk]:
    made = request.param(tmp_path, env)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def tmpfs(tmp_path: Path, env: dict[str, str]) -> Iterator[TmpfsDisk]:
    made = TmpfsDisk(tmp_path, env)
    try:
        yield made
    finally:
        made.close()


# -- helpers ---------------------------------------------------------------------------------------
def run_script(disk: Disk, body: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run PRELUDE + ``body`` (which fills ``out``) in a subprocess; returns ``out``."""
    code = PRELUDE.format(mods=str(disk.mods)) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", code], env={**disk.env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kachery(disk: Disk, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kachery_tasks.cli", *args], env=disk.env,
                          capture_output=True, text=True, timeout=180, cwd=REPO)


def prime(disk: Disk) -> None:
    """A first record while there is space: the node key, the lock file and the directories."""
    run_script(disk, "out['primed'] = call(ft.small, 1)")


def assert_one_full_warning(result: dict[str, Any], disk: Disk, *, needs: bool = True) -> str:
    assert result["error"] is None, result
    assert len(result["warnings"]) == 1, result["warnings"]
    category, message = result["warnings"][0]
    assert category == "StoreFullWarning"
    assert str(disk.home) in message
    assert "KACHERY_TASKS_HOME" in message and "--home" in message
    assert "\n" not in message
    if needs:
        assert "needs " in message
    return message


def assert_store_consistent(disk: Disk) -> None:
    """``kachery verify`` passes and the store holds no temp file (none was left to clean up)."""
    leftovers = [str(p) for p in disk.home.rglob("*")
                 if p.is_file() and (p.name.startswith((".tmp-", "blob-", "link-")) or p.parent.name == "tmp")]
    assert leftovers == []
    done = kachery(disk, "verify", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["damaged"] == [] and report["temp_files_removed"] == 0


def assert_one_error_line(done: subprocess.CompletedProcess, disk: Disk, reason: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kachery: error: ") and reason in lines[0] and str(disk.home) in lines[0]


# -- tasks -----------------------------------------------------------------------------------------
def test_pure_value_is_returned_with_one_warning_then_recorded_when_space_is_back(disk: Disk) -> None:
    prime(disk)
    disk.fill()
    full = run_script(disk, """
        out["big"] = call(ft.big, ft.N)
        out["small"] = call(ft.small, 50)
        out["stats"] = STATS.snapshot()
    """)
    assert full["big"]["value"] == BIG_SUM
    message = assert_one_full_warning(full["big"], disk)
    assert "ft.big" in message or "fulltasks.big" in message
    assert full["small"]["value"] == {"x": 50, "squares": [i * i for i in range(50)]}
    assert_one_full_warning(full["small"], disk)  # the blob-less record itself did not fit
    assert full["stats"].get("recorded", 0) == 0
    assert_store_consistent(disk)

    disk.free()
    again = run_script(disk, """
        out["big"] = call(ft.big, ft.N)
        out["small"] = call(ft.small, 50)
        out["stats"] = STATS.snapshot()
    """)
    assert again["big"] == {"value": BIG_SUM, "error": None, "warnings": []}
    assert again["small"]["warnings"] == []
    assert again["stats"]["recorded"] == 2
    hit = run_script(disk, """
        out["big"] = call(ft.big, ft.N)
        out["small"] = call(ft.small, 50)
        out["stats"] = STATS.snapshot()
    """)
    assert hit["big"]["value"] == BIG_SUM and "computed" not in hit["stats"]
    assert_store_consistent(disk)


def test_query_and_failure_on_a_full_disk(disk: Disk) -> None:
    prime(disk)
    disk.fill()
    full = run_script(disk, """
        out["query"] = call(ft.latest, ft.N)
        out["fails"] = call(ft.fails, 3)
    """)
    assert full["query"]["value"] == 2 * BIG_SUM
    assert_one_full_warning(full["query"], disk)
    # the user's exception, not the disk's, with one warning that its failure was not recorded
    assert full["fails"]["error"] == "ValueError: boom 3"
    assert [w[0] for w in full["fails"]["warnings"]] == ["StoreFullWarning"]
    assert str(disk.home) in full["fails"]["warnings"][0][1]
    assert_store_consistent(disk)
    disk.free()
    again = run_script(disk, "out['query'] = call(ft.latest, ft.N)")
    assert again["query"] == {"value": 2 * BIG_SUM, "error": None, "warnings": []}


def test_waiters_compute_for_themselves_when_the_holder_could_not_record(disk: Disk) -> None:
    prime(disk)
    disk.fill()
    full = run_script(disk, """
        import threading
        values = []

        def both():  # one catch_warnings around both threads: it is process-wide, not per thread
            threads = [threading.Thread(target=lambda: values.append(summary(ft.slow(ft.N)))) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)

        out["both"] = call(both)
        out["values"] = values
        out["stats"] = STATS.snapshot()
    """)
    assert full["values"] == [BIG_SUM, BIG_SUM]  # nobody was left waiting on the lock
    assert full["stats"]["computed"] == 2  # the waiter found no record, so it computed itself
    assert [w[0] for w in full["both"]["warnings"]] == ["StoreFullWarning"] * 2
    assert_store_consistent(disk)
    disk.free()
    again = run_script(disk, "out['slow'] = call(ft.slow, ft.N); out['stats'] = STATS.snapshot()")
    assert again["slow"]["warnings"] == [] and again["stats"]["recorded"] == 1


def test_dask_cached_and_delayed_return_values_with_one_warning(disk: Disk) -> None:
    pytest.importorskip("dask")
    prime(disk)
    disk.fill()
    body = """
        import dask
        from kachery_tasks.dask import cached

        def on_dask(make):
            return lambda: make().compute(scheduler="threads")

        out["cached"] = call(on_dask(lambda: cached(dask.delayed(ft.big.func, pure=True)(ft.N))))
        out["delayed"] = call(on_dask(lambda: ft.big.delayed(ft.N)))
        out["stats"] = STATS.snapshot()
    """
    full = run_script(disk, body)
    for path in ("cached", "delayed"):
        assert full[path]["value"] == BIG_SUM
        full[path]["warnings"] = [w for w in full[path]["warnings"] if "Deprecation" not in w[0]]
        assert_one_full_warning(full[path], disk)
    assert full["stats"].get("recorded", 0) == 0
    assert_store_consistent(disk)
    disk.free()
    again = run_script(disk, body)
    assert again["cached"]["value"] == again["delayed"]["value"] == BIG_SUM
    assert again["stats"]["recorded"] == 2


# Actions on the shim only: on a tmpfs a log line of a few hundred bytes usually still fits in the
# last page of the log file, so the disk being full would not show.
def test_an_action_that_ran_is_reported_and_never_logged_as_succeeded(tmp_path: Path, env: dict[str, str]) -> None:
    disk = ShimDisk(tmp_path, env)
    marker = tmp_path / "outside.txt"
    run_script(disk, f"out['warm'] = call(ft.act, {str(tmp_path / 'warm')!r}, {{}})")  # the log exists
    done = run_script(disk, f"out['act'] = call(ft.act, {str(marker)!r}, {disk.fill_spec()!r})")
    # It ran, it says so, and one warning says its outcome is not in the log.
    assert done["act"]["value"] == {"ok": True, "state": "succeeded"}
    message = assert_one_full_warning(done["act"], disk, needs=False)
    assert "kachery task resolve" in message
    assert marker.read_text() == "ran\n"
    disk.free()
    again = run_script(disk, f"out['act'] = call(ft.act, {str(marker)!r}, {disk.fill_spec()!r})")
    assert again["act"]["value"] == {"ok": False, "state": "unknown"}  # not "succeeded", and not rerun
    assert marker.read_text() == "ran\n"


def test_an_action_whose_start_cannot_be_logged_does_not_run(tmp_path: Path, env: dict[str, str]) -> None:
    disk = ShimDisk(tmp_path, env)
    marker = tmp_path / "outside.txt"
    run_script(disk, f"out['warm'] = call(ft.act, {str(tmp_path / 'warm')!r}, {{}})")
    disk.fill()
    done = run_script(disk, f"out['act'] = call(ft.act, {str(marker)!r}, {{}})")
    assert done["act"]["error"].startswith("StoreFullError: cannot write to kachery home")
    assert not marker.exists()


def test_late_errors_from_fsync_leave_nothing_behind(tmp_path: Path, env: dict[str, str]) -> None:
    """Network file systems may accept the writes and report the full disk at fsync."""
    disk = LateShimDisk(tmp_path, env)
    prime(disk)
    disk.fill()
    full = run_script(disk, """
        out["big"] = call(ft.big, ft.N)
        out["small"] = call(ft.small, 60)
    """, extra_env={config.ENV_PREFIX + "RECORD_SYNC_SECONDS": "0"})  # the record's own fsync too
    assert full["big"]["value"] == BIG_SUM
    assert_one_full_warning(full["big"], disk)
    assert full["small"]["value"]["x"] == 60
    assert_one_full_warning(full["small"], disk)
    assert_store_consistent(disk)
    disk.free()
    again = run_script(disk, "out['big'] = call(ft.big, ft.N); out['stats'] = STATS.snapshot()")
    assert again["big"]["warnings"] == [] and again["stats"]["recorded"] == 1


# -- the command line ------------------------------------------------------------------------------
def test_cli_writes_on_a_full_disk_are_one_line(disk: Disk, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(3 * 2**20))
    feed = kachery(disk, "feed", "create").stdout.strip()
    assert feed.startswith("feed://")
    assert kachery(disk, "feed", "append", feed, "main", '{"n": 0}').returncode == 0
    disk.fill()

    stored = kachery(disk, "store", str(source))
    assert_one_error_line(stored, disk, "no space left on device (needs 3.0 MiB")
    appended = kachery(disk, "feed", "append", feed, "main", json.dumps({"n": 1, "pad": "x" * 8192}))
    assert_one_error_line(appended, disk, "no space left on device")
    if isinstance(disk, TmpfsDisk):  # SQLite writes through its own calls, not os.write
        assert_one_error_line(kachery(disk, "mutable", "set", "k", json.dumps("v" * 100_000)), disk,
                              "no space left on device")
    assert_store_consistent(disk)

    disk.free()
    stored = kachery(disk, "store", str(source))
    assert stored.returncode == 0 and stored.stdout.startswith("sha256://")
    assert kachery(disk, "feed", "append", feed, "main", '{"n": 2}').returncode == 0
    shown = kachery(disk, "feed", "show", feed, "main", "--json")
    assert [json.loads(line)["body"]["n"] for line in shown.stdout.splitlines()] == [0, 2]


def test_cli_on_a_read_only_home_is_one_line(tmpfs: TmpfsDisk, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"some bytes")
    tmpfs.read_only()
    assert_one_error_line(kachery(tmpfs, "store", str(source)), tmpfs, "read-only file system")


def test_cli_copies_out_to_a_full_disk_are_one_line(tmpfs: TmpfsDisk, tmp_path: Path) -> None:
    """``load -o`` and ``cat >`` write outside the home: the line names the target, not the home."""
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(3 * 2**19))
    tmpfs.free()
    uri = kachery(tmpfs, "store", str(source)).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    try:
        loaded = kachery(tmpfs, "load", uri, "-o", str(out / "copy.bin"))
        assert loaded.returncode == 1 and "Traceback" not in loaded.stderr
        assert loaded.stderr.splitlines() == [f"kachery: error: cannot write {str(out / 'copy.bin')!r}: no space "
                                              "left on device; free space there or copy it elsewhere with -o"]
        assert list(out.iterdir()) == []  # no partial copy under any name
        for unbuffered in ("", "1"):  # a raw stdout writes part of a block, then raises
            with open(out / "cat.bin", "wb") as fh:
                catted = subprocess.run([sys.executable, "-m", "kachery_tasks.cli", "cat", uri], stdout=fh,
                                        stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO,
                                        env={**tmpfs.env, "PYTHONUNBUFFERED": unbuffered})
            assert catted.returncode == 1
            assert catted.stderr.splitlines() == ["kachery: error: cannot write to standard output: no space left "
                                                  "on device"]
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def test_a_torn_line_in_the_function_index_costs_no_later_id(home: Path) -> None:
    """An append cut short by a full disk leaves a fragment; the next id appended after it is kept."""
    from kachery_tasks.store import store_for

    store = store_for(home)
    path = Path(store.records.function_index_path("mod.f"))
    path.parent.mkdir(parents=True)
    first, second = "a" * 32, "b" * 32
    path.write_text(f"{first}\n0123abc{second}\n")
    assert store.records.function_task_ids("mod.f") == [first, second]
