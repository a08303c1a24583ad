"""cached() on DataFrames read from files (read_parquet, read_csv): partitions are identified by the
content of the files they read, not by their paths, and content hashes are remembered by stamp.

Executions of the user's step are counted through a file (execution_log); every map_partitions gets
its meta, so dask never calls the step to guess it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time

import numpy as np
import pytest
from execution_log import note, runs

from kachery_tasks import config
from kachery_tasks.dask import cached
from kachery_tasks.dask.identify import REMOTE, InputChanged, graph_ids
from kachery_tasks.dask.nodes import LoadTask, RunTask
from kachery_tasks.errors import UserError
from kachery_tasks.store.file_hashes import RACY_NS, cache_path, content_sha256

pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")
pytest.importorskip("pyarrow")


def frame(i: int, scale: float = 1.0) -> pd.DataFrame:
    """The data of file ``i``: ``a`` runs from 10*i, so a partition is named by its first ``a``."""
    a = np.arange(10) + 10 * i
    return pd.DataFrame({"a": a, "b": a * scale / 4, "g": a % 3})


META = frame(0).iloc[:0].assign(c=0.0)


def step(part, log):
    note(log, f"step{part.a.iloc[0]}")
    return part.assign(c=part.a * 2 + part.b)


def write_parquet(folder, scales=(1.0, 1.0, 1.0)):
    folder.mkdir(exist_ok=True)
    for i, scale in enumerate(scales):
        frame(i, scale).to_parquet(folder / f"part{i}.parquet")
    return folder


def stepped(folder, log, **kwargs):
    return dd.read_parquet(str(folder), **kwargs).map_partitions(step, str(log), meta=META)


PIPELINES = {
    "map_partitions": lambda folder, log: stepped(folder, log),
    "groupby_sum": lambda folder, log: stepped(folder, log).groupby("g").c.sum(),
}


def job_keys(c) -> set:
    """The content-keyed nodes of a cached collection's graph (load or run)."""
    return {k for k, v in dict(c.__dask_graph__()).items() if isinstance(v, LoadTask | RunTask)}


def reasons_of(collection) -> dict:
    from dask._task_spec import convert_legacy_graph

    dsk = convert_legacy_graph(dict(collection.optimize().__dask_graph__()))
    reasons: dict = {}
    graph_ids(dsk, reasons=reasons)
    return reasons


def assert_same(got, expected):
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    else:
        pd.testing.assert_series_equal(got, expected)


def hash_row(path) -> tuple | None:
    """The cache's row for ``path``: (ino, mtime_ns, sha256, hashed_ns)."""
    with sqlite3.connect(cache_path()) as conn:
        return conn.execute("SELECT ino, mtime_ns, sha256, hashed_ns FROM file_hashes WHERE path = ?",
                            (os.path.realpath(path),)).fetchone()


# -- read_parquet ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_read_parquet_same_values_and_a_rebuilt_pipeline_computes_nothing(tmp_path, name, scheduler):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"
    make = PIPELINES[name]
    expected = make(folder, tmp_path / "plain").compute(scheduler=scheduler)
    first = cached(make(folder, log))
    assert job_keys(first) and not reasons_of(make(folder, log))  # identified down to the files
    assert_same(first.compute(scheduler=scheduler), expected)
    assert sorted(runs(log)) == ["step0", "step10", "step20"]
    again = cached(make(folder, log))  # rebuilt from scratch
    assert_same(again.compute(scheduler=scheduler), expected)
    assert sorted(runs(log)) == ["step0", "step10", "step20"]


def test_rewriting_one_parquet_file_recomputes_only_its_partition(tmp_path):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"
    cached(stepped(folder, log).groupby("g").c.sum()).compute(scheduler="sync")
    assert sorted(runs(log)) == ["step0", "step10", "step20"]
    frame(1, scale=-3.0).to_parquet(folder / "part1.parquet")  # same shape, other values
    got = cached(stepped(folder, log).groupby("g").c.sum()).compute(scheduler="sync")
    assert sorted(runs(log)) == ["step0", "step10", "step10", "step20"]
    expected = stepped(folder, tmp_path / "plain").groupby("g").c.sum().compute(scheduler="sync")
    pd.testing.assert_series_equal(got, expected)
    assert got.tolist() != stepped(write_parquet(tmp_path / "old"), tmp_path / "plain") \
        .groupby("g").c.sum().compute(scheduler="sync").tolist()


def test_a_file_changed_after_cached_is_refused_never_recorded_under_its_old_content(tmp_path):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"
    old_values = stepped(folder, tmp_path / "plain").compute(scheduler="sync")
    pipeline = cached(stepped(folder, log))  # ids made from the files' content now
    frame(1, scale=-3.0).to_parquet(folder / "part1.parquet")  # rewritten before the compute
    with pytest.raises(InputChanged, match="part1.parquet changed since cached"):
        pipeline.compute(scheduler="sync")
    new = cached(stepped(folder, log)).compute(scheduler="sync")
    pd.testing.assert_frame_equal(new, stepped(folder, tmp_path / "plain").compute(scheduler="sync"))
    frame(1).to_parquet(folder / "part1.parquet")  # the old content back: its id must not serve new data
    pd.testing.assert_frame_equal(cached(stepped(folder, log)).compute(scheduler="sync"), old_values)


