"""Evaluation: run several peak finders on one data set and report what a user needs to trust one.

- :mod:`.finders`  PeakNet models, peakfinder8 and DIALS' dispersion finder behind one interface;
- :mod:`.tuning`   grid search for the classic finders on a set with truth (fair baselines);
- :mod:`.indexing` hit rate, indexing rate and yield through DIALS stills indexing;
- :mod:`.report`   Markdown + PNG + JSON report.
"""
from __future__ import annotations

from peaknet_xtal.evaluation.finders import FINDERS, Finder, create_finder, list_finders

__all__ = ["FINDERS", "Finder", "create_finder", "list_finders"]
