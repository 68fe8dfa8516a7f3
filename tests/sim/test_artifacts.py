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
