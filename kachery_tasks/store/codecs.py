"""Result codecs: how a value becomes bytes in the store and comes back.

``json`` for plain data (kept inline in a task record when small), ``npy`` for numpy arrays
(written straight from the array's buffer, loaded by memory map, so a cached 1 GB array loads in
milliseconds), ``pickle`` (cloudpickle) for anything else. Unpickling runs code, so pickle results
are loaded only from this node's own store or from nodes the config marks trusted.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import orjson

from ..errors import CodecError

CODECS = ("json", "npy", "pickle")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_NPY_BLOCK = 8 * 2**20


def is_plain_json(value: Any, depth: int = 0) -> bool:
    """True if ``value`` survives a JSON round trip unchanged, with the same types all the way down.

    Integers must fit in 64 bits: records are read with orjson, which turns larger ones into floats.
    """
    if depth > 200:
        return False
    if value is None or type(value) in (bool, str):
        return True
    if type(value) is int:
        return _INT_MIN <= value <= _INT_MAX
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(is_plain_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain_json(v, depth + 1) for k, v in value.items())
    return False


def choose_codec(value: Any) -> str:
    """The codec a result gets when its task names none."""
    if isinstance(value, np.ndarray) and _fixed_size(value.dtype):
        return "npy"
    if is_plain_json(value):
        return "json"
    return "pickle"


def _fixed_size(dtype: np.dtype) -> bool:
    """A dtype whose items are plain bytes of one size: no Python objects (``object``, or fields
    holding them) and no variable-width strings (numpy 2's ``StringDType``, kind ``T``), which
    ``.npy`` could only keep by pickling."""
    return not dtype.hasobject and dtype.kind != "T"


def check_codec(codec: str | None) -> None:
    if codec is not None and codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)} or leave it out")


def encode_json(value: Any) -> bytes:
    if not is_plain_json(value):
        raise CodecError(
            f"a result of type {type(value).__name__} cannot be stored with codec 'json' without changing it "
            "(only None, bool, int, finite float, str, list and dict with str keys round-trip); "
            "use codec='pickle' or leave the codec out"
        )
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_pickle(value: Any) -> bytes:
    try:
        return cloudpickle.dumps(value, protocol=5)
    except Exception as exc:
        raise CodecError(f"a result of type {type(value).__name__} cannot be pickled ({exc}); return plain data") from None


def npy_blocks(array: np.ndarray) -> Iterator[bytes | memoryview]:
    """The bytes of ``np.save(array)``, from the array's own buffer without a full copy."""
    if not isinstance(array, np.ndarray) or not _fixed_size(array.dtype):
        raise CodecError(
            f"codec 'npy' stores numpy arrays of fixed-size dtypes, not {type(array).__name__}"
            + (f" of dtype {array.dtype}" if isinstance(array, np.ndarray) else "")
            + "; use codec='pickle'"
        )
    header = np.lib.format.header_data_from_array_1_0(array)
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header too long for format 1.0 (huge structured dtypes)
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    yield buffer.getvalue()
    if array.size == 0:
        return
    order = "F" if header["fortran_order"] else "C"
    # as bytes through a uint8 view: the buffer protocol has no format for datetime64/timedelta64
    raw = memoryview(np.ascontiguousarray(array.ravel(order=order)).view(np.uint8))
    for start in range(0, len(raw), _NPY_BLOCK):
        yield raw[start : start + _NPY_BLOCK]


def decode_json(data: bytes) -> Any:
    return orjson.loads(data)


def decode_pickle(data: bytes) -> Any:
    return cloudpickle.loads(data)
