"""Typed task records: the one place where a record's JSON is parsed and validated.

A record is read from this node's store today, and will arrive from other nodes (a bucket, a
channel) tomorrow: either way it becomes a :class:`TaskRecord` through :meth:`TaskRecord.from_json`,
which checks every field the format has (docs/formats.md, "Task records") and raises
:class:`~kachery_tasks.errors.InvalidRecord` naming what is wrong. Nothing downstream reads a record
dict with ``.get(..., {})`` any more: what passed ``from_json`` has every field with its type.

Shape of the classes:

- **Immutable tuples** (``typing.NamedTuple``), not ``@dataclass(frozen=True, slots=True)``: a record
  is built on every hit from the store, whose budget is a few microseconds, and a frozen dataclass
  sets each field through ``object.__setattr__``: 1.5 µs to build a 16-field one, against 0.13 µs
  for a tuple (0.22 µs for a mutable ``__slots__`` class). A tuple is truly immutable and as cheap to
  read from. The price, accepted: a record compares equal to a plain tuple of its fields.
- **Byte compatibility**: ``TaskRecord.from_json(d).to_json() == d`` for every record the code
  writes. Optional fields keep their absence (``None`` stands for "absent": no writer writes them
  as ``null``), ``record_version`` is written back only if it was there, and fields this version
  does not know, at the top level or inside ``function``, an argument entry, ``result`` or
  ``error`` (a newer writer's, within the same record version), are kept in ``extra`` and written
  back, so the signature over the whole record still verifies.
- **Provenance stays a read-only mapping** (:class:`Provenance`) with typed properties for the
  fields code reads (``wall_s``, ``host``, ``git``, ...): it describes the computation and decides
  nothing, its fields differ by platform and grow with what we measure, and ``kachery task show``
  prints it whole. Its fields are still checked, each for its type.
- JSON values inside a record (an inline result, a ``json`` argument, provenance's ``packages`` and
  ``git``, extras) are the parsed objects themselves, not copies: treat them as read-only.
  ``to_json`` builds fresh containers for the record's own structure around them.

The **record version**: records carry ``record_version`` (an int) from version 1 on; a record
without it was written before versions were carried and reads as version 1. A change that makes an
existing reader misread a record bumps :data:`RECORD_VERSION`; a record of a higher version than
this code knows is refused with "written by a newer kachery-tasks ... upgrade", never half-read.

Validation is written for the hit path: the common shape is checked with set comparisons and
``type(x) is`` tests, and only a record that fails takes the slow path that finds the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from itertools import product
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import InvalidRecord, InvalidURI
from ..identity.documents import verify_document
from .uris import parse_file_uri

#: The record format this code writes, and the newest it reads.
RECORD_VERSION = 1
#: The task-id scheme of the records this code reads and writes (hashing.SCHEME).
SCHEME = "kt1"

SUCCEEDED = "succeeded"
FAILED = "failed"
KINDS = frozenset({"pure", "query", "action"})
#: Codecs of a ``result``, and the forms its value takes.
RESULT_CODECS = frozenset({"json", "npy", "pickle"})
RESULT_FORMS = ("inline", "inline_b64", "uri")
#: The forms of an argument entry, besides its ``hash`` (recording.describe_args).
ARG_FORMS = ("job", "file", "blob", "json", "pickle", "omitted")
#: Codecs of a ``blob`` argument (tasks/arg_blobs.py).
BLOB_CODECS = frozenset({"npy", "bytes", "bytearray", "json"})
ORIGIN_KINDS = frozenset({"script", "notebook", "interactive"})

_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})
_NUMBER = frozenset({int, float})
_hex32 = re.compile(r"[0-9a-f]{32}").fullmatch
_hex64 = re.compile(r"[0-9a-f]{64}").fullmatch
_hex128 = re.compile(r"[0-9a-f]{128}").fullmatch
_blob_uri = re.compile(r"sha256://[0-9a-f]{64}").fullmatch

_REQUIRED = frozenset({"scheme", "task_id", "namespace", "kind", "function", "args", "upstream",
                       "provenance", "created", "status", "node_id", "signature"})
_KNOWN = _REQUIRED | {"record_version", "result", "error"}
_SHAPES = {  # status -> the key sets of a record with no extra field (with and without a version)
    SUCCEEDED: (_REQUIRED | {"result", "record_version"}, _REQUIRED | {"result"}),
    FAILED: (_REQUIRED | {"error", "record_version"}, _REQUIRED | {"error"}),
}
_FUNCTION_REQUIRED = frozenset({"name", "code_hash", "deps", "module", "qualname", "version"})
_FUNCTION_KNOWN = _FUNCTION_REQUIRED | {"origin"}
_ERROR_REQUIRED = frozenset({"type", "message", "traceback", "pid"})
_ERROR_KNOWN = _ERROR_REQUIRED | {"pickle"}
_RESULT_KNOWN = frozenset({"codec", "size", "shape", "dtype", *RESULT_FORMS})
_ARG_KNOWN = frozenset({"hash", "codec", "size", *ARG_FORMS})
_ARG_FORM_SET = frozenset(ARG_FORMS)
#: Provenance fields and the JSON types each may have (tasks/provenance.py, Measure.fields).
_PROVENANCE_TYPES: dict[str, frozenset[type]] = {
    "python": frozenset({str}), "implementation": frozenset({str}), "platform": frozenset({str}),
    "host": frozenset({str}), "user": frozenset({str}), "pid": frozenset({int}),
    "started": _NUMBER, "ended": _NUMBER, "wall_s": _NUMBER, "cpu_s": _NUMBER,
    "peak_rss": frozenset({int}), "packages": frozenset({dict}), "git": frozenset({dict, type(None)}),
}
_PROVENANCE_KEYS = frozenset(_PROVENANCE_TYPES)
_PROVENANCE_TYPES_ITEMS = tuple(_PROVENANCE_TYPES.items())


# ------------------------------------------------------------------------------------------------
# the parts of a record


class FunctionRef(NamedTuple):
    """``function``: what computed the record (its id parts, and where to import it again)."""

    name: str
    code_hash: str  #: 32 hex (user code), ``<dist>==<version>`` (a library's function), ``version:<v>``
    deps: Mapping[str, str]  #: everything the code hash covers, each with its own hash
    module: str | None
    qualname: str | None
    version: str | None
    origin: Mapping[str, Any] | None = None  #: a ``__main__`` function only (tasks/scripts.py)
    extra: Mapping[str, Any] = _NO_EXTRA

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "code_hash": self.code_hash, "deps": dict(self.deps), "module": self.module,
               "qualname": self.qualname, "version": self.version}
        if self.origin is not None:
            out["origin"] = dict(self.origin)
        if self.extra:
            out.update(self.extra)
        return out


class ArgEntry(NamedTuple):
    """One entry of ``args``: the argument's hash and the one form it was kept in.

    ``form`` is one of :data:`ARG_FORMS`; ``value`` is, by form: ``job`` the upstream task id,
    ``file`` its file URI, ``blob`` the blob's URI (with ``codec`` and ``size``), ``json`` the value,
    ``pickle`` base64 cloudpickle, ``omitted`` why it was not kept.
    """

    hash: str
    form: str
    value: Any
    codec: str | None = None  #: ``blob`` entries only
    size: int | None = None  #: ``blob`` entries only
    extra: Mapping[str, Any] = _NO_EXTRA

    @property
    def kept(self) -> bool:
        """Whether a replay can rebuild the argument from this entry."""
        return self.form != "omitted"

    def _of(self, form: str) -> Any:
        return self.value if self.form == form else None

    job = property(lambda self: self._of("job"), doc="The upstream task id, for a ``job`` entry.")
    file = property(lambda self: self._of("file"), doc="The file URI, for a ``file`` entry.")
    blob = property(lambda self: self._of("blob"), doc="The blob URI, for a ``blob`` entry.")
    pickle = property(lambda self: self._of("pickle"), doc="Base64 cloudpickle, for a ``pickle`` entry.")
    omitted = property(lambda self: self._of("omitted"), doc="Why the value was not kept, for an ``omitted`` entry.")

    def to_json(self) -> dict[str, Any]:
        out = {"hash": self.hash, self.form: self.value}
        if self.form == "blob":
            out["codec"] = self.codec
            out["size"] = self.size
        if self.extra:
            out.update(self.extra)
        return out


class ResultRef(NamedTuple):
    """``result`` of a success: its codec, and its value in exactly one form.

    ``form`` ``inline`` (a ``json`` value, in ``value``), ``inline_b64`` (a base64 ``pickle``) or
    ``uri`` (a blob's ``sha256://`` URI, with its size; an ``npy`` result is always one, with
    ``shape`` and ``dtype``).
    """

    codec: str
    form: str
    value: Any
    size: int  #: bytes of the encoded value
    shape: tuple[int, ...] | None = None  #: ``npy`` only
    dtype: str | None = None  #: ``npy`` only
    extra: Mapping[str, Any] = _NO_EXTRA

    @property
    def uri(self) -> str | None:
        """The blob's URI, or None for an inline result."""
        return self.value if self.form == "uri" else None

    @property
    def sha256(self) -> str | None:
        """The blob's SHA-256 hex, or None for an inline result."""
        return self.value[9:] if self.form == "uri" else None

    def to_json(self) -> dict[str, Any]:
        out = {"codec": self.codec, self.form: self.value, "size": self.size}
        if self.shape is not None:
            out["shape"] = list(self.shape)
            out["dtype"] = self.dtype
        if self.extra:
            out.update(self.extra)
        return out


