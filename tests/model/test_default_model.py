"""Acceptance tests of the shipped default model (``peaknet_xtal/model/weights/default.*``).

These check what the issue promises a user, on data the model never saw in training or
selection: held-out simulated frames, 30 on each of four real detectors (seeds far above any the
training script draws; see examples/train_default_model.py), and the real CSPAD stills.
Indexing the real stills through DIALS with these peaks is tested in
tests/plugins/test_dials_commands.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.evaluation.held_out import held_out_seeds, held_out_triples_by_detector
from peaknet_xtal.evaluation.metrics import bootstrap_f1, score_frames

WEIGHTS = Path(__file__).resolve().parents[2] / "peaknet_xtal" / "model" / "weights"

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
    """30 held-out clean hits on each of four detectors (issue 14's size of an acceptance set);
    the bar, F1 0.9 on strong reflections, is the one the earlier five-frame set had."""
    triples = held_out_triples_by_detector(engine, real_data / "crystfel_geometry")
    scores = {name: score_frames(found, cutoff=3.0) for name, found in triples.items()}
    for name, score in scores.items():
        print(name, score["overall"].to_dict(), "F1 95 %:", bootstrap_f1(score["frames"]))
    overall, frames = scores["all"]["overall"], scores["all"]["frames"]
    assert len(frames) == sum(len(v) for v in held_out_seeds().values()) >= 120
    assert overall.n_true > 1000
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
