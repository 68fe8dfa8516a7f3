"""Real-detector effects added to simulated panels (peaknet_xtal/sim/artifacts.py)."""
from __future__ import annotations

import numpy as np

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
        plain = Augment(**swift)(image, mask, label, np.random.default_rng(seed))
        off = Augment(**swift, noise_blob_prob=0.0)(image, mask, label,
                                                    np.random.default_rng(seed))
        on = Augment(**swift, noise_blob_prob=1.0)(image, mask, label,
                                                   np.random.default_rng(seed))
        # off by default, and off draws nothing: existing configs give the same crops
        assert all(np.array_equal(p, o) for p, o in zip(plain, off, strict=True))
        assert np.array_equal(on[1], plain[1]) and np.array_equal(on[2], plain[2])
        added = on[0].astype(np.float64) - plain[0]
        out_label = distance_transform_edt(~on[2]) if on[2].any() else np.full(label.shape, 99.)
        assert np.allclose(added[out_label <= 2.0], 0.0)  # the spot is as it was
        assert np.all(added[~on[1]] == 0)  # masked pixels untouched
        assert np.abs(added[out_label >= 4.0]).max() > 0
