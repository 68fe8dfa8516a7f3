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
  pixels dropped, and blocks of one value: a saturated plateau has no noise, and four such blocks
  of a 50 x 50 plateau at 16383 ADU flattened a real CSPAD still's line until it showed no gain);
  blocks whose neighbouring pixels correlate (a spot, a streak, a plateau's edge: anything wider
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
- a panel whose gain correction is wrong (ten times the gain weighs a hundred times as much) is
  left out of both fits first, and named: its own slope far above the median panel's, or its
  noise most of the fit's error (:func:`_disagreeing_panels`);
- pedestal offsets that differ *inside* a panel (per chip or ASIC: JUNGFRAU modules are 2 x 4
  chips of 256 x 256 pixels and a Jungfraujoch 4M file is one panel of 72 of them; AGIPD
  modules are 8 x 2 ASICs of 64 x 64) add level spread with no variance to it and pull that
  slope down: a Jungfraujoch file with chip offsets of 0.2 photon gave 1.3 for 12.4 ADU per
  photon (not reliable, so the placeholder 1 was kept and blank frames got 31 and 37 false
  peaks), AGIPD modules 10 for 70 (called reliable).  So a second fit takes each block about
  its ``REGION`` x ``REGION`` pixel region's average (a fixed effect per 64-px region, whatever
  the chip layout, as long as chips are multiples of 64 px on the panel's grid), groups the
  deviations by the black half's deviation, and drops blocks holding spots by the black half's
  variance (the white half's would select on its own noise: +5 % on a sparse background) and
  single hot pixels by the white half's (3 interquartile ranges).  It takes only blocks whose
  neighbouring pixels correlate no more than ``MAX_EXTRA_CORRELATION`` above zero (independent
  noise), not above the panel's median block as the per-panel fit does: on a dense hit at a low
  background the median block holds a spot's wings (median correlation 0.25 on a 256 x 256 hit
  with 121 peaks), and their level spread was the per-region fit's lever: 2.7 times the gain,
  called reliable, which as the run's only reliable frame set its gain (true 12.4, read 33.1;
  now not reliable there, and simulated dense hits of that kind that read 19.5 and 25.6 times
  the gain read 1.12, not reliable, and 1.03).  Its points' sampling noise
  is exact for the centring (:func:`_region_points`).  64 px: the largest region nested in
  every chip layout of the shared geometries (AGIPD's ASICs).  It has less lever (only the
  level spread inside regions, 0.35-0.6 of the share on blanks at 0.03-0.15 photon a pixel,
  against 0.55-0.9 per panel), so it is not reliable on several sparse blanks the per-panel fit
  measures, and it reads up to 15 % high on hits, where faint spots no filter sees have less real
  spread to hide in.  Hence :func:`_choose_fit`: the per-panel fit stands unless it is not
  reliable, or the per-region slope is above it by more than ``OFFSET_RATIO`` (1.4) times and
  by three standard errors of their difference;
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

With offsets inside panels (``benchmarks/bench_gain.py``, chips with offsets of 0.2 photon,
three seeds): 256-px chips in one 1024 x 1024 panel and AGIPD's 64-px ASICs in 512 x 128
modules at 0.15-1 photon a pixel come out at 0.96-1.09 (before: 0.56-0.69 at 1 photon, called
reliable, and nothing at 0.15); at 3 photons a pixel the offsets pull the per-panel slope only
to 0.92-0.98, below ``OFFSET_RATIO``, and it stands; at 0.03 nothing is claimed, as before.
The offset-free frames above and the CSPAD CBFs keep their numbers (the per-panel fit stands on
every one).  The trial files: the Jungfraujoch 4M file with chip offsets settles at 12.8 for
12.4 ADU per photon (frames 12.2-14.5; its blank frames get no peaks), the same file without
offsets at 12.5 as before, AGIPD frames through the Python API at 69.4 for 69.75 (before: 10).
A 256 x 256 px file with offsets of 0.2 photon per 64-px region at 12.4 ADU per photon and
0.2 photon a pixel (six frames, one a dense hit) shows no gain (the placeholder is kept, with
the warning); the correlation bound on the per-region fit left every number above as it was.
On a selection set of simulated frames (ePix10k2M seeds 2-4 at 0.03-3 photons a pixel, hits and
blanks, and AGIPD-like modules with ASIC offsets), against the per-panel fit alone: root-mean-
square error 0.27 against 0.36 (a frame that claims nothing counts 1), 2 frames with no claim
against 3, the worst claimed error 19 % against 53 % (ASIC offsets at 1 photon a pixel: 0.47-0.54
of the gain, called reliable).  The look costs 0.036 s against 0.023 on a 2.2-Mpx frame (one
thread), 0.072 against 0.056 on a 4.5-Mpx panel.

