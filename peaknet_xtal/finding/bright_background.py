"""Which pixels are peak pixels where the background holds many photons a pixel.

Why: on a strong smooth background (kapton and solvent scatter on an integrating detector:
thousands of photons a pixel, noise correlated by the point spread) the default model's decision
falls short, not its input (issue 14; ``benchmarks/box_filter_bound.py`` on the evaluation
report's strong-background set: a box matched filter on the model's own input normalisation
finds 95-97 % of the strong reflections at under one false peak per blank, the network alone
85 % at 1.8).  There, and only there, the counting statistics are Gaussian, so a significance
test means what it says; on a sparse photon-counting background the same test calls every photon
a peak (hundreds of false peaks a blank, measured), which is why it is not used everywhere.  So
the decision is split by regime:

- **bright pixels** (local background of at least ``photons`` photons a pixel, at the frame's
  resolved gain): a peak is an 8-connected region where the best 1 x 1, 2 x 2 or 3 x 3 box of
  the residual over the local noise stands at least ``sigmas`` above the spread of such boxes on
  the panel (so the noise's own correlation counts), kept when the network gives it a peak
  probability of at least ``prob`` somewhere (the network still says what is a spot: ring
  edges, streaks and shadows it rejects);
- **every other pixel**: the network's probability at or above the finding threshold, as before.

Why ``photons`` is 100 (chosen on counting statistics, before any measurement): the one-pixel
Poisson tail at 5.5 sigma is 119 times the normal one at 10 photons, 22 times at 50, 11 times at
100 and 4 times at 300 (2 x 2 boxes: 27, 6, 4 and 2 times).  At 100 a 4-Mpx frame expects under
one one-pixel exceedance before the network's veto.  Background and noise are those of the
model's input normalisation (``model/layers/local_norm.py``: 16-px cells, each whole panel at
once) and each box size's spread is one per panel, as the normalisation's decorrelation factor
is, so the decision depends on the panel alone, never on tiles or how panels are laid out.
``sigmas`` and ``prob`` were chosen on the simulated model-selection frames only
(``benchmarks/select_bright_background.py``; ``FindingDefaults`` has the numbers).

Without a gain (none declared, none measured) nothing is bright: the photons are unknown.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The 8-connected neighbourhood within one panel.
_EIGHT = np.ones((3, 3), dtype=bool)
#: The input normalisation's cell side (``model.layers.local_norm.DEFAULT_BLOCK``, which imports
#: torch: this module must not, the DIALS plugin loads it lazily).
CELL = 16
#: Cells with fewer valid samples have no value of their own (``local_norm.MIN_SAMPLES``).
MIN_SAMPLES = 8
#: Box sides summed (spots on these detectors are 1-3 px).
BOX_SIDES = (1, 2, 3)


def bright_pixels(panel: np.ndarray, good: np.ndarray, adu_per_photon: float | None,
                  photons: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(bright, background, noise)`` maps of one panel, or None when no pixel is bright.

    A quick test first (:func:`_may_be_bright`), so that the usual frame, strong spots
    included, costs two block sums and no local maps.
    """
    if not adu_per_photon or adu_per_photon <= 0:
        return None
    level = photons * adu_per_photon
    if not _may_be_bright((panel >= level) & good, good):
        return None
    background, noise = _local_maps(np.where(good, panel, 0.0), good)
    bright = good & (background >= level)
    if not bright.any():
        return None
    return bright, background, noise


