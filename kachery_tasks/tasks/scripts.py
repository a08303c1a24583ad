"""Tasks defined in a script (``python pipeline.py``), reachable again from another process.

Why this module exists: a script's functions live in ``__main__``, so their records name
``__main__.make``, a module no other process can import. So a record of a ``__main__`` function
keeps where that ``__main__`` came from (``function.origin``, written by :func:`origin_field`), and
``stale``, ``explain``, ``rerun`` and ``recheck`` load the script again from that path
(:func:`load_script`) without running its ``if __name__ == "__main__":`` block.

Why the script is loaded *as* ``__main__`` rather than imported under another name: a function's
identity has ``__module__`` in it (its name ``__main__.make``, the keys of its ``deps``, and the
qualified type name of every enum, dataclass or named tuple it reads as a constant or default).
Loaded under any other name the same unchanged script would hash differently and look stale. So
the script's code runs in a fresh namespace whose ``__name__`` is ``"__main__"``, and only the
tests of its top-level ``if``/``while``/conditional expressions see ``__name__`` as the module name
the script would have if imported (``pipeline``): every ``__main__`` guard, whatever its form,
is skipped as on an import. While the script loads, ``sys.modules["__main__"]`` is that namespace
(as ``runpy`` does), and the identities of its tasks are computed then, because ``inspect`` finds
a class's source through ``sys.modules[cls.__module__]``: the class hashes are memoized on the
class objects, so they stay right after ``__main__`` is restored.

A notebook cell or ``python -c`` code has no file: the command line cannot reach it, and the
message says which Python call to make in that session instead.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.machinery
import os
import sys
import types
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hashing import class_id
from .task import Task

#: What to call instead of the command line, for functions of a notebook or interactive session.
IN_SESSION = "kt.stale(), kt.explain(job), kt.rerun([ids]) or kt.recheck([ids])"


#: Why a record of ``__main__`` written before ``function.origin`` existed cannot be reached.
NO_ORIGIN = ("recorded before kachery-tasks kept the path of a script's tasks; check it from the script or "
             "notebook itself (kt.stale() at its end), or remove the record (kachery task rm ID) and run "
             "the script again")


class ScriptUnreachable(UserError):
    """The ``__main__`` a record came from cannot be loaded now; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# recording: where a __main__ came from


def origin_field(func: Any) -> dict[str, Any]:
    """``{"origin": {...}}`` for a function of ``__main__``, else ``{}``: spread into a record's
    ``function`` section, so that a process that is not this one can find the function again.

    ``{"kind": "script", "path": <absolute path>, "module": <name if imported from its directory>}``
    for a script (``python pipeline.py``, ``python -m pkg.pipeline``); ``{"kind": "notebook"}`` for
    a Jupyter kernel's cells; ``{"kind": "interactive"}`` for ``python -c``, stdin or a REPL.
    """
    if getattr(func, "__module__", None) != "__main__":
        return {}
    namespace = getattr(func, "__globals__", None)
    if namespace is None:
        namespace = vars(sys.modules["__main__"]) if "__main__" in sys.modules else {}
    file = namespace.get("__file__")
    spec = namespace.get("__spec__")
    spec_name = getattr(spec, "name", None)
    if isinstance(file, str) and file:
        origin = _script_origin(os.path.abspath(file), spec_name if isinstance(spec_name, str) else None)
        if origin is not None:
            return {"origin": dict(origin)}
    return {"origin": {"kind": "notebook" if "ipykernel" in sys.modules else "interactive"}}


def _is_script_file(file: Any) -> bool:
    """Whether a ``__main__.__file__`` names a script: not ``<stdin>``, nor a notebook front end's
    ``.ipynb``, nor a file that is gone."""
    return isinstance(file, str) and not file.endswith(".ipynb") and os.path.isfile(file)


@functools.lru_cache(maxsize=256)
def _script_origin(path: str, spec_name: str | None) -> dict[str, Any] | None:
    if not _is_script_file(path):
        return None
    if spec_name and spec_name != "__main__":  # python -m pkg.pipeline
        module = spec_name
    else:
        stem = Path(path).stem
        module = stem if stem.isidentifier() else None
    return {"kind": "script", "path": path, "module": module}


# ---------------------------------------------------------------------------------------------
# replay: the script loaded again

_LOADED: dict[str, tuple[tuple[int, int], types.ModuleType | ScriptUnreachable]] = {}


