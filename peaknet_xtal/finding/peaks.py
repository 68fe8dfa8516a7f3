"""From per-panel peak-probability maps to a peak table (:data:`peaknet_xtal.types.PEAK_DTYPE`).

A segmentation model says *which pixels* belong to Bragg peaks; indexers want *one row per peak*
with a position, an intensity and a background.  This module does that step for every adapter:

1. pixels with ``prob >= threshold`` inside the good-pixel mask are foreground, except where the
   local background holds so many photons that a box significance test decides with the
   network (:mod:`.bright_background`);
2. 8-connected components are labelled panel by panel, so a peak never spans a panel edge (equal-
   shaped panels are stacked and labelled at once with a structure that has no links between
   layers, which is the same thing, only faster);
3. each component gets a local background: the sigma-clipped mean and std of an annulus around
   it that skips every masked pixel and every peak's footprint (its pixels and their rim);
4. centroid, intensity and maximum are computed on background-subtracted pixels; the SNR sums
   the spot's footprint (its pixels and a one-pixel rim, where a weak spot keeps its tails), its
   noise being the background noise of that sum (pixels correlated as the panel's own noise
   is, measured on every frame: CCDs and charge-sharing detectors spread each photon's charge)
   plus the error of the subtracted ring background plus, when the detector gain is known, the
   spot's own shot noise (``adu_per_photon`` x intensity);
5. components whose integrated SNR is below ``min_snr`` are dropped, and so are those whose
   brightest pixel stands less than ``min_height`` background sigmas above the local background.
   The model judges shape and context, the two cuts judge evidence: on integrating detectors the
   model's doubtful calls are noise blobs with an SNR of 1-5, and on a photon-counting background
   as sparse as a tenth of a photon a pixel, a cluster of two or three photons stands many
   background sigmas high yet is no evidence of a reflection, which only its shot noise says.
   The height cut is the pixel test of the classic finders (peakfinder8 keeps no peak without a
   pixel ``min_snr`` local sigmas up, 5 by default); off by default.  A noise blob that the
   model calls a spot sums to an SNR of 3-5 over a few pixels, each only 3-5 sigmas high, and a
   height of 5 removes most of them, but also broad weak spots whose brightest pixel is low
   while their sum is significant (measured: the comment after ``finding.settings.DEFAULTS``).
6. per frame, after the run's defect filter (the finding engine): faint peaks, under
   ``faint_height`` sigmas or under an integrated SNR of ``faint_snr``, count only on a frame
   with at least ``faint_support`` peaks that are neither (:func:`faint_unsupported`): the
   height and evidence tests where a frame shows no crystal, none where it does, so the noise
   blobs of blanks go and the weak and broad spots of hits stay.

Everything per pixel is vectorised (``scipy.ndimage.label``, ``np.bincount`` and gathers on the
foreground pixels only); Python loops run over panel shapes and annulus sizes, never over pixels.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from peaknet_xtal.finding.bright_background import foreground_and_bright
from peaknet_xtal.finding.sanitise import masked_values_quiet
from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.types import empty_peaks, peaks_from_columns, valid_span

log = logging.getLogger(__name__)

#: 8-connectivity inside a layer, no connection between layers (= panels).
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True

#: Default least integrated SNR of a peak (see :class:`PeakParams`), from the shared settings.
DEFAULT_MIN_SNR = DEFAULTS.min_snr


@dataclass(frozen=True)
class PeakParams:
    """How segmentation turns into peaks.  Defaults suit 1-10 pixel Bragg spots.

    ``annulus_gap`` is the distance in pixels between a peak's edge and its background annulus,
    ``annulus_width`` the annulus width; ``max_peaks`` keeps the strongest by intensity;
    ``min_snr`` is the least integrated signal-to-noise a peak must have (0 keeps every
    component): footprint intensity ``I`` over ``sqrt(background_sigma**2 * (c + n**2 * e) +
    adu_per_photon * I)`` for the ``n`` pixels of the footprint, where ``c`` sums the noise
    correlation of every pair of them (``n`` for independent pixels) and ``e`` is the ring
    background's variance per pixel variance (``1 / ring pixels`` for independent ones); the
    shot-noise term is left out while ``adu_per_photon`` is None (gain unknown) or 0.
    ``min_height`` is the least height of a peak's brightest background-subtracted pixel, in
    sigmas of its local background (0: no such cut; a background without noise passes any
    height).
    ``bright_photons``, ``bright_sigmas`` and ``bright_prob`` decide the peak pixels where the
    local background holds at least ``bright_photons`` photons a pixel (None: nowhere), see
    :mod:`peaknet_xtal.finding.bright_background`; elsewhere they are the pixels at or above
    ``threshold``.
    ``rescue_prob`` and ``rescue_height``: a component of pixels at or above ``rescue_prob``
    (outside bright pixels) that holds no pixel at or above ``threshold`` is a peak too when its
    brightest pixel stands at least ``rescue_height`` local background sigmas high, it is point-
    like (:func:`point_like`) and it passes the other cuts (``rescue_prob`` not below
    ``threshold``, e.g. 1: no such peaks).  The
    network's doubt then yields to strong evidence, as where it scores spots sharper than it
    was trained on below ``threshold`` (:func:`rescue_candidates`).
    ``faint_height``, ``faint_snr`` and ``faint_support``: a frame's faint peaks, whose
    brightest pixel stands under ``faint_height`` local background sigmas or whose SNR is under
    ``faint_snr``, are reported only when at least ``faint_support`` of its peaks are not faint
    (0: always; :func:`faint_unsupported`).  A frame-level rule, applied by the finding engine
    after the run's defect filter, not by :func:`find_peaks`.
    """

    threshold: float = DEFAULTS.threshold
    min_pixels: int = 1
    max_pixels: int | None = None
    min_snr: float = DEFAULT_MIN_SNR
    min_height: float = DEFAULTS.min_height
    annulus_gap: int = 1
    annulus_width: int = 3
    min_peaks: int = DEFAULTS.min_peaks
    max_peaks: int | None = DEFAULTS.max_peaks
    adu_per_photon: float | None = None
    bright_photons: float | None = DEFAULTS.bright_photons
    bright_sigmas: float = DEFAULTS.bright_sigmas
    bright_prob: float = DEFAULTS.bright_prob
    rescue_prob: float = DEFAULTS.rescue_prob
    rescue_height: float = DEFAULTS.rescue_height
    faint_height: float = DEFAULTS.faint_height
    faint_support: int = DEFAULTS.faint_support
    faint_snr: float = DEFAULTS.faint_snr


@masked_values_quiet
def find_peaks(
    panels: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    params: PeakParams | None = None,
    *,
    geometry: Any = None,
    wavelength_A: float | None = None,
    clen_m: float | None = None,
    with_bbox: bool = False,
    with_pixels: bool = False,
) -> Any:
    """Peak table of one frame from its panels, peak probabilities and good-pixel masks.

    ``panels[i]``, ``probs[i]`` and ``masks[i]`` are 2-D ``(ss, fs)`` arrays of one shape.  Rows
    are ordered by panel, then by position (row-major), which makes the output deterministic.
    With ``geometry`` the 1/d column is filled (1/Angstrom), with the frame's own wavelength and
    camera length (``wavelength_A``, ``clen_m``: :func:`frame_clen_m`) where the geometry reads
    them from the data file rather than stating them.  With ``with_bbox`` also returns an
    ``(N, 4)`` int array ``fs0, fs1, ss0, ss1`` (end exclusive) for hosts that need boxes (DIALS);
    with ``with_pixels`` also a boolean map per panel of the pixels of the reported peaks (for
    hosts that label pixels themselves: DIALS' threshold step).  Extra outputs follow the table
    in that order.

    Each panel is searched within its valid region (:func:`valid_region`), as the finding
    engine runs the model there: the statistics a panel's peaks are measured with (its noise
    correlation, from a sample of its rows) then do not depend on masked margins around it, so
    a panel embedded in a larger masked layout gives the peaks it gives alone.
    """
    params = params or PeakParams()
    _check_shapes(panels, probs, masks)
    cuts: list[tuple[slice, slice] | None] = [None] * len(panels)
    if masks is not None:
        for i, mask in enumerate(masks):
            height, width = np.shape(mask)
            region = valid_region(np.asarray(mask, dtype=bool))
            if region is not None and region != (slice(0, height), slice(0, width)):
                cuts[i] = region
    if any(cut is not None for cut in cuts):
        def inside(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            return [a if cut is None else np.asarray(a)[cut]
                    for a, cut in zip(arrays, cuts, strict=True)]

        table, box, pixels = _find_peaks(inside(panels), inside(probs), inside(masks or []),
                                         params, with_pixels)
        dy = np.array([0 if cut is None else cut[0].start for cut in cuts])
        dx = np.array([0 if cut is None else cut[1].start for cut in cuts])
        table["ss"] += dy[table["panel"]]
        table["fs"] += dx[table["panel"]]
        box += np.stack([dx, dx, dy, dy], axis=1)[table["panel"]]
        if pixels is not None:
            whole = [np.zeros(np.shape(panel), dtype=bool) for panel in panels]
            for i, cut in enumerate(cuts):
                whole[i][cut if cut is not None else ...] = pixels[i]
            pixels = whole
    else:
        table, box, pixels = _find_peaks(panels, probs, masks, params, with_pixels)
    if geometry is not None and len(table):
        table["one_over_d"] = one_over_d(geometry, table, wavelength_A, clen_m)
    out: list[Any] = [table]
    if with_bbox:
        out.append(box)
    if with_pixels:
        out.append(pixels)
    return out[0] if len(out) == 1 else tuple(out)


def valid_region(good: np.ndarray) -> tuple[slice, slice] | None:
    """The ``(rows, cols)`` rectangle holding every good pixel of a 2-D mask, None when none is
    good: where a panel is searched (:func:`find_peaks`) and what the finding engine's model
    sees of it.  The smallest such rectangle, except that a masked margin of at most
    :data:`~peaknet_xtal.types.MASKED_EDGE` pixels along the array's edge stays in it
    (:func:`~peaknet_xtal.types.valid_span`: a border mask, not a layout's surround)."""
    rows, cols = np.flatnonzero(good.any(axis=1)), np.flatnonzero(good.any(axis=0))
    if len(rows) == 0:
        return None
    (r0, r1), (c0, c1) = (valid_span(int(found[0]), int(found[-1]) + 1, size)
                          for found, size in ((rows, good.shape[0]), (cols, good.shape[1])))
    return slice(r0, r1), slice(c0, c1)


def _find_peaks(panels: Sequence[np.ndarray], probs: Sequence[np.ndarray],
                masks: Sequence[np.ndarray] | None, params: PeakParams, with_pixels: bool
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """:func:`find_peaks` on whole arrays: the table (no 1/d yet), boxes, and pixels when
    asked for."""
    tables: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    label_maps: list[tuple[list[int], Any]] = []
    row_labels: list[np.ndarray] = []  # (group, label) of every row
    for group, indices in enumerate(group_by_shape(panels)):
        stack = np.stack([np.asarray(panels[i], dtype=np.float64) for i in indices])
        prob = np.stack([np.asarray(probs[i], dtype=np.float64) for i in indices])
        if masks is None:
            good = np.ones(stack.shape, dtype=bool)
        else:
            good = np.stack([np.asarray(masks[i], dtype=bool) for i in indices])
        good &= np.isfinite(stack)
        fore = np.zeros(stack.shape, dtype=bool)
        rescued = np.zeros(stack.shape, dtype=bool) if _rescues(params) else None
        for k in range(len(indices)):
            fore[k], bright = foreground_and_bright(
                stack[k], prob[k], good[k], params.threshold, params.adu_per_photon,
                params.bright_photons, params.bright_sigmas, params.bright_prob)
            if rescued is not None:
                usable = good[k] if bright is None else good[k] & ~bright
                rescued[k] = rescue_candidates(prob[k], usable, fore[k], params.rescue_prob)
        table, box, (labels, ids) = _peaks_in_stack(stack, prob, good, fore,
                                                    np.asarray(indices, np.int32), params,
                                                    rescued)
        tables.append(table)
        boxes.append(box)
        label_maps.append((indices, labels))
        row_labels.append(np.stack([np.full(len(ids), group), ids], axis=1))
    table = np.concatenate(tables) if tables else empty_peaks()
    box = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64)
    rows = np.concatenate(row_labels) if row_labels else np.zeros((0, 2), np.int64)
    order = np.lexsort((table["fs"], table["ss"], table["panel"]))
    table, box, rows = table[order], box[order], rows[order]
    keep = strongest(table, params.max_peaks)
    table, box, rows = table[keep], box[keep], rows[keep]
    return table, box, (_reported_pixels(panels, label_maps, rows) if with_pixels else None)


def _reported_pixels(panels: Sequence[np.ndarray], label_maps: list[tuple[list[int], Any]],
                     rows: np.ndarray) -> list[np.ndarray]:
    """Per panel, the pixels of the components behind the reported rows."""
    pixels = [np.zeros(np.shape(p), dtype=bool) for p in panels]
    for group, (indices, labels) in enumerate(label_maps):
        if labels is None:
            continue
        chosen = np.isin(labels, rows[rows[:, 0] == group, 1])
        for layer, panel in enumerate(indices):
            pixels[panel] = chosen[layer]
    return pixels


def peak_pixel_mask(panel: np.ndarray, prob: np.ndarray, good: np.ndarray | None = None,
                    params: PeakParams | None = None) -> np.ndarray:
    """Boolean map of the pixels of the peaks :func:`find_peaks` would report on one panel.

    For hosts that take foreground pixels rather than a peak table (DIALS' threshold step):
    components the peak filters reject (size, SNR) are not foreground either.
    """
    _, (pixels,) = find_peaks([panel], [prob], None if good is None else [good], params,
                              with_pixels=True)
    return pixels


def dials_foreground(pixels: np.ndarray, peaks: np.ndarray, good: np.ndarray,
                     dilation: int) -> np.ndarray:
    """The foreground DIALS' threshold step takes for one panel: the reported peaks' pixels,
    grown by ``dilation`` pixels within ``good``, without spots whose values sum to <= 0.

    Why grow: the model marks a spot's core (about half maximum and up), 1-4 pixels for sharp
    XFEL spots, while DIALS' own thresholds mark the whole footprint and its default
    ``min_spot_size`` assumes that; the rim holds background, so DIALS' value-weighted centroids
    barely move.  Each peak grows on its own (:func:`grow_apart`): a pixel that would touch
    another peak's pixels stays out, so DIALS' labelling finds the peaks that were reported, one
    spot each (grown together, neighbouring peaks of a dense Pilatus 6M hit came out as one
    spot: 1,909 DIALS spots for 1,959 peaks).
    """
    if dilation > 0 and peaks.any():
        peaks = grow_apart(peaks, good, dilation)
    return positive_spots(pixels, peaks & good)


def grow_apart(pixels: np.ndarray, good: np.ndarray, steps: int) -> np.ndarray:
    """``pixels`` (a boolean map) with each of its 8-connected regions grown by ``steps`` pixels
    within ``good``, never so far that two regions touch (8-connected): a pixel joins a region
    only where no other region lies in its 3 x 3 neighbourhood, before or after the step."""
    labels, n = ndimage.label(pixels, structure=np.ones((3, 3), bool))
    if n < 2:  # nothing to keep apart: a plain dilation
        grown = ndimage.binary_dilation(pixels, structure=np.ones((3, 3), bool),
                                        iterations=steps) if n else pixels
        return grown & (good | pixels)
    big = np.iinfo(np.int32).max
    labels = labels.astype(np.int32)
    for _ in range(steps):
        highest = ndimage.maximum_filter(labels, size=3, mode="constant")
        lowest = ndimage.minimum_filter(np.where(labels > 0, labels, big), size=3,
                                        mode="constant", cval=big)
        ring = (labels == 0) & good & (highest > 0) & (highest == lowest)
        grown = np.where(ring, highest, labels)
        highest = ndimage.maximum_filter(grown, size=3, mode="constant")
        lowest = ndimage.minimum_filter(np.where(grown > 0, grown, big), size=3,
                                        mode="constant", cval=big)
        apart = (highest == grown) & (lowest == grown)
        labels = np.where(ring & ~apart, 0, grown).astype(np.int32)
    return labels > 0


def positive_spots(pixels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """``foreground`` without spots whose pixel values sum to zero or less.

    DIALS weights a spot's centroid by its raw pixel values; on a photon-counting detector with
    no background, a faint spot plus its dilation rim of read-noise pixels can sum below zero,
    which gives a zero centroid variance that stops refinement (dials.stills_process).
    """
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    if n == 0:
        return foreground
    sums = np.bincount(labels.ravel(), weights=pixels.ravel().astype(np.float64), minlength=n + 1)
    positive = sums > 0
    positive[0] = False
    result: np.ndarray = positive[labels]
    return result


def is_hit(peaks: np.ndarray, min_peaks: int) -> bool:
    """A hit is a frame with at least ``min_peaks`` peaks (CrystFEL's ``--min-peaks``)."""
    return len(peaks) >= min_peaks


def faint_unsupported(peaks: np.ndarray, faint_height: float, faint_support: int,
                      faint_snr: float = 0.0) -> np.ndarray:
    """Which of one frame's peaks go for lack of support: the faint ones, whose brightest pixel
    stands under ``faint_height`` local background sigmas (:func:`below_height`) or whose
    integrated SNR is under ``faint_snr`` (0: no such test), when fewer than ``faint_support``
    of the frame's peaks are not faint (0: none go).

    Why: a faint call is weak evidence on its own.  On a frame with a crystal, faint peaks lie
    among tall ones and most of them are real reflections (the hits' weak spots, broad spots
    whose sum is significant while no pixel is tall); on a frame without one, nothing tall
    backs them and nearly all of them are noise blobs the network let through (model-selection
    blanks: 76 % of their false peaks stand 3-5 sigmas high; most of the rest are clusters of a
    few photons on sparse backgrounds, 5-13 sigmas high with an SNR of 3-4.5, which
    ``faint_snr`` calls faint too).  So the frame, not the peak alone, decides whether a faint
    peak is believed, as a crystallographer looking at the frame would.  Strong evidence is
    untouched: every peak at least ``faint_height`` high with an SNR of at least ``faint_snr``
    is kept whatever the frame holds.
    """
    faint = below_height(peaks["max_value"], peaks["background_sigma"], faint_height)
    if faint_snr > 0:
        faint |= peaks["snr"] < faint_snr
    if faint_support <= 0 or np.count_nonzero(~faint) >= faint_support:
        return np.zeros(len(peaks), dtype=bool)
    return faint


def strongest(peaks: np.ndarray, max_peaks: int | None) -> np.ndarray:
    """Indices of the ``max_peaks`` most intense rows, in their original order."""
    if max_peaks is None or len(peaks) <= max_peaks:
        return np.arange(len(peaks))
    intensity = np.nan_to_num(peaks["intensity"], nan=-np.inf)
    top = np.argsort(-intensity, kind="stable")[:max_peaks]
    return np.sort(top)


def one_over_d(geometry: Any, peaks: np.ndarray, wavelength_A: float | None = None,
               clen_m: float | None = None) -> np.ndarray:
    """1/d (1/Angstrom) of each peak through the geometry; NaN when the geometry cannot say.

    A geometry whose wavelength or camera length lives in the HDF5 file (not in the .geom) needs
    the frame's value (``wavelength_A``, ``clen_m``: :func:`frame_clen_m`) to place a peak in
    reciprocal space; without it the peaks are still useful, so 1/d is left NaN (unknown, never
    a made-up number) rather than failing the frame.
    """
    try:
        return np.asarray(geometry.panel_to_one_over_d(
            peaks["panel"], peaks["fs"], peaks["ss"], wavelength_A=wavelength_A, clen_m=clen_m),
            dtype=np.float64)
    except (ValueError, TypeError) as exc:
        log.debug("1/d unavailable: %s", exc)
        return np.full(len(peaks), np.nan)


#: Metres per unit of a camera length read from the data file (CrystFEL: a path without a unit
#: holds millimetres, as the LCLS encoder values do; ``clen = /path m`` says metres).
_CLEN_UNITS = {"m": 1.0, "mm": 1e-3}


def frame_clen_m(frame: Any) -> float | None:
    """The camera length (m) of one frame where its geometry reads it from the data file
    (``clen = /LCLS/detector_1/EncoderValue``, CrystFEL's CSPAD example): the value the frame's
    file holds at that path, for this frame, in the geometry's unit.  None where the geometry
    states a number (it is used as it is), or where the file holds no usable value (1/d then
    stays unknown).  Why here: the CXI writer stores the same per-frame value beside the peaks
    (``formats.cxi._frame_value``), and 1/d must be measured with the length indexamajig will
    read, as it is with the frame's own wavelength."""
    geometry = getattr(frame, "geometry", None)
    path = getattr(geometry, "camera_length_path", None)
    if not path:
        return None
    from peaknet_xtal.formats.cxi import _frame_value

    parts = str(path).split()
    scale = _CLEN_UNITS.get(parts[1] if len(parts) > 1 else "mm")
    try:
        value = _frame_value(frame, parts[0])
    except (OSError, ValueError, TypeError) as exc:  # a file gone or damaged since it was read
        log.debug("%s: camera length at %s unreadable: %s", frame.source, parts[0], exc)
        return None
    if scale is None or not np.isfinite(value):
        return None
    return float(value) * scale


# --------------------------------------------------------------------------------------------
# internals


def _check_shapes(panels: Sequence[np.ndarray], probs: Sequence[np.ndarray],
                  masks: Sequence[np.ndarray] | None) -> None:
    if len(probs) != len(panels) or (masks is not None and len(masks) != len(panels)):
        raise ValueError(f"{len(panels)} panels but {len(probs)} probability maps"
                         + ("" if masks is None else f" and {len(masks)} masks"))
    for i, panel in enumerate(panels):
        shapes = {np.shape(panel), np.shape(probs[i])}
        if masks is not None:
            shapes.add(np.shape(masks[i]))
        if len(shapes) != 1 or len(np.shape(panel)) != 2:
            raise ValueError(f"panel {i}: image, probability and mask must be one 2-D shape, "
                             f"got {sorted(shapes)}")


def group_by_shape(panels: Sequence[Any]) -> list[list[int]]:
    """Indices of ``panels`` (arrays or tensors) grouped by shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, panel in enumerate(panels):
        groups.setdefault(tuple(np.shape(panel)), []).append(i)
    return list(groups.values())


def _rescues(params: PeakParams) -> bool:
    """Whether ``params`` ask for rescued peaks (:class:`PeakParams`)."""
    return params.rescue_prob < params.threshold


def rescue_candidates(prob: np.ndarray, usable: np.ndarray, fore: np.ndarray,
                      rescue_prob: float) -> np.ndarray:
    """Pixels of one panel's 8-connected components of ``usable`` pixels at or above
    ``rescue_prob`` that hold no ``fore`` pixel and touch none: the peaks the network doubts,
    which :class:`PeakParams` ``rescue_height`` may still keep.  A component that reaches
    ``fore`` is left as ``fore`` has it: no peak's pixels change."""
    low = usable & (prob >= rescue_prob) & ~fore
    if not low.any():
        return low
    labels, n = ndimage.label(low | fore, structure=_STRUCTURE_3D[1])
    reaches = np.zeros(n + 1, dtype=bool)
    reaches[labels[fore]] = True
    reaches[0] = True
    candidates: np.ndarray = low & ~reaches[labels]
    return candidates


def _peaks_in_stack(image: np.ndarray, prob: np.ndarray, good: np.ndarray, fore: np.ndarray,
                    panel_ids: np.ndarray, params: PeakParams, rescued: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, tuple[Any, np.ndarray]]:
    """Peaks of a ``(P, H, W)`` stack of equal-shaped panels (``good``: usable pixels, finite;
    ``fore``: the peak pixels among them; ``rescued``: pixels of components below the threshold,
    :func:`rescue_candidates`), their ``(N, 4)`` boxes, and the component labels with the
    (1-based) label of each reported peak."""
    if rescued is not None and rescued.any():
        fore = fore | rescued
    else:
        rescued = None
    labels, n = ndimage.label(fore, structure=_STRUCTURE_3D)
    nothing = (empty_peaks(), np.zeros((0, 4), np.int64), (None, np.zeros(0, np.int64)))
    if n == 0:
        return nothing
    z, y, x = np.nonzero(labels)
    background = good & ~_near(labels.shape, z, y, x, _CLEAR)
    lab = labels[z, y, x] - 1
    npix = np.bincount(lab, minlength=n)
    keep = npix >= params.min_pixels
    if params.max_pixels is not None:
        keep &= npix <= params.max_pixels
    pix = keep[lab]
    z, y, x, lab = z[pix], y[pix], x[pix], lab[pix]
    kept = np.flatnonzero(keep)
    remap = np.full(n, -1)
    remap[kept] = np.arange(len(kept))
    lab = remap[lab]
    n = len(kept)
    if n == 0:
        return nothing
    npix = np.bincount(lab, minlength=n)
    box = _bounding_boxes(z, y, x, lab, n)
    rim = _rim(good, labels, z, y, x, lab)
    # the footprints the SNR sums (peak pixels and their rims), as pixel lists and as a map of
    # their owners (peak index + 1); no ring pixel may be in any footprint or component
    foot = tuple(np.concatenate([a, b]) for a, b in zip((z, y, x, lab), rim, strict=True))
    owners = np.zeros(labels.shape, dtype=np.int32)
    owners[foot[:3]] = foot[3] + 1
    taken = (labels != 0) | (owners != 0)
    layers = np.unique(box[:, 0])  # panels with peaks: the others' noise is not needed
    if len(layers) == len(image):
        rho = noise_correlation(image, background)
    else:
        rho = np.zeros((len(image), len(CORRELATION_LAGS)))
        rho[layers] = noise_correlation(image[layers], background[layers])
    bg, bg_sigma, ring_error = _annulus_background(image, good, taken, box, params, rho)
    core = np.bincount(lab, image[z, y, x] - bg[lab], minlength=n)
    snr = _integrated_snr(image, rim, foot, owners, bg, bg_sigma, ring_error, core, rho,
                          params.adu_per_photon)
    # position, intensity and brightest pixel of the footprint the SNR sums: the network marks
    # a spot's core, and on spots narrower than a pixel that core is sometimes the pixel beside
    # the bright one (on the real CSPAD stills, a one-pixel peak at background, -11 ADU, beside
    # a 440-ADU pixel in its rim: an SNR of 4.9 reported at the wrong pixel with a negative
    # intensity); DIALS, handed the same pixels grown by one, centres on the bright one
    fz, fy, fx, flab = foot
    values = image[fz, fy, fx] - bg[flab]
    weights = np.clip(values, 0.0, None)
    wsum = np.bincount(flab, weights, minlength=n)
    flat = wsum <= 0  # nothing above background: fall back to the plain pixel centre
    fs = _weighted_mean(x, lab, fx, flab, weights, wsum, flat, npix)
    ss = _weighted_mean(y, lab, fy, flab, weights, wsum, flat, npix)
    intensity = np.bincount(flab, values, minlength=n)
    max_value = np.full(n, -np.inf)
    np.maximum.at(max_value, flab, values)
    # and its box (a DIALS box must hold the centroid); ``npix`` stays the marked pixels' count,
    # as Cheetah's peakNPixels counts the pixels its threshold marks
    spread = _bounding_boxes(fz, fy, fx, flab, n)
    table = peaks_from_columns(
        panel=panel_ids[box[:, 0]], fs=fs, ss=ss, intensity=intensity, max_value=max_value,
        npix=npix, background=bg, background_sigma=bg_sigma, snr=snr,
        prob=np.bincount(lab, prob[z, y, x], minlength=n) / npix,
    )
    bbox = np.stack([spread[:, 2], spread[:, 4] + 1, spread[:, 1], spread[:, 3] + 1], axis=1)
    accept = ~(snr < params.min_snr)  # NaN SNR (no background estimate) is kept
    accept &= ~below_height(max_value, bg_sigma, params.min_height)
    if rescued is not None:  # a component is rescued or not as a whole
        doubted = np.zeros(n, dtype=bool)
        doubted[lab] = rescued[z, y, x]
        accept &= ~(doubted & below_height(max_value, bg_sigma, params.rescue_height))
        shaped = doubted & accept  # only these need the shape test (all: 8 ms on 2,000 peaks)
        if shaped.any():
            pixels = shaped[foot[3]]
            point = point_like(image, tuple(a[pixels] for a in foot), bg, max_value, n)
            accept &= ~(shaped & ~point)
    return table[accept], bbox[accept].astype(np.int64), (labels, kept[accept] + 1)


#: A point-like spot's pixels at half its maximum or above fit in a block this size: a spot
#: narrower than a pixel lights one pixel, two across a pixel edge, four around a corner.
POINT_BLOCK = 2


def point_like(image: np.ndarray, foot: tuple[np.ndarray, ...], background: np.ndarray,
               max_value: np.ndarray, n: int) -> np.ndarray:
    """Per component, whether the pixels of its footprint (``foot``: z, y, x and component of
    its pixels and rim) at half its brightest background-subtracted value or above fit in a
    :data:`POINT_BLOCK` square.  A rescued peak must be (:class:`PeakParams`): the doubt it
    overrules is the network's on spots narrower than a pixel, while cosmic-ray tracks and jet
    streaks, as bright, light a line of such pixels.  Components with no pixel in ``foot``
    come out point-like: pass only the pixels of the components asked about."""
    z, y, x, lab = foot
    high = image[z, y, x] - background[lab] >= 0.5 * max_value[lab]
    span = []
    for coord in (y, x):
        low_end = np.full(n, np.iinfo(np.int64).max)
        high_end = np.full(n, np.iinfo(np.int64).min)
        np.minimum.at(low_end, lab[high], coord[high])
        np.maximum.at(high_end, lab[high], coord[high])
        span.append(high_end - low_end)
    result: np.ndarray = (span[0] < POINT_BLOCK) & (span[1] < POINT_BLOCK)
    return result


def below_height(max_value: np.ndarray, background_sigma: np.ndarray,
                 min_height: float) -> np.ndarray:
    """Which peaks the height cut drops: brightest background-subtracted pixel under
    ``min_height`` local background sigmas (:class:`PeakParams`; 0: none).  Compared as a
    product, so a peak on a noiseless background (sigma 0) always passes."""
    if min_height <= 0:
        return np.zeros(np.shape(max_value), dtype=bool)
    dropped: np.ndarray = np.asarray(max_value) < min_height * np.asarray(background_sigma)
    return dropped


#: Pixels this close to a component are not used to measure noise correlation: a spot's tails
#: beyond what the model marked are smooth structure that would read as correlated noise.
_CLEAR = 2


def _near(shape: tuple[int, ...], z: np.ndarray, y: np.ndarray, x: np.ndarray,
          radius: int) -> np.ndarray:
    """Boolean map of the pixels within ``radius`` (Chebyshev) of the given ones; built by
    scattering their offsets, so the cost follows those pixels, not the frame."""
    near = np.zeros(shape, dtype=bool)
    _, height, width = shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near[z, np.clip(y + dy, 0, height - 1), np.clip(x + dx, 0, width - 1)] = True
    return near


def _rim(good: np.ndarray, labels: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray,
         lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The one-pixel rim of every component: good pixels of no component next to one of its
    pixels (8-connected, same panel), each given once, to its highest-numbered neighbour.

    Built from the component pixels' neighbours, so the cost follows the peaks, not the frame.
    """
    _, height, width = labels.shape
    dy, dx = (np.array([d for d in np.ndindex(3, 3) if d != (1, 1)]) - 1).T
    yy, xx = (y[:, None] + dy).ravel(), (x[:, None] + dx).ravel()
    zz, owner = np.repeat(z, len(dy)), np.repeat(lab, len(dy))
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    zz, yy, xx, owner = zz[inside], yy[inside], xx[inside], owner[inside]
    free = (labels[zz, yy, xx] == 0) & good[zz, yy, xx]
    zz, yy, xx, owner = zz[free], yy[free], xx[free], owner[free]
    flat = np.ravel_multi_index((zz, yy, xx), labels.shape)
    order = np.lexsort((-owner, flat))
    _, first = np.unique(flat[order], return_index=True)
    pick = order[first]
    return zz[pick], yy[pick], xx[pick], owner[pick]


def _integrated_snr(image: np.ndarray, rim: tuple[np.ndarray, ...],
                    foot: tuple[np.ndarray, ...], owners: np.ndarray, bg: np.ndarray,
                    bg_sigma: np.ndarray, ring_error: np.ndarray, intensity: np.ndarray,
                    rho: np.ndarray, adu_per_photon: float | None) -> np.ndarray:
    """SNR of each peak summed over its footprint: its pixels plus its rim (:func:`_rim`);
    ``foot`` lists the footprints' pixels (layer, y, x, peak index), ``owners`` maps each
    footprint pixel to its peak index + 1.

    The model marks a spot's core; a weak spot's tails hold a good part of its photons, and
    without them a real spot of 25 photons scores like a noise cluster.

    The noise of the sum is that of correlated background pixels, not ``n`` independent ones:
    ``bg_sigma**2`` times the sum of the correlations of every pair of footprint pixels (``rho``,
    :func:`noise_correlation`; ``n`` when pixels are independent), plus the error of the
    subtracted background (``ring_error``: the variance of the ring mean in units of
    ``bg_sigma**2``, :func:`_annulus_background`; it enters all ``n`` pixels alike), plus the
    spot's shot noise when the gain is known.  On a CCD-like detector (neighbour correlation
    0.4) the independent-pixel formula overstates a footprint's SNR about 1.5-2 times, which is
    how noise blobs on strong backgrounds passed ``min_snr`` (measured: the comment after
    ``finding.settings.DEFAULTS``).
    """
    rz, ry, rx, owner = rim
    fz, fy, fx, owner_all = foot
    n = len(bg)
    total = intensity + np.bincount(owner, image[rz, ry, rx] - bg[owner], minlength=n)
    n_foot = np.bincount(owner_all, minlength=n).astype(np.float64)
    pair_sum = n_foot.copy()  # each pixel with itself
    if rho.any():
        _, height, width = image.shape
        for k, (dy, dx) in enumerate(CORRELATION_LAGS):
            yy, xx = fy + dy, fx + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            partner = np.zeros(len(fz), dtype=bool)
            partner[inside] = owners[fz[inside], yy[inside], xx[inside]] == owner_all[inside] + 1
            pair_sum += 2.0 * np.bincount(owner_all[partner], rho[fz[partner], k], minlength=n)
    variance = (np.maximum(pair_sum, n_foot) + n_foot ** 2 * ring_error) * bg_sigma ** 2
    if adu_per_photon is not None and adu_per_photon > 0:
        variance = variance + adu_per_photon * np.clip(total, 0.0, None)
    elif adu_per_photon is None:
        # no gain known, on a noiseless background: such pixels are exact counts (nothing else
        # is free of noise), whose noise is their own Poisson spread; without it any count had
        # an infinite SNR (a photon-counting image handed to PeakFinder.find as a bare array:
        # 344 peaks on a real L-cysteine frame where its ImageSet, with the format's gain, gives
        # 9).  An explicit 0 (no shot noise) is left as asked.
        variance = np.where(variance == 0, np.clip(total, 0.0, None), variance)
    noise = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr: np.ndarray = np.where(noise > 0, total / noise, np.inf * np.sign(total))
    # nothing above a noiseless background (a photon-counting frame's empty pixels) is no
    # evidence at all: 0, not 0/0 = NaN, which min_snr keeps (it keeps peaks without a
    # background estimate); zero-count "peaks" were reported on the real Pilatus frames
    snr[(noise == 0) & (total == 0)] = 0.0
    return snr


#: Pixel offsets ``(dy, dx)`` at which background noise correlation is measured: one of each
#: symmetric pair, every offset within two pixels (a footprint's pairs are mostly that close).
CORRELATION_LAGS: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (1, 2), (1, -2), (2, 1), (2, -1), (2, 2),
    (2, -2))
#: Offset (pixels) taken as uncorrelated: differences this far apart give the noise's variance.
_FAR_LAG = 4
#: Pixels of a panel sampled for its correlations (whole rows, at least ``_MIN_ROWS``): one in
#: ``_SAMPLE_EVERY``, no fewer than ``_MIN_SAMPLES`` (a standard error of about 0.05 per lag)
#: and no more than ``_MAX_SAMPLES`` (0.01), so the cost does not grow with the panel's size.
#: The sample depends on the panel alone, never on the panels it is processed with: a panel
#: gives the same peaks alone or in its whole detector.
_SAMPLE_EVERY = 64
_MIN_SAMPLES = 1024
_MAX_SAMPLES = 32768
_MIN_ROWS = 8
#: Fewest usable pixel pairs for a correlation estimate; below it the panel's pixels are taken
#: as independent (the former statistic).
_MIN_PAIRS = 200


def noise_correlation(image: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``(P, len(CORRELATION_LAGS))`` correlation of background noise at each lag, per layer.

    Why: CCDs and charge-sharing pixel detectors spread each photon's charge, so neighbouring
    background pixels are correlated (0.3-0.5 for a point spread of 0.5-1 px) and a footprint's
    noise sum is larger than independent pixels give.  How: the variance of pixel differences at
    a lag is ``2 sigma**2 (1 - rho)``; differences cancel any smooth background, and the
    variance of differences ``_FAR_LAG`` pixels apart stands for ``2 sigma**2``.  Variances are
    sigma-clipped (:func:`_clipped_variance`: spots, hot pixels and streaks are clipped;
    ``usable`` excludes masked pixels and those near peaks), on a sample of each panel's rows.
    Single lags are noisy (about 0.05) and left unclipped so that errors cancel in a footprint's
    pair sum; the caller never credits a footprint with less noise than independent pixels.
    """
    p, height, width = image.shape
    lags = list(CORRELATION_LAGS) + [(0, _FAR_LAG), (_FAR_LAG, 0)]
    reach = max(max(dy, abs(dx)) for dy, dx in lags)
    if height <= reach or width <= 2 * reach:
        return np.zeros((p, len(CORRELATION_LAGS)))
    # one anchor grid for every lag, far enough from the edges for all of them: whole rows
    # (contiguous memory) spread evenly over the panel, columns thinned only on wide panels
    span = width - 2 * reach
    samples = min(_MAX_SAMPLES, max(_MIN_SAMPLES, height * width // _SAMPLE_EVERY))
    n_rows = min(height - reach, max(_MIN_ROWS, samples // span))
    rows = np.linspace(0, height - reach - 1, n_rows).round().astype(np.int64)
    step = max(1, n_rows * span // samples)
    anchor = image[:, rows, reach:width - reach:step]
    anchor_ok = usable[:, rows, reach:width - reach:step]
    diffs, counts = [], []
    for dy, dx in lags:
        shifted = (slice(None), rows + dy, slice(reach + dx, width - reach + dx, step))
        ok = anchor_ok & usable[shifted]
        diffs.append(np.where(ok, anchor - image[shifted], 0.0).reshape(p, -1))
        counts.append(ok.reshape(p, -1))
    variance = _clipped_variance(np.concatenate(diffs), np.concatenate(counts))
    variance = variance.reshape(len(lags), p).T
    counts = [c.sum(axis=1) for c in counts]
    variance[(np.stack(counts, axis=1) < _MIN_PAIRS)] = np.nan
    far = variance[:, -2:].mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = 1.0 - variance[:, :-2] / far
    return np.clip(np.nan_to_num(rho, nan=0.0, posinf=0.0, neginf=0.0), -0.5, 0.95)


def _clipped_variance(values: np.ndarray, ok: np.ndarray, clip: float = 3.5, rounds: int = 3
                      ) -> np.ndarray:
    """Per-row variance of ``values`` where ``ok``, sigma-clipped at ``clip`` (float32, fixed
    rounds): :func:`_robust_rows`' estimator made lean for the ~10^6 pixel differences of
    :func:`noise_correlation` (there it took 70 ms a CSPAD frame, this 10 ms)."""
    v = values.astype(np.float32)
    keep = ok.astype(np.float32)
    variance = np.zeros(len(v))
    for _ in range(rounds):
        n = np.maximum(keep.sum(axis=1), 1.0)
        level = (v * keep).sum(axis=1) / n
        squared = (v - level[:, None]) ** 2
        variance = (squared * keep).sum(axis=1, dtype=np.float64) / n
        keep = (ok & (squared <= (clip * clip) * variance[:, None])).astype(np.float32)
    return variance


def _weighted_mean(coord: np.ndarray, lab: np.ndarray, foot_coord: np.ndarray,
                   foot_lab: np.ndarray, weights: np.ndarray, wsum: np.ndarray,
                   flat: np.ndarray, npix: np.ndarray) -> np.ndarray:
    """Each peak's coordinate weighted by its footprint pixels' values above background; the
    plain centre of its own pixels where nothing stands above it (``flat``)."""
    n = len(wsum)
    weighted = np.bincount(foot_lab, weights * foot_coord, minlength=n) / np.where(flat, 1.0,
                                                                                   wsum)
    plain = np.bincount(lab, coord.astype(np.float64), minlength=n) / npix
    return np.where(flat, plain, weighted)


def _bounding_boxes(z: np.ndarray, y: np.ndarray, x: np.ndarray, lab: np.ndarray,
                    n: int) -> np.ndarray:
    """``(n, 5)`` array: layer, y0, x0, y1, x1 (inclusive) of every component."""
    box = np.empty((n, 5), dtype=np.int64)
    box[:, 0] = np.bincount(lab, z, minlength=n) // np.bincount(lab, minlength=n)
    for col, coords, reduce, start in ((1, y, np.minimum, np.iinfo(np.int64).max),
                                       (2, x, np.minimum, np.iinfo(np.int64).max),
                                       (3, y, np.maximum, -1), (4, x, np.maximum, -1)):
        box[:, col] = start
        reduce.at(box[:, col], lab, coords)
    return box


def _annulus_background(image: np.ndarray, good: np.ndarray, taken: np.ndarray, box: np.ndarray,
                        params: PeakParams, rho: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background level and spread (:func:`_robust_rows`) of a ring of good pixels around each
    peak, and the variance of that level in units of the pixel variance: ``1 / n`` for ``n``
    independent ring pixels, more where neighbours correlate (``rho``, per layer, at
    ``CORRELATION_LAGS``; the ring's pairs at each lag are counted on the whole ring, so masked
    gaps are treated as the ring's average).  Pixels of any footprint (``taken``: peak pixels
    and their rims) are left out: a pixel the SNR sums as signal cannot also be background.

    The ring's inner radius grows with the peak's size (half its bounding-box extent plus
    ``annulus_gap``) so a large spot is not measured against its own tails; peaks are grouped by
    inner radius and each group is gathered as one ``(peaks, ring pixels)`` array.
    """
    n = len(box)
    centre_y = (box[:, 1] + box[:, 3]) / 2.0
    centre_x = (box[:, 2] + box[:, 4]) / 2.0
    half = np.maximum(box[:, 3] - box[:, 1], box[:, 4] - box[:, 2]) / 2.0
    r_in = np.ceil(half).astype(int) + params.annulus_gap
    bg = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    error = np.zeros(n)
    _, height, width = image.shape
    for radius in np.unique(r_in):
        rows = np.flatnonzero(r_in == radius)
        dy, dx = _ring_offsets(float(radius), float(radius + params.annulus_width))
        # the centre is rounded once (half-pixel centres of even-sized boxes up): rounding each
        # ring pixel's position instead sends half of them to their neighbours' places
        yy = np.floor(centre_y[rows, None] + 0.5).astype(np.int64) + dy.astype(np.int64)
        xx = np.floor(centre_x[rows, None] + 0.5).astype(np.int64) + dx.astype(np.int64)
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        yy, xx = np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)
        zz = np.broadcast_to(box[rows, 0, None], yy.shape)
        usable = inside & good[zz, yy, xx] & ~taken[zz, yy, xx]
        ring = np.where(usable, image[zz, yy, xx], np.nan)
        bg[rows], sigma[rows] = _robust_rows(ring)
        pairs = _ring_pairs(float(radius), float(radius + params.annulus_width))
        correlated = 1.0 + 2.0 * rho[box[rows, 0]] @ pairs / len(dy)
        error[rows] = np.maximum(correlated, 1.0) / np.maximum(usable.sum(axis=1), 1)
    missing = np.isnan(bg)
    if missing.any():  # a peak walled in by masked pixels or other peaks: use its whole panel
        for layer in np.unique(box[missing, 0]):
            values = image[layer][good[layer] & ~taken[layer]]
            level, spread = _robust_rows(values[None, :]) if values.size else (
                np.zeros(1), np.zeros(1))
            rows = missing & (box[:, 0] == layer)
            bg[rows], sigma[rows] = level[0], spread[0]
            error[rows] = 1.0 / max(values.size, 1)  # a whole panel: negligible either way
    return bg, sigma, error


def robust_background(values: np.ndarray) -> tuple[float, float]:
    """Background level and spread of a set of pixel values (NaN ignored): the package's one
    background/noise estimator (:func:`_robust_rows`), for every caller that needs one (peak
    SNR here, the pseudo-Voigt prescreen in labelling, training's augmentation scale)."""
    level, spread = _robust_rows(np.asarray(values, dtype=np.float64).reshape(1, -1))
    return float(level[0]), float(spread[0])


def _robust_rows(values: np.ndarray, clip: float = 3.0, rounds: int = 4
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NaN-ignoring background level and spread: mean and std after sigma clipping.

    Not the median and MAD: on a photon-counting background of a few tenths of a photon a
    pixel, most pixels hold no photon, so median and MAD describe only the read noise (0 and a
    fifth of a photon) while the real level and spread are several times larger; every cluster
    of background photons then looks like a significant peak.  Clipping (starting wide, from the
    plain std) still rejects the tails of neighbouring spots.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = ~np.isnan(v)
    keep = finite
    for _ in range(rounds):
        n = keep.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            level = np.where(keep, v, 0.0).sum(axis=1) / n
            deviation = np.where(keep, v - level[:, None], 0.0)
            spread = np.sqrt((deviation * deviation).sum(axis=1) / n)
            inside = finite & (np.abs(v - level[:, None]) <= clip * spread[:, None])
        if np.array_equal(inside, keep):
            break
        keep = inside
    return level, spread


_RING_CACHE: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
_RING_PAIRS: dict[tuple[float, float], np.ndarray] = {}


def _ring_pairs(r_in: float, r_out: float) -> np.ndarray:
    """Pixel pairs of a whole ring at each of ``CORRELATION_LAGS``."""
    key = (r_in, r_out)
    if key not in _RING_PAIRS:
        dy, dx = _ring_offsets(r_in, r_out)
        members = set(zip(dy.astype(int).tolist(), dx.astype(int).tolist(), strict=True))
        _RING_PAIRS[key] = np.array([sum((a + ly, b + lx) in members for a, b in members)
                                     for ly, lx in CORRELATION_LAGS], dtype=np.float64)
    return _RING_PAIRS[key]


def _ring_offsets(r_in: float, r_out: float) -> tuple[np.ndarray, np.ndarray]:
    key = (r_in, r_out)
    if key not in _RING_CACHE:
        span = int(np.ceil(r_out))
        dy, dx = np.mgrid[-span:span + 1, -span:span + 1]
        dist = np.hypot(dy, dx)
        ring = (dist > r_in) & (dist <= r_out)
        _RING_CACHE[key] = (dy[ring].astype(np.float64), dx[ring].astype(np.float64))
    return _RING_CACHE[key]
