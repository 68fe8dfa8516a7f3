"""Acceptance tests of the shipped default model (``peaknet_xtal/model/weights/default.*``).

These check what the issue promises a user, on data the model never saw in training:
held-out simulated frames on three real detectors (seeds far above any the training script
draws; see examples/train_default_model.py), and the real CSPAD stills.  Indexing the real stills
through DIALS with these peaks is tested in tests/plugins/test_dials_commands.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.evaluation.metrics import score_frames

WEIGHTS = Path(__file__).resolve().parents[2] / "peaknet_xtal" / "model" / "weights"
HELD_OUT = {  # geometry file -> seeds of held-out frames
    "om_lcls_mfx_epix10k2M.geom": (3_000_000_001, 3_000_000_002),
    "crystfel_doc_cspad-cxiformat.geom": (3_000_000_011, 3_000_000_012),
    "om_lcls_rayonix.geom": (3_000_000_021,),
}


def test_default_weights_ship_small():
    weights = WEIGHTS / "default.safetensors"
    assert weights.exists(), "the trained default model must ship inside the package"
    assert (WEIGHTS / "default.json").exists()
    assert weights.stat().st_size < 8e6


@pytest.fixture(scope="module")
def engine():
    from peaknet_xtal.finding import InferenceEngine

    return InferenceEngine("default", device="cpu", threads=2)


@pytest.mark.slow
def test_held_out_simulated_frames_reach_f1_0_9(real_data: Path, engine):
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    triples = []
    for name, seeds in HELD_OUT.items():
        geometry = read_geometry(real_data / "crystfel_geometry" / name)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            config = SimConfig.randomised(rng, hit_probability=1.0,
                                          adu_per_photon=float(rng.uniform(1, 30)))
            frame, truth = simulate_frame(geometry, seed, config)
            found = next(iter(engine.find_frames([frame]))).peaks
            refl = truth.reflections
            triples.append((found, refl[refl["strong"]], refl))
    overall = score_frames(triples, cutoff=3.0)["overall"]
    assert overall.n_true > 100
    print(overall.to_dict())
    assert overall.f1 >= 0.9, overall.to_dict()
    assert overall.median_error_px < 0.7


def test_real_cspad_stills_give_a_plausible_peak_count(real_data: Path, engine):
    """No parameter changed: a real hit has some tens to a few hundred Bragg peaks, not noise."""
    from peaknet_xtal.formats.dxtbx_images import read_dxtbx_image

    for path in sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf")):
        frame = read_dxtbx_image(path)
        peaks = next(iter(engine.find_frames([frame]))).peaks
        assert 30 <= len(peaks) <= 600, (path.name, len(peaks))
        assert np.nanmedian(peaks["snr"]) > 3, path.name
