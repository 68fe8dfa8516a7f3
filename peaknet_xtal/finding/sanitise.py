"""Pixel values no detector can produce are masked and counted before they reach the model.

Why: one NaN, inf or 3e38 pixel is harmless only if nothing downstream ever adds it up.  The
input standardisation, the tile statistics and the peak background rings all sum pixel values;
a float32 value above ``sqrt(float32 max)`` (about 1.8e19) already overflows a variance, so
five such pixels were enough to cut a frame's peaks to a quarter and rows at float max to none,
with exit status 0.  Masking them (the pixels stay unchanged; only the good-pixel mask shrinks)
keeps every other pixel's result as it would have been, and one warning per affected frame
names the source and the counts, so nothing is lost silently.

Integer data mark gaps, defective and overloaded pixels with values no count takes
(:func:`marked_pixels`): unsigned types with their largest value (65535 in uint16, 4294967295 in
uint32), as DECTRIS Eiger file writers and streams do (the shared Eiger2 still,
``../shared/data/real/eiger2_still_0mq``: 65535 = masked or gap) and as a 16-bit counter reads
when it saturates; signed photon-counting data with -1 (gaps) and -2 (defective pixels), as
Pilatus and Eiger CBF and HDF5 writers do.  Read through a geometry that neither flags nor masks
them, such pixels are not counts: that still's module gaps (260,886 pixels) gave 477 of its 975
peaks within 3 px of a gap, where masking them left 468 in all; written as int32 with -1 gaps,
1,292 peaks and a gain measured from the data of 0.09 photons per count instead of 1.03.  So
they are masked and counted too, by the type of the data as they were stored: the panels' own
(the Python API hands them in as they are) or ``Frame.meta["dtype"]``, which the CXI reader sets
before it converts frames to float32 (with the rule, every variant gives the masked frame's 468
peaks; the gain is measured on the usable pixels only).  DIALS masks them by its trusted range
(overloads included) before the plugin sees them where the format sets that range from the
file; where it does not (a NeXus file without a pixel mask or bit depth), the type the values
imply (:func:`implied_dtype`) marks them in every adapter reading through dxtbx.

A constant offset that pushes the whole background far below zero (a pedestal subtracted twice,
or a raw dark frame) is not maskable: the pixels are finite, but peak sums come out negative and
shot-noise SNRs meaningless.  That is reported as a warning with the median, not corrected.

:class:`~peaknet_xtal.finding.engine.InferenceEngine` applies :func:`sanitise_frame` to every
frame it is given, where the frame enters it (and to frames it only counts towards a run's gain
and defects), so the CLI, the Python API, the DIALS plugin and the Ray pipeline all apply the same
rule.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from peaknet_xtal.types import count_range

log = logging.getLogger(__name__)

#: Largest magnitude kept: the square of anything larger overflows float32.
ABSURD = float(np.sqrt(np.finfo(np.float32).max))
#: A background median more than this many robust sigmas below zero is reported as an offset.
OFFSET_SIGMAS = 10.0
#: Frames reported one by one before the rest are only counted (see :class:`SanitiseTally`).
MAX_WARNINGS = 10
_SAMPLES = 1 << 16


@dataclass
class FrameCheck:
    """What :func:`sanitise_frame` found in one frame."""

    pixels: int = 0
    nonfinite: int = 0
    absurd: int = 0
    marked: int = 0  # pixels integer data mark as unusable (:func:`marked_pixels`)
    marker: str = ""  # which values those are
    usable: int = 0
    offset: float | None = None  # the background median when it looks like a lost pedestal

    @property
    def masked(self) -> int:
        return self.nonfinite + self.absurd + self.marked

    def describe(self) -> str:
        parts = []
        if self.nonfinite or self.absurd:
            parts.append(f"masked {self.nonfinite} non-finite and {self.absurd} absurd "
                         f"(|value| > {ABSURD:.2g}) pixels")
        if self.marked:
            parts.append(f"masked {self.marked} pixels {self.marker}, which detector writers put "
                         "in gaps and defective or overloaded pixels (a mask, or the geometry's "
                         "flag_morethan / flag_lessthan, that says so keeps this quiet)")
        if self.usable == 0:
            parts.append(f"no usable pixel left of {self.pixels}: no peaks can be found")
        if self.offset is not None:
            parts.append(f"the background median is {self.offset:.4g}, far below zero: the data "
                         "look offset (pedestal subtracted twice, or not at all?), so peak sums "
                         "and SNRs are not meaningful")
        return "; ".join(parts)


@dataclass
class SanitiseTally:
    """Totals over a run, and the rate limit on warnings (one line per frame for the first
    :data:`MAX_WARNINGS` frames, then a single line saying the rest are only counted)."""

    frames: int = 0
    nonfinite: int = 0
    absurd: int = 0
    marked: int = 0
    empty: int = 0
    offset: int = 0
    warned: int = 0
    sources: list[str] = field(default_factory=list)

    def add(self, check: FrameCheck, where: str) -> None:
        if not (check.masked or check.usable == 0 or check.offset is not None):
            return
        self.frames += 1
        self.nonfinite += check.nonfinite
        self.absurd += check.absurd
        self.marked += check.marked
        self.empty += int(check.usable == 0)
        self.offset += int(check.offset is not None)
        if self.warned < MAX_WARNINGS:
            log.warning("%s: %s", where, check.describe())
            self.warned += 1
            if self.warned == MAX_WARNINGS:
                log.warning("further frames with unusable pixels are counted, not reported "
                            "(see the run summary)")

    def as_dict(self) -> dict[str, int]:
        return {"frames": self.frames, "nonfinite_pixels": self.nonfinite,
                "absurd_pixels": self.absurd, "marker_pixels": self.marked,
                "frames_without_usable_pixels": self.empty,
                "frames_offset": self.offset}


def marked_pixels(image: np.ndarray, dtype: Any, least: float | None = None
                  ) -> tuple[np.ndarray, str] | None:
    """Pixels of one panel (``image``, its values as float32) that data stored as ``dtype`` mark
    as unusable, and what they are, or None (module docstring): those outside
    :func:`peaknet_xtal.types.count_range`.  ``least``: the least value of the whole frame
    (:func:`frame_least`), which decides whether signed data are photon counts; else the
    panel's.

    - unsigned integers of 16 bits or more: the type's largest value (compared as float32
      holds it, so uint32 values within 128 of 2**32 - 1 count too: no detector counts that
      high);
    - signed integers of 16 bits or more: the type's extremes (error and overload marks);
    - signed integers whose least value (the frame's, ``least``) is -1 or -2: every negative
      value.  Pedestal-subtracted integrating data, whose noise goes further below zero, keep
      their negative values (a frame whose noise stops at -1 or -2 loses those few background
      pixels, which changes nothing).
    """
    dtype = np.dtype(dtype)
    if least is None:
        least = frame_least([image], dtype)
    low, high = count_range(dtype, least)
    marked, what = None, []  # what: only the marks this panel holds, for the warning
    if np.isfinite(high):
        marked = image >= np.float32(high)
        if marked.any():
            what.append(f"at {high:.10g}, the largest value of the data's type ({dtype})")
    if np.isfinite(low):
        below = image <= np.float32(low)
        marked = below if marked is None else marked | below
        if below.any():
            what.append(f"below zero ({dtype} data going no lower than -2: -1 marks gaps, -2 "
                        "bad pixels)" if low == -1.0 else f"at {low:.10g}, the smallest value "
                        f"of the data's type ({dtype})")
    return None if marked is None else (marked, " or ".join(what))


def implied_dtype(panels: Sequence[np.ndarray]) -> str | None:
    """The integer type that a reader which hands over counts as floats (or as 32-bit
    integers whatever they were stored as, as dxtbx does) leaves to be inferred, for
    :func:`marked_pixels`: ``uint16`` where every finite value is a whole number in 0..65535
    (16-bit data: their largest value marks; no wider counter reads exactly 65535 but by
    chance), ``int32`` where they are whole numbers from -2 up beyond that (photon counts
    whose -1 gaps and -2 bad pixels mark, as Pilatus CBFs hold them and as dxtbx hands over
    an unsigned 32-bit file's 0xFFFFFFFF), None otherwise: values that are not whole (float
    data, or counts a format's gain or pedestal has changed, whose marks are no longer these
    values) or that go lower (pedestal-subtracted data: an LCLS CSPAD CBF reaches -5136, and
    two of its 64 ASICs happen to stop at -1 and -2, whose negative pixels are background).

    Why: a NeXus file without a pixel mask or bit depth leaves its gaps' marked values in
    DIALS' trusted range, and they gave 13-15 false peaks a frame along an Eiger 1M's module
    gaps and a gain measured as 0.5.  The whole image decides, so that every panel of it is
    read alike."""
    low, high = np.inf, -np.inf
    for panel in panels:
        values = np.asarray(panel)
        if values.dtype.kind in "iub":
            return None  # its own type says it (sanitise_frame takes the panels' type)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        if low < -2 or high > np.iinfo(np.int32).max:
            return None
        if not np.array_equal(finite, np.rint(finite)):
            return None
    if not np.isfinite(low):
        return None
    return "uint16" if low >= 0 and high <= np.iinfo(np.uint16).max else "int32"


def frame_least(panels: Sequence[np.ndarray], dtype: Any) -> float | None:
    """The least finite value of a frame stored as signed integers ``dtype`` (None for other
    types, or no finite value): -1 or -2 make every negative value a mark.  Why the frame's,
    not each panel's: pedestal-subtracted data reach far below zero (an LCLS CSPAD CBF: -5136),
    and two of that frame's 64 ASICs happen to stop at -1 and -2; judged alone, their 12
    negative background pixels were masked, with a warning about -1 gaps the data do not
    have."""
    if np.dtype(dtype).kind != "i":
        return None
    least = np.inf
    for panel in panels:
        values = np.asarray(panel)
        if values.size:
            with np.errstate(invalid="ignore"):
                finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            if finite.size:
                least = min(least, float(finite.min()))
    return None if not np.isfinite(least) else least


#: What a function wrapped by :func:`masked_values_quiet` returns.
T = TypeVar("T")


def masked_values_quiet(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` with numpy's floating-point warnings off (invalid values, overflow).  Why:
    :func:`sanitise_frame` masks non-finite pixels but never changes a value, so arithmetic over
    whole panels meets the infinities it masked; their results are masked too, and numpy's
    "invalid value encountered in subtract" reached Python API users as a stray line beside the
    finder's own warning that those pixels were masked."""
    @functools.wraps(function)
    def quiet(*args: Any, **kwargs: Any) -> T:
        with np.errstate(invalid="ignore", over="ignore"):
            return function(*args, **kwargs)

    return quiet


def sanitise_frame(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
                   dtype: Any = None
                   ) -> tuple[list[np.ndarray], list[np.ndarray], FrameCheck]:
    """float32 panels, good-pixel masks with non-finite, absurd and marked pixels removed, and
    counts.

    ``masks`` (True = good) may be None; shapes must match (a mismatch is a ValueError naming the
    panel).  ``dtype``: the type the data were stored as (``Frame.meta["dtype"]``), else the
    panels' own; integer data's marked pixels (:func:`marked_pixels`) depend on it.  Pixel values
    are never changed.
    """
    if masks is not None and len(masks) != len(panels):
        raise ValueError(f"{len(masks)} mask(s) for {len(panels)} panel(s): give one good-pixel "
                         "array per panel")
    check = FrameCheck()
    images: list[np.ndarray] = []
    goods: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    # one stride over the whole frame, so that a frame of many small panels (64 CSPAD ASICs)
    # samples ~_SAMPLES pixels too, not all of them (a median of 2.3 M values: 20 ms a frame)
    step = max(1, sum(int(np.size(p)) for p in panels) // _SAMPLES)
    stored_types = {np.asarray(p).dtype if dtype is None else np.dtype(dtype) for p in panels}
    least = (frame_least(panels, stored_types.pop()) if len(stored_types) == 1
             else None)  # panels of several types (a caller's list): each judged alone
    for i, panel in enumerate(panels):
        image = np.asarray(panel)
        if image.dtype.kind not in "fiu":
            raise ValueError(f"panel {i}: pixel values must be numbers, got dtype {image.dtype}")
        stored = image.dtype if dtype is None else dtype
        image = image.astype(np.float32, copy=False)
        if image.ndim != 2:
            raise ValueError(f"panel {i} must be 2-D, got shape {image.shape}")
        given = (np.ones(image.shape, bool) if masks is None
                 else np.asarray(masks[i], dtype=bool))
        if given.shape != image.shape:
            raise ValueError(f"panel {i}: mask shape {given.shape} != {image.shape}")
        with np.errstate(invalid="ignore"):
            ok = np.abs(image) <= ABSURD  # one pass: False for NaN, +-inf and absurd values
        marks = marked_pixels(image, stored, least)
        if marks is not None:
            ok &= ~marks[0]
        good = given & ok
        check.pixels += image.size
        usable = int(np.count_nonzero(good))
        check.usable += usable
        lost = int(np.count_nonzero(given)) - usable
        if lost:  # rare: only then tell non-finite from absurd and marked
            nonfinite = int(np.count_nonzero(given & ~np.isfinite(image)))
            marked = int(np.count_nonzero(given & marks[0])) if marks is not None else 0
            check.nonfinite += nonfinite
            check.marked += marked
            if marked and marks is not None:
                check.marker = marks[1]
            check.absurd += lost - nonfinite - marked
        images.append(image)
        goods.append(good)
        if usable:  # a strided sample for the offset check, not a copy of every good pixel
            samples.append(image.ravel()[::step][good.ravel()[::step]])
    sample = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if sample.size:
        check.offset = _offset(sample)
    return images, goods, check


def _offset(sample: np.ndarray) -> float | None:
    """The median, when it lies far below zero in units of the background's robust spread."""
    median = float(np.median(sample))
    if median >= 0:
        return None
    spread = 1.4826 * float(np.median(np.abs(sample - median)))
    return median if -median > OFFSET_SIGMAS * max(spread, 1.0) else None