class RecordError(NamedTuple):
    """``error`` of a failure: what was raised, and where."""

    type: str  #: ``module.qualname`` of the exception class
    message: str
    traceback: str
    pid: int
    pickle: str | None = None  #: base64 cloudpickle of the exception, when it pickled
    extra: Mapping[str, Any] = _NO_EXTRA

    def to_json(self) -> dict[str, Any]:
        out = {"type": self.type, "message": self.message, "traceback": self.traceback, "pid": self.pid}
        if self.pickle is not None:
            out["pickle"] = self.pickle
        if self.extra:
            out.update(self.extra)
        return out


class Provenance(Mapping[str, Any]):
    """``provenance``: a read-only mapping, with typed properties for the fields code reads."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Provenance({self._fields!r})"

    python = property(lambda self: self._fields["python"])
    implementation = property(lambda self: self._fields["implementation"])
    platform = property(lambda self: self._fields["platform"])
    host = property(lambda self: self._fields["host"])
    user = property(lambda self: self._fields["user"])
    pid = property(lambda self: self._fields["pid"], doc="The computing process.")
    started = property(lambda self: self._fields["started"], doc="Seconds since the epoch.")
    ended = property(lambda self: self._fields["ended"], doc="Seconds since the epoch.")
    wall_s = property(lambda self: float(self._fields["wall_s"]), doc="Wall-clock seconds of the computation.")
    cpu_s = property(lambda self: float(self._fields["cpu_s"]), doc="CPU seconds of the computing thread.")
    peak_rss = property(lambda self: self._fields["peak_rss"], doc="Bytes: the process's peak so far.")
    packages = property(lambda self: MappingProxyType(self._fields["packages"]), doc="``{dist: version}``.")
    git = property(lambda self: self._fields["git"], doc="``{commit, dirty, root}``, or None.")

    def to_json(self) -> dict[str, Any]:
        return dict(self._fields)


class Args(Mapping[str, ArgEntry]):
    """``args``: every entry is validated with the record; its :class:`ArgEntry` is made when first
    read (a hit, the most frequent read of a record, never looks at the arguments)."""

    __slots__ = ("_raw", "_entries", "_task_id")

    def __init__(self, raw: dict[str, Any], task_id: str, entries: dict[str, ArgEntry] | None = None) -> None:
        self._raw = raw
        self._task_id = task_id
        self._entries = {} if entries is None else entries

    def __getitem__(self, name: str) -> ArgEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _arg(name, self._raw[name], self._task_id)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __repr__(self) -> str:
        return f"Args({dict(self.items())!r})"


# ------------------------------------------------------------------------------------------------
# the record


class TaskRecord(NamedTuple):
    """A task record, parsed and validated (docs/formats.md, "Task records").

    Build one with :meth:`from_json`; :meth:`to_json` gives back the exact JSON it came from.
    """

    scheme: str
    task_id: str
    namespace: str
    kind: str  #: ``pure``, ``query`` or ``action``
    status: str  #: ``succeeded`` or ``failed``
    function: FunctionRef
    args: Args
    upstream: tuple[str, ...]  #: task ids of the jobs among the arguments
    provenance: Provenance
    created: float  #: when the record was written, seconds since the epoch
    node_id: str  #: the signer: hex Ed25519 public key
    signature: str  #: 128 hex, over the canonical JSON of the rest
    result: ResultRef | None = None  #: successes only
    error: RecordError | None = None  #: failures only
    record_version: int | None = None  #: as written; None: written before versions were carried (1)
    extra: Mapping[str, Any] = _NO_EXTRA  #: top-level fields of a newer writer, kept as they are

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    @property
    def version(self) -> int:
        """The record format version (``record_version``, 1 when absent)."""
        return 1 if self.record_version is None else self.record_version

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data, equal to what :meth:`from_json` was given."""
        out: dict[str, Any] = {"scheme": self.scheme}
        if self.record_version is not None:
            out["record_version"] = self.record_version
        out.update(task_id=self.task_id, namespace=self.namespace, kind=self.kind, function=self.function.to_json(),
                   args={name: entry.to_json() for name, entry in self.args.items()},
                   upstream=list(self.upstream), provenance=self.provenance.to_json(), created=self.created,
                   status=self.status)
        if self.result is not None:
            out["result"] = self.result.to_json()
        if self.error is not None:
            out["error"] = self.error.to_json()
        if self.extra:
            out.update(self.extra)
        out["node_id"] = self.node_id
        out["signature"] = self.signature
        return out

    def verify_signature(self) -> bool:
        """Whether ``signature`` is ``node_id``'s Ed25519 signature of the rest of the record.

        Records of this node's own store are trusted as they are (a check costs more than a hit);
        records from other nodes must pass this first."""
        try:
            return verify_document(self.to_json(), self.node_id)
        except (ValueError, TypeError):  # not canonical JSON (NaN): not what any node signed
            return False

    @classmethod
    def from_json(cls, data: Any) -> TaskRecord:
        """Parse and validate a record's JSON data; raises :class:`InvalidRecord` saying what is wrong."""
        try:
            if type(data) is dict:
                record = _parse_usual(data)
                if record is not None:
                    return record
            return _parse(data)
        except InvalidRecord:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a shape no check foresaw
            raise InvalidRecord(f"malformed ({type(exc).__name__}: {exc})",
                                _id_of(data) if type(data) is dict else None) from None


