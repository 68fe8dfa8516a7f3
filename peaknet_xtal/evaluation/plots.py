"""Pictures for the evaluation report (matplotlib, Agg backend: no display needed)."""
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
                 cutoff: float = 3.0) -> None:
    """One panel (or a window of it) with each finder's peaks; peaks matched to truth circled.

    ``found`` maps a finder name to peak rows of *this panel* (fields fs, ss); ``truth`` likewise.
    """
    plt = _pyplot()
    ys, xs = window or (slice(0, image.shape[0]), slice(0, image.shape[1]))
    crop = image[ys, xs]
    lo, hi = display_range(crop, good[ys, xs])
    fig, ax = plt.subplots(figsize=(7, 7 * crop.shape[0] / max(crop.shape[1], 1) + 0.6))
    ax.imshow(np.where(good[ys, xs], crop, np.nan), cmap="gray_r", vmin=lo, vmax=hi,
              origin="upper", extent=(xs.start - 0.5, xs.stop - 0.5, ys.stop - 0.5,
                                      ys.start - 0.5), interpolation="nearest")
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
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def activation_maps(path: str | os.PathLike[str], image: np.ndarray, good: np.ndarray,
                    background: np.ndarray, peak: np.ndarray, title: str = "") -> None:
    """Image beside the model's non-peak and peak logit maps for one panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    lo, hi = display_range(image, good)
    panels = [(image, "image", "gray_r", (lo, hi)),
              (background, "non-peak logit", "viridis", None),
              (peak, "peak logit", "magma", None)]
    for ax, (data, label, cmap, limits) in zip(axes, panels, strict=False):
        shown = np.where(good, data, np.nan)
        im = ax.imshow(shown, cmap=cmap, vmin=None if limits is None else limits[0],
                       vmax=None if limits is None else limits[1], interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
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
            ax.axvline(reference[k], color="k", ls="--", lw=0.8)
        ax.set_title(names[k], fontsize=9)
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=6.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
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


def score_bars(path: str | os.PathLike[str], scores: Mapping[str, Mapping[str, float]],
               keys: Sequence[str] = ("precision", "recall", "f1")) -> None:
    """Grouped bars of scores per finder."""
    plt = _pyplot()
    finders = list(scores)
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(finders), 3.6))
    x = np.arange(len(finders))
    for j, key in enumerate(keys):
        values = [float(np.nan_to_num(scores[f].get(key, np.nan))) for f in finders]
        bars = ax.bar(x + (j - (len(keys) - 1) / 2) * width, values, width, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, finders, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, ncol=len(keys))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
