"""Pinned vectors: a value built from an expression must keep its hash while SCHEME is kt1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kachery_tasks.hashing as hashing
from kachery_tasks.hashing import SCHEME, hash_value

VECTORS = json.loads((Path(hashing.__file__).parent / "vectors.json").read_text())


def _namespace() -> dict:
    ns: dict = {}
    exec(VECTORS["prelude"], ns)
    return ns


def test_vectors_belong_to_this_scheme():
    # changing the encoding must change SCHEME and regenerate the vectors together
    assert VECTORS["scheme"] == SCHEME
    assert len(VECTORS["vectors"]) >= 40


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=[v["expr"][:40] for v in VECTORS["vectors"]])
def test_vector(vector):
    assert hash_value(eval(vector["expr"], _namespace())) == vector["hash"]


def test_vectors_are_distinct():
    hashes = [v["hash"] for v in VECTORS["vectors"]]
    assert len(set(hashes)) == len(hashes)


# -- pandas extension dtypes as values (tag J): pinned above, and told apart by their parameters ---
def _pandas_dtype_pairs():
    import datetime as dt

    import numpy as np
    import pandas as pd

    differ = [
        (pd.StringDtype("python"), pd.StringDtype("python", na_value=np.nan)),
        (pd.StringDtype("python", na_value=np.nan), "str"),
        (pd.CategoricalDtype(["a", "b"]), pd.CategoricalDtype(["b", "a"])),  # equal to pandas
        (pd.CategoricalDtype(["a", "b"]), pd.CategoricalDtype(["a", "b"], ordered=True)),
        (pd.CategoricalDtype(["a", "b"]), pd.CategoricalDtype(pd.Index(["a", "b"], dtype=object))),
        (pd.CategoricalDtype(["a", "b"]), pd.CategoricalDtype()),
        (pd.DatetimeTZDtype("ns", "UTC"), pd.DatetimeTZDtype("us", "UTC")),
        (pd.DatetimeTZDtype("ns", "Europe/Paris"), pd.DatetimeTZDtype("ns", "Europe/Berlin")),
        (pd.DatetimeTZDtype("ns", "UTC"), pd.DatetimeTZDtype("ns", dt.timezone(dt.timedelta(0), "Z"))),
        (pd.DatetimeTZDtype("ns", "+01:00"), pd.DatetimeTZDtype("ns", "+02:00")),
        (pd.Int64Dtype(), pd.Int32Dtype()), (pd.Int64Dtype(), np.dtype("int64")), (pd.Int64Dtype(), "Int64"),
        (pd.Float64Dtype(), pd.BooleanDtype()),
        (pd.IntervalDtype("int64", "left"), pd.IntervalDtype("int64", "right")),
        (pd.IntervalDtype("int64", "left"), pd.IntervalDtype("float64", "left")),
        (pd.SparseDtype(np.float64, np.nan), pd.SparseDtype(np.float64, 0.0)),
    ]
    equal = [
        (pd.StringDtype("python"), pd.StringDtype("python")),
        (pd.CategoricalDtype(["a", "b"], ordered=True), pd.CategoricalDtype(["a", "b"], ordered=True)),
        (pd.DatetimeTZDtype("ns", "Europe/Paris"), pd.DatetimeTZDtype("ns", __import__("zoneinfo").ZoneInfo("Europe/Paris"))),
        (pd.DatetimeTZDtype(tz="UTC"), pd.DatetimeTZDtype("ns", dt.timezone.utc)),
        (pd.Int64Dtype(), pd.Int64Dtype()),
        (pd.SparseDtype(np.float64, np.nan), pd.SparseDtype(np.float64)),
    ]
    return differ, equal


def test_pandas_dtypes_differ_by_their_parameters_and_equal_when_built_alike():
    differ, equal = _pandas_dtype_pairs()
    for a, b in differ:
        assert hash_value(a) != hash_value(b), (a, b)
    for a, b in equal:
        assert a is not b and hash_value(a) == hash_value(b), (a, b)


def test_pandas_string_dtype_storage_counts():
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import numpy as np

    assert hash_value(pd.StringDtype("python")) != hash_value(pd.StringDtype("pyarrow"))
    # both print as "str": a name from str(dtype) could not tell them apart
    a, b = pd.StringDtype("python", na_value=np.nan), pd.StringDtype("pyarrow", na_value=np.nan)
    assert str(a) == str(b) and hash_value(a) != hash_value(b)


def test_pandas_dtype_encoding_names_the_public_class():
    import pandas as pd

    from kachery_tasks.hashing import canonical_bytes

    for dtype in (pd.StringDtype("python"), pd.CategoricalDtype(), pd.DatetimeTZDtype(tz="UTC"),
                  pd.UInt8Dtype(), pd.IntervalDtype(), pd.SparseDtype()):
        name = type(dtype).__name__
        assert getattr(pd, name) is type(dtype)
        assert canonical_bytes(dtype).startswith(b"J" + canonical_bytes(f"pandas.{name}"))


# A dateutil zone is refused under every python-dateutil version. Covers 2.9.x, where its tzfile has
# no name, and 4.0, which added tzfile.key ("Europe/Paris"): read as a zone name, that key made the
# dtype hashable, under the id of zoneinfo's Europe/Paris, which computes other offsets than
# dateutil 2.9 does (no summer time after 2037).
@pytest.mark.parametrize("zone", ["dateutil/Europe/Paris", "dateutil/UTC"])
def test_dateutil_zones_are_refused_in_a_dtype_whatever_the_dateutil_version(zone):
    import pandas as pd

    from kachery_tasks.errors import UnhashableArgument

    dtype = pd.DatetimeTZDtype("ns", zone)
    assert type(dtype.tz).__module__.startswith("dateutil.")
    with pytest.raises(UnhashableArgument,
                       match=r"args\[0\]\.tz: the time zone dateutil\..* is dateutil's.*use zoneinfo\.ZoneInfo"):
        hash_value([dtype], path="args")
    # the same zone named without "dateutil/" is zoneinfo's (pytz's under pandas < 3), and hashes
    assert hash_value(pd.DatetimeTZDtype("ns", zone.removeprefix("dateutil/")))


def test_pandas_dtypes_with_no_rule_are_refused_where_they_sit():
    import pandas as pd

    from kachery_tasks.errors import UnhashableArgument

    with pytest.raises(UnhashableArgument, match=r"kwargs\['d'\]\[1\]\.tz: the time zone dateutil"):
        hash_value({"d": [1, pd.DatetimeTZDtype("ns", "dateutil/Europe/Paris")]}, path="kwargs")
    with pytest.raises(UnhashableArgument, match=r"kwargs\['d'\]: no canonical encoding for a pandas.*PeriodDtype"):
        hash_value({"d": pd.PeriodDtype("D")}, path="kwargs")