# ------------------------------------------------------------------------------------------------
# parsing


def _parse(data: Any) -> TaskRecord:
    if type(data) is not dict:
        raise InvalidRecord(f"a task record is a JSON object, not {_kind_of(data)}")
    version = data.get("record_version")
    if version is not None:  # first: a newer format may differ anywhere else
        if type(version) is not int or version < 1:
            raise InvalidRecord(f"record_version is {version!r}, not a positive integer", _id_of(data))
        if version > RECORD_VERSION:
            raise InvalidRecord(
                f"written by a newer kachery-tasks (record_version {version}; this one reads up to "
                f"{RECORD_VERSION}): upgrade kachery-tasks to read it", _id_of(data))
    status = data.get("status")
    shapes = _SHAPES.get(status) if type(status) is str else None
    if shapes is None:
        if "status" not in data:
            raise InvalidRecord("missing field 'status'", _id_of(data))
        raise InvalidRecord(f"unknown status {status!r} (succeeded or failed)", _id_of(data))
    keys = data.keys()
    extra = _NO_EXTRA
    if keys != shapes[0] and keys != shapes[1]:
        extra = _top_level_extra(data, status)

    task_id = data["task_id"]
    if type(task_id) is not str or not _hex32(task_id):
        raise InvalidRecord(f"task_id {task_id!r} is not 32 lowercase hex characters")
    scheme = data["scheme"]
    if scheme != SCHEME:
        raise InvalidRecord(f"scheme {scheme!r} is not {SCHEME!r}: written by a newer kachery-tasks? upgrade it "
                            "to read this record", task_id)
    namespace = data["namespace"]
    if type(namespace) is not str:
        raise _wrong("namespace", namespace, "a string", task_id)
    kind = data["kind"]
    if type(kind) is not str or kind not in KINDS:
        raise InvalidRecord(f"unknown kind {kind!r} (pure, query or action)", task_id)
    created = data["created"]
    if type(created) not in _NUMBER:
        raise _wrong("created", created, "a number", task_id)
    node_id = data["node_id"]
    if type(node_id) is not str or not _hex64(node_id):
        raise InvalidRecord(f"node_id {node_id!r} is not a node id (64 lowercase hex characters)", task_id)
    signature = data["signature"]
    if type(signature) is not str or not _hex128(signature):
        raise InvalidRecord("signature is not 128 lowercase hex characters", task_id)
    upstream = data["upstream"]
    if type(upstream) is not list:
        raise _wrong("upstream", upstream, "a list of task ids", task_id)
    for up in upstream:
        if type(up) is not str or not _hex32(up):
            raise InvalidRecord(f"upstream {up!r} is not a task id (32 lowercase hex characters)", task_id)

    function = _function(data["function"], task_id)
    args = _args(data["args"], task_id)
    provenance = _provenance(data["provenance"], task_id)
    if status == SUCCEEDED:
        result, error = _result(data["result"], task_id), None
    else:
        result, error = None, _error(data["error"], task_id)
    return TaskRecord(scheme, task_id, namespace, kind, status, function, args, tuple(upstream), provenance,
                      created, node_id, signature, result, error, version, extra)


