"""Frame finders the pipeline workers can run, built lazily inside each worker process.

A frame finder is anything with ``find_frames(frames) -> Iterable[FrameResult]``; the default is the
PeakNet :class:`~peaknet_xtal.finding.engine.InferenceEngine`.  :class:`LocalMaxFinder` is a
plain threshold + local-maximum finder: it exists so that tests and benchmarks of the *pipeline
mechanics* (queues, leases, faults, throughput overhead) run in seconds on CPU, where model quality
is irrelevant.  It is a real finder, so the results it writes are real peak tables.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from peaknet_xtal.types import Frame, FrameResult, peaks_from_columns


class LocalMaxFinder:
    """Pixels above ``threshold`` that are the maximum of their 3x3 neighbourhood are peaks.

    ``delay_s`` adds a fixed cost per frame, standing in for a model's compute time in tests that
    need a batch to be in flight long enough to kill the worker holding it.
    """

    def __init__(self, threshold: float = 50.0, delay_s: float = 0.0) -> None:
        self.threshold = float(threshold)
        self.delay_s = float(delay_s)

    def _panel_peaks(self, index: int, panel: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        from scipy.ndimage import maximum_filter

        data = np.where(mask, panel, 0.0) if mask is not None else panel
        is_max = (data >= self.threshold) & (data == maximum_filter(data, size=3))
        ss, fs = np.nonzero(is_max)
        values = data[ss, fs].astype(np.float64)
        return peaks_from_columns(panel=np.full(len(ss), index, dtype=np.int32),
                                  fs=fs.astype(np.float64), ss=ss.astype(np.float64),
                                  intensity=values, max_value=values,
                                  npix=np.ones(len(ss), dtype=np.int32))

    def find_frames(self, frames: Iterable[Frame]) -> Iterator[FrameResult]:
        for frame in frames:
            if self.delay_s:
                time.sleep(self.delay_s)
            masks: list[np.ndarray | None] = (list(frame.masks) if frame.masks
                                              else [None] * len(frame.panels))
            tables = [self._panel_peaks(i, p, m)
                      for i, (p, m) in enumerate(zip(frame.panels, masks, strict=False))]
            peaks = np.concatenate(tables) if tables else peaks_from_columns()
            yield FrameResult(frame=frame, peaks=peaks, hit=len(peaks) > 0)


def build_frame_finder(spec: Any, options: dict[str, Any]) -> Any:
    """Make the frame finder a worker runs: ``"engine"``, ``"localmax"`` or a picklable factory.

    Called inside the worker, so the model is loaded where it runs and never shipped through the
    object store.
    """
    if callable(spec) and not isinstance(spec, str):
        return spec(**options)
    if spec in (None, "engine"):
        from peaknet_xtal.finding.engine import InferenceEngine

        return InferenceEngine(**options)
    if spec == "localmax":
        return LocalMaxFinder(**options)
    raise ValueError(f"unknown frame finder {spec!r}: use 'engine', 'localmax' or a factory "
                     "callable")


FrameFinderFactory = Callable[..., Any]
