"""Content identity of the nodes of a Dask graph: a Merkle id per node, never dask's key names.

Dask keys say nothing about content: ``name=``, ``dask_key_name=`` and ``pure=True`` tokens can stay
the same while data or code change, and dask's own tokens hash callables by reference. So a node's
id here is the hash of (what the node runs, its literal arguments, the ids of its dependencies), and
the callable is identified by looking through dask's wrappers (``functools.partial`` and its bound
arguments, ``dask.utils.methodcaller``/``itemgetter``/``apply``, fused ``_execute_subgraph`` tasks,
the getattr and method wrappers behind delayed attributes) down to the user's functions, which the
hashing layer identifies by code, and to library callables, identified by name and package version.

A node that cannot be identified raises :class:`Unidentifiable` with the reason; the caller leaves
it (and everything downstream, whose Merkle id would depend on it) uncached. Some nodes could be
identified but must not be: those of distributed's P2P shuffles, which only work under their own
keys (:func:`keyed_by_name`); :func:`graph_ids` gives them no id, whatever the collection.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

import numpy as np
from dask.utils import itemgetter, methodcaller

from ..errors import UnhashableArgument, UserError
from ..hashing import hash_value
from ..hashing.canonical import BUILTIN_CALLABLES, builtin_name
from ..hashing.function_identity import module_kind, package_version
from ..hashing.memo import IdentityMemo
from ..store.file_hashes import content_sha256
from ._compat import (
    Alias,
    DataNode,
    GraphNode,
    NestedContainer,
    Task,
    TaskRef,
    execute_subgraph,
    p2p_barrier_type,
)
from .nodes import JobTask

#: Bump when the way nodes are identified changes: every cached() id changes with it.
SCHEME = "kt1-dask-1"


class Unidentifiable(Exception):
    """A node (or something it refers to) with no content identity; the message says why."""


class _Ref:
    """Stands for a dependency inside a node's canonical form: its id, never its key."""

    __slots__ = ("id",)
    __kachery_type__ = "kachery_tasks.dask.Ref"

    def __init__(self, id_: str):
        self.id = id_

    def __kachery_canon__(self) -> str:
        return self.id


class _Canon:
    """An already canonical structure (callable identities, nested tasks) for ``hash_value``."""

    __slots__ = ("value",)
    __kachery_type__ = "kachery_tasks.dask.Canon"

    def __init__(self, value: Any):
        self.value = value

    def __kachery_canon__(self) -> Any:
        return self.value


# -- callables -------------------------------------------------------------------------------------
_CALLABLE_CACHE: IdentityMemo[Any] = IdentityMemo()


def callable_identity(func: Any) -> Any:
    """A canonical (hashable by ``hash_value``) stand-in for ``func``; raises Unidentifiable.

    Only identities that cannot change while the object lives are memoized here: builtins and
    ufuncs, ``methodcaller`` and library callables, which count by name and package version. A
    function's identity covers the values of the globals, closures and defaults it reads, which can
    be rebound at any time; ``function_id`` keeps its own memo, checked against those values on every
    call, so a function is identified through it each time, exactly as a ``@pure`` task's is."""
    if _fixed_identity(func):
        return _CALLABLE_CACHE.get_or_compute(func, _callable_identity)
    return _callable_identity(func)


def _fixed_identity(func: Any) -> bool:
    """True for callables whose identity cannot change while they live: ``methodcaller`` and
    builtins not bound to an object (a bound builtin, ``state.rand``, is identified with its
    ``__self__``, which may change)."""
    if isinstance(func, methodcaller):
        return True
    if not isinstance(func, BUILTIN_CALLABLES):
        return False
    self_ = getattr(func, "__self__", None)
    return self_ is None or isinstance(self_, types.ModuleType | type)


