"""Segmentation -> peak table: positions, intensities, backgrounds, panels and masks."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from peaknet_xtal.finding.peaks import (
    CORRELATION_LAGS,
    DEFAULT_MIN_SNR,
    PeakParams,
    faint_unsupported,
    find_peaks,
    is_hit,
    noise_correlation,
    peak_pixel_mask,
    rescue_candidates,
    strongest,
)
from peaknet_xtal.types import PEAK_DTYPE, peaks_from_columns


def gaussian_panel(shape, spots, background=50.0, noise=2.0, sigma=1.0, seed=0):
    """A panel with Gaussian spots ``(fs, ss, total)`` on a noisy flat background."""
    rng = np.random.default_rng(seed)
    image = rng.normal(background, noise, shape)
    ss, fs = np.mgrid[0:shape[0], 0:shape[1]]
    for x, y, total in spots:
        image += total / (2 * np.pi * sigma**2) * np.exp(
            -((fs - x) ** 2 + (ss - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def test_gaussian_spots_give_subpixel_centroids_intensity_and_background():
    spots = [(20.3, 15.7, 3000.0), (60.0, 40.25, 1500.0), (45.6, 70.1, 800.0)]
    image = gaussian_panel((90, 100), spots)
    table = find_peaks([image], [image > 70], params=PeakParams())
    assert table.dtype == PEAK_DTYPE
    assert len(table) == 3
    for x, y, total in spots:
        row = table[np.argmin(np.hypot(table["fs"] - x, table["ss"] - y))]
        assert abs(row["fs"] - x) < 0.1 and abs(row["ss"] - y) < 0.1
        # the thresholded core holds most, not all, of a Gaussian's flux
        assert 0.6 * total < row["intensity"] < 1.05 * total
        assert row["background"] == pytest.approx(50.0, abs=1.0)
        assert row["background_sigma"] == pytest.approx(2.0, rel=0.5)
        assert row["snr"] > 20
        assert row["prob"] == 1.0
        assert np.isnan(row["one_over_d"])  # no geometry given


def test_pixel_centre_convention_single_pixel():
    image = np.zeros((20, 30), np.float32)
    image[7, 11] = 100.0  # row = ss, column = fs
    table = find_peaks([image], [image > 50])
    assert (table["fs"][0], table["ss"][0]) == (11.0, 7.0)
    assert table["npix"][0] == 1 and table["max_value"][0] == 100.0


def test_components_never_cross_panel_edges():
    # the same blob cut in two by a panel boundary: two panels, two peaks
    top = np.zeros((10, 10), np.float32)
    bottom = np.zeros((10, 10), np.float32)
    top[-2:, 4:6] = 10.0
    bottom[:2, 4:6] = 10.0
    table = find_peaks([top, bottom], [top > 5, bottom > 5])
    assert sorted(table["panel"].tolist()) == [0, 1]
    assert table["ss"].tolist() == [8.5, 0.5]


def test_panels_of_different_shapes_keep_their_indices():
    panels = [np.zeros((8, 12), np.float32), np.zeros((20, 6), np.float32),
              np.zeros((8, 12), np.float32)]
    panels[1][15, 3] = 9.0
    panels[2][2, 10] = 9.0
    table = find_peaks(panels, [p > 1 for p in panels])
    assert table["panel"].tolist() == [1, 2]
    assert (table["fs"].tolist(), table["ss"].tolist()) == ([3.0, 10.0], [15.0, 2.0])


def test_eight_connectivity_joins_diagonal_pixels():
    image = np.zeros((10, 10), np.float32)
    image[3, 3] = image[4, 4] = image[5, 5] = 10.0
    table = find_peaks([image], [image > 1])
    assert len(table) == 1 and table["npix"][0] == 3


def test_mask_splits_peaks_and_is_excluded_from_background():
    image = np.full((30, 30), 10.0, np.float32)
    image[10:13, 10:15] = 100.0
    mask = np.ones_like(image, bool)
    mask[:, 12] = False  # a bad column through the spot
    image[:, 12] = 1e6  # hot column: would ruin the background if it were used
    table = find_peaks([image], [image > 50], [mask])
    assert len(table) == 2
    assert set(table["npix"].tolist()) == {6}
    assert np.all(table["background"] == 10.0)
    assert np.all(table["max_value"] == 90.0)


def test_background_ignores_neighbouring_peaks():
    image = np.full((40, 40), 5.0, np.float32)
    image[20, 20] = 500.0
    image[20, 23] = 1000.0  # inside the first peak's annulus
    image[22, 18] = 1000.0
    table = find_peaks([image], [image > 50])
    assert len(table) == 3
    assert np.all(table["background"] == 5.0)
    assert table["intensity"].tolist() == [495.0, 995.0, 995.0]


def test_background_falls_back_to_panel_when_annulus_is_masked():
    image = np.full((20, 20), 3.0, np.float32)
    image[10, 10] = 50.0
    mask = np.zeros_like(image, bool)
    mask[10, 10] = True
    mask[0:3, 0:3] = True  # the only other good pixels, far from the peak
    table = find_peaks([image], [image > 10], [mask])
    assert table["background"][0] == 3.0 and table["intensity"][0] == 47.0


def test_max_peaks_keeps_strongest_in_original_order_and_min_peaks_defines_hits():
    image = np.zeros((10, 50), np.float32)
    for i, value in enumerate([5, 50, 20, 40, 10]):
        image[5, 5 + 10 * i] = value
    params = PeakParams(threshold=0.5, max_peaks=3)
    table = find_peaks([image], [image > 1], params=params)
    assert table["max_value"].tolist() == [50.0, 20.0, 40.0]
    assert table["fs"].tolist() == [15.0, 25.0, 35.0]
    assert is_hit(table, 3) and not is_hit(table, 4)
    assert strongest(table, None).tolist() == [0, 1, 2]


def test_pixel_count_limits_and_probability_threshold():
    image = np.zeros((20, 20), np.float32)
    image[2, 2] = 10.0
    image[10:13, 10:13] = 10.0
    prob = np.where(image > 0, 0.7, 0.1)
    assert len(find_peaks([image], [prob], params=PeakParams(threshold=0.8, rescue_prob=1.0))) == 0
    # the default rescue of doubted peaks keeps the point-like pixel (on a noiseless background
    # any height is tall), not the flat 3 x 3 patch
    rescued = find_peaks([image], [prob], params=PeakParams(threshold=0.8))
    assert (rescued["fs"].tolist(), rescued["ss"].tolist()) == ([2.0], [2.0])
    table = find_peaks([image], [prob], params=PeakParams(threshold=0.6, min_pixels=2))
    assert table["npix"].tolist() == [9] and table["prob"][0] == pytest.approx(0.7)
    assert len(find_peaks([image], [prob], params=PeakParams(max_pixels=4))) == 1


def weak_and_strong_panel():
    """One bright spot and one 3x3 patch barely above the noise, both marked by 'the model'."""
    image = gaussian_panel((60, 60), [(15.0, 15.0, 2000.0)], background=50.0, noise=4.0)
    image[40:43, 40:43] += 3.0  # 9 pixels at +0.75 sigma: integrated SNR ~2
    prob = np.zeros(image.shape, np.float32)
    prob[13:18, 13:18] = 0.9
    prob[40:43, 40:43] = 0.9
    return image, prob


def test_snr_cut_drops_weak_components():
    image, prob = weak_and_strong_panel()
    kept = find_peaks([image], [prob])  # default min_snr
    assert len(kept) == 1 and kept["snr"][0] >= DEFAULT_MIN_SNR
    assert kept["fs"][0] == pytest.approx(15.0, abs=0.2)
    both = find_peaks([image], [prob], params=PeakParams(min_snr=0.0, min_height=0.0))
    assert len(both) == 2 and both["snr"].min() < DEFAULT_MIN_SNR


def test_height_cut_drops_flat_components_that_pass_the_snr_cut():
    """A broad patch 1 sigma up in every pixel sums to an SNR of about 5, yet no pixel of it
    stands 5 sigmas high: the classic finders' pixel test (min_height 5) rejects it and keeps a
    compact spot of a similar SNR, whose core is that high; at 0 (no such cut) both stay."""
    rng = np.random.default_rng(5)
    image = 100.0 + 4.0 * rng.standard_normal((80, 80))
    image[20:27, 20:27] += 4.0  # 49 pixels at +1 sigma: SNR ~ 49 * 4 / (4 * 9) = 5.4
    image[60, 60] += 80.0  # one pixel at +20 sigma: SNR ~ 80 / (4 * 3) = 6.7 with its rim
    prob = np.zeros(image.shape, np.float32)
    prob[20:27, 20:27] = 0.9
    prob[60, 60] = 0.9
    loose = find_peaks([image], [prob], params=PeakParams(min_height=0.0))
    assert len(loose) == 2 and (loose["snr"] > DEFAULT_MIN_SNR).all()
    kept = find_peaks([image], [prob], params=PeakParams(min_height=5.0))
    assert len(kept) == 1 and (kept["fs"][0], kept["ss"][0]) == pytest.approx((60, 60), abs=0.1)
    assert kept["max_value"][0] >= 5.0 * kept["background_sigma"][0]


def doubted_panel():
    """A noisy panel (sigma 4) with three spots the network doubts (probability 0.35) and one
    it does not: a tall one-pixel spot (+30 sigma), a low one (+6 sigma, SNR above 3) and a
    tall spot that touches a confident one."""
    rng = np.random.default_rng(11)
    image = 100.0 + 4.0 * rng.standard_normal((80, 80))
    prob = np.zeros(image.shape, np.float32)
    image[20, 20] += 120.0  # tall, doubted
    prob[20, 20] = 0.35
    image[40, 40] += 24.0  # low, doubted
    prob[40, 40] = 0.35
    image[60, 30:33] += 200.0  # confident core ...
    prob[60, 30:33] = 0.9
    image[60, 33] += 150.0  # ... and a doubted pixel beside it
    prob[60, 33] = 0.35
    return image.astype(np.float32), prob


def test_rescue_keeps_tall_doubted_components_and_leaves_the_rest():
    image, prob = doubted_panel()
    plain = find_peaks([image], [prob], params=PeakParams(min_snr=0.0))
    assert len(plain) == 1 and plain["npix"][0] == 3  # the confident core alone
    rescue = PeakParams(min_snr=0.0, rescue_prob=0.3, rescue_height=12.0)
    both = find_peaks([image], [prob], params=rescue)
    # the tall doubted spot is a peak; the low one is not; the confident peak keeps its pixels
    assert len(both) == 2
    tall = both[both["npix"] == 1]
    # at the tall pixel: its footprint's rim holds background noise only (under 0.05 px)
    assert np.hypot(tall["fs"][0] - 20.0, tall["ss"][0] - 20.0) < 0.05
    assert tall["max_value"][0] >= 12.0 * tall["background_sigma"][0]
    core = both[both["npix"] == 3]
    assert core["fs"][0] == pytest.approx(plain["fs"][0], abs=1e-9)
    # a lower height keeps the low one too, which the SNR cut then judges as any peak's
    low = replace(rescue, rescue_height=3.0)
    assert len(find_peaks([image], [prob], params=low)) == 3
    # off (the default), or not below the threshold: the network's threshold alone
    for off in (replace(rescue, rescue_prob=PeakParams().rescue_prob),
                replace(rescue, rescue_prob=0.5)):
        assert len(find_peaks([image], [prob], params=off)) == 1


def test_rescue_keeps_point_like_spots_not_tracks():
    """As tall as each other and as doubted: a spot on a pixel corner (four equal pixels) and
    one across a pixel edge are rescued; a five-pixel cosmic-ray track is not."""
    rng = np.random.default_rng(12)
    image = 100.0 + 4.0 * rng.standard_normal((80, 80))
    prob = np.zeros(image.shape, np.float32)
    image[20:22, 20:22] += 150.0  # corner
    image[40, 40:42] += [150.0, 120.0]  # edge
    image[60, 30:35] += 150.0  # track
    for sl in ((slice(20, 22), slice(20, 22)), (40, slice(40, 42)), (60, slice(30, 35))):
        prob[sl] = 0.4
    found = find_peaks([image], [prob], params=PeakParams(rescue_prob=0.3, rescue_height=12.0))
    assert sorted(found["npix"].tolist()) == [2, 4]
    assert not (found["ss"] == 60.0).any()


def test_rescue_candidates_never_reach_foreground_or_unusable_pixels():
    image, prob = doubted_panel()
    usable = np.ones(image.shape, bool)
    usable[40, 40] = False
    fore = prob >= 0.5
    candidates = rescue_candidates(prob, usable, fore, 0.3)
    assert candidates[20, 20] and not candidates[40, 40] and not candidates[60, 33]
    assert not (candidates & fore).any()
    assert candidates.sum() == 1


def test_faint_peaks_need_enough_tall_peaks_on_their_frame():
    """Faint peaks (brightest pixel under faint_height sigmas) go when fewer than faint_support
    peaks of the frame stand that high, and stay otherwise; tall peaks always stay; 0 turns
    the rule off; a noiseless background (sigma 0) makes every peak tall."""
    def frame(tall: int, faint: int, sigma: float = 2.0) -> np.ndarray:
        heights = np.r_[np.full(tall, 12.0), np.full(faint, 8.0)]  # 6 and 4 sigmas
        return peaks_from_columns(max_value=heights, background_sigma=np.full(len(heights), sigma))

    few = frame(tall=2, faint=3)
    assert faint_unsupported(few, 5.0, 5).tolist() == [False] * 2 + [True] * 3
    assert not faint_unsupported(few, 5.0, 2).any()  # exactly enough tall peaks
    assert not faint_unsupported(few, 5.0, 0).any()  # off
    assert not faint_unsupported(frame(tall=5, faint=3), 5.0, 5).any()
    assert faint_unsupported(frame(tall=0, faint=4), 5.0, 1).all()  # a blank's noise calls
    assert not faint_unsupported(frame(tall=0, faint=4), 3.0, 1).any()  # 4 sigmas is tall here
    assert not faint_unsupported(frame(tall=0, faint=4, sigma=0.0), 5.0, 5).any()
    assert faint_unsupported(frame(0, 0), 5.0, 5).shape == (0,)


def test_faint_snr_makes_tall_low_snr_peaks_faint():
    """With faint_snr, a peak is tall only when it also holds that integrated SNR: a few-photon
    cluster tall in background sigmas neither supports its frame nor survives on one without
    support; on a frame with enough peaks tall by both tests it stays; 0 is height alone."""
    heights = np.full(6, 12.0)  # 6 sigmas each
    snr = np.array([20.0, 20.0, 4.0, 4.0, 4.0, 4.0])
    few = peaks_from_columns(max_value=heights, background_sigma=np.full(6, 2.0), snr=snr)
    assert faint_unsupported(few, 5.0, 5, 5.0).tolist() == [False] * 2 + [True] * 4
    assert not faint_unsupported(few, 5.0, 5, 0.0).any()  # six tall by height alone
    assert not faint_unsupported(few, 5.0, 2, 5.0).any()  # two tall by both: enough
    assert not faint_unsupported(few, 5.0, 5, 4.0).any()  # SNR 4 is at the bar, not under
    assert faint_unsupported(few[2:], 5.0, 1, 5.0).all()


def test_peak_pixel_mask_holds_exactly_the_reported_peaks():
    image, prob = weak_and_strong_panel()
    good = np.ones(image.shape, bool)
    good[14, 14] = False  # a masked pixel inside the strong spot stays out
    table = find_peaks([image], [prob], [good])
    mask = peak_pixel_mask(image, prob, good)
    assert mask.sum() == table["npix"].sum() == 24
    assert not mask[40:43, 40:43].any() and not mask[14, 14]
    everything = peak_pixel_mask(image, prob, good, PeakParams(min_snr=0.0, min_height=0.0))
    assert everything.sum() == 33
    assert not peak_pixel_mask(image, np.zeros_like(prob)).any()


def test_bounding_boxes_are_end_exclusive_fs_then_ss():
    image = np.zeros((20, 20), np.float32)
    image[4:7, 10:12] = 10.0
    table, boxes = find_peaks([image], [image > 1], with_bbox=True)
    # the footprint's box: the marked 2 x 3 pixels and their one-pixel rim, which the peak's
    # position and intensity come from (a DIALS box must hold the centroid)
    assert boxes.tolist() == [[9, 13, 3, 8]]
    assert len(table) == 1 and table["npix"][0] == 6  # the marked pixels, as Cheetah counts


def test_empty_and_non_finite_inputs():
    image = np.full((16, 16), np.nan, np.float32)
    table = find_peaks([image], [np.ones_like(image)])
    assert len(table) == 0 and table.dtype == PEAK_DTYPE
    assert len(find_peaks([], [])) == 0


def test_shape_mismatch_is_reported_with_panel_index():
    with pytest.raises(ValueError, match="panel 1"):
        find_peaks([np.zeros((4, 4)), np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 5))])


def test_many_panel_frame_matches_truth():
    """A 16-panel, 4 Mpx frame with 400 spots: every spot found within 0.2 px."""
    rng = np.random.default_rng(3)
    n_panels, shape = 16, (512, 512)
    truth = [(int(rng.integers(n_panels)), *rng.uniform(8, 504, 2), rng.uniform(500, 5000))
             for _ in range(400)]
    panels = [gaussian_panel(shape, [(x, y, t) for p, x, y, t in truth if p == i], seed=i)
              for i in range(n_panels)]
    table = find_peaks(panels, [p > 70 for p in panels])
    found = 0
    for p, x, y, _ in truth:
        mine = table[table["panel"] == p]
        found += bool(len(mine)) and np.hypot(mine["fs"] - x, mine["ss"] - y).min() < 0.2
    assert found >= 395  # a few spots overlap and merge


def sparse_photon_panel(gain=10.0, level=0.4, seed=1, shape=(80, 80)):
    """A photon-counting background of ``level`` photons a pixel (most pixels hold none) with
    Gaussian read noise, in ADU; returns the image and its photon counts."""
    rng = np.random.default_rng(seed)
    photons = rng.poisson(level, shape).astype(np.float64)
    return (photons * gain + rng.normal(0.0, 0.15 * gain, shape)).astype(np.float32), photons


def test_background_level_and_spread_are_right_on_a_sparse_photon_background():
    gain, level = 10.0, 0.4
    image, _ = sparse_photon_panel(gain, level)
    image[38:41, 38:41] += 500.0
    prob = np.zeros(image.shape, np.float32)
    prob[38:41, 38:41] = 0.9
    row = find_peaks([image], [prob], params=PeakParams(min_snr=0.0))[0]
    # more than half the pixels hold no photon: a median would say 0 and a MAD the read noise
    assert row["background"] == pytest.approx(level * gain, rel=0.35)
    assert row["background_sigma"] == pytest.approx(np.sqrt(level + 0.15**2) * gain, rel=0.35)


def test_shot_noise_rejects_photon_clusters_but_keeps_a_real_spot():
    gain = 10.0
    image, _ = sparse_photon_panel(gain, level=0.05)
    image[20, 20:22] += 2 * gain  # a cluster of four extra photons in two pixels
    image[55:58, 55:58] += 8 * gain  # a spot of 72 photons
    prob = np.zeros(image.shape, np.float32)
    prob[20, 20:22] = prob[55:58, 55:58] = 0.9
    without = find_peaks([image], [prob], params=PeakParams(min_snr=3.0))
    counted = find_peaks([image], [prob], params=PeakParams(min_snr=3.0, adu_per_photon=gain))
    assert len(without) == 2  # against background noise alone the cluster looks significant
    assert len(counted) == 1 and counted["ss"][0] == pytest.approx(56.0, abs=0.3)
    zero = find_peaks([image], [prob], params=PeakParams(min_snr=0.0, adu_per_photon=0.0))
    none = find_peaks([image], [prob], params=PeakParams(min_snr=0.0))
    np.testing.assert_array_equal(zero["snr"], none["snr"])  # 0: background noise only
    shot = find_peaks([image], [prob], params=PeakParams(min_snr=0.0, adu_per_photon=gain))
    assert (shot["snr"] < none["snr"]).all()


def test_snr_counts_the_spot_footprint_beyond_the_marked_core():
    """A faint wide spot of which the model marks only the central pixel: its tails count.
    The same noise with only the central pixel's excess (no tails) scores far lower."""
    wide = gaussian_panel((40, 40), [(20.0, 20.0, 60.0)], background=10.0, noise=1.0,
                          sigma=1.2)
    core = gaussian_panel((40, 40), [], background=10.0, noise=1.0)
    core[20, 20] += 60.0 / (2 * np.pi * 1.2**2)  # the wide spot's central pixel, alone
    prob = np.zeros(wide.shape, np.float32)
    prob[20, 20] = 0.9
    with_tails = find_peaks([wide], [prob], params=PeakParams(min_snr=0.0))[0]
    core_only = find_peaks([core], [prob], params=PeakParams(min_snr=0.0))[0]
    assert with_tails["npix"] == core_only["npix"] == 1
    assert with_tails["snr"] > 2 * core_only["snr"]

