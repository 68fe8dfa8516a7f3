"""benchmarks/select_faint_snr.py: its grid starts at height alone (what it is compared
against), and its rule asks a smaller gain than select_faint_support's, with the same limits."""
from __future__ import annotations

from pathlib import Path

import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "select_faint_snr.py")


def rows(fpb: float, indexable: int = 100, f1: float = 0.93):
    a = {"f1": {"clean": 0.9, "sharp": 0.9}, "false_per_blank": 0.3}
    b = {"false_per_blank": fpb, "blank_hits": 2, "indexable_called": indexable,
         "detectors": {"cspad": {"f1": f1}}}
    return a, b


def choose(script, **settings):
    frames = {float(k[1:]): v[0] for k, v in settings.items()}
    runs = {float(k[1:]): v[1] for k, v in settings.items()}
    return script.faint.choose(frames, runs, script.SNRS[0], script.LEAST_GAIN)


def test_the_grid_starts_at_height_alone(script):
    assert script.SNRS[0] == 0.0 and list(script.SNRS) == sorted(script.SNRS)


def test_the_fewest_false_peaks_that_keep_every_indexable_hit(script):
    assert choose(script, s0=rows(1.14), s4=rows(0.53), s5=rows(0.38, indexable=98)) == 4.0
    assert choose(script, s0=rows(1.14), s4=rows(0.53), s5=rows(0.525)) == 4.0  # a tie
    assert choose(script, s0=rows(1.14), s4=rows(0.53, f1=0.92)) == 0.0  # F1 lost
    assert choose(script, s0=rows(1.14), s4=rows(1.0)) == 0.0  # under the least gain, 0.2