def _top_level_extra(data: dict, status: str) -> Mapping[str, Any]:
    """The slow path of a record whose fields are not the usual ones: say what is missing or
    misplaced, or return the fields this version does not know."""
    missing = sorted(_REQUIRED - data.keys())
    if status == SUCCEEDED and "result" not in data:
        missing.append("result")
    if status == FAILED and "error" not in data:
        missing.append("error")
    if missing:
        raise InvalidRecord(f"missing field {missing[0]!r}", _id_of(data))
    if status == SUCCEEDED and "error" in data:
        raise InvalidRecord("a succeeded record has an 'error'", _id_of(data))
    if status == FAILED and "result" in data:
        raise InvalidRecord("a failed record has a 'result'", _id_of(data))
    return MappingProxyType({k: v for k, v in data.items() if k not in _KNOWN})


def _function(function: Any, task_id: str) -> FunctionRef:
    if type(function) is not dict:
        raise _wrong("function", function, "an object", task_id)
    keys = function.keys()
    extra = _NO_EXTRA
    if keys != _FUNCTION_REQUIRED and keys != _FUNCTION_KNOWN:
        extra = _extra(function, _FUNCTION_REQUIRED, _FUNCTION_KNOWN, "function", task_id)
    name, code_hash, deps = function["name"], function["code_hash"], function["deps"]
    if type(name) is not str or not name:
        raise _wrong("function.name", name, "a non-empty string", task_id)
    if type(code_hash) is not str or not code_hash:
        raise _wrong("function.code_hash", code_hash, "a non-empty string", task_id)
    if type(deps) is not dict:
        raise _wrong("function.deps", deps, "an object", task_id)
    for dep, value in deps.items():
        if type(value) is not str:
            raise _wrong(f"function.deps[{dep!r}]", value, "a string", task_id)
    module, qualname, version = function["module"], function["qualname"], function["version"]
    for field, value in (("module", module), ("qualname", qualname), ("version", version)):
        if value is not None and type(value) is not str:
            raise _wrong(f"function.{field}", value, "a string or null", task_id)
    origin = function.get("origin")
    if origin is not None:
        origin = _origin(origin, task_id)
    return FunctionRef(name, code_hash, MappingProxyType(deps), module, qualname, version, origin, extra)


