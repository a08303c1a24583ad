"""Canonical encoding of Python values, scheme ``kt1`` (see docs/hashing.md for the byte layout).

Every value becomes a tag byte followed by a payload whose lengths are explicit, so no two different
values share an encoding (the false hits of peers come from ``str()``, JSON, separators and dropped
metadata). Lengths, counts and integers are big-endian, which makes the byte order of encoded keys
easy to reproduce with numpy in the fast paths. The encoding is never a pickle, ``str`` or ``repr``:
a value with no rule raises :class:`UnhashableArgument` naming where it sits.

``hash_value`` streams: small pieces collect in a buffer, large buffers (array data, long strings)
go straight to the xxh3-128 state without a copy.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import itertools
import operator
import pathlib
import re
import struct
import types
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from kachery_tasks.errors import UnhashableArgument

SCHEME = "kt1"

#: Containers nested deeper than this are refused (keeps us well inside Python's recursion limit).
MAX_DEPTH = 200
#: Homogeneous containers at least this long take the vectorised fast path (same bytes, less time).
FAST_MIN = 32
#: Buffers at least this long are fed to the hash state directly instead of being copied.
_STREAM_MIN = 1 << 16
#: Non-contiguous arrays are copied to C order in blocks of about this many bytes.
_CHUNK = 1 << 23

TAG_LEN = struct.Struct(">cQ").pack
TAG_I64 = struct.Struct(">cq").pack
_TAG_F64 = struct.Struct(">cd").pack
_TAG_C128 = struct.Struct(">cdd").pack
_U64 = struct.Struct(">Q").pack
_DATE = struct.Struct(">cHBB").pack
_TIME = struct.Struct(">cBBBIB").pack
_DATETIME = struct.Struct(">cHBBBBBIB").pack
_TIMEDELTA = struct.Struct(">cqII").pack

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

_REGISTRY: dict[type, Callable[[Any], Any]] = {}

# Set to False by tests to check that the fast paths produce exactly the general bytes.
_FAST_PATHS = True


class PathError(Exception):
    """Raised inside the encoder; collects path segments while unwinding, formatted at the top."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self.template = template  # contains "{path}"
        self.segments: list[str] = []

    def format(self, root: str) -> str:
        return self.template.replace("{path}", root + "".join(reversed(self.segments)))


def _unhashable(v: Any) -> PathError:
    t = type(v)
    tname = f"{t.__module__}.{t.__qualname__}"
    return PathError(
        f"cannot hash {{path}}: no canonical encoding for a {tname}. Implement __kachery_canon__() on "
        f"the class, call kachery_tasks.hashing.register_canon({t.__qualname__}, fn), or store it "
        f"with kachery_tasks.store_file(...) and pass the returned URI/File"
    )


def type_name(t: type) -> str:
    """Name recorded for a type: ``__kachery_type__`` if the class sets it, else ``module.qualname``."""
    name = t.__dict__.get("__kachery_type__") or getattr(t, "__kachery_type__", None)
    if isinstance(name, str):
        return name
    return f"{t.__module__}.{t.__qualname__}"


def register_canon(cls: type, fn: Callable[[Any], Any]) -> None:
    """Give instances of ``cls`` (and its subclasses) a canonical value ``fn(obj)``.

    For third-party types we cannot add ``__kachery_canon__`` to. The object is encoded as an
    OBJECT tag, the type name of the instance and the encoding of ``fn(obj)``.
    """
    if not isinstance(cls, type):
        raise TypeError("register_canon expects a class")
    if cls in _EXACT:
        raise TypeError(f"{cls.__qualname__} already has a built-in canonical encoding")
    _REGISTRY[cls] = fn


def register_identity_type(cls: type) -> None:
    """Encode instances of exactly ``cls`` from their ``__kachery_canon__()`` string without the
    general object path (cycle tracking, precedence checks): the same bytes, for objects that
    stand for an identity and are hashed by the hundred thousand (jobs in a Dask graph)."""
    if "__kachery_canon__" not in dir(cls):
        raise TypeError(f"{cls.__qualname__} has no __kachery_canon__")
    prefix = IDENTITY_PREFIXES[cls] = b"O" + _type_name_encoded(cls)

    def encode(e: Encoder, v: Any) -> None:
        canon = v.__kachery_canon__()
        if type(canon) is not str:  # not an identity string after all: the general path
            _object(e, v, canon)
            return
        e.out += prefix
        _e_str(e, canon)

    _EXACT[cls] = encode


#: The encoding of ``register_identity_type`` classes before their identity string: the task id
#: encoder writes upstream jobs with it directly (a node of a Dask pipeline has one or two).
IDENTITY_PREFIXES: dict[type, bytes] = {}


def _registered(t: type) -> Callable[[Any], Any] | None:
    if not _REGISTRY:
        return None
    for base in t.__mro__:
        fn = _REGISTRY.get(base)
        if fn is not None:
            return fn
    return None


