"""Still-diffraction simulator with exact ground truth (issue 3).

``frame, truth = simulate_frame(geometry, seed, SimConfig(...))`` simulates one XFEL still on any
CrystFEL geometry; :mod:`peaknet_xtal.sim.output` writes CXI stacks, truth, streams and geometry.
"""
from __future__ import annotations

from peaknet_xtal.sim.config import (
    PHOTON_COUNTING,
    SimConfig,
    sharp_spot_settings,
    whole_counts,
)
from peaknet_xtal.sim.crystal import PRESET_CELLS, Cell
from peaknet_xtal.sim.simulate import REFLECTION_DTYPE, CrystalTruth, SimTruth, simulate_frame

__all__ = ["SimConfig", "SimTruth", "CrystalTruth", "Cell", "PRESET_CELLS", "REFLECTION_DTYPE",
           "simulate_frame", "PHOTON_COUNTING", "whole_counts", "sharp_spot_settings"]
