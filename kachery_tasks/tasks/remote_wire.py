"""What a remote task request and its answer carry: values as JSON entries, answers as signed objects.

A ``request_task`` body is ``{name, code_hash, kind, task_id, namespace, args, key?, retry?}``.
``args`` maps each argument to an entry in the forms task records keep (store/task_record.py,
recording.describe_args), never a pickle, so a provider only ever rebuilds data, never code:

- ``{"json": value}``: plain JSON data up to :data:`INLINE_MAX_BYTES`;
- ``{"file": "sha256://…"}``: a :class:`File`, whose bytes the requester puts in the channel's bucket
  (the provider's ``load_file`` finds them there through the tiers);
- ``{"blob": "sha256://…", "codec": …, "size": …}``: an array, a byte string or larger JSON data,
  written to the channel's bucket as a blob (tasks/arg_blobs.py codecs), since an envelope is small.

A query's result travels back in the same forms. The answer to a request is a durable object,
``channels/<name>/answers/<request id>/<node id>.json`` (buckets/layout.py), signed by the provider:
the message that announces it may be lost; the object is re-checked, its signature verified, and its
signer must hold ``provide_tasks`` in the config in force.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import orjson

from ..buckets import AlreadyExists, Bucket, NotFound
from ..buckets.layout import channel_answer_key
from ..buckets.transfer import download_blob, upload_blob
from ..errors import UserError
from ..hashing.canonical import hash_value
from ..identity import KeyPair
from ..identity.documents import sign_document, verify_document
from ..store.blobs import BlobStore
from ..store.codecs import is_plain_json
from ..store.file import File
from ..store.uris import parse_file_uri
from . import arg_blobs
from .task import Job

#: Plain JSON values up to this size go inside the envelope or the answer; larger ones as blobs.
INLINE_MAX_BYTES = 4096

_BlobEntry = namedtuple("_BlobEntry", "blob codec")


class NotSendable(UserError):
    """An argument or result that has no form another node can rebuild without running code."""


def encode_value(name: str, value: Any, blobs: BlobStore, bucket: Bucket) -> dict[str, Any]:
    """The entry for ``value``, with any blob it needs put in ``bucket`` first."""
    if isinstance(value, Job):
        raise NotSendable(f"argument {name!r} is a job; pass its result to a remote task (call it first)")
    if isinstance(value, File):
        digest = parse_file_uri(value.uri).sha256
        if blobs.exists(digest):
            upload_blob(bucket, blobs, digest)
        return {"file": value.uri}
    codec = arg_blobs.blob_codec(value)
    if codec is None and is_plain_json(value):
        if len(orjson.dumps(value)) <= INLINE_MAX_BYTES:
            return {"json": value}
        codec = "json"
    if codec is None:
        raise NotSendable(f"argument {name!r} of type {type(value).__name__} cannot be sent to another node: "
                          "JSON data, files, numpy arrays and bytes can (never a pickle)")
    fields = arg_blobs.keep(value, codec, hash_value(value), blobs)
    upload_blob(bucket, blobs, parse_file_uri(fields["blob"]).sha256)
    return fields


def decode_value(name: str, entry: Any, blobs: BlobStore, bucket: Bucket) -> Any:
    """The value of an entry made by :func:`encode_value` (blobs downloaded and verified)."""
    if not isinstance(entry, dict):
        raise UserError(f"argument {name!r}: not an entry ({type(entry).__name__})")
    if "json" in entry:
        return entry["json"]
    if isinstance(entry.get("file"), str):
        return File(entry["file"])
    if isinstance(entry.get("blob"), str) and entry.get("codec") in ("npy", "bytes", "bytearray", "json"):
        digest = parse_file_uri(entry["blob"]).sha256
        download_blob(bucket, blobs, digest)
        return arg_blobs.load(_BlobEntry(entry["blob"], entry["codec"]), blobs)
    raise UserError(f"argument {name!r}: unknown entry form {sorted(entry)}")


# -- answers ---------------------------------------------------------------------------------------
def write_answer(bucket: Bucket, keys: KeyPair, channel: str, request_id: str, answer: dict[str, Any]) -> None:
    """Write this node's signed answer to ``request_id`` (create-if-absent: a resent request keeps
    the first answer)."""
    doc = sign_document(keys, {**answer, "request_id": request_id, "node_id": keys.public_hex})
    try:
        bucket.write(channel_answer_key(channel, request_id, keys.public_hex), orjson.dumps(doc))
    except AlreadyExists:
        pass


def read_answers(bucket: Bucket, channel: str, request_id: str, trusted: frozenset[str]) -> dict[str, dict[str, Any]]:
    """The answers to ``request_id`` signed by nodes in ``trusted`` (the members holding
    ``provide_tasks``), by node id; any other object there is passed over."""
    prefix = channel_answer_key(channel, request_id, "0" * 64).rsplit("/", 1)[0] + "/"
    found = {}
    for info in bucket.list(prefix):
        node_id = info.key.rsplit("/", 1)[-1].removesuffix(".json")
        if node_id not in trusted:
            continue
        try:
            doc = orjson.loads(b"".join(bucket.read(info.key)))
        except (NotFound, orjson.JSONDecodeError):
            continue
        if (isinstance(doc, dict) and doc.get("node_id") == node_id and doc.get("request_id") == request_id
                and verify_document(doc, node_id)):
            found[node_id] = doc
    return found
