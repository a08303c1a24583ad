"""Regenerate vectors.json: ``python -m kachery_tasks.hashing._make_vectors``.

Vectors pin hashes. Run this to append expressions for a type that had no encoding before (its
values used to be refused, so no existing hash changes: check that the diff only adds entries),
or when an existing encoding changes on purpose, and then only together with a new SCHEME.
"""

from __future__ import annotations

import json
from pathlib import Path

# Names the expressions may use (the test evaluates them with the same namespace).
PRELUDE = (
    "import datetime as dt, decimal, uuid, enum, functools, math, re\n"
    "from collections import OrderedDict, namedtuple\n"
    "from dataclasses import dataclass\n"
    "import numpy as np\n"
    "import pandas as pd\n"
    "P = namedtuple('P', 'a b')\n"
    "@dataclass\n"
    "class D:\n    x: int\n    y: str\n"
    "D.__module__ = 'vectors'; D.__qualname__ = 'D'\n"
    "P.__module__ = 'vectors'\n"
    "class E(enum.Enum):\n    A = 1\n"
    "E.__module__ = 'vectors'\n"
    "class O:\n    __kachery_type__ = 'vectors.O'\n    def __kachery_canon__(self):\n        return [1, 'x']\n"
)

EXPRESSIONS = [
    "None", "True", "False", "0", "1", "-1", "2**63 - 1", "-(2**63)", "2**63", "-(2**200)",
    "0.0", "-0.0", "1.5", "float('nan')", "float('inf')", "1 + 2j", "''", "'hello'", "'héllo \\ud800'",
    "b''", "b'\\x00\\xff'", "bytearray(b'ab')", "[]", "[1, 'a', None]", "()", "(1, (2, 3))",
    "{}", "{'b': 1, 'a': 2}", "{1: 'x', '1': 'y', (1,): None}", "OrderedDict([('b', 1), ('a', 2)])",
    "{3, 1, 2}", "frozenset({'x', 'y'})", "range(1, 10, 3)", "slice(1, None, 2)", "...",
    "decimal.Decimal('3.140')", "decimal.Decimal('NaN')", "uuid.UUID(int=12345)",
    "dt.date(2024, 2, 29)", "dt.time(12, 30, 1, 5)", "dt.time(1, 2, tzinfo=dt.timezone.utc)",
    "dt.datetime(2024, 1, 2, 3, 4, 5, 6)", "dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-5)))",
    "dt.timedelta(days=-1, seconds=5)", "re.compile('a+b', re.I)",
    "np.arange(6, dtype='<i4').reshape(2, 3)", "np.asfortranarray(np.arange(6.0).reshape(2, 3))",
    "np.arange(4, dtype='>u2')", "np.array([True, False])", "np.array(['ab', 'c'])",
    "np.array(['ab', 'c'], dtype=object)", "np.array([1, 'x', None], dtype=object)",
    "np.array(['2020-01-01'], dtype='datetime64[ns]')", "np.zeros(2, dtype=[('a', '<i4'), ('b', '<f8')])",
    "np.zeros((0, 3))", "np.float64(1.0)", "np.int8(-3)", "np.bool_(True)", "np.str_('hi')",
    "np.datetime64('2020-01-01', 'D')", "np.dtype('<f8')", "np.dtype([('a', '<i4'), ('b', '<f8')])",
    "{f'k{i}': i for i in range(40)}", "{f'k{i}': i / 4 for i in range(40)}", "[f's{i}' for i in range(40)]",
    "[(i, str(i), i / 2) for i in range(40)]", "set(range(-20, 20))",
    "pd.Series([1.5, 2.5], index=['a', 'b'], name='s')",
    "pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", "pd.Index([3, 1], name='i')",
    "pd.Series(['a', 'b', 'a'], dtype='category')", "pd.Series([1, None], dtype='Int64')",
    "P(1, 'b')", "D(1, 'y')", "E.A", "O()", "len", "np.add", "functools.partial(max, 1)",
    "pd.StringDtype('python')", "pd.StringDtype('python', na_value=np.nan)",
    "pd.CategoricalDtype(pd.Index([3, 1], dtype='int64'), ordered=True)", "pd.CategoricalDtype()",
    "pd.DatetimeTZDtype('ns', 'UTC')", "pd.DatetimeTZDtype('us', 'Europe/Paris')", "pd.Int64Dtype()",
    "pd.IntervalDtype('int64', 'left')", "pd.SparseDtype(np.float64, np.nan)",
]


def build() -> dict:
    from kachery_tasks.hashing import SCHEME, hash_value

    ns: dict = {}
    exec(PRELUDE, ns)
    vectors = [{"expr": expr, "hash": hash_value(eval(expr, ns))} for expr in EXPRESSIONS]
    return {"scheme": SCHEME, "prelude": PRELUDE, "vectors": vectors}


if __name__ == "__main__":
    path = Path(__file__).with_name("vectors.json")
    path.write_text(json.dumps(build(), indent=1, ensure_ascii=True) + "\n")
    print(f"wrote {path}")