def blurred_noise(rng, shape, psf_sigma):
    """Unit-variance Gaussian noise blurred by a Gaussian point spread (CCD-like), and the
    correlation it has at each of ``CORRELATION_LAGS`` (from the discrete kernel itself)."""
    from scipy.ndimage import gaussian_filter

    noise = rng.normal(size=shape)
    if psf_sigma == 0:
        return noise, np.zeros(len(CORRELATION_LAGS))
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    kernel = gaussian_filter(delta, psf_sigma)
    expected = np.array([(kernel * np.roll(kernel, (dy, dx), axis=(0, 1))).sum()
                         for dy, dx in CORRELATION_LAGS]) / (kernel**2).sum()
    blurred = gaussian_filter(noise, psf_sigma)
    return blurred / blurred.std(), expected


@pytest.mark.parametrize("psf_sigma", [0.0, 0.6, 1.0])
def test_noise_correlation_measures_the_point_spread_under_gradients_and_defects(psf_sigma):
    rng = np.random.default_rng(7)
    noise, expected = blurred_noise(rng, (600, 500), psf_sigma)
    image = 3000.0 + 33.0 * noise + np.linspace(0.0, 2000.0, 500)[None, :]  # strong, sloped
    image[::37, ::41] += 5000.0  # unmasked hot pixels
    good = np.ones(image.shape, bool)
    good[:, 200:210] = False  # a masked gap
    rho = noise_correlation(image[None], good[None])[0]
    np.testing.assert_allclose(rho, expected, atol=0.05)