class Encoder:
    """Writes the encoding into ``out``; with ``stream`` set, large buffers go to an xxh3 state."""

    __slots__ = ("out", "sink", "stream", "active")

    def __init__(self, stream: bool = False, active: set[int] | None = None) -> None:
        self.out = bytearray()
        self.sink: Any = None
        self.stream = stream
        self.active: set[int] = set() if active is None else active

    # -- output -------------------------------------------------------------------------------
    def big(self, buf: Any) -> None:
        """Append a bytes-like buffer; large ones go to the hash state directly when streaming."""
        mv = memoryview(buf)
        if self.stream and mv.nbytes >= _STREAM_MIN:
            if self.sink is None:
                self.sink = xxhash.xxh3_128()
            if self.out:
                self.sink.update(self.out)
                self.out.clear()
            self.sink.update(mv)
        else:
            self.out += mv

    def hexdigest(self) -> str:
        if self.sink is None:
            return xxhash.xxh3_128_hexdigest(self.out)
        self.sink.update(self.out)
        self.out.clear()
        return self.sink.hexdigest()

    def sub(self, v: Any) -> bytes:
        """Encoding of ``v`` as bytes (dict keys, set elements), sharing cycle detection."""
        e = Encoder(False, self.active)
        e.enc(v)
        return bytes(e.out)

    # -- nesting --------------------------------------------------------------------------------
    def enter(self, v: Any) -> int:
        i = id(v)
        if i in self.active:
            raise PathError("cycle at {path}: a container contains itself, which has no finite encoding")
        if len(self.active) >= MAX_DEPTH:
            raise PathError(f"cannot hash {{path}}: nesting deeper than {MAX_DEPTH} levels")
        self.active.add(i)
        return i

    def child(self, v: Any, segment: str) -> None:
        try:
            self.enc(v)
        except PathError as err:
            err.segments.append(segment)
            raise

    # -- dispatch -------------------------------------------------------------------------------
    def enc(self, v: Any) -> None:
        f = _EXACT.get(type(v))
        if f is not None:
            f(self, v)
        else:
            _enc_other(self, v)


# ---------------------------------------------------------------------------------------------
# scalars


def _e_none(e: Encoder, v: None) -> None:
    e.out += b"N"


def _e_bool(e: Encoder, v: bool) -> None:
    e.out += b"T" if v else b"F"


def int_bytes(v: int) -> bytes:
    if INT64_MIN <= v <= INT64_MAX:
        return TAG_I64(b"i", v)
    n = (v.bit_length() + 8) // 8
    return TAG_LEN(b"I", n) + v.to_bytes(n, "big", signed=True)


def _e_int(e: Encoder, v: int) -> None:
    if INT64_MIN <= v <= INT64_MAX:
        e.out += TAG_I64(b"i", v)
    else:
        e.out += int_bytes(v)


def _e_float(e: Encoder, v: float) -> None:
    e.out += _TAG_F64(b"f", v)


def _e_complex(e: Encoder, v: complex) -> None:
    e.out += _TAG_C128(b"c", v.real, v.imag)


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _e_str(e: Encoder, v: str) -> None:
    b = _utf8(v)
    e.out += TAG_LEN(b"s", len(b))
    e.big(b) if len(b) >= _STREAM_MIN else e.out.extend(b)


def _e_bytes(e: Encoder, v: bytes) -> None:
    e.out += TAG_LEN(b"b", len(v))
    e.big(v)


def _e_bytearray(e: Encoder, v: bytearray) -> None:
    e.out += TAG_LEN(b"y", len(v))
    e.big(v)


def _e_range(e: Encoder, v: range) -> None:
    e.out += b"r"
    e.out += int_bytes(v.start) + int_bytes(v.stop) + int_bytes(v.step)


def _e_slice(e: Encoder, v: slice) -> None:
    e.out += b"v"
    e.child(v.start, ".start")
    e.child(v.stop, ".stop")
    e.child(v.step, ".step")


def _e_ellipsis(e: Encoder, v: Any) -> None:
    e.out += b"."


def _e_decimal(e: Encoder, v: decimal.Decimal) -> None:
    sign, digits, exponent = v.as_tuple()
    e.out += b"D"
    e.enc((sign, "".join(map(str, digits)), exponent))


def _e_uuid(e: Encoder, v: uuid.UUID) -> None:
    e.out += b"U"
    e.out += v.bytes


def _tz(e: Encoder, v: Any) -> None:
    """tzinfo part of a time/datetime: None when naive, else (utcoffset, tzname, zone key)."""
    tz = v.tzinfo
    if tz is None:
        e.out += b"N"
        return
    e.enc((v.utcoffset(), v.tzname(), _zone_key(tz)))


def _is_dateutil_zone(tz: Any) -> bool:
    return any(c.__module__ == "dateutil" or c.__module__.startswith("dateutil.") for c in type(tz).__mro__)


def _zone_key(tz: Any) -> str | None:
    """The IANA name a tzinfo is identified by: zoneinfo's ``key`` or pytz's ``zone``; else None.

    A dateutil zone never gets one, even where it carries a name (python-dateutil 4.0 added
    ``tzfile.key``; 2.9 has none). Its name does not tell what it computes: dateutil 2.9 reads only
    the version-1 data of a TZif file, so its ``Europe/Paris`` has no summer time after 2037, where
    4.0 and zoneinfo have it, and its file is whatever the machine (or dateutil's own tarball)
    holds. Reading the key would also change, between dateutil versions, the id of every datetime
    carrying such a zone, and give it the id of the zoneinfo datetime with the same name."""
    if _is_dateutil_zone(tz):
        return None
    key = getattr(tz, "key", None) or getattr(tz, "zone", None)
    return key if isinstance(key, str) else None


def _e_date(e: Encoder, v: _dt.date) -> None:
    e.out += _DATE(b"a", v.year, v.month, v.day)


def _e_time(e: Encoder, v: _dt.time) -> None:
    e.out += _TIME(b"h", v.hour, v.minute, v.second, v.microsecond, v.fold)
    _tz(e, v)


def _e_datetime(e: Encoder, v: _dt.datetime) -> None:
    e.out += _DATETIME(b"w", v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold)
    _tz(e, v)


def _e_timedelta(e: Encoder, v: _dt.timedelta) -> None:
    e.out += _TIMEDELTA(b"e", v.days, v.seconds, v.microseconds)


def _e_pattern(e: Encoder, v: re.Pattern) -> None:
    e.out += b"x"
    e.enc(v.pattern)
    e.enc(int(v.flags))


