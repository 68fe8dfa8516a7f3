"""Pixel defects: hot, stuck and flickering pixels across a run; spikes and tracks in a frame.

Why: an unmasked hot pixel reads far above its neighbours frame after frame, and the network
(like any finder) calls it a bright peak every time; zingers and flickering pixels do the same
now and then.  Bragg peaks, in contrast, move from frame to frame (each still has a new crystal
orientation) and are wider than one pixel on most detectors.

- **Across a run** (:class:`DefectTracker`): per pixel, a count of the frames in which it stands
  out from its eight neighbours (their mean without the largest and smallest, so adjacent
  defects do not hide each other) by more than ``sigmas`` panel noise sigmas.  A pixel that
  does so in at least ``fraction`` of the frames seen, after ``min_frames`` frames, is a
  defect: stuck-high pixels, and flickering ones that spike in three frames of four or more.
  A pixel once called a defect stays one for the rest of the run's filtering, though its share
  dips below ``fraction`` again (the mask saved with the run is the counts' own).
  Only lone spikes count (``spike_map(..., lone=True)``): the pixel's second brightest neighbour
  is at background, as around a hot pixel or a hot pair, not lifted as around a Bragg spot.  A
  grid scan of one crystal puts the same spots on the same pixels in every frame: on the real
  thaumatin grid (Pilatus 6M, ten frames, one engine) counting every spike made 414 pixels
  defects, which took 97-308 of the 1,585-1,910 peaks of frames five to ten; counting lone
  spikes makes 1 and keeps them.
  The finding engine reads a run's first ``min_frames`` frames ahead and counts them before it
  filters any (:meth:`DefectFilter.count_ahead`), so a run's first frames lose their hot
  pixels too: without that, every hot pixel was a bright peak on the first five frames, and a
  blank among them became a hit.  The DIALS plugin, handed one image a call, reads ahead within
  the imageset it is given (a sequence); where frames come one at a time with nothing to look
  ahead into (DIALS stills, ``PeakFinder.find``), the first five images keep them.
  Memory is one ``uint32`` counter per pixel, whatever the run length; trackers that counted
  parts of one run (the Ray pipeline's workers) merge by adding their counts
  (:meth:`DefectTracker.merge`), which gives the tracker of the whole run.  A real peak recurs on
  the same pixel in a few per cent of stills at most, far below ``fraction``; where it recurs
  (a grid scan), its profile keeps it off the list, unless its spots are one pixel wide (a
  binned detector scanning one crystal would lose its brightest recurring spots).
- **Within a frame** (:func:`spike_peaks`): a peak whose brightest pixel stands alone (its
  brightest neighbour at background level, less than ``NEIGHBOUR_FRACTION`` of the peak's excess
  and less than 3 background sigmas) is a spike, not a spot; so is a peak whose bright core
  (the pixels of at least ``CORE_FRACTION`` of its excess, joined to the brightest) runs
  ``CORE_LENGTH`` pixels or more and stands on background the same way: a charged particle's
  track (a zinger) on an integrating detector, whose charge no point spread widens.  A core of
  two pixels is kept: a Bragg spot narrower than a pixel, centred between two, looks the same
  (the real CSPAD stills hold such spots; a test that judged pairs dropped seven of their
  peaks).  These tests apply only on frames whose strong peaks are wider than one pixel
  (median neighbour fraction of the frame's peaks at least ``WIDE_SPOTS``), decided from the
  frame's own strong peaks where it has ``MIN_STRONG``, else from the run's earlier frames'
  (the latest ``RUN_STRONG``, once there are ``MIN_RUN_STRONG``): a blank holds no strong spot,
  and its zingers were never judged before (measured on the selection runs:
  ``benchmarks/select_spike_cores.py``).  A strong peak on a pixel that has spiked alone in
  other frames of the run is no evidence of the spot width (``RECURRING_SPIKES``): on a blank,
  pixels flickering in half the frames were the strong peaks, and judged the frame one of
  one-pixel spots.  On binned detectors with one-pixel spots (Rayonix
  4x4, say) the strong peaks fail that, and single-pixel peaks and tracks are kept; there, only
  the run-level defect mask removes recurring hot pixels, and a lone zinger is
  indistinguishable from a one-pixel spot.  On photon-counting detectors a particle leaves one
  count a pixel, no tall peak.

The defect mask is written beside a run's output (:func:`write_crystfel_mask`: an HDF5 file in
the data's slab layout, 1 = good, that a CrystFEL geometry names in the first mask slot from
1 to 7 it leaves free, as the run's log says (:func:`mask_advice`); and
:func:`write_dials_mask`: DIALS' mask file, as ``dials.generate_mask`` writes it, for
``dials.apply_mask`` / ``lookup.mask``).
"""
from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from peaknet_xtal.finding.sanitise import masked_values_quiet

log = logging.getLogger(__name__)