@pytest.mark.parametrize("psf_sigma", [0.0, 0.8])
def test_snr_of_pure_noise_has_unit_spread_on_white_and_correlated_noise(psf_sigma):
    """Components placed on noise alone: their SNRs must spread like a standard normal, or
    min_snr means a different false-peak rate on every detector (pixels treated as independent
    gave CCD-like noise twice the spread, so noise blobs passed min_snr 3)."""
    rng = np.random.default_rng(11)
    snrs = []
    for _ in range(2):
        noise, _ = blurred_noise(rng, (320, 320), psf_sigma)
        image = 500.0 + 20.0 * noise
        prob = np.zeros(image.shape, np.float32)
        for y in range(10, 310, 20):
            for x in range(10, 310, 20):
                prob[y - 1:y + 1, x - 1:x + 2] = 0.9  # 2 x 3 pixel components
        snrs.append(find_peaks([image], [prob], params=PeakParams(min_snr=-np.inf,
                                                                   min_height=0.0))["snr"])
    snr = np.concatenate(snrs)
    assert len(snr) == 2 * 15 * 15
    assert abs(np.mean(snr)) < 0.2
    assert 0.85 < np.std(snr) < 1.15


def test_noise_correlation_of_a_panel_does_not_depend_on_the_panels_beside_it():
    """Peaks of a panel are the same alone or in its whole detector (DIALS hands panels one at
    a time or all at once): its correlation sample is its own."""
    rng = np.random.default_rng(3)
    stack = np.stack([blurred_noise(rng, (185, 194), s)[0] for s in (0.0, 0.7, 1.0)])
    good = np.ones(stack.shape, bool)
    good[1, :175] = False  # mostly masked: too few pairs, taken as independent
    together = noise_correlation(stack, good)
    for i in range(len(stack)):
        np.testing.assert_array_equal(noise_correlation(stack[i:i + 1], good[i:i + 1])[0],
                                      together[i])
    assert np.all(together[1] == 0.0) and together[2, 0] > 0.5


