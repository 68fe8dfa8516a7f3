"""The held-out simulated frames a default peak model is accepted on.

Randomised clean hits (``SimConfig.randomised``: backgrounds, gains 1-30 ADU/photon, water
rings, read noise, defects), :data:`FRAMES_PER_DETECTOR` on each of four real detector
geometries (issue 14 asks for at least 30 frames a detector), with seeds far above any that
examples/train_default_model.py draws for its bank (20240) or its model-selection frames
(2,000,000,001+): acceptance data only.  tests/model/test_default_model.py holds the shipped model
to them and benchmarks/compare_default_models.py puts models side by side on them, per detector
with bootstrap intervals.

The seeds were fixed before any model was measured on these frames.  (An earlier acceptance set of
five frames, seeds 3,000,000,001-3,000,000,021, was too small to tell two models apart: its
bootstrap interval spanned 0.2 of F1.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

#: first seed of the held-out frames, minus one: frame i (from 1) of the detector at place k of
#: :data:`DETECTORS` has seed ``SEED_BASE + 1,000 x k + i``
SEED_BASE = 3_000_100_000
#: geometry files (of ../shared/data/real/crystfel_geometry) of the held-out detectors
DETECTORS = ("om_lcls_mfx_epix10k2M.geom", "crystfel_doc_cspad-cxiformat.geom",
             "om_lcls_rayonix.geom", "om_lcls_cxi_jungfrau4M.geom")
FRAMES_PER_DETECTOR = 30


def held_out_seeds(per_detector: int = FRAMES_PER_DETECTOR) -> dict[str, tuple[int, ...]]:
    """Geometry file -> seeds of the held-out frames, the first ``per_detector`` of each."""
    if not 1 <= per_detector < 1_000:
        raise ValueError(f"per_detector must be 1-999, got {per_detector}")
    return {name: tuple(SEED_BASE + 1_000 * k + i + 1 for i in range(per_detector))
            for k, name in enumerate(DETECTORS)}


def held_out_triples(engine: Any, geometries: str | os.PathLike[str],
                     seeds_by_geometry: dict[str, tuple[int, ...]] | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(found, strong reflections, all reflections)`` per held-out frame (all of
    :func:`held_out_seeds`, or ``seeds_by_geometry``), found by ``engine`` (an
    :class:`~peaknet_xtal.finding.InferenceEngine`), for
    :func:`~peaknet_xtal.evaluation.metrics.score_frames`.  Each detector's frames are a run of
    their own (``engine.new_run()``), as ``peaknet2cxi`` would see them: what the engine learns
    over a run (pixel defects, a measured gain) never carries from one detector to the next."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    triples = []
    for name, seeds in (held_out_seeds() if seeds_by_geometry is None
                        else seeds_by_geometry).items():
        geometry = read_geometry(Path(geometries) / name)
        engine.new_run()
        for seed in seeds:
            rng = np.random.default_rng(seed)
            config = SimConfig.randomised(rng, hit_probability=1.0,
                                          adu_per_photon=float(rng.uniform(1, 30)))
            frame, truth = simulate_frame(geometry, seed, config)
            found = next(iter(engine.find_frames([frame]))).peaks
            refl = truth.reflections
            triples.append((found, refl[refl["strong"]], refl))
    return triples


def held_out_triples_by_detector(engine: Any, geometries: str | os.PathLike[str],
                                 per_detector: int = FRAMES_PER_DETECTOR
                                 ) -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """:func:`held_out_triples` per held-out detector (geometry file name), the first
    ``per_detector`` frames of each, plus ``"all"``: every frame, detectors in order."""
    by_detector = {name: held_out_triples(engine, geometries, {name: seeds})
                   for name, seeds in held_out_seeds(per_detector).items()}
    by_detector["all"] = [t for triples in list(by_detector.values()) for t in triples]
    return by_detector
