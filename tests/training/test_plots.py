"""The loss curve: drawn from whatever a history holds (a diverged step's null loss, a line cut
short), nothing while there is no history, and never an error for the run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from peaknet_xtal.training.plots import LossCurve


def test_a_diverged_runs_history_is_drawn_up_to_its_last_finite_loss(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) for s in range(1, 30)]
    history.write_text("\n".join([*lines, json.dumps({"step": 30, "loss": None}), '{"st'])
                       + "\n")
    LossCurve(history, tmp_path / "loss.png", "run").draw()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_no_history_yet_is_nothing_to_draw_and_a_failure_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before the first history line (a checkpoint before the first log_every step) the curve
    waits; a history it cannot draw (no finite loss) is one warning, not one a checkpoint."""
    history, png = tmp_path / "history.jsonl", tmp_path / "loss.png"
    curve = LossCurve(history, png, "run")
    with caplog.at_level(logging.WARNING):
        curve.draw()
        assert not caplog.records and not png.exists()
        history.write_text(json.dumps({"step": 1, "loss": None}) + "\n")
        curve.draw()
        history.write_text(json.dumps({"step": 2, "loss": None}) + "\n")
        curve.draw()
    assert len(caplog.records) == 1 and "no finite loss" in caplog.records[0].getMessage()
    assert not png.exists()
