"""benchmarks/spot_shapes.py: the shape census reads a spot's side neighbours as they are drawn,
and counts only spots bright enough in photons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "spot_shapes.py")


@pytest.mark.parametrize("along, across, angle", [(0.8, 0.3, 0), (0.8, 0.3, 90), (0.5, 0.5, 0)])
def test_neighbours_read_the_drawn_widths(script, along, across, angle):
    panel = np.zeros((21, 21))
    panel[7:14, 7:14] = script.spot(100.0, along, across, angle)
    got = script.neighbours(panel + 5.0, 10, 10, 5.0)
    assert got == pytest.approx((np.exp(-0.5 / along ** 2), np.exp(-0.5 / across ** 2)))
    assert script.neighbours(panel + 5.0, 10, 11, 5.0) is None  # not the brightest pixel


@pytest.mark.parametrize("height, gain, counts", [
    (100.0, 3.0, True),  # about 50 sigmas, 33 photons
    (20.0, 1.0, False),  # about 10 sigmas: too low
    (2_000.0, 3.0, False),  # about 1,000 sigmas: above the census' range
    (100.0, 20.0, False),  # 5 photons at 20 ADU a photon
])
def test_a_spot_counts_only_high_in_sigmas_and_in_photons(script, height, gain, counts):
    background = np.random.default_rng(0).normal(100.0, 2.0, (31, 31))
    background[12:19, 12:19] += script.spot(height, 0.6, 0.3, 0)
    assert (script.counted(background, 15, 15, gain) is not None) == counts
