"""Canonical encoding: every distinction must-differ and must-equal, errors, fast paths, streaming."""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import math
import pathlib
import struct
import subprocess
import sys
import uuid
import zoneinfo
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import xxhash
from hashing_fixtures import samples
from hypothesis import given, settings
from hypothesis import strategies as st

from kachery_tasks.hashing import (
    SCHEME,
    Hasher,
    UnhashableArgument,
    canonical_bytes,
    hash_value,
    register_canon,
)
from kachery_tasks.hashing import canonical as C

H = hash_value

A = np.arange(12.0).reshape(3, 4)

MUST_DIFFER = [
    (1, 1.0), (1, True), (1, "1"), (1, b"1"), ("1", b"1"), (None, 0), (None, ""), (0, False),
    (True, 1.0), (b"1", bytearray(b"1")), ((1, 2), [1, 2]), ({1: 0}, {"1": 0}), (-0.0, 0.0),
    (float("nan"), struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x00\x01")[0]),
    (2**64, 2**64 + 1), (2**63, -(2**63)), (2**63 - 1, 2**63), ({1, 2}, frozenset({1, 2})),
    ({1, 2}, [1, 2]), ({"a": 1}, OrderedDict(a=1)), (OrderedDict(a=1, b=2), OrderedDict(b=2, a=1)),
    (1 + 2j, (1.0, 2.0)), (range(3), [0, 1, 2]), (range(0, 3), range(0, 3, 2)),
    (decimal.Decimal("1.0"), decimal.Decimal("1.00")), (decimal.Decimal("1"), 1),
    (uuid.UUID(int=1), uuid.UUID(int=2)), (dt.date(2020, 1, 2), dt.date(2020, 2, 1)),
    (dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)),
    (dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))),
    (dt.datetime(2020, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
     dt.datetime(2020, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))),
    (dt.time(1, 2), dt.time(1, 2, tzinfo=dt.timezone.utc)), (dt.date(2020, 1, 1), dt.datetime(2020, 1, 1)),
    (dt.timedelta(1), dt.timedelta(seconds=1)), (dt.timedelta(0), 0),
    (A, A.T), (A, A.astype(np.float32)), (A, A.reshape(4, 3)), (A, A.astype(">f8")),
    (A[0], A[1]), (np.array([1, 2]), [1, 2]), (np.float64(1.0), 1.0), (np.int64(1), 1),
    (np.int64(1), np.int32(1)), (np.bool_(True), True), (np.str_("a"), "a"),
    (np.array(["a-b", "c"], dtype=object), np.array(["a", "b-c"], dtype=object)),
    (np.array(["a", "b"], dtype=object), np.array(["a", "b"])),
    (np.zeros(2, dtype=[("a", "<i4"), ("b", "<i4")]), np.zeros(2, dtype=[("a", "<i4"), ("c", "<i4")])),
    (np.array(["2020-01-01"], dtype="M8[D]"), np.array(["2020-01-01"], dtype="M8[s]")),
    (np.zeros((0, 3)), np.zeros((3, 0))), (np.zeros(()), np.zeros(1)),
    (samples.Point(1, 2), samples.OtherPoint(1, 2)), (samples.Point(1, 2), samples.Point(2, 1)),
    (samples.Point(1, 2), (1, 2)), (samples.Pair(1, 2), (1, 2)), (samples.Pair(1, 2), samples.OtherPair(1, 2)),
    (samples.Color.RED, samples.Shade.RED), (samples.Color.RED, samples.Color.GREEN), (samples.Color.RED, 1),
    (samples.Canon(1), samples.Canon(2)), (samples.Canon(1), samples.Named(1)), (samples.Canon(1), {"v": 1}),
    (samples.double, samples.triple), (functools.partial(samples.double, 1), functools.partial(samples.double, 2)),
    (functools.partial(samples.double, 1), functools.partial(samples.triple, 1)),
    (samples.Calc(2).run, samples.Calc(3).run), (len, abs), (np.add, np.multiply), (samples.Point, samples.OtherPoint),
    ([1, [2, 3]], [[1, 2], 3]), (("a", "bc"), ("ab", "c")), ({"a": 1, "b": 2}, {"a": 2, "b": 1}),
    ([], ()), ({}, set()), ("", b""), (slice(1, 2), slice(1, 3)), (..., None),
    (np.dtype("<f8"), np.dtype("<f4")), (np.dtype("<f8"), np.dtype(">f8")), (np.dtype("<f8"), "<f8"),
    (np.dtype([("a", "<i4")]), np.dtype([("b", "<i4")])), (np.dtype("M8[D]"), np.dtype("M8[s]")),
]


@pytest.mark.parametrize(("a", "b"), MUST_DIFFER, ids=[f"differ{i}" for i in range(len(MUST_DIFFER))])
def test_must_differ(a, b):
    assert H(a) != H(b)
    assert canonical_bytes(a) != canonical_bytes(b)


