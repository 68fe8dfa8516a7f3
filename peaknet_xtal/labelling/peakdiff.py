"""PeakDiff: how well a frame's found peaks agree with what indexing predicts.

For each frame the found peaks (a peak finder's output) are matched one-to-one to the predicted
reflections of the indexed crystals with the Hungarian assignment of
:func:`peaknet_xtal.evaluation.metrics.match_peaks`, keeping only pairs on the same panel closer
than a pixel cutoff.  precision = matched/found (how much of what was found is Bragg signal),
recall = matched/predicted (how much of the predicted pattern was found).  Frames where both look
right are the ones whose predictions we trust enough to turn into pixel labels; :class:`Selection`
holds that rule, and :func:`write_report` draws every frame against it, so the threshold is chosen
by looking rather than guessing.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from peaknet_xtal.atomic import atomic_path

PEAKDIFF_DEFAULTS: dict[str, Any] = {
    "cutoff": 5.0,          # pixels; pairs further apart (or on different panels) do not match
    "min_precision": 0.8,
    "min_recall": 0.0,
    "min_found": 10,
    "max_found": 100000,
    "min_predicted": 1,
    "max_predicted": 100000,
}


@dataclass
class FrameDiff:
    """Matching statistics of one frame, with the matched index pairs."""

    n_found: int
    n_predicted: int
    n_matched: int
    found_index: np.ndarray = field(repr=False)      # rows of the found table that matched
    predicted_index: np.ndarray = field(repr=False)  # their partners in the predicted table
    distance: np.ndarray = field(repr=False)         # pixels

    @property
    def precision(self) -> float:
        return self.n_matched / self.n_found if self.n_found else float("nan")

    @property
    def recall(self) -> float:
        return self.n_matched / self.n_predicted if self.n_predicted else float("nan")


def _match(a_panel: np.ndarray, a_fs: np.ndarray, a_ss: np.ndarray, b_panel: np.ndarray,
           b_fs: np.ndarray, b_ss: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    from peaknet_xtal.evaluation.metrics import (
        match_peaks,  # the one Hungarian matcher of the package
    )

    return match_peaks(a_panel, a_fs, a_ss, b_panel, b_fs, b_ss, cutoff)


def peakdiff(found: np.ndarray, predicted: np.ndarray, cutoff: float = 5.0) -> FrameDiff:
    """Match two peak tables (fields ``panel``, ``fs``, ``ss``; same coordinate convention)."""
    n_found, n_pred = len(found), len(predicted)
    if n_found == 0 or n_pred == 0:
        empty = np.zeros(0, dtype=np.int64)
        return FrameDiff(n_found, n_pred, 0, empty, empty, np.zeros(0))
    ia, ib, dist = _match(
        np.asarray(found["panel"]), np.asarray(found["fs"], float), np.asarray(found["ss"], float),
        np.asarray(predicted["panel"]), np.asarray(predicted["fs"], float),
        np.asarray(predicted["ss"], float), float(cutoff))
    ia, ib, dist = np.asarray(ia, np.int64), np.asarray(ib, np.int64), np.asarray(dist, float)
    return FrameDiff(n_found, n_pred, int(len(ia)), ia, ib, dist)


class _Rule(NamedTuple):
    """One selection rule: what it measures, the option that sets it, how a frame passes."""

    what: str
    option: str
    value: Callable[[FrameDiff], float]
    passes: Callable[[float], bool]
    limit: str       # "below 0.8": for the per-run account
    reason: str      # "precision {v} < 0.8": for one frame
    fmt: str         # how a value is written
    undefined: str = ""  # why a frame has no value (NaN), when it can have none


@dataclass
class Selection:
    """Which frames are trusted for labels: precision/recall floors and peak-count ranges."""

    min_precision: float = 0.8
    min_recall: float = 0.0
    min_found: int = 10
    max_found: int = 100000
    min_predicted: int = 1
    max_predicted: int = 100000

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Selection:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in config.items() if k in names})

    def _rules(self) -> tuple[_Rule, ...]:
        """The selection rules, each once, for both the per-frame and the per-run account."""
        return (
            _Rule("precision", "--min-precision", lambda d: d.precision,
                  lambda v: v >= self.min_precision, f"below {self.min_precision}",
                  f"precision {{v}} < {self.min_precision}", "{:.2f}",
                  "no found peak, so no precision"),
            _Rule("recall", "--min-recall", lambda d: d.recall,
                  lambda v: v >= self.min_recall, f"below {self.min_recall}",
                  f"recall {{v}} < {self.min_recall}", "{:.2f}",
                  "no predicted reflection, so no recall"),
            _Rule("found peaks", "--min-peaks/--max-peaks", lambda d: d.n_found,
                  lambda v: self.min_found <= v <= self.max_found,
                  f"outside [{self.min_found}, {self.max_found}]",
                  f"{{v}} found outside [{self.min_found}, {self.max_found}]", "{:.0f}"),
            _Rule("predicted reflections", "--min-predicted/--max-predicted",
                  lambda d: d.n_predicted,
                  lambda v: self.min_predicted <= v <= self.max_predicted,
                  f"outside [{self.min_predicted}, {self.max_predicted}]",
                  f"{{v}} predicted outside [{self.min_predicted}, {self.max_predicted}]",
                  "{:.0f}"),
        )

    def reasons(self, diff: FrameDiff) -> list[str]:
        """Why a frame is rejected (empty list: accepted).  NaN precision/recall never pass."""
        return [rule.reason.format(v=rule.fmt.format(rule.value(diff)))
                for rule in self._rules() if not rule.passes(rule.value(diff))]

    def accepts(self, diff: FrameDiff) -> bool:
        return not self.reasons(diff)

    def rejection_lines(self, diffs: Sequence[FrameDiff]) -> list[str]:
        """One line per rule that turned frames away: how many, and the range of their values.

        A run that keeps few or no frames is otherwise a mystery (the per-frame reasons sit in
        the output's frames table, which is not written when nothing is kept); a count with the
        values next to the limit says which option to loosen and by how much.  A frame failing
        several rules is counted under each.
        """
        lines = []
        for rule in self._rules():
            values = np.array([rule.value(d) for d in diffs], dtype=float)
            failed = values[[not rule.passes(v) for v in values]] if len(values) else values
            undefined = int(np.isnan(failed).sum())
            if undefined:
                lines.append(f"{_frames(undefined)}: {rule.undefined}, which never passes "
                             f"{rule.option}")
            failed = failed[~np.isnan(failed)]
            if len(failed):
                low, high = rule.fmt.format(failed.min()), rule.fmt.format(failed.max())
                span = low if low == high else f"{low} to {high}"
                lines.append(f"{_frames(len(failed))}: {rule.what} {rule.limit} "
                             f"({rule.option}; theirs: {span})")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _frames(n: int) -> str:
    return f"{n} frame" + ("" if n == 1 else "s")


def summary_arrays(diffs: Sequence[FrameDiff], selection: Selection) -> dict[str, np.ndarray]:
    """Per-frame columns (counts, precision, recall, selected) for files and plots."""
    return {
        "n_found": np.array([d.n_found for d in diffs], dtype=np.int64),
        "n_predicted": np.array([d.n_predicted for d in diffs], dtype=np.int64),
        "n_matched": np.array([d.n_matched for d in diffs], dtype=np.int64),
        "precision": np.array([d.precision for d in diffs], dtype=np.float64),
        "recall": np.array([d.recall for d in diffs], dtype=np.float64),
        "selected": np.array([selection.accepts(d) for d in diffs], dtype=bool),
    }


def write_report(path: str | os.PathLike[str], diffs: Sequence[FrameDiff],
                 selection: Selection, title: str = "PeakDiff") -> None:
    """Two panels, every frame a dot: found vs predicted counts, and precision vs recall.

    The selection box is drawn on both so one can see how many frames a threshold keeps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = summary_arrays(diffs, selection)
    keep = cols["selected"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    for ax, x, y in ((ax1, cols["n_predicted"], cols["n_found"]),
                     (ax2, cols["recall"], cols["precision"])):
        ax.scatter(x[~keep], y[~keep], s=12, c="0.6", label=f"rejected ({int((~keep).sum())})")
        ax.scatter(x[keep], y[keep], s=12, c="tab:blue", label=f"selected ({int(keep.sum())})")
    x_top = max(int(cols["n_predicted"].max(initial=1)), selection.min_predicted) * 1.1 + 1
    y_top = max(int(cols["n_found"].max(initial=1)), selection.min_found) * 1.1 + 1
    ax1.add_patch(Rectangle(
        (selection.min_predicted, selection.min_found),
        min(selection.max_predicted, 10 * x_top) - selection.min_predicted,
        min(selection.max_found, 10 * y_top) - selection.min_found,
        fill=False, ec="tab:red", lw=1.5, label="selection"))
    ax1.set(xlabel="predicted reflections", ylabel="found peaks", xlim=(0, x_top),
            ylim=(0, y_top), title="found vs predicted")
    ax2.add_patch(Rectangle((selection.min_recall, selection.min_precision),
                            1.0 - selection.min_recall, 1.0 - selection.min_precision,
                            fill=False, ec="tab:red", lw=1.5, label="selection"))
    ax2.set(xlabel="recall = matched / predicted", ylabel="precision = matched / found",
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="precision vs recall")
    for ax in (ax1, ax2):
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}: {len(diffs)} frames, {int(keep.sum())} selected")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
