"""benchmarks/selection_recall.py: its recall bins, and its ``--decorrelate`` diagnosis leaving
uncorrelated noise alone while shrinking spatially correlated noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peaknet_test_support import load_script
from scipy.ndimage import gaussian_filter

from peaknet_xtal.model import create_model
from peaknet_xtal.model.peaknet import PeakNet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "selection_recall.py")


def test_recall_by_bins_counts_each_reflection_once(script):
    values = np.array([5.0, 7.0, 12.0, 60.0, 3.0])
    hit = np.array([True, False, True, True, True])
    out = script._recall_by(values, hit, (5, 10, 20, 50, 1e9))
    assert out["5-10"] == (0.5, 2)
    assert out["10-20"] == (1.0, 1)
    assert out[">50"] == (1.0, 1)
    assert np.isnan(out["20-50"][0]) and out["20-50"][1] == 0
    assert sum(n for _, n in out.values()) == 4  # 3.0 lies below every bin


def _spread(model: PeakNet, image: np.ndarray) -> float:
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    with torch.no_grad():
        z = model.normalise(x, torch.ones_like(x, dtype=torch.bool))
    return float(torch.sinh(z).std())


def test_decorrelate_shrinks_correlated_noise_only(script, monkeypatch):
    monkeypatch.setattr(PeakNet, "normalise", PeakNet.normalise)  # restored after the test
    model = create_model("swift").eval()
    rng = np.random.default_rng(0)
    white = 3000 + 30 * rng.standard_normal((256, 256))
    blurred = gaussian_filter(rng.standard_normal((256, 256)), 0.8)
    blurred = 3000 + 30 * blurred / blurred.std()
    before = [_spread(model, white), _spread(model, blurred)]
    script.decorrelate_input()
    after = [_spread(model, white), _spread(model, blurred)]
    assert after[0] == pytest.approx(before[0], rel=0.1)
    assert after[1] < before[1] / 1.3
