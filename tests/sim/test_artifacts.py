"""Real-detector effects added to simulated panels (peaknet_xtal/sim/artifacts.py)."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.sim import artifacts
from peaknet_xtal.training.data import Augment


def test_correlated_noise_has_unit_variance_and_the_asked_neighbour_correlation():
    rng = np.random.default_rng(0)
    white = artifacts.correlated_noise(rng, (256, 256), 0.0)
    blurred = artifacts.correlated_noise(rng, (256, 256), 0.6)
    for noise in (white, blurred):
        assert abs(noise.std() - 1) < 1e-6
    corr = [np.corrcoef(n[:, 1:].ravel(), n[:, :-1].ravel())[0, 1] for n in (white, blurred)]
    assert abs(corr[0]) < 0.05
    assert 0.3 < corr[1] < 0.55  # the ~0.4 of the real MFX Rayonix frame


def test_strong_background_panel_has_the_rayonix_statistics():
    rng = np.random.default_rng(1)
    photons = np.zeros((300, 300))
    photons[150, 150] = 20.0  # one spot of 20 photons
    panel = artifacts.strong_background_panel(photons, rng, adu_per_photon=30.0)
    background = np.delete(panel.ravel(), 150 * 300 + 150)
    lo, hi = np.percentile(background, [5, 95])
    assert 2300 < lo and hi < 4700
    # noise: differences of pixels two apart (background gradients cancel)
    diff = (panel[:, 2:] - panel[:, :-2]).ravel() / np.sqrt(2)
    assert 20 < np.std(diff) < 45
    assert panel[150, 150] - np.median(panel[145:156, 145:156]) > 400


def test_strong_background_panel_parts_are_the_same_panel_and_its_noise():
    photons = np.random.default_rng(0).poisson(0.2, (120, 100)).astype(float)
    panel = artifacts.strong_background_panel(photons, np.random.default_rng(5), 30.0)
    again, scale, psf = artifacts.strong_background_panel_parts(photons,
                                                                 np.random.default_rng(5), 30.0)
    np.testing.assert_array_equal(again, panel)
    assert psf == 0.6 and scale.shape == panel.shape
    # ~33 ADU at 3,000 ADU, scaling as sqrt(level): the stated noise of the background it added
    level = panel - photons * 30.0
    np.testing.assert_allclose(scale, 33.0 * np.sqrt(np.clip(level, 1, None) / 3000.0), rtol=0.1)


def test_drowned_peaks_on_the_rayonix_background_keep_bright_spots_only():
    """A 60-photon spot (1,800 ADU over 9 px) stands out of ~33 ADU of correlated noise a
    pixel; a 2-photon one does not."""
    photons = np.zeros((80, 80))
    label = np.zeros((80, 80), bool)
    for (y, x), n in (((20, 20), 60.0), ((60, 60), 2.0)):
        photons[y - 1:y + 2, x - 1:x + 2] = n / 9
        label[y - 1:y + 2, x - 1:x + 2] = True
    _, scale, psf = artifacts.strong_background_panel_parts(photons, np.random.default_rng(1),
                                                            30.0)
    drop = artifacts.drowned_peaks(photons * 30.0, label, 0.0, scale, psf, min_snr=5.0)
    assert not drop[20, 20] and drop[60, 60]


def test_real_background_augmentations_change_the_image_never_the_label():
    rng = np.random.default_rng(2)
    image = rng.poisson(2.0, (96, 96)).astype(np.float32) * 10
    label = np.zeros((96, 96), bool)
    label[40:43, 50:53] = True
    image[label] += 500
    augment = Augment(flips=False, gain=(1.0, 1.0), offset_sigma=0.0, noise=0.0,
                      dead_pixel_fraction=0.0, dead_line_prob=0.0, strong_background_prob=1.0,
                      zinger_prob=1.0, jet_streak_prob=1.0, saturation_prob=1.0)
    out, mask, out_label = augment(image, np.ones_like(label), label, rng)
    assert np.array_equal(out_label, label) and mask.all()
    assert np.median(out) > np.median(image) + 20  # a bright smooth background was added
    assert np.isfinite(out).all()
    clipped = artifacts.saturate(out.astype(np.float64), np.random.default_rng(3))
    assert clipped.max() < out.max() and np.array_equal(clipped[out < np.quantile(out, 0.99)],
                                                        out[out < np.quantile(out, 0.99)])


def _spots_label(shape: tuple[int, int] = (128, 128)) -> np.ndarray:
    label = np.zeros(shape, bool)
    for y, x in ((20, 30), (64, 64), (100, 90)):
        label[y:y + 2, x:x + 2] = True
    return label


def test_noise_blobs_have_the_asked_texture_and_height_and_spare_the_labelled_spots():
    from scipy.ndimage import distance_transform_edt

    label = _spots_label((256, 256))
    distance = distance_transform_edt(~label)
    for psf in (0.5, 1.0):
        for peak in (4.0, 10.0):
            field = artifacts.noise_blobs(np.random.default_rng(3), label, 2.5, (psf, psf),
                                          (peak, peak))
            assert np.all(field[distance <= 2.0] == 0)  # real spots keep their own profile
            assert np.isclose(field[distance >= 4.0].max(), peak * 2.5)  # tallest blob
            far = field[160:, :]  # rows with full-strength noise only
            corr = [float(np.corrcoef(far[:, d:].ravel(), far[:, :-d].ravel())[0, 1])
                    for d in (1, 2, 3)]
            # the texture of a Gaussian point spread of psf px (continuous: exp(-d^2 / 4psf^2);
            # the sampled kernel gives 0.26 for 0.37 at psf 0.5): blobs a few px wide, not
            # single pixels and not broad swells
            assert abs(corr[0] - np.exp(-1 / (4 * psf**2))) < 0.15
            assert corr[0] > 0.2 and abs(corr[2]) < 0.15


def test_noise_blobs_are_seeded():
    label = _spots_label()
    a = artifacts.noise_blobs(np.random.default_rng(7), label, 1.0)
    b = artifacts.noise_blobs(np.random.default_rng(7), label, 1.0)
    c = artifacts.noise_blobs(np.random.default_rng(8), label, 1.0)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def _crop(options: dict, image: np.ndarray, mask: np.ndarray, label: np.ndarray, seed: int,
          **option) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Augment(**options, **option)`` applied to one crop with a fresh seeded generator."""
    return Augment(**options, **option)(image, mask, label, np.random.default_rng(seed))


