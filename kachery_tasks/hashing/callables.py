"""How callables enter a canonical encoding: by identity (name and code hash), never by repr.

A function argument hashes as its :func:`~kachery_tasks.hashing.function_identity.function_id`, a class as
its ``class_id``, a builtin or library callable by its qualified name, and partials and bound
methods by their parts. This sits above both canonical.py (the encoder) and function_identity.py (which
hashes the globals a function reads with the encoder), so neither imports the other upward: the
encoder calls this through the hook it is given when the hashing package is imported.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

from kachery_tasks.errors import UnhashableArgument
from kachery_tasks.hashing.canonical import (
    BUILTIN_CALLABLES,
    Encoder,
    PathError,
    builtin_name,
    encode_function_id,
    install_callable_encoder,
)
from kachery_tasks.hashing.function_identity import class_id, function_id, library_callable


def encode_callable(e: Encoder, v: Any) -> bool:
    """Functions by identity (name + code hash), never by repr; False if ``v`` is no callable we know."""
    if isinstance(v, functools.partial):
        e.out += b"p"
        i = e.enter(v)
        try:
            e.child(v.func, ".func")
            e.child(v.args, ".args")
            e.child(v.keywords, ".keywords")
        finally:
            e.active.discard(i)
    elif isinstance(v, types.MethodType):
        e.out += b"m"
        e.child(v.__func__, ".__func__")
        e.child(v.__self__, ".__self__")
    elif isinstance(v, types.FunctionType):
        encode_function_id(e, _identity_or_path_error(function_id, v))
    elif isinstance(v, BUILTIN_CALLABLES):
        self_ = getattr(v, "__self__", None)
        if self_ is not None and not isinstance(self_, (types.ModuleType, type)):
            e.out += b"m"
            e.out += b"k"
            e.enc(builtin_name(v))
            e.child(self_, ".__self__")
        else:
            e.out += b"k"
            e.enc(builtin_name(v))
    elif library_callable(v):
        e.out += b"k"
        e.enc(f"{v.__module__}.{v.__qualname__}")
    elif isinstance(v, type):
        e.out += b"C"
        cid = _identity_or_path_error(class_id, v)
        e.enc(cid.name)
        e.enc(cid.code_hash)
    else:
        return False
    return True


def _identity_or_path_error(fn: Callable[[Any], Any], v: Any) -> Any:
    try:
        return fn(v)
    except UnhashableArgument as err:
        raise PathError("cannot hash {path}: " + str(err).replace("{", "{{").replace("}", "}}")) from err


install_callable_encoder(encode_callable)