def _callable_identity(func: Any) -> Any:
    if isinstance(func, functools.partial):
        return _Canon(("partial", callable_identity(func.func), canon_args(func.args, {}),
                       canon_args(func.keywords, {})))
    if isinstance(func, methodcaller):
        return _Canon(("methodcaller", func.method))
    if isinstance(func, itemgetter):  # dask's own, with __eq__ (groupby().agg({...}) ends with one)
        return _Canon(("itemgetter", canon_value(func.index, {})))
    if getattr(func, "__kachery_function_id__", None) is not None:  # a kachery Task
        return _Canon(("fid", func.__kachery_function_id__().__kachery_canon__()))
    if isinstance(func, BUILTIN_CALLABLES):  # includes numpy ufuncs
        name = builtin_name(func)
        version = package_version(name.partition(".")[0])[1]  # numpy's ufuncs change with numpy
        self_ = getattr(func, "__self__", None)
        if self_ is not None and not isinstance(self_, types.ModuleType | type):
            return _Canon(("bound", name, version, canon_value(self_, {})))
        return _Canon(("builtin", name, version))
    if isinstance(func, types.MethodType):
        return _Canon(("method", callable_identity(func.__func__), canon_value(func.__self__, {})))
    if isinstance(func, types.FunctionType | type):
        try:
            return _Canon(("fid", hash_value(func)))
        except UnhashableArgument as exc:
            raise Unidentifiable(str(exc)) from None
    # curried functions (toolz.curry) look like partials
    inner = getattr(func, "func", None)
    if callable(inner) and isinstance(getattr(func, "args", None), tuple) and isinstance(
            getattr(func, "keywords", None), dict):
        return _Canon(("curry", type(func).__qualname__, callable_identity(inner),
                       canon_args(func.args, {}), canon_args(func.keywords, {})))
    # library callable objects (numpy's array-function dispatchers, ...): name and package version
    module = getattr(func, "__module__", None) or type(func).__module__
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module_kind(module) != "user":
        return _Canon(("library", f"{module}.{qualname}", package_version(module)[1]))
    try:
        return _Canon(("object", hash_value(func)))
    except UnhashableArgument as exc:
        raise Unidentifiable(f"cannot identify the callable {type(func).__qualname__}: {exc}") from None


# -- arguments -------------------------------------------------------------------------------------
def canon_value(value: Any, ids: Mapping[Any, str]) -> Any:
    """``value`` with references, nested tasks and callables replaced by canonical stand-ins."""
    if isinstance(value, TaskRef):
        try:
            return _Ref(ids[value.key])
        except KeyError:
            raise Unidentifiable(f"it depends on {value.key!r}, which has no id") from None
    if isinstance(value, GraphNode):
        return _Canon(("node", node_identity(value, ids)))
    t = type(value)
    if t is list or t is tuple:
        return t(canon_value(v, ids) for v in value)
    if t is dict:
        return {k: canon_value(v, ids) for k, v in value.items()}
    if callable(value) and not isinstance(value, type | np.ndarray):
        return callable_identity(value)
    return value


def canon_args(args: Any, ids: Mapping[Any, str]) -> Any:
    return canon_value(args, ids)


# -- nodes that write outside the graph ----------------------------------------------------------
#: Library callables whose point is a write outside the graph (or a read of what such a write
#: wrote): a node that runs one is never loaded from the store instead, or the write would not
#: happen (``da.store`` into a fresh target left it empty on a rerun). (module, qualname) -> what.
WRITERS: dict[tuple[str, str], str] = {
    ("dask.array.core", "load_store_chunk"): "da.store writes into its target",
    ("dask.array.core", "load_chunk"): "it reads back what da.store wrote into its target",
    ("dask.dataframe.io.csv", "_write_csv"): "to_csv writes a file",
    ("dask.dataframe.io.parquet.core", "ToParquetFunctionWrapper"): "to_parquet writes a file",
    ("dask.dataframe.io.hdf", "_pd_to_hdf"): "to_hdf writes a file",
    ("dask.bag.core", "_to_textfiles_chunk"): "to_textfiles writes a file",
    ("numpy", "save"): "numpy.save writes a file (da.to_npy_stack)",
}


def _writes(func: Any) -> str | None:
    """Why ``func`` is a writer of :data:`WRITERS`, or None."""
    if isinstance(func, functools.partial):
        func = func.func
    target = func if isinstance(func, types.FunctionType | type) else type(func)
    module = getattr(func, "__module__", None) or getattr(target, "__module__", None)
    qualname = getattr(func, "__qualname__", None) or getattr(target, "__qualname__", None)
    return WRITERS.get((module, qualname))