#: A pixel is an outlier in a frame when it exceeds its neighbours (trimmed mean) by this many
#: panel noise sigmas.
SPIKE_SIGMAS = 6.0
#: A spike counts towards a defect only when its second brightest neighbour is less than this
#: many noise sigmas (as many as make a spike) above its faintest: then it has no spot profile.
#: Eight neighbours of Gaussian noise stay below that in all but ~1e-5 of frames, and ~0.3 %
#: on noise with neighbour correlation 0.4 (where the difference-based sigma is 0.77 of the pixel
#: noise); a dimly flickering hot pixel on a photon-counting background keeps a background
#: photon or two in its neighbours under it (at 5 sigmas it lost a frame in five there).
LONE_SIGMAS = SPIKE_SIGMAS
#: ... or less than this fraction of the spike's own height above it: a bright hot pixel's
#: neighbours may hold a background photon or two, while a Bragg spot's nearest neighbours
#: hold 13 % of its centre (a Gaussian spot of 0.5 px sigma) or more.
PROFILE_FRACTION = 0.1
#: Fraction of frames in which a pixel must spike to be a defect.
DEFECT_FRACTION = 0.75
#: Frames seen before any pixel is called a defect.
MIN_FRAMES = 5
#: A peak whose brightest neighbour holds less than this fraction of its excess may be a spike.
NEIGHBOUR_FRACTION = 0.05
#: The least noise :func:`noise_sigma` reports (more than half of neighbouring pixels equal).
NOISE_FLOOR = 1e-12
#: Share of neighbour pairs that must differ for the data's step to be its noise floor
#: (:func:`spike_limit`): a sparse count has them by the thousand, a flat panel a few.
SPARSE_STEPS = 0.01
#: Frames whose strong peaks' median neighbour fraction is at least this have wide spots.
WIDE_SPOTS = 0.15
#: Peaks at least this many background sigmas high decide a frame's spot width.
STRONG_SIGMAS = 15.0
#: Strong peaks that decide a frame's spot width by themselves ...
MIN_STRONG = 3
#: ... else the strong peaks of the run's earlier frames decide it (a blank holds few: its
#: zingers and hot pixels would otherwise never be judged), the latest this many ...
RUN_STRONG = 500
#: ... once there are at least this many.
MIN_RUN_STRONG = 20
#: A strong peak whose brightest pixel has spiked alone (no spot profile, as the tracker counts
#: spikes) in at least this many of the run's frames, this one included, is no evidence of the
#: spots' width: a pixel flickering below :data:`DEFECT_FRACTION`, whose spikes on a blank made
#: the blank look like a frame of one-pixel spots and turned the spike test off there (a user
#: trial: ePix10k2M blanks with pixels lit in half the frames, 3.7 false peaks a blank, 4 of
#: 112 blanks hits).  A Bragg spot of stills does not come back on the same pixel as a lone
#: spike; the recurring spots of a grid scan keep their profile and are not counted.
RECURRING_SPIKES = 2
#: The defects log again once their count has grown by this factor since it last said it.
LOG_GROWTH = 1.25
#: A peak's bright core: the pixels holding at least this fraction of its brightest pixel's
#: excess, joined to it (:func:`spike_peaks`).
CORE_FRACTION = 0.5
#: ... judged only when it is at least this long (pixels, along a row, a column or both): a
#: core that fits in 2 x 2 pixels may be a Bragg spot narrower than a pixel, centred between
#: pixels (real CSPAD stills hold many), where a track runs on
CORE_LENGTH = 3
#: ... looked for within this many pixels of the brightest one (a 17 x 17 window: a zinger's
#: track crosses up to ~10 pixels); a core reaching farther is not judged.
CORE_REACH = 8


#: A pixel's 3 x 3 window, row by row, and its eight neighbours, as (dy, dx) offsets.
_WINDOW = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_NEIGHBOURS = tuple((dy, dx) for dy, dx in _WINDOW if dy or dx)


def _places(shape: tuple[int, ...], ys: np.ndarray, xs: np.ndarray,
            offsets: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inside, rows, cols)``, each (N, len(offsets)): the places ``offsets`` away from pixels
    ``(ys, xs)``, whether each lies on a panel of ``shape``, clipped onto it for indexing."""
    h, w = shape
    rows = ys[:, None] + np.array([dy for dy, _ in offsets])
    cols = xs[:, None] + np.array([dx for _, dx in offsets])
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return inside, np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)


def _faintest_in_window(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Per pixel, the faintest good pixel of its 3 x 3 window, itself included (+inf where
    none is good): the minimum of three columns, then of three rows (four array passes).

    Where a pixel stands above anything, this is its faintest good neighbour: it is not the
    faintest of its window then.  Measured on one thread against the faintest of the eight
    neighbours alone (eight passes): 33 -> 19 ms a 1920 x 1920 panel, the same spikes
    (``scipy.ndimage.minimum_filter``: 107 ms)."""
    padded = np.pad(np.where(good, values, np.float32(np.inf)), 1, constant_values=np.inf)
    rows = np.minimum(padded[:, :-2], padded[:, 1:-1])
    np.minimum(rows, padded[:, 2:], out=rows)
    low = np.minimum(rows[:-2], rows[1:-1])
    return np.minimum(low, rows[2:], out=low)


