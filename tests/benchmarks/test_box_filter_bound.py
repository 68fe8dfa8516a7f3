"""benchmarks/box_filter_bound.py: its box significance (spots stand out on strong correlated
backgrounds, noise does not), and its counting (false peaks per blank frame, not per panel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "box_filter_bound.py")


def _strong_correlated_background(rng: np.random.Generator, shape=(256, 256)) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    noise = gaussian_filter(rng.standard_normal(shape), 0.7)
    return 2500 + 1000 * np.sin(xx / 90.0) + 4 * yy + 33 * noise / noise.std()


@pytest.mark.parametrize("estimate", ["median", "model"])
def test_a_spot_stands_out_and_correlated_noise_does_not(script, estimate):
    """A 2 x 2 spot of 1,200 ADU (about 12 times the spread of a 2 x 2 sum of this noise) on a
    strong background with a 1,000-ADU wave, a ramp and blurred noise: its box significance is
    near 12, and nothing the noise makes comes near it (a pixel-scale significance, blind to
    the correlation, would put the noise's 2 x 2 and 3 x 3 sums at 1.5-2 times their real
    size)."""
    rng = np.random.default_rng(0)
    image = _strong_correlated_background(rng)
    quiet = script.significance(image, None, estimate)
    spotted = image.copy()
    spotted[100:102, 120:122] += 300.0
    sig = script.significance(spotted, None, estimate)
    assert sig[99:103, 119:123].max() > 10.0
    assert quiet.max() < 7.0
    peaks = script.peaks_above(sig, 7.0)
    got, _ = script._matched(peaks, np.array([[100.5, 120.5]]))
    assert len(peaks) == 1 and got.all()


def test_false_peaks_are_counted_per_blank_frame_over_its_panels(script):
    sig = np.zeros((20, 20))
    sig[5, 5] = 10.0
    tally = script.Tally()
    nothing = np.zeros((0, 2))
    tally.add(False, [(sig, nothing, nothing), (sig, nothing, nothing)])
    tally.add(True, [(sig, np.array([[5.0, 6.0]]), np.array([[5.0, 6.0], [15.0, 15.0]]))])
    rows = {t: (fp, recall, precision) for t, fp, recall, precision in tally.rows()}
    assert rows[5.0] == (2.0, 1.0, 1.0)  # two panels of one blank: two false peaks per blank
    assert rows[script.THRESHOLDS[-1]][0] == 2.0  # 10 stands above every threshold swept
