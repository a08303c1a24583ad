"""Typed task records: the one place where a record's JSON is parsed and validated.

A record is read from this node's store today, and will arrive from other nodes (a bucket, a
channel) tomorrow: either way it becomes a :class:`TaskRecord` through :meth:`TaskRecord.from_bytes`
(its JSON text, as the store reads it) or :meth:`TaskRecord.from_json` (JSON data already parsed),
which check every field the format has (docs/formats.md, "Task records") and raise
:class:`~kachery_tasks.errors.InvalidRecord` naming what is wrong. Nothing downstream reads a record
dict with ``.get(..., {})``: what passed has every field with its type.

**Decoding is msgspec's.** Each part of a record is a ``msgspec.Struct(frozen=True)`` whose field
types say what the format says (``Literal`` for status, kind, scheme and codecs, ``Meta`` for
lengths, sizes and non-empty names, ``int | float`` for numbers so an integer stays an integer and
the signature still verifies), and ``msgspec.json.Decoder(TaskRecord)`` turns a record's bytes into
the typed record in C, types checked on the way: less time than ``orjson.loads`` alone takes to
build the dict (a hit from the store reads one record, and its budget is a few microseconds). What
a type cannot say is checked once after decoding, in :func:`_check`, on attributes, in few
operations: exactly one result form and one argument form (codec and size with a blob only, shape
and dtype with npy only), the status matching result or error, ``record_version`` not newer than
this code, a script's ``origin`` and provenance's ``git``, and every hex field at once (their
lengths are in the types; the lowercase hex digits are deleted from all of them joined, with one
``bytes.translate``, and nothing may be left). ``Meta(pattern=...)`` is kept for the rarer
``sha256://`` URIs only: a regular expression per id cost 0.35 µs each, 2 µs a record. One
check function, not a ``__post_init__`` per struct: msgspec would call five or more per record.
The whole read of a usual record (decode and check) takes about 4 µs, where ``orjson.loads`` and
the checks in Python took 10.5 µs. msgspec 0.19 or later: 0.18 decoded some 65-bit integers wrong.

**Unknown fields, two paths.** The structs forbid unknown fields, so the usual record (as this
code writes it) decodes in one pass and nothing else is done. A record that fails to decode, for
any reason, takes the slow path: it is decoded to plain JSON data, ``record_version`` is checked
first (a newer format may differ anywhere else), the fields this version does not know are taken
out at every level (top, ``function``, each ``args`` entry, ``result``, ``error``,
``provenance``: a newer writer's additions within the same version), the rest is checked with
``msgspec.convert`` against the same types (so a real error is reported with its path, e.g.
``result.size: expected `int`, got `str```), and the unknown fields are kept in ``extra`` (a
subclass of the part's type that has that field; the part's own ``extra`` is an empty mapping) and
written back by ``to_json``, so the signature over the whole record still verifies (it is over the
sorted canonical JSON: a newer writer's top-level fields come back before ``node_id``, wherever they
were). Counting keys to detect extras instead would need the dict that msgspec never builds.

**Byte compatibility**: ``TaskRecord.from_json(d).to_json() == d`` for every record the code
writes, with the keys in the order the writer put them. Optional fields keep their absence
(``None`` stands for "absent": no writer writes them as ``null``); ``record_version`` is written
back only if it was there.

JSON values inside a record (an inline result, a ``json`` argument, ``deps``, provenance's
``packages`` and ``git``, extras) are plain dicts and lists: treat them as read-only.
``to_json`` builds fresh containers for the record's own structure around them. Provenance is a
struct that also reads as a mapping (``provenance["wall_s"]``, ``"host" in provenance``),
including fields of a newer writer.

The **record version**: records carry ``record_version`` (an int) from version 1 on; a record
without it was written before versions were carried and reads as version 1. A change that makes an
existing reader misread a record bumps :data:`RECORD_VERSION`; a record of a higher version than
this code knows is refused with "written by a newer kachery-tasks ... upgrade", never half-read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from operator import attrgetter
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, ValidationError

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
_hex32 = re.compile(r"[0-9a-f]{32}").fullmatch
_join = "".join
_HEX_DIGITS = b"0123456789abcdef"
_HASH = attrgetter("hash")

# Field types (module level: msgspec resolves the annotations here).
_Id = Annotated[str, Meta(min_length=32, max_length=32)]  # and lowercase hex: _check, all at once
_NodeId = Annotated[str, Meta(min_length=64, max_length=64)]
_Signature = Annotated[str, Meta(min_length=128, max_length=128)]
_BlobURI = Annotated[str, Meta(pattern="^sha256://[0-9a-f]{64}$")]
_Name = Annotated[str, Meta(min_length=1)]
_Size = Annotated[int, Meta(ge=0)]
_Version = Annotated[int, Meta(ge=1)]
_Number = int | float  # not float: msgspec would make 3 into 3.0, and the signature would no longer verify

_STRICT = {"frozen": True, "forbid_unknown_fields": True}


# ------------------------------------------------------------------------------------------------
# the parts of a record


class FunctionRef(Struct, **_STRICT):
    """``function``: what computed the record (its id parts, and where to import it again)."""

    name: _Name
    code_hash: _Name  #: 32 hex (user code), ``<dist>==<version>`` (a library's function), ``version:<v>``
    deps: dict[str, str]  #: everything the code hash covers, each with its own hash
    module: str | None
    qualname: str | None
    version: str | None
    origin: dict[str, str | None] | None = None  #: a ``__main__`` function only (tasks/scripts.py)
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA  #: fields of a newer writer (a field of the slow path's subclass)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "code_hash": self.code_hash, "deps": dict(self.deps), "module": self.module,
               "qualname": self.qualname, "version": self.version}
        if self.origin is not None:
            out["origin"] = dict(self.origin)
        if self.extra:
            out.update(self.extra)
        return out


class ArgEntry(Struct, **_STRICT):
    """One entry of ``args``: the argument's hash and the one form it was kept in.

    The forms are fields of which exactly one is set: ``job`` (the upstream task id), ``file`` (its
    file URI), ``blob`` (the blob's URI, with ``codec`` and ``size``), ``json`` (the value; UNSET
    when absent, as the value may be null), ``pickle`` (base64 cloudpickle) or ``omitted`` (why it
    was not kept). :attr:`form` names it and :attr:`value` gives it.
    """

    hash: _Id
    json: Any = UNSET
    job: _Id = None
    file: str = None
    blob: _BlobURI = None
    pickle: str = None
    omitted: str = None
    codec: Literal["npy", "bytes", "bytearray", "json"] = None  #: ``blob`` entries only
    size: _Size = None  #: ``blob`` entries only
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA

    @property
    def form(self) -> str:
        """Which of :data:`ARG_FORMS` the entry has."""
        if self.json is not UNSET:
            return "json"
        for form in ("job", "file", "blob", "pickle", "omitted"):
            if getattr(self, form) is not None:
                return form
        raise AssertionError("an entry without a form passed validation")  # _check refuses them

    @property
    def value(self) -> Any:
        """The entry's value in its form."""
        return getattr(self, self.form)

    @property
    def kept(self) -> bool:
        """Whether a replay can rebuild the argument from this entry."""
        return self.omitted is None

    def to_json(self) -> dict[str, Any]:
        form = self.form
        out = {"hash": self.hash, form: getattr(self, form)}
        if form == "blob":
            out["codec"] = self.codec
            out["size"] = self.size
        if self.extra:
            out.update(self.extra)
        return out


