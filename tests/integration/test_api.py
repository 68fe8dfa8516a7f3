"""Integrator.integrate on frames as readers hand them over (float32 pixels, the stored type in
meta): marked pixels count in no shoebox, as the finder leaves them out."""
from __future__ import annotations

import numpy as np

from peaknet_xtal.integration import Integrator
from peaknet_xtal.types import Frame


def test_a_gap_marked_in_the_data_counts_in_no_shoebox():
    """65535 in uint16 frames marks a gap: integrated as if it were masked, not as 65535 counts
    beside the spot (the finder's sanitised mask used to reach only the CXI output)."""
    rng = np.random.default_rng(4)
    image = rng.poisson(3.0, (48, 48)).astype(np.float32)
    yy, xx = np.indices(image.shape)
    image += (200.0 * np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 2.0)).astype(np.float32)
    marked = image.copy()
    marked[24, 27] = 65535.0
    masked = np.ones(image.shape, bool)
    masked[24, 27] = False
    integrator = Integrator()
    args = ([0], [24.0], [24.0])
    got = integrator.integrate(Frame(panels=[marked], meta={"dtype": "uint16"}), *args)
    want = integrator.integrate(Frame(panels=[marked], masks=[masked]), *args)
    np.testing.assert_allclose(got["photons"], want["photons"], rtol=1e-6)
    np.testing.assert_allclose(got["sum_photons"], want["sum_photons"], rtol=1e-6)
    assert got["sum_photons"][0] < 2000  # the spot's ~1,260, not the marker's 65535 counts


def test_a_spot_without_one_usable_pixel_is_nan_and_counted_not_a_made_up_value(caplog):
    """A spot whose whole box is masked (a bad region, a mask over it) was written with the
    fit's starting intensity and sigma 0 in the likelihood columns mergers read (2054 +- 0
    photons in a user trial), and the prior's moments as its posterior; now NaN in every
    model column, counted in the log, beside a well-measured spot integrated as before."""
    rng = np.random.default_rng(5)
    image = rng.poisson(3.0, (64, 96)).astype(np.float32)
    yy, xx = np.indices(image.shape)
    for cy, cx in ((32, 24), (32, 72)):
        image += (300.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)).astype(np.float32)
    good = np.ones(image.shape, bool)
    good[:, 48:] = False  # the second spot's box: no usable pixel
    integrator = Integrator()
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        got = integrator.integrate(Frame(panels=[image], masks=[good]), [0, 0], [24.0, 72.0],
                                   [32.0, 32.0])
    for name in ("photons", "photons_sigma", "lik_photons", "lik_sigma", "sum_photons"):
        assert np.isnan(got[name][1]), (name, got[name])
    assert np.isfinite(got["lik_photons"][0]) and got["lik_sigma"][0] > 0
    assert 0.5 * 1885 < got["photons"][0] < 1.5 * 1885  # 300 x 2 pi, its true photons
    said = [r.getMessage() for r in caplog.records if "no photons measured" in r.getMessage()]
    assert said and said[0].startswith("1 of 2 spots")
    alone = integrator.integrate(Frame(panels=[image], masks=[good]), [0], [24.0], [32.0])
    np.testing.assert_allclose(alone["photons"], got["photons"][:1], rtol=1e-5)


def test_an_image_is_integrated_as_the_finder_takes_it():
    """The README's example passes the image the finder was given (a 2-D array) with the
    peaks' columns: it raised AttributeError ('numpy.ndarray' object has no attribute
    'panels'); an array, its uint16 original (65535 marks) and a list of panels read alike."""
    from peaknet_xtal.finding.api import PeakFinder

    rng = np.random.default_rng(5)
    image = rng.poisson(3.0, (48, 48)).astype(np.float32)
    yy, xx = np.indices(image.shape)
    image += (300.0 * np.exp(-((yy - 20) ** 2 + (xx - 30) ** 2) / 2.0)).astype(np.float32)
    peaks = PeakFinder().find(image)
    assert len(peaks) >= 1
    columns = (peaks["panel"], peaks["fs"], peaks["ss"])
    integrator = Integrator()
    table = integrator.integrate(image, *columns, gain=1.0, read_noise=0.1)
    framed = integrator.integrate(Frame(panels=[image]), *columns, gain=1.0, read_noise=0.1)
    np.testing.assert_array_equal(table["photons"], framed["photons"])
    assert np.all(table["photons"] > 100)
    stored = np.rint(image).astype(np.uint16)
    stored[20, 33] = 65535
    marked = integrator.integrate(stored, *columns)
    listed = integrator.integrate([np.rint(image).astype(np.uint16)], *columns)
    assert abs(marked["sum_photons"][0] - listed["sum_photons"][0]) < 100  # not 65535 more


def test_an_empty_box_on_an_empty_background_knows_its_zero_to_about_a_photon(monkeypatch):
    """A photon-counting detector's near-empty background (no read noise): a box with no photon
    in it read I = 0 with sigma 0.005 photons in the likelihood columns a merger weighs by
    (a user trial: 542 of 13,210 reflections, z RMS 30-38 among the weak ones).  Its Poisson
    likelihood falls by e over about one photon, so that is its sigma now; a bright spot's fit
    is the same as before (the floor is below what it holds)."""
    from peaknet_xtal.integration import model

    rng = np.random.default_rng(6)
    image = rng.poisson(0.02, (64, 96)).astype(np.float32)  # ~0.02 photons a pixel
    yy, xx = np.indices(image.shape)
    bright = rng.poisson(400.0 * np.exp(-((yy - 32) ** 2 + (xx - 72) ** 2) / 2.0))
    image += bright.astype(np.float32)
    image[24:41, 16:33] = 0.0  # the empty spot's box: no photon at all
    integrator = Integrator()
    args = ([0, 0], [24.0, 72.0], [32.0, 32.0])
    got = integrator.integrate(Frame(panels=[image]), *args, gain=1.0, read_noise=0.0)
    assert abs(got["lik_photons"][0]) < 0.5
    assert 0.3 < got["lik_sigma"][0] < 3.0  # about a photon, not a few thousandths
    monkeypatch.setattr(model, "WEIGHT_PHOTONS", 0.0)  # the weights as they were
    before = integrator.integrate(Frame(panels=[image]), *args, gain=1.0, read_noise=0.0)
    assert before["lik_sigma"][0] < 0.1  # what the trial met
    np.testing.assert_allclose(got["lik_photons"][1], before["lik_photons"][1], rtol=1e-6)
    np.testing.assert_allclose(got["lik_sigma"][1], before["lik_sigma"][1], rtol=1e-6)
