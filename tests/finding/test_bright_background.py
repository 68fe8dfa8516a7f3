"""The peak decision on bright backgrounds (finding/bright_background.py) and its place in
``find_peaks``: where the background holds many photons a pixel, a box significance region the
network does not reject is a peak; elsewhere, and without a gain, the network's threshold alone."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from peaknet_xtal.finding.bright_background import (
    MEDIAN_SAMPLE,
    box_significance,
    box_sums,
    bright_pixels,
    exact_median,
    foreground_and_bright,
)
from peaknet_xtal.finding.peaks import PeakParams, find_peaks
from peaknet_xtal.sim.artifacts import correlated_noise

SHAPE = (128, 160)
SPOT = (40, 50)  # a real spot the network doubts (probability 0.35)
BLOB = (90, 110)  # nothing there, but the network says 0.6
EDGE = (60, 130)  # a sharp bright feature the network rejects (probability 0.05)


def bright_panel(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2,500-3,500 ADU ramp with 33 ADU of correlated noise (the strong-background Rayonix's
    statistics) and one 400-ADU spot at SPOT and one at EDGE; a probability map with the network's
    doubts described at the top of the module."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    image = 2500.0 + 1000.0 * xx / SHAPE[1] + 33.0 * correlated_noise(rng, SHAPE, 0.6)
    prob = np.full(SHAPE, 0.02)
    for (y, x), p in ((SPOT, 0.35), (EDGE, 0.05)):
        image += 400.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 0.8 ** 2))
        prob[y - 1:y + 2, x - 1:x + 2] = p
    prob[BLOB[0] - 1:BLOB[0] + 1, BLOB[1] - 1:BLOB[1] + 1] = 0.6
    return image, prob


def near(peaks: np.ndarray, where: tuple[int, int]) -> bool:
    return bool(np.any(np.hypot(peaks["ss"] - where[0], peaks["fs"] - where[1]) < 2))


def test_on_a_bright_background_significance_decides_with_the_network():
    image, prob = bright_panel()
    peaks = find_peaks([image], [prob], None, PeakParams(adu_per_photon=1.0, min_snr=0))
    assert near(peaks, SPOT)  # significant, and the network gives it more than 0.3
    assert not near(peaks, BLOB)  # the network's call without evidence
    assert not near(peaks, EDGE)  # evidence the network rejects
    assert len(peaks) == 1


@pytest.mark.parametrize("params", [PeakParams(adu_per_photon=None, min_snr=0, min_height=0),
                                    PeakParams(adu_per_photon=1.0, min_snr=0, min_height=0,
                                               bright_photons=None),
                                    PeakParams(adu_per_photon=40.0, min_snr=0, min_height=0)],
                         ids=["gain unknown", "test off", "below 100 photons a pixel"])
def test_elsewhere_the_network_threshold_alone_decides(params):
    image, prob = bright_panel()
    peaks = find_peaks([image], [prob], None, params)
    assert near(peaks, BLOB) and not near(peaks, SPOT) and not near(peaks, EDGE)
    good = np.ones(SHAPE, bool)
    fore, bright = foreground_and_bright(image, prob, good, 0.5, params.adu_per_photon,
                                         params.bright_photons, params.bright_sigmas,
                                         params.bright_prob)
    np.testing.assert_array_equal(fore, prob >= 0.5)
    assert bright is None or not bright.any()


def test_bright_is_the_local_background_in_photons():
    image, _ = bright_panel()
    good = np.ones(SHAPE, bool)
    good[:, :8] = False
    found = bright_pixels(image, good, 1.0, 100.0)
    assert found is not None
    bright, background, noise = found
    assert bright.sum() == good.sum()  # 2,500 photons a pixel everywhere
    assert np.median(np.abs(background - (2500.0 + 1000.0 * np.arange(SHAPE[1]) / SHAPE[1]))
                     [good]) < 10.0
    # at 30 ADU a photon only the ramp's bright end (from 3,000 ADU) holds 100 photons a pixel
    found = bright_pixels(image, good, 30.0, 100.0)
    assert found is not None
    columns = np.flatnonzero(found[0].any(axis=0))
    assert 0.4 * SHAPE[1] < columns.min() < 0.6 * SHAPE[1] and columns.max() == SHAPE[1] - 1
    # a sparse photon-counting panel: nothing bright, and no local maps computed
    sparse = np.random.default_rng(1).poisson(0.1, SHAPE).astype(float)
    assert bright_pixels(sparse, np.ones(SHAPE, bool), 1.0, 100.0) is None


@pytest.mark.parametrize("psf", [0.0, 0.7])
def test_box_significance_has_unit_spread_on_white_and_correlated_noise(psf):
    """Each box size is judged against its own spread, so correlated noise (whose box sums
    spread more than independent pixels' would) does not read as signal."""
    rng = np.random.default_rng(2)
    shape = (256, 256)
    noise = rng.normal(size=shape) if psf == 0 else correlated_noise(rng, shape, psf)
    noise /= noise.std()
    sig = box_significance(noise, np.ones(shape, bool))
    # the best of three unit-spread boxes: 99th percentile ~2.9 (on the correlated noise a
    # box sum over the pixel spread times its side would reach ~4.5); its tail above 4.5 rare
    assert 2.4 < np.percentile(sig, 99) < 3.4
    assert (sig > 4.5).mean() < 5e-4


def test_the_quick_test_counts_in_the_normalisations_cells():
    from peaknet_xtal.finding.bright_background import CELL, MIN_SAMPLES, _cell_sums
    from peaknet_xtal.model.layers import local_norm

    assert (CELL, MIN_SAMPLES) == (local_norm.DEFAULT_BLOCK, local_norm.MIN_SAMPLES)
    flags = np.zeros((48, 64), bool)
    flags[8:24, 8:24] = True  # 256 flags straddling four cells, 64 in each
    sums = _cell_sums(flags, CELL)
    assert sums.shape == (3, 4) and sums.max() == 64 and (sums == 64).sum() == 4


def _maps_say_bright(image: np.ndarray, good: np.ndarray, level: float) -> bool:
    """The full computation the quick test stands in for."""
    from peaknet_xtal.finding.bright_background import _local_maps

    background, _ = _local_maps(np.where(good, image, 0.0), good)
    return bool((good & (background >= level)).any())


def _strong_spots(rng: np.random.Generator, shape: tuple[int, int], count: int,
                  height: float) -> np.ndarray:
    """Sparse photon counts with ``count`` spots of ``height`` counts, 1.5 px wide."""
    image = rng.poisson(0.2, shape).astype(float)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for y, x in zip(rng.integers(0, shape[0], count), rng.integers(0, shape[1], count),
                    strict=True):
        image += height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5 ** 2))
    return image


