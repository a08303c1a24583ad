"""Test support for the command line's error contract: a user error is one line, no traceback."""

from __future__ import annotations

import subprocess


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line of a command that failed with a user error (exit 1, ``kachery: error: …``)."""
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kachery: error: "), err
    return lines[0]
