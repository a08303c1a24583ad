"""Function identity: a name plus a code hash over what the function really runs.

Peers hash only the decorated function's own source, so edits to helpers, constants and closures
are invisible and serve stale results. Here the code hash covers the normalized AST of the
function and, transitively, every user-defined function or class it reaches, every module-level
constant it reads (by value, with the canonical encoder) and every library it calls (by package
version). The reached pieces are kept in ``FunctionId.deps`` so ``explain`` can name what changed.

Cost: the static part (AST hash and referenced names) is memoized per code object; the dynamic
part (values of globals, closures, defaults) is re-read each call, but a repeated call whose
reached objects are all the same objects returns the cached id after identity checks only.
"""

from __future__ import annotations

import ast
import builtins
import dis
import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import sysconfig
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from kachery_tasks.errors import UnhashableArgument
from kachery_tasks.hashing.canonical import BUILTIN_CALLABLES, builtin_name, hash_value
from kachery_tasks.hashing.memo import IdentityMemo

_MISSING = object()
_PY = f"python=={sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class FunctionId:
    """Identity of a function: ``name`` plus ``code_hash``; ``deps`` lists what went into the hash.

    ``deps`` maps each reached user function/class (``module.qualname``), module constant
    (``module.NAME``) and package (``numpy``) to its own hash or ``dist==version``. It is derived
    data, so it takes no part in equality.
    """

    name: str
    code_hash: str
    deps: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __kachery_canon__(self) -> tuple[str, str]:
        return (self.name, self.code_hash)


# ---------------------------------------------------------------------------------------------
# where code comes from


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths}
    return tuple(sorted(dirs))


_STDLIB_DIRS = _stdlib_dirs()


@functools.lru_cache(maxsize=4096)
def module_kind(modname: str) -> str:
    """'user', 'stdlib' or 'package'. User code is anything outside the stdlib and site-packages."""
    if modname == "__main__":
        return "user"
    top = modname.partition(".")[0]
    if top == "kachery_tasks":
        return "package"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "stdlib"
    mod = sys.modules.get(modname)
    path = getattr(mod, "__file__", None) if mod is not None else _unimported_origin(top)
    if not path:
        return "user"
    real = os.path.realpath(path)
    parts = set(real.split(os.sep))
    if "site-packages" in parts or "dist-packages" in parts:
        return "package"
    if any(real.startswith(d + os.sep) for d in _STDLIB_DIRS):
        return "stdlib"
    return "user"


