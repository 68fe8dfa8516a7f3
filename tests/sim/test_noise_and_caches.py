"""The simulator's fast paths: exact noise samplers, vectorised ray casting, per-detector caches.

Each fast path replaced a slower obvious one (numpy's samplers, a loop over panels, per-frame
maps); these tests compare against the obvious version or the exact distribution, so a speed-up
that changes the physics fails here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.sim.detector import DetectorModel
from peaknet_xtal.sim.noise import gaussian_frame, poisson_frame, poisson_sparse
from peaknet_xtal.sim.simulate import _background, detector_model, resolve_beam


@pytest.fixture(scope="module")
def cspad(real_data):
    return read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")


@pytest.mark.parametrize("lam", [0.02, 0.3, 1.2, 1.6, 4.0, 25.0])
def test_poisson_matches_the_exact_distribution(lam):
    """Chi-square against the Poisson pmf on both sides of the inversion/numpy split (1.5)."""
    x = poisson_frame(np.random.default_rng(1), np.full(300_000, lam, np.float32)).astype(int)
    k = np.arange(x.max() + 1)
    expected = stats.poisson.pmf(k, lam) * x.size
    keep = expected > 5
    observed = np.bincount(x, minlength=k.size)
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4
    assert (observed[~keep].sum() - expected[~keep].sum()) ** 2 < 25 * max(expected[~keep].sum(), 1)


def test_poisson_sparse_is_poisson_frame_in_sparse_form():
    lam = np.random.default_rng(2).random(100_000, dtype=np.float32) * np.float32(4.0)
    dense = poisson_frame(np.random.default_rng(7), lam)
    index, counts = poisson_sparse(np.random.default_rng(7), lam)
    assert len(np.unique(index)) == len(index) and counts.min() >= 1
    rebuilt = np.zeros_like(dense)
    rebuilt[index] = counts
    assert np.array_equal(rebuilt, dense)


def test_gaussian_frame_is_standard_normal_and_independent():
    z = gaussian_frame(np.random.default_rng(3), 1_000_001, 2.5)
    assert z.dtype == np.float32 and z.shape == (1_000_001,)
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-4
    assert abs(stats.kurtosis(z)) < 0.02 and abs(stats.skew(z)) < 0.01
    half = z.size // 2  # the cosine and sine halves come from the same uniforms: uncorrelated?
    assert abs(np.corrcoef(z[:half], z[half:2 * half])[0, 1]) < 5e-3
    assert abs(np.corrcoef(z[:half] ** 2, z[half:2 * half] ** 2)[0, 1]) < 5e-3


def _cast_one_panel_at_a_time(det: DetectorModel, u: np.ndarray) -> tuple[np.ndarray, ...]:
    """The obvious ray-plane intersection, panel by panel (nearest panel wins)."""
    best = np.full(len(u), np.inf)
    out = np.full(len(u), -1), np.full(len(u), np.nan), np.full(len(u), np.nan)
    for i, (origin, fvec, svec, (height, width)) in enumerate(
            zip(det.origins, det.fs_vecs, det.ss_vecs, det.shapes, strict=False)):
        normal = np.cross(fvec, svec)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (origin @ normal) / (u @ normal)
        a, b = np.linalg.solve(np.stack([fvec, svec, normal], axis=1),
                               (t[:, None] * u - origin).T)[:2]
        hit = (t > 0) & (a >= 0) & (a < width) & (b >= 0) & (b < height) & (t < best)
        best[hit] = t[hit]
        out[0][hit], out[1][hit], out[2][hit] = i, a[hit] - 0.5, b[hit] - 0.5
    return out


@pytest.mark.parametrize("name", ["crystfel_doc_cspad-cxiformat", "om_lcls_mfx_epix10k2M",
                                  "extrafoam_agipd_mar18_v11"])
def test_vectorised_cast_matches_panel_loop(real_data, name):
    det = DetectorModel.from_geometry(read_geometry(real_data / "crystfel_geometry" /
                                                    f"{name}.geom"))
    u = np.random.default_rng(4).standard_normal((4000, 3))
    u[:, 2] = np.abs(u[:, 2]) * 2
    panel, fs, ss = det.cast(u)
    ref_panel, ref_fs, ref_ss = _cast_one_panel_at_a_time(det, u)
    assert np.array_equal(panel, ref_panel) and (panel >= 0).sum() > 200
    np.testing.assert_allclose(fs, ref_fs, atol=1e-6)
    np.testing.assert_allclose(ss, ref_ss, atol=1e-6)


def test_background_is_cached_read_only_and_bounded(cspad):
    det = detector_model(cspad, 0.1)
    rng = np.random.default_rng(0)
    cfg = SimConfig()
    first = _background(det, 1.3, cfg, rng)
    assert _background(det, 1.3, cfg, rng) is first and not first.flags.writeable
    other = _background(det, 1.3, dataclasses.replace(cfg, air_photons=0.3), rng)
    assert other is not first and other.mean() > first.mean()
    for i in range(12):  # randomised settings must not grow the cache without bound
        _background(det, 1.0 + i / 10, cfg, rng)
    assert sum(1 for k in det._cache if isinstance(k, tuple) and k[0] == "background") <= 4


def test_kapton_streak_moves_per_frame_and_adds_photons(cspad):
    det = detector_model(cspad, 0.1)
    cfg = SimConfig(kapton=True, kapton_photons=3.0)
    plain = _background(det, 1.3, dataclasses.replace(cfg, kapton=False), np.random.default_rng(0))
    a = _background(det, 1.3, cfg, np.random.default_rng(1))
    b = _background(det, 1.3, cfg, np.random.default_rng(2))
    assert np.all(a >= plain) and np.all(b >= plain)
    streak_a, streak_b = a - plain, b - plain
    assert streak_a.max() > 10 * plain.mean()
    assert not np.array_equal(streak_a > 0.1 * streak_a.max(), streak_b > 0.1 * streak_b.max())


def test_frame_statistics_match_expected_photons_and_read_noise(cspad):
    """Blank frame, gain 1: mean ADU = expected photons + pedestal, variance = photons + noise^2."""
    cfg = SimConfig(hit_probability=0.0, pedestal_sigma=0.0, dead_fraction=0.0, hot_fraction=0.0,
                    read_noise=0.3, adu_per_photon=2.0, air_photons=0.5, water_photons=0.0)
    frame, _ = simulate_frame(cspad, 5, cfg)
    values = np.concatenate([p.ravel() for p in frame.panels]) / 2.0  # back to photons
    good = np.concatenate([m.ravel() for m in frame.masks])
    wavelength, _ = resolve_beam(cspad, cfg)
    lam = _background(detector_model(cspad, cfg.default_clen_m), wavelength, cfg,
                      np.random.default_rng(0))[good].astype(float)
    residual = (values[good] - lam) / np.sqrt(lam + 0.3 ** 2)
    assert abs(residual.mean()) < 5 / np.sqrt(residual.size)
    assert abs(residual.var() - 1) < 0.02