# -- nodes -----------------------------------------------------------------------------------------
def node_identity(node: GraphNode, ids: Mapping[Any, str]) -> Any:
    """The canonical form of ``node`` given the ids of the keys it refers to."""
    if isinstance(node, Alias):
        return _Canon(("alias", canon_value(TaskRef(node.target), ids)))
    if isinstance(node, DataNode):
        return _Canon(("data", node.value if not callable(node.value) else callable_identity(node.value)))
    if isinstance(node, NestedContainer):
        return _Canon(("container", node.klass.__name__, canon_value(list(node.args), ids)))
    if isinstance(node, Task):
        if node.func is execute_subgraph:
            return _Canon(("node", _subgraph_id(node, ids)))
        why = _writes(node.func)
        if why is not None:
            raise Unidentifiable(f"{why}, a side effect outside the graph: it runs every time")
        reader = file_reader_identity(node, ids)
        if reader is not None:
            return reader
        return _Canon(("task", callable_identity(node.func), canon_value(list(node.args), ids),
                       canon_value(dict(node.kwargs), ids)))
    raise Unidentifiable(f"unknown graph node type {type(node).__qualname__}")


# -- nodes that read local files: identified by the files' content --------------------------------
REMOTE = "reads a remote file: no content identity without downloading it"
_PARQUET_FIELDS = frozenset({"engine", "fs", "meta", "_columns", "index", "dtype_backend", "common_kwargs"})
_CSV_KEYWORDS = frozenset({"full_columns", "colname", "head", "header", "reader", "dtypes", "enforce",
                           "kwargs", "blocksize"})


def file_reader_identity(node: Task, ids: Mapping[Any, str]) -> _Canon | None:
    """The canonical form of a node that reads local files (a partition of ``read_parquet`` or a
    block of ``read_csv``), with each file given by the SHA-256 of its bytes instead of its path, so
    that a file changed in place changes the id and a copy elsewhere keeps it; None for other nodes.

    Only structures known here are identified: dask's ``ParquetFunctionWrapper`` (the fsspec reader
    of ``read_parquet``), ``read_block_from_file`` (the bytes of a ``read_csv`` block) and the
    ``_read_csv`` that parses them. Anything else that reads files goes through the generic rules,
    which find no canonical form for a file handle or a file system, and so stays uncached."""
    func = node.func
    if type(func).__name__ == "ParquetFunctionWrapper" and _is_dask(type(func), "dask.dataframe.io.parquet"):
        return _parquet_identity(node, ids)
    if getattr(func, "__name__", None) == "read_block_from_file" and _is_dask(func, "dask.bytes"):
        return _read_block_identity(node, ids)
    if getattr(func, "__qualname__", None) == "ReadParquetPyarrowFS._fragment_to_table" \
            and _is_dask(func, "dask.dataframe"):
        raise Unidentifiable("read_parquet(filesystem='arrow') reads pyarrow fragments, which are not "
                             "identified by content yet; the default (fsspec) file system is")
    if isinstance(func, functools.partial) and getattr(func.func, "__name__", None) == "_read_csv" \
            and _is_dask(func.func, "dask.dataframe.io.csv"):
        return _read_csv_identity(node, ids)
    return None


def _is_dask(obj: Any, module: str) -> bool:
    found = getattr(obj, "__module__", None)
    return isinstance(found, str) and (found == module or found.startswith(module + "."))


def _library(obj: Any) -> tuple[str, str]:
    module = obj.__module__
    return f"{module}.{obj.__qualname__}", package_version(module)[1]


def _local_file(fs: Any, path: Any) -> str:
    """The content hash of ``path`` on ``fs`` if ``fs`` is the local file system; raises
    Unidentifiable for any other (remote, in memory, wrapped) file system."""
    # dask's readers all go through fsspec; imported here, where one is met, to keep import time low
    from fsspec.implementations.local import LocalFileSystem

    if type(fs) is not LocalFileSystem:
        protocol = getattr(fs, "protocol", None)
        protocol = protocol[0] if isinstance(protocol, tuple | list) and protocol else protocol
        raise Unidentifiable(f"{REMOTE} ({protocol or type(fs).__qualname__}://{path})")
    if not isinstance(path, str):
        raise Unidentifiable(f"reads a file given as {type(path).__qualname__}, not a path")
    try:
        digest = content_sha256(path)
    except UserError as exc:
        raise Unidentifiable(f"reads {path}: {exc}") from None
    collector = _INPUTS.get()
    if collector is not None:
        collector.append((path, digest))
    return digest


