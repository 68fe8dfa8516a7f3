"""The loss curve of a training or distillation run: ``OUT/loss.png``, drawn from the run's history.

Why a picture: ``history.jsonl`` holds a line every ``log_every`` steps, and whether a run has
converged, is still falling or went unstable is seen at a glance in a curve and hardly at all in
thousands of numbers.  The curve is drawn from the history file, not from the steps this process
trained, so that a resumed run's curve covers the whole run; it is redrawn at every checkpoint
and once more as the run ends, however it ends (finished, stopped, diverged, failed), so that
every run folder has one as recent as its checkpoints.  It follows the rules of every command's
picture (``run_plots.write_plot``): written atomically, and never a failed run (a curve that
cannot be drawn is one warning, and the run draws no more).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.run_plots import running_mean

#: The loss curve's name in the run folder.
LOSS_PLOT = "loss.png"
#: A loss spanning more than this factor is drawn on a log scale: a focal loss falls by decades,
#: and on a linear axis all but its first steps lie flat on zero.
LOG_SCALE_SPAN = 10.0
#: With at least this many points a running mean is drawn over the (noisy, one-step) losses.
SMOOTH_FROM = 20


def loss_figure(entries: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The loss of ``entries`` (history lines: ``step``, ``loss``, ``lr``) against the step, with
    the learning rate on a second axis (a ``matplotlib.figure.Figure``).  A history without a
    finite loss (a run that diverged at its first logged step) is a ValueError saying so."""
    from matplotlib.figure import Figure

    points = [(int(e["step"]), float(e["loss"]), e.get("lr")) for e in entries
              if isinstance(e.get("step"), int) and isinstance(e.get("loss"), (int, float))
              and math.isfinite(e["loss"])]
    if not points:
        raise ValueError("the history holds no finite loss yet")
    steps = np.array([p[0] for p in points])
    loss = np.array([p[1] for p in points])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    smooth = len(points) >= SMOOTH_FROM
    window = max(5, len(points) // 20)
    ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.45 if smooth else 1.0,
            marker="" if len(points) > 50 else "o", ms=3, label="training loss")
    if smooth:
        ax.plot(steps, running_mean(loss, window), color="tab:blue", lw=2,
                label=f"running mean of {window} points")
    if loss.min() > 0 and loss.max() / loss.min() > LOG_SCALE_SPAN:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    rates = [(s, float(lr)) for s, _, lr in points if isinstance(lr, (int, float))]
    if rates:
        twin = ax.twinx()
        twin.plot([r[0] for r in rates], [r[1] for r in rates], color="0.5", ls="--", lw=1,
                  label="learning rate")
        twin.set_ylabel("learning rate", color="0.4")
        twin.set_ylim(bottom=0)
        handles += twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    return fig


class LossCurve:
    """``png`` drawn from the history file ``history`` whenever :meth:`draw` is called and the
    history changed since (nothing while there is no history yet).  Never an error: a curve
    that cannot be drawn is one warning (``run_plots.write_plot``), after which the run draws
    no more rather than say it again at every checkpoint."""

    def __init__(self, history: Path, png: Path, title: str) -> None:
        self.history, self.png, self.title = history, png, title
        self._drawn: tuple[int, int] | None = None
        self._failed = False

    def draw(self) -> None:
        from peaknet_xtal.run_plots import write_plot
        from peaknet_xtal.training.trainer import read_history

        if self._failed or not self.history.exists():
            return
        stat = self.history.stat()
        seen = (stat.st_size, stat.st_mtime_ns)
        if seen == self._drawn and self.png.exists():
            return
        if write_plot(self.png, lambda: loss_figure(read_history(self.history), self.title)):
            self._drawn = seen
        else:
            self._failed = True