def test_identical_bytes_rewritten_still_hit_and_are_hashed_again(tmp_path):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"
    expected = cached(stepped(folder, log)).compute(scheduler="sync")
    target = folder / "part2.parquet"
    ino, mtime_ns, sha, hashed_ns = hash_row(target)
    data = target.read_bytes()
    time.sleep(0.01)
    (folder / "new").write_bytes(data)  # a new file (new inode, new mtime) with the same bytes
    os.replace(folder / "new", target)
    assert os.stat(target).st_ino != ino or os.stat(target).st_mtime_ns != mtime_ns
    pd.testing.assert_frame_equal(cached(stepped(folder, log)).compute(scheduler="sync"), expected)
    assert len(runs(log)) == 3  # a hit: the content is the same
    row = hash_row(target)
    assert row[:2] == (os.stat(target).st_ino, os.stat(target).st_mtime_ns)  # stamped anew ...
    assert row[2] == sha and row[3] > hashed_ns  # ... after hashing the file again


def test_a_copy_elsewhere_hits(tmp_path):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"
    expected = cached(stepped(folder, log)).compute(scheduler="sync")
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "copy")
    pd.testing.assert_frame_equal(cached(stepped(copy, log)).compute(scheduler="sync"), expected)
    assert len(runs(log)) == 3


def test_columns_and_filters_give_new_ids(tmp_path):
    folder, log = write_parquet(tmp_path / "pq"), tmp_path / "log"

    def reads(**kwargs):
        return dd.read_parquet(str(folder), **kwargs)

    variants = {
        "all": {},
        "columns": {"columns": ["a", "g"]},
        "filters": {"filters": [("a", ">", 12)]},
        "other filters": {"filters": [("a", ">", 13)]},
        "index": {"index": "a"},
        "dtype_backend": {"dtype_backend": "pyarrow"},
    }
    keys = {}
    for label, kwargs in variants.items():
        c = cached(reads(**kwargs))
        keys[label] = job_keys(c)
        assert keys[label], label
        pd.testing.assert_frame_equal(c.compute(scheduler="sync"), reads(**kwargs).compute(scheduler="sync"))
        assert job_keys(cached(reads(**kwargs))) == keys[label]  # stable
    labels = list(keys)
    for i, x in enumerate(labels):
        for y in labels[i + 1:]:
            assert not keys[x] & keys[y], (x, y)
    # a step after the read: other columns, other step ids
    cached(reads(columns=["a", "b", "g"]).map_partitions(step, str(log), meta=META)).compute(scheduler="sync")
    cached(reads(filters=[("a", ">", 12)]).map_partitions(step, str(log), meta=META)).compute(scheduler="sync")
    # the filtered read drops the first file (statistics), and its other partitions are new ids,
    # even that of the last file, whose rows are all kept
    assert sorted(runs(log)) == ["step0", "step10", "step13", "step20", "step20"]


def test_remote_files_are_left_uncached_with_the_reason(tmp_path, caplog):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"kachery-test-{os.getpid()}-{time.time_ns()}"
    try:
        for i in range(2):
            with fs.open(f"memory://{root}/part{i}.parquet", "wb") as fh:
                frame(i).to_parquet(fh)
        log = tmp_path / "log"

        def make(where):
            return dd.read_parquet(f"memory://{root}").map_partitions(step, str(where), meta=META)

        expected = make(tmp_path / "plain").compute(scheduler="sync")
        reasons = reasons_of(make(log))
        assert reasons and all(REMOTE in why for why in reasons.values())
        assert any(f"memory:///{root}/part0.parquet" in why for why in reasons.values())
        with caplog.at_level(logging.DEBUG, logger="kachery_tasks.dask"):
            for _ in range(2):
                pd.testing.assert_frame_equal(cached(make(log)).compute(scheduler="sync"), expected)
        assert any(REMOTE in r.message for r in caplog.records)
        assert len(runs(log)) == 4  # both partitions, both times
    finally:
        fs.rm(f"memory://{root}", recursive=True)


def test_a_missing_file_is_unidentifiable_not_an_error_of_ours(tmp_path):
    folder = write_parquet(tmp_path / "pq")
    x = dd.read_parquet(str(folder))
    (folder / "part1.parquet").unlink()  # after the plan listed it
    reasons = reasons_of(x)
    assert len(reasons) == 1 and "no such file" in next(iter(reasons.values()))


# -- read_csv --------------------------------------------------------------------------------------
def write_csv(folder, first_scale=1.0, second_scale=1.0):
    """Two files: a big one (several blocks) and a small one."""
    folder.mkdir(exist_ok=True)
    big = pd.concat([frame(i, first_scale) for i in range(40)], ignore_index=True)
    big.to_csv(folder / "f0.csv", index=False)
    frame(50, second_scale).to_csv(folder / "f1.csv", index=False)
    return folder