F = np.asfortranarray(A)
DF = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
MUST_EQUAL = [
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}), ({1: "x", "1": "y"}, {"1": "y", 1: "x"}), ({3, 1, 2}, {2, 3, 1}),
    (A, F), (A, A.copy()), (A.T, np.ascontiguousarray(A.T)), (A[:, 1], np.array([1.0, 5.0, 9.0])),
    (np.arange(20)[::2], np.arange(0, 20, 2)), (float("nan"), float("nan")), (2**200, 2**200),
    (dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)),
    (samples.Point(1, 2), samples.Point(1, 2)), (samples.Calc(2).run, samples.Calc(2).run),
    (functools.partial(samples.double, 1), functools.partial(samples.double, 1)),
    (DF, DF.copy()), (DF, pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=pd.Index([0, 1]))),
    (np.memmap, np.memmap), (np.dtype("float64"), np.dtype("<f8")), (np.dtype(float), A.dtype),
]


@pytest.mark.parametrize(("a", "b"), MUST_EQUAL, ids=[f"equal{i}" for i in range(len(MUST_EQUAL))])
def test_must_equal(a, b):
    assert H(a) == H(b)


def test_pandas_distinctions():
    df = pd.DataFrame({"a": [1.0, 2.0], "b": [3, 4]})
    assert H(df) != H(df.rename(columns={"a": "z"}))
    assert H(df) != H(df.astype({"b": "float64"}))
    assert H(df) != H(df.set_axis([5, 6]))
    assert H(df) != H(df[["b", "a"]])
    assert H(df["a"]) != H(df["a"].rename("q"))
    assert H(df["a"]) != H(df["a"].to_numpy())
    assert H(pd.Index([1, 2], name="x")) != H(pd.Index([1, 2], name="y"))
    cat = pd.Series(["a", "b", "a"], dtype="category")
    assert H(cat) != H(pd.Series(["a", "b", "a"]))
    assert H(pd.Series([1, None], dtype="Int64")) != H(pd.Series([1, 0], dtype="Int64"))
    mi = pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["n", "s"])
    assert H(pd.Series([1, 2], index=mi)) != H(pd.Series([1, 2]))
    utc = pd.Series(pd.to_datetime(["2020-01-01"]).tz_localize("UTC"))
    assert H(utc) != H(pd.Series(pd.to_datetime(["2020-01-01"])))
    assert H(pd.Timestamp("2020-01-01")) != H(pd.Timestamp("2020-01-02"))


# Covers python-dateutil 2.9.x (its tzfile has no name) and 4.0 (tzfile.key added): a datetime
# carrying a dateutil zone is encoded, under both, like one with any unnamed tzinfo, by the offset
# and the abbreviation it has at that instant. Reading 4.0's key would have changed these ids from
# 2.9's and made them those of the zoneinfo datetimes, whose offsets differ from 2.9's after 2037.
@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "UTC"])
def test_a_dateutil_zone_in_a_datetime_is_its_offset_and_abbreviation(zone):
    dateutil_tz = pytest.importorskip("dateutil.tz")
    tz = dateutil_tz.gettz(zone)
    for wall in (dt.datetime(2024, 1, 2, 3, 4), dt.datetime(2024, 7, 2, 3, 4)):
        aware = wall.replace(tzinfo=tz)
        unnamed = wall.replace(tzinfo=dt.timezone(aware.utcoffset(), aware.tzname()))
        assert canonical_bytes(aware) == canonical_bytes(unnamed)
        assert H(aware) != H(wall.replace(tzinfo=zoneinfo.ZoneInfo(zone)))
        stamp = pd.Timestamp(aware)
        assert H(stamp) == H(pd.Timestamp(unnamed))
        assert H(stamp) != H(pd.Timestamp(wall.replace(tzinfo=zoneinfo.ZoneInfo(zone))))


def test_numpy_scalar_is_not_python_scalar():
    # documented: np.float64(1.0) is a numpy scalar with a dtype, encoded differently from 1.0
    assert canonical_bytes(np.float64(1.0))[:1] == b"g"
    assert canonical_bytes(1.0)[:1] == b"f"


def test_fortran_and_views_streamed_in_chunks(monkeypatch):
    monkeypatch.setattr(C, "_CHUNK", 64)
    big = np.asfortranarray(np.arange(3000.0).reshape(100, 30))
    assert H(big) == H(np.ascontiguousarray(big))
    assert H(big[::3, 1:]) == H(np.ascontiguousarray(big[::3, 1:]))
    tiles = np.asfortranarray(np.arange(130 * 1100, dtype=np.int16).reshape(130, 1100))
    assert H(tiles) == H(np.ascontiguousarray(tiles))


