"""peaknet-xtal: a learned Bragg peak finder for serial crystallography.

The package is laid out by architecture:

- ``io``        one file format per module (``read_*`` / ``write_*``)
- ``sim``       still-diffraction simulator with exact ground truth
- ``models``    PeakNet family (ConvNeXtV2 backbone + BiFPN neck + two-pathway head)
- ``layers``    building blocks shared by the models
- ``training``  supervised training and distillation
- ``engine``    data engine: stream ingestion, PeakDiff matching, pseudo-Voigt labels
- ``inference`` segmentation -> peaks, the inference engine, the Ray pipeline
- ``cli``       thin command-line entry points
"""
from __future__ import annotations

__version__ = "0.1.0"
