"""Peak matching and the PeakNet pipeline rates."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.evaluation.metrics import match_peaks, pipeline_rates, score_frame, score_frames
from peaknet_xtal.types import peaks_from_columns


def test_match_is_one_to_one_same_panel_within_cutoff():
    # b0 is near a0 and a1; optimal assignment pairs a0-b1? no: a1-b0 and a0-b1 total less.
    a = dict(panel=[0, 0, 1, 0], fs=[10.0, 12.0, 10.0, 50.0], ss=[10.0, 10.0, 10.0, 50.0])
    b = dict(panel=[0, 0, 0], fs=[11.9, 9.0, 10.0], ss=[10.0, 10.0, 10.0])
    ia, ib, d = match_peaks(a["panel"], a["fs"], a["ss"], b["panel"], b["fs"], b["ss"], 2.5)
    pairs = set(zip(ia.tolist(), ib.tolist(), strict=False))
    assert len(pairs) == 2 and len(set(ia)) == 2 and len(set(ib)) == 2
    assert (1, 0) in pairs  # a1 (12,10) with b0 (11.9,10)
    assert all(i != 2 for i in ia)  # panel 1 never matches panel 0
    assert all(i != 3 for i in ia)  # too far
    assert np.all(d <= 2.5)


def test_hungarian_maximises_matches_before_distance():
    # Greedy nearest-first would pair a0-b0 (0.5) and leave a1 unmatched.
    a_fs, b_fs = np.array([0.0, 2.4]), np.array([0.5, -1.5])
    ia, ib, _ = match_peaks([0, 0], a_fs, [0, 0], [0, 0], b_fs, [0, 0], 2.0)
    assert sorted(zip(ia.tolist(), ib.tolist(), strict=False)) == [(0, 1), (1, 0)]


def test_scores_and_median_error():
    truth = peaks_from_columns(panel=[0, 0, 0, 1], fs=[5.0, 20.0, 40.0, 5.0],
                               ss=[5.0, 20.0, 40.0, 5.0])
    found = peaks_from_columns(panel=[0, 0, 2], fs=[5.3, 20.0, 5.0], ss=[5.4, 21.0, 5.0])
    score, dist = score_frame(found, truth, cutoff=3.0)
    assert (score.n_found, score.n_true, score.n_matched) == (3, 4, 2)
    assert score.precision == pytest.approx(2 / 3) and score.recall == pytest.approx(0.5)
    assert score.f1 == pytest.approx(2 * 2 / 7)
    assert score.median_error_px == pytest.approx(np.median([0.5, 1.0]))
    overall = score_frames([(found, truth), (truth, truth)])["overall"]
    assert overall.n_matched == 6 and overall.n_true == 8


def test_pipeline_rates_follow_peaknet_definitions():
    hits = [True] * 6 + [False] * 4
    indexed = [True, True, True, False, False, False] + [False] * 4
    rates = pipeline_rates(hits, indexed)
    assert rates["hit_rate"] == pytest.approx(0.6)
    assert rates["indexing_rate"] == pytest.approx(0.5)
    assert rates["indexing_yield"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="indexed but not a hit"):
        pipeline_rates([False], [True])


def test_peaks_on_weak_reflections_are_not_false_positives():
    strong = peaks_from_columns(panel=[0, 0], fs=[5.0, 20.0], ss=[5.0, 20.0])
    weak = peaks_from_columns(panel=[0], fs=[40.0], ss=[40.0])
    every = np.concatenate([strong, weak])
    found = peaks_from_columns(panel=[0, 0, 0], fs=[5.2, 40.1, 70.0], ss=[5.0, 40.0, 70.0])
    score, _ = score_frame(found, strong, 3.0, also_true=every)
    assert score.n_matched == 1 and score.n_correct == 2  # the weak one is right, 70/70 is not
    assert score.precision == pytest.approx(2 / 3) and score.recall == pytest.approx(0.5)
    assert score.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    overall = score_frames([(found, strong, every), (strong, strong, every)])["overall"]
    assert overall.n_correct == 4 and overall.precision == pytest.approx(4 / 5)


def test_bootstrap_f1_interval_contains_the_f1_and_narrows_with_more_frames():
    from peaknet_xtal.evaluation.metrics import PeakScore, bootstrap_f1

    rng = np.random.default_rng(0)

    def frames(n: int) -> list[PeakScore]:
        out = []
        for _ in range(n):
            true = int(rng.integers(20, 60))
            matched = int(rng.binomial(true, 0.8))
            found = matched + int(rng.integers(0, 8))
            out.append(PeakScore(found, true, matched, 0.2, matched))
        return out

    few, many = frames(10), frames(200)
    for sample in (few, many):
        total = PeakScore(sum(s.n_found for s in sample), sum(s.n_true for s in sample),
                          sum(s.n_matched for s in sample), 0.2,
                          sum(s.n_matched for s in sample))
        lo, hi = bootstrap_f1(sample)
        assert lo <= total.f1 <= hi
    assert np.diff(bootstrap_f1(many)) < np.diff(bootstrap_f1(few))
    identical = [PeakScore(10, 10, 9, 0.1, 9)] * 30  # no spread between frames: no width
    lo, hi = bootstrap_f1(identical)
    assert lo == pytest.approx(hi)
    assert np.isnan(bootstrap_f1([])[0])


def test_paired_bootstrap_sees_a_steady_difference_that_unpaired_intervals_hide():
    from peaknet_xtal.evaluation.metrics import PeakScore, bootstrap_f1, bootstrap_f1_difference

    rng = np.random.default_rng(1)
    first, second = [], []
    for _ in range(30):  # frames differ a lot; the second finder misses 2 more on each
        true = int(rng.integers(20, 200))
        matched = int(rng.binomial(true, rng.uniform(0.5, 0.95)))
        first.append(PeakScore(matched, true, matched, 0.2, matched))
        second.append(PeakScore(matched - 2, true, matched - 2, 0.2, matched - 2))
    lo, hi = bootstrap_f1_difference(first, second)
    assert 0 < lo <= hi  # the first is better, and the paired interval says so
    a, b = bootstrap_f1(first), bootstrap_f1(second)
    assert a[0] < b[1]  # while the two intervals overlap
    lo, hi = bootstrap_f1_difference(first, first)
    assert lo == hi == 0
    with pytest.raises(ValueError, match="paired"):
        bootstrap_f1_difference(first, second[:-1])
