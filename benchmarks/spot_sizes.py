"""How wide may spots be?  Recall against spot width, PeakNet and DIALS' dispersion, same frames.

    python benchmarks/spot_sizes.py [--sigmas 0.7 1 1.5 2 2.5 3 4 5] [--plot spot_sizes.png]

Spots on detectors this model was not trained for may be wider than the training bank's (the
simulator's spot sigma is 0.3-1.6 px near the beam): an unbinned Rayonix or MAR CCD with small
pixels, an Eiger at a microfocus beamline with a mosaic crystal.  Here round Gaussian spots of one
width (``sigma`` in pixels; FWHM = 2.355 sigma) are planted on a flat photon background, with an
integrated signal-to-noise ratio fixed over the disc of radius 2 sigma that holds 86 % of a spot
(``I / sqrt(I + A b)``, ``A`` that disc's area, ``b`` the background photons a pixel): at a fixed
SNR a wider spot stands lower in every pixel, as it does on a real detector.  Photons are Poisson
draws, recorded at ``--gain`` ADU each (both finders are told that gain), on a 1024 x 1024 panel
with 144 spots on a jittered grid (42 px or more apart), a blank beside each frame for false peaks.

Printed per background, SNR and width: the share of spots found (a peak within max(1.5, 2 sigma)
px of the centre) and false peaks (farther than max(2, 3 sigma) px from every spot) for PeakNet
with the library's defaults (``evaluation.finders.PeakNetFinder``, frames one at a time as the
DIALS plugin gets them) and for DIALS' dispersion threshold with ``dials.find_spots``' defaults
(3 x 3 kernel, ``sigma_strong`` 3, ``min_spot_size`` 2) on the same frames, then per finder the
widest spot with 90 % found.
Measurement only: nothing is chosen here (README, "What to expect", has the numbers).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: exploration seeds, distinct from every training, selection and acceptance range
SEED = 7_200_000_000
SHAPE = (1024, 1024)
CELL = 85  # px between grid points: 12 x 12 spots, jittered by a quarter cell
FOUND_PX, FOUND_SIGMAS = 1.5, 2.0
FALSE_PX, FALSE_SIGMAS = 2.0, 3.0


def spot_photons(snr: float, sigma: float, background: float) -> float:
    """Total photons of a spot whose SNR over the 2-sigma disc is ``snr``:
    ``I**2 = snr**2 (I + A b)``, solved for ``I``."""
    area = np.pi * (2.0 * sigma) ** 2
    s2 = snr * snr
    return float((s2 + np.sqrt(s2 * s2 + 4.0 * s2 * area * background)) / 2.0)


def spot_centres(rng: np.random.Generator) -> np.ndarray:
    """(N, 2) ``(ss, fs)``: one spot per grid cell, jittered by up to a quarter cell."""
    n = SHAPE[0] // CELL
    grid = (np.arange(n) + 0.5) * CELL + (SHAPE[0] - n * CELL) / 2.0
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], -1)
    return centres + rng.uniform(-CELL / 4.0, CELL / 4.0, centres.shape)


def expected_photons(centres: np.ndarray, sigma: float, photons: float) -> np.ndarray:
    """Mean photons a pixel from Gaussian spots of ``photons`` each (pixel-centre samples)."""
    image = np.zeros(SHAPE)
    reach = int(np.ceil(5.0 * sigma)) + 1
    norm = photons / (2.0 * np.pi * sigma * sigma)
    for cy, cx in centres:
        y0, x0 = max(int(cy) - reach, 0), max(int(cx) - reach, 0)
        y1, x1 = min(int(cy) + reach + 1, SHAPE[0]), min(int(cx) + reach + 1, SHAPE[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] += norm * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma * sigma))
    return image


def frame_pair(rng: np.random.Generator, sigma: float, snr: float, background: float,
               gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hit, a blank (both in ADU, float32) and the hit's spot centres."""
    centres = spot_centres(rng)
    spots = expected_photons(centres, sigma, spot_photons(snr, sigma, background))
    hit = rng.poisson(background + spots) * gain
    blank = rng.poisson(background, SHAPE) * gain
    return hit.astype(np.float32), blank.astype(np.float32), centres


def score(peaks: np.ndarray, centres: np.ndarray, sigma: float) -> tuple[float, int]:
    """(share of spots found, false peaks) of a peak table against the planted centres."""
    if len(peaks) == 0:
        return 0.0, 0
    d = np.hypot(peaks["ss"][:, None] - centres[None, :, 0],
                 peaks["fs"][:, None] - centres[None, :, 1])
    found = float(np.mean(d.min(0) < max(FOUND_PX, FOUND_SIGMAS * sigma)))
    false = int(np.sum(d.min(1) >= max(FALSE_PX, FALSE_SIGMAS * sigma)))
    return found, false


