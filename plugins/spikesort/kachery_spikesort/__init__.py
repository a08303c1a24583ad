"""kachery-spikesort: batch spike sorting with spikeinterface as cached pure kachery tasks on Dask.

Stages (pure tasks): :func:`generate_recording`, :func:`recording_file`, :func:`preprocess`,
:func:`sort`, :func:`compare`, :func:`quality_metrics`, :func:`summarize`, and the batch's figure,
:func:`accuracy_figure`. Batches:
:func:`kachery_spikesort.batch.run_batch` and ``python -m kachery_spikesort batch CONFIG.yaml``.
See docs/spikesort.md.
"""

from .handles import RecordingRef, SortingRef
from .outputs import accuracy_figure
from .packing import pack_folder, unpacked_folder
from .seeding import seeded_numpy
from .stages import (
    compare,
    generate_recording,
    preprocess,
    quality_metrics,
    recording_file,
    sort,
    summarize,
)

__all__ = [
    "RecordingRef",
    "SortingRef",
    "accuracy_figure",
    "compare",
    "generate_recording",
    "pack_folder",
    "preprocess",
    "quality_metrics",
    "recording_file",
    "seeded_numpy",
    "sort",
    "summarize",
    "unpacked_folder",
]
