"""Checks against the simulator's truth: accuracy per I/sigma bin and calibration of sigma.

Two questions, two binnings:

- **Accuracy** (is the estimate close to the truth?) is binned by the *true* I/sigma (the
  simulator's expected integrated SNR of the spot), which is the same for every method, so the
  RMS errors of VI, summation and the pseudo-Voigt fit compare like with like.
- **Calibration** (does sigma describe the error?) is binned by each method's *own* I/sigma, the
  number a user sees.  A posterior promises ``E[(I - mean)^2 | data] = sd^2`` given the data, not
  given the unknown truth: among spots whose true I is 0, a shrinking estimator is always high,
  among bright ones it is unbiased, and only conditioning on what was measured averages that out.
  The spread reported is the RMS of ``z = (estimate - truth) / sigma`` (bias included), which is
  1 for honest uncertainties; coverage is the fraction of truths inside the central 68 % and
  95 % intervals (log-normal posterior intervals for VI, Gaussian for summation).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: I/sigma bin edges: the issue's "weak" spots are those below 5.
BINS: tuple[float, ...] = (-np.inf, 1.0, 2.0, 5.0, 10.0, 20.0, np.inf)


def _label(lo: float, hi: float) -> str:
    if not np.isfinite(lo):
        return f"< {hi:g}"
    if not np.isfinite(hi):
        return f">= {lo:g}"
    return f"{lo:g}-{hi:g}"


def lognormal_interval(mean: np.ndarray, sd: np.ndarray, z: float) -> tuple[np.ndarray, ...]:
    """Central interval of the log-normal with this mean and sd, ``z`` sigmas of its log."""
    var_log = np.log1p((sd / np.maximum(mean, 1e-300)) ** 2)
    mu = np.log(np.maximum(mean, 1e-300)) - 0.5 * var_log
    s = np.sqrt(var_log)
    return np.exp(mu - z * s), np.exp(mu + z * s)


def accuracy_table(truth: np.ndarray, true_snr: np.ndarray,
                   estimates: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """RMS error (photons) of each estimate per true-I/sigma bin (NaN estimates left out)."""
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=False):
        sel = (true_snr >= lo) & (true_snr < hi)
        row: dict[str, Any] = {"bin": _label(lo, hi), "n": int(sel.sum())}
        for name, values in estimates.items():
            ok = sel & np.isfinite(values)
            row[f"rmse_{name}"] = (float(np.sqrt(np.mean((values[ok] - truth[ok]) ** 2)))
                                   if ok.any() else float("nan"))
            row[f"n_{name}"] = int(ok.sum())
        rows.append(row)
    return rows


def calibration_table(truth: np.ndarray, mean: np.ndarray, sd: np.ndarray, *,
                      lognormal: bool) -> list[dict[str, Any]]:
    """Spread of z and interval coverage per own-I/sigma bin of one method."""
    own = mean / np.where(sd > 0, sd, np.nan)
    z = (mean - truth) / np.where(sd > 0, sd, np.nan)
    inside = {}
    for level, k in (("68", 1.0), ("95", 1.959964)):
        if lognormal:
            lo, hi = lognormal_interval(mean, sd, k)
        else:
            lo, hi = mean - k * sd, mean + k * sd
        inside[level] = (truth >= lo) & (truth <= hi)
    rows = []
    for blo, bhi in zip(BINS[:-1], BINS[1:], strict=False):
        sel = (own >= blo) & (own < bhi) & np.isfinite(z)
        n = int(sel.sum())
        rows.append({"bin": _label(blo, bhi), "n": n,
                     "z_rms": float(np.sqrt(np.mean(z[sel] ** 2))) if n else float("nan"),
                     "z_mean": float(np.mean(z[sel])) if n else float("nan"),
                     "cover68": float(np.mean(inside["68"][sel])) if n else float("nan"),
                     "cover95": float(np.mean(inside["95"][sel])) if n else float("nan")})
    return rows


#: Spots a bin needs before its z RMS is a measurement: the RMS of n unit normals scatters by
#: about 1/sqrt(2n), 10 % at 50 -- the width of the 0.9-1.1 band the issue asks for.
MIN_SPOTS_PER_BIN = 50

#: Candidate values of the profile's shape error (``profile_noise``, tau) for the selection.
PROFILE_NOISE_GRID: tuple[float, ...] = tuple(0.5 * k for k in range(11))


def calibration_score(truth: np.ndarray, mean: np.ndarray, sd: np.ndarray,
                      min_n: int = MIN_SPOTS_PER_BIN) -> float:
    """Largest ``|ln z RMS|`` over the own-I/sigma bins with at least ``min_n`` spots.

    0 is perfect calibration; the issue asks for z RMS within 0.9-1.1, about 0.1 here.
    """
    rows = [r for r in calibration_table(truth, mean, sd, lognormal=True) if r["n"] >= min_n]
    return max((abs(math.log(r["z_rms"])) for r in rows), default=float("inf"))


def select_profile_noise(model: Any, boxes: Any, grid: Sequence[float] = PROFILE_NOISE_GRID,
                         min_n: int = MIN_SPOTS_PER_BIN
                         ) -> tuple[float, list[dict[str, float]]]:
    """The ``profile_noise`` of ``grid`` whose posterior is best calibrated on ``boxes``.

    ``boxes`` must be *selection* data with truth in ``extra["photons"]`` (simulated frames of
    seeds used neither for training nor for the acceptance checks): this is model selection of
    one hyperparameter that the ELBO cannot set (the shape error is what the learned profile
    family misses, invisible to the model itself), scored by :func:`calibration_score`; the
    smallest value wins a tie.  ``model.config`` is left as it was.
    """
    from peaknet_xtal.integration.train import posterior

    before = model.config.get("profile_noise", 0.0)
    truth = boxes.extra["photons"]
    scores = []
    try:
        for tau in grid:
            model.config["profile_noise"] = float(tau)
            post = posterior(model, boxes)
            scores.append({"profile_noise": float(tau),
                           "score": calibration_score(truth, post["photons"],
                                                      post["photons_sigma"], min_n)})
    finally:
        model.config["profile_noise"] = before
    best = min(scores, key=lambda r: (r["score"], r["profile_noise"]))
    return best["profile_noise"], scores


def pvoigt_photons(boxes: Any, index: Sequence[int] | np.ndarray, fg_radius: int = 5
                   ) -> np.ndarray:
    """Photons from the data engine's pseudo-Voigt fit (profile summed over the foreground).

    The fit runs on the same foreground square the summation uses (the window the simulator
    renders spots in), with the planar background the fit carries; NaN where it did not converge.
    """
    from peaknet_xtal.labelling.pvoigt import Window, fit_window, profile

    side = boxes.side
    c = side // 2
    size = 2 * fg_radius + 1
    out = np.full(len(index), np.nan)
    config = {"window": size, "prescreen_snr": 0.0, "min_snr": -np.inf, "redchi_max": np.inf,
              "max_shift": float(fg_radius)}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for k, i in enumerate(index):
        data = boxes.pixels[i, c - fg_radius:c + fg_radius + 1,
                            c - fg_radius:c + fg_radius + 1].astype(np.float64)
        valid = boxes.mask[i, c - fg_radius:c + fg_radius + 1, c - fg_radius:c + fg_radius + 1]
        dfs, dss = boxes.offset[i]
        win = Window(data=data, valid=valid.copy(), fs0=0, ss0=0,
                     fs_guess=float(fg_radius + dfs), ss_guess=float(fg_radius + dss))
        outcome = fit_window(win, config)
        if outcome.status in ("ok", "redchi", "weak", "centre_outside"):
            best = [float(outcome.row[n]) for n in outcome.row.dtype.names[3:14]]
            out[k] = float(profile(best, xx, yy)[0].sum())
    return out


def format_markdown(accuracy: Sequence[Mapping[str, Any]],
                    calibration: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The two tables as Markdown (the README carries this text)."""
    names = [k[5:] for k in accuracy[0] if k.startswith("rmse_")]
    lines = ["RMS error (photons) per true I/sigma bin:", "",
             "| true I/sigma | n | " + " | ".join(f"{n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in accuracy:
        cells = []
        for n in names:
            value = row[f"rmse_{n}"]
            extra = f" (n={row[f'n_{n}']})" if row[f"n_{n}"] != row["n"] else ""
            cells.append("-" if math.isnan(value) else f"{value:.1f}{extra}")
        lines.append(f"| {row['bin']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration per own I/sigma bin: RMS of (estimate - truth)/sigma, mean of it, "
              "coverage of the 68 % and 95 % intervals (bins with fewer than "
              f"{MIN_SPOTS_PER_BIN} spots: counted, not measured):", "",
              "| method | own I/sigma | n | z RMS | z mean | 68 % | 95 % |",
              "|---|---|---|---|---|---|---|"]
    for method, rows in calibration.items():
        for row in rows:
            if row["n"] == 0:
                continue
            if row["n"] < MIN_SPOTS_PER_BIN:
                lines.append(f"| {method} | {row['bin']} | {row['n']} | - | - | - | - |")
                continue
            lines.append(f"| {method} | {row['bin']} | {row['n']} | {row['z_rms']:.2f} | "
                         f"{row['z_mean']:+.2f} | {row['cover68']:.2f} | {row['cover95']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(accuracy: Sequence[Mapping[str, Any]],
         calibration: Mapping[str, Sequence[Mapping[str, Any]]], path: Any) -> None:
    """RMS error per true-I/sigma bin and z spread per own bin, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peaknet_xtal.atomic import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["bin"] for r in accuracy]
    x = np.arange(len(labels))
    names = [k[5:] for k in accuracy[0] if k.startswith("rmse_")]
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        ax1.bar(x + i * width, [r[f"rmse_{n}"] for r in accuracy], width, label=n)
    ax1.set_xticks(x + 0.4 - width / 2, labels)
    ax1.set_yscale("log")
    ax1.set_xlabel("true I/sigma")
    ax1.set_ylabel("RMS error (photons)")
    ax1.legend()
    for method, rows in calibration.items():
        ok = [r for r in rows if r["n"] >= 20]
        ax2.plot([r["bin"] for r in ok], [r["z_rms"] for r in ok], "o-", label=method)
    ax2.axhspan(0.9, 1.1, color="0.9")
    ax2.set_xlabel("own I/sigma")
    ax2.set_ylabel("RMS of (estimate - truth) / sigma")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
