"""benchmarks/select_rescue.py: the rule that decides the rescue of doubted peaks, and how a run's
records are cut to a height afterwards (rescued peaks told apart from the others)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

from peaknet_xtal.types import peaks_from_columns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "select_rescue.py")


def table(panel, fs, ss, height=None):
    n = len(fs)
    height = np.full(n, 50.0) if height is None else np.asarray(height, float)
    return peaks_from_columns(panel=np.asarray(panel, np.int32), fs=np.asarray(fs, float),
                              ss=np.asarray(ss, float), max_value=height * 2.0,
                              background_sigma=np.full(n, 2.0), snr=np.full(n, 10.0),
                              npix=np.ones(n, np.int32), prob=np.full(n, 0.4))


def test_rescued_rows_are_those_the_run_without_the_rescue_lacks(script):
    without = table([0, 1], [10.0, 30.0], [10.0, 30.0])
    peaks = table([0, 0, 1, 1], [10.2, 50.0, 30.0, 10.0], [10.1, 50.0, 30.3, 10.0])
    assert list(script.rescued_rows(peaks, without)) == [False, True, False, True]
    assert script.rescued_rows(peaks, without[:0]).all()


def test_a_height_cut_drops_only_low_rescued_peaks(script):
    bench = script.bench_blanks
    off_peaks = table([0], [10.0], [10.0], height=[3.0])  # low, but above the threshold
    peaks = table([0, 0, 0], [10.0, 40.0, 60.0], [10.0, 40.0, 60.0], height=[3.0, 12.0, 25.0])

    def record(p):
        return bench.FrameRecord(detector="d", index=0, seed=0, hit=True, strong=3, peaks=p,
                                 on_truth=np.ones(len(p), bool),
                                 matched_strong=np.arange(len(p)) % 2 == 0)

    cut = script.with_height(record(peaks), record(off_peaks), 20.0)
    assert list(cut.peaks["fs"]) == [10.0, 60.0]
    assert list(cut.matched_strong) == [True, True]  # per-peak flags kept in step
    assert len(script.with_height(record(peaks), record(off_peaks), 10.0).peaks) == 3


def frames_row(mixed=0.85, clean=0.90, sharp=0.70, false=0.5):
    return {"f1": {"validation": mixed, "validation-strong": mixed, "clean": clean,
                   "sharp": sharp}, "false_per_blank": false}


def runs_row(false=3.0, blank_hits=5, indexable=99, f1=0.93):
    return {"false_per_blank": false, "blank_hits": blank_hits, "indexable_called": indexable,
            "detectors": {"a": {"f1": f1}, "b": {"f1": f1}}}


def test_the_rule_takes_the_best_sharp_f1_within_the_limits(script):
    off = script.OFF
    frames = {off: frames_row(), (0.2, 10.0): frames_row(sharp=0.80),
              (0.2, 15.0): frames_row(sharp=0.79, clean=0.897),  # costs the clean hits
              (0.3, 10.0): frames_row(sharp=0.78), (0.3, 15.0): frames_row(sharp=0.7795),
              (0.4, 15.0): frames_row(sharp=0.76, clean=0.899)}
    runs = {off: runs_row(), (0.2, 10.0): runs_row(false=3.2),  # too many false peaks
            (0.2, 15.0): runs_row(), (0.3, 10.0): runs_row(false=3.1),
            (0.3, 15.0): runs_row(false=3.05), (0.4, 15.0): runs_row()}
    # (0.3, 15) ties (0.3, 10) within 0.001 and rescues less
    assert script.choose(frames, runs) == (0.3, 15.0)
    del frames[(0.3, 15.0)], runs[(0.3, 15.0)]
    assert script.choose(frames, runs) == (0.3, 10.0)
    # a lost indexable hit, one more blank hit, or a detector's F1 fails a setting
    for bad in (runs_row(indexable=98), runs_row(blank_hits=6), runs_row(f1=0.927)):
        runs[(0.3, 10.0)] = bad
        assert script.choose(frames, runs) == (0.4, 15.0)


def test_too_small_a_gain_leaves_the_rescue_off(script):
    off = script.OFF
    frames = {off: frames_row(), (0.3, 20.0): frames_row(sharp=0.704)}
    runs = {off: runs_row(), (0.3, 20.0): runs_row()}
    assert script.choose(frames, runs) == off
    frames[(0.3, 20.0)] = frames_row(sharp=0.72, false=0.65)  # more false peaks on A's blanks
    assert script.choose(frames, runs) == off