def _same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    """Image, mask and label of two crops are identical."""
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_augment_noise_blobs_add_only_the_blob_field_and_leave_labels_and_the_rest_alone():
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(4)
    image = rng.normal(50.0, 3.0, (96, 96))
    label = np.zeros((96, 96), bool)
    label[30:32, 60:62] = True
    image[label] += 40
    mask = np.ones((96, 96), bool)
    swift = dict(gain_spread=0.15, banding=1.5, correlated_noise=2.5, bright_line_prob=0.2,
                 strong_background_prob=0.35, zinger_prob=0.15, hot_pixel_prob=0.3)
    for seed in range(6):
        plain = _crop(swift, image, mask, label, seed)
        off = _crop(swift, image, mask, label, seed, noise_blob_prob=0.0)
        on = _crop(swift, image, mask, label, seed, noise_blob_prob=1.0)
        # off by default, and off draws nothing: existing configs give the same crops
        assert _same(plain, off)
        assert np.array_equal(on[1], plain[1]) and np.array_equal(on[2], plain[2])
        added = on[0].astype(np.float64) - plain[0]
        out_label = distance_transform_edt(~on[2]) if on[2].any() else np.full(label.shape, 99.)
        assert np.allclose(added[out_label <= 2.0], 0.0)  # the spot is as it was
        assert np.all(added[~on[1]] == 0)  # masked pixels untouched
        assert np.abs(added[out_label >= 4.0]).max() > 0


def test_strong_background_parts_draw_as_add_strong_background_and_say_what_they_added():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, (64, 64))
    plain = artifacts.add_strong_background(image, 1.0, np.random.default_rng(5), 150.0)
    out, noise_scale, psf = artifacts.strong_background_parts(image, 1.0,
                                                              np.random.default_rng(5), 150.0)
    assert np.array_equal(plain, out)  # same draws, same order: the same crops
    assert 0.0 <= psf <= 1.0 and noise_scale.shape == image.shape and (noise_scale >= 0).all()


@pytest.mark.parametrize("size", [48, 160])  # 160: the spot's window is a small part of it
def test_drowned_peaks_noise_of_a_sum_matches_the_correlated_noise_it_describes(size):
    # the std of a 3 x 3 sum of correlated_noise * scale, measured over many draws, against the
    # expected one drowned_peaks compares each spot with (its threshold sits exactly on it)
    spot = np.zeros((size, size), bool)
    spot[20:23, 20:23] = True
    scale = np.full(spot.shape, 2.0)
    rng = np.random.default_rng(1)
    for psf in (0.0, 0.5, 1.0):
        sums = [float((artifacts.correlated_noise(rng, spot.shape, psf) * scale)[spot].sum())
                for _ in range(1500)]
        measured = float(np.std(sums))
        image = np.zeros(spot.shape)
        image[spot] = measured / 9  # a spot whose sum is one measured std
        below = artifacts.drowned_peaks(image, spot, 0.0, scale, psf, 1.1)
        above = artifacts.drowned_peaks(image, spot, 0.0, scale, psf, 0.9)
        assert below[spot].all() and not above.any()
        if psf > 0:  # correlation makes the sum noisier than 3 x the per-pixel std
            assert measured > 3 * 2.0 * 1.2