def csv_step(part, log):
    note(log, f"csv{part.a.iloc[0]}")
    return part.assign(c=part.a * 2 + part.b)


def csv_pipeline(folder, log, **kwargs):
    return dd.read_csv(str(folder / "*.csv"), blocksize=1000, **kwargs) \
        .map_partitions(csv_step, str(log), meta=META)


def test_read_csv_blocks_cached_rerun_and_a_changed_file(tmp_path):
    folder, log = write_csv(tmp_path / "csv"), tmp_path / "log"
    x = csv_pipeline(folder, log)
    assert x.npartitions >= 4  # f0 in several blocks
    expected = csv_pipeline(folder, tmp_path / "plain").groupby("g").c.sum().compute(scheduler="sync")
    assert not reasons_of(x)
    got = cached(x.groupby("g").c.sum()).compute(scheduler="sync")
    pd.testing.assert_series_equal(got, expected)
    first = sorted(runs(log))
    assert len(first) == x.npartitions
    pd.testing.assert_series_equal(cached(csv_pipeline(folder, log).groupby("g").c.sum())
                                   .compute(scheduler="threads"), expected)
    assert sorted(runs(log)) == first  # nothing computed again
    write_csv(folder, second_scale=-5.0)  # f1 only (f0 rewritten with the same bytes)
    got = cached(csv_pipeline(folder, log).groupby("g").c.sum()).compute(scheduler="sync")
    assert sorted(runs(log)) == sorted(first + ["csv500"])
    pd.testing.assert_series_equal(
        got, csv_pipeline(folder, tmp_path / "plain").groupby("g").c.sum().compute(scheduler="sync"))
    write_csv(folder, first_scale=-1.0, second_scale=-5.0)  # f0: all its blocks, and only them
    n = len(runs(log))
    got = cached(csv_pipeline(folder, log).groupby("g").c.sum()).compute(scheduler="sync")
    assert len(runs(log)) == n + x.npartitions - 1 and "csv500" not in runs(log)[n:]
    pd.testing.assert_series_equal(
        got, csv_pipeline(folder, tmp_path / "plain").groupby("g").c.sum().compute(scheduler="sync"))


def test_read_csv_copy_hits_unless_the_path_is_a_column(tmp_path):
    folder, log = write_csv(tmp_path / "csv"), tmp_path / "log"
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    cached(csv_pipeline(folder, log)).compute(scheduler="sync")
    n = len(runs(log))
    pd.testing.assert_frame_equal(cached(csv_pipeline(copy, log)).compute(scheduler="sync"),
                                  csv_pipeline(copy, tmp_path / "plain").compute(scheduler="sync"))
    assert len(runs(log)) == n  # the path is not in the id

    def with_path(where):  # the path is data here: each row carries it
        return dd.read_csv(str(where / "*.csv"), blocksize=1000, include_path_column=True)

    first = cached(with_path(folder))
    assert job_keys(first) and not job_keys(first) & job_keys(cached(with_path(copy)))
    got = cached(with_path(copy)).compute(scheduler="sync")
    pd.testing.assert_frame_equal(got, with_path(copy).compute(scheduler="sync"))
    assert set(got.path.astype(str)) == {str(copy / "f0.csv"), str(copy / "f1.csv")}


# -- content_sha256 --------------------------------------------------------------------------------
def test_content_sha256_is_the_sha256_of_the_bytes_and_served_by_stamp(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 * 2**20 + 17))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert content_sha256(path) == expected
    assert content_sha256(str(path)) == expected
    time.sleep(RACY_NS / 1e9 + 0.05)  # until a change would get another ctime than the file has
    content_sha256(path)  # hashed again (the first was racy), now trusted
    row = hash_row(path)
    assert content_sha256(path) == expected and hash_row(path) == row  # served, not hashed
    # same size, other bytes, and the old mtime forced back: the ctime still tells
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(b"X" * 16)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert content_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != expected


def test_content_sha256_of_a_file_being_written_is_never_kept_wrong(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(48 * 2**20))
    stop = threading.Event()

    def writer():
        with open(path, "r+b") as fh:
            i = 0
            while not stop.is_set():
                fh.seek((i * 7919 * 4096) % (48 * 2**20))
                fh.write(os.urandom(4096))
                fh.flush()
                i += 1
                time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = []
    try:
        for _ in range(3):
            try:
                outcomes.append(content_sha256(path))
            except UserError as exc:
                assert "changed while it was being hashed" in str(exc)
                outcomes.append(None)
    finally:
        stop.set()
        thread.join()
    assert None in outcomes  # it noticed the writes at least once
    assert content_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_content_sha256_in_a_read_only_home_creates_no_cache(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    ro_home = tmp_path / "ro"
    with config.set(home=str(ro_home), read_only=True):
        assert content_sha256(path) == hashlib.sha256(b"abc").hexdigest()
        assert not cache_path().exists()
    assert not ro_home.exists()


def test_content_sha256_refuses_what_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        content_sha256(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        content_sha256(tmp_path / "missing.parquet")
