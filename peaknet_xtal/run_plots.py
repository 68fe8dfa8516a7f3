"""The picture a command leaves beside its outputs at the end of a run (PNG).

Why: results people would rather see than read get a plot.  A crystallographer watching a
serial run reads peaks per frame against the hit threshold, the hit rate over the run and the
spread of peak counts at a glance, as Cheetah and OM show them (:func:`peaks_figure`, drawn by
``peaknet2cxi``); an integration run's I/sigma and its agreement with summation likewise
(:func:`integration_figure`, drawn by ``peaknet-integrate``).  A summary's minimum, median and
maximum hide a jet that stopped half-way or a model that scores every blank a hit.

The rules for every command's picture:

- it never fails a run: a figure that cannot be made or written is one warning, and the run's
  outputs, summary and exit status are what they would be without it (:func:`write_plot`);
- it appears atomically (:func:`~peaknet_xtal.atomic.atomic_path`): a stopped run never leaves
  half a PNG under its name;
- it is cheap for runs of 10^5-10^6 frames or spots: past :data:`MAX_POINTS` frames the x axis
  is binned (a density: how many frames of each stretch of the run had how many peaks), and
  past :data:`MAX_SCATTER` spots a scatter shows a fixed random sample of them, which it says.

Figures are made with matplotlib's object interface (``matplotlib.figure.Figure``, rendered by
Agg when saved as PNG), not pyplot: pyplot would switch a Python caller's backend (a notebook's)
and keep every figure in its global list until closed.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Frames drawn one point each; a longer run is drawn as a density (:func:`density`).
MAX_POINTS = 5000
#: Bins across the x axis of a longer run: about a pixel each at the figure's width.
BINS = 800
#: Spots drawn in a scatter; more are sampled (the same sample every time: a fixed seed).
MAX_SCATTER = 20000
#: The running hit rate's window, in frames (a tenth of a shorter run).
HIT_WINDOW = 200
#: Resolution of the written PNGs.
DPI = 100


def write_plot(path: str | os.PathLike[str], make: Callable[[], Any]) -> Path | None:
    """Make a figure with ``make`` (a ``matplotlib.figure.Figure``) and write it to ``path`` as
    PNG, atomically.  Returns the path, or None after one warning where the figure cannot be
    made or written (matplotlib missing, a full disk, data it cannot draw): a picture is never
    worth a run.  An interruption (Ctrl-C, a scheduler's SIGTERM) is not caught: it stops the
    run as it would at any other step.  What a process killed while writing it left (a
    ``.NAME.*.part``) is removed first."""
    from peaknet_xtal.atomic import atomic_path, remove_stale_parts

    path = Path(path)
    try:
        remove_stale_parts(path)
        figure = make()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
    except Exception as exc:  # noqa: BLE001  (the run's outputs stand without it)
        log.warning("%s: the plot could not be written (%s: %s); the run's other outputs are "
                    "not affected", path, type(exc).__name__, exc)
        return None
    return path


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def density(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many of ``values`` (peak counts, in run order) fall in each cell of ``bins`` runs of
    (nearly) equal length by (at most 200) value bins: ``(counts[x, y], x_edges, y_edges)``.
    A long run's peaks per frame drawn as a density keep what a scatter shows (where the hits
    lie, where the blanks do) at a fixed cost: one ``np.bincount``, milliseconds for 10^6
    frames."""
    values = np.asarray(values, dtype=float)
    frames = len(values)
    top = float(values.max()) if frames else 0.0
    y_edges = (np.arange(top + 2) - 0.5 if top < 200
               else np.linspace(-0.5, top + 0.5, 201))
    rows = len(y_edges) - 1
    column = np.arange(frames) * bins // max(frames, 1)
    row = np.clip(np.searchsorted(y_edges, values, side="right") - 1, 0, rows - 1)
    counts = np.bincount(column * rows + row, minlength=bins * rows).reshape(bins, rows)
    x_edges = np.ceil(np.arange(bins + 1) * frames / bins) - 0.5
    return counts, x_edges, y_edges


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the last ``window`` values up to each one (fewer at the start): of hit flags,
    the hit rate as it was while the run went on; of losses, a training curve's trend."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    ends = np.arange(1, len(sums))
    starts = np.maximum(ends - window, 0)
    return np.asarray((sums[ends] - sums[starts]) / (ends - starts))


def peaks_figure(n_peaks: np.ndarray, hit: np.ndarray, min_peaks: int, *, left_out: int = 0,
                 title: str = "") -> Any:
    """Peaks per frame over a run (frames in the order they were written) with the hit
    threshold, the running and the cumulative hit rate below it, and the histogram of peaks
    per frame (hits and the rest) beside them.

    ``left_out``: frames found and left out as not hits (``--hits-only``): their peak counts
    are not kept, so the frames drawn are the hits alone, the hit rate over the whole run is
    said in the rate panel instead of drawn, and the axis says which frames these are."""
    from matplotlib.ticker import MaxNLocator

    n_peaks = np.asarray(n_peaks, dtype=np.int64)
    hit = np.asarray(hit, dtype=bool)
    frames = len(n_peaks)
    fig = _figure(12, 6.5)
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 1), height_ratios=(2, 1))
    over, rate, spread = (fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]),
                          fig.add_subplot(grid[:, 1]))
    rate.sharex(over)
    x = np.arange(frames)
    # a kind of frame the run has none of gets no legend entry (matplotlib skips "_" labels)
    labels = ["not a hit" if (~hit).any() else "_none", "hit" if hit.any() else "_none"]
    if frames <= MAX_POINTS:
        size = 4 if frames > 500 else 10 if frames > 50 else 20
        over.scatter(x[~hit], n_peaks[~hit], s=size, c="0.55", linewidths=0, label=labels[0])
        over.scatter(x[hit], n_peaks[hit], s=size, c="tab:blue", linewidths=0, label=labels[1])
    else:  # a scatter of every frame would be a smear: how many frames lie where, by colour
        counts, x_edges, y_edges = density(n_peaks, BINS)
        shade = over.pcolormesh(x_edges, y_edges, np.ma.masked_equal(counts.T, 0),
                                cmap="viridis", norm="log", rasterized=True)
        fig.colorbar(shade, ax=[over, rate], pad=0.01, aspect=40,
                     label=f"frames a cell (cells {frames / len(counts):.0f} frames wide)")
    over.axhline(min_peaks, color="tab:red", ls="--", lw=1,
                 label=f"hit threshold (min_peaks {min_peaks})")
    over.set_ylabel("peaks per frame")
    top = int(n_peaks.max()) if frames else 0
    over.set_ylim(-0.03 * max(top, min_peaks, 1), None)  # frames of no peak in sight
    for axis in (over.xaxis, over.yaxis, spread.xaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    over.legend(loc="best", fontsize=8, framealpha=0.85)
    over.tick_params(labelbottom=False)
    seen = frames + left_out
    overall = hit.sum() / seen if seen else 0.0
    if left_out:
        rate.text(0.5, 0.5, f"--hits-only: the {left_out} frames left out as not hits keep no "
                  f"peak counts and are not drawn;\nhit rate over the run "
                  f"{100 * overall:.1f} % ({int(hit.sum())} of {seen} frames)",
                  transform=rate.transAxes, ha="center", va="center", fontsize=9)
        rate.set_yticks([])
        rate.set_xlabel(f"hit, in the order written ({frames} hits; {left_out} non-hits left "
                        "out)")
    else:
        window = max(1, min(HIT_WINDOW, frames // 10))
        running = 100 * running_mean(hit, window)
        cumulative = 100 * np.cumsum(hit) / np.arange(1, frames + 1)
        step = max(1, frames // (2 * BINS)) if frames > MAX_POINTS else 1
        rate.plot(x[::step], running[::step], color="tab:green", lw=0.9,
                  label=f"last {window} frame(s)")
        rate.plot(x[::step], cumulative[::step], color="k", ls=":", lw=1,
                  label=f"since the first frame ({100 * overall:.1f} % overall)")
        rate.set_ylim(0, 105)
        rate.set_ylabel("hit rate (%)")
        rate.set_xlabel("frame, in the order written")
        rate.legend(loc="best", fontsize=8, framealpha=0.85)
    edges = (np.arange(top + 2) - 0.5 if top <= 100
             else np.linspace(-0.5, top + 0.5, 101))
    # log counts where blanks outnumber hits by decades (a serial run's usual case)
    tallest = int(np.histogram(n_peaks, edges)[0].max()) if frames else 0
    spread.hist([n_peaks[~hit], n_peaks[hit]], bins=edges, stacked=True, log=tallest >= 50,
                color=["0.55", "tab:blue"], label=labels)
    spread.axvline(min_peaks - 0.5, color="tab:red", ls="--", lw=1, label="hit threshold")
    spread.set_xlabel("peaks per frame")
    spread.set_ylabel("frames")
    if tallest < 50:  # counts of frames: whole numbers on a linear axis
        spread.yaxis.set_major_locator(MaxNLocator(integer=True))
    spread.legend(loc="upper right", fontsize=8, framealpha=0.85)
    fig.suptitle(title or f"{frames} frames, {int(hit.sum())} hits", fontsize=10)
    return fig


def integration_figure(lik: np.ndarray, lik_sigma: np.ndarray, summed: np.ndarray,
                       summed_sigma: np.ndarray, *, title: str = "") -> Any:
    """The VI likelihood's I/sigma histogram (summation's outlined over it), and the VI
    likelihood's photons against the background-subtracted summation's per spot, with the
    identity line.  Both intensities can read below zero, so the scatter's axes are symlog,
    linear within the power of ten nearest the median summation sigma (spots within it are
    noise either way, and a log axis could not place them).  Spots without a finite estimate
    are left out, and counted in the title."""
    values = [np.asarray(v, dtype=float) for v in (lik, lik_sigma, summed, summed_sigma)]
    lik, lik_sigma, summed, summed_sigma = values
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_lik, snr_sum = lik / lik_sigma, summed / summed_sigma
    finite = np.isfinite(snr_lik) & np.isfinite(summed)
    if not finite.any():
        raise ValueError("no spot has a finite VI likelihood estimate and summation")
    fig = _figure(12, 5)
    left, right = fig.subplots(1, 2)
    shown = snr_lik[finite]
    other = snr_sum[finite & np.isfinite(snr_sum)]
    low, high = np.percentile(np.concatenate([shown, other]), [0.5, 99.5])
    high = max(high, low + 1.0)
    edges = np.linspace(low, high, int(np.clip(np.sqrt(len(shown)), 10, 60)) + 1)
    left.hist(np.clip(shown, low, high), bins=edges, color="tab:blue", alpha=0.6,
              label=f"VI likelihood (median {np.median(shown):.1f})")
    if other.size:
        left.hist(np.clip(other, low, high), bins=edges, histtype="step", color="k", lw=1,
                  label=f"summation (median {np.median(other):.1f})")
    left.set_xlabel("I/sigma (outliers counted in the end bins)")
    left.set_ylabel("spots")
    left.legend(fontsize=8)
    pick = np.flatnonzero(finite)
    if len(pick) > MAX_SCATTER:
        pick = np.sort(np.random.default_rng(0).choice(pick, MAX_SCATTER, replace=False))
    noise = summed_sigma[finite & np.isfinite(summed_sigma) & (summed_sigma > 0)]
    # the power of ten nearest the noise: its ticks (-10, 0, 10) do not crowd the linear band
    linear = float(10.0 ** np.round(np.log10(np.median(noise)))) if noise.size else 1.0
    drawn = (f"spots ({len(pick)} of {int(finite.sum())} drawn at random)"
             if len(pick) < finite.sum() else f"spots ({len(pick)})")
    right.scatter(summed[pick], lik[pick], s=3 if len(pick) > 2000 else 8, c="tab:blue",
                  alpha=0.5, linewidths=0,
                  label=drawn, rasterized=True)
    ends = [min(summed[pick].min(), lik[pick].min()), max(summed[pick].max(), lik[pick].max())]
    right.plot(ends, ends, color="k", ls="--", lw=1, label="identity")
    for axis in ("x", "y"):
        getattr(right, f"set_{axis}scale")("symlog", linthresh=linear)
    right.set_xlabel(f"summation, background subtracted (photons; linear within ±{linear:g})")
    right.set_ylabel(f"VI likelihood (photons; linear within ±{linear:g})")
    right.legend(fontsize=8, loc="upper left")
    missing = len(lik) - int(finite.sum())
    fig.suptitle((title or f"{len(lik)} spots")
                 + (f"; {missing} without a finite estimate left out" if missing else ""),
                 fontsize=10)
    return fig
