"""The data engine: indexing results in, pixel-exact training labels out.

``ingest`` reads CrystFEL streams and DIALS stills results (and the images they refer to),
``peakdiff`` matches found peaks to predicted reflections and selects trustworthy frames,
``pvoigt`` fits pseudo-Voigt profiles and turns them into label masks, ``batch`` labels a batch of
frames into a part file, ``distributed`` runs batches on Ray, ``labels`` is the output format and
``run`` ties it together for the ``stream2labels`` command.  Heavy dependencies (lmfit, Ray,
DIALS, matplotlib) are imported only where used.
"""
from __future__ import annotations

from peaknet_xtal.labelling.peakdiff import FrameDiff, Selection, peakdiff
from peaknet_xtal.labelling.pvoigt import (
           FitOutcome,
           Window,
           extract_windows,
           fit_window,
           fit_windows,
)

__all__ = ["FitOutcome", "FrameDiff", "Selection", "Window", "extract_windows", "fit_window",
           "fit_windows", "peakdiff"]
