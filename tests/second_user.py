"""Running a subprocess as a second Unix user (uid and gid 65534, ``nobody``/``nogroup``), for tests
of what another user's credentials can and cannot do: a home shared through a group, a bucket it may
read and not write. Tests run as root, and permissions alone deny root nothing.

The interpreter must be one that user can run. The test's own may live where that user cannot reach
(a pyenv under ``/root``, mode 0700); then the system's Python of the same minor version is used,
with this interpreter's site-packages first on its path (and their ``.pth`` files read, through a
``sitecustomize``), so that it imports the same packages. :func:`second_user` says which, or why
there is none, for the test to skip with.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

UID = GID = 65534
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def reachable_dir(prefix: str = "kt-second-user-") -> Iterator[Path]:
    """A new directory the second user can enter (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give(path: Path) -> Path:
    """Make ``path`` (a directory) the second user's own."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, GID)
    return path


@functools.cache
def second_user() -> tuple[list[str], str] | str:
    """(the interpreter's argv, what its PYTHONPATH needs besides the test's), or why there is none."""
    if os.geteuid() != 0:
        return "needs root to run a subprocess as a second user"
    candidates: list[tuple[list[str], str]] = [([sys.executable], "")]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(system) and os.path.realpath(system) != os.path.realpath(sys.executable):
        candidates.append(([system], os.pathsep.join([_site_shim(), *site.getsitepackages()])))
    problems = []
    for argv, path in candidates:
        try:
            probe = _run(argv, path, ["-c", "import kachery_tasks, numpy"], {"PYTHONPATH": str(REPO)})
        except OSError as exc:
            problems.append(f"{argv[0]}: {exc.strerror}")
            continue
        if probe.returncode == 0:
            return argv, path
        problems.append(f"{argv[0]}: {probe.stderr.strip().splitlines()[-1:]}")
    return f"user {UID} can run no interpreter that imports kachery_tasks ({'; '.join(problems)})"


def run_as_second_user(args: Sequence[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` as the second user, with ``env`` (text output); the caller checked
    :func:`second_user` first."""
    found = second_user()
    assert not isinstance(found, str), found
    argv, path = found
    return _run(argv, path, list(args), env, **kwargs)


def _run(argv: list[str], path: str, args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), path]))
    env["HOME"] = "/nonexistent"  # not root's: nothing of it is readable
    kwargs.setdefault("cwd", "/")
    return subprocess.run([*argv, *args], env=env, user=UID, group=GID, extra_groups=[], capture_output=True,
                          text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def _site_shim() -> str:
    """A directory whose ``sitecustomize`` reads the ``.pth`` files of this interpreter's
    site-packages (editable installs, plugins), as this interpreter does at start."""
    shim = tempfile.mkdtemp(prefix="kt-site-shim-")
    atexit.register(shutil.rmtree, shim, True)
    Path(shim, "sitecustomize.py").write_text(
        f"import site\nfor path in {site.getsitepackages()!r}:\n    site.addsitedir(path)\n")
    os.chmod(shim, 0o755)
    os.chmod(Path(shim, "sitecustomize.py"), 0o644)
    return shim
