"""Hit calling: one rule (at least ``min_peaks`` peaks, finding.settings) with one default, acted
on by the library (``InferenceEngine``, ``PeakFinder``); validated wherever it is set.

The frames are noise panels with a known number of bright 3x3 spots and a stand-in segmenter
(pixels above a level), so the peak count, and therefore the hit flag, is known exactly."""
from __future__ import annotations

import inspect

import pytest
from peaknet_test_support import BrightPredictor, spot_panel

from peaknet_xtal.finding import InferenceEngine, PeakFinder, PeakParams
from peaknet_xtal.finding.settings import DEFAULTS, check_min_peaks
from peaknet_xtal.types import Frame

RULE = DEFAULTS.min_peaks


def test_every_library_door_starts_from_the_shared_hit_rule():
    from peaknet_xtal.cli.peaknet2cxi import DEFAULTS as CLI

    assert RULE >= 1  # a frame without peaks is never a hit
    assert inspect.signature(PeakFinder).parameters["min_peaks"].default == RULE
    assert PeakParams().min_peaks == RULE
    assert InferenceEngine(predictor=BrightPredictor()).peak_params.min_peaks == RULE
    assert CLI["min_peaks"] == RULE


def test_engine_calls_a_hit_from_the_default_peak_count():
    counts = [0, RULE - 1, RULE, RULE + 3]
    frames = [Frame(panels=[spot_panel(n, seed=k)], source="mem", event=f"//{k}")
              for k, n in enumerate(counts)]
    engine = InferenceEngine(predictor=BrightPredictor(), adu_per_photon=1.0)
    results = list(engine.find_frames(frames))
    assert [len(r.peaks) for r in results] == counts
    assert [r.hit for r in results] == [False, False, True, True]
    # configurable: the same frames under a rule of one peak
    loose = InferenceEngine(predictor=BrightPredictor(), adu_per_photon=1.0, min_peaks=1)
    assert [r.hit for r in loose.find_frames(frames)] == [False, True, True, True]


def test_peak_finder_is_hit_follows_the_default():
    finder = PeakFinder(predictor=BrightPredictor(), adu_per_photon=1.0)
    assert finder.min_peaks == RULE
    few = finder.find(spot_panel(RULE - 1, seed=1))
    enough = finder.find(spot_panel(RULE, seed=2))
    assert (len(few), len(enough)) == (RULE - 1, RULE)
    assert not finder.is_hit(few) and finder.is_hit(enough)


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True, None])
def test_a_bad_hit_rule_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match="min_peaks"):
        check_min_peaks(bad)
    if bad is not None:  # None means "the default" to the engine
        with pytest.raises(ValueError, match="min_peaks"):
            InferenceEngine(predictor=BrightPredictor(), min_peaks=bad)


def test_zero_keeps_the_old_any_frame_rule():
    assert check_min_peaks(0) == 0
    engine = InferenceEngine(predictor=BrightPredictor(), min_peaks=0)
    (result,) = engine.find_frames([Frame(panels=[spot_panel(0)], source="mem", event="//0")])
    assert result.hit  # CrystFEL's --min-peaks=0: every frame
