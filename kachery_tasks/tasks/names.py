"""Matching recorded function names against a ``--function PATTERN``.

One rule for every command and function that selects records by function (``kachery task ls``,
``task recheck``, ``task stale`` and :func:`kachery_tasks.stale`), so a pattern that finds a
function in one of them finds it in all. It lives in the tasks layer because :mod:`.stale` needs
it and the tasks layer must not import the command line.
"""

from __future__ import annotations

import fnmatch


def function_matches(name: str, pattern: str) -> bool:
    """Whether a recorded function name (``module.qualname``) matches ``PATTERN`` (a glob).

    A pattern without a dot is matched against the function's own name, the last part of its
    qualname: ``noisy`` finds ``pipe.noisy``, not ``pipe.noisy.tol`` (a function ``tol`` that only
    lives in a module named noisy). A pattern with a dot is matched against the whole dotted name
    or its last parts, whole parts only: ``pipe.noisy`` and ``Filter.apply`` (for
    ``pipe.Filter.apply``), never a module path that continues past the pattern.
    """
    if "." not in pattern:
        return fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
