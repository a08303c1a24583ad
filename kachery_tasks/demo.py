"""The main job: a batch signal-processing pipeline, cached, on a ``distributed.LocalCluster``.

Synthetic multichannel recordings are generated, band-pass filtered, searched for events, turned
into features and summarized; every stage is a ``@pure`` task, so the graph Dask runs is keyed by
task ids and pruned of everything already in the store. ``kachery demo`` runs the batch three times:
first (everything computes), again (everything loads), and with one detection threshold changed (only
that branch recomputes), and prints what each run did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from .dask import stats
from .tasks import pure

SAMPLE_RATE = 30_000.0


@pure
def make_recording(seed: int, num_channels: int = 16, duration_s: float = 10.0) -> np.ndarray:
    """Noise plus spikes of a few units at random times, as float32 (channels × samples)."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * SAMPLE_RATE)
    data = rng.normal(0.0, 10.0, size=(num_channels, n)).astype(np.float32)
    shape = -80.0 * np.exp(-0.5 * ((np.arange(60) - 20) / 4.0) ** 2)
    for unit in range(6):
        channel = rng.integers(num_channels)
        times = np.sort(rng.integers(0, n - 60, size=int(8 * duration_s)))
        for t in times:
            data[channel, t : t + 60] += shape * (0.6 + 0.1 * unit)
    return data


@pure
def bandpass(recording: np.ndarray, low_hz: float = 300.0, high_hz: float = 6000.0) -> np.ndarray:
    """An ideal band-pass filter in the frequency domain, per channel."""
    spectrum = np.fft.rfft(recording, axis=1)
    freqs = np.fft.rfftfreq(recording.shape[1], d=1.0 / SAMPLE_RATE)
    spectrum[:, (freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, n=recording.shape[1], axis=1).astype(np.float32)


@pure
def detect_events(filtered: np.ndarray, threshold: float = 5.0) -> np.ndarray:
    """Negative threshold crossings at ``threshold`` robust standard deviations: (channel, sample)."""
    noise = np.median(np.abs(filtered), axis=1, keepdims=True) / 0.6745
    below = filtered < -threshold * noise
    onsets = below[:, 1:] & ~below[:, :-1]
    channels, samples = np.nonzero(onsets)
    return np.stack([channels, samples + 1], axis=1).astype(np.int64)


@pure
def extract_features(filtered: np.ndarray, events: np.ndarray, window: int = 40) -> np.ndarray:
    """Peak amplitude, trough-to-peak width and energy of each event's waveform."""
    n = filtered.shape[1]
    features = np.zeros((len(events), 3), dtype=np.float64)
    for i, (channel, sample) in enumerate(events):
        start, stop = max(0, sample - window // 2), min(n, sample + window)
        wave = filtered[channel, start:stop]
        features[i] = (wave.min(), int(np.argmax(wave)) - int(np.argmin(wave)), float(np.sum(wave.astype(np.float64) ** 2)))
    return features


@pure
def summarize(name: str, events: np.ndarray, features: np.ndarray) -> dict[str, Any]:
    """Per recording: number of events, events per channel, mean amplitude."""
    per_channel = np.bincount(events[:, 0], minlength=1) if len(events) else np.zeros(1, dtype=np.int64)
    return {
        "recording": name,
        "events": int(len(events)),
        "busiest_channel": int(np.argmax(per_channel)),
        "mean_amplitude": round(float(features[:, 0].mean()), 3) if len(features) else 0.0,
    }


def pipeline(num_recordings: int, thresholds: dict[int, float], duration_s: float) -> list:
    """The batch as Dask delayed objects keyed by task id (nothing runs here)."""
    outputs = []
    for seed in range(num_recordings):
        recording = make_recording.delayed(seed, 16, duration_s)
        filtered = bandpass.delayed(recording, 300.0, 6000.0)
        events = detect_events.delayed(filtered, thresholds.get(seed, 5.0))
        features = extract_features.delayed(filtered, events, 40)
        outputs.append(summarize.delayed(f"rec{seed:02d}", events, features))
    return outputs


@dataclass
class RunReport:
    label: str
    computed: int
    loaded: int
    pruned: int
    wall_s: float
    summaries: list[dict[str, Any]]


def run_batch(client: Any, label: str, num_recordings: int, thresholds: dict[int, float],
              duration_s: float) -> RunReport:
    before = stats(client)
    started = time.perf_counter()
    (summaries,) = dask.compute(pipeline(num_recordings, thresholds, duration_s))
    wall = time.perf_counter() - started
    after = stats(client)
    return RunReport(label, after["misses"] - before["misses"], after["hits"] - before["hits"],
                     after["pruned"] - before["pruned"], wall, list(summaries))
