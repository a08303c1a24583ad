"""One URI for one spikeinterface folder: a deterministic tar in the kachery store.

spikeinterface saves a recording or a sorting as a folder of several files. To name such a result
with one ``sha256://`` URI we pack the folder into an uncompressed tar whose bytes depend only on
the files' relative paths and contents: entries sorted, mtimes zeroed, owners blanked, modes fixed.
Saving the same data twice therefore gives the same URI on any machine.

``provenance.*`` files are left out: spikeinterface writes there the lazy chain the data came from,
with the absolute paths of the temporary folders it was read from, which would make the bytes
depend on where the computation ran. Loading a saved folder never reads them.

Unpacking is done once per content hash, into ``<home>/plugins/spikesort/unpacked/<sha256>/``
(extracted beside it, then renamed into place, so concurrent readers never see half a folder),
and the folder is then opened lazily (binary traces are memory-mapped).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from kachery_tasks import config, load_file, store_file
from kachery_tasks.store import parse_file_uri

#: Files spikeinterface writes that name the places a folder was computed from; never packed.
SKIPPED_NAMES = ("provenance.json", "provenance.pkl")


def plugin_dir(*parts: str) -> Path:
    """A directory of this plugin inside the kachery home in force (created if missing)."""
    path = Path(config.home()).expanduser().joinpath("plugins", "spikesort", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary directory on the same file system as the home (removed by the caller)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=plugin_dir("tmp")))


def _entries(folder: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = Path(root).relative_to(folder)
        for name in sorted(dirs):
            found.append(((rel_root / name).as_posix(), Path(root) / name))
        for name in sorted(files):
            if rel_root == Path(".") and name in SKIPPED_NAMES:
                continue
            found.append(((rel_root / name).as_posix(), Path(root) / name))
    return sorted(found, key=lambda item: item[0])


def write_tar(folder: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the deterministic tar of ``folder`` to ``target``."""
    folder = Path(folder)
    with open(target, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, path in _entries(folder):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = path.stat().st_size
                info.mode = 0o644
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)


def pack_folder(folder: str | os.PathLike, label: str) -> str:
    """Store ``folder`` as one deterministic tar; returns its ``sha256://`` URI."""
    fd, tmp = tempfile.mkstemp(prefix="pack-", suffix=".tar", dir=plugin_dir("tmp"))
    os.close(fd)
    try:
        write_tar(folder, tmp)
        return store_file(tmp, label=label, link=True)
    finally:
        os.unlink(tmp)


def unpacked_folder(uri: str) -> Path:
    """The folder packed at ``uri``, unpacked once per content hash in the home in force."""
    sha = parse_file_uri(uri).sha256
    final = plugin_dir("unpacked") / sha
    if final.is_dir():  # a folder only ever appears there by an atomic rename of a complete one
        return final
    tar_path = load_file(uri)  # verified against its hash before we read it
    staging = Path(tempfile.mkdtemp(prefix=f"{sha[:12]}-", dir=plugin_dir("tmp")))
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            tar.extractall(staging, filter="data")
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # not a concurrent unpacker that got there first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