@dataclass
class Row:
    background: float
    snr: float
    sigma: float
    found: dict[str, float]
    false_hit: dict[str, int]
    false_blank: dict[str, int]


def finders(gain: float) -> dict[str, Any]:
    """The two finders as users get them, behind the evaluation's one interface
    (``evaluation.finders.Finder``): PeakNet's library defaults, DIALS' defaults; both told the
    gain."""
    from peaknet_xtal.evaluation.finders import DispersionFinder, PeakNetFinder

    return {"peaknet": PeakNetFinder({"adu_per_photon": gain}),
            "dispersion": DispersionFinder({"gain": gain})}


def find(finder: Any, image: np.ndarray) -> np.ndarray:
    from peaknet_xtal.types import Frame

    return finder.find(Frame(panels=[image]))  # type: ignore[no-any-return]


def measure(sigmas: Sequence[float], snrs: Sequence[float], backgrounds: Sequence[float],
            gain: float) -> list[Row]:
    found_by = finders(gain)
    rows = []
    for b, background in enumerate(backgrounds):
        for s, snr in enumerate(snrs):
            for w, sigma in enumerate(sigmas):
                rng = np.random.default_rng(SEED + 10_000 * b + 100 * s + w)
                hit, blank, centres = frame_pair(rng, sigma, snr, background, gain)
                row = Row(background, snr, sigma, {}, {}, {})
                for name, finder in found_by.items():
                    row.found[name], row.false_hit[name] = score(find(finder, hit), centres,
                                                                 sigma)
                    row.false_blank[name] = len(find(finder, blank))
                rows.append(row)
                print(f"background {background:g}, SNR {snr:g}, sigma {sigma:g}: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row.found.items()),
                      file=sys.stderr, flush=True)
    return rows


def widest(rows: Sequence[Row], name: str, share: float = 0.9) -> float | None:
    """The widest sigma up to which every narrower one has at least ``share`` found."""
    best = None
    for row in sorted(rows, key=lambda r: r.sigma):
        if row.found[name] < share:
            break
        best = row.sigma
    return best


def report(rows: Sequence[Row]) -> str:
    names = list(rows[0].found)
    lines = [f"{'bg':>4s} {'SNR':>4s} {'sigma':>5s} {'FWHM':>5s}  "
             + "  ".join(f"{n + ' found':>16s} {'false (hit/blank)':>17s}" for n in names)]
    for r in rows:
        lines.append(f"{r.background:4g} {r.snr:4g} {r.sigma:5.2f} {2.355 * r.sigma:5.1f}  "
                     + "  ".join(f"{r.found[n]:16.2f} {r.false_hit[n]:8d} / {r.false_blank[n]:<6d}"
                                 for n in names))
    lines.append("widest spot sigma (px) with at least 90 % found, every narrower one too:")
    for key in sorted({(r.background, r.snr) for r in rows}):
        group = [r for r in rows if (r.background, r.snr) == key]
        lines.append(f"  background {key[0]:g} photons/px, SNR {key[1]:g}: " + ", ".join(
            f"{n} {widest(group, n) if widest(group, n) is not None else '-'}" for n in names))
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Share found against spot sigma, one panel per background, a line per finder and SNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backgrounds = sorted({r.background for r in rows})
    fig, axes = plt.subplots(1, len(backgrounds), figsize=(5.0 * len(backgrounds), 3.8),
                             squeeze=False)
    for ax, background in zip(axes[0], backgrounds, strict=True):
        for snr in sorted({r.snr for r in rows}):
            group = sorted((r for r in rows if r.background == background and r.snr == snr),
                           key=lambda r: r.sigma)
            for name, style in zip(group[0].found, ("o-", "s--"), strict=False):
                ax.plot([r.sigma for r in group], [r.found[name] for r in group], style,
                        label=f"{name}, SNR {snr:g}")
        ax.axhline(0.9, color="grey", ls=":")
        ax.set_xlabel("spot sigma (px)")
        ax.set_ylabel("share of spots found")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"background {background:g} photons a pixel", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", type=float, nargs="+",
                        default=[0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
    parser.add_argument("--snrs", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--backgrounds", type=float, nargs="+", default=[2.0, 20.0],
                        help="background photons a pixel")
    parser.add_argument("--gain", type=float, default=10.0, help="ADU a photon")
    parser.add_argument("--plot", type=Path, default=None, help="share found against sigma")
    args = parser.parse_args(argv)
    if min(args.sigmas) <= 0 or min(args.snrs) <= 0 or min(args.backgrounds) < 0 \
            or args.gain <= 0:
        parser.error("sigmas, SNRs and the gain must be positive, backgrounds not negative")
    logging.basicConfig(level=logging.WARNING)
    rows = measure(args.sigmas, args.snrs, args.backgrounds, args.gain)
    print(report(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