Mis-calibrated panels (the trial's reproductions): two CSPAD ASICs of 64 at ten times the gain
made the two real stills read 291 and 303 ADU per photon (the run 297; the healthy panels kept 41
of 215 and 11 of 116 peaks); now 27.5 and 32.5 (the run 30.0) and 215 and 116 of them, with a
warning naming the two.  A simulated ePix10k2M module (four ASICs of 64) at ten times: 274
before, now 29.5-30.1 a frame (a flat ASIC among them left out by its noise).  No panel is left
out on 172 healthy frames (the CSPAD stills with and without their mask, simulated ePix10k2M
hits and blanks, chip offsets, sparse blanks), and ``benchmarks/bench_gain.py`` prints the same
numbers.  A saturated 50 x 50 plateau on a CSPAD ASIC: no gain before, 27.8 and 32.7 now (27.9
and 32.7 without it).  The checks add 1-3 ms to a look of about 60 ms (a 2.2-Mpx frame).

Not corrected: a point spread (CCDs) lowers the pixel variance, so the slope is the pixel-level
one, below the conversion gain that a whole spot's shot noise follows; so is a background whose
noise is below its shot noise, as ``sim.artifacts.add_strong_background`` draws it per frame.
Nor are faint spots whose wings do not correlate neighbouring pixels: on simulated dense hits
at 0.1-0.2 photon a pixel (256 x 256 px, 24 frames) with region offsets one frame's
per-region fit still read 1.68 times the gain, called reliable (before the correlation bound
six read 1.35-25.6 times); the run's median over its first reliable frames is the guard.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
#: Side (pixels) of the square regions of a panel that get a fixed effect each in the fit that
#: pedestal offsets inside a panel cannot bias (per chip or ASIC: 64 x 64 is AGIPD's ASIC, the
#: smallest in the shared geometries; JUNGFRAU's and Eiger's 256 x 256 chips hold 16 each).
REGION = 64
#: The per-panel fit stands (unless it is not reliable) until the per-region fit is above it by
#: more than this many standard errors of their difference ...
MAX_DISAGREEMENT_SIGMAS = 3.0
#: ... and more than this many times (between the largest per-region / per-panel ratio on
#: offset-free simulated frames, 1.10, and the smallest with ASIC offsets, 1.84: their
#: geometric mean, rounded; :func:`_choose_fit`).
OFFSET_RATIO = 1.4
#: The per-region fit drops blocks holding spots by their black half's variance (outside 1.5
#: interquartile ranges of their group's: independent of the white half's noise) and single
#: hot pixels by the white half's, outside this many (Tukey's "far out" fence).
FAR_OUT = 3.0
#: A panel whose own slope is above this many times the median panel's (and above it by
#: ``MAX_DISAGREEMENT_SIGMAS`` of its own standard errors) is taken to be mis-calibrated and left
#: out (:func:`_disagreeing_panels`).  Healthy panels read up to 2.06 times the median: the ASIC
#: of the real CSPAD stills with the most spots (faint spots' wings add variance); 1.7 on
#: simulated ePix10k2M hits and blanks at 0.03-3 photons a pixel; but up to 5.8 on the blank
#: benchmark's model-selection frames with a strong smooth background (its noise below its
#: shot noise on most panels, so there the panels reading high were the right ones: a first
#: ratio of 2.5 took three CSPAD frames' estimates from 31 and 22 to 20 and 16 for a true 38-41).
#: A frame's zinger that the block filters miss can make a panel read 40-140 times: left out
#: too, which only helps the fit.  Gain modes differ by 10-100 times (ePix10k high and low,
#: JUNGFRAU's and AGIPD's stages); ePix10k's high and medium modes, 3 times apart, are not caught.
PANEL_RATIO = 6.0
#: A panel is named as mis-calibrated once it was left out of this many frames' estimates: a
#: wrong gain correction stays, a zinger or streak is one frame's.
NAMED_AFTER = 2
#: A panel without which the fit's standard error falls more than this many times is left out
#: (its noise is most of the fit's error: :func:`_disagreeing_panels`): 17-23 times for a flat
#: ASIC at ten times the gain, at most 1.15 on healthy frames; a first value of 2 also took a
#: blank benchmark CSPAD frame on a strong smooth background from 31 to 20 (true 38), 4 none.
NOISE_RATIO = 4.0
#: Fewest panels with a reliable slope of their own for the comparison: the smallest number whose
#: median one disagreeing panel cannot set.
MIN_PANELS = 3
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
    within_regions: bool = False  # from the per-region fit (offsets inside panels: docstring)
    #: panels left out as mis-calibrated (:func:`_disagreeing_panels`): each with its own slope,
    #: far above the others', and those whose noise made most of the fit's error
    disagreeing: tuple[tuple[int, float], ...] = ()
    noisy: tuple[int, ...] = ()
    typical_panel: float = float("nan")  # the median panel's own slope, where panels were left out

    @property
    def reliable(self) -> bool:
        return bool(self.gain > 0 and self.relative_error <= MAX_RELATIVE_ERROR
                    and self.lever >= MIN_LEVER)

    def describe(self) -> str:
        if self.n_blocks == 0:  # pooled over frames
            return f"{self.gain:.3g} ADU/photon (median of {self.frames} frames' estimates)"
        where = (f" (within {REGION}-px regions: pedestal offsets inside the panels)"
                 if self.within_regions else "")
        return (f"{self.gain:.3g} ADU/photon +- {100 * self.relative_error:.0f} % from "
                f"{self.n_blocks} background blocks at {self.mean_range[0]:.3g}-"
                f"{self.mean_range[1]:.3g} ADU{where}")


UNKNOWN = GainEstimate(gain=float("nan"), intercept=float("nan"), relative_error=float("inf"),
                       n_blocks=0, mean_range=(float("nan"), float("nan")))


def block_statistics(panel: np.ndarray, good: np.ndarray | None = None, block: int = BLOCK
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per complete, fully good block: black-half mean, white-half mean, white-half variance,
    the correlation of horizontally and vertically adjacent pixels (about 0 for independent
    pixel noise, large where a spot or any structure wider than a pixel fills the block), and the
    white half's third central moment (unbiased; with the variance it gives the sampling
    covariance of the white mean and variance)."""
    return _block_table(panel, good, block)[:5]  # type: ignore[return-value]


def _block_table(panel: np.ndarray, good: np.ndarray | None, block: int
                 ) -> tuple[np.ndarray, ...]:
    """:func:`block_statistics`, each block's row and column (in blocks) on the panel and its
    black half's variance."""
    image = np.asarray(panel)
    ok = np.isfinite(image) if good is None else (np.asarray(good, bool) & np.isfinite(image))
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    if h == 0 or w == 0:
        return tuple(np.zeros(0) for _ in range(8))

    def blocks(a: np.ndarray) -> np.ndarray:  # (rows, cols, block, block), a view
        return a[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3)

    usable = blocks(ok).reshape(-1, block * block).all(axis=1)
    # one float64 copy in block order (a 2-Mpx panel's copies cost more than its statistics)
    values = np.empty((h // block, w // block, block, block))
    values[...] = blocks(image)
    values = values.reshape(-1, block, block)
    # a block of one value has no noise: a saturated plateau, a filled region, never a
    # background (a 50 x 50 plateau at 16383 ADU on a CSPAD ASIC: four such blocks at a level
    # of 16383 with no variance flattened the line, and the frame showed no gain); but a block
    # of 0 counts is the background of a sparse photon-counting frame (dropping those too took
    # a simulated Eiger 16M blank of the blank benchmark from 0.98 to 0.094 ADU per photon,
    # called reliable, and moved 12 of its 20 Pilatus 6M and Eiger frames)
    flat = values.reshape(len(values), -1)
    usable &= (flat != flat[:, :1]).any(axis=1) | (flat[:, 0] == 0)
    row, col = np.divmod(np.flatnonzero(usable), w // block)
    if not usable.all():
        values = values[usable]
    if len(values) == 0:  # no fully good block (an all-masked or all-NaN panel)
        return tuple(np.zeros(0) for _ in range(8))
    yy, xx = np.indices((block, block))
    black = ((yy + xx) % 2 == 0).ravel()
    flat = values.reshape(len(values), -1)
    mean_black = flat[:, black].mean(axis=1)
    var_black = flat[:, black].var(axis=1, ddof=1)
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
    return (mean_black, mean_white, white.var(axis=1, ddof=1), lagged / spread, third, row, col,
            var_black)


def estimate_gain(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None, *,
                  block: int = BLOCK, groups: int = GROUPS, region: int = REGION
                  ) -> GainEstimate:
    """Gain of one frame (or several frames' panels together) from its background pixels.

    ``panels`` are 2-D arrays in ADU, ``masks`` True = good.  Two fits of the same blocks
    (module docstring): block groups formed within each panel and fitted about their panel's
    average (a fixed effect per panel, so per-panel pedestal offsets never enter the slope), and
    blocks taken about their ``region`` x ``region`` pixel region's average before they are
    grouped (a fixed effect per region: pedestal offsets per chip or ASIC inside a panel drop
    out too).  The per-panel fit, the more precise, is returned unless it is not reliable or the
    per-region fit is above it by more than ``OFFSET_RATIO`` times and
    ``MAX_DISAGREEMENT_SIGMAS`` standard errors of their difference; then the per-region fit is
    (:func:`_choose_fit`).  Returns :data:`UNKNOWN` when there are too few blocks to fit.
    """
    panel_points: list[tuple[float, ...]] = []
    region_points: list[tuple[float, ...]] = []
    panel_owner: list[int] = []
    region_owner: list[int] = []
    panel_blocks: list[int] = []
    pixels = block * block // 2
    per = max(region // block, 1)  # blocks along a region's side
    for i, panel in enumerate(panels):
        key, mean, var, corr, third, row, col, key_var = _block_table(
            panel, None if masks is None else masks[i], block)
        if len(key):  # blocks holding spots (or other structure) are not background
            typical = float(np.median(corr))
            flat = corr <= typical + MAX_EXTRA_CORRELATION
            key, mean, var, third = key[flat], mean[flat], var[flat], third[flat]
            row, col, key_var, corr = row[flat], col[flat], key_var[flat], corr[flat]
        panel_blocks.append(len(key))
        count = min(groups, len(key) // MIN_GROUP)
        if count < 2:
            continue
        found = _group_points(key, mean, var, third, count, pixels)
        panel_points.extend(found)
        panel_owner.extend([i] * len(found))
        # the per-region fit: only blocks whose pixels correlate no more than independent noise
        # allows, whatever the panel's typical block (a hit's panel: mostly spot wings)
        clean = corr <= min(typical, 0.0) + MAX_EXTRA_CORRELATION
        if clean.sum() < 2 * MIN_GROUP:
            continue
        label = (row // per) * (int(col.max()) // per + 1) + col // per
        found = _region_points(key[clean], mean[clean], var[clean], third[clean], label[clean],
                               count, pixels, key_var[clean])
        region_points.extend(found)
        region_owner.extend([i] * len(found))
    high, noisy, typical = _disagreeing_panels(panel_points, panel_owner)
    out = set(high) | set(noisy)
    if out:  # mis-calibrated panels: left out of both fits
        panel_points, panel_owner = _without(panel_points, panel_owner, out)
        region_points, region_owner = _without(region_points, region_owner, out)
    n_blocks = sum(n for i, n in enumerate(panel_blocks) if i not in out)
    by_panel = _fit(panel_points, panel_owner, n_blocks, centred=False)
    by_region = _fit(region_points, region_owner, n_blocks, centred=True)
    chosen = _choose_fit(by_panel, by_region)
    if not out:
        return chosen
    return replace(chosen, disagreeing=tuple(sorted(high.items())), noisy=tuple(noisy),
                   typical_panel=typical)


def _disagreeing_panels(points: list[tuple[float, ...]], owner: list[int]
                        ) -> tuple[dict[int, float], list[int], float]:
    """Panels to leave out as mis-calibrated: those whose own slope is far above the other
    panels' (panel -> its slope), those whose noise makes most of the fit's error (their own
    slope unmeasured), and the median slope of the panels whose own fit is reliable.

    Why: the fit's panels share one slope, each weighted by its level spread, so a panel whose
    gain correction is wrong (a gain mode or a calibration constant applied wrongly: ten times
    the gain) weighs a hundred times as much as the others and sets the slope: two such CSPAD
    ASICs of 64 made a real still read 291 ADU per photon for 28, and its other panels lost four
    peaks of five.  Each panel's own line (the fit on its group points alone) is compared with
    the median over the panels whose own fit is reliable (``MAX_RELATIVE_ERROR``, ``MIN_LEVER``;
    at least ``MIN_PANELS`` of them): a panel above ``PANEL_RATIO`` times that median and
    ``MAX_DISAGREEMENT_SIGMAS`` of its own standard errors is left out.  Only panels reading
    high: healthy panels read low too (pedestal structure inside a panel adds level spread
    without variance; three of the real CSPAD stills' 64 ASICs read below a fifth of the
    median, one of them negative), and a panel whose gain is too low weighs little in the fit.

    A faulty panel with no level spread of its own (a flat, dim ASIC) shows no slope to compare,
    yet its noise, a hundred times the others' at ten times the gain, swamps the fit: the
    simulated ePix10k2M module at ten times the gain, three of its four ASICs left out by their
    slope, read 20.1 +- 13 % for 30 (called reliable).  So then, one at a time, the panel
    without which the fit's standard error falls most is left out while that fall is more than
    ``NOISE_RATIO`` times (there 17-23 times; on healthy frames at most 1.15 times: real CSPAD
    stills, simulated ePix10k2M hits and blanks).  Two such panels of equal noise hide each
    other (each alone takes only about 1.4 times off)."""
    if len(points) < 3:
        return {}, [], float("nan")
    labels, sums = _panel_sums(points, owner)
    slope, error, lever = _sums_line(sums, 1)
    reliable = (slope > 0) & (error <= MAX_RELATIVE_ERROR * slope) & (lever >= MIN_LEVER)
    if reliable.sum() < MIN_PANELS:
        return {}, [], float("nan")
    typical = float(np.median(slope[reliable]))
    out = (slope > PANEL_RATIO * typical) & (slope - typical > MAX_DISAGREEMENT_SIGMAS * error)
    high = {int(labels[i]): float(slope[i]) for i in np.flatnonzero(out)}
    noisy: list[int] = []
    while (~out).sum() > MIN_PANELS:
        kept = ~out
        total = sums[kept].sum(axis=0)
        whole = _sums_line(total[None, :], int(kept.sum()))[1][0]
        if not np.isfinite(whole):
            break
        without = _sums_line(total[None, :] - sums, int(kept.sum()) - 1)[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            fall = np.where(kept & np.isfinite(without), whole / without, 0.0)
        worst = int(np.argmax(fall))
        if not fall[worst] > NOISE_RATIO:
            break
        out[worst] = True
        noisy.append(int(labels[worst]))
    return high, noisy, typical


def _panel_sums(points: list[tuple[float, ...]], owner: list[int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The panels (sorted) and, per panel, the sums :func:`_fixed_effects_line` makes of its
    points about the panel's own weighted means: ``w dx dx``, ``w dx dy``, ``w dy dy``, the
    sampling noise ``w (1 - w / W) x_var`` and ``w (1 - w / W) xy_cov``, and the point count.
    With one group per panel the fit's sums are these summed over the panels, so any panel's
    own line, or the fit without any one panel, is a sum away (:func:`_sums_line`)."""
    x, y, w, x_var, xy_cov = np.array(points).T
    labels, inverse = np.unique(np.asarray(owner), return_inverse=True)
    sw = np.bincount(inverse, w)
    dx = x - (np.bincount(inverse, w * x) / sw)[inverse]
    dy = y - (np.bincount(inverse, w * y) / sw)[inverse]
    own = w * (1.0 - w / sw[inverse])
    columns = (w * dx * dx, w * dx * dy, w * dy * dy, own * x_var, own * xy_cov, np.ones_like(w))
    return labels, np.stack([np.bincount(inverse, c, minlength=len(labels)) for c in columns],
                            axis=1)


def _sums_line(sums: np.ndarray, panels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope, standard error and lever of :func:`_fixed_effects_line` from each row of
    :func:`_panel_sums`' sums over ``panels`` panels (0, inf where there is no lever)."""
    sxx, sxy, syy, noise_xx, noise_xy, n = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        lever = np.where(sxx > 0, (sxx - noise_xx) / sxx, 0.0)
        usable = (sxx > 0) & (lever > 0)
        slope = np.where(usable, (sxy - noise_xy) / (sxx - noise_xx), 0.0)
        scale = np.maximum(syy - 2 * slope * sxy + slope * slope * sxx, 0.0) / np.maximum(
            n - panels - 1, 1)
        error = np.where(usable, np.sqrt(scale / sxx) / lever, np.inf)
    return slope, error, lever


def _without(points: list[tuple[float, ...]], owner: list[int], panels: set[int]
             ) -> tuple[list[tuple[float, ...]], list[int]]:
    """The group points (and their owners) of all panels but ``panels``."""
    kept = [i for i, panel in enumerate(owner) if panel not in panels]
    return [points[i] for i in kept], [owner[i] for i in kept]


def _fit(points: list[tuple[float, ...]], owner: list[int], n_blocks: int, *, centred: bool
         ) -> GainEstimate:
    """The fixed-effects line through group points (:func:`_fixed_effects_line`)."""
    if len(points) < 3:
        return UNKNOWN
    x, y, w, x_var, xy_cov = np.array(points).T
    slope, intercept, error, lever = _fixed_effects_line(x, y, w, np.array(owner), x_var, xy_cov,
                                                         centred=centred)
    rel = abs(error / slope) if slope != 0 else float("inf")
    return GainEstimate(gain=float(slope), intercept=float(intercept),
                        relative_error=float(rel), n_blocks=n_blocks,
                        mean_range=(float(x.min()), float(x.max())), lever=lever,
                        within_regions=centred)


def _choose_fit(by_panel: GainEstimate, by_region: GainEstimate) -> GainEstimate:
    """The per-panel fit unless it is not reliable or the per-region fit shows it attenuated.

    Pedestal offsets inside a panel add level spread with no variance to it, so they only ever
    pull the per-panel slope down (and scatter its points, widening its standard error).  The
    per-region fit is taken when the per-panel one is not reliable, or when the per-region slope
    is above it by more than ``OFFSET_RATIO`` times and by more than ``MAX_DISAGREEMENT_SIGMAS``
    standard errors of their difference (without offsets both are unbiased and the per-panel
    one, whose level spread includes the region-to-region part, is the more precise: the
    difference's variance is the per-region variance less the per-panel one, a one-sided
    Hausman test).  Both conditions, because faint spots no filter sees bias the per-region
    slope high on hits (it has the smaller level spread to dilute them): 4-8 standard errors,
    up to 1.14 times, on offset-free frames.  The per-region fit is then returned reliable or
    not (a frame whose regions show no gain claims none)."""
    if not (by_region.gain > 0 and np.isfinite(by_region.relative_error)):
        return by_panel  # no per-region evidence either way
    if not by_panel.reliable:
        return by_region
    se_panel = by_panel.relative_error * by_panel.gain
    se_region = by_region.relative_error * by_region.gain
    spread = np.sqrt(max(se_region ** 2 - se_panel ** 2, 0.0))
    gap = by_region.gain - by_panel.gain
    if by_region.gain > OFFSET_RATIO * by_panel.gain and gap > MAX_DISAGREEMENT_SIGMAS * spread:
        return by_region
    return by_panel


def _split(key: np.ndarray, var: np.ndarray, count: int, width: float = 1.5
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks in ``count`` groups by ``key`` and the outlier fences of :func:`_group_points`:
    the stable order by key, each block's group in that order and whether it is kept."""
    order = np.argsort(key, kind="stable")
    each, extra = divmod(len(order), count)
    sizes = np.full(count, each)
    sizes[:extra] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group = np.repeat(np.arange(count), sizes)
    ordered = var[order]
    within = np.lexsort((ordered, group))  # each group's variances in ascending order
    q1, q3 = (_sorted_quantile(ordered[within], starts, sizes, q) for q in (0.25, 0.75))
    fence = width * (q3 - q1)
    keep = (ordered >= (q1 - fence)[group]) & (ordered <= (q3 + fence)[group])
    return order, group, keep


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
    order, group, keep = _split(key, var, count)
    var, mean, third = var[order], mean[order], third[order]
    kept = np.bincount(group[keep], minlength=count)
    sums = [np.bincount(group[keep], column[keep], minlength=count)
            for column in (mean, var, third)]
    enough = kept >= 3
    blocks = kept[enough]
    level, spread, skew = (total[enough] / blocks for total in sums)
    n = pixels * blocks
    return list(zip(level.tolist(), spread.tolist(), blocks.astype(float).tolist(),
                    (spread / n).tolist(), (skew / n).tolist(), strict=True))


def _region_points(key: np.ndarray, mean: np.ndarray, var: np.ndarray, third: np.ndarray,
                   region: np.ndarray, count: int, pixels: int, key_var: np.ndarray | None = None
                   ) -> list[tuple[float, float, float, float, float]]:
    """Group points of one panel's blocks taken about their region's average (``region``: each
    block's region label): blocks holding spots dropped by the black half's variance (1.5
    interquartile ranges of their group's, in ``count`` groups by key less the region's average
    key; without ``key_var`` by the white half's, as :func:`_group_points` does) and single hot
    pixels by the white half's (``FAR_OUT`` ranges); each kept block's key, mean and
    variance less its region's average over them, then up to ``count`` groups by that key
    deviation (the black half's: independent of the white half's noise), each at least
    ``MIN_GROUP`` blocks.  Per group: mean deviations, weight (blocks), and the exact sampling
    variance of the mean deviation and its covariance with the variance's: with ``s_b`` a
    block's own (variance / pixels), ``m`` of a region's ``n`` blocks in the group holding
    ``A = sum s_b`` of the region's ``S``, the region adds ``A - 2 m A / n + m^2 S / n^2`` (the
    same with third moments for the covariance), over the group's blocks squared.  Each region's
    deviations sum to zero, so a panel's points average zero and the fit's own centring takes
    nothing more out (``centred`` in :func:`_fixed_effects_line`)."""
    def deviation(a: np.ndarray) -> np.ndarray:
        return a - (np.bincount(label, a) / n)[label]

    labels, label = np.unique(region, return_inverse=True)
    n = np.bincount(label).astype(float)
    # no more groups than these blocks fill (``count`` is the panel's, of all its blocks: a
    # group of one had no quartiles, an IndexError on a simulated ePix10k2M frame)
    count = min(count, len(key) // MIN_GROUP)
    if count < 2:
        return []
    # the fences within groups by key deviation: a region's offset moves nothing
    order, _, keep = _split(deviation(key), var if key_var is None else key_var, count)
    if key_var is not None:  # single hot pixels in the white half: only far outliers
        keep &= _split(deviation(key), var, count, FAR_OUT)[2]
    kept = np.sort(order[keep])
    key, mean, var, third = key[kept], mean[kept], var[kept], third[kept]
    count = min(count, len(key) // MIN_GROUP)
    if count < 2:
        return []
    labels, label = np.unique(region[kept], return_inverse=True)
    n = np.bincount(label).astype(float)

    key_dev, mean_dev, var_dev = deviation(key), deviation(mean), deviation(var)
    own_var, own_cov = var / pixels, third / pixels
    total_var, total_cov = np.bincount(label, own_var), np.bincount(label, own_cov)
    rank = np.empty(len(key), np.intp)
    rank[np.argsort(key_dev, kind="stable")] = np.arange(len(key))
    each, extra = divmod(len(key), count)
    # np.array_split's groups: the first ``extra`` hold each + 1 blocks
    big = extra * (each + 1)
    group = np.where(rank < big, rank // (each + 1), extra + (rank - big) // max(each, 1))
    blocks = np.bincount(group, minlength=count).astype(float)
    cell = group * len(labels) + label
    cells = count * len(labels)
    m = np.bincount(cell, minlength=cells).reshape(count, -1)
    a_var = np.bincount(cell, own_var, minlength=cells).reshape(count, -1)
    a_cov = np.bincount(cell, own_cov, minlength=cells).reshape(count, -1)
    x_var = (a_var - 2 * m * a_var / n + m * m * total_var / n ** 2).sum(axis=1) / blocks ** 2
    xy_cov = (a_cov - 2 * m * a_cov / n + m * m * total_cov / n ** 2).sum(axis=1) / blocks ** 2
    level = np.bincount(group, mean_dev, minlength=count) / blocks
    spread = np.bincount(group, var_dev, minlength=count) / blocks
    return list(zip(level.tolist(), spread.tolist(), blocks.tolist(), x_var.tolist(),
                    xy_cov.tolist(), strict=True))


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
                        x_var: np.ndarray, xy_cov: np.ndarray, *, centred: bool = False
                        ) -> tuple[float, float, float, float]:
    """Weighted least-squares slope common to all groups (each with its own intercept), the
    mean intercept, the slope's standard error from the scatter about the lines (so unmodelled
    structure widens it) and the lever: the share of the x spread about the group means that is
    real.  ``x_var`` / ``xy_cov``: each point's sampling variance of x and covariance of x and y
    errors, taken out of the sums (errors in variables; a point's deviation from its group's
    weighted mean keeps ``1 - w / W`` of them, or all of them where the points are ``centred``:
    already deviations whose errors' centring ``x_var`` counts); the standard error grows by 1 /
    lever."""
    labels, inverse = np.unique(group, return_inverse=True)
    sw = np.bincount(inverse, w)
    xm = (np.bincount(inverse, w * x) / sw)[inverse]
    ym = (np.bincount(inverse, w * y) / sw)[inverse]
    dx, dy = x - xm, y - ym
    sxx = (w * dx * dx).sum()
    if sxx <= 0:
        return 0.0, float("nan"), float("inf"), 0.0
    own = 1.0 if centred else 1.0 - w / sw[inverse]
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
    SNRs comparable, and estimating stops costing time once settled.  Only declared gains that are
    missing or placeholder-like (:func:`is_placeholder`) are checked against the data; the first
    ``frames`` reliable estimates are pooled (their median, so frames before the last use the
    running median).  A placeholder kept, or no gain at all, because no frame so far shows one is
    logged as a warning (the first frame's), naming each entry point's gain setting: on an
    integrating detector its peak SNRs count far too little shot noise, or none.  So are panels a
    frame's estimate left out as mis-calibrated (:func:`_disagreeing_panels`), once a run each, by
    name where the caller gives the names.  Frames whose background shows no gain (flat, sparse
    blanks: most of a serial run at a low hit rate) do not count towards ``frames``: the resolver
    goes on looking, up to ``max_frames`` frames in all, so that a run that opens with blanks still
    gets its gain from the first frames that show one.  Each look costs 0.06-0.08 s on a 2-Mpx frame
    (one thread; 0.27-0.30 s before a panel's block groups were computed together,
    :func:`_group_points`; the per-region fit adds about half: 0.036 against 0.023 s, timed together
    on a 2.2-Mpx frame), before the frame's peaks are found: on a GPU the next batch waits for it.
    A "run" is frames of one panel layout: when the panel shapes change (one engine or
    ``PeakFinder`` handed another detector's images) the gain is measured again, so one detector's
    gain never carries over to another's.
    """

    def __init__(self, frames: int = 5, max_frames: int = 50) -> None:
        self.frames = frames
        self.max_frames = max_frames
        self._gains: list[float] = []
        self._seen = 0
        self._said: set[float | None] = set()
        self._named: set[int] = set()  # panels said to disagree (:meth:`_name_disagreeing`)
        self._left_out: dict[int, int] = {}  # frames each panel was left out of
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
                 masks: Sequence[np.ndarray] | None = None,
                 names: Sequence[str] | None = None) -> float | None:
        """Gain for this frame given the declared one (see :func:`choose_gain`).  ``names``:
        the panels' names for the warnings (:func:`panel_names`; else their 0-based index)."""
        if is_real_gain(declared):
            return declared  # a real declared gain: no need to look at the data
        layout = [tuple(np.shape(p)) for p in panels]
        if layout != self._layout:  # another detector: its own gain, measured again
            if self._layout is not None:
                log.info("panel layout changed: the detector gain is measured again")
            self._layout, self._gains, self._seen, self._named = layout, [], 0, set()
            self._left_out = {}
        if len(self._gains) < self.frames and self._seen < self.max_frames:
            self._seen += 1
            estimate = estimate_gain(panels, masks)
            self._name_disagreeing(estimate, names)
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
            if current is None:
                # a placeholder kept unchecked, or no gain at all: on an integrating detector
                # every peak SNR counts far too little shot noise, or none (blanks turn into
                # hits: a CSPAD still got 304 peaks for 237), so it must not pass quietly
                log.warning("detector gain: %s in the %d frame(s) looked at so far; if the "
                            "detector integrates (ADU, not photon counts), set the gain "
                            "(peaknet2cxi --adu-per-photon, DIALS spotfinder.threshold."
                            "peaknet.adu_per_photon, PeakFinder(adu_per_photon=...))",
                            why, self._seen)
            else:
                log.info("detector gain: %s", why)
        return gain

    def _name_disagreeing(self, estimate: GainEstimate, names: Sequence[str] | None) -> None:
        """Warn, once a run for each, of the panels the estimates left out as mis-calibrated
        (:func:`_disagreeing_panels`) in at least :data:`NAMED_AFTER` frames: the measured gain
        is the others', and the panels' own peaks count shot noise at it, so their SNRs are off
        until their gain correction is.  A run whose gain settles on one frame names none."""
        def which(panels: list[int]) -> str:
            if names is not None:
                return ", ".join(names[panel] for panel in panels)
            return ", ".join(str(panel) for panel in panels) + " (counted from 0)"

        for panel in [panel for panel, _ in estimate.disagreeing] + list(estimate.noisy):
            self._left_out[panel] = self._left_out.get(panel, 0) + 1

        def due(panel: int) -> bool:
            return panel not in self._named and self._left_out[panel] >= NAMED_AFTER

        high = [(panel, slope) for panel, slope in estimate.disagreeing if due(panel)]
        noisy = [panel for panel in estimate.noisy if due(panel)]
        self._named.update([panel for panel, _ in high] + noisy)
        parts = []
        if high:
            parts.append(f"{which([panel for panel, _ in high])} show "
                         f"{', '.join(f'{slope:.3g}' for _, slope in high)} ADU per photon in "
                         f"their background, more than {PANEL_RATIO:g} times the median "
                         f"panel's {estimate.typical_panel:.3g}")
        if noisy:
            parts.append(f"{which(noisy)} show no gain of their own but noise that made most "
                         "of the measurement's error")
        if parts:
            log.warning("detector gain: panel(s) %s: left out of the measured gain; their gain "
                        "correction (gain mode or calibration constants) is likely wrong, and "
                        "their peaks' SNRs are off until it is fixed", "; ".join(parts))


def panel_names(geometry: object, count: int) -> list[str] | None:
    """The names of a geometry's panels where it has one per panel of the frame (``count``),
    for the warnings that name panels (:class:`GainResolver`'s, the engine's unusable-pixel ones);
    None otherwise."""
    panels = getattr(geometry, "panels", None)
    if panels is None or len(panels) != count:
        return None
    names = [getattr(panel, "name", None) for panel in panels]
    return [str(n) for n in names] if all(isinstance(n, str) for n in names) else None