class ResultRef(Struct, **_STRICT):
    """``result`` of a success: its codec, and its value in exactly one form.

    ``inline`` (a ``json`` value; UNSET when absent, as the value may be null), ``inline_b64`` (a
    base64 ``pickle``) or ``uri`` (a blob's ``sha256://`` URI, with its size; an ``npy`` result is
    always one, with ``shape`` and ``dtype``). :attr:`form` names it and :attr:`value` gives it.
    """

    codec: Literal["json", "npy", "pickle"]
    size: _Size  #: bytes of the encoded value
    inline: Any = UNSET
    inline_b64: str = None
    uri: _BlobURI = None  #: the blob's URI, or None for an inline result
    shape: tuple[_Size, ...] = None  #: ``npy`` only
    dtype: _Name = None  #: ``npy`` only
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA

    @property
    def form(self) -> str:
        """``inline``, ``inline_b64`` or ``uri``."""
        return "uri" if self.uri is not None else "inline" if self.inline is not UNSET else "inline_b64"

    @property
    def value(self) -> Any:
        """The result in its form: the JSON value, the base64 pickle or the URI."""
        return self.uri if self.uri is not None else self.inline if self.inline is not UNSET else self.inline_b64

    @property
    def sha256(self) -> str | None:
        """The blob's SHA-256 hex, or None for an inline result."""
        return self.uri[9:] if self.uri is not None else None

    def to_json(self) -> dict[str, Any]:
        form = self.form
        out = {"codec": self.codec, form: getattr(self, form), "size": self.size}
        if self.shape is not None:
            out["shape"] = list(self.shape)
            out["dtype"] = self.dtype
        if self.extra:
            out.update(self.extra)
        return out