# ---------------------------------------------------------------------------------------------
# containers


def _e_seq(e: Encoder, v: list | tuple, tag: bytes) -> None:
    n = len(v)
    if n >= FAST_MIN and _FAST_PATHS:
        fast = _fast_seq(v, tag)
        if fast is not None:
            e.big(fast)
            return
    if len(e.active) >= MAX_DEPTH:
        e.enter(v)  # raises the error the general path would (cycle, else depth)
    out = e.out
    out += TAG_LEN(tag, n)
    # Atoms are written here, as their own functions write them (same bytes), without a dispatch
    # per element; a sequence of atoms alone cannot contain itself, so it is entered for cycle
    # detection only at its first element that is not an atom (_seq_rest).
    for k, x in enumerate(v):
        t = type(x)
        if t is int:
            out += TAG_I64(b"i", x) if INT64_MIN <= x <= INT64_MAX else int_bytes(x)
        elif t is float:
            out += _TAG_F64(b"f", x)
        elif t is str and len(x) < ATOM_STR_MAX:
            b = x.encode("utf-8", "surrogatepass")
            out += TAG_LEN(b"s", len(b))
            out += b
        elif x is None:
            out += b"N"
        elif t is bool:
            out += b"T" if x else b"F"
        else:
            _seq_rest(e, v, k)
            return


#: Strings shorter than this (in characters) are written inline by the container encoders: their
#: UTF-8 is under ``_STREAM_MIN`` bytes, so they are never streamed (``_e_str``).
ATOM_STR_MAX = _STREAM_MIN // 4


def _seq_rest(e: Encoder, v: list | tuple, start: int) -> None:
    """Elements ``start`` on of a sequence whose tag and length are written: the general path."""
    i = e.enter(v)
    try:
        enc = e.enc
        for k in range(start, len(v)):
            try:
                enc(v[k])
            except PathError as err:
                err.segments.append(f"[{k}]")
                raise
    finally:
        e.active.discard(i)


def _e_list(e: Encoder, v: list) -> None:
    _e_seq(e, v, b"l")


def _e_tuple(e: Encoder, v: tuple) -> None:
    _e_seq(e, v, b"t")


def _key_bytes(e: Encoder, k: Any) -> bytes:
    t = type(k)
    if t is str:
        return _STR_KEYS.get(k) or _str_key_bytes(k)
    if t is int:
        return int_bytes(k)
    try:
        return e.sub(k)
    except PathError as err:
        err.segments.append(f"<key {k!r}>")
        raise


def _e_mapping(e: Encoder, v: dict, tag: bytes, ordered: bool) -> None:
    n = len(v)
    if not ordered and n >= FAST_MIN and _FAST_PATHS:
        fast = _fast_dict(v)
        if fast is not None:
            e.big(fast)
            return
    i = e.enter(v)
    try:
        items = []
        str_keys = True
        for k, x in v.items():
            if type(k) is str:
                kb = _STR_KEYS.get(k)
                if kb is None:
                    kb = _str_key_bytes(k)
            else:
                str_keys = False
                kb = _key_bytes(e, k)
            items.append((kb, k, x))
        if not ordered:
            if str_keys:  # distinct str keys have distinct encodings: the keys alone order them
                items.sort(key=_first)
            else:
                items = _sort_entries(e, items)
        e.out += TAG_LEN(tag, n)
        for kb, k, x in items:
            e.out += kb
            try:
                e.enc(x)
            except PathError as err:
                err.segments.append(f"[{k!r}]")
                raise
    finally:
        e.active.discard(i)


def _e_str_dict(e: Encoder, v: dict) -> None:
    """A plain dict: exactly ``_e_mapping(e, v, b"d", False)``, faster for the small str-keyed
    dicts that option arguments are. Atom values are written here (as in ``_e_seq``), and the dict
    is entered for cycle detection only before its first value that is not an atom: keys that are
    all str cannot lead back to it, nor can atoms. Any other key: the general path."""
    n = len(v)
    if n >= FAST_MIN and _FAST_PATHS:
        _e_mapping(e, v, b"d", False)
        return
    items = []
    keys = _STR_KEYS
    for k, x in v.items():
        if type(k) is not str:
            _e_mapping(e, v, b"d", False)
            return
        kb = keys.get(k)
        if kb is None:
            kb = _str_key_bytes(k)
        items.append((kb, k, x))
    # distinct str keys have distinct encodings: the keys alone order them
    if n == 2:
        if items[1][0] < items[0][0]:
            items.reverse()
    elif n > 2:
        items.sort(key=_first)
    if len(e.active) >= MAX_DEPTH:
        e.enter(v)  # raises the error the general path would (cycle, else depth)
    out = e.out
    out += TAG_LEN(b"d", n)
    entered = None
    try:
        for kb, k, x in items:
            out += kb
            t = type(x)
            if t is str and len(x) < ATOM_STR_MAX:
                b = x.encode("utf-8", "surrogatepass")
                out += TAG_LEN(b"s", len(b))
                out += b
            elif t is int:
                out += TAG_I64(b"i", x) if INT64_MIN <= x <= INT64_MAX else int_bytes(x)
            elif t is float:
                out += _TAG_F64(b"f", x)
            elif x is None:
                out += b"N"
            elif t is bool:
                out += b"T" if x else b"F"
            else:
                if entered is None:
                    entered = e.enter(v)
                try:
                    if t is list:
                        _e_seq(e, x, b"l")  # what e.enc does for a list, two calls less
                    else:
                        e.enc(x)
                except PathError as err:
                    err.segments.append(f"[{k!r}]")
                    raise
    finally:
        if entered is not None:
            e.active.discard(entered)


#: Encodings of short str dict keys, which recur call after call (option names, column names).
_STR_KEYS: dict[str, bytes] = {}


