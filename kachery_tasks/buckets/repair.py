"""``kachery verify --repair``: good copies of blobs this store lost, fetched from its buckets.

A blob is lost when ``verify`` (or an earlier read) quarantined it, or when a record names it and
it is not there. Each one is asked of the configured buckets in reading order (``bucket``, then
``read_buckets``), as any missing blob is (fetch.py), and downloaded the one way every bucket
download goes (transfer.download_blob): verified against its SHA-256 before it enters the store.
A bucket that lacks it, holds a damaged copy, or cannot be reached is one reason, and the next
bucket is asked; a blob no bucket could give is reported with every reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import IntegrityError
from ..store.blobs import BlobStore, Progress
from .base import Bucket, BucketError
from .transfer import BlobNotInBucket, download_blob


@dataclass(frozen=True)
class Repair:
    """The outcome for one blob: fetched from ``bucket`` (its URI, with ``size`` bytes), or not,
    and then ``reasons`` says why for each bucket asked."""

    sha256: str
    bucket: str | None
    size: int | None
    reasons: tuple[str, ...] = ()

    @property
    def repaired(self) -> bool:
        return self.bucket is not None

    def line(self) -> str:
        """One line for a report."""
        if self.repaired:
            return f"repaired sha256://{self.sha256} from {self.bucket} ({self.size} bytes, verified)"
        why = "; ".join(self.reasons) if self.reasons else "no bucket is configured"
        return f"not repaired sha256://{self.sha256}: {why}"


def repair_blobs(hashes: Iterable[str], blobs: BlobStore, buckets: Sequence[Bucket],
                 progress: Progress | None = None) -> list[Repair]:
    """Fetch each of ``hashes`` into ``blobs`` from the first of ``buckets`` that has a good copy."""
    return [repair_blob(sha256, blobs, buckets, progress) for sha256 in hashes]


def repair_blob(sha256: str, blobs: BlobStore, buckets: Sequence[Bucket], progress: Progress | None = None) -> Repair:
    reasons = []
    for bucket in buckets:
        try:
            done = download_blob(bucket, blobs, sha256, progress)
        except BlobNotInBucket:
            reasons.append(f"not in {bucket.uri}")
        except IntegrityError as exc:  # DamagedObject: a bad copy there, discarded
            reasons.append(f"damaged in {bucket.uri}: {exc}")
        except BucketError as exc:  # unreachable, refused, a layout this code cannot read
            reasons.append(str(exc) if bucket.uri in str(exc) else f"{bucket.uri}: {exc}")
        else:
            return Repair(sha256, bucket.uri, done.size)
    return Repair(sha256, None, None, tuple(reasons))


__all__ = ["Repair", "repair_blob", "repair_blobs"]