#: The files read by the node being identified, with the content hashes its id was made from.
_INPUTS: ContextVar[list[tuple[str, str]] | None] = ContextVar("kachery_dask_inputs", default=None)


class InputChanged(UserError):
    """A file a node reads no longer has the content its id was made from."""


def check_inputs(inputs: Iterable[tuple[str, str]]) -> None:
    """Raise :class:`InputChanged` unless every file still has the content hashed when the graph
    was identified. Run before and after a node computes: its result is recorded under an id made
    from those contents, so a file changed in between would record the new data under the old id."""
    for path, digest in inputs:
        try:
            now = content_sha256(path)
        except UserError as exc:
            raise InputChanged(f"{path} can no longer be read as cached() identified it ({exc}); "
                               "call cached() again") from None
        if now != digest:
            raise InputChanged(f"{path} changed since cached() identified the graph that reads it; call "
                               "cached() again for a graph of its new content")


def _reader_value(value: Any, depth: int = 0) -> Any:
    """Options of a reader in canonical form: plain data as it is, pyarrow objects (a schema, a
    file format and its read options) through their own pickling state, classes and functions by
    name and package version, dask's partition descriptions by name and keys."""
    if depth > 50:
        raise Unidentifiable("reader options nested too deep")
    t = type(value)
    if value is None or t in (bool, int, float, str, bytes):
        return value
    if t is list or t is tuple:
        return t(_reader_value(v, depth + 1) for v in value)
    if t is dict:
        return {k: _reader_value(v, depth + 1) for k, v in value.items()}
    if t is set or t is frozenset:
        return t(_reader_value(v, depth + 1) for v in value)
    module = t.__module__ or ""
    if module == "pyarrow" or module.startswith("pyarrow."):
        return _pyarrow_value(value, depth)
    if t.__name__ == "PartitionObj" and module.startswith("dask."):
        return _Canon(("partition", value.name, _reader_value(list(value.keys), depth + 1)))
    if isinstance(value, type):
        return _Canon(("class", *_library(value)))
    if callable(value) and not isinstance(value, np.ndarray):
        return callable_identity(value)
    return value  # numpy, pandas and the like: hash_value knows them, or the node is unidentifiable


def _pyarrow_value(value: Any, depth: int) -> _Canon:
    """A pyarrow object by what pickling it keeps (pyarrow's own reduction, meant to rebuild an
    equal object) and pyarrow's version."""
    try:
        reduced = value.__reduce__()
    except Exception as exc:  # noqa: BLE001 - an object pyarrow cannot pickle has no identity here
        raise Unidentifiable(f"a {type(value).__qualname__} with no canonical form ({exc})") from None
    if isinstance(reduced, str):
        return _Canon(("pyarrow", *_library(type(value)), reduced))
    rebuild, args, *rest = reduced
    name = f"{getattr(rebuild, '__module__', '')}.{getattr(rebuild, '__qualname__', type(rebuild).__name__)}"
    state = _reader_value(rest[0], depth + 1) if rest else None
    return _Canon(("pyarrow", *_library(type(value)), name, _reader_value(args, depth + 1), state))


def _parquet_identity(node: Task, ids: Mapping[Any, str]) -> _Canon:
    """``ParquetFunctionWrapper(part)``: the wrapper's options, and each piece of a file
    (path, row groups, hive partition keys) with the file's content in place of its path."""
    wrapper = node.func
    fields = set(vars(wrapper))
    if fields != _PARQUET_FIELDS or node.kwargs or len(node.args) != 1:
        raise Unidentifiable(f"a ParquetFunctionWrapper of a form not recognised here ({sorted(fields)})")
    common = wrapper.common_kwargs
    if not isinstance(common, dict):
        raise Unidentifiable("a ParquetFunctionWrapper whose options are not a dict")
    dataset = common.get("dataset") or {}
    # Hive partition keys come from the path when dask has not listed them in the piece, and a
    # partitioning given as an object may read anything from it: then the path is data too.
    path_is_data = bool(common.get("partitions")) or not isinstance(
        dataset.get("partitioning") if isinstance(dataset, dict) else None, str | list | type(None))
    parts = node.args[0]
    pieces = []
    for part in parts if isinstance(parts, list) else [parts]:
        if not isinstance(part, dict) or not set(part) <= {"piece", "kwargs"} or "piece" not in part:
            raise Unidentifiable(f"a parquet part of a form not recognised here ({type(part).__qualname__})")
        piece = part["piece"]
        if isinstance(piece, str):
            path, row_groups, keys = piece, None, None
        elif isinstance(piece, tuple | list) and len(piece) == 3:
            path, row_groups, keys = piece
        else:
            raise Unidentifiable(f"a parquet piece of a form not recognised here ({type(piece).__qualname__})")
        content = _local_file(wrapper.fs, path)
        pieces.append((content, path if path_is_data else None, _reader_value(row_groups),
                       _reader_value(keys), _reader_value(part.get("kwargs", {}))))
    return _Canon(("read_parquet", _library(type(wrapper)), _reader_value(wrapper.engine),
                   wrapper.meta, _reader_value(wrapper._columns), _reader_value(wrapper.index),
                   _reader_value(wrapper.dtype_backend), _reader_value(common), pieces))