def _str_key_bytes(k: str) -> bytes:
    b = _utf8(k)
    kb = TAG_LEN(b"s", len(b)) + b
    if len(k) <= 64:
        if len(_STR_KEYS) >= 4096:
            _STR_KEYS.clear()
        _STR_KEYS[k] = kb
    return kb


_first = operator.itemgetter(0)


def _sort_entries(e: Encoder, items: list) -> list:
    """Sort by encoded key; equal encodings (distinct NaN keys) are ordered by encoded value."""
    items.sort(key=lambda it: it[0])
    if len({it[0] for it in items}) == len(items):
        return items
    return sorted(items, key=lambda it: (it[0], e.sub(it[2])))


def _e_dict(e: Encoder, v: dict) -> None:
    _e_mapping(e, v, b"d", False)


def _e_ordereddict(e: Encoder, v: OrderedDict) -> None:
    _e_mapping(e, v, b"o", True)


def _e_set(e: Encoder, v: set | frozenset, tag: bytes) -> None:
    n = len(v)
    if n >= FAST_MIN and _FAST_PATHS:
        fast = _fast_set(v, tag)
        if fast is not None:
            e.big(fast)
            return
    i = e.enter(v)
    try:
        parts = sorted(_key_bytes(e, x) for x in v)
        e.out += TAG_LEN(tag, n)
        for p in parts:
            e.out += p
    finally:
        e.active.discard(i)


def _e_pyset(e: Encoder, v: set) -> None:
    _e_set(e, v, b"S")


def _e_frozenset(e: Encoder, v: frozenset) -> None:
    _e_set(e, v, b"z")


# ---------------------------------------------------------------------------------------------
# numpy


def _e_dtype(e: Encoder, dt: np.dtype) -> None:
    """dtype.str carries kind, byte order, size and datetime unit; structured dtypes add descr."""
    e.enc(_dtype_form(dt))


def _dtype_form(dt: np.dtype) -> Any:
    """What a dtype is encoded as: its ``str``, or its ``descr`` (a list) when structured. numpy has
    no ``descr`` for fields out of order or overlapping (``x[["b", "a"]]`` of a structured array):
    those are a tuple of (name, field form, offset) and the item size, which no descr list equals."""
    if dt.kind == "T":
        return "|T"
    if dt.fields is None and dt.subdtype is None:
        return dt.str
    try:
        return dt.descr
    except ValueError:
        fields = tuple((name, _dtype_form(dt.fields[name][0]), dt.fields[name][1]) for name in dt.names)
        return ("numpy-fields", fields, dt.itemsize)


def _e_npdtype(e: Encoder, dt: np.dtype) -> None:
    """A dtype passed as a value (dask passes ``dtype=`` everywhere): the same DTYPE as in arrays."""
    e.out += b"q"
    _e_dtype(e, dt)


