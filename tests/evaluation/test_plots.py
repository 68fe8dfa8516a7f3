"""The report's figures say what they show without report.md beside them: a title, labelled
axes with units, a legend, the report's intervals as error bars, a labelled colour bar on every
image.  The figures are checked as matplotlib drew them (each one caught as it is saved), not
by their pixels."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from peaknet_xtal.evaluation import plots
from peaknet_xtal.types import peaks_from_columns


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the plots save, in order (saved to disk as well)."""
    figures: list[Figure] = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_score_bars_have_title_axis_labels_legend_and_the_f1_intervals(drawn, tmp_path):
    """scores.png had bars alone: no title, no y-axis label, and not the bootstrap intervals the
    report computes for F1.  A score that is no number is written n/a, not drawn as 0."""
    scores = {"peaknet": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "f1_ci95": [0.8, 0.88]},
              "pf8": {"precision": 0.6, "recall": 0.4, "f1": 0.48, "f1_ci95": [0.3, 0.6]},
              "blind": {"precision": None, "recall": 0.0, "f1": 0.0, "f1_ci95": None}}
    plots.score_bars(tmp_path / "scores.png", scores, title="run 7: 20 frames")
    (fig,) = drawn
    ax = fig.axes[0]
    assert ax.get_title() == "run 7: 20 frames"
    assert "score" in ax.get_ylabel() and ax.get_xlabel() == "finder"
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert {"precision", "recall", "f1"} <= set(labels)
    assert any("95 % bootstrap interval" in label for label in labels), labels
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    spans = sorted((round(s[:, 1].min(), 6), round(s[:, 1].max(), 6)) for s in bars.get_segments())
    assert spans == [(0.3, 0.6), (0.8, 0.88)]  # the two intervals known, none for "blind"
    shown = texts(fig)
    assert shown.count("n/a") == 1 and "0.85" in shown and "0.48" in shown
    assert (tmp_path / "scores.png").stat().st_size > 0


def test_overlay_has_a_labelled_intensity_colour_bar_and_says_what_the_marks_are(drawn,
                                                                                 tmp_path):
    image = np.random.default_rng(0).normal(10, 2, (30, 40)).astype(np.float32)
    truth = peaks_from_columns(panel=[0, 0], fs=[10.0, 30.0], ss=[10.0, 20.0])
    found = {"peaknet": peaks_from_columns(panel=[0], fs=[10.4], ss=[10.0])}
    plots.peak_overlay(tmp_path / "o.png", image, np.ones(image.shape, bool), found, truth,
                       title="frame 3 panel 0", unit="ADU")
    (fig,) = drawn
    ax, bar = fig.axes
    assert "pixel value (ADU)" in bar.get_ylabel()
    assert ax.get_xlabel() == "fs (px)" and ax.get_ylabel() == "ss (px)"
    assert ax.get_title().startswith("frame 3 panel 0\n") and "true strong" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["truth (2)", "peaknet (1)"]


def test_activation_maps_and_cell_histograms_label_what_they_show(drawn, tmp_path):
    image = np.ones((20, 30), np.float32)
    logits = np.zeros((20, 30), np.float32)
    plots.activation_maps(tmp_path / "a.png", image, np.ones(image.shape, bool), logits, logits,
                          title="peaknet: frame 3 panel 0")
    cells = {"peaknet": np.array([[79.0, 79.0, 38.0, 90.0, 90.0, 90.0]] * 3)}
    plots.cell_histograms(tmp_path / "c.png", cells, reference=(79.1, 79.1, 38.0, 90, 90, 90))
    maps, histograms = drawn
    images, bars = maps.axes[:3], maps.axes[3:]  # the colour bars come after the images
    assert [ax.get_xlabel() for ax in images] == ["fs (px)"] * 3
    assert [ax.get_ylabel() for ax in bars] == [
        "pixel value (ADU)", "logit (model output)", "logit (model output)"]
    assert any(t.get_text().startswith("Unit cells of the indexed frames")
               for t in histograms.texts)
    axes = histograms.axes
    assert [ax.get_xlabel() for ax in axes] == ["a (A)", "b (A)", "c (A)", "alpha (deg)",
                                                "beta (deg)", "gamma (deg)"]
    assert {ax.get_ylabel() for ax in axes} == {"indexed frames"}
    legend = [t.get_text() for legend in histograms.legends for t in legend.get_texts()]
    assert legend == ["peaknet", "the simulated crystals' cell"]