def test_streaming_equals_full_encoding():
    value = {"a": np.arange(100_000.0), "b": "x" * 100_000, "c": [b"y" * 70_000, 1]}
    assert H(value) == xxhash.xxh3_128_hexdigest(canonical_bytes(value))
    assert len(H(value)) == 32 and H(value) == H(value).lower()


@pytest.mark.parametrize(
    "value",
    [
        {f"k{i}": i for i in range(100)},
        {f"k{i}": i * 0.5 for i in range(100)},
        {f"k{i}é": f"v{i}" for i in range(100)},
        {f"{'x' * (i % 13)}{i}": None for i in range(100)},
        {i * 7919 % 1000 - 500: True for i in range(100)},
        {float(i) - 50.5: b"z" for i in range(100)},
        {"a\x00": 1, "a": 2, **{f"p{i}": i for i in range(50)}},
        [f"s{i}" for i in range(100)],
        list(range(-50, 50)),
        [i * 1.5 for i in range(64)],
        [(i, f"s{i}", i * 0.25) for i in range(100)],
        tuple(range(40)),
        {f"e{i}" for i in range(100)},
        frozenset(range(-100, 100)),
        {2**70 + i: i for i in range(40)},  # out of int64: general path
        [1] * 31 + [1.0],  # mixed int/float column
        {f"k{i}": (i if i % 3 else i / 3) for i in range(100)},
        {(i if i % 3 else i / 3): i for i in range(100)},  # mixed keys: general path
        [1] * 31 + [2**64],  # out of int64 in a mixed column
        [True] * 20 + [1] * 20,
    ],
)
def test_fast_paths_match_general_path(monkeypatch, value):
    fast = canonical_bytes(value)
    monkeypatch.setattr(C, "_FAST_PATHS", False)
    assert canonical_bytes(value) == fast


def test_unhashable_names_path():
    with pytest.raises(UnhashableArgument, match=r"opts\['params'\]\[2\]"):
        hash_value({"params": [1, 2, samples.Opaque()]}, path="opts")
    with pytest.raises(UnhashableArgument, match=r"register_canon"):
        hash_value(samples.Opaque())
    with pytest.raises(UnhashableArgument, match=r"value\.x"):
        hash_value(samples.Point(samples.Opaque(), 1))
    with pytest.raises(UnhashableArgument, match=r"value\[1, 0\]"):
        hash_value(np.array([[1, 2], [samples.Opaque(), 3]], dtype=object))


def test_path_refused_with_store_file_hint():
    with pytest.raises(UnhashableArgument, match="store_file"):
        hash_value(pathlib.Path("/tmp/x"))
    with pytest.raises(UnhashableArgument, match=r"args\[0\]"):
        hash_value([pathlib.PurePosixPath("a")], path="args")


def test_no_repr_fallbacks():
    for bad in [object(), open, lambda: None.__class__, iter([]), np.ma.array([1]), sys]:
        try:
            b = canonical_bytes(bad)
        except UnhashableArgument:
            continue
        assert b"0x" not in b  # never a memory address


def test_cycles_raise():
    a = [1]
    a.append([2, a])
    with pytest.raises(UnhashableArgument, match=r"cycle at args\[1\]\[1\]"):
        hash_value(a, path="args")
    d = {}
    d["self"] = d
    with pytest.raises(UnhashableArgument, match="cycle"):
        hash_value(d)
    shared = [1]
    assert H([shared, shared]) == H([[1], [1]])  # repetition is not a cycle


def test_depth_bounded():
    deep = []
    cur = deep
    for _ in range(5000):
        cur.append([])
        cur = cur[0]
    with pytest.raises(UnhashableArgument, match="nesting"):
        hash_value(deep)


def test_register_canon_and_type_name():
    class Local:
        def __init__(self, v):
            self.v = v

    register_canon(samples.Registered, lambda o: o.v)
    assert H(samples.Registered(1)) != H(samples.Registered(2))
    assert H(samples.Registered(1)) == H(samples.Registered(1))
    assert H(samples.Registered(1)) != H(1)
    assert b"lab.Named" in canonical_bytes(samples.Named(1))
    with pytest.raises(TypeError):
        register_canon(dict, lambda o: o)
    with pytest.raises(UnhashableArgument):
        hash_value(Local(1))


def test_function_id_objects_as_values():
    from kachery_tasks.hashing import FunctionId

    t1 = samples.Task(FunctionId("lab.sort", "h1"))
    t2 = samples.Task(FunctionId("lab.sort", "h2"))
    assert H(t1) != H(t2)
    assert H(t1) == H(samples.Task(FunctionId("lab.sort", "h1", {"x": "y"})))


def test_lambdas_on_one_line_differ():
    f, g = (lambda x: x + 1), (lambda x: x * 2)
    assert H(f) != H(g)
    assert H(f) == H(f)