def test_drowned_peaks_clears_a_drowned_weak_spot_and_keeps_a_strong_one():
    label = np.zeros((64, 64), bool)
    label[10:12, 10:12] = True  # strong: sum 400 sigma
    label[40:42, 40:42] = True  # weak: sum 24 sigma, 12 stds of its own noise (2 sigma)
    image = np.random.default_rng(2).normal(0.0, 1.0, label.shape)
    image[10:12, 10:12] += 100.0
    image[40:42, 40:42] += 6.0
    quiet = artifacts.drowned_peaks(image, label, 1.0, np.zeros(label.shape), 0.8, 3.5)
    assert not quiet.any()  # no added noise: both significant
    loud = artifacts.drowned_peaks(image, label, 1.0, np.full(label.shape, 6.0), 0.8, 3.5)
    assert loud[40:42, 40:42].all() and not loud[10:12, 10:12].any()
    assert loud.sum() == 4
    assert not artifacts.drowned_peaks(image, np.zeros_like(label), 1.0,
                                       np.full(label.shape, 6.0), 0.8, 3.5).any()


def test_a_zinger_on_a_counting_detector_is_one_count_per_pixel_on_the_same_track():
    charge = np.zeros((40, 40))
    counts = np.zeros((40, 40))
    rng_charge, rng_counts = np.random.default_rng(5), np.random.default_rng(5)
    artifacts.add_zinger(charge, 2.0, rng_charge)
    artifacts.add_zinger(counts, 2.0, rng_counts, counting=True)
    track = charge > 0
    assert track.sum() >= 3 and np.array_equal(counts > 0, track)
    assert np.all(counts[track] == 2.0)  # one photon's ADU, once per crossed pixel
    assert charge[track].min() >= 20 * 2.0  # the integrating track: tens of sigma or more
    assert rng_charge.random() == rng_counts.random()  # the same draws either way


def test_drowned_reflections_are_those_centred_within_a_pixel_of_a_drowned_pixel():
    from peaknet_xtal.sim.simulate import REFLECTION_DTYPE

    drowned = [np.zeros((20, 30), bool), np.zeros((20, 30), bool)]
    drowned[1][5:7, 8:10] = True
    refl = np.zeros(5, REFLECTION_DTYPE)
    # (panel, fs, ss): on the drowned spot, one pixel beside it, two pixels away, the same
    # place on the other panel, and a centre at the panel's corner (the window clipped)
    for row, (panel, fs, ss) in zip(refl, [(1, 8.4, 5.6), (1, 10.2, 7.9), (1, 11.5, 5.0),
                                           (0, 8.4, 5.6), (1, 0.0, 0.0)], strict=True):
        row["panel"], row["fs"], row["ss"] = panel, fs, ss
    gone = artifacts.drowned_reflections(refl, drowned)
    assert gone.tolist() == [True, True, False, False, False]
    assert artifacts.drowned_reflections(refl[:0], drowned).shape == (0,)


def test_augment_label_drop_is_off_by_default_draws_nothing_and_drops_only_drowned_spots():
    rng = np.random.default_rng(4)
    image = rng.normal(50.0, 3.0, (96, 96))
    label = np.zeros((96, 96), bool)
    label[30:32, 60:62] = True
    label[70:72, 20:22] = True
    image[30:32, 60:62] += 300.0  # strong: sum 400 sigma
    image[70:72, 20:22] += 7.5  # weak: sum 10 sigma, 5 stds of its own noise
    mask = np.ones((96, 96), bool)
    quiet = dict(noise=0.0, dead_pixel_fraction=0.0, dead_line_prob=0.0,
                 strong_background_prob=1.0, strong_background_max=150.0)
    dropped = 0
    for seed in range(8):
        plain = _crop(quiet, image, mask, label, seed)
        off = _crop(quiet, image, mask, label, seed, strong_background_label_snr=0.0)
        on = _crop(quiet, image, mask, label, seed, strong_background_label_snr=3.5)
        again = _crop(quiet, image, mask, label, seed, strong_background_label_snr=3.5)
        assert _same(plain, off)
        assert _same(on, again)  # seeded
        # the same crop, only the label can lose pixels: whole spots, never the strong one
        assert np.array_equal(on[0], plain[0]) and np.array_equal(on[1], plain[1])
        assert plain[2].sum() == 8 and not (on[2] & ~plain[2]).any()
        assert on[2].sum() in (4, 8)
        strongest = np.unravel_index(np.argmax(np.where(plain[2], on[0], -np.inf)), label.shape)
        assert on[2][strongest]
        dropped += int(on[2].sum() == 4)
    assert dropped >= 1  # the strong background drowns the weak spot on some draws
    # without a strong background nothing is dropped
    calm = dict(quiet, strong_background_prob=0.0)
    for seed in range(4):
        out = _crop(calm, image, mask, label, seed, strong_background_label_snr=3.5)
        assert out[2].sum() == 8
