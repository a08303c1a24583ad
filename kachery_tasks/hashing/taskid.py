"""Task ids: xxh3-128 over the canonical encoding of ("kt1", namespace, kind, name, code hash, args).

Arguments are bound to the signature with defaults applied, so ``f(1)``, ``f(x=1)`` and
``f(1, y=<default>)`` share an id. A Job passed as an argument encodes as its own task id, which
makes ids Merkle hashes over the task graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from kachery_tasks.errors import UnhashableArgument
from kachery_tasks.hashing.canonical import (
    ATOM_STR_MAX,
    FAST_MIN,
    IDENTITY_PREFIXES,
    INT64_MAX,
    INT64_MIN,
    SCHEME,
    TAG_I64,
    TAG_LEN,
    Encoder,
    PathError,
    int_bytes,
)
from kachery_tasks.hashing.function_identity import FunctionId
from kachery_tasks.hashing.memo import IdentityMemo

_SIGNATURES: IdentityMemo[inspect.Signature] = IdentityMemo()


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """inspect.signature is ~10 µs; cache it per function object."""
    return _SIGNATURES.get_or_compute(func, inspect.signature)


def bind_arguments(func: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments by parameter name, defaults applied; ``*args`` stays a tuple, ``**kw`` a dict.

    Raises TypeError, as the call itself would, when the arguments do not fit the signature.
    """
    bound = _signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


_PREFIXES: dict[tuple[str, str, str, str], bytes] = {}


def _prefix(namespace: str, kind: str, name: str, code_hash: str) -> bytes:
    """The encoding of the id tuple up to the arguments: the same for every call of a function,
    so it is encoded once (this is on the cache-hit path)."""
    key = (namespace, kind, name, code_hash)
    found = _PREFIXES.get(key)
    if found is None:
        e = Encoder(stream=False)
        e.out += TAG_LEN(b"t", 6)
        for part in (SCHEME, namespace, kind, name, code_hash):
            e.enc(part)
        found = bytes(e.out)
        if len(_PREFIXES) > 100_000:  # notebooks redefine functions: keep this bounded
            _PREFIXES.clear()
        _PREFIXES[key] = found
    return found


_ORDERS: dict[tuple[str, ...], tuple[tuple[bytes, str], ...]] = {}


def _encode_bound(e: Encoder, bound: Mapping[str, Any]) -> None:
    """Exactly ``e.enc(dict(bound))``, with the parameter names' encodings and their sorted order
    computed once per signature (they are the same at every call)."""
    names = tuple(bound)
    order = _ORDERS.get(names)
    if order is None:
        if not all(type(n) is str for n in names):
            e.enc(dict(bound))
            return
        keyed = []
        for n in names:
            b = n.encode("utf-8", "surrogatepass")
            keyed.append((TAG_LEN(b"s", len(b)) + b, n))
        order = _ORDERS[names] = tuple(sorted(keyed))
    if len(order) >= FAST_MIN:  # the general path has its own fast path for big dicts
        e.enc(dict(bound))
        return
    out = e.out
    out += TAG_LEN(b"d", len(order))
    for key_bytes, name in order:
        out += key_bytes
        x = bound[name]
        t = type(x)
        if t is int:  # the commonest atoms written here, as _e_int and _e_str write them
            out += TAG_I64(b"i", x) if INT64_MIN <= x <= INT64_MAX else int_bytes(x)
        elif t is str and len(x) < ATOM_STR_MAX:
            b = x.encode("utf-8", "surrogatepass")
            out += TAG_LEN(b"s", len(b))
            out += b
        elif t in IDENTITY_PREFIXES and type(canon := x.__kachery_canon__()) is str and len(canon) < ATOM_STR_MAX:
            b = canon.encode("utf-8", "surrogatepass")  # an upstream job: as register_identity_type's
            out += IDENTITY_PREFIXES[t]
            out += TAG_LEN(b"s", len(b))
            out += b
        else:
            try:
                e.enc(x)
            except PathError as err:
                err.segments.append(f"[{name!r}]")
                raise


def task_id(kind: str, fid: FunctionId, bound: Mapping[str, Any], namespace: str = "") -> str:
    """xxh3-128 hex of ``canonical(("kt1", namespace, kind, fid.name, fid.code_hash, dict(bound)))``.

    An argument with no encoding raises UnhashableArgument naming it by parameter, e.g.
    ``opts['params'][2]``.
    """
    e = Encoder(stream=True)
    e.out += _prefix(namespace, kind, fid.name, fid.code_hash)
    try:
        _encode_bound(e, bound)
    except PathError as err:
        raise UnhashableArgument(_format_bound(err)) from None
    except RecursionError:
        raise UnhashableArgument("cannot hash the arguments: nesting too deep to encode") from None
    return e.hexdigest()


def _format_bound(err: PathError) -> str:
    """The outermost segment is ``['param']``: make the parameter name the root of the path."""
    if err.segments and err.segments[-1].startswith("['") and err.segments[-1].endswith("']"):
        root = err.segments.pop()[2:-2]
        return err.format(root)
    return err.format("arguments")