class RecordError(Struct, **_STRICT):
    """``error`` of a failure: what was raised, and where."""

    type: str  #: ``module.qualname`` of the exception class
    message: str
    traceback: str
    pid: int
    pickle: str = None  #: base64 cloudpickle of the exception, when it pickled
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA

    def to_json(self) -> dict[str, Any]:
        out = {"type": self.type, "message": self.message, "traceback": self.traceback, "pid": self.pid}
        if self.pickle is not None:
            out["pickle"] = self.pickle
        if self.extra:
            out.update(self.extra)
        return out


class Provenance(Struct, **_STRICT):
    """``provenance``: where, when and at what cost the result was computed (tasks/provenance.py,
    ``Measure.fields``). Also a read-only mapping of its fields, a newer writer's included
    (``kachery task show`` prints it whole)."""

    python: str
    implementation: str
    platform: str
    host: str
    user: str
    pid: int  #: the computing process
    started: _Number  #: seconds since the epoch
    ended: _Number  #: seconds since the epoch
    wall_s: _Number  #: wall-clock seconds of the computation
    cpu_s: _Number  #: CPU seconds of the computing thread
    peak_rss: int  #: bytes: the process's peak so far
    packages: dict[str, str]  #: ``{dist: version}``
    git: dict[str, str | bool | None] | None  #: ``{commit, dirty, root}``, or None
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA

    def __getitem__(self, key: str) -> Any:
        if key in _PROVENANCE_FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.__struct_fields__[:_PROVENANCE_COUNT]
        yield from self.extra

    def __len__(self) -> int:
        return _PROVENANCE_COUNT + len(self.extra)

    def __contains__(self, key: object) -> bool:
        return key in _PROVENANCE_FIELDS or key in self.extra

    keys = Mapping.keys
    items = Mapping.items
    values = Mapping.values
    get = Mapping.get

    def to_json(self) -> dict[str, Any]:
        out = dict(self.items())
        if self.git is not None:
            out["git"] = dict(self.git)
        out["packages"] = dict(self.packages)
        return out


_PROVENANCE_COUNT = len(Provenance.__struct_fields__)
_PROVENANCE_FIELDS = frozenset(Provenance.__struct_fields__)
Mapping.register(Provenance)

#: ``args``: the entries by parameter name.
Args = dict[str, ArgEntry]


# ------------------------------------------------------------------------------------------------
# the record


class TaskRecord(Struct, **_STRICT):
    """A task record, parsed and validated (docs/formats.md, "Task records").

    Build one with :meth:`from_bytes` or :meth:`from_json`; :meth:`to_json` gives back the exact
    JSON it came from.
    """

    scheme: Literal["kt1"]
    task_id: _Id
    namespace: str
    kind: Literal["pure", "query", "action"]
    status: Literal["succeeded", "failed"]
    function: FunctionRef
    args: dict[str, ArgEntry]
    upstream: tuple[_Id, ...]  #: task ids of the jobs among the arguments
    provenance: Provenance
    created: _Number  #: when the record was written, seconds since the epoch
    node_id: _NodeId  #: the signer: hex Ed25519 public key
    signature: _Signature  #: 128 hex, over the canonical JSON of the rest
    result: ResultRef | None = None  #: successes only
    error: RecordError | None = None  #: failures only
    record_version: _Version | None = None  #: as written; None: written before versions were carried (1)
    extra: ClassVar[Mapping[str, Any]] = _NO_EXTRA  #: top-level fields of a newer writer, kept as they are

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    @property
    def version(self) -> int:
        """The record format version (``record_version``, 1 when absent)."""
        return 1 if self.record_version is None else self.record_version

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data, equal to what it was read from."""
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
    def from_bytes(cls, data: bytes | str) -> TaskRecord:
        """Parse and validate a record's JSON text; raises :class:`InvalidRecord` saying what is wrong."""
        try:
            record = _decode(data)
        except ValidationError:  # an error, or fields this version does not know: the slow path says which
            try:
                parsed = _decode_any(data)
            except msgspec.DecodeError as exc:
                raise InvalidRecord(f"not JSON ({exc})") from None
            return _parse(parsed)
        except msgspec.DecodeError as exc:
            raise InvalidRecord(f"not JSON ({exc})") from None
        _check(record)
        return record

    @classmethod
    def from_json(cls, data: Any) -> TaskRecord:
        """Parse and validate a record's JSON data; raises :class:`InvalidRecord` saying what is wrong."""
        try:
            record = _convert(data, TaskRecord)
        except ValidationError:
            return _parse(data)
        _check(record)
        return record


