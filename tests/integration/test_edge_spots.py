"""Spots cut by a panel edge: a real estimate of their photons, never a clamped placeholder."""
from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("torch")

from peaknet_xtal.integration import Integrator  # noqa: E402
from peaknet_xtal.integration.shoebox import Shoeboxes  # noqa: E402

#: The visible part (rows 0-11, columns 7-14; photons at 27.9 ADU each) of a shoebox of the
#: CSPAD thermolysin still idx-20130301060858401.cbf, a peak found at fs 0.02 of its panel: the
#: left half of the box is off the panel and its last three rows are off the panel's bottom.
EDGE_BOX = np.array([
    [23.7, 0.9, 0.8, 0.4, 0.4, 0.5, 1.1, 0.5], [28.1, 0.8, 0.3, 0.9, 0.4, 0.8, 0.8, 0.7],
    [41.0, 0.8, 0.3, 1.3, 0.4, 0.4, 0.8, 1.1], [47.2, 0.4, 0.2, 0.8, 0.4, 0.3, 0.7, 0.8],
    [47.3, 0.9, 0.8, 0.8, 1.4, 0.7, 0.5, 0.5], [41.9, 0.3, 0.3, 0.3, 0.4, 0.4, 0.8, 0.8],
    [47.4, 0.8, 0.5, 0.2, 0.4, 0.4, 0.6, 0.5], [38.9, 0.4, 1.2, 0.7, 0.4, 0.3, 0.4, 0.4],
    [28.1, 1.9, 0.7, 0.4, 0.4, 0.7, 0.4, 0.9], [17.8, 1.1, 0.5, 1.0, 0.4, 0.4, 0.4, 0.8],
    [1.4, 1.0, 0.4, 0.5, 0.5, 1.8, 0.4, 0.8], [0.4, 1.4, 0.8, 1.1, 1.1, 0.5, 1.5, 0.5]],
    dtype=np.float32)


def _edge_box() -> Shoeboxes:
    pixels = np.zeros((1, 15, 15), np.float32)
    mask = np.zeros((1, 15, 15), bool)
    pixels[0, :12, 7:] = EDGE_BOX
    mask[0, :12, 7:] = True
    return Shoeboxes(pixels, mask, np.zeros(1, np.int32), np.array([0.02]), np.array([180.13]),
                     np.array([0.4]), np.array([[-0.77, -0.64]], np.float32), np.array([27.9]),
                     np.zeros(1, np.float32))


def test_a_spot_cut_by_the_panel_edge_gets_a_real_posterior_mean(caplog):
    """The shape error makes the likelihood of a spot 40 % off the panel many times wider than
    the plain one; the posterior mean must follow the likelihood there (about 500 photons, as
    the likelihood-only fit says), not come out negative and be written as a 1e-6 placeholder
    with a sigma of 200."""
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal"):
        table = Integrator().integrate_boxes(_edge_box())
    row = table[0]
    assert 0.5 < row["profile_observed"] < 0.7
    assert row["lik_photons"] > 2 * row["lik_sigma"]
    assert row["photons"] > 100, row
    assert abs(row["photons"] - row["lik_photons"]) < 0.5 * row["photons_sigma"]
    assert row["photons_sigma"] == pytest.approx(row["lik_sigma"], rel=0.1)
    assert not caplog.records  # a real estimate: nothing to report


def test_posterior_moments_are_nan_and_counted_where_no_estimate_is_possible(caplog):
    """Where the posterior moments come out non-positive or not finite (no estimate is
    possible), the spot gets NaN and one warning counts such spots and says why; no clamped
    number that reads like a measurement."""
    from peaknet_xtal.integration.model import shape_error_moments

    torch = pytest.importorskip("torch")
    t = torch.tensor
    # a posterior at 5 +- 3 photons, a plain fit at 5 +- 3, a shape-error fit far negative
    mean, sd = shape_error_moments(t([5.0, 300.0]), t([9.0, 700.0]), t([5.0, 300.5]),
                                   t([9.0, 670.0]), t([-500.0, 520.0]), t([4e4, 4e4]))
    assert np.isnan(float(mean[0])) and np.isnan(float(sd[0]))
    assert float(mean[1]) == pytest.approx(519.5, abs=1.0)
    boxes = Shoeboxes.concatenate([_edge_box(), _edge_box()])
    boxes.pixels[1] = np.nan  # a box the model cannot read: no finite moments
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal"):
        table = Integrator().integrate_boxes(boxes)
    assert np.isfinite(table["photons"][0]) and np.isnan(table["photons"][1])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "1 of 2 spots" in said[0] and "NaN" in said[0], said
