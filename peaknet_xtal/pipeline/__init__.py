"""Ray producer-consumer inference: sources -> bounded frame queue -> model workers -> writers.

``run_pipeline(config)`` is the entry point (``peaknet2cxi --workers N [--address A]`` calls it);
see :mod:`.driver` for the guarantees (back-pressure, exactly-once output, Ctrl-C, resume).
"""
from __future__ import annotations

from peaknet_xtal.pipeline.driver import DEFAULTS, PipelineError, run_pipeline

__all__ = ["DEFAULTS", "PipelineError", "run_pipeline"]
