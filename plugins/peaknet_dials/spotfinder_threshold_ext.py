"""DIALS spot-finding threshold extension (work in progress)."""
from __future__ import annotations


class PeakNetSpotFinderThresholdExt:
    """PeakNet learned Bragg peak segmentation as a DIALS spot-finding threshold."""

    name = "peaknet"

    @staticmethod
    def phil():
        return None

    def __init__(self, params):
        self.params = params

    def compute_threshold(self, image, mask, **kwargs):
        raise NotImplementedError("peaknet threshold is not implemented yet")