def _origin(origin: Any, task_id: str) -> Mapping[str, Any]:
    if type(origin) is not dict:
        raise _wrong("function.origin", origin, "an object", task_id)
    kind = origin.get("kind")
    if type(kind) is not str or kind not in ORIGIN_KINDS:
        raise InvalidRecord(f"function.origin.kind {kind!r} is not script, notebook or interactive", task_id)
    if kind == "script":
        if type(origin.get("path")) is not str:
            raise _wrong("function.origin.path", origin.get("path"), "a string", task_id)
        module = origin.get("module")
        if module is not None and type(module) is not str:
            raise _wrong("function.origin.module", module, "a string or null", task_id)
    return MappingProxyType(origin)


def _args(args: Any, task_id: str) -> Args:
    if type(args) is not dict:
        raise _wrong("args", args, "an object", task_id)
    return Args(args, task_id, {name: _arg(name, entry, task_id) for name, entry in args.items()})


def _arg(name: str, entry: Any, task_id: str) -> ArgEntry:
    where = _ArgWhere(name)
    if type(entry) is not dict:
        raise _wrong(where, entry, "an object", task_id)
    value_hash = entry.get("hash")
    if type(value_hash) is not str or not _hex32(value_hash):
        if "hash" not in entry:
            raise InvalidRecord(f"{where} has no 'hash'", task_id)
        raise InvalidRecord(f"{where}.hash {value_hash!r} is not 32 lowercase hex characters", task_id)
    if len(entry) == 2:  # the usual entry: hash and one form
        for form in entry:
            if form != "hash":
                break
        if form not in _ARG_FORM_SET:
            forms = ()
            form = None
        else:
            forms = (form,)
    else:
        forms = tuple(f for f in ARG_FORMS if f in entry)
        form = forms[0] if len(forms) == 1 else None
    if form is None:
        if not forms:
            raise InvalidRecord(f"{where} has no value form (one of {', '.join(ARG_FORMS)})", task_id)
        raise InvalidRecord(f"{where} has {len(forms)} forms ({' and '.join(forms)}); an entry has exactly one",
                            task_id)
    value = entry[form]
    codec = size = None
    if form == "json":
        pass  # any JSON value
    elif form == "job":
        if type(value) is not str or not _hex32(value):
            raise InvalidRecord(f"{where}.job {value!r} is not a task id (32 lowercase hex characters)", task_id)
    elif form == "blob":
        if type(value) is not str or not _blob_uri(value):
            raise InvalidRecord(f"{where}.blob {value!r} is not a sha256:// URI", task_id)
        codec, size = entry.get("codec"), entry.get("size")
        if type(codec) is not str or codec not in BLOB_CODECS:
            raise InvalidRecord(f"{where}.codec {codec!r} is not one of {', '.join(sorted(BLOB_CODECS))}", task_id)
        if type(size) is not int or size < 0:
            raise _wrong(f"{where}.size", size, "a byte count", task_id)
    elif form == "file":
        try:
            parse_file_uri(value)
        except InvalidURI as exc:
            raise InvalidRecord(f"{where}.file: {exc}", task_id) from None
    elif type(value) is not str:  # pickle (base64) or omitted (why)
        raise _wrong(f"{where}.{form}", value, "a string", task_id)
    extra = _NO_EXTRA
    if len(entry) != (4 if form == "blob" else 2):
        if form != "blob" and ("codec" in entry or "size" in entry):
            raise InvalidRecord(f"{where} has codec or size, which only a blob entry has", task_id)
        extra = MappingProxyType({k: v for k, v in entry.items() if k not in _ARG_KNOWN})
    return ArgEntry(value_hash, form, value, codec, size, extra)


