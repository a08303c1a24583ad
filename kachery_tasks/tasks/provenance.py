"""Provenance of a computation: where, when, by what code and at what cost a result was made.

Gathered only when a task computes (never on the hit path). ``peak_rss`` is the peak resident
memory of the computing process so far (``getrusage``), an upper bound for the task itself;
``cpu_s`` is the CPU time of the computing thread, so it stays right on Dask's threaded scheduler.
The git commit is read from the files of the repository that holds the function's module; whether
the tree is dirty costs one ``git status`` per repository per process every ``_GIT_TTL`` seconds.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_GIT_TTL = 10.0
_git_cache: dict[Path, tuple[float, dict[str, Any] | None]] = {}
_git_lock = threading.Lock()
_static: dict[str, Any] | None = None


def _static_fields() -> dict[str, Any]:
    global _static
    if _static is None:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        _static = {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "host": socket.gethostname(),
            "user": user,
        }
    return _static


class Measure:
    """Times a computation; ``fields()`` gives the provenance record."""

    def __init__(self) -> None:
        self.start()
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def start(self) -> None:
        self.started = time.time()
        self._wall0 = time.perf_counter()
        self._cpu0 = time.thread_time()

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.thread_time() - self._cpu0

    def fields(self, packages: dict[str, str], module_file: str | None) -> dict[str, Any]:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            **_static_fields(),
            "pid": os.getpid(),
            "started": self.started,
            "ended": self.started + self.wall_s,
            "wall_s": round(self.wall_s, 6),
            "cpu_s": round(self.cpu_s, 6),
            "peak_rss": peak_kb * 1024 if sys.platform != "darwin" else peak_kb,
            "packages": packages,
            "git": git_state(module_file),
        }


@functools.lru_cache(maxsize=4096)
def _repo_root_of(module_file: str) -> Path | None:
    """The work tree holding a module file; cached, as it is asked at every computed task."""
    return _repo_root(Path(module_file).resolve().parent)


def _repo_root(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def _read_commit(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None
    ref = head[5:]
    try:
        return (git_dir / ref).read_text().strip()
    except OSError:
        pass
    try:
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    except OSError:
        pass
    return None  # a repository with no commit yet


def _dirty(root: Path) -> bool | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run(
            [git, "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, timeout=10, check=True, text=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return bool(out.strip())


def git_state(module_file: str | None) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` for the git work tree holding ``module_file``, or None."""
    if not module_file:
        return None
    root = _repo_root_of(module_file)
    if root is None:
        return None
    now = time.monotonic()
    with _git_lock:
        cached = _git_cache.get(root)
        if cached is not None and now - cached[0] < _GIT_TTL:
            return cached[1]
    git_dir = root / ".git"
    if git_dir.is_file():  # a worktree or submodule: ".git" names the real directory
        text = git_dir.read_text().strip()
        if text.startswith("gitdir: "):
            git_dir = (root / text[8:]).resolve()
    state = {"commit": _read_commit(git_dir), "dirty": _dirty(root), "root": str(root)}
    with _git_lock:
        _git_cache[root] = (now, state)
    return state


def packages_of(deps: dict[str, str]) -> dict[str, str]:
    """The installed packages a function's identity refers to, from its ``deps`` (``pkg==ver``)."""
    packages = {}
    for value in deps.values():
        if isinstance(value, str) and "==" in value:
            name, _, version = value.partition("==")
            if name and " " not in name:
                packages[name] = version
    return packages
