"""Inference: segmentation -> peaks (:mod:`.peaks`), the shared engine (:mod:`.engine`) and the
``PeakFinder`` API (:mod:`.api`).  Importing this package is cheap: torch loads on first use."""
from __future__ import annotations

from peaknet_xtal.finding.api import PeakFinder
from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.finding.peaks import PeakParams, find_peaks, is_hit

__all__ = ["InferenceEngine", "PeakFinder", "PeakParams", "find_peaks", "is_hit"]
