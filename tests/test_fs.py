"""The one atomic write (kachery_tasks/fs.py): concurrent writers never tear a file or collide on a
temp name, a failed write leaves the old file and no temp file, private keys stay private."""

from __future__ import annotations

import errno
import grp
import json
import multiprocessing
import os
import stat
import threading

import pytest

from kachery_tasks import config
from kachery_tasks.feeds import create_feed
from kachery_tasks.fs import TEMP_PREFIX, write_atomic
from kachery_tasks.identity.node import init_node, key_path, node_identity


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _run_threads(target, n: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_writing_node_file_at_once(tmp_path):
    # Threads of one process share a pid: the old pid-named temp file was one file for all of them.
    labels = {i: f"label-{i}-" + "x" * 200_000 for i in range(8)}
    torn: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        path = tmp_path / "node" / "node.json"
        while not stop.is_set():
            try:
                info = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except ValueError as exc:
                torn.append(str(exc))
                continue
            if info.get("label") not in labels.values():
                torn.append("mixed label")

    node_identity(tmp_path)  # the key exists before the race: this test is about node.json
    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for _ in range(5):
            errors = _run_threads(lambda i: init_node(tmp_path, f"u{i}@example.org", labels[i]), 8)
            assert errors == []
    finally:
        stop.set()
        reader.join()
    assert torn == []
    info = json.loads((tmp_path / "node" / "node.json").read_text())
    assert info["label"] in labels.values() and info["owner"] == f"u{info['label'].split('-')[1]}@example.org"
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["key.pem", "node.json"]


def _write_many(path: str, i: int, rounds: int) -> None:
    data = bytes([i]) * 300_000
    for _ in range(rounds):
        write_atomic(path, data)


def test_processes_writing_one_file_at_once(tmp_path):
    path = tmp_path / "feeds" / "f" / "sub.checkpoints.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), i, 20)) for i in range(1, 5)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        assert len(data) == 300_000 and len(set(data)) == 1, "torn or mixed file"
        seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    data = path.read_bytes()
    assert len(data) == 300_000 and len(set(data)) == 1
    assert os.listdir(path.parent) == [path.name]


def test_failed_write_keeps_old_content_and_no_temp_file(tmp_path):
    path = tmp_path / "node.json"
    write_atomic(path, b"old\n")

    def interrupted():
        yield b"new, half"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted())
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["node.json"]


def test_full_disk_error_propagates_unchanged(tmp_path):
    # errors.as_store_full, upstream, recognises the OSError by its errno: it must arrive as raised.
    path = tmp_path / "forks.json"
    write_atomic(path, b"{}\n")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def filling():
        yield b"x" * 4096
        raise full

    with pytest.raises(OSError) as caught:
        write_atomic(path, filling())
    assert caught.value is full
    assert path.read_bytes() == b"{}\n"
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(tmp_path))


def test_existing_file_kept_when_not_overwriting(tmp_path):
    path = tmp_path / "key.pem"
    write_atomic(path, b"first", mode=0o600, share=False, overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", mode=0o600, share=False, overwrite=False)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key.pem"]


def test_node_key_stays_0600_in_a_shared_home(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    with config.set(home=str(tmp_path), shared_group=group):
        init_node(tmp_path, "owner@example.org", "lab")
        feed = create_feed("shared")
    assert _mode(key_path(tmp_path)) == 0o600
    # the home's other files get the group's bits: other users of the group can rewrite them
    assert _mode(tmp_path / "node" / "node.json") == 0o664
    assert _mode(tmp_path / "feeds" / feed.feed_id / "feed.json") & 0o060 == 0o060


def test_node_key_is_0600_in_a_private_home(tmp_path):
    init_node(tmp_path, "owner@example.org", None)
    assert _mode(key_path(tmp_path)) == 0o600
    assert _mode(tmp_path / "node" / "node.json") == 0o644
