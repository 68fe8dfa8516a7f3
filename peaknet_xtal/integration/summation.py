"""Background-subtracted summation: the baseline every integrator is compared with.

Foreground: the central ``(2 * fg_radius + 1)^2`` pixels of the box; background: the rest of the
box (a ring two pixels wide with the defaults).  The background level is the ring's mean and its
uncertainty the ring's sample variance over its pixel count; the variance of the sum adds the
foreground's photon noise (the background-subtracted sum, floored at zero), the foreground's
background-plus-read-noise variance (the ring's sample variance per pixel) and the error of the
subtracted level.  This is the textbook estimator (as in DIALS' ``intensity.sum``), written over
the same batched shoeboxes as the VI integrator so both see exactly the same pixels.
"""
from __future__ import annotations

import numpy as np

from peaknet_xtal.integration.shoebox import Shoeboxes


def foreground_mask(side: int, fg_radius: int) -> np.ndarray:
    """(side, side) bool: the central square of half side ``fg_radius``."""
    if not 0 <= fg_radius < side // 2:
        raise ValueError(f"foreground radius {fg_radius} must leave a background ring in a "
                         f"{side}x{side} box")
    c = np.abs(np.arange(side) - side // 2)
    return (c[:, None] <= fg_radius) & (c[None, :] <= fg_radius)


def summation(boxes: Shoeboxes, fg_radius: int = 5) -> dict[str, np.ndarray]:
    """Photons, sigma, background per pixel (and its sigma) for every shoebox."""
    fg = foreground_mask(boxes.side, fg_radius)[None]
    x = boxes.pixels.astype(np.float64)
    m = boxes.mask
    bgm = m & ~fg
    nb = bgm.sum(axis=(1, 2))
    nf = (m & fg).sum(axis=(1, 2))
    nbs = np.maximum(nb, 1)
    level = np.where(bgm, x, 0).sum(axis=(1, 2)) / nbs
    spread = np.where(bgm, (x - level[:, None, None]) ** 2, 0).sum(axis=(1, 2)) / np.maximum(
        nb - 1, 1)
    # Pixels a photon-counting detector saw nothing in give a zero ring variance; a Poisson
    # floor (the level itself plus read noise) keeps sigma honest there.
    spread = np.maximum(spread, np.maximum(level, 0) + boxes.read_noise.astype(float) ** 2)
    photons = np.where(m & fg, x, 0).sum(axis=(1, 2)) - nf * level
    variance = np.maximum(photons, 0) + nf * spread + nf ** 2 * spread / nbs
    ok = (nb > 1) & (nf > 0)
    return {"photons": np.where(ok, photons, np.nan),
            "photons_sigma": np.where(ok, np.sqrt(variance), np.nan),
            "background": np.where(ok, level, np.nan),
            "background_sigma": np.where(ok, np.sqrt(spread / nbs), np.nan)}
