"""Pseudo-Voigt window fits: known parameters come back, bad windows are recorded, not raised."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.labelling import pvoigt as pv

TRUE = [800.0, 104.3, 57.6, 1.1, 0.9, 1.2, 1.0, 0.4, 20.0, 0.5, -0.3]


def _window(params=TRUE, *, poisson=True, seed=0, fs0=100, ss0=53):
    return pv.synthetic_window(params, 9, fs0=fs0, ss0=ss0, rng=np.random.default_rng(seed),
                               poisson=poisson)


def test_noiseless_window_recovers_every_parameter():
    out = pv.fit_window(_window(poisson=False))
    assert out.status == "ok"
    got = np.array([out.row[name] for name in pv.PARAM_NAMES])
    assert got[1] == pytest.approx(TRUE[1], abs=1e-3)
    assert got[2] == pytest.approx(TRUE[2], abs=1e-3)
    assert got[0] == pytest.approx(TRUE[0], rel=1e-2)
    assert out.row["redchi"] < 1e-3


def test_centre_within_a_tenth_of_a_pixel_under_poisson_noise():
    rng = np.random.default_rng(7)
    errors = []
    for seed in range(25):
        params = list(TRUE)
        params[1] = 104 + rng.uniform(-0.5, 0.5)
        params[2] = 57 + rng.uniform(-0.5, 0.5)
        out = pv.fit_window(_window(params, seed=seed, fs0=100, ss0=53))
        assert out.status == "ok", out.message
        errors.append(np.hypot(out.row["x0"] - params[1], out.row["y0"] - params[2]))
    assert max(errors) < 0.1


def test_label_is_the_half_maximum_of_the_profile():
    win = _window(poisson=False)
    out = pv.fit_window(win)
    yy, xx = np.mgrid[53:62, 100:109].astype(float)
    peak = pv.profile(TRUE, xx, yy)[0]
    expected = peak >= 0.5 * peak.max()
    assert np.array_equal(out.label, expected)
    assert 3 <= out.label.sum() <= 25
    assert out.row["nlabel"] == out.label.sum()


def test_masked_pixels_are_left_out_and_never_labelled():
    win = _window(seed=3)
    win.data[4, 4] = 1e6  # a hot pixel at the centre, flagged bad
    win.valid[4, 4] = False
    out = pv.fit_window(win)
    assert out.status == "ok"
    assert abs(out.row["x0"] - TRUE[1]) < 0.2 and abs(out.row["y0"] - TRUE[2]) < 0.2
    assert not out.label[4, 4]
    assert out.row["npix"] == 80


def test_windows_at_panel_edges_are_clipped_not_padded():
    image = np.zeros((40, 50))
    yy, xx = np.mgrid[0:40, 0:50].astype(float)
    image += pv.model([500, 1.2, 0.8, 1.0, 1.0, 1.1, 1.1, 0.3, 10, 0, 0], xx, yy, 1, 1)
    (win,) = pv.extract_windows(image, None, [1.2], [0.8], 9)
    assert win.data.shape == (6, 6) and (win.fs0, win.ss0) == (0, 0)
    out = pv.fit_window(win)
    assert out.status == "ok"
    assert out.row["x0"] == pytest.approx(1.2, abs=0.05)
    labels = pv.paint_labels(image.shape, [out])
    assert labels[1, 1] == 1 and labels.sum() == out.label.sum()


def test_bad_windows_become_recorded_outcomes():
    image = np.random.default_rng(0).poisson(20, (30, 30)).astype(float)
    off, noise = pv.extract_windows(image, None, [-20.0, 15.0], [5.0, 15.0], 9)
    assert pv.fit_window(off).status == "too_few_pixels"
    assert pv.fit_window(noise).status == "weak"
    nan = _window(seed=1)
    nan.data[:] = np.nan
    nan.valid[:] = np.isfinite(nan.data)
    assert pv.fit_window(nan).status == "too_few_pixels"
    table = pv.outcomes_table([pv.fit_window(off), pv.fit_window(noise)])
    assert [pv.STATUS[s] for s in table["status"]] == ["too_few_pixels", "weak"]


def test_reduced_chi_square_rejects_a_poor_model():
    # two close peaks in one window: one pseudo-Voigt cannot describe it
    params_a = [600.0, 103.0, 57.0, 0.7, 0.7, 0.8, 0.8, 0.2, 10.0, 0, 0]
    params_b = [600.0, 106.0, 57.0, 0.7, 0.7, 0.8, 0.8, 0.2, 0.0, 0, 0]
    yy, xx = np.mgrid[53:62, 100:109].astype(float)
    data = pv.model(params_a, xx, yy, 104, 57) + pv.model(params_b, xx, yy, 104, 57)
    win = pv.Window(data, np.ones(data.shape, bool), 100, 53, 104.0, 57.0)
    loose = pv.fit_window(win, {"redchi_max": 1e9, "max_shift": 10})
    assert loose.row["redchi"] > 5
    assert pv.fit_window(win, {"redchi_max": 5.0, "max_shift": 10}).status == "redchi"


def test_baseline_fits_the_same_window():
    result = pv.fit_window_baseline(_window(seed=2))
    assert result.success
    assert result.params["dx0"].value + 104 == pytest.approx(TRUE[1], abs=0.15)


# the user trial: bright simulated CSPAD spots (about 32 ADU per photon) were all rejected as
# redchi, since the weights counted ADU as photons and a right fit's redchi came out near the gain
BRIGHT_ADU = [300 * 32.0, 104.3, 57.6, 1.1, 0.9, 1.2, 1.0, 0.4, 2 * 32.0, 0.0, 0.0]


def test_noise_model_is_in_the_units_of_the_data():
    data = np.array([-5.0, 0.0, 320.0])
    assert np.array_equal(pv.noise_variance(data, 1.0), np.abs(data) + 1.0)  # photons: as before
    # 10 photons at 32 ADU each: 10 photons^2 of variance, 1 photon^2 of floor, in ADU^2
    assert pv.noise_variance(np.array([320.0]), 32.0)[0] == pytest.approx(32.0**2 * 11)


def test_a_right_fit_in_adu_has_a_reduced_chi_square_near_one():
    redchis, statuses = [], []
    for seed in range(8):
        win = pv.synthetic_window(BRIGHT_ADU, 9, fs0=100, ss0=53,
                                  rng=np.random.default_rng(seed), gain=32.0)
        assert win.gain == 32.0
        out = pv.fit_window(win)
        redchis.append(out.row["redchi"])
        statuses.append(out.status)
        assert abs(out.row["x0"] - BRIGHT_ADU[1]) < 0.1
    assert statuses == ["ok"] * 8
    assert 0.6 < np.median(redchis) < 1.5


def test_windows_carry_their_panel_gain_to_the_fit():
    image = np.zeros((20, 20))
    wins = pv.extract_windows(image, None, [10.0], [10.0], 9, panel=3, gain=7.5)
    assert wins[0].gain == 7.5 and wins[0].panel == 3
    with pytest.raises(ValueError, match="gain"):
        pv.extract_windows(image, None, [10.0], [10.0], 9, gain=0.0)