def _contiguous_chunks(a: np.ndarray):
    """The C-order bytes of ``a`` as uint8 arrays, copying at most ~_CHUNK bytes at a time."""
    if a.flags.c_contiguous:
        yield a.reshape(-1).view(np.uint8)
        return
    if a.ndim == 2 and a.flags.f_contiguous and a.shape[0] >= 64:
        yield from _transposed_chunks(a)
        return
    row = a.itemsize * (a.size // a.shape[0]) if a.shape[0] else 1
    step = max(1, _CHUNK // max(row, 1))
    for s in range(0, a.shape[0], step):
        yield np.ascontiguousarray(a[s : s + step]).reshape(-1).view(np.uint8)


def _transposed_chunks(a: np.ndarray, rows: int = 64, cols: int = 512):
    """C-order bytes of a Fortran-ordered matrix by cache-sized tiles (about 2x a plain copy)."""
    at = a.T  # C-contiguous
    out = np.empty((rows, a.shape[1]), a.dtype)
    for s in range(0, a.shape[0], rows):
        block = out[: min(rows, a.shape[0] - s)]
        for c in range(0, a.shape[1], cols):
            block[:, c : c + cols] = at[c : c + cols, s : s + rows].T
        yield block.reshape(-1).view(np.uint8)


def _e_ndarray(e: Encoder, a: np.ndarray) -> None:
    dt = a.dtype
    e.out += b"A"
    _e_dtype(e, dt)
    e.out += _U64(a.ndim)
    for d in a.shape:
        e.out += _U64(d)
    if dt.hasobject or dt.kind == "T":
        if dt.fields is not None:
            raise PathError("cannot hash {path}: structured arrays with object fields are not supported")
        _object_elements(e, a)
        return
    e.out += TAG_LEN(b"r", a.nbytes)
    if a.size:
        for chunk in _contiguous_chunks(a):
            e.big(chunk)


def _object_elements(e: Encoder, a: np.ndarray) -> None:
    """Object arrays: all-str arrays as lengths + UTF-8 ('s'); anything else element by element."""
    items = a.ravel(order="C").tolist() if a.dtype.kind != "T" else list(a.astype(object).ravel())
    col = _str_column(items) if items and _all_type(items, str) else None
    if col is not None:
        lens, data = col
        e.out += TAG_LEN(b"s", len(data))
        e.big(lens.astype(">u8").view(np.uint8))
        e.big(data)
        return
    e.out += b"e"
    for k, x in enumerate(items):
        try:
            e.enc(x)
        except PathError as err:
            idx = np.unravel_index(k, a.shape) if a.ndim else ()
            err.segments.append("[" + ", ".join(str(int(j)) for j in idx) + "]")
            raise


def _e_npscalar(e: Encoder, v: np.generic) -> None:
    dt = v.dtype
    if dt.hasobject:
        raise _unhashable(v)
    data = v.tobytes()
    e.out += b"g"
    _e_dtype(e, dt)
    e.out += TAG_LEN(b"r", len(data))
    e.out += data


# ---------------------------------------------------------------------------------------------
# pandas (imported lazily: only when a pandas object is met)


def _pd_values(e: Encoder, values: Any, dtype: Any) -> None:
    """Payload of one column/index level: numpy-backed data as an array, extension types by parts."""
    import pandas as pd

    if isinstance(dtype, np.dtype):
        _e_ndarray(e, np.asarray(values))
        return
    arr = pd.array(values, dtype=dtype, copy=False) if not hasattr(values, "dtype") else values
    arr = getattr(arr, "array", arr)
    if isinstance(dtype, pd.CategoricalDtype):
        e.out += b"G"
        e.enc(bool(dtype.ordered))
        _e_index(e, dtype.categories)
        _e_ndarray(e, np.asarray(arr.codes))
        return
    e.out += b"V"
    e.enc(str(dtype))
    if hasattr(arr, "_data") and hasattr(arr, "_mask"):  # nullable Int64/Float64/boolean
        mask = np.asarray(arr._mask)
        data = np.asarray(arr._data)
        e.out += b"M"
        _e_ndarray(e, np.where(mask, np.zeros((), data.dtype), data))
        _e_ndarray(e, mask)
    elif isinstance(dtype, pd.DatetimeTZDtype):
        e.out += b"Z"
        _e_ndarray(e, np.asarray(arr.asi8))
    else:
        e.out += b"O"
        _e_ndarray(e, np.asarray(arr, dtype=object))


def _e_index(e: Encoder, idx: Any) -> None:
    import pandas as pd

    if isinstance(idx, pd.MultiIndex):
        e.out += b"Y"
        e.enc(tuple(idx.names))
        e.out += _U64(idx.nlevels)
        for j in range(idx.nlevels):
            level = idx.get_level_values(j)
            _pd_values(e, level.array, level.dtype)
        return
    e.out += b"X"
    e.enc(idx.name)
    _pd_values(e, idx.array, idx.dtype)


def _e_pandas(e: Encoder, v: Any) -> bool:
    """Encode a pandas object; False if ``v`` is a pandas type with no rule."""
    import pandas as pd

    if isinstance(v, pd.DataFrame):
        e.out += b"Q"
        e.child(v.columns, ".columns")
        e.child(v.index, ".index")
        e.out += _U64(v.shape[1])
        for j in range(v.shape[1]):
            col = v.iloc[:, j]
            try:
                _pd_values(e, col.array, col.dtype)
            except PathError as err:
                err.segments.append(f".iloc[:, {j}]")
                raise
    elif isinstance(v, pd.Series):
        e.out += b"P"
        e.child(v.name, ".name")
        e.child(v.index, ".index")
        _pd_values(e, v.array, v.dtype)
    elif isinstance(v, pd.Index):
        _e_index(e, v)
    elif isinstance(v, pd.Timestamp):
        _object(e, v, (v.value, v.unit, v.tzinfo is not None and _tz_tuple(v)))
    elif isinstance(v, pd.Timedelta):
        _object(e, v, (v.value, v.unit))
    elif v is pd.NaT or v is pd.NA:
        _object(e, v, None)
    elif isinstance(v, pd.api.extensions.ExtensionDtype):
        params = _pd_dtype_parameters(pd, v)
        if params is None:
            return False
        e.out += b"J"
        e.enc(f"pandas.{type(v).__name__}")
        e.out += TAG_LEN(b"t", len(params))  # the bytes of enc(tuple of values), named in errors
        for name, x in params:
            e.child(x, f".{name}")
    else:
        return False
    return True


def _pd_dtype_parameters(pd: Any, v: Any) -> tuple[tuple[str, Any], ...] | None:
    """The parameters that define a pandas extension dtype passed as a value (``astype``, dask's
    ``set_index`` pass them as arguments), in a fixed order; None for a dtype with no rule.

    Exact types only, all of them exported as ``pandas.<Name>``, which is the name encoded: it
    does not change when pandas moves a class between its private modules."""
    t = type(v)
    if t is pd.StringDtype:  # str(dtype) is "str" for both storages when na_value is nan
        return ("storage", v.storage), ("na_value", v.na_value)
    if t is pd.CategoricalDtype:  # categories in their order: codes refer to it
        return ("categories", v.categories), ("ordered", v.ordered)
    if t is pd.DatetimeTZDtype:
        try:
            tz = _tz_identity(v.tz)
        except PathError as err:
            err.segments.append(".tz")
            raise
        return ("unit", v.unit), ("tz", tz)
    if t is pd.IntervalDtype:
        return ("subtype", v.subtype), ("closed", v.closed)
    if t is pd.SparseDtype:
        return ("subtype", v.subtype), ("fill_value", v.fill_value)
    if t in _masked_dtypes(pd):  # Int64Dtype(), boolean, ...: the type is the whole dtype
        return ()
    return None


@functools.cache
def _masked_dtypes(pd: Any) -> frozenset:
    names = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32",
             "Float64", "Boolean")
    return frozenset(getattr(pd, f"{n}Dtype") for n in names)


def _tz_identity(tz: Any) -> tuple:
    """A time zone on its own (no datetime to take an offset at): ``("zone", key)`` for a named
    zone (zoneinfo's ``key``, pytz's ``zone``), ``("fixed", offset, name)`` for a
    ``datetime.timezone``; any other tzinfo is refused rather than guessed.

    dateutil's zones (``"dateutil/Europe/Paris"`` in pandas) are refused under every
    python-dateutil version: a zone alone is all there is to hash here, and neither its name (see
    ``_zone_key``) nor its private transition tables are a stable identity of what it computes."""
    key = _zone_key(tz)
    if key is not None:
        return ("zone", key)
    t = type(tz)
    if _is_dateutil_zone(tz):
        name = getattr(tz, "key", None)
        use = f"zoneinfo.ZoneInfo({name!r}) (in pandas {name!r}, without 'dateutil/')" if isinstance(
            name, str) else "zoneinfo.ZoneInfo(name) (in pandas the name without 'dateutil/')"
        raise PathError(f"cannot hash {{path}}: the time zone {t.__module__}.{t.__qualname__} is "
                         "dateutil's, whose offsets for a zone name depend on the dateutil version "
                         f"and the machine's tz files, so nothing identifies it; use {use}")
    if isinstance(tz, _dt.timezone):
        return ("fixed", tz.utcoffset(None), tz.tzname(None))
    raise PathError(f"cannot hash {{path}}: the time zone {t.__module__}.{t.__qualname__} has no "
                     "canonical name; use zoneinfo.ZoneInfo(name) or datetime.timezone(offset)")


def _tz_tuple(v: Any) -> tuple:
    return (v.utcoffset(), v.tzname(), _zone_key(v.tzinfo))


# ---------------------------------------------------------------------------------------------
# objects, callables and the fallback chain


_TYPE_NAME_BYTES: dict[type, bytes] = {}


def _type_name_encoded(t: type) -> bytes:
    """``enc(type_name(t))``, memoized: jobs and files are encoded this way at every call."""
    found = _TYPE_NAME_BYTES.get(t)
    if found is None:
        sub = Encoder(False)
        sub.enc(type_name(t))
        found = bytes(sub.out)
        if len(_TYPE_NAME_BYTES) > 10_000:
            _TYPE_NAME_BYTES.clear()
        _TYPE_NAME_BYTES[t] = found
    return found


def _object(e: Encoder, v: Any, canon: Any) -> None:
    e.out += b"O"
    e.out += _type_name_encoded(type(v))
    i = e.enter(v)
    try:
        e.child(canon, ".__kachery_canon__()")
    finally:
        e.active.discard(i)


def _e_dataclass(e: Encoder, v: Any) -> None:
    fields = dataclasses.fields(v)
    e.out += b"R"
    e.enc(type_name(type(v)))
    e.out += _U64(len(fields))
    i = e.enter(v)
    try:
        for f in fields:
            e.enc(f.name)
            e.child(getattr(v, f.name), f".{f.name}")
    finally:
        e.active.discard(i)


def _e_namedtuple(e: Encoder, v: tuple) -> None:
    e.out += b"n"
    e.enc(type_name(type(v)))
    e.out += _U64(len(v))
    i = e.enter(v)
    try:
        for name, x in zip(type(v)._fields, v, strict=False):
            e.enc(name)
            e.child(x, f".{name}")
    finally:
        e.active.discard(i)


def encode_function_id(e: Encoder, fid: Any) -> None:
    e.out += b"K"
    e.enc(fid.name)
    e.enc(fid.code_hash)


def builtin_name(v: Any) -> str:
    if isinstance(v, np.ufunc):
        return f"numpy.{v.__name__}"
    owner = getattr(v, "__objclass__", None)
    module = getattr(v, "__module__", None) or (owner.__module__ if owner is not None else None)
    if module is None:
        self_ = getattr(v, "__self__", None)
        module = getattr(self_, "__name__", None) if isinstance(self_, types.ModuleType) else None
        module = module or type(self_).__module__
    return f"{module}.{getattr(v, '__qualname__', v.__name__)}"


BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.MethodWrapperType,
    np.ufunc,
)