_decode = msgspec.json.Decoder(TaskRecord).decode
_decode_any = msgspec.json.Decoder().decode
_convert = msgspec.convert


# ------------------------------------------------------------------------------------------------
# what the types cannot say, checked after decoding


def _check(record: TaskRecord) -> None:
    """Check what the field types cannot say; raises :class:`InvalidRecord`. Written for the hit
    path: the usual record passes in a few tests, and only one that fails looks for the message."""
    version = record.record_version
    if version is not None and version > RECORD_VERSION:
        raise _newer(version, _valid_id(record.task_id))
    result = record.result
    if record.status == SUCCEEDED:
        if result is None or record.error is not None:
            raise InvalidRecord("missing field 'result'" if result is None else "a succeeded record has an 'error'",
                                _valid_id(record.task_id))
        if (result.inline is UNSET or result.codec != "json" or result.inline_b64 is not None
                or result.uri is not None or result.shape is not None or result.dtype is not None):
            _check_result(result, record.task_id)  # not an inline json result: the thorough check
    elif record.error is None or result is not None:
        raise InvalidRecord("missing field 'error'" if record.error is None else "a failed record has a 'result'",
                            _valid_id(record.task_id))

    entries = record.args.values()
    hexes = [record.node_id, record.signature, record.task_id, *record.upstream, *map(_HASH, entries)]
    for entry in entries:
        if entry.json is UNSET or not (entry.job is entry.file is entry.blob is entry.pickle is entry.omitted
                                       is entry.codec is entry.size is None):
            _check_args(record, hexes)  # not all plain values: the thorough check
            break
    try:  # every id, hash and key at once: their lengths are in the types, this is the lowercase hex
        bad = _join(hexes).encode().translate(None, _HEX_DIGITS)
    except UnicodeEncodeError:  # a lone surrogate
        bad = True
    if bad:
        _find_bad_hex(record)

    origin = record.function.origin
    if origin is not None and (origin.get("kind") != "script" or type(origin.get("path")) is not str):
        _check_origin(origin, record.task_id)
    git = record.provenance.git
    if git is not None and not _git_ok(git):
        raise InvalidRecord(f"provenance.git is {git!r}, not {{commit: string or null, dirty: boolean or null, "
                            "root: string}", _valid_id(record.task_id))


def _check_result(result: ResultRef, task_id: str) -> None:
    forms = [f for f in RESULT_FORMS if getattr(result, f) is not (UNSET if f == "inline" else None)]
    task_id = _valid_id(task_id)
    if len(forms) != 1:
        if not forms:
            raise InvalidRecord("result has no value (one of inline, inline_b64, uri)", task_id)
        raise InvalidRecord(f"result has {len(forms)} forms ({' and '.join(forms)}); a result has exactly one", task_id)
    form, codec = forms[0], result.codec
    if form == "inline" and codec != "json":
        raise InvalidRecord(f"result.inline holds json, not {codec}", task_id)
    if form == "inline_b64" and codec != "pickle":
        raise InvalidRecord(f"result.inline_b64 holds a pickle, not {codec}", task_id)
    if codec == "npy":
        if form != "uri":
            raise InvalidRecord("an npy result is a blob (result.uri)", task_id)
        if result.shape is None or result.dtype is None:
            raise InvalidRecord(f"missing field 'result.{'shape' if result.shape is None else 'dtype'}'", task_id)
    elif result.shape is not None or result.dtype is not None:
        raise InvalidRecord(f"result has shape or dtype, which only an npy result has, not {codec}", task_id)


def _check_args(record: TaskRecord, hexes: list[str]) -> None:
    """Check every argument entry's form; add the ids of ``job`` entries to ``hexes``."""
    for name, entry in record.args.items():
        _check_arg(name, entry, record.task_id)
        if entry.job is not None:
            hexes.append(entry.job)


