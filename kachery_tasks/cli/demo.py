"""``kachery demo``: the main job on embedded defaults (no servers, no accounts).

Runs the cached signal-processing batch of :mod:`kachery_tasks.demo` three times on a local
``distributed`` cluster and prints what each run computed, loaded and pruned; then a second node
(a home of its own) that shares a directory bucket with the first reruns the batch and computes
nothing: it loads the first node's published results, verified and signed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import click

from .. import config
from ..identity import node_identity
from .output import print_table, stdout_console


@click.command("demo")
@click.option("--recordings", type=click.IntRange(1, 200), default=8, show_default=True,
              help="Number of synthetic recordings in the batch.")
@click.option("--duration", type=click.FloatRange(0.5, 600), default=30.0, show_default=True,
              help="Seconds of 16-channel, 30 kHz data per recording.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--keep", is_flag=True,
              help="Run in the configured home and keep the results there (they persist across demos), "
                   "instead of a fresh temporary home that is deleted at the end.")
def demo(recordings: int, duration: float, workers: int, keep: bool) -> None:
    """Run a cached batch pipeline three times (first, again: all cached, one parameter changed),
    then on a second node that shares a bucket with the first (it computes nothing).

    By default the demo works in a fresh temporary home, printed at the start and deleted at the
    end (the last line says so). With --keep it runs in the configured home and its results stay.
    The second node and the shared directory bucket are temporary either way.
    """
    console = stdout_console()
    home = str(config.home()) if keep else tempfile.mkdtemp(prefix="kachery-demo-")
    shared = tempfile.mkdtemp(prefix="kachery-demo-lab-")  # the second node's home and the bucket
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="distributed")
    try:
        reports = _runs(console, home, shared, recordings, duration, workers)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    rows = [{"run": r.label, "computed": r.computed, "loaded": r.loaded, "pruned": r.pruned,
             "wall_s": round(r.wall_s, 3)} for r in reports]
    print_table(rows, ["run", "computed", "loaded", "pruned", "wall_s"], title="kachery demo")
    first, again = reports[0].wall_s, reports[1].wall_s
    console.print(f"rerun {first / again:.0f}x faster than the first run; "
                  f"the changed parameter recomputed {reports[2].computed} task(s); "
                  f"the second node computed {reports[3].computed} and loaded {reports[3].loaded} "
                  "from the shared bucket")
    print_table(reports[2].summaries[:4], ["recording", "events", "busiest_channel", "mean_amplitude"],
                title="summaries (first 4)")
    if keep:
        console.print(f"results kept in {home}")
    else:  # the home was printed at the start: say that it is gone, and how to keep one
        console.print(f"removed the demo's temporary home {home}; "
                      f"run `kachery demo --keep` to keep the results (in {config.home()})")


def _runs(console, home: str, shared: str, recordings: int, duration: float, workers: int) -> list:
    # here, not at the top: every `kachery` command would otherwise pay for importing distributed
    from distributed import Client, LocalCluster

    from ..dask import KacheryPlugin
    from ..demo import run_batch

    bucket_dir = Path(shared) / "bucket"
    bucket_dir.mkdir()
    bucket = bucket_dir.as_uri()
    second_home = str(Path(shared) / "second-node")
    console.print(f"home: {home}")
    console.print(f"batch: {recordings} recordings x {duration:g} s x 16 channels; "
                  f"{workers} workers on a distributed.LocalCluster; results published to {bucket}")
    reports = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        with config.set(home=home, bucket=bucket, publish=True):
            client.register_plugin(KacheryPlugin(home=home))
            changed = {0: 4.0}  # one recording's detection threshold
            for label, thresholds in (("first run", {}), ("run again", {}), ("threshold of rec00 changed", changed)):
                with console.status(f"{label} ..."):
                    reports.append(run_batch(client, label, recordings, thresholds, duration))
                console.print(f"{label}: {reports[-1].wall_s:.2f} s")
            first_node = node_identity(config.home()).node_id
        # a second node: a home of its own, the same bucket, trusting the first node's signature
        with config.set(home=second_home, bucket=bucket, trusted_nodes=[first_node], publish=False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # replacing the first node's plugin
                client.register_plugin(KacheryPlugin(home=second_home))
            label = "second node, shared bucket"
            with console.status(f"{label} ..."):
                reports.append(run_batch(client, label, recordings, {}, duration))
            console.print(f"{label}: {reports[-1].wall_s:.2f} s (home {second_home})")
    return reports
