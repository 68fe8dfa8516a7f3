"""Inference: segmentation -> peaks (:mod:`.peaks`), the shared engine (:mod:`.engine`) and the
``PeakFinder`` API (:mod:`.api`).  Importing this package is cheap: torch loads on first use."""
from __future__ import annotations

from .api import PeakFinder
from .engine import InferenceEngine
from .peaks import PeakParams, find_peaks, is_hit

__all__ = ["InferenceEngine", "PeakFinder", "PeakParams", "find_peaks", "is_hit"]
