"""Types used as values by the hashing tests."""

from __future__ import annotations

import enum
from collections import namedtuple
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    x: float
    y: float


@dataclass(frozen=True)
class OtherPoint:
    x: float
    y: float


Pair = namedtuple("Pair", "a b")
OtherPair = namedtuple("OtherPair", "a b")


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Shade(enum.Enum):
    RED = 1


class Canon:
    def __init__(self, v):
        self.v = v

    def __kachery_canon__(self):
        return {"v": self.v}


class Named(Canon):
    __kachery_type__ = "lab.Named"


class Opaque:
    pass


class Registered:
    def __init__(self, v):
        self.v = v


class Task:
    """Stands in for a decorated task: identified by its FunctionId."""

    def __init__(self, fid):
        self.fid = fid

    def __kachery_function_id__(self):
        return self.fid

    def __call__(self, *a):
        return None


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


class Calc:
    def __init__(self, k):
        self.k = k

    def run(self, x):
        return self.k * x

    def __kachery_canon__(self):
        return self.k