def test_closures_differ_by_captured_value():
    def make(n):
        return lambda x: x + n

    assert H(make(1)) != H(make(2))
    assert H(make(1)) == H(make(1))


def test_hasher_incremental():
    h1 = Hasher().update(1).update(np.arange(100_000)).hexdigest()
    h2 = Hasher().update(1).update(np.arange(100_000)).hexdigest()
    h3 = Hasher().update(np.arange(100_000)).update(1).hexdigest()
    assert h1 == h2 != h3
    assert Hasher().update(1).hexdigest() != H((1,))


def test_scheme_is_kt1():
    assert SCHEME == "kt1"


def test_stable_across_processes_and_hash_seeds():
    code = (
        "import numpy as np, datetime as dt; from kachery_tasks.hashing import hash_value;"
        "print(hash_value({'a': {3, 'x', (1, 2.5)}, 'b': frozenset({'p', 'q', 'r'}), 'c': np.arange(5),"
        "'d': dt.date(2020, 1, 1), 'e': {f'k{i}': i for i in range(100)}}))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "12345")
    }
    assert len(outs) == 1


# --- property tests ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
    st.binary(max_size=5),
)
hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                        max_leaves=8)
values = st.recursive(
    scalars | hashable,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(hashable, inner, max_size=4) | st.sets(hashable, max_size=4),
    max_leaves=12,
)


def _structure(v):
    """Value plus exact types, recursively: equal iff the canonical encodings must be equal."""
    t = type(v)
    if t is float:
        return (t, struct.pack(">d", v))
    if t in (list, tuple):
        return (t, tuple(_structure(x) for x in v))
    if t in (set, frozenset):
        return (t, frozenset(_structure(x) for x in v))
    if t is dict:
        return (t, frozenset((_structure(k), _structure(x)) for k, x in v.items()))
    return (t, v)


@settings(max_examples=300, deadline=None)
@given(values, values)
def test_property_equal_iff_structurally_equal(a, b):
    assert (H(a) == H(b)) == (_structure(a) == _structure(b))


@settings(max_examples=200, deadline=None)
@given(values)
def test_property_deterministic_and_copy_equal(a):
    import copy

    assert H(a) == H(copy.deepcopy(a))
    assert canonical_bytes(a) == canonical_bytes(a)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.integers(-(2**63), 2**63 - 1) | st.floats(), min_size=33))
def test_property_fast_dict_matches_general(d):
    fast = canonical_bytes(d)
    C._FAST_PATHS = False
    try:
        assert canonical_bytes(d) == fast
    finally:
        C._FAST_PATHS = True


def test_float_bits():
    assert canonical_bytes(math.inf) == b"f" + struct.pack(">d", math.inf)
    assert canonical_bytes(-1) == b"i" + (-1).to_bytes(8, "big", signed=True)


def test_jobs_encode_as_their_ids_the_same_on_the_fast_path():
    """Jobs take a dedicated encoder (they are hashed once per graph node); its bytes must be the
    general object encoding's, or every Merkle id would change."""
    from kachery_tasks.hashing.canonical import Encoder, _object
    from kachery_tasks.tasks import pure

    @pure
    def f(x):
        return x

    job = f.job(3)
    general = Encoder()
    _object(general, job, job.id)
    assert canonical_bytes(job) == bytes(general.out)
    assert canonical_bytes([job, f.job(4)]) != canonical_bytes([f.job(4), job])


def test_str_keys_encode_the_same_from_the_key_cache():
    """Dict keys that are str take cached encodings and skip the duplicate check; the bytes must be
    those of the general path, whatever the insertion order and the state of the cache."""
    from kachery_tasks.hashing import canonical

    d = {"zeta": 1, "alpha": [2], "é": None, "a" * 100: 3.5}
    canonical._STR_KEYS.clear()
    cold = canonical_bytes(d)
    warm = canonical_bytes(dict(reversed(list(d.items()))))
    assert cold == warm
    assert canonical._STR_KEYS  # filled by the first encoding
    mixed = {"b": 1, 2: "x", "a": 3}  # not all str: the general sort, with str keys from the cache
    assert canonical_bytes(mixed) == canonical_bytes({2: "x", "a": 3, "b": 1})
    assert canonical_bytes({"a": 1, "b": 2}) != canonical_bytes({"a": 2, "b": 1})


def test_structured_dtype_with_fields_out_of_order_is_hashed():
    """numpy has no descr for it (x[["b", "a"]]); it was a ValueError from inside the encoder."""
    x = np.array([(1.0, 2)], dtype=[("a", "<f4"), ("b", "<i4")])
    y = x[["b", "a"]]
    assert hash_value(y) != hash_value(x)  # y[0] is (2, 1.0)
    assert hash_value(y) == hash_value(x[["b", "a"]])
    assert hash_value(x[["a", "b"]]) == hash_value(x)