class _ArgWhere:
    """``args['x']`` for a message, formatted only if one is made."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"args[{self.name!r}]"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def _result(result: Any, task_id: str) -> ResultRef:
    if type(result) is not dict:
        raise _wrong("result", result, "an object", task_id)
    codec = result.get("codec")
    if type(codec) is not str or codec not in RESULT_CODECS:
        if "codec" not in result:
            raise InvalidRecord("missing field 'result.codec'", task_id)
        raise InvalidRecord(f"result.codec {codec!r} is not one of json, npy, pickle", task_id)
    forms = [f for f in RESULT_FORMS if f in result]
    if len(forms) != 1:
        if not forms:
            raise InvalidRecord("result has no value (one of inline, inline_b64, uri)", task_id)
        raise InvalidRecord(f"result has {len(forms)} forms ({' and '.join(forms)}); a result has exactly one", task_id)
    form = forms[0]
    value = result[form]
    size = result.get("size")
    if type(size) is not int or size < 0:
        if "size" not in result:
            raise InvalidRecord("missing field 'result.size'", task_id)
        raise _wrong("result.size", size, "a byte count", task_id)
    if form == "uri":
        if type(value) is not str or not _blob_uri(value):
            raise InvalidRecord(f"result.uri {value!r} is not a sha256:// URI", task_id)
    elif form == "inline":
        if codec != "json":
            raise InvalidRecord(f"result.inline holds json, not {codec}", task_id)
    elif codec != "pickle" or type(value) is not str:
        raise InvalidRecord("result.inline_b64 holds a pickle, as a base64 string", task_id)
    shape = dtype = None
    if codec == "npy":
        if form != "uri":
            raise InvalidRecord("an npy result is a blob (result.uri)", task_id)
        shape, dtype = result.get("shape"), result.get("dtype")
        if type(shape) is not list or any(type(n) is not int or n < 0 for n in shape):
            raise _wrong("result.shape", shape, "a list of sizes", task_id)
        if type(dtype) is not str or not dtype:
            raise _wrong("result.dtype", dtype, "a numpy dtype string", task_id)
        shape = tuple(shape)
    extra = _NO_EXTRA
    if len(result) != (5 if codec == "npy" else 3):
        if codec != "npy" and ("shape" in result or "dtype" in result):
            raise InvalidRecord(f"result has shape or dtype, which only an npy result has, not {codec}", task_id)
        extra = MappingProxyType({k: v for k, v in result.items() if k not in _RESULT_KNOWN})
    return ResultRef(codec, form, value, size, shape, dtype, extra)


def _error(error: Any, task_id: str) -> RecordError:
    if type(error) is not dict:
        raise _wrong("error", error, "an object", task_id)
    keys = error.keys()
    extra = _NO_EXTRA
    if keys != _ERROR_KNOWN and keys != _ERROR_REQUIRED:
        extra = _extra(error, _ERROR_REQUIRED, _ERROR_KNOWN, "error", task_id)
    for field in ("type", "message", "traceback"):
        if type(error[field]) is not str:
            raise _wrong(f"error.{field}", error[field], "a string", task_id)
    if type(error["pid"]) is not int:
        raise _wrong("error.pid", error["pid"], "an integer", task_id)
    pickled = error.get("pickle")
    if pickled is not None and type(pickled) is not str:
        raise _wrong("error.pickle", pickled, "a base64 string", task_id)
    return RecordError(error["type"], error["message"], error["traceback"], error["pid"], pickled, extra)


def _provenance(provenance: Any, task_id: str) -> Provenance:
    if type(provenance) is not dict:
        raise _wrong("provenance", provenance, "an object", task_id)
    if not provenance.keys() >= _PROVENANCE_KEYS:  # more is fine: a newer writer's, kept as it is
        missing = sorted(_PROVENANCE_KEYS - provenance.keys())
        raise InvalidRecord(f"missing field 'provenance.{missing[0]}'", task_id)
    for field, types in _PROVENANCE_TYPES_ITEMS:
        value = provenance[field]
        if type(value) not in types:
            raise _wrong(f"provenance.{field}", value, _PROVENANCE_WANTED[field], task_id)
    for value in provenance["packages"].values():
        if type(value) is not str:
            raise _wrong("provenance.packages", provenance["packages"], "an object of version strings", task_id)
    git = provenance["git"]
    if git is not None and not _git_ok(git):
        raise InvalidRecord(f"provenance.git is {git!r}, not {{commit: string or null, dirty: boolean or null, "
                            "root: string}", task_id)
    return Provenance(provenance)


def _git_ok(git: dict) -> bool:
    commit, dirty, root = git.get("commit"), git.get("dirty", False), git.get("root")
    return ((commit is None or type(commit) is str) and (dirty is None or type(dirty) is bool)
            and type(root) is str)


_PROVENANCE_WANTED = {field: ("a number" if types is _NUMBER else "an integer" if types == {int} else
                              "a string" if types == {str} else "an object" if types == {dict} else
                              "an object or null") for field, types in _PROVENANCE_TYPES.items()}


def _extra(obj: dict, required: frozenset, known: frozenset, where: str, task_id: str) -> Mapping[str, Any]:
    missing = sorted(required - obj.keys())
    if missing:
        raise InvalidRecord(f"missing field '{where}.{missing[0]}'", task_id)
    return MappingProxyType({k: v for k, v in obj.items() if k not in known})


def _wrong(field: str, value: Any, wanted: str, task_id: str | None) -> InvalidRecord:
    return InvalidRecord(f"{field} is {_kind_of(value)}, not {wanted}", task_id)


def _kind_of(value: Any) -> str:
    """A JSON value's type, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _id_of(data: dict) -> str | None:
    """The record's task id for a message, if it has a well-formed one."""
    task_id = data.get("task_id")
    return task_id if type(task_id) is str and _hex32(task_id) else None


