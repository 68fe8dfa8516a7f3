"""benchmarks/select_spike_cores.py: the rule it decides by (select_faint_support's limits on
B against the filter without the test, and a least gain)."""
from __future__ import annotations

from pathlib import Path

import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "select_spike_cores.py")


def runs(fpb: float, blank_hits: int = 0, indexable: int = 100, f1: float = 0.93):
    return {"false_per_blank": fpb, "blank_hits": blank_hits, "indexable_called": indexable,
            "detectors": {"cspad": {"f1": f1, "false_per_blank": fpb},
                          "rayonix": {"f1": 0.9, "false_per_blank": fpb}}}


def decide(script, monkeypatch, off, on):
    """The script's decision with ``score_runs`` answering ``off`` and ``on`` for the two."""
    numbers = {False: off, True: on}
    monkeypatch.setattr(script.faint, "score_runs",
                        lambda records, *args: numbers[records["cspad"][0]])
    return script.decide({"off": {"cspad": [False]}, "on": {"cspad": [True]}})


def test_compared_against_the_filter_without_the_test(script):
    assert script.SETTINGS["off"] == {"cores": False} and script.SETTINGS["on"]["cores"]


def test_adopted_when_it_takes_false_peaks_down_within_the_limits(script, monkeypatch):
    table, chosen = decide(script, monkeypatch, runs(0.53), runs(0.35))
    assert chosen == "on" and "yes" in table
    assert [line.split("|")[1].strip() for line in table.splitlines()[1:]] == [
        "0.53, 0, 100", "0.35, 0, 100"]


@pytest.mark.parametrize("on", [
    runs(0.46),  # under the least gain (0.1)
    runs(0.35, blank_hits=1),  # a blank more called a hit
    runs(0.35, indexable=99),  # an indexable hit lost
    runs(0.35, f1=0.927),  # a detector's F1 down by more than 0.002
])
def test_not_adopted_past_a_limit(script, monkeypatch, on):
    assert decide(script, monkeypatch, runs(0.53), on)[1] == "off"