@functools.lru_cache(maxsize=1024)
def _unimported_origin(top: str) -> str | None:
    """Where a top-level module that is not imported yet would load from, found without importing
    it: a function that imports a package inside its body must get the same id before and after
    that package is first imported."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    return spec.origin


def _is_user(modname: str | None) -> bool:
    return modname is None or module_kind(modname) == "user"


@functools.lru_cache(maxsize=1)
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=1024)
def package_version(modname: str) -> tuple[str, str]:
    """(top-level name, ``dist==version``) for a non-user module; stdlib counts as the Python version."""
    top = modname.partition(".")[0]
    if module_kind(modname) == "stdlib":
        return top, _PY
    for dist in _distributions().get(top, []):
        try:
            return top, f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    if top == "kachery_tasks":
        try:
            return top, f"kachery-tasks=={importlib.metadata.version('kachery-tasks')}"
        except importlib.metadata.PackageNotFoundError:
            pass
    version = getattr(sys.modules.get(top), "__version__", None)
    return top, f"{top}=={version if isinstance(version, str) else 'unknown'}"


# ---------------------------------------------------------------------------------------------
# the static part: normalized AST hash and referenced names, memoized per code object


@dataclass(frozen=True)
class _Static:
    own_hash: str
    globals: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]
    imports: tuple[str, ...]


_STATIC: IdentityMemo[_Static] = IdentityMemo()


def _dump(node: Any) -> str:
    """ast.dump without positions, leaving out empty/None fields (stable across Python versions)."""
    if isinstance(node, ast.AST):
        parts = [type(node).__name__]
        for name in node._fields:
            value = getattr(node, name, None)
            if value is None or value == []:
                continue
            parts.append(f"{name}={_dump(value)}")
        return "(" + " ".join(parts) + ")"
    if isinstance(node, list):
        return "[" + ",".join(_dump(x) for x in node) + "]"
    return repr(node)


class _DropDocstrings(ast.NodeTransformer):
    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        return node


def _parse_source(obj: Any) -> tuple[ast.AST, int] | None:
    try:
        lines, start = inspect.getsourcelines(obj)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    return tree, start


def _ast_hash(node: ast.AST, keep_decorators: bool) -> str:
    node = _DropDocstrings().visit(node)
    if not keep_decorators and hasattr(node, "decorator_list"):
        node.decorator_list = []
    return "ast:" + xxhash.xxh3_128_hexdigest(_dump(node).encode("utf-8", "surrogatepass"))


def _function_node(code: types.CodeType, tree: ast.AST) -> ast.AST | None:
    if code.co_name == "<lambda>":
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda) and n.lineno == 1]
        return found[0] if len(found) == 1 else None
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return n if n.name == code.co_name else None
    return None


def code_identity(code: types.CodeType) -> str:
    """Identity of code with no usable source: bytecode, constants (nested code too) and names."""
    consts = tuple(("code", code_identity(c)) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    parts = (
        code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
        code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, consts,
    )
    try:
        return "code:" + hash_value(parts)
    except UnhashableArgument:  # constants are literals; this is a safety net only
        return "code:" + xxhash.xxh3_128_hexdigest(code.co_code + repr(code.co_names).encode())


def _scan(code: types.CodeType) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """Global names, attribute chains (root, attr, ...) and imported modules, nested code included."""
    names: set[str] = set()
    chains: set[tuple[str, ...]] = set()
    imports: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        ins = list(dis.get_instructions(c))
        for k, i in enumerate(ins):
            if i.opname == "IMPORT_NAME":
                imports.add(i.argval)
                continue
            if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                names.add(i.argval)
            elif i.opname not in ("LOAD_DEREF", "LOAD_CLASSDEREF"):
                continue
            chain = [i.argval]
            for j in ins[k + 1 :]:
                if j.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
                    break
                chain.append(j.argval)
            if len(chain) > 1:
                chains.add(tuple(chain))
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    return tuple(sorted(names)), tuple(sorted(chains)), tuple(sorted(imports))


def _static(func: types.FunctionType) -> _Static:
    code = func.__code__
    hit = _STATIC.get(code)
    if hit is not None:
        return hit
    own = None
    parsed = _parse_source(func)
    if parsed is not None:
        node = _function_node(code, parsed[0])
        if node is not None:
            own = _ast_hash(node, keep_decorators=False)
    if own is None:
        own = code_identity(code)
    return _STATIC.put(code, _Static(own, *_scan(code)))


_CLASS_STATIC: IdentityMemo[str] = IdentityMemo()


def _class_hash(cls: type) -> str:
    return _CLASS_STATIC.get_or_compute(cls, _compute_class_hash)


def _compute_class_hash(cls: type) -> str:
    parsed = _parse_source(cls)
    node = next((n for n in ast.walk(parsed[0]) if isinstance(n, ast.ClassDef)), None) if parsed else None
    if node is not None and node.name == cls.__name__:
        h = _ast_hash(node, keep_decorators=True)
    else:  # no source (notebook, exec): the code of its functions and its plain attributes
        parts = []
        for name, member in sorted(vars(cls).items()):
            fn = _member_function(member)
            if fn is not None:
                parts.append((name, _static(fn).own_hash))
        h = "members:" + hash_value(tuple(parts))
    return h


def _member_function(member: Any) -> types.FunctionType | None:
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        member = member.fget
    return member if isinstance(member, types.FunctionType) else None


# ---------------------------------------------------------------------------------------------
# the dynamic part: values reached through globals, closures and defaults

_VALUE_CACHE: IdentityMemo[str] = IdentityMemo()


def _value_hash(obj: Any) -> str:
    """hash_value, reused while ``obj`` is the same object (in-place mutation is not seen)."""
    return _VALUE_CACHE.get_or_compute(obj, hash_value)


def library_callable(obj: Any) -> bool:
    """A function-like object from a package (numpy's array-function dispatchers, numba, ...).

    Only objects that carry their own ``__qualname__`` qualify, so a callable *instance* of a
    library class (a model with weights) is still hashed by value.
    """
    if isinstance(obj, (type, types.FunctionType)) or not callable(obj):
        return False
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and isinstance(getattr(obj, "__qualname__", None), str) and not _is_user(module)


def _exempt(obj: Any) -> bool:
    """Globals that say nothing about results: loggers, typing constructs, __future__ flags."""
    if isinstance(obj, (logging.Logger, logging.LoggerAdapter, typing.TypeVar)):
        return True
    if isinstance(obj, (types.GenericAlias, types.UnionType)):
        return True
    return type(obj).__module__ in ("typing", "typing_extensions", "__future__")


class _Walk:
    """One traversal from a root function; fills ``deps`` and the ``watch`` list of identity checks."""

    def __init__(self, ignore: Iterable[str]) -> None:
        self.deps: dict[str, str] = {}
        self.seen: set[int] = set()
        self.keep: list[Any] = []
        self.watch: list[tuple] = []
        self.ignore = frozenset(ignore)

    def add(self, key: str, h: str) -> None:
        if self.deps.get(key, h) == h:
            self.deps[key] = h
            return
        n = 2
        while self.deps.get(f"{key}#{n}", h) != h:
            n += 1
        self.deps[f"{key}#{n}"] = h

    def first_visit(self, obj: Any) -> bool:
        if id(obj) in self.seen:
            return False
        self.seen.add(id(obj))
        self.keep.append(obj)
        return True

    # -- functions and classes ------------------------------------------------------------------
    def function(self, f: types.FunctionType) -> None:
        if not self.first_visit(f):
            return
        key = f"{f.__module__}.{f.__qualname__}"
        self.watch.append(("k", f, f.__code__, f.__defaults__, f.__kwdefaults__))
        st = _static(f)
        self.add(key, st.own_hash)
        self.references(f, st, key)

    def references(self, f: types.FunctionType, st: _Static, key: str) -> None:
        g = f.__globals__
        modname = g.get("__name__") or f.__module__ or "?"
        for name in st.globals:
            if name in self.ignore or (name.startswith("__") and name.endswith("__")):
                continue
            obj = g.get(name, _MISSING)
            self.watch.append(("g", g, name, obj))
            if obj is _MISSING:
                if not hasattr(builtins, name):
                    self.add(f"{modname}.{name}", "<undefined>")
                continue
            self.value(obj, f"{modname}.{name}", name)
        cells = dict(zip(f.__code__.co_freevars, f.__closure__ or (), strict=False))
        for var, cell in cells.items():
            try:
                obj = cell.cell_contents
            except ValueError:
                obj = _MISSING
            self.watch.append(("c", cell, obj))
            if var not in self.ignore and obj is not _MISSING:
                self.value(obj, f"{key}.<closure>.{var}", var)
        for chain in st.chains:
            root = chain[0]
            obj = g.get(root, _MISSING) if root not in cells else cells[root].cell_contents
            if isinstance(obj, types.ModuleType) and root not in self.ignore:
                self.chain(obj, chain[1:])
        self.defaults(f, key)
        for modname_ in st.imports:
            self.imported(modname_)
        wrapped = getattr(f, "__wrapped__", None)
        if wrapped is not None:
            self.value(wrapped, f"{key}.__wrapped__", "__wrapped__")

    def defaults(self, f: types.FunctionType, key: str) -> None:
        code = f.__code__
        pos = code.co_varnames[: code.co_argcount]
        for name, d in zip(pos[len(pos) - len(f.__defaults__ or ()) :], f.__defaults__ or (), strict=False):
            self.value(d, f"{key}.<default>.{name}", name)
        for name, d in sorted((f.__kwdefaults__ or {}).items()):
            self.value(d, f"{key}.<default>.{name}", name)

    def chain(self, module: types.ModuleType, attrs: tuple[str, ...]) -> None:
        """``mod.sub.helper``: follow modules to the first non-module object."""
        obj: Any = module
        for attr in attrs:
            if not isinstance(obj, types.ModuleType):
                break
            if not _is_user(obj.__name__):
                self.package(obj.__name__)
                return
            parent, obj = obj, getattr(obj, attr, _MISSING)
            self.watch.append(("a", parent, attr, obj))
            if obj is _MISSING:
                self.add(f"{parent.__name__}.{attr}", "<undefined>")
                return
            if not isinstance(obj, types.ModuleType):
                self.value(obj, f"{parent.__name__}.{attr}", attr)
                return

    def imported(self, modname: str) -> None:
        """A module imported inside the function: a package by version, a user module by its source."""
        if modname.partition(".")[0] == "builtins":
            return
        if not _is_user(modname):
            self.package(modname)
            return
        mod = sys.modules.get(modname)
        if mod is None:  # the function will import it when it runs; its source counts now
            try:
                mod = importlib.import_module(modname)
            except Exception:
                mod = None
        parsed = _parse_source(mod) if mod is not None else None
        self.add(f"module:{modname}", _ast_hash(parsed[0], True) if parsed else "<no source>")

    def cls(self, c: type) -> None:
        if not self.first_visit(c):
            return
        key = f"{c.__module__}.{c.__qualname__}"
        self.add(key, _class_hash(c))
        for base in c.__mro__[1:]:
            if base is not object:
                self.value(base, f"{base.__module__}.{base.__qualname__}", base.__name__)
        for name, member in sorted(vars(c).items()):
            fn = _member_function(member)
            if fn is None or fn.__code__.co_filename.startswith("<") or not _is_user(fn.__module__):
                continue
            self.watch.append(("k", fn, fn.__code__, fn.__defaults__, fn.__kwdefaults__))
            self.references(fn, _static(fn), f"{key}.{name}")

    def package(self, modname: str) -> None:
        top, version = package_version(modname)
        if top != "builtins":
            self.add(top, version)

    # -- any reached object ---------------------------------------------------------------------
    def value(self, obj: Any, key: str, name: str) -> None:
        if isinstance(obj, types.ModuleType):
            if not _is_user(obj.__name__):
                self.package(obj.__name__)
            return
        fid = getattr(obj, "__kachery_function_id__", None)
        if fid is not None and callable(fid) and not isinstance(obj, type):
            other = fid()
            self.add(other.name, other.code_hash)
            return
        if _exempt(obj):
            return
        if isinstance(obj, types.FunctionType):
            self.function(obj) if _is_user(obj.__module__) else self.package(obj.__module__ or "?")
        elif isinstance(obj, type):
            self.cls(obj) if _is_user(obj.__module__) else self.package(obj.__module__)
        elif isinstance(obj, functools.partial):
            self.value(obj.func, f"{key}.func", name)
            self.constant((obj.args, obj.keywords), f"{key}.<partial>", name)
        elif isinstance(obj, types.MethodType):
            self.value(obj.__func__, key, name)
            self.value(obj.__self__, f"{key}.__self__", name)
        elif isinstance(obj, BUILTIN_CALLABLES):
            self.builtin(obj)
        elif library_callable(obj):
            self.package(obj.__module__)
        elif callable(obj) and getattr(obj, "__wrapped__", None) is not None:
            self.value(obj.__wrapped__, key, name)  # functools.lru_cache, wraps-style objects
        else:
            t = type(obj)
            if _is_user(t.__module__) and t.__module__ != "builtins":
                self.cls(t)
            self.constant(obj, key, name)

    def builtin(self, obj: Any) -> None:
        module = builtin_name(obj).rpartition(".")[0].partition(".")[0]
        if module and module != "builtins":
            self.package(module)

    def constant(self, obj: Any, key: str, name: str) -> None:
        try:
            h = _value_hash(obj)
        except UnhashableArgument as err:
            raise UnhashableArgument(
                f"global {key} has no canonical encoding ({err}). Give the task an explicit version "
                f"with @pure(version=...) or leave the global out with ignore_globals=[{name!r}]"
            ) from None
        self.add(key, h)


# ---------------------------------------------------------------------------------------------
# public API

_FID_CACHE: dict[tuple, tuple[Any, FunctionId, list[tuple]]] = {}


def _still_valid(watch: list[tuple]) -> bool:
    for w in watch:
        kind = w[0]
        if kind == "g":
            if w[1].get(w[2], _MISSING) is not w[3]:
                return False
        elif kind == "c":
            try:
                if w[1].cell_contents is not w[2]:
                    return False
            except ValueError:
                if w[2] is not _MISSING:
                    return False
        elif kind == "k":
            f = w[1]
            if f.__code__ is not w[2] or f.__defaults__ is not w[3] or f.__kwdefaults__ is not w[4]:
                return False
        elif getattr(w[1], w[2], _MISSING) is not w[3]:
            return False
    return True


def _combine(deps: Mapping[str, str], module: str) -> str:
    """Code hash from the deps; names in the root's own module count relative to it, so that a
    function moved to another module together with its helpers keeps its id under ``name=``."""
    prefix = module + "."
    items = sorted((k[len(prefix) - 1 :] if k.startswith(prefix) else k, v) for k, v in deps.items())
    return hash_value(("kt1-code", tuple(items)))


def function_id(
    func: Any,
    *,
    version: str | None = None,
    name: str | None = None,
    ignore_globals: Iterable[str] = (),
) -> FunctionId:
    """Identity of ``func``: ``module.qualname`` (or ``name``) and a code hash (or ``version``)."""
    if version is None and type(ignore_globals) is tuple:  # a cached function: once per graph node
        hit = _FID_CACHE.get((id(func), name, ignore_globals))
        if hit is not None and hit[0] is func and _still_valid(hit[2]):
            return hit[1]
    ignore = tuple(sorted(ignore_globals))
    own = getattr(func, "__kachery_function_id__", None)
    if own is not None and callable(own) and version is None and name is None and not ignore:
        return own()
    if isinstance(func, BUILTIN_CALLABLES):
        qual = builtin_name(func)
        top = qual.partition(".")[0]
        h = version if version is not None else (_PY if top == "builtins" else package_version(top)[1])
        return FunctionId(name or qual, f"version:{version}" if version is not None else h, {})
    if library_callable(func):
        qual = f"{func.__module__}.{func.__qualname__}"
        top, ver = package_version(func.__module__)
        return FunctionId(name or qual, f"version:{version}" if version is not None else ver, {top: ver})
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"function_id expects a function, got {type(func).__qualname__}")
    fname = name or f"{func.__module__}.{func.__qualname__}"
    if version is not None:
        return FunctionId(fname, f"version:{version}", {})
    ckey = (id(func), name, ignore)
    hit = _FID_CACHE.get(ckey)
    if hit is not None and hit[0] is func and _still_valid(hit[2]):
        return hit[1]
    if not _is_user(func.__module__):
        top, ver = package_version(func.__module__)
        if _named_uniquely(func):
            fid = FunctionId(fname, ver, {top: ver})
            watch: list[tuple] = []
        else:
            fid, watch = _local_library_function(func, fname, top, ver)
    else:
        walk = _Walk(ignore)
        walk.function(func)
        fid = FunctionId(fname, _combine(walk.deps, func.__module__), dict(walk.deps))
        watch = walk.watch
    _FID_CACHE[ckey] = (func, fid, watch)
    return fid


def _named_uniquely(func: types.FunctionType) -> bool:
    """True if ``module.qualname`` names one function: not a lambda, not a function defined inside
    another (two lambdas in one function, or one nested function made with different closures,
    share a qualname)."""
    qualname = func.__qualname__
    return "<lambda>" not in qualname and "<locals>" not in qualname


def _local_library_function(func: types.FunctionType, fname: str, top: str,
                            ver: str) -> tuple[FunctionId, list[tuple]]:
    """A lambda or nested function of a library: the package version, plus its own code and the
    values it closes over and defaults to, which its name does not determine. What it reaches
    through its module's globals is library code, counted by the version."""
    watch: list[tuple] = [("k", func, func.__code__, func.__defaults__, func.__kwdefaults__)]
    cells = []
    for var, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=False):
        try:
            obj = cell.cell_contents
        except ValueError:
            obj = _MISSING
        watch.append(("c", cell, obj))
        cells.append((var, None if obj is _MISSING else obj))
    try:
        h = hash_value(("kt1-library-local", ver, _static(func).own_hash, tuple(cells),
                        func.__defaults__ or (), func.__kwdefaults__ or {}))
    except UnhashableArgument as err:
        raise UnhashableArgument(f"{fname} is a lambda or nested function of {top} whose closure or "
                                 f"defaults have no canonical encoding ({err})") from None
    return FunctionId(fname, h, {top: ver}), watch


def class_id(cls: type) -> FunctionId:
    """Identity of a class passed as a value: its source and what its methods reach, or its package."""
    qual = f"{cls.__module__}.{cls.__qualname__}"
    if not _is_user(cls.__module__):
        top, ver = package_version(cls.__module__)
        return FunctionId(qual, ver if top != "builtins" else _PY, {})
    walk = _Walk(())
    walk.cls(cls)
    return FunctionId(qual, _combine(walk.deps, cls.__module__), dict(walk.deps))