def main_namespace(origin: dict[str, Any] | None) -> types.ModuleType:
    """The ``__main__`` a record with this ``function.origin`` was made in, as its code is now.

    The running process's own ``__main__`` when it is that script (``kt.stale()`` at the end of
    the pipeline) or that notebook; else the script loaded again from its recorded path.
    Raises :class:`ScriptUnreachable` with a one-line reason.
    """
    live = sys.modules.get("__main__")
    live_file = getattr(live, "__file__", None)
    if origin is None:  # a record older than origins: only the process it came from may know it
        if live is None:
            raise ScriptUnreachable(NO_ORIGIN)
        return live
    kind = origin.get("kind")
    if kind != "script":
        if live is not None and not _is_script_file(live_file):  # this process is a notebook or session
            return live
        where = "a notebook cell" if kind == "notebook" else "code with no file (python -c, stdin or a REPL)"
        raise ScriptUnreachable(
            f"defined in {where}, which the command line cannot reach; call {IN_SESSION} "
            f"in that {'notebook' if kind == 'notebook' else 'session'}, or move the function into a script or module")
    path = str(origin.get("path") or "")
    if live is not None and _is_script_file(live_file) and _same_file(live_file, path):
        return live
    return load_script(path, origin.get("module"))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_script(path: str, module: str | None = None) -> types.ModuleType:
    """Run the script at ``path`` as ``__main__`` with its ``__main__`` guards off (cached until
    the file changes). Raises :class:`ScriptUnreachable` if it is gone or fails to load."""
    try:
        st = os.stat(path)
        source = Path(path).read_bytes()
    except OSError as exc:
        reason = "is not there now (moved or deleted)" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
        raise ScriptUnreachable(
            f"its script {path} {reason}; run the script from where it is now to record its tasks again") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _LOADED.get(path)
    if cached is not None and cached[0] == stamp:
        if isinstance(cached[1], ScriptUnreachable):
            raise cached[1]
        return cached[1]
    try:
        loaded: types.ModuleType | ScriptUnreachable = _execute(path, source, module)
    except ScriptUnreachable as exc:
        loaded = exc
    _LOADED[path] = (stamp, loaded)
    if isinstance(loaded, ScriptUnreachable):
        raise loaded
    return loaded


def _execute(path: str, source: bytes, module: str | None) -> types.ModuleType:
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        raise ScriptUnreachable(
            f"its script {path} does not parse now (SyntaxError line {exc.lineno}: {exc.msg}); fix it and retry") from None
    tree = _GuardsAsImported(module or Path(path).stem).visit(tree)
    ast.fix_missing_locations(tree)
    code = compile(tree, path, "exec", dont_inherit=True)
    namespace = types.ModuleType("__main__")
    namespace.__file__ = path
    if module and "." in module:  # python -m pkg.pipeline: relative imports and the same origin
        namespace.__package__ = module.rpartition(".")[0]
        namespace.__spec__ = importlib.machinery.ModuleSpec(module, None, origin=path)
    root = Path(path).parent
    for _ in range((module or "").count(".")):
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # as `python pipeline.py` has it; kept for imports at run time
    saved_main, saved_argv = sys.modules.get("__main__"), sys.argv
    sys.modules["__main__"] = namespace
    sys.argv = [path]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the script's prints must not mix into --json
            try:
                exec(code, vars(namespace))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 -- SystemExit from a script is a reason too
                message = " ".join(str(exc).split()) or "no message"
                raise ScriptUnreachable(
                    f"its script {path} fails to load ({type(exc).__name__}: {message}); fix it, or move "
                    f"what runs the pipeline under `if __name__ == \"__main__\":`, and retry") from None
        _identify_tasks(namespace)
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        sys.argv = saved_argv
    return namespace


def _identify_tasks(namespace: types.ModuleType) -> None:
    """Compute the identities of the script's tasks and classes while it is ``sys.modules["__main__"]``
    (see the module docstring); a failure here shows again, with its message, when the task is used."""
    for value in list(vars(namespace).values()):
        members = [value, *vars(value).values()] if isinstance(value, type) else [value]
        for obj in members:
            try:
                if isinstance(obj, Task):
                    obj.function_id  # noqa: B018 -- computed for its memo
                elif isinstance(obj, type) and obj.__module__ == "__main__":
                    class_id(obj)
            except Exception:  # noqa: BLE001
                pass


class _GuardsAsImported(ast.NodeTransformer):
    """In the tests of top-level ``if``, ``while`` and conditional expressions, ``__name__`` reads as
    the module's import name: ``if __name__ == "__main__":`` (in any spelling) is skipped, and every
    function and class is still defined in a namespace named ``__main__``."""

    def __init__(self, import_name: str) -> None:
        self.import_name = import_name

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node  # bodies run later, when called, with __name__ == "__main__" as originally

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If | ast.While) -> ast.AST:
        node.test = _NameAsConstant(self.import_name).visit(node.test)
        self.generic_visit(node)
        return node

    visit_While = visit_If

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        node.test = _NameAsConstant(self.import_name).visit(node.test)
        self.generic_visit(node)
        return node


class _NameAsConstant(ast.NodeTransformer):
    def __init__(self, import_name: str) -> None:
        self.import_name = import_name

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "__name__" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(self.import_name), node)
        return node