def test_strong_spots_on_a_photon_counter_need_no_local_maps():
    """A spot with dozens of pixels above the bright level fills one cell among quiet ones:
    no background can be bright there, so the maps are skipped (the test of every frame)."""
    from peaknet_xtal.finding.bright_background import _may_be_bright

    image = _strong_spots(np.random.default_rng(3), (256, 256), 12, 5000.0)
    good = np.ones(image.shape, bool)
    flags = image >= 100.0
    assert (flags.sum() > 12 * 16) and not _may_be_bright(flags, good)
    assert bright_pixels(image, good, 1.0, 100.0) is None
    assert not _maps_say_bright(image, good, 100.0)


@pytest.mark.parametrize("seed", range(24))
def test_the_quick_test_never_skips_a_bright_background(seed):
    """Wherever the local maps find a bright pixel, the quick test asks for them: panels with
    bright patches of one to a few cells (where the 3 x 3 median of cells decides), crowded
    strong spots, ramps crossing the level, masked stripes, cells with few usable pixels (300
    such panels when written: 143 bright, 127 tested for nothing, 30 skipped, none missed)."""
    from peaknet_xtal.finding.bright_background import _may_be_bright

    rng = np.random.default_rng(seed)
    shape = (96, 112)
    image = _strong_spots(rng, shape, int(rng.integers(0, 25)), 400.0)
    for _ in range(int(rng.integers(0, 4))):  # bright patches 8-56 px a side
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        hy, hx = rng.integers(8, 57, 2)
        image[y:y + hy, x:x + hx] += rng.uniform(60, 200)
    if seed % 3 == 0:  # a ramp through the level
        image += np.linspace(0.0, 150.0, shape[1])[None, :]
    good = np.ones(shape, bool)
    if seed % 4 == 1:
        good[:, int(rng.integers(0, shape[1] - 8)):][:, :8] = False
    if seed % 4 == 2:  # cells with few usable pixels
        good &= rng.random(shape) > rng.uniform(0.3, 0.95)
    flags = (image >= 100.0) & good
    if _maps_say_bright(image, good, 100.0):
        assert _may_be_bright(flags, good)
    assert (bright_pixels(image, good, 1.0, 100.0) is None) == (
        not _maps_say_bright(image, good, 100.0))