#: Encodes a callable by identity, or returns False if it is no callable it knows. Function
#: identity sits above this module (it hashes globals with ``hash_value``), so hashing/callables.py
#: installs the encoder when the hashing package is imported: canonical.py never imports upward.
CALLABLE_ENCODER: list[Callable[[Encoder, Any], bool]] = []


def install_callable_encoder(encode: Callable[[Encoder, Any], bool]) -> None:
    """Make ``encode`` the encoder of callables (hashing/callables.py calls this once)."""
    CALLABLE_ENCODER[:] = [encode]


def _e_callable(e: Encoder, v: Any) -> bool:
    if not CALLABLE_ENCODER:
        raise RuntimeError("no callable encoder installed: import kachery_tasks.hashing, not canonical.py alone")
    return CALLABLE_ENCODER[0](e, v)


def _enc_other(e: Encoder, v: Any) -> None:
    """Everything not in the exact-type table, in a fixed order of precedence."""
    t = type(v)
    canon = getattr(t, "__kachery_canon__", None)
    if canon is not None:
        _object(e, v, v.__kachery_canon__())
        return
    fid = getattr(v, "__kachery_function_id__", None)
    if fid is not None and callable(fid) and not isinstance(v, type):
        encode_function_id(e, fid())
        return
    fn = _registered(t)
    if fn is not None:
        _object(e, v, fn(v))
        return
    if isinstance(v, np.dtype):  # every dtype has its own class (Float64DType, ...)
        _e_npdtype(e, v)
        return
    if isinstance(v, enum.Enum):
        e.out += b"E"
        e.enc(type_name(t))
        e.enc(v.name)
    elif isinstance(v, np.ndarray):
        if t is not np.memmap:
            raise PathError(
                f"cannot hash {{path}}: {t.__module__}.{t.__qualname__} is an ndarray subclass that may "
                "carry more than its data; pass np.asarray(x) or call register_canon for it"
            )
        _e_ndarray(e, v)
    elif isinstance(v, np.generic):
        _e_npscalar(e, v)
    elif isinstance(v, tuple) and isinstance(getattr(t, "_fields", None), tuple):
        _e_namedtuple(e, v)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        _e_dataclass(e, v)
    elif isinstance(v, pathlib.PurePath):
        raise PathError(
            f"cannot hash {{path}}: a path ({str(v)!r}) names a location, not content. Call "
            "kachery_tasks.store_file(path) and pass the returned URI/File instead"
        )
    elif t.__module__.startswith("pandas") and _e_pandas(e, v) or _e_callable(e, v):
        return
    else:
        raise _unhashable(v)


