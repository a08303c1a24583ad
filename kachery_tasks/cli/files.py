"""``kachery store | load | cat | info``: files in this node's store (``verify`` is in maintenance.py).

No command hands out a byte that does not match its hash (docs/files.md, "Verification"): ``load``
prints a path the store has verified (a matching stamp vouches for it); ``load -o`` and ``cat`` read
every byte anyway, so they hash as they go (``BlobStore.read_verified``) and ignore the stamp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .. import config
from ..buckets.fetch import locate_blob
from ..buckets.transfer import download_blob
from ..errors import FULL_ERRNOS, IntegrityError, UserError
from ..fs import write_atomic
from ..store import current_store, file_info, load_file, parse_file_uri, store_file
from ..store.files import local_blobs
from .output import bars_shown, byte_progress, print_json, print_mapping


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--label", default=None, help="Label in the URI (default: the file name); one FILE only.")
@click.option("--link", is_flag=True,
              help="Hard-link instead of copying where possible (editing FILE in place then damages the blob).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {path, uri, size}.")
def store(files: tuple[str, ...], label: str | None, link: bool, as_json: bool) -> None:
    """Store FILE(s) and print their sha256:// URIs, one a line."""
    if label is not None and len(files) > 1:
        raise UserError("--label names one file; store several files without it (each keeps its name)")
    rows = []
    for name in files:
        path = Path(name)
        size = path.stat().st_size if path.is_file() else 0
        with byte_progress(size, f"storing {path.name}") as progress:
            uri = store_file(path, label, link=link, progress=progress)
        rows.append({"path": str(path), "uri": uri, "size": size})
        if not as_json:
            click.echo(uri)
    if as_json:
        print_json(rows)


@click.command()
@click.argument("uri")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=True), default=None,
              help="Copy the verified file here (a directory takes the label or hash as name).")
def load(uri: str, output: str | None) -> None:
    """Verify URI's file and print its path in the store, or copy it to -o PATH.

    A file missing here is fetched from the configured buckets, verified on the way in."""
    parsed = parse_file_uri(uri)
    fetch_with_progress(parsed.sha256, parsed.label)
    if output is None:
        click.echo(str(load_file(uri)))
        return
    target = Path(output)
    if target.is_dir():
        target = target / (parsed.label or parsed.sha256)
    _copy(parsed.sha256, target)
    click.echo(str(target))


def fetch_with_progress(sha256: str, label: str | None = None) -> None:
    """Fetch a blob missing here from the configured buckets with a progress bar (a large file can
    take minutes). Only when bars are shown: otherwise the store fetches it on first use, as it
    does for ``kt.load_file``, and a missing or damaged file is reported there, once."""
    if not bars_shown() or config.get("read_only"):
        return
    store = current_store()
    if store.blobs.exists(sha256):
        return
    found = locate_blob(sha256)
    if found is None:
        return
    bucket, size = found
    with byte_progress(size, f"downloading {label or sha256[:12]}") as progress:
        download_blob(bucket, store.blobs, sha256, progress)


def _copy(sha256: str, target: Path) -> None:
    """Copy through a temp file beside ``target`` and rename: never a partial file under its name.
    The bytes are hashed as they are copied, so a damaged blob leaves no file at all."""
    if not target.parent.is_dir():
        raise UserError(f"cannot write {str(target)!r}: directory {str(target.parent)!r} does not exist")
    blobs = local_blobs(sha256)  # fetched from the configured buckets if missing here
    size = blobs.size(sha256)
    try:
        with byte_progress(size, f"copying to {target.name}") as progress:
            def blocks():
                for block in blobs.read_verified(sha256):
                    yield block
                    if progress is not None:
                        progress(len(block))
            # outside the home: the user's umask, not the home's shared group
            write_atomic(target, blocks(), mode=0o644 & ~_umask(), share=False)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:  # outside the home: name the target
            raise UserError(f"cannot write {str(target)!r}: {os.strerror(exc.errno).lower()}; "
                            f"free space there or copy it elsewhere with -o") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@click.command()
@click.argument("uri")
def cat(uri: str) -> None:
    """Write URI's bytes to stdout, each block hashed before it is written (see docs/files.md)."""
    sha256 = parse_file_uri(uri).sha256
    fetch_with_progress(sha256)
    blobs = local_blobs(sha256)  # fetched from the configured buckets if missing here
    out = sys.stdout.buffer
    written = 0
    try:
        for block in blobs.read_verified(sha256):
            _write_all(out, block)
            written += len(block)
        out.flush()
    except IntegrityError as exc:
        if not written:
            raise
        # a blob over 16 MiB is written chunk by chunk: say that what came out must be thrown away
        raise IntegrityError(f"{exc} ({written} bytes were written to standard output before this was "
                             "found: discard them)") from None
    except BrokenPipeError:  # `kachery cat URI | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError as exc:  # `kachery cat URI > file` on a full disk: not the home's fault
        if exc.errno not in FULL_ERRNOS:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush fails no more
        raise UserError(f"cannot write to standard output: {os.strerror(exc.errno).lower()}") from None


def _write_all(out, block: bytes) -> None:
    """Write all of ``block``: stdout is unbuffered under ``python -u`` or PYTHONUNBUFFERED, and a
    raw file's ``write`` may write part of it (on a full disk, the next call then raises ENOSPC)."""
    view = memoryview(block)
    while view:
        view = view[out.write(view):]


@click.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(uri: str, as_json: bool) -> None:
    """What the store knows of URI: size, path, chunks (no re-hash)."""
    print_mapping(file_info(uri), as_json)