def test_exact_median_is_numpys_median_to_the_last_bit():
    """Around and far above the size where the bracketing starts, odd and even counts, ties,
    sorted values, two far-apart modes, one value, a sample that misleads the bracket (every
    sampled position an outlier: ``np.median`` then) and a NaN (NaN, as ``np.median`` says)."""
    rng = np.random.default_rng(21)
    big = 4 * MEDIAN_SAMPLE
    cases = []
    for n in (5, big - 1, big, big + 1, 100_001, 100_000, 1_000_003):
        cases += [rng.normal(size=n), np.round(rng.normal(size=n) * 3), np.sort(rng.normal(size=n)),
                  np.concatenate([np.zeros(n // 2), rng.normal(100.0, 1.0, n - n // 2)]),
                  np.full(n, 7.0), rng.exponential(size=n) ** 4]
    misled = rng.normal(size=200_000)
    misled[::200_000 // MEDIAN_SAMPLE] = 1e9
    with_nan = rng.normal(size=200_000)
    with_nan[17] = np.nan
    for values in cases + [misled, with_nan]:
        expected, got = np.median(values), exact_median(values)
        assert (np.isnan(expected) and np.isnan(got)) or got == expected, len(values)
        assert isinstance(got, float)


@pytest.mark.parametrize("side", [1, 2, 3, 4])
def test_box_sums_are_the_uniform_filter_times_the_box_area(side):
    """Placed where ``ndimage.uniform_filter`` places its box (mode constant), to float64
    rounding, on panels down to a single pixel; side 1 is the array itself."""
    rng = np.random.default_rng(22)
    for shape in ((1, 1), (2, 5), (5, 2), (37, 41), (200, 160)):
        z = rng.normal(size=shape) * 40
        expected = ndimage.uniform_filter(z, side, mode="constant") * side * side
        np.testing.assert_allclose(box_sums(z, side), expected, rtol=0, atol=1e-11)
    assert box_sums(z, 1) is z


def _box_significance_reference(residual: np.ndarray, usable: np.ndarray,
                                flat_fallback: bool = False) -> np.ndarray:
    """The straightforward form: ``ndimage.uniform_filter`` box sums, ``np.median`` spreads."""
    z = np.where(usable, residual, 0.0)
    best = np.full(z.shape, -np.inf)
    for side in (1, 2, 3):
        box = ndimage.uniform_filter(z, side, mode="constant") * (side * side)
        values = box[usable]
        spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
        if flat_fallback and spread <= 0:
            spread = float(np.std(values)) or 1.0
        if spread > 0 or flat_fallback:
            best = np.maximum(best, box / spread)
    return best


@pytest.mark.parametrize("flat_fallback", [False, True])
def test_box_significance_is_the_straightforward_one(flat_fallback):
    """Against the plain form on a bright panel with masked pixels (spreads from the exact
    medians: the same to float64 rounding of the box sums), a large panel (the bracketed
    medians), a tiny one, a constant one (no spread: left out, or the fallback's 1) and a
    sparse photon count (most box sums 0)."""
    rng = np.random.default_rng(23)
    image, _ = bright_panel(3)
    usable = rng.random(SHAPE) > 0.2
    large = rng.normal(size=(400, 500)) + 30 * (rng.random((400, 500)) < 1e-3)
    counts = (rng.random((64, 64)) < 0.02).astype(np.float64)
    for residual, good in (((image - image.mean()) / 33, usable),
                           (large, rng.random(large.shape) > 0.1),
                           (rng.normal(size=(2, 3)), np.ones((2, 3), bool)),
                           (np.full((20, 20), 5.0), np.ones((20, 20), bool)),
                           (counts, np.ones(counts.shape, bool))):
        got = box_significance(residual, good, flat_fallback=flat_fallback)
        expected = _box_significance_reference(residual, good, flat_fallback)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        assert np.array_equal(got >= 5.5, expected >= 5.5)