_EXACT: dict[type, Callable[[Encoder, Any], None]] = {
    type(None): _e_none,
    bool: _e_bool,
    int: _e_int,
    float: _e_float,
    complex: _e_complex,
    str: _e_str,
    bytes: _e_bytes,
    bytearray: _e_bytearray,
    list: _e_list,
    tuple: _e_tuple,
    dict: _e_str_dict,
    OrderedDict: _e_ordereddict,
    set: _e_pyset,
    frozenset: _e_frozenset,
    range: _e_range,
    slice: _e_slice,
    type(Ellipsis): _e_ellipsis,
    decimal.Decimal: _e_decimal,
    uuid.UUID: _e_uuid,
    _dt.date: _e_date,
    _dt.time: _e_time,
    _dt.datetime: _e_datetime,
    _dt.timedelta: _e_timedelta,
    re.Pattern: _e_pattern,
    np.ndarray: _e_ndarray,
}


# ---------------------------------------------------------------------------------------------
# vectorised fast paths for long homogeneous containers. Each returns exactly the bytes of the
# general path (tests check this with _FAST_PATHS off) or None when it does not apply.


def _all_type(items: list, t: type) -> bool:
    return all(type(x) is t for x in items)


def _str_column(items: list) -> tuple[np.ndarray, bytes] | None:
    """(UTF-8 lengths, concatenated UTF-8) of a list of str."""
    joined = "".join(items)
    if joined.isascii():
        return np.fromiter(map(len, items), np.int64, len(items)), joined.encode("ascii")
    encoded = [_utf8(s) for s in items]
    return np.fromiter(map(len, encoded), np.int64, len(items)), b"".join(encoded)


class _Fixed:
    """A column of equal-width encodings: an (n, w) uint8 matrix."""

    def __init__(self, mat: np.ndarray) -> None:
        self.mat = mat

    def widths(self) -> int:
        return self.mat.shape[1]

    def take(self, order: np.ndarray) -> _Fixed:
        return _Fixed(self.mat[order])


