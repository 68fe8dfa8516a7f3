"""The held-out simulated frames a default peak model is accepted on.

Randomised hits (``SimConfig.randomised``: backgrounds, gains 1-30 ADU/photon, water rings, read
noise, defects) on three real detector geometries, with seeds far above any that
examples/train_default_model.py draws for its bank (20240) or its model-selection frames
(2,000,000,001+): acceptance data only.  tests/model/test_default_model.py holds the shipped
model to them, and benchmarks/compare_default_models.py puts two models side by side on them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

#: geometry file (of ../shared/data/real/crystfel_geometry) -> seeds of held-out frames
HELD_OUT: dict[str, tuple[int, ...]] = {
    "om_lcls_mfx_epix10k2M.geom": (3_000_000_001, 3_000_000_002),
    "crystfel_doc_cspad-cxiformat.geom": (3_000_000_011, 3_000_000_012),
    "om_lcls_rayonix.geom": (3_000_000_021,),
}


def held_out_triples(engine: Any, geometries: str | os.PathLike[str]
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(found, strong reflections, all reflections)`` per held-out frame, found by ``engine``
    (an :class:`~peaknet_xtal.finding.InferenceEngine`), for
    :func:`~peaknet_xtal.evaluation.metrics.score_frames`."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    triples = []
    for name, seeds in HELD_OUT.items():
        geometry = read_geometry(Path(geometries) / name)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            config = SimConfig.randomised(rng, hit_probability=1.0,
                                          adu_per_photon=float(rng.uniform(1, 30)))
            frame, truth = simulate_frame(geometry, seed, config)
            found = next(iter(engine.find_frames([frame]))).peaks
            refl = truth.reflections
            triples.append((found, refl[refl["strong"]], refl))
    return triples
