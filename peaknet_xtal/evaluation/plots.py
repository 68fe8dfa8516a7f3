"""Pictures for the evaluation report (matplotlib, Agg backend: no display needed).

Each says what it shows without report.md beside it (a figure is passed around alone): a
title, axes labelled with their units, a legend, intervals drawn where the report has them,
and a colour bar on every image."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peaknet_xtal.evaluation.metrics import match_peaks

#: One colour and marker per finder, stable across plots.
STYLES = [("tab:red", "o"), ("tab:blue", "s"), ("tab:green", "D"), ("tab:purple", "^"),
          ("tab:orange", "v")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _beside(ax: Any) -> Any:
    """Axes for a colour bar beside ``ax``, as tall as its image (matplotlib's default bar of
    a wide panel ran far above and below it)."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    return make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)


def display_range(image: np.ndarray, good: np.ndarray | None = None) -> tuple[float, float]:
    """Robust grey scale: background median to a high percentile, so weak spots stay visible."""
    values = image[good] if good is not None and good.any() else image.ravel()
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    lo, hi = np.percentile(values, [50, 99.7])
    return float(lo), float(max(hi, lo + 1e-6))


def peak_overlay(path: str | os.PathLike[str], image: np.ndarray, good: np.ndarray,
                 found: Mapping[str, np.ndarray], truth: np.ndarray | None = None,
                 window: tuple[slice, slice] | None = None, title: str = "",
                 cutoff: float = 3.0, unit: str = "ADU") -> None:
    """One panel (or a window of it) with each finder's peaks; peaks matched to truth circled.

    ``found`` maps a finder name to peak rows of *this panel* (fields fs, ss); ``truth`` likewise.
    ``unit``: what the pixel values count, named on the colour bar.
    """
    plt = _pyplot()
    ys, xs = window or (slice(0, image.shape[0]), slice(0, image.shape[1]))
    crop = image[ys, xs]
    lo, hi = display_range(crop, good[ys, xs])
    fig, ax = plt.subplots(figsize=(7, 7 * crop.shape[0] / max(crop.shape[1], 1) + 0.6))
    shown = ax.imshow(np.where(good[ys, xs], crop, np.nan), cmap="gray_r", vmin=lo, vmax=hi,
                      origin="upper", extent=(xs.start - 0.5, xs.stop - 0.5, ys.stop - 0.5,
                                              ys.start - 0.5), interpolation="nearest")
    bar = fig.colorbar(shown, cax=_beside(ax), extend="both")
    bar.set_label(f"pixel value ({unit}); masked pixels white", fontsize=8)
    if truth is not None and len(truth):
        ax.scatter(truth["fs"], truth["ss"], s=140, facecolors="none", edgecolors="gold",
                   linewidths=1.2, label=f"truth ({len(truth)})")
    for (name, peaks), (colour, marker) in zip(found.items(), STYLES, strict=False):
        if not len(peaks):
            continue
        ax.scatter(peaks["fs"], peaks["ss"], s=18, marker=marker, c=colour, linewidths=0,
                   label=f"{name} ({len(peaks)})")
        if truth is not None and len(truth):
            zeros_a, zeros_b = np.zeros(len(peaks), int), np.zeros(len(truth), int)
            ia, _, _ = match_peaks(zeros_a, peaks["fs"], peaks["ss"], zeros_b, truth["fs"],
                                   truth["ss"], cutoff)
            ax.scatter(peaks["fs"][ia], peaks["ss"][ia], s=70, facecolors="none",
                       edgecolors=colour, linewidths=0.8)
    ax.set_xlim(xs.start - 0.5, xs.stop - 0.5)
    ax.set_ylim(ys.stop - 0.5, ys.start - 0.5)
    ax.set_xlabel("fs (px)")
    ax.set_ylabel("ss (px)")
    legend = (f"gold circles: true strong reflections; ringed markers: peaks matched within "
              f"{cutoff:g} px")
    ax.set_title(f"{title}\n{legend}" if title else legend, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8, title="peaks (count)",
              title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def activation_maps(path: str | os.PathLike[str], image: np.ndarray, good: np.ndarray,
                    background: np.ndarray, peak: np.ndarray, title: str = "",
                    unit: str = "ADU") -> None:
    """Image beside the model's non-peak and peak logit maps for one panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    lo, hi = display_range(image, good)
    panels = [(image, "image", "gray_r", (lo, hi), f"pixel value ({unit})"),
              (background, "non-peak logit", "viridis", None, "logit (model output)"),
              (peak, "peak logit", "magma", None, "logit (model output)")]
    for ax, (data, label, cmap, limits, what) in zip(axes, panels, strict=False):
        shown = np.where(good, data, np.nan)
        im = ax.imshow(shown, cmap=cmap, vmin=None if limits is None else limits[0],
                       vmax=None if limits is None else limits[1], interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("fs (px)", fontsize=8)
        ax.set_ylabel("ss (px)", fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(im, cax=_beside(ax))
        bar.set_label(what, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(w_pad=3.0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cell_histograms(path: str | os.PathLike[str], cells: Mapping[str, np.ndarray],
                    reference: Sequence[float] | None = None) -> None:
    """a, b, c, alpha, beta, gamma of indexed frames per finder, mean and spread annotated."""
    plt = _pyplot()
    names = ["a (A)", "b (A)", "c (A)", "alpha (deg)", "beta (deg)", "gamma (deg)"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for k, ax in enumerate(axes.ravel()):
        notes = []
        for (finder, params), (colour, _) in zip(cells.items(), STYLES, strict=False):
            params = np.asarray(params, dtype=float).reshape(-1, 6)
            if not len(params):
                continue
            values = params[:, k]
            ax.hist(values, bins=20, histtype="step", color=colour, label=finder)
            notes.append(f"{finder}: {values.mean():.2f} +/- {values.std():.2f} (n={len(values)})")
        if reference is not None:
            ax.axvline(reference[k], color="k", ls="--", lw=0.8,
                       label="the simulated crystals' cell" if k == 0 else None)
        ax.set_xlabel(names[k], fontsize=9)
        ax.set_ylabel("indexed frames", fontsize=8)
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=6.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Unit cells of the indexed frames, per finder (mean +/- standard deviation)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def crop_gallery(path: str | os.PathLike[str],
                 rows: Mapping[str, Sequence[tuple[np.ndarray, str]]], title: str = "") -> None:
    """Small image crops in labelled rows (label -> (crop, caption) pairs), each crop on its own
    grey scale from zero counts to its brightest pixel, so a faint cluster and a bright spot
    both show their shape; NaN (masked, off the panel) is left white."""
    plt = _pyplot()
    width = max([len(crops) for crops in rows.values()] + [1])
    fig, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.9 * len(rows)),
                             squeeze=False)
    for r, (label, crops) in enumerate(rows.items()):
        for c in range(width):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(crops):
                continue
            crop, caption = crops[c]
            finite = crop[np.isfinite(crop)]
            top = float(finite.max()) if finite.size else 1.0
            ax.imshow(crop, cmap="gray_r", vmin=0.0, vmax=max(top, 1.0),
                      interpolation="nearest")
            ax.set_title(caption, fontsize=6)
        axes[r, 0].text(-0.1, 0.5, label, transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_bars(path: str | os.PathLike[str], scores: Mapping[str, Mapping[str, Any]],
               keys: Sequence[str] = ("precision", "recall", "f1"), title: str = "") -> None:
    """Grouped bars of scores per finder, with the 95 % bootstrap interval of each score the
    report has one for (``KEY_ci95``: F1's) as an error bar; each value is written above its
    bar and interval, and a score that is no number (no peaks found, say) gets no bar and
    says n/a, not a bar of 0."""
    plt = _pyplot()
    finders = list(scores)
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(2.4 + 1.6 * len(finders), 4.2))
    x = np.arange(len(finders))
    for j, key in enumerate(keys):
        values = np.array([float(np.nan if scores[f].get(key) is None else scores[f][key])
                           for f in finders])
        where = x + (j - (len(keys) - 1) / 2) * width
        ax.bar(where, np.nan_to_num(values), width, label=key)
        tops = np.nan_to_num(values)
        intervals = [scores[f].get(f"{key}_ci95") for f in finders]
        if any(ci is not None for ci in intervals):
            lows, highs = (np.array([np.nan if ci is None or ci[k] is None else float(ci[k])
                                     for ci in intervals]) for k in (0, 1))
            drawn = np.isfinite(lows) & np.isfinite(highs) & np.isfinite(values)
            ax.errorbar(where[drawn], values[drawn],
                        yerr=[values[drawn] - lows[drawn], highs[drawn] - values[drawn]],
                        fmt="none", ecolor="black", elinewidth=1, capsize=3,
                        label=f"{key} 95 % bootstrap interval")
            tops = np.where(drawn, np.fmax(tops, highs), tops)
        for at, top, value in zip(where, tops, values, strict=True):
            ax.text(at, top + 0.015, f"{value:.2f}" if np.isfinite(value) else "n/a",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, finders, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score (fraction, 1 = perfect)")
    ax.set_xlabel("finder")
    ax.set_title(title or "Precision, recall and F1 against the truth", fontsize=10)
    fig.legend(fontsize=7, ncol=len(keys) + 1, loc="lower center")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
