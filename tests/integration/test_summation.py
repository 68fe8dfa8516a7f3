"""Summation: unbiased with honest sigma on spots drawn from a known model."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.integration.shoebox import Shoeboxes
from peaknet_xtal.integration.summation import foreground_mask, summation


def _boxes(n: int, photons: float, background: float, rng: np.random.Generator) -> Shoeboxes:
    side = 15
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    profile = np.exp(-0.5 * (xx ** 2 + yy ** 2) / 1.3 ** 2)
    profile[~foreground_mask(side, 5)] = 0
    profile /= profile.sum()
    pixels = rng.poisson(photons * profile + background, size=(n, side, side)).astype(np.float32)
    zeros = np.zeros(n)
    return Shoeboxes(pixels, np.ones(pixels.shape, bool), zeros.astype(np.int32), zeros, zeros,
                     zeros, np.zeros((n, 2), np.float32), np.ones(n), np.zeros(n, np.float32))


@pytest.mark.parametrize("photons,background", [(0.0, 0.3), (30.0, 1.0), (2000.0, 0.1)])
def test_unbiased_and_calibrated(photons, background):
    boxes = _boxes(4000, photons, background, np.random.default_rng(5))
    out = summation(boxes)
    z = (out["photons"] - photons) / out["photons_sigma"]
    # 4000 draws: the mean of z has a standard error of 0.016, its spread about 0.011
    assert abs(z.mean()) < 0.08
    assert 0.93 < z.std() < 1.07
    assert np.mean(out["background"]) == pytest.approx(background, rel=0.05)


def test_no_background_ring_gives_nan():
    boxes = _boxes(2, 10.0, 0.1, np.random.default_rng(0))
    boxes.mask[:] = foreground_mask(15, 5)
    assert np.isnan(summation(boxes)["photons"]).all()
    with pytest.raises(ValueError):
        foreground_mask(15, 7)