def _read_block_identity(node: Task, ids: Mapping[Any, str]) -> _Canon:
    """``read_block_from_file(file, offset, length, delimiter)``: the bytes of a block of a local
    file, by the file's content, how it is opened (mode, compression, encoding) and the block."""
    from fsspec.core import OpenFile  # fsspec: imported where a read_csv is met (import time)

    if node.kwargs or len(node.args) != 4 or type(node.args[0]) is not OpenFile:
        raise Unidentifiable("a read_block_from_file of a form not recognised here")
    f, *block = node.args
    content = _local_file(f.fs, f.path)
    opened = (f.mode, f.compression, f.encoding, f.errors, f.newline)
    return _Canon(("read_block", _library(node.func), content, _reader_value(opened),
                   canon_value(block, ids)))


def _read_csv_identity(node: Task, ids: Mapping[Any, str]) -> _Canon:
    """``_read_csv(block, part, columns)``: as any partial, except that of the sample of the first
    file (``head``) only what it is used for enters: the paths of the path column, if any. The
    sample's rows do not reach the partition; what the partition takes from it (header, dtypes,
    columns) are arguments of their own. So a change to the first file recomputes that file's
    blocks only, not every block of every file."""
    partial = node.func
    keywords = dict(partial.keywords)
    if set(keywords) != _CSV_KEYWORDS or partial.args:
        return _Canon(("task", callable_identity(partial), canon_value(list(node.args), ids),
                       canon_value(dict(node.kwargs), ids)))
    head, colname = keywords.pop("head"), keywords["colname"]
    if colname is None:
        used = None
    else:
        try:
            used = sorted(head[colname].cat.categories)
        except (KeyError, AttributeError, TypeError):
            raise Unidentifiable("a read_csv path column of a form not recognised here") from None
    return _Canon(("read_csv", callable_identity(partial.func), canon_args(keywords, {}), used,
                   canon_value(list(node.args), ids), canon_value(dict(node.kwargs), ids)))


def _subgraph_id(node: Task, ids: Mapping[Any, str]) -> str:
    """A fused task is identified by its inner graph, with its inputs by the ids they stand for:
    fusing or not fusing the same computation gives the same id."""
    inner, outkey, inkeys, *deps = node.args
    env = dict(zip(inkeys, (canon_value(d, ids) for d in deps), strict=True))
    local: dict[Any, str] = {}
    for k, v in env.items():
        local[k] = v.id if isinstance(v, _Ref) else hash_value(v)
    reasons: dict[Any, str] = {}
    found = graph_ids(inner, local, reasons)
    if outkey not in found:
        why = next(iter(reasons.values()), "an inner node has no id")
        raise Unidentifiable(f"fused subgraph: {why}")
    return found[outkey]


def node_id(node: GraphNode, ids: Mapping[Any, str]) -> str:
    """The Merkle id of ``node``: 32 hex; raises :class:`Unidentifiable`."""
    if isinstance(node, JobTask):  # a kachery job inside a plain graph: its own task id
        return node.args[0].id
    if isinstance(node, Alias):
        try:
            return ids[node.target]
        except KeyError:
            raise Unidentifiable(f"it is an alias of {node.target!r}, which has no id") from None
    canon = node_identity(node, ids)
    if isinstance(node, Task) and node.func is execute_subgraph:
        return canon.value[1]
    try:
        return hash_value((SCHEME, canon))
    except UnhashableArgument as exc:
        raise Unidentifiable(str(exc)) from None