# ------------------------------------------------------------------------------------------------
# the usual record, checked fast


_TOP = itemgetter("scheme", "task_id", "namespace", "kind", "created", "node_id", "signature", "upstream",
                  "function", "args", "provenance", "status")
_TOP_TYPES = frozenset((str, str, str, str, created, str, str, list, dict, dict, dict, str) for created in _NUMBER)
_FUNCTION = itemgetter("name", "code_hash", "deps", "module", "qualname", "version")
_FUNCTION_TYPES = frozenset(product((str,), (str,), (dict,), *[(str, type(None))] * 3))
_HASH = itemgetter("hash")
_join = "".join
_JSON_ONLY = frozenset({"hash", "json"})
_TWO_ONLY = frozenset({2})
_DICT_ONLY = frozenset({dict})
_USUAL_ARG_KEYS = frozenset({"hash", "json", "job", "pickle", "omitted"})
_PROVENANCE_ORDER = tuple(_PROVENANCE_TYPES)
_PROVENANCE_VALUES = itemgetter(*_PROVENANCE_ORDER)
_PROVENANCE_SIGNATURES = frozenset(product(*(_PROVENANCE_TYPES[f] for f in _PROVENANCE_ORDER)))
#: The allowed types of the top-level, ``function`` and ``provenance`` fields, in one set of tuples.
_USUAL_TYPES = frozenset(t + f + p for t in _TOP_TYPES for f in _FUNCTION_TYPES for p in _PROVENANCE_SIGNATURES)
_PACKAGES_AT = _PROVENANCE_ORDER.index("packages")
_GIT_AT = _PROVENANCE_ORDER.index("git")
_fromhex = bytes.fromhex
_LEN_32 = frozenset({32})
_SCRIPT_ORIGIN = frozenset({"kind", "path", "module"})
_NOTEBOOK = {"kind": "notebook"}
_INTERACTIVE = {"kind": "interactive"}
_NULL_OR_STR = frozenset({type(None), str})
_RESULT_INLINE = frozenset({"codec", "inline", "size"})
_RESULT_B64 = frozenset({"codec", "inline_b64", "size"})
_RESULT_URI = frozenset({"codec", "uri", "size"})
_RESULT_NPY = frozenset({"codec", "uri", "size", "shape", "dtype"})


