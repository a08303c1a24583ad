"""Opening a bucket by URI: ``file:///abs/path`` (:mod:`.directory`) or ``gs://bucket/prefix``
(:mod:`.gcs`, needs the ``gcs`` extra, imported only when such a bucket is opened)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import InvalidURI, UserError
from .base import Bucket
from .directory import DirectoryBucket

_FORMS = "file:///absolute/path or gs://bucket-name/optional/prefix"
_GCS_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def open_bucket(uri: str, *, read_only: bool = False, **options: Any) -> Bucket:
    """The bucket at ``uri``; ``options`` go to the implementation (timeouts, chunk sizes).

    A URI that does not parse, an unknown scheme, a missing directory or bucket, or the gcs extra
    not installed: a one-line :class:`~kachery_tasks.errors.UserError` naming the URI."""
    if not isinstance(uri, str) or "://" not in uri:
        raise InvalidURI(f"{uri!r} is not a bucket URI; use {_FORMS}")
    scheme = uri.partition("://")[0].lower()
    if scheme == "file":
        return DirectoryBucket(_file_path(uri), read_only=read_only, **options)
    if scheme == "gs":
        name = uri[len("gs://"):].partition("/")[0]
        if not _GCS_NAME.match(name) or ".." in name:
            raise InvalidURI(f"{uri!r}: {name!r} is not a Google Cloud Storage bucket name (3-222 lowercase "
                             "letters, digits, '-', '_', '.'); use gs://bucket-name/optional/prefix")
        try:
            from .gcs import GCSBucket  # here: google-cloud-storage is an optional extra, and slow to import
        except ImportError:
            raise UserError(f"{uri} needs google-cloud-storage: pip install 'kachery-tasks[gcs]'") from None
        return GCSBucket(uri, read_only=read_only, **options)
    raise InvalidURI(f"{uri!r}: unknown bucket scheme {scheme!r}; use {_FORMS}")


def _file_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidURI(f"{uri!r}: a file URI names an absolute path after three slashes, as "
                         f"file:///{parts.netloc}{parts.path}")
    if parts.query or parts.fragment:
        raise InvalidURI(f"{uri!r}: a bucket's file URI has no '?' or '#' part; use file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidURI(f"{uri!r} does not name an absolute path; use file:///absolute/path")
    return path
