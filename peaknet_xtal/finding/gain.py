"""Detector gain (ADU per photon) from the image itself, for the shot-noise term of peak SNRs.

Why: a peak's SNR counts its own shot noise as ``gain x intensity``, so the gain must be right,
yet most files declare none, or a placeholder (CBF's nominal 1 on integrating detectors,
``adu_per_eV = 1`` in CrystFEL geometries, i.e. thousands of ADU per photon).

How (photon-transfer relation): on background pixels the variance in ADU grows with the mean in
ADU as ``var = gain * mean + c`` (``c`` = read noise^2 minus gain x pedestal offset), so the
slope of variance against mean over regions of different background level is the gain.  Unlike
the ratio ``var / mean`` that ``dials.estimate_gain`` takes (the median index of dispersion),
the slope is blind to read noise and to pedestal offsets.  The measurement:

- every panel is cut into ``block x block`` pixel blocks (blocks with masked or non-finite
  pixels dropped); blocks whose neighbouring pixels correlate (a spot, a streak: anything wider
  than a pixel) are not background and are dropped too;
- each block's pixels are split in a checkerboard: the *black* half gives a mean used only to
  group the blocks of a panel by level, the *white* half gives the block's mean and variance.
  Groups chosen by an independent mean do not correlate with the white half's noise, so
  averaging within a group removes the errors-in-variables bias that a plain regression of block
  variance on block mean has (and the Poisson coupling of a sample mean and variance);
- a straight line with one slope and one intercept per panel (a fixed effect: per-panel
  pedestal offsets, common on integrating detectors, drop out) is fitted through the group
  points, equally weighted (weights from the points' own scatter bias the slope low: measured,
  0.7 x the true gain on a sparse background);
- the fit is corrected for the group means' own sampling noise (errors in variables).  On a
  nearly flat, sparse background (a blank frame with a few hundredths of a photon a pixel and
  read noise above the shot noise) a panel's groups span less than an ADU of true level, and
  the sampling noise of their means is as large: the plain slope was attenuated towards zero
  (1.6 for a true 8 ADU per photon at 0.05 photons a pixel, with a claimed error of 12 %), and
  such frames, common among the blanks of a run, set the run's gain several times too low,
  every peak SNR too high, and blanks came out with twice the false peaks.  Each group's
  mean has a known sampling variance (its blocks' pixel variance over the pixels averaged) and
  a known covariance with its variance (the pixels' third central moment over the same count);
  both are taken out of the fit's sums (the moment correction of a regression whose
  regressor is measured with known error), and :attr:`GainEstimate.lever` is the share of the
  groups' level spread that is real.  Below ``MIN_LEVER`` the frame shows no gain.

The estimate is ``reliable`` only when the slope is positive and its relative standard error is
at most ``MAX_RELATIVE_ERROR``: a flat, empty frame says little about the gain, and then nothing is
claimed.  A point-spread function (CCDs, spatially correlated noise) lowers pixel variance and
so the estimate (see the end of this docstring); the correlation filter then also drops most
blocks.

When an estimate replaces a declared gain (:func:`choose_gain`):

- a gain the user sets explicitly is never replaced (callers do not ask);
- no declared gain: the estimate when reliable, else none (SNR from background noise only);
- a placeholder-like declared gain (exactly 1, or above ``PLACEHOLDER_ABOVE`` ADU per photon,
  which is what ``adu_per_eV = 1`` gives at X-ray energies): the estimate when reliable and more
  than ``DISAGREEMENT`` times off the declared value, else the declared value;
- any other declared gain is kept (a disagreement is logged, never acted on).

Measured (``benchmarks/bench_gain.py --backgrounds 0.03 0.15 1 3``): simulated ePix10k2M
blanks at 1-50 ADU per photon on backgrounds of 0.03-3 photons a pixel are recovered within 8 %
(the estimate scales with the data, so the background level and read noise in photons set the
error, not the gain); hits within 2 % from 1 photon a pixel up, but 9 % high at 0.15 and 21 %
high at 0.03, where faint spots no filter sees add variance to the brighter blocks (a high gain
lowers the SNRs: it errs towards fewer false peaks).  Before the errors-in-variables correction
the blanks at 0.03 came out 13 % low, and the randomised blanks of ``benchmarks/bench_blanks.py``
(read noise above the shot noise) at 0.15-0.5 of their gain, called reliable.  On the two real
CSPAD CBFs (nominal gain 1, about 30 ADU per photon in truth) this gives 28 and 33 ADU per
photon, where ``dials.estimate_gain`` says 4.2 and 4.0 (its ratio mixes the panels' pedestal
offsets into the mean).

Not corrected: a point spread (CCDs) lowers the pixel variance, so the slope is the pixel-level
one, below the conversion gain that a whole spot's shot noise follows; so is a background whose
noise is below its shot noise, as ``sim.artifacts.add_strong_background`` draws it per frame.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Side of the pixel blocks whose mean and variance are compared (16 x 16: 128 pixels a half).
BLOCK = 16
#: Groups of blocks (by background level) along the fitted line.
GROUPS = 16
#: Fewest blocks in a group.
MIN_GROUP = 8
#: Blocks whose neighbouring pixels correlate this much more than the panel's median block are
#: taken to hold spots (independent noise: about 0.05 standard deviation at 16 x 16).
MAX_EXTRA_CORRELATION = 0.15
#: Largest relative standard error of the slope for the estimate to be called reliable.
MAX_RELATIVE_ERROR = 0.15
#: Least share of the groups' level spread that is real, not the sampling noise of their means,
#: for an estimate to be called reliable (below it the corrected slope is mostly correction).
MIN_LEVER = 0.5
#: Declared gains above this many ADU per photon look like ``adu_per_eV = 1`` placeholders.
PLACEHOLDER_ABOVE = 1000.0
#: A placeholder-like declared gain is replaced when the estimate is this many times off.
DISAGREEMENT = 2.0


@dataclass(frozen=True)
class GainEstimate:
    """Slope (gain, ADU per photon) and intercept of background variance against mean."""

    gain: float
    intercept: float
    relative_error: float  # standard error of the slope over the slope (inf when unknown)
    n_blocks: int
    mean_range: tuple[float, float]  # background levels (ADU) the fit spans
    frames: int = 1  # frames pooled (median of their estimates)
    lever: float = 1.0  # share of the fitted level spread that is real (module docstring)

    @property
    def reliable(self) -> bool:
        return bool(self.gain > 0 and self.relative_error <= MAX_RELATIVE_ERROR
                    and self.lever >= MIN_LEVER)

    def describe(self) -> str:
        if self.n_blocks == 0:  # pooled over frames
            return f"{self.gain:.3g} ADU/photon (median of {self.frames} frames' estimates)"
        return (f"{self.gain:.3g} ADU/photon +- {100 * self.relative_error:.0f} % from "
                f"{self.n_blocks} background blocks at {self.mean_range[0]:.3g}-"
                f"{self.mean_range[1]:.3g} ADU")


UNKNOWN = GainEstimate(gain=float("nan"), intercept=float("nan"), relative_error=float("inf"),
                       n_blocks=0, mean_range=(float("nan"), float("nan")))


def block_statistics(panel: np.ndarray, good: np.ndarray | None = None, block: int = BLOCK
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per complete, fully good block: black-half mean, white-half mean, white-half variance,
    the correlation of horizontally and vertically adjacent pixels (about 0 for independent
    pixel noise, large where a spot or any structure wider than a pixel fills the block), and the
    white half's third central moment (unbiased; with the variance it gives the sampling
    covariance of the white mean and variance)."""
    image = np.asarray(panel)
    ok = np.isfinite(image) if good is None else (np.asarray(good, bool) & np.isfinite(image))
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    if h == 0 or w == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty

    def blocks(a: np.ndarray) -> np.ndarray:  # (rows, cols, block, block), a view
        return a[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3)

    usable = blocks(ok).reshape(-1, block * block).all(axis=1)
    # one float64 copy in block order (a 2-Mpx panel's copies cost more than its statistics)
    values = np.empty((h // block, w // block, block, block))
    values[...] = blocks(image)
    values = values.reshape(-1, block, block)
    if not usable.all():
        values = values[usable]
    if len(values) == 0:  # no fully good block (an all-masked or all-NaN panel)
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty
    yy, xx = np.indices((block, block))
    black = ((yy + xx) % 2 == 0).ravel()
    flat = values.reshape(len(values), -1)
    mean_black = flat[:, black].mean(axis=1)
    white = flat[:, ~black]
    centred = values - flat.mean(axis=1)[:, None, None]
    lagged = ((centred[:, :, 1:] * centred[:, :, :-1]).mean(axis=(1, 2))
              + (centred[:, 1:, :] * centred[:, :-1, :]).mean(axis=(1, 2))) / 2
    spread = np.maximum((centred ** 2).mean(axis=(1, 2)), 1e-30)
    n = white.shape[1]
    mean_white = white.mean(axis=1)
    deviation = white - mean_white[:, None]
    # a product, not ``** 3`` (numpy's general power: 60 % of this function's time)
    third = (deviation * deviation * deviation).sum(axis=1) * n / ((n - 1) * (n - 2))
    return mean_black, mean_white, white.var(axis=1, ddof=1), lagged / spread, third


def estimate_gain(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None, *,
                  block: int = BLOCK, groups: int = GROUPS) -> GainEstimate:
    """Gain of one frame (or several frames' panels together) from its background pixels.

    ``panels`` are 2-D arrays in ADU, ``masks`` True = good.  Block groups are formed within each
    panel and the line is fitted to their deviations from their panel's average (a fixed effect
    per panel), so per-panel pedestal offsets, which are common on integrating detectors, never
    enter the slope.  Returns :data:`UNKNOWN` when there are too few blocks to fit.
    """
    points: list[tuple[float, ...]] = []
    owner: list[int] = []
    n_blocks = 0
    for i, panel in enumerate(panels):
        key, mean, var, corr, third = block_statistics(
            panel, None if masks is None else masks[i], block)
        if len(key):  # blocks holding spots (or other structure) are not background
            flat = corr <= np.median(corr) + MAX_EXTRA_CORRELATION
            key, mean, var, third = key[flat], mean[flat], var[flat], third[flat]
        n_blocks += len(key)
        count = min(groups, len(key) // MIN_GROUP)
        if count < 2:
            continue
        found = _group_points(key, mean, var, third, count, block * block // 2)
        points.extend(found)
        owner.extend([i] * len(found))
    if len(points) < 3:
        return UNKNOWN
    x, y, w, x_var, xy_cov = np.array(points).T
    slope, intercept, error, lever = _fixed_effects_line(x, y, w, np.array(owner), x_var, xy_cov)
    rel = abs(error / slope) if slope != 0 else float("inf")
    return GainEstimate(gain=float(slope), intercept=float(intercept),
                        relative_error=float(rel), n_blocks=n_blocks,
                        mean_range=(float(x.min()), float(x.max())), lever=lever)


def _group_points(key: np.ndarray, mean: np.ndarray, var: np.ndarray, third: np.ndarray,
                  count: int, pixels: int) -> list[tuple[float, float, float, float, float]]:
    """The blocks of one panel in ``count`` groups by ``key`` (``np.array_split`` of their
    stable order: sizes differ by at most one), blocks holding spots left out by their variance
    (outside 1.5 interquartile ranges of their group's); per group with at least 3 blocks kept:
    its mean, variance, weight (blocks), the sampling variance of its mean and the sampling
    covariance of its mean and variance (each block's half averages ``pixels`` pixels: variance
    / n and third moment / n, over the blocks kept).

    All groups at once: their quartiles from one sort, with ``np.percentile``'s linear
    interpolation written out (the same values to the last bit), their means from
    ``np.bincount`` sums (the per-group means to within float rounding; both tested in
    ``tests/finding/test_gain.py``).  Why: ``np.percentile`` and the means group by group took
    0.2 s of a 2-Mpx frame's 0.3 s estimate (about a thousand groups of 8-900 blocks)."""
    order = np.argsort(key, kind="stable")
    each, extra = divmod(len(order), count)
    sizes = np.full(count, each)
    sizes[:extra] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group = np.repeat(np.arange(count), sizes)
    var, mean, third = var[order], mean[order], third[order]
    within = np.lexsort((var, group))  # each group's variances in ascending order
    q1, q3 = (_sorted_quantile(var[within], starts, sizes, q) for q in (0.25, 0.75))
    fence = 1.5 * (q3 - q1)
    keep = (var >= (q1 - fence)[group]) & (var <= (q3 + fence)[group])
    kept = np.bincount(group[keep], minlength=count)
    sums = [np.bincount(group[keep], column[keep], minlength=count)
            for column in (mean, var, third)]
    enough = kept >= 3
    blocks = kept[enough]
    level, spread, skew = (total[enough] / blocks for total in sums)
    n = pixels * blocks
    return list(zip(level.tolist(), spread.tolist(), blocks.astype(float).tolist(),
                    (spread / n).tolist(), (skew / n).tolist(), strict=True))


def _sorted_quantile(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray, q: float
                     ) -> np.ndarray:
    """The ``q`` quantile of each run ``values[start:start + size]`` (each sorted, size >= 2),
    as ``np.percentile``'s default (linear) method computes it: index ``q (n - 1)``, the values
    either side, ``a + (b - a) t``, or ``b - (b - a) (1 - t)`` from ``t`` = 0.5 up."""
    virtual = (sizes - 1) * q
    before = np.floor(virtual)
    at = starts + before.astype(np.intp)
    low, high = values[at], values[at + 1]
    t = virtual - before
    diff = high - low
    return np.where(t >= 0.5, high - diff * (1 - t), low + diff * t)


def _fixed_effects_line(x: np.ndarray, y: np.ndarray, w: np.ndarray, group: np.ndarray,
                        x_var: np.ndarray, xy_cov: np.ndarray
                        ) -> tuple[float, float, float, float]:
    """Weighted least-squares slope common to all groups (each with its own intercept), the
    mean intercept, the slope's standard error from the scatter about the lines (so unmodelled
    structure widens it) and the lever: the share of the x spread about the group means that is
    real.  ``x_var`` / ``xy_cov``: each point's sampling variance of x and covariance of x and y
    errors, taken out of the sums (errors in variables; a point's deviation from its group's
    weighted mean keeps ``1 - w / W`` of them); the standard error grows by 1 / lever."""
    labels, inverse = np.unique(group, return_inverse=True)
    sw = np.bincount(inverse, w)
    xm = (np.bincount(inverse, w * x) / sw)[inverse]
    ym = (np.bincount(inverse, w * y) / sw)[inverse]
    dx, dy = x - xm, y - ym
    sxx = (w * dx * dx).sum()
    if sxx <= 0:
        return 0.0, float("nan"), float("inf"), 0.0
    own = 1.0 - w / sw[inverse]
    noise_xx = float((w * own * x_var).sum())
    noise_xy = float((w * own * xy_cov).sum())
    lever = (sxx - noise_xx) / sxx
    if lever <= 0:
        return 0.0, float("nan"), float("inf"), float(lever)
    slope = ((w * dx * dy).sum() - noise_xy) / (sxx - noise_xx)
    intercept = float(np.average(ym - slope * xm, weights=w))
    dof = max(len(x) - len(labels) - 1, 1)
    scale = (w * (dy - slope * dx) ** 2).sum() / dof
    return float(slope), intercept, float(np.sqrt(scale / sxx) / lever), float(lever)


def is_real_gain(declared: float | None) -> bool:
    """Whether a declared gain is used as it is, never checked against the data: positive and
    not placeholder-like (:func:`is_placeholder`)."""
    return declared is not None and declared > 0 and not is_placeholder(declared)


def is_placeholder(declared: float) -> bool:
    """A declared gain that files carry when nobody measured one (see the module docstring)."""
    return declared == 1.0 or declared > PLACEHOLDER_ABOVE


def choose_gain(declared: float | None, estimate: GainEstimate) -> tuple[float | None, str]:
    """The gain to use for shot noise and why (module docstring: when an estimate replaces a
    declared gain).  ``declared`` is what the file or geometry says (None: nothing)."""
    if declared is None or not declared > 0:
        if estimate.reliable:
            return estimate.gain, f"no gain declared; estimated {estimate.describe()}"
        return None, "no gain declared and the background does not show one"
    if not estimate.reliable:
        return declared, f"declared gain {declared:g} (the background does not show one)"
    ratio = max(estimate.gain / declared, declared / estimate.gain)
    if ratio <= DISAGREEMENT:
        return declared, f"declared gain {declared:g} (background agrees: {estimate.gain:.3g})"
    if is_placeholder(declared):
        return estimate.gain, (f"declared gain {declared:g} looks like a placeholder; estimated "
                               f"{estimate.describe()}")
    return declared, (f"declared gain {declared:g} kept although the background suggests "
                      f"{estimate.describe()}")


class GainResolver:
    """The gain of a run: estimated on its first frames, then fixed.

    Why fixed: a detector's gain does not change from shot to shot, one number keeps the frames'
    SNRs comparable, and estimating stops costing time once settled.  Only declared gains that
    are missing or placeholder-like (:func:`is_placeholder`) are checked against the data; the
    first ``frames`` reliable estimates are pooled (their median, so frames before the last use
    the running median).  Frames whose background shows no gain (flat, sparse blanks: most of a
    serial run at a low hit rate) do not count towards ``frames``: the resolver goes on looking,
    up to ``max_frames`` frames in all, so that a run that opens with blanks still gets its gain
    from the first frames that show one.  Each look costs 0.06-0.08 s on a 2-Mpx frame (one
    thread; 0.27-0.30 s before a panel's block groups were computed together,
    :func:`_group_points`), before the frame's peaks are found: on a GPU the next batch waits
    for it.  A "run" is frames of one panel layout: when the panel shapes change (one engine or
    ``PeakFinder`` handed another detector's images) the gain is
    measured again, so one detector's gain never carries over to another's.
    """

    def __init__(self, frames: int = 5, max_frames: int = 50) -> None:
        self.frames = frames
        self.max_frames = max_frames
        self._gains: list[float] = []
        self._seen = 0
        self._said: set[float | None] = set()
        self._layout: list[tuple[int, ...]] | None = None

    @property
    def settled(self) -> bool:
        """Whether the gain is fixed from here on: ``frames`` estimates pooled, or ``max_frames``
        frames looked at (declared real gains are never measured and need no settling)."""
        return len(self._gains) >= self.frames or self._seen >= self.max_frames

    @property
    def estimate(self) -> float | None:
        """The pooled estimate so far (ADU per photon), None before any reliable one."""
        return float(np.median(self._gains)) if self._gains else None

    def __call__(self, declared: float | None, panels: Sequence[np.ndarray],
                 masks: Sequence[np.ndarray] | None = None) -> float | None:
        """Gain for this frame given the declared one (see :func:`choose_gain`)."""
        if is_real_gain(declared):
            return declared  # a real declared gain: no need to look at the data
        layout = [tuple(np.shape(p)) for p in panels]
        if layout != self._layout:  # another detector: its own gain, measured again
            if self._layout is not None:
                log.info("panel layout changed: the detector gain is measured again")
            self._layout, self._gains, self._seen = layout, [], 0
        if len(self._gains) < self.frames and self._seen < self.max_frames:
            self._seen += 1
            estimate = estimate_gain(panels, masks)
            if estimate.reliable:
                self._gains.append(estimate.gain)
        current = self.estimate
        pooled = UNKNOWN if current is None else GainEstimate(
            gain=current, intercept=float("nan"), relative_error=0.0, n_blocks=0,
            mean_range=(0.0, 0.0), frames=len(self._gains))
        gain, why = choose_gain(declared, pooled)
        said = None if gain is None else float(f"{gain:.2g}")
        if said not in self._said:
            self._said.add(said)
            log.info("detector gain: %s", why)
        return gain
