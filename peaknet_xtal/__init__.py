"""peaknet-xtal: a learned Bragg peak finder for serial crystallography.

One concept per place:

- ``formats``     one file format per module (``read_*`` / ``write_*``): CXI, CrystFEL geometry
                  and streams, DIALS tables, dxtbx images; HDF5 compression filters
- ``sim``         still-diffraction simulator with exact ground truth
- ``model``       PeakNet architectures registered by name (``create_model``), their layers and
                  the shipped default weights
- ``finding``     normalise -> tile -> model -> peaks: the one finding pipeline every adapter
                  composes (``InferenceEngine``, ``PeakFinder``, the shared defaults)
- ``pipeline``    the Ray producer-consumer inference pipeline
- ``labelling``   the data engine: streams or DIALS results -> PeakDiff -> pseudo-Voigt labels
- ``training``    supervised training and distillation
- ``evaluation``  finders side by side, metrics and reports
- ``integration`` photons per spot: the variational integrator beside summation
- ``builtin``     built-in sources and writers, registered through the plugin hooks
  (``hookspecs``, ``registry``)
- ``cli``         thin command-line entry points
"""
from __future__ import annotations

__version__ = "0.1.0"