def test_a_panel_in_a_masked_layout_gives_its_own_peaks_boxes_and_pixels():
    """A panel is searched within its valid region: embedded at any offset in a larger masked
    array (and beside a panel that is not), its table, boxes and peak pixels are its own,
    moved by the offset; the noise correlation, from a sample of rows, sees the same rows."""
    rng = np.random.default_rng(5)
    spots = [(rng.uniform(5, 95), rng.uniform(5, 75), rng.uniform(60, 900)) for _ in range(25)]
    image = gaussian_panel((80, 100), spots, noise=4.0, seed=3)
    image += 3.0 * np.roll(image - 50.0, 1, axis=1)  # neighbour correlation in the noise
    prob = (image > 90).astype(np.float32)
    alone, boxes, pixels = find_peaks([image, image], [prob, prob], with_bbox=True,
                                      with_pixels=True)
    assert len(alone) >= 30
    y0, x0 = 23, 41
    layout, good = np.zeros((150, 190), np.float32), np.zeros((150, 190), bool)
    layout[y0:y0 + 80, x0:x0 + 100], good[y0:y0 + 80, x0:x0 + 100] = image, True
    embedded = layout.astype(np.float32)
    inside, in_boxes, in_pixels = find_peaks(
        [embedded, image], [(embedded > 90).astype(np.float32), prob],
        [good, np.ones(image.shape, bool)], with_bbox=True, with_pixels=True)
    assert len(inside) == len(alone)
    first = inside["panel"] == 0
    for column in ("intensity", "snr", "background", "background_sigma", "npix"):
        np.testing.assert_allclose(inside[column], alone[column], rtol=1e-9)
    np.testing.assert_allclose(inside["ss"] - np.where(first, y0, 0), alone["ss"], atol=1e-9)
    np.testing.assert_allclose(inside["fs"] - np.where(first, x0, 0), alone["fs"], atol=1e-9)
    assert (in_boxes - np.where(first[:, None], [x0, x0, y0, y0], 0) == boxes).all()
    assert np.array_equal(in_pixels[0][y0:y0 + 80, x0:x0 + 100], pixels[0])
    assert in_pixels[0].sum() == pixels[0].sum() and np.array_equal(in_pixels[1], pixels[1])