def _check_arg(name: str, entry: ArgEntry, task_id: str) -> None:
    forms = [f for f in ARG_FORMS if getattr(entry, f) is not (UNSET if f == "json" else None)]
    where = f"args[{name!r}]"
    if len(forms) != 1:
        task_id = _valid_id(task_id)
        if not forms:
            raise InvalidRecord(f"{where} has no value form (one of {', '.join(ARG_FORMS)})", task_id)
        raise InvalidRecord(f"{where} has {len(forms)} forms ({' and '.join(forms)}); an entry has exactly one", task_id)
    if forms[0] == "blob":
        if entry.codec is None or entry.size is None:
            raise InvalidRecord(f"missing field {where + ('.codec' if entry.codec is None else '.size')!r}",
                                _valid_id(task_id))
    elif entry.codec is not None or entry.size is not None:
        raise InvalidRecord(f"{where} has codec or size, which only a blob entry has", _valid_id(task_id))
    elif forms[0] == "file":
        try:
            parse_file_uri(entry.file)
        except InvalidURI as exc:
            raise InvalidRecord(f"{where}.file: {exc}", _valid_id(task_id)) from None


def _find_bad_hex(record: TaskRecord) -> None:
    """Name the field that is not lowercase hex (the joined check said one is not)."""
    task_id = _valid_id(record.task_id)
    if task_id is None:
        raise InvalidRecord(f"task_id {record.task_id!r} is not 32 lowercase hex characters")
    if not _is_hex(record.node_id):
        raise InvalidRecord(f"node_id {record.node_id!r} is not a node id (64 lowercase hex characters)", task_id)
    if not _is_hex(record.signature):
        raise InvalidRecord("signature is not 128 lowercase hex characters", task_id)
    for up in record.upstream:
        if not _is_hex(up):
            raise InvalidRecord(f"upstream {up!r} is not a task id (32 lowercase hex characters)", task_id)
    for name, entry in record.args.items():
        if not _is_hex(entry.hash):
            raise InvalidRecord(f"args[{name!r}].hash {entry.hash!r} is not 32 lowercase hex characters", task_id)
        if entry.job is not None and not _is_hex(entry.job):
            raise InvalidRecord(f"args[{name!r}].job {entry.job!r} is not a task id (32 lowercase hex characters)",
                                task_id)
    raise AssertionError("the joined hex check failed, but no field is at fault")


def _is_hex(text: str) -> bool:
    try:
        return not text.encode().translate(None, _HEX_DIGITS)
    except UnicodeEncodeError:
        return False


def _check_origin(origin: dict[str, Any], task_id: str) -> None:
    kind = origin.get("kind")
    if kind not in ORIGIN_KINDS:
        raise InvalidRecord(f"function.origin.kind {kind!r} is not script, notebook or interactive", _valid_id(task_id))
    if kind == "script" and type(origin.get("path")) is not str:
        raise InvalidRecord(f"function.origin.path is {_kind_of(origin.get('path'))}, not a string", _valid_id(task_id))


def _git_ok(git: dict) -> bool:
    commit, dirty, root = git.get("commit"), git.get("dirty", False), git.get("root")
    return ((commit is None or type(commit) is str) and (dirty is None or type(dirty) is bool)
            and type(root) is str)


def _newer(version: int, task_id: str | None) -> InvalidRecord:
    return InvalidRecord(f"written by a newer kachery-tasks (record_version {version}; this one reads up to "
                         f"{RECORD_VERSION}): upgrade kachery-tasks to read it", task_id)


def _valid_id(task_id: Any) -> str | None:
    """The record's task id for a message, if it is a well-formed one."""
    return task_id if type(task_id) is str and _hex32(task_id) else None


# ------------------------------------------------------------------------------------------------
# the slow path: unknown fields kept, or the reason a record is refused


class _FunctionRefX(FunctionRef, **_STRICT):
    extra: dict[str, Any] = {}


class _ArgEntryX(ArgEntry, **_STRICT):
    extra: dict[str, Any] = {}


class _ResultRefX(ResultRef, **_STRICT):
    extra: dict[str, Any] = {}


class _RecordErrorX(RecordError, **_STRICT):
    extra: dict[str, Any] = {}


class _ProvenanceX(Provenance, **_STRICT):
    extra: dict[str, Any] = {}


class _TaskRecordX(TaskRecord, **_STRICT):
    extra: dict[str, Any] = {}


def _known(cls: type[Struct]) -> frozenset[str]:
    return frozenset(cls.__struct_encode_fields__)


_TOP_KNOWN = _known(TaskRecord)
#: The parts of a record that keep a newer writer's fields: their key, type, and type with ``extra``.
_PARTS = (("function", _known(FunctionRef), _FunctionRefX), ("provenance", _known(Provenance), _ProvenanceX),
          ("result", _known(ResultRef), _ResultRefX), ("error", _known(RecordError), _RecordErrorX))
