"""The issue's criteria on held-out simulated shoeboxes, with the shipped default integrator.

Done when (issue 18): the VI posterior mean has a lower RMS error than summation for weak spots
(true I/sigma below 5) and no higher elsewhere, and the normalised errors have a spread within
0.9-1.1 in every bin.  The held-out frames are the 40 of the README's report (acceptance seed 2;
the default was trained on seed 1 and its ``profile_noise`` selected on seed 3).  All 40, not a
subset: conditions vary per frame (spot shape, fluence, gain), so a bin's z RMS over a dozen
frames moves by several hundredths with the frames drawn (0.06 between the first 12 and all 40
in the own-I/sigma 2-5 bin), as much as the criterion's margin.
"""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.integration.evaluation import (
    BINS,
    MIN_SPOTS_PER_BIN,
    accuracy_table,
    calibration_table,
    format_markdown,
    lognormal_interval,
)


@pytest.fixture(scope="module")
def held_out():
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.simdata import simulate_shoeboxes

    boxes = simulate_shoeboxes(40, 2)
    boxes = boxes.select(np.flatnonzero(boxes.mask.mean(axis=(1, 2)) >= 0.95))
    return boxes, Integrator("default").integrate_boxes(boxes)


def test_lognormal_interval_has_its_mean_and_coverage():
    rng = np.random.default_rng(0)
    draws = np.exp(rng.normal(1.0, 0.7, 200_000))
    lo, hi = lognormal_interval(np.array([draws.mean()]), np.array([draws.std()]), 1.0)
    assert np.mean((draws >= lo) & (draws <= hi)) == pytest.approx(0.6827, abs=0.01)


def test_tables_bin_and_score_a_known_case():
    truth = np.array([1.0, 1.0, 100.0, 100.0])
    snr = np.array([0.5, 0.5, 30.0, 30.0])
    rows = accuracy_table(truth, snr, {"a": np.array([2.0, 0.0, 110.0, 90.0])})
    assert [r["n"] for r in rows] == [2, 0, 0, 0, 0, 2]
    assert rows[0]["rmse_a"] == pytest.approx(1.0) and rows[-1]["rmse_a"] == pytest.approx(10.0)
    cal = calibration_table(truth, np.array([2.0, 0.5, 110.0, 90.0]),
                            np.array([4.0, 1.0, 4.0, 4.0]), lognormal=False)
    assert len(cal) == len(BINS) - 1
    assert cal[-1]["n"] == 2 and cal[-1]["z_rms"] == pytest.approx(2.5)
    assert cal[-1]["cover95"] == 0.0 and cal[0]["cover68"] == 1.0


def test_the_report_measures_no_spread_in_a_bin_of_a_few_spots():
    rng = np.random.default_rng(0)
    truth = np.full(MIN_SPOTS_PER_BIN + 3, 100.0)
    sd = np.full(truth.size, 2.0)  # own I/sigma ~50
    mean = truth + sd * rng.normal(size=truth.size)
    mean[:3], sd[:3] = 1.0, 4.0  # three spots of own I/sigma < 1
    cal = calibration_table(truth, mean, sd, lognormal=False)
    text = format_markdown(accuracy_table(truth, truth / sd, {"vi": mean}), {"VI": cal})
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| VI |")}
    assert rows["< 1"].endswith("| 3 | - | - | - | - |")  # counted, not measured
    assert rows[">= 20"].split(" | ")[2] == str(MIN_SPOTS_PER_BIN)
    assert rows[">= 20"].split(" | ")[3] != "-"


def _accuracy(held_out):
    boxes, result = held_out
    rows = accuracy_table(boxes.extra["photons"], boxes.extra["snr"],
                          {"vi": result["photons"], "sum": result["sum_photons"]})
    return [(row, hi) for row, hi in zip(rows, BINS[1:], strict=True)
            if row["n"] >= MIN_SPOTS_PER_BIN]


def test_vi_beats_summation_on_weak_spots(held_out):
    weak = [row for row, hi in _accuracy(held_out) if hi <= 5]
    assert len(weak) == 3
    for row in weak:
        assert row["rmse_vi"] < row["rmse_sum"], row


def test_vi_is_no_worse_than_summation_elsewhere(held_out):
    for row, hi in _accuracy(held_out):
        if hi > 5:
            # "no higher": an RMS over n >= 50 spots carries ~1/sqrt(2n) <= 10 % sampling error
            assert row["rmse_vi"] <= row["rmse_sum"] * (1 + 1 / np.sqrt(2 * row["n"])), row


def test_normalised_errors_have_unit_spread_in_every_bin(held_out):
    boxes, result = held_out
    rows = calibration_table(boxes.extra["photons"], result["photons"], result["photons_sigma"],
                             lognormal=True)
    checked = [r for r in rows if r["n"] >= MIN_SPOTS_PER_BIN]
    assert len(checked) >= 4
    for row in checked:
        assert 0.9 <= row["z_rms"] <= 1.1, row