def test_a_core_marked_beside_its_bright_pixel_is_reported_at_the_bright_pixel():
    """The network sometimes marks the pixel beside a spot narrower than a pixel: the peak is
    where its footprint's light is, with the footprint's intensity and brightest pixel (the SNR
    always summed the footprint), not at a background pixel with a negative intensity."""
    rng = np.random.default_rng(8)
    image = rng.normal(100.0, 3.0, (40, 40))
    image[20, 20] = 100.0 - 11.0  # the marked pixel: below background
    image[21, 20] = 100.0 + 440.0  # the spot, in the marked pixel's rim
    prob = np.zeros((40, 40))
    prob[20, 20] = 0.9
    (peak,) = find_peaks([image.astype(np.float32)], [prob.astype(np.float32)])
    assert peak["npix"] == 1 and abs(peak["fs"] - 20.0) < 0.1 and abs(peak["ss"] - 21.0) < 0.1
    assert peak["max_value"] == pytest.approx(440.0, abs=15.0)
    assert peak["intensity"] == pytest.approx(440.0 - 11.0, abs=40.0)


def test_nothing_on_an_empty_counting_background_is_no_peak():
    """Zero counts on a noiseless zero background summed to 0/0: a NaN SNR, which min_snr keeps
    (it keeps peaks without a background estimate), so empty pixels the model marked came out
    as peaks of intensity 0 (on the real Pilatus frames).  Now they score 0; a real count on the
    same background stays a peak."""
    image = np.zeros((30, 30), np.float32)
    image[20, 20] = 16.0  # SNR 4 on its own shot noise
    prob = np.zeros((30, 30), np.float32)
    prob[5, 5] = prob[20, 20] = 0.9
    peaks = find_peaks([image], [prob], params=PeakParams(adu_per_photon=1.0))
    assert len(peaks) == 1 and (peaks["fs"][0], peaks["ss"][0]) == (20.0, 20.0)
    everything = find_peaks([image], [prob], params=PeakParams(min_snr=0.0))
    assert len(everything) == 2 and everything["snr"][0] == 0.0  # min_snr 0 keeps all