def _parse_usual(data: dict) -> TaskRecord | None:
    """A record of the usual shape (as this code writes it: no extra field, no blob or file
    argument, no npy result), checked in few operations that each check many fields at once (a hit
    reads one record, and its budget is a few microseconds); None for any other record, which
    :func:`_parse` then checks field by field, naming what is wrong. It never accepts what
    ``_parse`` refuses (tests/test_task_record.py checks both on every kind of invalid record)."""
    try:
        top = _TOP(data)
        scheme, task_id, namespace, kind, created, node_id, signature, upstream, function, args, provenance, status = top
        fvalues = _FUNCTION(function)
        pvalues = _PROVENANCE_VALUES(provenance)
        if tuple(map(type, top + fvalues + pvalues)) not in _USUAL_TYPES:  # the types of 31 fields at once
            return None
        keys = data.keys()
        shapes = _SHAPES[status]
        if (keys != shapes[0] and keys != shapes[1]) or scheme != SCHEME or kind not in KINDS:
            return None
        version = data.get("record_version")
        if version is not None and (type(version) is not int or not 1 <= version <= RECORD_VERSION):
            return None

        fkeys = function.keys()
        if fkeys != _FUNCTION_REQUIRED and fkeys != _FUNCTION_KNOWN:
            return None
        name, code_hash, deps, module, qualname, version_ = fvalues
        if not name or not code_hash:
            return None
        _join(deps.values())  # TypeError unless all strings
        origin = function.get("origin")
        if origin is not None:
            if origin.keys() == _SCRIPT_ORIGIN:
                if origin["kind"] != "script" or type(origin["path"]) is not str or type(origin["module"]) not in _NULL_OR_STR:
                    return None
            elif origin != _NOTEBOOK and origin != _INTERACTIVE:
                return None
            origin = MappingProxyType(origin)

        ids = [task_id, *upstream]
        if args:
            entries = args.values()
            if set(map(len, entries)) != _TWO_ONLY or set(map(type, entries)) != _DICT_ONLY:
                return None
            ids += map(_HASH, entries)  # KeyError: no hash
            forms = set().union(*entries)
            if forms != _JSON_ONLY:  # other forms than plain values: check each
                if not forms <= _USUAL_ARG_KEYS:
                    return None
                for entry in entries:
                    if "job" in entry:
                        ids.append(entry["job"])
                    elif "json" not in entry:
                        _join(entry.values())  # pickle, omitted: strings
        if len(node_id) != 64 or len(signature) != 128 or set(map(len, ids)) != _LEN_32:
            return None
        hexes = _join((node_id, signature, *ids))
        if _fromhex(hexes).hex() != hexes:  # exactly lowercase hex
            return None

        _join(pvalues[_PACKAGES_AT].values())
        git = pvalues[_GIT_AT]
        if git is not None and not _git_ok(git):
            return None

        if status == SUCCEEDED:
            result = _usual_result(data["result"])
            if result is None:
                return None
            error = None
        else:
            result, error = None, _error(data["error"], task_id)
    except (KeyError, TypeError, ValueError):  # a field missing, not a string, not hex: _parse says which
        return None
    fref = _new_tuple(FunctionRef, (name, code_hash, MappingProxyType(deps), module, qualname, version_, origin,
                                    _NO_EXTRA))
    return _new_tuple(TaskRecord, (scheme, task_id, namespace, kind, status, fref, Args(args, task_id),
                                   tuple(upstream), Provenance(provenance), created, node_id, signature, result,
                                   error, version, _NO_EXTRA))


def _usual_result(result: Any) -> ResultRef | None:
    if type(result) is not dict:
        return None
    keys = result.keys()
    codec, size = result.get("codec"), result.get("size")
    if type(size) is not int or size < 0:
        return None
    if keys == _RESULT_INLINE:
        if codec != "json":
            return None
        return _new_tuple(ResultRef, ("json", "inline", result["inline"], size, None, None, _NO_EXTRA))
    if keys == _RESULT_URI:
        uri = result["uri"]
        if (codec != "json" and codec != "pickle") or type(uri) is not str or not _blob_uri(uri):
            return None
        return _new_tuple(ResultRef, (codec, "uri", uri, size, None, None, _NO_EXTRA))
    if keys == _RESULT_B64:
        if codec != "pickle" or type(result["inline_b64"]) is not str:
            return None
        return _new_tuple(ResultRef, ("pickle", "inline_b64", result["inline_b64"], size, None, None, _NO_EXTRA))
    return None  # npy and anything else: _result


_new_tuple = tuple.__new__


__all__ = ["ARG_FORMS", "RECORD_VERSION", "ArgEntry", "Args", "FunctionRef", "Provenance", "RecordError", "ResultRef",
           "TaskRecord"]