def _may_be_bright(flags: np.ndarray, good: np.ndarray) -> bool:
    """False only where the local background cannot reach the bright level anywhere, from the
    ``flags`` of pixels at or above it, cell by cell; no local maps needed.

    Why it holds (``model/layers/local_norm.py``'s background): a cell's background is the
    interquartile mean of its ``n`` samples (one per 2 x 2 pixels with a usable diagonal pixel,
    the mean of that pair); it reaches the level only if its top ``n - ceil(0.75 n) + 1``
    samples do (17 of a full cell's 64), each of which needs a flagged pixel of its own 2 x 2.
    A cell with fewer flags is *quiet*; one with fewer than :data:`MIN_SAMPLES` samples has no
    value.  Each cell then takes the median of the values in its 3 x 3 neighbourhood of cells,
    which reaches the level only if at least half of them do; and the interpolated map is a
    weighted mean of those medians.  So some pixel can be bright only where a neighbourhood holds
    at least as many cells that are not quiet as quiet ones: never around one strong spot, whose
    cell stands among quiet ones.  (The earlier test, any cell with 16 flags, computed the maps
    of a photon-counting Pilatus 6M thaumatin hit for nothing: 0.42 s a frame.)  Exact to
    float32 rounding.
    """
    h, w = flags.shape
    ph, pw = (-h) % CELL, (-w) % CELL
    if ph or pw:
        flags, good = np.pad(flags, ((0, ph), (0, pw))), np.pad(good, ((0, ph), (0, pw)))
    samples = _cell_sums(good[::2, ::2] | good[1::2, 1::2], CELL // 2)
    needed = samples - np.ceil(0.75 * samples).astype(np.int32) + 1
    valued = samples >= MIN_SAMPLES
    loud = valued & (_cell_sums(flags, CELL) >= needed)
    if not loud.any():
        return False
    quiet = valued & ~loud
    around = np.ones((3, 3), dtype=np.int32)
    loud_near = ndimage.correlate(loud.astype(np.int32), around, mode="constant")
    quiet_near = ndimage.correlate(quiet.astype(np.int32), around, mode="constant")
    return bool(((loud_near >= quiet_near) & (loud_near > 0)).any())


def _cell_sums(flags: np.ndarray, side: int) -> np.ndarray:
    """Set ``flags`` per ``side`` x ``side`` cell of an array whose sides are multiples of it:
    an (ny, nx) int32 array."""
    h, w = flags.shape
    return flags.reshape(h // side, side, w // side, side).sum(axis=(1, 3), dtype=np.int32)


def _local_maps(image: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background and noise maps (float64) of the model's input normalisation for one panel."""
    import torch

    from peaknet_xtal.model.layers.local_norm import background_maps

    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    valid = torch.from_numpy(np.ascontiguousarray(good))[None, None]
    background, noise = background_maps(x, valid)
    return background[0, 0].double().numpy(), noise[0, 0].double().numpy()


def box_significance(residual: np.ndarray, usable: np.ndarray, *,
                     flat_fallback: bool = False) -> np.ndarray:
    """Per pixel, the significance of the best 1 x 1, 2 x 2 or 3 x 3 box there: each box sum of
    ``residual`` (already over the local noise; zero off ``usable``) over the robust spread
    (1.4826 x median absolute deviation) of that box size's sums on the ``usable`` pixels.

    Where most of a box size's sums are one value (a sparse photon count) that spread is zero:
    that size is left out, or with ``flat_fallback`` judged against the sums' plain standard
    deviation (1 where that is zero too), so that every size counts on any panel
    (``benchmarks/box_filter_bound.py`` sweeps sets of every kind; on bright pixels the counts
    are Gaussian and the robust spread is not zero).

    Why one spread per panel and box size: the residual is locally normalised, so what the spread
    still measures is how much more a box sum spreads than independent pixels would, the noise's
    spatial correlation (a CCD's point spread), a property of the detector, as the input
    normalisation's panel-wide decorrelation factor is.  Measured per 16-px cell instead (the
    local maps of a box-sum image), the spread's own sampling error let noise through: on the
    selection frames' strong-background blanks 17 false peaks a blank against 10 (prototype
    settings: probability 0.1, 5.5 sigmas).

    Cost: the box sums are sums of shifted views (:func:`box_sums`), the medians
    :func:`exact_median`'s (the same values as ``np.median``), the deviations made in place; on
    a simulated strong-background Rayonix frame (3.7 Mpx, 70 % bright), one thread, CPU time,
    alternating runs on a busy machine: 0.14 s, against 0.33 s with
    ``scipy.ndimage.uniform_filter`` and ``np.median``.
    """
    z = np.where(usable, residual, 0.0)
    best: np.ndarray | None = None
    work: tuple[np.ndarray, np.ndarray] | None = None  # row sums and box sums, reused
    for side in BOX_SIDES:
        if side > 1 and work is None:
            work = (np.empty_like(z), np.empty_like(z))
        box = box_sums(z, side, *(work or ()))
        values = box[usable]
        centre = exact_median(values)
        deviations = np.abs(np.subtract(values, centre, out=values), out=values)
        spread = 1.4826 * exact_median(deviations)
        if flat_fallback and spread <= 0:
            spread = float(np.std(box[usable])) or 1.0
        if spread > 0 or flat_fallback:
            if best is None:
                best = box / spread
            else:
                np.maximum(best, np.divide(box, spread, out=box if box is not z else None),
                           out=best)
    return np.full(z.shape, -np.inf) if best is None else best


def box_sums(z: np.ndarray, side: int, rows: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """Sum of each ``side`` x ``side`` box of a 2-D float64 array (outside it counts as 0), the
    box placed as ``scipy.ndimage.uniform_filter(z, side, mode="constant")`` places it
    (``side // 2`` before the pixel, the rest after): that filter times ``side**2`` to float64
    rounding.  Sums of shifted views, along columns into ``rows`` and then along rows into
    ``out`` (both arrays of ``z``'s shape, made when not given), where the filter keeps running
    means line by line: a few cheap passes (48 against ~8 ms for a 3.7-Mpx panel with a 2 x 2
    box on one thread); ``side`` 1 is ``z`` itself."""
    if side == 1:
        return z
    rows = np.empty_like(z) if rows is None else rows
    out = np.empty_like(z) if out is None else out
    for src, dst in ((z, rows), (rows.T, out.T)):  # along columns, then along rows
        n = len(src)
        first = True
        for offset in range(-(side // 2), side - side // 2):
            k = abs(offset)
            if offset == 0 or k >= n:
                continue
            # dst[i] = src[i] + src[i + offset] where both exist (the first shift), += after
            at, shifted = (slice(k, None), slice(None, n - k)) if offset < 0 else (
                slice(None, n - k), slice(k, None))
            if first:
                np.add(src[at], src[shifted], out=dst[at])
                edge = slice(None, k) if offset < 0 else slice(n - k, None)
                dst[edge] = src[edge]
                first = False
            else:
                dst[at] += src[shifted]
        if first:  # nothing to add: a panel no longer than the box's reach
            np.copyto(dst, src)
    return out


#: values an :func:`exact_median` looks at first to bracket the median (a sorted sample)
MEDIAN_SAMPLE = 8192


def exact_median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array, to the last bit, faster on large arrays.

    Why: ``np.median`` partitions all values (introselect): 28 ms for the 2.6 M box sums of a
    bright Rayonix panel on one thread, six times a panel.  Here a regular sample of
    :data:`MEDIAN_SAMPLE` values brackets the median's rank with a wide margin; one pass counts
    the values below the bracket and takes those inside it (a few per cent), and
    ``np.partition`` of those gives the middle value(s), each the same order statistic
    ``np.median`` picks (for an even count the mean of the two, as it takes it).  Where the
    bracket misses (a sample unlike the whole) or a value is NaN, ``np.median`` itself."""
    n = len(values)
    if n < 4 * MEDIAN_SAMPLE:
        return float(np.median(values))
    sample = np.sort(values[::n // MEDIAN_SAMPLE])
    m = len(sample)
    margin = 4 * int(np.sqrt(m)) + 1  # ~8 standard errors of the sample median's rank
    low, high = sample[max(0, m // 2 - margin)], sample[min(m - 1, m // 2 + margin)]
    lower, upper = values < low, values > high
    below = int(np.count_nonzero(lower))
    inside = values[~(lower | upper)]  # a NaN is neither below nor above: it is inside
    first, last = (n - 1) // 2 - below, n // 2 - below  # ranks of the middle value(s) inside
    if first < 0 or last >= len(inside) or np.isnan(inside).any():
        return float(np.median(values))
    part = np.partition(inside, (first, last))
    return float(part[first]) if first == last else float(np.mean(part[first:last + 1]))


def foreground_and_bright(panel: np.ndarray, prob: np.ndarray, good: np.ndarray,
                          threshold: float, adu_per_photon: float | None, photons: float | None,
                          sigmas: float, min_prob: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Peak pixels of one panel, the module docstring's split by regime (``photons`` None: the
    network's probability alone, everywhere), and the bright pixels where the significance test
    decided (None: nowhere)."""
    network = good & (prob >= threshold)
    found = None if photons is None else bright_pixels(panel, good, adu_per_photon, photons)
    if found is None:
        return network, None
    bright, background, noise = found
    residual = (np.asarray(panel, np.float64) - background) / noise
    significant = bright & (box_significance(residual, bright) >= sigmas)
    labels, n = ndimage.label(significant, structure=_EIGHT)
    if n:  # the regions' best probability from their own pixels (ndimage.maximum sorts all)
        best = np.zeros(n + 1)
        np.maximum.at(best, labels[significant], prob[significant])
        keep = best >= min_prob
        keep[0] = False
        significant = keep[labels]
    return np.where(bright, significant, network), bright