def _neighbour_stats(values: np.ndarray, good: np.ndarray, ys: np.ndarray, xs: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """At pixels ``(ys, xs)``, over their good neighbours: the background (the mean of the
    eight without their largest and smallest: dropping the largest drops a hot neighbour, so
    pairs and short runs of defects still stand out; where some neighbours are masked or off
    the panel, the largest good one: a one-sided neighbourhood sees a gradient as a step) and the
    second largest (-inf with fewer than two good neighbours)."""
    inside, rows, cols = _places(values.shape, ys, xs, _NEIGHBOURS)
    use = inside & good[rows, cols]
    ranked = np.sort(np.where(use, values[rows, cols], np.float32(-np.inf)), axis=1)
    count = use.sum(axis=1)
    trimmed = ranked[:, 1:-1].sum(axis=1, dtype=np.float32) / np.float32(6)
    background = np.where(count == 8, trimmed, ranked[:, -1])
    return background, ranked[:, -2]


def _neighbour_differences(image: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Differences of horizontally neighbouring good pixels on every fourth row (plenty, and 4x
    cheaper; smooth background levels and gradients cancel in a difference)."""
    diff = image[::4, 1:] - image[::4, :-1]
    both = good[::4, 1:] & good[::4, :-1]
    return diff.ravel() if both.all() else diff[both]


def noise_sigma(image: np.ndarray, good: np.ndarray) -> float:
    """Robust pixel noise of a panel: scaled median absolute difference of horizontal
    neighbours; :data:`NOISE_FLOOR` where more than half of them are equal."""
    return _mad_sigma(_neighbour_differences(image, good))


def _mad_sigma(differences: np.ndarray) -> float:
    """:func:`noise_sigma` from a panel's neighbour differences."""
    if differences.size == 0:
        return float("inf")
    mad = float(np.median(np.abs(differences - np.median(differences))))
    return max(1.4826 * mad / np.sqrt(2.0), NOISE_FLOOR)


def spike_limit(image: np.ndarray, good: np.ndarray, sigmas: float = SPIKE_SIGMAS) -> float:
    """How far above its neighbours a pixel must stand to be a spike: ``sigmas`` noise sigmas,
    and where the noise is below the data's own step (more than half of neighbouring pixels
    equal: a sparse photon count, mostly zeros, or whole counts on a flat level) at least one
    step, when steps are common (:data:`SPARSE_STEPS` of neighbour pairs; the step is their
    smallest nonzero difference: one photon on a counting detector).

    Why: with a noise of nothing every lone photon was a spike, so every counted pixel had its
    neighbours ranked (a simulated Pilatus 6M run: 0.4-3.9 million candidates and 1.3-3.0 s a
    frame, now 0.7-0.8 s; a sparse frame with 8 % of its pixels counting, 0.21 -> 0.14 s) to
    find what no run calls a defect (a pixel one photon above zero neighbours in three frames of
    four is no peak either: its SNR cannot reach 3).  A flat panel with rare steps keeps its
    floor: those steps are what stands out there, a hot pixel on a dead-flat panel included."""
    return _spike_scale(image, good, sigmas)[1]


def _spike_scale(image: np.ndarray, good: np.ndarray, sigmas: float) -> tuple[float, float]:
    """``(noise_sigma, spike_limit)`` of a panel from one pass over its neighbour differences."""
    differences = _neighbour_differences(image, good)
    noise = _mad_sigma(differences)
    limit = sigmas * noise
    if noise <= NOISE_FLOOR:
        steps = np.abs(differences)
        steps = steps[steps > 0]
        if steps.size and steps.size >= SPARSE_STEPS * differences.size:
            limit = max(limit, float(steps.min()))
    return noise, limit


@masked_values_quiet
def spike_map(image: np.ndarray, good: np.ndarray | None = None,
              sigmas: float = SPIKE_SIGMAS, lone: bool = False) -> np.ndarray:
    """Pixels more than ``sigmas`` noise sigmas (:func:`spike_limit`) above their neighbours'
    trimmed mean.  Spot centres pass too.  With ``lone`` only spikes without a profile: their
    second brightest neighbour less than :data:`LONE_SIGMAS` noise sigmas, or less than
    :data:`PROFILE_FRACTION` of the spike, above their faintest (a hot pixel, or one of a hot
    pair, sits on background; a Bragg spot lifts several neighbours).  A pixel without a good
    neighbour cannot be judged and is not a spike.

    Every frame of a run pays for this, so the neighbour statistics are taken only where a spike
    is possible: a pixel ``sigmas`` above the trimmed mean is at least that far above its
    faintest neighbour (:func:`_faintest_in_window`).  Measured (CPU s a frame, every statistic
    at every pixel before): real Pilatus 6M 0.35 -> 0.12, real CSPAD (64 small panels, 1 % of
    pixels candidates) 0.098 -> 0.072; the same spikes, but for pixels with no good neighbour.
    """
    values = np.asarray(image, dtype=np.float32)
    ok = np.isfinite(values) if good is None else (np.asarray(good, bool) & np.isfinite(values))
    noise, least = _spike_scale(values, ok, sigmas)
    limit = np.float32(least)
    low = _faintest_in_window(values, ok)  # at a candidate: its faintest good neighbour
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero(ok & (values - low > limit))
    spikes = np.zeros(values.shape, bool)
    if len(ys) == 0:
        return spikes
    value, faintest = values[ys, xs], low[ys, xs]
    background, second = _neighbour_stats(values, ok, ys, xs)
    with np.errstate(invalid="ignore"):
        keep = value - background > limit
        if lone:
            lift = second - faintest  # -inf without two good neighbours: lone
            keep &= lift < np.maximum(np.float32(LONE_SIGMAS * noise),
                                      np.float32(PROFILE_FRACTION) * (value - faintest))
    spikes[ys[keep], xs[keep]] = True
    return spikes


class DefectTracker:
    """Running per-pixel spike counts over a run; :attr:`defects` are the recurring ones."""

    def __init__(self, fraction: float = DEFECT_FRACTION, min_frames: int = MIN_FRAMES,
                 sigmas: float = SPIKE_SIGMAS, lone: bool = True) -> None:
        """``lone``: count only spikes without a spot profile (``spike_map``'s ``lone``; the
        module docstring says why); False counts every spike, as the tracker once did."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.min_frames = min_frames
        self.sigmas = sigmas
        self.lone = lone
        self.frames = 0
        self.counts: list[np.ndarray] | None = None

    def spike_maps(self, panels: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """This frame's spiking pixels per panel, as :meth:`update` counts them; depends on the
        frame alone, so hosts may make them for several frames at once (the engine does, in
        threads) and hand them to :meth:`update` in frame order."""
        return [spike_map(panel, None if masks is None else masks[i], self.sigmas,
                          lone=self.lone) for i, panel in enumerate(panels)]

    def update(self, panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None,
               spikes: Sequence[np.ndarray] | None = None) -> None:
        """Count this frame's spiking pixels (``spikes``: its :meth:`spike_maps`, if made)."""
        shapes = [np.shape(p) for p in panels]
        if self.counts is None or [c.shape for c in self.counts] != shapes:
            if self.counts is not None:
                log.warning("panel shapes changed within the run: pixel defect counts restart")
            self.counts = [np.zeros(s, np.uint32) for s in shapes]
            self.frames = 0
        for count, spiking in zip(self.counts, spikes if spikes is not None
                                  else self.spike_maps(panels, masks), strict=True):
            count += spiking
        self.frames += 1

    @property
    def defects(self) -> list[np.ndarray] | None:
        """Per panel, True = defect; None before ``min_frames`` frames."""
        if self.counts is None or self.frames < self.min_frames:
            return None
        limit = self.fraction * self.frames
        return [c >= limit for c in self.counts]

    def good_masks(self) -> list[np.ndarray] | None:
        """Per panel, True = good (the convention of frame masks)."""
        defects = self.defects
        return None if defects is None else [~d for d in defects]

    def count(self) -> int:
        defects = self.defects
        return 0 if defects is None else int(sum(d.sum() for d in defects))

    def merge(self, other: DefectTracker) -> None:
        """Count ``other``'s frames as if this tracker had counted them: its per-pixel counts
        and its frames are added to these.

        Why: a frame's spike map depends on that frame alone and the counts are sums over
        frames, so trackers that counted separate parts of one run (the Ray pipeline's workers,
        each with its own engine) merge into exactly the tracker one engine keeps over all of
        them, whatever the split.  Trackers that judge spikes otherwise (``fraction``,
        ``min_frames``, ``sigmas``, ``lone``), or that counted other panel shapes, are refused
        (ValueError): their counts do not add up to one run's."""
        if other.counts is None:
            return
        mine = (self.fraction, self.min_frames, self.sigmas, self.lone)
        theirs = (other.fraction, other.min_frames, other.sigmas, other.lone)
        if mine != theirs:
            raise ValueError(f"cannot merge defect trackers with other settings (fraction, "
                             f"min_frames, sigmas, lone): {mine} and {theirs}")
        if self.counts is None:
            self.counts = [np.array(c, np.uint32) for c in other.counts]
            self.frames = other.frames
            return
        shapes = [c.shape for c in self.counts]
        if [c.shape for c in other.counts] != shapes:
            raise ValueError(f"cannot merge defect trackers of other panel shapes: {shapes} "
                             f"and {[c.shape for c in other.counts]}")
        for count, more in zip(self.counts, other.counts, strict=True):
            count += more
        self.frames += other.frames

    @classmethod
    def load(cls, outdir: str | os.PathLike[str]) -> DefectTracker | None:
        """The counts an earlier run kept in ``outdir/pixel_defects.h5``
        (:func:`write_crystfel_mask`), as a tracker with that run's settings; None where there
        is no such file, it keeps no counts (a run from before they were kept), or it cannot be
        read (logged)."""
        import h5py

        path = Path(outdir) / "pixel_defects.h5"
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as h5:
                group = h5.get(COUNTS_GROUP)
                if group is None:
                    return None
                tracker = cls(float(group.attrs["fraction"]), int(group.attrs["min_frames"]),
                              float(group.attrs["sigmas"]), bool(group.attrs["lone"]))
                tracker.counts = [np.asarray(group[name][()], np.uint32)
                                  for name in sorted(group)]
                tracker.frames = int(group.attrs["frames"])
        except (OSError, KeyError, ValueError) as exc:
            log.warning("%s: the earlier run's spike counts cannot be read (%s); the mask "
                        "written now counts this run's frames only", path, exc)
            return None
        return tracker

    def save(self, outdir: str | os.PathLike[str], geometry: Any = None,
             geometry_file: str | os.PathLike[str] | None = None,
             filtered: Sequence[np.ndarray] | None = None) -> list[Path]:
        """Write the run's defect mask beside its output: ``pixel_defects.h5`` (CrystFEL) and,
        where DIALS is importable, ``pixel_defects.mask``; nothing before ``min_frames``
        frames (a resumed run that saw too few keeps the masks of the run before it).

        The log says how a CrystFEL geometry uses the mask: in the first mask slot that
        ``geometry_file`` (the geometry the run wrote beside it, e.g. ``peaknet.geom``), else
        ``geometry``, leaves free (:func:`mask_advice`); a run's own ``peaknet.geom`` reads each
        frame's mask in slot 0, which the mask must not replace."""
        good = self.good_masks()
        if good is None:
            if self.frames:  # said, not silent: a short run writes no mask
                log.info("no pixel defect mask written: %d frame(s) seen, fewer than the %d a "
                         "defect needs to be told from a spot", self.frames, self.min_frames)
            return []
        folder = Path(outdir)
        carried, sources = earlier_defect_masks(geometry, [g.shape for g in good],
                                                folder / "pixel_defects.h5")
        if carried is not None:
            good = [g & c for g, c in zip(good, carried, strict=True)]
        try:  # an extra beside the results: failing to write it must not hide a run's own error
            written = [write_crystfel_mask(folder / "pixel_defects.h5", good, geometry,
                                           tracker=self)]
        except (OSError, ValueError) as exc:
            log.warning("could not write the pixel defect mask under %s: %s", folder, exc)
            return []
        try:
            written.append(write_dials_mask(folder / "pixel_defects.mask", good))
        except ImportError:
            pass
        except OSError as exc:
            log.warning("could not write the DIALS pixel defect mask under %s: %s", folder, exc)
        note = ""
        if sources:
            note += (f", and {int(sum((~c).sum() for c in carried or []))} of the earlier "
                     f"mask(s) the input's geometry applies, carried over: {', '.join(sources)}")
        if filtered is not None:  # called defects for a while, and not by the run's end
            dropped = int(sum((f & g).sum() for f, g in zip(filtered, good, strict=False)))
            if dropped:
                note += (f"; {dropped} more pixel(s) treated as defects for part of the run, "
                         f"their share of spiking frames below {100 * self.fraction:.0f} % at "
                         "its end, are not in it")
        log.info("pixel defect mask (%d defects over %d frames%s): %s; %s", self.count(),
                 self.frames, note, ", ".join(map(str, written)),
                 mask_advice(written[0], _geometry_text(geometry, geometry_file),
                             geometry_file))
        return written


def earlier_defect_masks(geometry: Any, shapes: Sequence[tuple[int, ...]],
                         target: Path | None = None) -> tuple[list[np.ndarray] | None, list[str]]:
    """Per panel, the good pixels of every defect mask of an earlier run (a file
    :func:`write_crystfel_mask` wrote: it keeps :data:`COUNTS_GROUP`) that ``geometry`` applies
    in a mask slot, AND-ed, and those files' names; ``(None, [])`` where it applies none.
    ``target``: the mask about to be written, left out (a rerun into its own folder).

    Why: a run whose geometry applies the last run's defect mask never sees those pixels spike
    (they are masked), so its own mask held none of them ("0 defects over 120 frames"); a
    user who kept only the newest mask brought every hot pixel back a run later.  The mask a
    run writes therefore keeps the defects of the masks it was given."""
    import h5py

    if geometry is None or not hasattr(geometry, "mask_specs"):
        return None, []
    if [p.shape for p in geometry.panels] != [tuple(s) for s in shapes]:
        return None, []
    good: list[np.ndarray] | None = None
    sources: list[str] = []
    for spec, covered in geometry.mask_specs():
        if not spec.file or not Path(spec.file).is_file():
            continue  # none, or the image file itself; a missing file: the reader said so
        if target is not None and target.exists() and Path(spec.file).samefile(target):
            continue  # this folder's own mask: a resumed run continues its counts instead
        try:
            with h5py.File(spec.file, "r") as h5:
                if COUNTS_GROUP not in h5:
                    continue  # a mask of other making: the input applies it, nothing to carry
                raw = np.asarray(h5[spec.data or "/data/data"][()])
            panels = geometry.split_slab(raw)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("%s: an earlier defect mask the geometry applies cannot be read (%s); "
                        "its defects are not carried into this run's mask", spec.file, exc)
            continue
        if good is None:
            good = [np.ones(tuple(s), bool) for s in shapes]
        for i in covered:
            good[i] &= spec.good(panels[i])
        sources.append(os.fspath(spec.file))
    return good, sources


def off_defects(peaks: np.ndarray, defects: Sequence[np.ndarray] | None,
                radius: int = 1) -> np.ndarray:
    """True for the peak-table rows whose centre is not within ``radius`` pixels of a defect (a
    hot pixel pulls the centroid of a peak it sits in by at most a pixel): a mask over the rows,
    so that callers keep boxes and pixels in step with the peaks."""
    keep = np.ones(len(peaks), bool)
    if defects is None:
        return keep
    for k, (panel, fs, ss) in enumerate(zip(peaks["panel"], peaks["fs"], peaks["ss"],
                                            strict=True)):
        d = defects[int(panel)]
        y, x = int(round(float(ss))), int(round(float(fs)))
        window = d[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1]
        keep[k] = not window.any()
    return keep


class _Brightest(NamedTuple):
    """Per peak of a table, its brightest pixel (:func:`_brightest_pixels`)."""

    top: np.ndarray  # its excess over the peak's background (0 where none is usable)
    side: np.ndarray  # the excess of its brightest neighbour (NaN: see _brightest_pixels)
    ratio: np.ndarray  # side / top (1 where top is not above 0)
    where: np.ndarray  # (N, 2): its (row, column) in its panel; (-1, -1) where none is usable
    window: np.ndarray  # (N, 9): its 3 x 3 (_WINDOW order) as read; NaN off the panel


def _brightest_pixels(peaks: np.ndarray, panels: Sequence[np.ndarray]) -> _Brightest:
    """Per peak: its brightest pixel (3x3 around the centre, off-panel pixels left out, NaN
    ignored; none where none is left), that pixel's excess over the background, the excess of
    its brightest neighbour (its 3 x 3 with itself, NaN ranked first: one NaN there gives the
    brightest, two give NaN), their ratio, and the 3 x 3 around it.  Array passes per panel,
    not a loop per peak (a Pilatus 6M hit's 2,000 peaks: 0.13 s a frame in a loop)."""
    n = len(peaks)
    top, side = np.zeros(n), np.zeros(n)
    where = np.full((n, 2), -1, np.int64)
    window = np.full((n, len(_WINDOW)), np.nan)
    ys_all = np.round(peaks["ss"].astype(np.float64)).astype(np.int64)
    xs_all = np.round(peaks["fs"].astype(np.float64)).astype(np.int64)
    for panel in np.unique(peaks["panel"]):
        at = np.flatnonzero(peaks["panel"] == panel)
        image = np.asarray(panels[int(panel)])
        inside, rows, cols = _places(image.shape, ys_all[at], xs_all[at], _WINDOW)
        local = np.asarray(image[rows, cols], np.float64)
        usable = inside & ~np.isnan(local)
        some = usable.any(axis=1)
        at, local, rows, cols, usable = at[some], local[some], rows[some], cols[some], usable[some]
        best = np.argmax(np.where(usable, local, -np.inf), axis=1)  # first of equals, as nanargmax
        pick = np.arange(len(at))
        centre = local[pick, best]
        where[at, 0], where[at, 1] = rows[pick, best], cols[pick, best]
        inside, around_rows, around_cols = _places(image.shape, rows[pick, best],
                                                   cols[pick, best], _WINDOW)
        around = np.asarray(image[around_rows, around_cols], np.float64)
        window[at] = np.where(inside, around, np.nan)
        nans = (inside & np.isnan(around)).sum(axis=1)
        ranked = np.sort(np.where(inside & ~np.isnan(around), around, -np.inf), axis=1)
        neighbour = np.where(nans >= 2, np.nan, np.where(nans == 1, ranked[:, -1], ranked[:, -2]))
        bg = np.nan_to_num(peaks["background"][at].astype(np.float64))
        top[at], side[at] = centre - bg, neighbour - bg
    ratio = np.where(top > 0, side / np.where(top > 0, top, 1.0), 1.0)
    return _Brightest(top, side, ratio, where, window)


def _ring_excess(image: np.ndarray, y: int, x: int, top: float, background: float) -> float:
    """The brightest excess over ``background`` around a peak's bright core: the pixels of at
    least :data:`CORE_FRACTION` of its brightest pixel's excess ``top`` (at ``(y, x)``) that
    join it through their eight neighbours, within :data:`CORE_REACH` pixels; what borders the
    core is its ring (off-panel and NaN pixels left out).  NaN (undecided) where the core
    reaches the edge of that window, is shorter than :data:`CORE_LENGTH` or has no ring."""
    from scipy.ndimage import binary_dilation, label

    h, w = image.shape
    y0, y1 = max(y - CORE_REACH, 0), min(y + CORE_REACH + 1, h)
    x0, x1 = max(x - CORE_REACH, 0), min(x + CORE_REACH + 1, w)
    excess = np.asarray(image[y0:y1, x0:x1], np.float64) - background
    known = ~np.isnan(excess)
    labels, _ = label(known & (excess >= CORE_FRACTION * top), structure=np.ones((3, 3), bool))
    core = labels == labels[y - y0, x - x0]
    cut = ((y0 > 0) & core[0].any()) | ((y1 < h) & core[-1].any()) | (
        (x0 > 0) & core[:, 0].any()) | ((x1 < w) & core[:, -1].any())
    rows, cols = np.nonzero(core)
    short = max(np.ptp(rows), np.ptp(cols)) + 1 < CORE_LENGTH
    ring = binary_dilation(core, structure=np.ones((3, 3), bool)) & ~core
    if cut or short or not (ring & known).any() or (ring & ~known).any():
        return float("nan")
    return float(excess[ring].max())


def _lifted_beside(window: np.ndarray, top: np.ndarray, background: np.ndarray,
                   sigma: np.ndarray) -> np.ndarray:
    """Per peak: whether a pixel of its brightest pixel's 3 x 3 ``window`` is lifted above
    ``background`` (at least :data:`NEIGHBOUR_FRACTION` of the excess ``top``, or 3 ``sigma``)
    but below its core (:data:`CORE_FRACTION` of ``top``): such a pixel borders the core, so the
    core cannot stand on background and :func:`_ring_excess` need not look (NaN, off the panel
    or unreadable, is neither).  The same answer for those peaks, in array passes over the
    window :func:`_brightest_pixels` read: on a Pilatus 6M hit 1,944 of 1,973 peaks have a
    neighbour of half their height, and looking at each core took 87 ms a frame against
    1.3 ms for the rest of the spike test."""
    excess = window - background[:, None]
    with np.errstate(invalid="ignore"):
        high = ~((excess / top[:, None] < NEIGHBOUR_FRACTION) & (excess < 3 * sigma[:, None]))
        lifted: np.ndarray = (high & (excess < CORE_FRACTION * top[:, None])).any(axis=1)
    return lifted


def spike_peaks(peaks: np.ndarray, panels: Sequence[np.ndarray],
                run_widths: Sequence[float] = (), cores: bool = True,
                spike_counts: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """True for peaks without a spot profile, on frames whose strong spots are wider (module
    docstring); all False on frames with one-pixel spots.  ``run_widths``: the neighbour
    fractions of the strong peaks of the run's earlier frames (:meth:`DefectFilter.keep` keeps
    them), which decide the spot width for a frame with too few strong peaks of its own;
    ``cores=False`` judges one-pixel spikes alone, by the frame's own strong peaks alone.
    ``spike_counts``: the run's per-pixel counts of lone spikes (:class:`DefectTracker`), by
    which a strong peak on a pixel that keeps spiking is left out of the width evidence
    (:data:`RECURRING_SPIKES`)."""
    return _judge_spikes(peaks, panels, run_widths, cores, spike_counts)[0]


def _judge_spikes(peaks: np.ndarray, panels: Sequence[np.ndarray], run_widths: Sequence[float],
                  cores: bool = True, spike_counts: Sequence[np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spike_peaks`, and the neighbour fractions of the frame's strong peaks (for the
    run's later frames).

    A peak has no profile when its bright core stands on background: the brightest pixel's
    brightest neighbour (a one-pixel spike), or, where that neighbour holds at least
    :data:`CORE_FRACTION` of the peak (a zinger's track), the brightest pixel around the core of
    such pixels if it is :data:`CORE_LENGTH` pixels long or more (:func:`_ring_excess`), is
    below both :data:`NEIGHBOUR_FRACTION` of the peak's excess and 3 background sigmas.  A Bragg
    spot's point spread lifts the pixels around its core; a particle's track and a defect do
    not."""
    if len(peaks) == 0:
        return np.zeros(0, bool), np.zeros(0)
    top, side, ratio, where, window = _brightest_pixels(peaks, panels)
    sigma = np.nan_to_num(peaks["background_sigma"], nan=np.inf)
    strong = top > STRONG_SIGMAS * sigma
    if spike_counts is not None:
        strong &= ~_recurring_spikes(peaks, where, spike_counts)
    widths = ratio[strong]
    none = np.zeros(len(peaks), bool)
    if len(widths) >= MIN_STRONG:
        wide = float(np.median(widths)) >= WIDE_SPOTS
    elif cores and len(run_widths) >= MIN_RUN_STRONG:
        wide = float(np.median(run_widths)) >= WIDE_SPOTS
    else:
        return none, widths  # too few strong peaks to tell the spot width
    if not wide:
        return none, widths
    bg = np.nan_to_num(peaks["background"].astype(np.float64))
    with np.errstate(invalid="ignore"):  # NaN beside the brightest pixel: not judged
        cored = (top > 0) & (side >= CORE_FRACTION * top) & (where[:, 0] >= 0) & cores
    if cored.any():  # most spots wider than a pixel: a lifted pixel beside the brightest
        cored[cored] = ~_lifted_beside(window[cored], top[cored], bg[cored], sigma[cored])
    for k in np.flatnonzero(cored):  # a few a frame: tracks, spots centred between pixels
        side[k] = _ring_excess(np.asarray(panels[int(peaks["panel"][k])]), int(where[k, 0]),
                               int(where[k, 1]), float(top[k]), float(bg[k]))
    with np.errstate(invalid="ignore"):
        ratio = np.where(top > 0, side / np.where(top > 0, top, 1.0), 1.0)
        return (ratio < NEIGHBOUR_FRACTION) & (side < 3 * sigma), widths


def _recurring_spikes(peaks: np.ndarray, where: np.ndarray,
                      spike_counts: Sequence[np.ndarray]) -> np.ndarray:
    """Per peak, whether its brightest pixel (``where``; (-1, -1): none) has spiked alone in at
    least :data:`RECURRING_SPIKES` frames of the run (``spike_counts``, the tracker's)."""
    out = np.zeros(len(peaks), bool)
    for k in np.flatnonzero(where[:, 0] >= 0):
        counts = spike_counts[int(peaks["panel"][k])]
        y, x = int(where[k, 0]), int(where[k, 1])
        out[k] = 0 <= y < counts.shape[0] and 0 <= x < counts.shape[1] \
            and counts[y, x] >= RECURRING_SPIKES
    return out


class DefectFilter:
    """What the engine applies to every frame's peak table: track spikes across the run, drop
    peaks on recurring defects and, on frames with wide spots, peaks without a spot profile
    (one-pixel spikes, particle tracks)."""

    def __init__(self, tracker: DefectTracker | None = None, spikes: bool = True,
                 cores: bool = True) -> None:
        """``spikes``: drop peaks without a spot profile (:func:`spike_peaks`); ``cores``: judge
        longer bright cores (tracks) and frames by the run's spot width too, as
        :func:`spike_peaks` does by default (False: one-pixel spikes on frames with enough
        strong peaks of their own, the rule before; for benchmarks that compare them)."""
        self.tracker = tracker or DefectTracker()
        self.spikes = spikes
        self.cores = cores
        #: neighbour fractions of the strong peaks of the frames filtered so far, the latest
        #: :data:`RUN_STRONG` (:func:`spike_peaks`' ``run_widths``)
        self.run_widths: collections.deque[float] = collections.deque(maxlen=RUN_STRONG)
        self._widths = np.zeros(0)  # the latest filtered frame's, joining them with the next
        self._shapes: list[tuple[int, ...]] | None = None  # the panel shapes of that frame
        self._logged = 0
        self._ahead = 0  # frames counted by count_ahead and not yet filtered
        #: every pixel called a defect so far in the run: one stays a defect when its share of
        #: spiking frames dips below the fraction again (a pixel lit in 80 % of frames came
        #: and went, and came back as a peak in 46 of 120 frames); the saved mask is the
        #: counts' own (the same whatever the number of Ray workers)
        self._declared: list[np.ndarray] | None = None

    @property
    def learning(self) -> int:
        """Frames the tracker still has to count before it can name defects (0 once it can),
        those counted ahead included."""
        return max(self.tracker.min_frames - self.tracker.frames, 0)

    @property
    def pending(self) -> int:
        """Frames counted ahead and not yet filtered."""
        return self._ahead

    def count_ahead(self, panels: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray] | None = None) -> None:
        """Count a frame the run will filter next, before its peaks are filtered, so that
        the defects of a run's first frames are known when those frames are filtered (the
        engine reads a run's first ``min_frames`` frames ahead).  The frame's own filtering
        then does not count it again; frames must come to the filter in the order counted."""
        self.tracker.update(panels, masks)
        self._ahead += 1

    def drop_pending(self) -> None:
        """Frames counted ahead that will not be filtered (the find that read them stopped:
        Ctrl-C, a ``find_run`` loop left with ``break``) stay counted towards the run, and are
        no longer taken for the next frames filtered.  Why: those next frames, other images,
        were then not counted at all (four after a loop left at a run's first image).  Hosts
        that count frames ahead themselves hand them over in order and never call this."""
        self._ahead = 0

    def __call__(self, peaks: Any, panels: Sequence[np.ndarray],
                 masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """This frame's peak table (``PEAK_DTYPE``) without defects and spikes; counts the
        frame.  (``peaks`` is typed loosely: ``find_peaks`` returns a table or, with boxes, a
        pair, and callers pass the table.)"""
        result: np.ndarray = peaks[self.keep(peaks, panels, masks)]
        return result

    def keep(self, peaks: np.ndarray, panels: Sequence[np.ndarray],
             masks: Sequence[np.ndarray] | None = None,
             spikes: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """What :meth:`__call__` keeps, as a boolean mask over the rows of ``peaks`` (for callers
        that keep other per-peak data in step: boxes, pixels); counts the frame (``spikes``: its
        ``tracker.spike_maps``, if made already)."""
        if self._ahead:
            self._ahead -= 1  # counted when it was read ahead
        else:
            self.tracker.update(panels, masks, spikes)
        shapes = [np.shape(p) for p in panels]
        if shapes != self._shapes:  # another detector: its spots' width is its own
            self._shapes, self._widths = shapes, np.zeros(0)
            self.run_widths.clear()
            self._declared, self._logged = None, 0
        self.run_widths.extend(self._widths)  # the frame before's, now that this one comes
        keep, self._widths = self._judge(peaks, panels)
        return keep

    def judge(self, peaks: np.ndarray, panels: Sequence[np.ndarray]) -> np.ndarray:
        """What :meth:`keep` keeps of a frame it has counted already, without counting it again:
        for other peak tables of the same pixels (a benchmark's settings side by side)."""
        return self._judge(peaks, panels)[0]

    def _judge(self, peaks: np.ndarray, panels: Sequence[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`judge`, and the neighbour fractions of the frame's strong peaks."""
        declared = self._declare()
        keep = off_defects(peaks, declared)
        widths = np.zeros(0)
        if self.spikes and keep.any():
            spiking, widths = _judge_spikes(peaks[keep], panels, self.run_widths, self.cores,
                                            self.tracker.counts)
            keep[keep] = ~spiking
        count = 0 if declared is None else int(sum(d.sum() for d in declared))
        if count and (not self._logged or count >= LOG_GROWTH * self._logged):
            self._logged = count  # said as it grows, not at every change: a long run's log
            log.info("%d pixel(s) spiked alone in at least %.0f %% of the frames (after %d "
                     "frames): treated as defects for the rest of the run", count,
                     100 * self.tracker.fraction, self.tracker.frames)
        return keep, widths

    def _declare(self) -> list[np.ndarray] | None:
        """The defects the filter drops peaks on: every pixel the tracker has called a defect
        so far in the run (``_declared``), those it calls one now added."""
        now = self.tracker.defects
        if now is None:
            return self._declared
        if self._declared is None or [d.shape for d in self._declared] != [d.shape for d in now]:
            self._declared = [d.copy() for d in now]
        else:
            for mine, more in zip(self._declared, now, strict=True):
                mine |= more
        return self._declared

    def save(self, outdir: str | os.PathLike[str], geometry: Any = None,
             geometry_file: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the run's defect mask beside its output (:meth:`DefectTracker.save`), saying
        how many more pixels the filter treated as defects for part of the run."""
        return self.tracker.save(outdir, geometry, geometry_file, self._declared)


def write_crystfel_mask(path: str | os.PathLike[str], good: Sequence[np.ndarray],
                        geometry: Any = None, dataset: str = "/data/data",
                        tracker: DefectTracker | None = None) -> Path:
    """HDF5 mask (uint8, 1 = good) in the data's slab layout, for a CrystFEL geometry, in a
    mask slot N from 1 to 7 it leaves free (:func:`mask_advice`)::

        maskN_file = <path>
        maskN_data = /data/data
        maskN_goodbits = 0x1
        maskN_badbits = 0x0

    Without ``geometry`` the panels are stacked along the slow-scan axis (their order).
    Written atomically.  With ``tracker``, its per-panel spike counts and frame count go beside
    the mask (:data:`COUNTS_GROUP`; CrystFEL reads only the mask dataset), so that a run resumed
    by workers that never see its earlier frames adds to them (:meth:`DefectTracker.load`).
    """
    import h5py

    from peaknet_xtal.atomic import atomic_path, remove_stale_parts

    panels = [np.asarray(g, dtype=np.uint8) for g in good]
    if geometry is not None and len(getattr(geometry, "panels", [])) == len(panels):
        slab = geometry.assemble_slab(panels, fill=0)  # the data's layout less the frame axis
    else:
        slab = np.concatenate(panels, axis=0)
    target = Path(path)
    remove_stale_parts(target)  # a run killed while it wrote the mask left one
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as h5:
        data = h5.create_dataset(dataset, data=slab, compression="gzip")
        data.attrs["description"] = ("peaknet-xtal pixel defect mask: 1 = good, 0 = hot/stuck "
                                     "pixel found across the run")
        if tracker is not None and tracker.counts is not None:
            group = h5.create_group(COUNTS_GROUP)
            group.attrs.update({"frames": tracker.frames, "fraction": tracker.fraction,
                                "min_frames": tracker.min_frames, "sigmas": tracker.sigmas,
                                "lone": tracker.lone})
            for k, count in enumerate(tracker.counts):
                group.create_dataset(f"panel{k:04d}", data=count, compression="gzip")
    return target


#: Where :func:`write_crystfel_mask` keeps the tracker's counts in the mask file.
COUNTS_GROUP = "/peaknet/spike_counts"


def geometry_mask_lines(path: str | os.PathLike[str], dataset: str = "/data/data",
                        slot: int = 1) -> list[str]:
    """The CrystFEL geometry lines that apply a mask written by :func:`write_crystfel_mask` in
    mask slot ``slot`` (CrystFEL 0.10+ reads ``mask0_*`` to ``mask7_*``; ``mask``, ``mask_file``,
    ``mask_good`` and ``mask_bad`` are slot 0): one the geometry leaves free
    (:func:`mask_advice`), or the mask replaces the one there."""
    n = int(slot)
    return [f"mask{n}_file = {os.fspath(path)}", f"mask{n}_data = {dataset}",
            f"mask{n}_goodbits = 0x1", f"mask{n}_badbits = 0x0"]


#: The mask slots advised for the defect mask: 1 to 7 (CrystFEL reads eight; slot 0 is where a
#: geometry's own mask goes, ``mask = ...`` included, and peaknet.geom's per-frame mask).
MASK_SLOTS = range(1, 8)


def _first_free_mask_slot(text: str) -> int | None:
    """The first of :data:`MASK_SLOTS` the geometry ``text`` leaves free (the geometry's own
    :meth:`~peaknet_xtal.formats.geometry.Geometry.free_mask_slot`; slot 0 is never advised:
    it holds each frame's own mask, or the image file's); None when all are taken.  A text the
    parser refuses says nothing of its slots: the first is advised, as for no geometry."""
    from peaknet_xtal.errors import GeometryError
    from peaknet_xtal.formats.geometry import parse_geometry

    try:
        return parse_geometry(text).free_mask_slot(first=MASK_SLOTS[0])
    except GeometryError:
        return MASK_SLOTS[0]


def _geometry_text(geometry: Any, geometry_file: str | os.PathLike[str] | None) -> str | None:
    """The text of the geometry the mask is for: the file the run wrote where it can be read,
    else the geometry object's own (None where there is neither)."""
    if geometry_file is not None:
        try:
            return Path(geometry_file).read_text()
        except (OSError, UnicodeDecodeError):
            pass
    to_text = getattr(geometry, "to_text", None)
    if callable(to_text):
        try:
            return str(to_text())
        except Exception:  # noqa: BLE001 - advice only: a geometry it cannot write gives none
            return None
    return None


def mask_advice(mask_path: str | os.PathLike[str], geometry_text: str | None,
                geometry_file: str | os.PathLike[str] | None = None) -> str:
    """How a CrystFEL geometry uses the defect mask at ``mask_path`` (named absolute, so the
    lines work wherever indexamajig runs): the lines for the first mask slot from 1 to 7 the
    geometry leaves free, naming ``geometry_file`` where that is the geometry.  Why not slot 0:
    a geometry's own mask is there (``mask = ...`` is slot 0; peaknet.geom reads each frame's
    mask from the CXI files there), and lines for it would replace that mask."""
    path = Path(mask_path).absolute()
    slot = MASK_SLOTS[0] if geometry_text is None else _first_free_mask_slot(geometry_text)
    where = (f"{geometry_file}" if geometry_file is not None and geometry_text is not None
             else "a CrystFEL geometry")
    if slot is None:
        return (f"{where} uses every mask slot from 1 to 7; to apply {path}, merge it into one "
                "of its masks (CrystFEL reads eight at most)")
    lines = "; ".join(geometry_mask_lines(path, slot=slot))
    if geometry_text is None:
        return (f"to apply it, add to {where}, among its global lines: {lines} (or the same "
                "in another mask slot from 1 to 7 the geometry leaves free)")
    return (f"to apply it, add to {where}, among its global lines: {lines} (mask slot {slot}, "
            "the first from 1 to 7 it leaves free: lines for a used slot replace its mask)")


def write_dials_mask(path: str | os.PathLike[str], good: Sequence[np.ndarray]) -> Path:
    """DIALS mask file: a tuple of one ``flex.bool`` per panel (True = good), pickled as
    ``dials.generate_mask`` writes it (DIALS' own format; needs DIALS).  Written atomically."""
    import pickle

    from dials.array_family import flex  # noqa: F401  (flex types must be registered)
    from dxtbx import flumpy

    from peaknet_xtal.atomic import atomic_path, remove_stale_parts

    masks = tuple(flumpy.from_numpy(np.ascontiguousarray(np.asarray(g, dtype=bool)))
                  for g in good)
    target = Path(path)
    remove_stale_parts(target)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        pickle.dump(masks, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return target
