"""Grid search on a constructed grid whose best point is known by construction.

``tune`` instantiates finders by name for every grid point, so the finder under search is a
scripted one registered in ``FINDERS`` for the test: its output is a known function of its
parameters, which makes the F1 of every grid point (and so the winner) computable by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from peaknet_xtal.evaluation import FINDERS
from peaknet_xtal.evaluation.tuning import default_grid, grid_points, tune
from peaknet_xtal.types import Frame, peaks_from_columns


@dataclass
class ThresholdFinder:
    """Keeps the frame's candidate peaks with ``score >= threshold``; ``weak=True`` adds the
    peaks planted on weak (true but not strong) reflections."""

    params: dict[str, Any] = field(default_factory=dict)
    name: str = "threshold"

    def find(self, frame: Frame) -> np.ndarray:
        candidates = frame.meta["candidates"]
        keep = candidates[frame.meta["scores"] >= self.params["threshold"]]
        if self.params.get("weak"):
            keep = np.concatenate([keep, frame.meta["weak"]])
        return keep


def frame_and_truth(seed: int) -> tuple[Frame, np.ndarray, np.ndarray]:
    """20 strong reflections scored 0.6-1.0, 10 noise candidates scored 0.25-0.55, 3 weak."""
    rng = np.random.default_rng(seed)
    fs = 4.0 + 8.0 * np.arange(33)
    strong = peaks_from_columns(panel=np.zeros(20, int), fs=fs[:20], ss=np.full(20, 5.0))
    noise = peaks_from_columns(panel=np.zeros(10, int), fs=fs[20:30], ss=np.full(10, 5.0))
    weak = peaks_from_columns(panel=np.zeros(3, int), fs=fs[30:], ss=np.full(3, 5.0))
    candidates = np.concatenate([strong, noise])
    scores = np.concatenate([rng.uniform(0.6, 1.0, 20), rng.uniform(0.25, 0.55, 10)])
    # Two strong reflections are faint to the finder: only a low threshold keeps them.
    scores[:2] = 0.35
    frame = Frame([np.zeros((10, 270), np.float32)],
                  meta={"candidates": candidates, "scores": scores, "weak": weak})
    return frame, strong, np.concatenate([strong, weak])


def expected_f1(threshold: float, frames: list[tuple[Frame, np.ndarray, np.ndarray]],
                weak_counts_as_true: bool, weak: bool) -> float:
    found = matched = correct = true = 0
    for frame, strong, _ in frames:
        kept = frame.meta["scores"] >= threshold
        n_strong = int(kept[:20].sum())
        n_noise = int(kept[20:].sum())
        found += n_strong + n_noise + (3 if weak else 0)
        matched += n_strong
        correct += n_strong + (3 if weak and weak_counts_as_true else 0)
        true += len(strong)
    p, r = correct / found, matched / true
    return 2 * p * r / (p + r)


@pytest.fixture
def frames(monkeypatch):
    monkeypatch.setitem(FINDERS, "threshold", lambda params=None: ThresholdFinder(dict(params)))
    return [frame_and_truth(seed) for seed in (1, 2)]


GRID = {"threshold": [0.2, 0.3, 0.4, 0.5, 0.58, 0.7], "weak": [True, False]}


def test_tune_scores_every_point_and_picks_the_known_best(frames):
    result = tune("threshold", [f for f, _, _ in frames], [s for _, s, _ in frames], GRID,
                  cutoff=2.0, reflections=[a for _, _, a in frames])
    assert len(result["points"]) == 12
    for point in result["points"]:
        want = expected_f1(point["params"]["threshold"], frames, True, point["params"]["weak"])
        assert point["f1"] == pytest.approx(want), point["params"]
    f1s = {(p["params"]["threshold"], p["params"]["weak"]): p["f1"] for p in result["points"]}
    best_threshold = max(GRID["threshold"], key=lambda t: expected_f1(t, frames, True, False))
    assert best_threshold == 0.58  # all strong but the 2 faint ones, no noise
    # Peaks on weak reflections are no false peaks: same F1, and the tie goes to fewer peaks.
    assert f1s[(0.58, True)] == pytest.approx(f1s[(0.58, False)])
    assert result["best"] == {"threshold": 0.58, "weak": False}
    assert result["best_score"]["f1"] == pytest.approx(max(f1s.values()))


def test_without_weak_reflections_weak_peaks_count_as_false(frames):
    result = tune("threshold", [f for f, _, _ in frames], [s for _, s, _ in frames], GRID,
                  cutoff=2.0)
    f1s = {(p["params"]["threshold"], p["params"]["weak"]): p["f1"] for p in result["points"]}
    assert f1s[(0.58, True)] == pytest.approx(expected_f1(0.58, frames, False, True))
    assert f1s[(0.58, True)] < f1s[(0.58, False)]
    assert result["best"] == {"threshold": 0.58, "weak": False}


def test_tune_rejects_mismatched_truth(frames):
    with pytest.raises(ValueError, match="2 frames but 1 truth"):
        tune("threshold", [f for f, _, _ in frames], [frames[0][1]], GRID)


def test_default_grids_scale_adu_knobs_with_gain():
    assert default_grid("peakfinder8", 10.0)["adc_threshold"] == [20.0, 50.0, 100.0, 300.0]
    assert default_grid("dispersion", 10.0)["gain"] == [10.0]
    assert default_grid("dispersion", 10.0)["global_threshold"] == [0.0, 30.0, 100.0]
    assert len(grid_points(default_grid("peakfinder8"))) == 4 * 4 * 3
    assert grid_points({"b": [1, 2], "a": ["x"]}) == [{"a": "x", "b": 1}, {"a": "x", "b": 2}]
    with pytest.raises(KeyError, match="no default grid"):
        default_grid("peaknet")


def test_tuning_counts_its_settings_on_a_progress_line_unless_asked_not_to(frames, capsys):
    """A grid ran for 47 s of a user trial with nothing on stderr: each setting is counted, with
    the rate, the ETA and the best F1 so far; ``progress=False`` (``--no-progress``) is silent."""
    args = ([f for f, _, _ in frames], [s for _, s, _ in frames], GRID)
    result = tune("threshold", *args, cutoff=2.0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("tuning threshold: 0/12 settings") and "ETA" in lines[0], lines
    best = result["best_score"]["f1"]
    assert lines[-1].startswith("tuning threshold: 12/12 settings 100.0%"), lines
    assert "settings/s" in lines[-1] and lines[-1].endswith(f"best F1 {best:.3f}"), lines
    tune("threshold", *args, cutoff=2.0, progress=False)
    assert capsys.readouterr().err == ""
