"""Frame finders the pipeline workers can run, built lazily inside each worker process.

A frame finder is anything with ``find_frames(frames) -> Iterable[FrameResult]``; the default is
the PeakNet :class:`~peaknet_xtal.finding.engine.InferenceEngine`; any picklable factory returning
such an object works too (the tests pass a plain local-maximum finder that way).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def build_frame_finder(spec: Any, options: dict[str, Any]) -> Any:
    """Make the frame finder a worker runs: ``"engine"`` or a picklable factory.

    Called inside the worker, so the model is loaded where it runs and never shipped through the
    object store.
    """
    if callable(spec) and not isinstance(spec, str):
        return spec(**options)
    if spec in (None, "engine"):
        from peaknet_xtal.finding.engine import InferenceEngine

        return InferenceEngine(**options)
    raise ValueError(f"unknown frame finder {spec!r}: use 'engine' or a factory callable")


FrameFinderFactory = Callable[..., Any]