def keyed_by_name(dsk: Mapping[Any, GraphNode]) -> dict[Any, str]:
    """Nodes that must keep their dask keys, each with the reason; they get no id, and so stay
    uncached with everything downstream.

    distributed's P2P shuffles (a DataFrame's ``shuffle``, ``merge`` and ``set_index`` on a cluster,
    an array's ``rechunk(method="p2p")``) find their barrier by key: renamed, the shuffle fails with
    ``P2PConsistencyError``. The barrier's dependencies, the transfer tasks, hand partitions to the
    workers' shuffle state as a side effect: loaded from the store instead of run, the shuffle would
    lose them. After dask's optimization a transfer may be an alias of a fused task that runs it,
    so aliases are followed to the node that does the work."""
    barrier_type = p2p_barrier_type()  # None until distributed's shuffle module is imported
    if barrier_type is None:
        return {}
    keep: dict[Any, str] = {}
    for key, node in dsk.items():
        if not isinstance(node, barrier_type):
            continue
        keep[key] = "it is the barrier of a P2P shuffle, which distributed finds by its key"
        why = f"it hands partitions to the P2P shuffle of {key!r} (a side effect on the workers)"
        for dep in node.dependencies:
            while dep in dsk and dep not in keep:
                keep[dep] = why
                target = dsk[dep]
                if not isinstance(target, Alias):
                    break
                dep = target.target
    return keep


# -- nodes that share state outside the graph: the disk shuffle ------------------------------------
def _creates_state(node: GraphNode) -> bool:
    """True for a node that makes a store its dependents write to and read from (a partd store:
    the disk shuffle of bags and DataFrames on the local schedulers)."""
    if not isinstance(node, Task):
        return False
    stack: list[Any] = [node]
    while stack:
        task = stack.pop()
        func = task.func
        module = getattr(func, "__module__", None) or type(func).__module__ or ""
        if module == "partd" or module.startswith("partd.") or type(func).__name__ == "maybe_buffered_partd":
            return True
        stack.extend(a for a in (*task.args, *task.kwargs.values()) if isinstance(a, Task))
    return False


def stateful_regions(dsk: Mapping[Any, GraphNode]) -> dict[Any, frozenset]:
    """Each node that takes part in a side effect outside the graph, with the whole region it
    belongs to: a store-making node (:func:`_creates_state`), the nodes that are handed the store
    (they append to it or read from it), and the nodes between them that depend on region nodes
    only (the barrier that orders writes before reads).

    Such nodes must run every time, in their graph, together: a store loaded from an earlier run,
    or a read skipped because its output was cached while the writes still run, hands other data to
    the readers (dask's disk ``groupby`` returned groups of another test's data that way). What
    feeds the region and what follows it are ordinary nodes and stay cached: the readers' outputs
    are a function of what was written, so :func:`graph_ids` gives them ids from that."""
    if "partd" not in sys.modules:  # no store of this kind can exist before partd is imported
        return {}
    stores = [k for k, node in dsk.items() if _creates_state(node)]
    if not stores:
        return {}
    dependents: dict[Any, list] = {}
    for key, node in dsk.items():
        for dep in node.dependencies:
            dependents.setdefault(dep, []).append(key)
    found: dict[Any, frozenset] = {}
    for store in stores:
        if store in found:
            continue
        region = {store, *dependents.get(store, ())}
        grew = True
        while grew:  # nodes fed by the region only that feed it in turn (barriers) join it
            grew = False
            for member in list(region):
                for dep in dependents.get(member, ()):
                    if dep not in region and dsk[dep].dependencies <= region and any(
                            d in region for d in dependents.get(dep, ())):
                        region.add(dep)
                        grew = True
        frozen = frozenset(region)
        for member in frozen:
            found[member] = frozen
    return found


_REGION = _Ref("region")