class _Var:
    """A column of a fixed header (n, w) followed by variable-length data (lens, flat bytes)."""

    def __init__(self, head: np.ndarray, lens: np.ndarray, flat: np.ndarray) -> None:
        self.head, self.lens, self.flat = head, lens, flat

    def widths(self) -> np.ndarray:
        return self.lens + self.head.shape[1]

    def take(self, order: np.ndarray) -> _Var:
        lens = self.lens[order]
        starts = np.cumsum(self.lens) - self.lens
        new_starts = np.cumsum(lens) - lens
        idx = np.repeat(starts[order] - new_starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        return _Var(self.head[order], lens, self.flat[idx])


def _header(tag: bytes, lens: np.ndarray) -> np.ndarray:
    head = np.empty((len(lens), 9), np.uint8)
    head[:, 0] = tag[0]
    head[:, 1:] = lens.astype(">u8").view(np.uint8).reshape(-1, 8)
    return head


def _column(items: list) -> tuple[Any, np.ndarray] | None:
    """Encodings of a homogeneous list of scalars plus a uint64/bytes sort key, or None."""
    t = type(items[0])
    n = len(items)
    if not _all_type(items, t):
        return _int_float_column(items) if t is int or t is float else None
    if t is int or t is float:
        try:
            arr = np.array(items, dtype=np.int64 if t is int else np.float64)
        except OverflowError:
            return None
        mat = np.empty((n, 9), np.uint8)
        mat[:, 0] = ord("i") if t is int else ord("f")
        mat[:, 1:] = arr.astype(">i8" if t is int else ">f8").view(np.uint8).reshape(n, 8)
        return _Fixed(mat), arr.view(np.uint64)
    if t is str or t is bytes:
        if t is str:
            lens, data = _str_column(items)
        else:
            lens, data = np.fromiter(map(len, items), np.int64, n), b"".join(items)
        flat = np.frombuffer(data, np.uint8)
        return _Var(_header(b"s" if t is str else b"b", lens), lens, flat), None
    if t is bool or t is type(None):
        mat = np.array([[ord("T") if x else ord("F")] for x in items] if t is bool else [[ord("N")]] * n,
                       np.uint8)
        return _Fixed(mat), None
    return None


def _int_float_column(items: list) -> tuple[_Fixed, None] | None:
    """A mix of int and float (both 9 bytes). No sort key: mixed dict keys take the general path."""
    kinds = list(map(type, items))
    floats = list(map(operator.is_, kinds, itertools.repeat(float)))
    ints = list(map(operator.is_, kinds, itertools.repeat(int)))
    is_float = np.array(floats, dtype=bool)
    if not bool((is_float | np.array(ints, dtype=bool)).all()):
        return None
    try:
        ivals = np.fromiter(itertools.compress(items, ints), np.int64)
    except OverflowError:
        return None
    fvals = np.fromiter(itertools.compress(items, floats), np.float64)
    mat = np.empty((len(items), 9), np.uint8)
    mat[:, 0] = np.where(is_float, ord("f"), ord("i"))
    mat[~is_float, 1:] = ivals.astype(">i8").view(np.uint8).reshape(-1, 8)
    mat[is_float, 1:] = fvals.astype(">f8").view(np.uint8).reshape(-1, 8)
    return _Fixed(mat), None


def _assemble(cols: list, n: int) -> np.ndarray:
    """Interleave columns entry by entry into one uint8 buffer."""
    widths = [c.widths() for c in cols]
    sizes = np.zeros(n, np.int64)
    for w in widths:
        sizes += w
    total = int(sizes.sum())
    out = np.empty(total, np.uint8)
    off = np.cumsum(sizes) - sizes
    for c, w in zip(cols, widths, strict=False):
        if isinstance(c, _Fixed):
            out[(off[:, None] + np.arange(c.mat.shape[1])).ravel()] = c.mat.ravel()
        else:
            hw = c.head.shape[1]
            out[(off[:, None] + np.arange(hw)).ravel()] = c.head.ravel()
            data_start = off + hw
            vstart = np.cumsum(c.lens) - c.lens
            idx = np.repeat(data_start - vstart, c.lens) + np.arange(len(c.flat), dtype=np.int64)
            out[idx] = c.flat
        off = off + w
    return out


def _sort_order(col: Any, key: np.ndarray | None) -> np.ndarray | None:
    """Order of entries by encoded bytes; None when two encodings are equal (NaN twins)."""
    if key is not None:
        order = np.argsort(key, kind="stable")
        sk = key[order]
        return None if len(sk) > 1 and bool((sk[1:] == sk[:-1]).any()) else order
    if isinstance(col, _Fixed):
        return None
    # str/bytes: encoded as tag + big-endian length + data, so order by (length, data)
    lens = col.lens
    by_len = np.argsort(lens, kind="stable")
    sorted_lens = lens[by_len]
    bounds = np.flatnonzero(np.diff(sorted_lens)) + 1
    starts = np.cumsum(lens) - lens
    groups = []
    for grp in np.split(by_len, bounds):
        width = int(lens[grp[0]])
        if width == 0 or len(grp) == 1:
            groups.append(grp)
            continue
        mat = col.flat[(starts[grp][:, None] + np.arange(width)).ravel()].reshape(len(grp), width)
        groups.append(grp[np.argsort(mat.view(f"S{width}").ravel(), kind="stable")])
    return np.concatenate(groups)


def _fast_seq(v: list | tuple, tag: bytes) -> np.ndarray | None:
    first = v[0]
    items = v if type(v) is list else list(v)
    if type(first) is tuple:
        cols = _tuple_columns(items)
        if cols is None:
            return None
    else:
        made = _column(items)
        if made is None:
            return None
        cols = [made[0]]
    body = _assemble(cols, len(items))
    return np.concatenate([np.frombuffer(TAG_LEN(tag, len(items)), np.uint8), body])


def _tuple_columns(items: list) -> list | None:
    """Columns for a list of equal-length tuples of scalars (each position of one type)."""
    width = len(items[0])
    if width == 0 or not _all_type(items, tuple) or any(len(x) != width for x in items):
        return None
    head = np.frombuffer(TAG_LEN(b"t", width), np.uint8)
    cols: list = [_Fixed(np.broadcast_to(head, (len(items), 9)))]
    for position in zip(*items, strict=False):
        made = _column(list(position))
        if made is None:
            return None
        cols.append(made[0])
    return cols


def _fast_dict(d: dict) -> np.ndarray | None:
    keys = list(d)
    kc = _column(keys)
    if kc is None:
        return None
    vc = _column(list(d.values()))
    if vc is None:
        return None
    order = _sort_order(*kc)
    if order is None:
        return None
    body = _assemble([kc[0].take(order), vc[0].take(order)], len(keys))
    return np.concatenate([np.frombuffer(TAG_LEN(b"d", len(keys)), np.uint8), body])


def _fast_set(s: set | frozenset, tag: bytes) -> np.ndarray | None:
    items = list(s)
    made = _column(items)
    if made is None:
        return None
    order = _sort_order(*made)
    if order is None:
        return None
    body = _assemble([made[0].take(order)], len(items))
    return np.concatenate([np.frombuffer(TAG_LEN(tag, len(items)), np.uint8), body])


# ---------------------------------------------------------------------------------------------
# public entry points


def _run(e: Encoder, value: Any, path: str) -> None:
    try:
        e.enc(value)
    except PathError as err:
        raise UnhashableArgument(err.format(path)) from None
    except RecursionError:
        raise UnhashableArgument(f"cannot hash {path}: nesting too deep to encode") from None


def canonical_bytes(value: Any, *, path: str = "value") -> bytes:
    """The full kt1 encoding of ``value`` (for tests, vectors and docs; hashing streams instead)."""
    e = Encoder(stream=False)
    _run(e, value, path)
    return bytes(e.out)


def hash_value(value: Any, *, path: str = "value") -> str:
    """xxh3-128 (32 lowercase hex) of ``canonical_bytes(value)``, computed without materialising it.

    ``path`` names the value in error messages (``args``, a parameter name, ...).
    """
    e = Encoder(stream=True)
    _run(e, value, path)
    return e.hexdigest()


class Hasher:
    """Incremental hashing of a sequence of values, streamed as they come.

    The digest is xxh3-128 of ``b"H" + enc(v1) + ... + enc(vn) + u64(n)``. Encodings are
    self-delimiting, so this is unambiguous, and ``H`` is not a value tag, so it never equals a
    ``hash_value``. Use it when the parts are produced one by one and may be large.
    """

    def __init__(self) -> None:
        self._e = Encoder(stream=True)
        self._e.out += b"H"
        self._n = 0

    def update(self, value: Any, *, path: str | None = None) -> Hasher:
        _run(self._e, value, path or f"value[{self._n}]")
        self._n += 1
        return self

    def hexdigest(self) -> str:
        tail = bytes(self._e.out) + _U64(self._n)
        if self._e.sink is None:
            return xxhash.xxh3_128_hexdigest(tail)
        h = self._e.sink.copy()
        h.update(tail)
        return h.hexdigest()