_ARG_KNOWN = _known(ArgEntry)


def _split(obj: Any, known: frozenset[str]) -> tuple[Any, dict[str, Any]]:
    """``obj`` without the fields not in ``known``, and those fields (in their order)."""
    if type(obj) is not dict or obj.keys() <= known:
        return obj, {}
    return {k: v for k, v in obj.items() if k in known}, {k: v for k, v in obj.items() if k not in known}


def _parse(data: Any) -> TaskRecord:
    """A record that did not decode as the usual shape: refused naming the problem, or read with
    the fields this version does not know kept in ``extra``."""
    if type(data) is not dict:
        raise InvalidRecord(f"a task record is a JSON object, not {_kind_of(data)}")
    task_id = _valid_id(data.get("task_id"))
    version = data.get("record_version")
    if version is not None:  # first: a newer format may differ anywhere else
        if type(version) is not int or version < 1:
            raise InvalidRecord(f"record_version is {version!r}, not a positive integer", task_id)
        if version > RECORD_VERSION:
            raise _newer(version, task_id)

    clean, top_extra = _split(data, _TOP_KNOWN)
    clean = dict(clean)
    extras: dict[str, dict[str, Any]] = {}
    for key, known, _ in _PARTS:
        if key in clean:
            clean[key], extras[key] = _split(clean[key], known)
    arg_extras: dict[str, dict[str, Any]] = {}
    args = clean.get("args")
    if type(args) is dict:
        clean["args"] = {}
        for name, entry in args.items():
            clean["args"][name], arg_extras[name] = _split(entry, _ARG_KNOWN)
    try:
        record = _convert(clean, TaskRecord)
    except ValidationError as exc:
        raise InvalidRecord(_message(str(exc), clean), task_id) from None
    _check(record)

    if not (top_extra or any(extras.values()) or any(arg_extras.values())):
        return record  # refused by the fast decoder for no reason that holds: should not happen
    fields = msgspec.structs.asdict(record)
    for key, _, with_extra in _PARTS:
        if extras.get(key):
            fields[key] = with_extra(**msgspec.structs.asdict(fields[key]), extra=extras[key])
    for name, extra in arg_extras.items():
        if extra:
            record.args[name] = _ArgEntryX(**msgspec.structs.asdict(record.args[name]), extra=extra)
    if top_extra:
        return _TaskRecordX(**fields, extra=top_extra)
    return TaskRecord(**fields)


_VALIDATION = re.compile(r"(?s)(.*?)(?: - at `\$(.*)`)?")
_MISSING = re.compile(r"Object missing required field `(.*)`")


def _message(text: str, clean: dict) -> str:
    """msgspec's message, as this module words them: ``field: what is wrong`` with the field's
    path (``function.code_hash``, ``args['x'].hash``), ``missing field 'function.code_hash'``."""
    what, path = _VALIDATION.fullmatch(text).groups()
    path = (path or "").lstrip(".")
    if path.startswith("args[...]"):
        path = path.replace("[...]", f"[{_failing_arg(clean)!r}]", 1)
    missing = _MISSING.fullmatch(what)
    if missing:
        return f"missing field {(path + '.' if path else '') + missing.group(1)!r}"
    if what.startswith("Expected `str` of length") and _HEX_FIELD.fullmatch(path):
        return f"{path} is not {_HEX_LENGTHS.get(path, 32)} lowercase hex characters"
    if what.startswith("Invalid enum value") and path in ("status", "kind", "scheme"):
        return f"unknown {path} {what.split(' ', 3)[3]} ({_ENUMS[path]})"
    what = what[0].lower() + what[1:]
    return f"{path}: {what}" if path else what


_HEX_FIELD = re.compile(r"task_id|node_id|signature|upstream\[\d+\]|args\[.*\]\.(hash|job)")
_HEX_LENGTHS = {"node_id": 64, "signature": 128}
_ENUMS = {"status": "succeeded or failed", "kind": "pure, query or action",
          "scheme": f"{SCHEME!r}: written by a newer kachery-tasks? upgrade it to read this record"}


def _failing_arg(clean: dict) -> str:
    """The name of the argument entry that does not validate."""
    for name, entry in clean["args"].items():
        try:
            _convert(entry, ArgEntry)
        except ValidationError:
            return name
    return "..."


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


__all__ = ["ARG_FORMS", "RECORD_VERSION", "ArgEntry", "Args", "FunctionRef", "Provenance", "RecordError", "ResultRef",
           "TaskRecord"]