def test_counts_on_a_noiseless_background_without_a_gain_have_their_poisson_noise():
    """No gain known and a background of exact zeros: the pixels are counts, so a lone count
    scores SNR 1 (was infinite: every photon a peak) and a 25-count spot 5."""
    image = np.zeros((30, 30), np.float32)
    image[5, 5] = 1.0
    image[20, 20] = 25.0
    prob = np.zeros((30, 30), np.float32)
    prob[5, 5] = prob[20, 20] = 0.9
    peaks = find_peaks([image], [prob])  # PeakParams() knows no gain
    assert len(peaks) == 1 and peaks["snr"][0] == pytest.approx(5.0)
    no_shot = find_peaks([image], [prob], params=PeakParams(adu_per_photon=0.0))
    assert len(no_shot) == 2  # an explicit 0 leaves shot noise out, as documented


def test_peaks_grown_for_dials_stay_one_spot_each():
    """DIALS labels the foreground it is given; peaks a few pixels apart, each grown by a pixel,
    touched and came out of DIALS as one spot.  Each now grows only where no other peak is
    within its 3 x 3 neighbourhood, and one far from the others grows as before."""
    from peaknet_xtal.finding.peaks import dials_foreground, grow_apart

    peaks = np.zeros((20, 30), bool)
    peaks[5, 5] = peaks[5, 8] = True  # two peaks 3 px apart: plain growth joins them
    peaks[5:7, 11] = True  # a third 3 px further
    peaks[15, 25] = True  # one alone
    good = np.ones(peaks.shape, bool)
    plain = ndimage.binary_dilation(peaks, structure=np.ones((3, 3), bool))
    assert ndimage.label(plain, structure=np.ones((3, 3)))[1] == 2  # the three joined
    grown = grow_apart(peaks, good, 1)
    labels, n = ndimage.label(grown, structure=np.ones((3, 3)))
    assert n == 4 and (grown >= peaks).all()
    assert np.array_equal(grown[12:19, 22:29], plain[12:19, 22:29])  # the lone one: as before
    # grown apart: the two columns between them would each touch the other peak, so stay out
    assert grown[4:7, 4:6].all() and not grown[4:7, 6:8].any() and grown[4:7, 8].all()
    pixels = np.where(peaks, 50.0, 1.0)
    assert ndimage.label(dials_foreground(pixels, peaks, good, 1),
                         structure=np.ones((3, 3)))[1] == 4
    # masked pixels are not grown into; two steps keep the regions apart as well
    good[15, 26] = False
    assert not grow_apart(peaks, good, 1)[15, 26]
    assert ndimage.label(grow_apart(peaks, np.ones(peaks.shape, bool), 2),
                         structure=np.ones((3, 3)))[1] == 4