def _region_ids(dsk: Mapping[Any, GraphNode], region: frozenset, ids: Mapping[Any, str]) -> dict[Any, str]:
    """Ids of a stateful region's nodes, from the ids of what feeds it.

    Each node's form is its canonical form with references inside the region replaced by one
    marker; the region's id is the hash of the sorted hashes of all its forms, so it covers every
    write into the store (what the readers' outputs are made of). A node's id is (region id, its
    form, the rank among equal forms): two regions fed different data never share an id, and two
    writers that look alike stay two nodes, as they are two appends."""
    local = {k: (_REGION.id if k in region else v) for k, v in ids.items()}
    for key in region:
        local[key] = _REGION.id
    forms: dict[Any, str] = {}
    for key in region:
        node = dsk[key]
        missing = [d for d in node.dependencies if d not in local]
        if missing:
            raise Unidentifiable(f"it shares a store with nodes fed by {missing[0]!r}, which has no id")
        if _creates_state(node):
            forms[key] = hash_value((SCHEME, "store", str(type(node.func).__qualname__)))
            continue
        forms[key] = hash_value((SCHEME, node_identity(node, local)))
    region_id = hash_value((SCHEME, "region", sorted(forms.values())))
    rank: dict[str, int] = {}
    out: dict[Any, str] = {}
    for key in sorted(region, key=lambda k: (forms[k], str(k))):
        n = rank[forms[key]] = rank.get(forms[key], -1) + 1
        out[key] = hash_value((SCHEME, "in-region", region_id, forms[key], n))
    return out


def graph_ids(dsk: Mapping[Any, GraphNode], known: Mapping[Any, str] | None = None,
              reasons: dict[Any, str] | None = None,
              inputs: dict[Any, tuple[tuple[str, str], ...]] | None = None,
              regions: Mapping[Any, frozenset] | None = None) -> dict[Any, str]:
    """Ids of every identifiable key of ``dsk`` (in dependency order); the others go to ``reasons``;
    the files a node reads itself, with the content hashes in its id, go to ``inputs``.
    ``regions``: :func:`stateful_regions` of ``dsk``, if the caller has them already.

    The nodes of :func:`keyed_by_name` get none, so no caller turns them into content-keyed jobs."""
    ids: dict[Any, str] = dict(known or {})
    pinned = keyed_by_name(dsk)
    regions = stateful_regions(dsk) if regions is None else regions
    outer = _INPUTS.get()  # identifying a fused task: its inner reads are the task's own
    for key in toposort(dsk, regions):
        if key in ids:
            continue
        why = pinned.get(key)
        if why is not None:
            if reasons is not None:
                reasons[key] = why
            continue
        region = regions.get(key)
        if region is not None:  # the whole region at once, when its first node comes
            try:
                ids.update(_region_ids(dsk, region, ids))
            except (Unidentifiable, UnhashableArgument) as exc:
                if reasons is not None:
                    reasons.update(dict.fromkeys(region, str(exc)))
            continue
        found: list[tuple[str, str]] = []
        token = _INPUTS.set(found)
        try:
            ids[key] = node_id(dsk[key], ids)
        except Unidentifiable as exc:
            if reasons is not None:
                reasons[key] = str(exc)
            continue
        finally:
            _INPUTS.reset(token)
        if found:
            if inputs is not None:
                inputs[key] = tuple(found)
            if outer is not None:
                outer.extend(found)
    return ids


def toposort(dsk: Mapping[Any, GraphNode], regions: Mapping[Any, frozenset] | None = None) -> list[Any]:
    """Keys of ``dsk`` with every dependency before its dependents (iterative: no recursion limit).

    With ``regions`` (:func:`stateful_regions`), every node of a region comes after everything
    that feeds any node of it, so the region can be identified as a whole when its first node comes.
    """
    feeds: dict[frozenset, frozenset] = {}
    for region in set((regions or {}).values()):
        feeds[region] = frozenset(d for k in region for d in dsk[k].dependencies if d not in region)

    def deps_of(key: Any) -> Iterable[Any]:
        region = regions.get(key) if regions else None
        return dsk[key].dependencies if region is None else (*feeds[region], *dsk[key].dependencies)

    order: list[Any] = []
    state: dict[Any, int] = {}
    for root in dsk:
        if root in state:
            continue
        stack = [(root, iter(deps_of(root)))]
        state[root] = 1
        while stack:
            key, deps = stack[-1]
            for dep in deps:
                if dep in dsk and dep not in state:
                    state[dep] = 1
                    stack.append((dep, iter(deps_of(dep))))
                    break
            else:
                stack.pop()
                state[key] = 2
                order.append(key)
    return order
