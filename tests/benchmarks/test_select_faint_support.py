"""benchmarks/select_faint_support.py: the rule that chooses faint_support, and the blank
benchmark's records cut by it as the engine cuts a frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

from peaknet_xtal.types import peaks_from_columns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "select_faint_support.py")


def rows(fpb: float, blank_hits: int = 2, indexable: int = 100, f1: float = 0.93,
         a_f1: float = 0.9, a_fpb: float = 0.3):
    a = {"f1": {"clean": a_f1, "sharp": a_f1}, "false_per_blank": a_fpb}
    b = {"false_per_blank": fpb, "blank_hits": blank_hits, "indexable_called": indexable,
         "detectors": {"cspad": {"f1": f1}, "rayonix": {"f1": f1}}}
    return a, b


def grid(**settings):
    frames, runs = {}, {}
    for support, row in settings.items():
        frames[int(support[1:])], runs[int(support[1:])] = row
    return frames, runs


def test_the_fewest_false_peaks_among_passing_supports_the_smaller_on_a_tie(script):
    frames, runs = grid(s0=rows(3.0, blank_hits=5), s1=rows(2.0), s3=rows(1.2),
                        s5=rows(1.195), s10=rows(0.9, indexable=99))
    assert script.choose(frames, runs) == 3  # 10 loses an indexable hit; 3 and 5 tie
    frames, runs = grid(s0=rows(3.0, blank_hits=5), s3=rows(1.2), s5=rows(1.0))
    assert script.choose(frames, runs) == 5


@pytest.mark.parametrize("bad", [dict(blank_hits=6), dict(f1=0.925), dict(a_f1=0.89),
                                 dict(a_fpb=0.4)])
def test_a_support_that_costs_anything_the_rule_guards_does_not_pass(script, bad):
    frames, runs = grid(s0=rows(3.0, blank_hits=5), s5=rows(1.0, **bad))
    assert not script.passes(frames[5], runs[5], frames[0], runs[0])
    assert script.choose(frames, runs) == 0


def test_too_small_a_gain_leaves_the_rule_off(script):
    frames, runs = grid(s0=rows(1.4, blank_hits=5), s5=rows(1.0))
    assert script.choose(frames, runs) == 0


def test_records_are_cut_frame_by_frame_as_the_engine_cuts(script):
    """The bench's per-frame cut drops a frame's faint peaks only where too few tall ones back
    them, after the SNR cut (a peak the SNR cut drops does not back anything)."""
    bench = script.bench_blanks
    heights = np.array([20.0, 20.0, 8.0, 8.0])  # over background sigma 2: 10 and 4 sigmas
    peaks = peaks_from_columns(max_value=heights, background_sigma=np.full(4, 2.0),
                               snr=np.array([10.0, 10.0, 10.0, 10.0]))
    assert bench.passes(peaks, 3.0, 0.0, 2).all()
    assert bench.passes(peaks, 3.0, 0.0, 3).tolist() == [True, True, False, False]
    assert bench.passes(peaks, 3.0, 0.0, 0).all()
    weak_tall = peaks.copy()
    weak_tall["snr"][1] = 1.0
    assert bench.passes(weak_tall, 3.0, 0.0, 2).tolist() == [True, False, False, False]
