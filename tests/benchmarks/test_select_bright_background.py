"""benchmarks/select_bright_background.py: the rule that picks the bright-background settings,
and its scoring (false peaks per strong-background blank over all of them, not per part)."""
from __future__ import annotations

from pathlib import Path

import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "select_bright_background.py")


def row(strong_f1: float, strong_blanks: float, clean_f1: float = 0.9,
        blanks: float = 0.25) -> dict:
    return {"f1": {"validation": 0.86, "validation-strong": strong_f1, "clean": clean_f1},
            "recall": {},
            "blank": {"validation-strong": strong_blanks, "blanks-strong": strong_blanks,
                      "blanks": blanks},
            "blank_count": {"validation-strong": 1, "blanks-strong": 4, "blanks": 4}}


def test_strong_blank_rate_weights_each_blank(script):
    r = row(0.4, 0.0)
    r["blank"]["blanks-strong"] = 2.5  # 10 false peaks on 4 blanks, none on the fifth
    assert script.strong_blank_rate(r) == pytest.approx(2.0)


def test_the_rule_takes_the_best_strong_f1_within_the_limits(script):
    rows = {
        script.OFF: row(0.37, 2.2),
        (0.1, 5.0): row(0.46, 8.0),  # best F1, too many false peaks
        (0.2, 5.5): row(0.43, 1.0, clean_f1=0.89),  # costs the clean hits
        (0.3, 5.0): row(0.41, 1.0, blanks=0.5),  # more false peaks on ordinary blanks
        (0.3, 5.5): row(0.40, 0.8),
        (0.3, 6.0): row(0.40, 0.4),  # the same F1: the higher threshold wins the tie
        (0.3, 6.5): row(0.37, 0.4),
    }
    assert script.choose(rows) == (0.3, 6.0)
    del rows[(0.3, 6.0)]
    assert script.choose(rows) == (0.3, 5.5)


def test_no_setting_passes(script):
    rows = {script.OFF: row(0.37, 2.2), (0.1, 5.0): row(0.46, 8.0)}
    assert script.choose(rows) is None


def test_a_setting_turns_the_test_on_and_off_turns_it_off(script):
    """The grid runs on maps the model made with the test off: each setting must switch it on
    (it once kept the engine's 'off' and measured the same row 12 times)."""
    import numpy as np

    from peaknet_xtal.finding.peaks import PeakParams
    from peaknet_xtal.types import Frame

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    image = 3000.0 + 33.0 * rng.standard_normal((96, 96))
    image += 500.0 * np.exp(-((yy - 40) ** 2 + (xx - 50) ** 2) / (2 * 0.8 ** 2))
    prob = np.zeros((96, 96), np.float32)
    prob[39:42, 49:52] = 0.35  # a real spot the network doubts
    truth = np.zeros(1, dtype=[("panel", "i4"), ("fs", "f8"), ("ss", "f8")])
    truth[0] = (0, 50.0, 40.0)
    items = [("validation-strong", Frame(panels=[image.astype(np.float32)], masks=None),
              truth, truth)]
    maps = [([prob], PeakParams(adu_per_photon=1.0, min_snr=0, bright_photons=None))]
    off, on = script.bright_settings(script.OFF), script.bright_settings((0.3, 5.5))
    assert script.score(items, maps, off)["recall"]["validation-strong"] == 0.0
    assert script.score(items, maps, on)["recall"]["validation-strong"] == 1.0


class _Engine:
    """Stands in for the InferenceEngine: records the frames it finds and where a run starts."""

    def __init__(self, *args, **kwargs):
        self.calls: list[str] = []
        _Engine.last = self

    def find_frames(self, frames):
        from types import SimpleNamespace

        self.calls.append("frame")
        return iter([SimpleNamespace(prob_maps=[])])

    def params_for(self, frame):
        return None

    def new_run(self):
        self.calls.append("new run")


def test_each_detector_is_a_run_of_its_own(script, monkeypatch):
    """The selection parts take their detectors in turn: the defect counts and a measured gain
    must not carry from one detector's frame to another's (it warned at every switch)."""
    import numpy as np

    import peaknet_xtal.finding
    from peaknet_xtal.types import Frame

    monkeypatch.setattr(peaknet_xtal.finding, "InferenceEngine", _Engine)
    frames = [Frame(panels=[np.zeros((4, 4), np.float32)], masks=None,
                    meta={"selection": {"detector": name}}) for name in ("a", "a", "b", "a")]
    script.run_model([("validation", f, None, None) for f in frames])
    assert _Engine.last.calls == ["frame", "frame", "new run", "frame", "new run", "frame"]


def test_out_writes_what_is_printed(script, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(script, "selection_items", lambda: [])
    monkeypatch.setattr(script, "run_model", lambda items: [])
    monkeypatch.setattr(script, "score", lambda items, probs, adjust: row(0.4, 0.5))
    out = tmp_path / "choice.txt"
    assert script.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "chosen: (0.3, 6.5)" in text and text.strip() in capsys.readouterr().out
