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

A panel whose valid pixels all hold one value carries no data: a module whose read-out dropped
(all 0) or a frame that failed to read out (every pixel 0, or one constant) gave no peaks and no
word, and the mask ``peaknet2cxi`` stores (the pixels found usable here) still called the zeros
good pixels, which indexamajig would integrate as data.  Such a panel is masked (and named
in the warning) as non-finite pixels are; a frame whose every usable pixel holds one value is
warned about on its own ("no data") and is written as a frame without peaks.  Real data never
hold one value over a panel: integrating detectors read noise (a few ADU at least) and float
data more so, and :data:`MIN_ONE_VALUE` pixels of it all equal is beyond chance.  The exception
is photon counting, which has no read noise: a module far from the beam can count no photon on
a frame with almost no background (an Eiger's outer module on a blank), so on a frame of
photon counts (every sampled usable pixel a whole number, none below zero) a panel at exactly 0
stays data, as its zero counts are a measurement.  A counting panel at any other single value
(all 1, all 7) is still no data, and so is a frame of counts that is 0 everywhere: with a beam
on, some pixel counts something, so a frame of none is a failed read-out or no exposure.

A background far below zero (a pedestal subtracted twice, or a raw dark frame) says the
calibration went wrong.  The offset alone moves no peak (each is measured on its local
background: a real CSPAD still 1,000 or 5,000 ADU lower gives the same peaks and intensities),
but a pedestal subtracted twice also adds its pixel-to-pixel pattern to the noise, which costs
peaks and which nothing here can undo.  So it is reported as a warning with the median, not
corrected, for the frame and for each panel on its own: pedestals differ from ASIC to ASIC, so
subtracted twice they spread the frame's values over hundreds of ADU and its median stays within
that spread (a real CSPAD still with its pedestals subtracted twice kept 16 of its 132 peaks
without a word), while each ASIC's own median lies far below its own spread.

:class:`~peaknet_xtal.finding.engine.InferenceEngine` applies :func:`sanitise_frame` to every
frame it is given, where the frame enters it (and to frames it only counts towards a run's gain
and defects), so the CLI, the Python API, the DIALS plugin and the Ray pipeline all apply the same
rule.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from peaknet_xtal.types import count_range

log = logging.getLogger(__name__)

#: Largest magnitude kept: the square of anything larger overflows float32.
ABSURD = float(np.sqrt(np.finfo(np.float32).max))
#: A background median more than this many robust sigmas below zero is reported as an offset.
OFFSET_SIGMAS = 10.0
#: Frames reported one by one before the rest are only counted (see :class:`SanitiseTally`);
#: frames without data (one value everywhere) have a count of their own.
MAX_WARNINGS = 10
#: Fewest valid pixels a panel (or frame) needs to be judged by the one-value rule (module
#: docstring): 64 pixels of noise of one ADU (sigma), rounded to whole ADU, are all equal
#: with odds of about 1e-26 (0.38 ** 63), while a few equal pixels of a mostly masked panel
#: of integer data can be chance.
MIN_ONE_VALUE = 64
#: Fewest sampled pixels whose median says a panel is offset (fewer: a masked panel's chance).
MIN_OFFSET_SAMPLE = 32
#: Panels named in a warning before the rest are counted.
NAMED_PANELS = 6
_SAMPLES = 1 << 16


@dataclass
class FrameCheck:
    """What :func:`sanitise_frame` found in one frame."""

    pixels: int = 0
    n_panels: int = 0
    nonfinite: int = 0
    absurd: int = 0
    marked: int = 0  # pixels integer data mark as unusable (:func:`marked_pixels`)
    marker: str = ""  # which values those are
    usable: int = 0
    #: the background median when it looks like a lost pedestal: the frame's, or the lowest of
    #: the ``offset_panels``' own
    offset: float | None = None
    #: the panels whose own background median lies far below zero when the frame's does not
    offset_panels: list[int] = field(default_factory=list)
    one_value: int = 0  # pixels masked as their panel held one value (no data)
    #: the panels (index, value) masked as every valid pixel of theirs held that one value
    flat_panels: list[tuple[int, float]] = field(default_factory=list)
    #: the one value every usable pixel of the frame held (no data at all), else None
    frame_value: float | None = None
    lost_panels: list[int] = field(default_factory=list)  # panels with masked values

    @property
    def masked(self) -> int:
        return self.nonfinite + self.absurd + self.marked + self.one_value

    @property
    def no_data(self) -> bool:
        return self.frame_value is not None

    def describe(self, names: Sequence[str] | None = None) -> str:
        """The findings in words; ``names``: the panels' names (the geometry's), else they are
        called by number (and not at all in a frame of one panel)."""
        parts = []
        if self.no_data:
            parts.append(f"every pixel holds the same value ({self.frame_value:.6g}): no data "
                         "(a failed read-out?); written as a frame without peaks")
        where = _panel_list(self.lost_panels, names, self.n_panels)
        if self.nonfinite or self.absurd:
            parts.append(f"masked {self.nonfinite} non-finite and {self.absurd} absurd "
                         f"(|value| > {ABSURD:.2g}) pixels{where}")
        if self.marked:
            parts.append(f"masked {self.marked} pixels {self.marker}{where}, which detector "
                         "writers put in gaps and defective or overloaded pixels (a mask, or "
                         "the geometry's flag_morethan / flag_lessthan, that says so keeps this "
                         "quiet)")
        if self.flat_panels and not self.no_data:
            values = sorted({v for _, v in self.flat_panels})
            flat = _panel_list([i for i, _ in self.flat_panels], names, self.n_panels)
            parts.append(f"every valid pixel of {len(self.flat_panels)} panel(s){flat} holds one "
                         f"value ({', '.join(f'{v:.6g}' for v in values)}): no data (dropped in "
                         f"read-out?), {self.one_value} pixels masked")
        if self.usable == 0 and not self.no_data:
            parts.append(f"no usable pixel left of {self.pixels}: no peaks can be found")
        if self.offset is not None:
            whose = (f"of {len(self.offset_panels)} panel(s)"
                     f"{_panel_list(self.offset_panels, names, self.n_panels)} is as low as"
                     if self.offset_panels else "is")
            parts.append(f"the background median {whose} {self.offset:.4g}, far below zero: the "
                         "data look offset (a pedestal subtracted twice?); an offset alone moves "
                         "no peak, but a pedestal's pixel pattern subtracted twice adds to the "
                         "noise and costs peaks")
        return "; ".join(parts)


@dataclass
class SanitiseTally:
    """Totals over a run, and the rate limit on warnings (one line per frame for the first
    :data:`MAX_WARNINGS` frames, then a single line saying the rest are only counted; frames
    without data have a budget of their own, so that a dead frame late in a run with a NaN
    module in every frame is still named).

    ``reported_in``: where the host reports the run's counts (:meth:`as_dict`), named in that
    line; a host with no such report leaves it empty and the line promises none.  Why: the
    line said "see the run summary" in every entry point while no run summary held the
    counts (a 20-frame run with a NaN module: ten warnings, that line, then nothing)."""

    frames: int = 0
    nonfinite: int = 0
    absurd: int = 0
    marked: int = 0
    one_value: int = 0
    flat_panels: int = 0
    no_data: int = 0
    empty: int = 0
    offset: int = 0
    warned: int = 0
    warned_no_data: int = 0
    reported_in: str = ""

    def add(self, check: FrameCheck, where: str, names: Sequence[str] | None = None) -> None:
        """Count ``check`` (one frame's), warning as the rate limit allows; ``where`` names the
        frame (file and event), ``names`` its panels (:meth:`FrameCheck.describe`)."""
        if not (check.masked or check.usable == 0 or check.offset is not None
                or check.no_data):
            return
        self.frames += 1
        self.nonfinite += check.nonfinite
        self.absurd += check.absurd
        self.marked += check.marked
        self.one_value += 0 if check.no_data else check.one_value
        self.flat_panels += 0 if check.no_data else len(check.flat_panels)
        self.no_data += int(check.no_data)
        self.empty += int(check.usable == 0 and not check.no_data)
        self.offset += int(check.offset is not None)
        kind = "frames without data" if check.no_data else "frames with unusable pixels"
        warned = self.warned_no_data if check.no_data else self.warned
        if warned < MAX_WARNINGS:
            log.warning("%s: %s", where, check.describe(names))
            if check.no_data:
                self.warned_no_data += 1
            else:
                self.warned += 1
            if warned + 1 == MAX_WARNINGS:
                log.warning("further %s are %s", kind,
                            f"counted, not reported one by one (see {self.reported_in})"
                            if self.reported_in else "not reported one by one")

    def as_dict(self) -> dict[str, int]:
        """The run's counts, as run records keep them (:func:`describe_tally` says them)."""
        return {"frames": self.frames, "nonfinite_pixels": self.nonfinite,
                "absurd_pixels": self.absurd, "marker_pixels": self.marked,
                "one_value_pixels": self.one_value, "one_value_panels": self.flat_panels,
                "frames_without_data": self.no_data,
                "frames_without_usable_pixels": self.empty,
                "frames_offset": self.offset}


def add_tallies(tallies: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Several engines' :meth:`SanitiseTally.as_dict` summed (the Ray pipeline's workers)."""
    total: dict[str, int] = dict.fromkeys(SanitiseTally().as_dict(), 0)
    for tally in tallies:
        for key, value in tally.items():
            total[key] = total.get(key, 0) + int(value)
    return total


def describe_tally(tally: Mapping[str, int]) -> str | None:
    """One line for a run summary saying what :meth:`SanitiseTally.as_dict` counted, or None
    where no frame had anything to say."""
    if not tally.get("frames"):
        return None
    parts = []
    for key, text in (("frames_without_data", "without data (every pixel one value)"),
                      ("frames_without_usable_pixels", "without a usable pixel"),
                      ("frames_offset", "with a background far below zero (offset)")):
        if tally.get(key):
            parts.append(f"{tally[key]} {text}")
    for key, text in (("nonfinite_pixels", "non-finite"), ("absurd_pixels", "absurd"),
                      ("marker_pixels", "marked (gap or bad-pixel values)")):
        if tally.get(key):
            parts.append(f"{tally[key]} {text} pixels masked")
    if tally.get("one_value_panels"):
        parts.append(f"{tally['one_value_panels']} panel(s) masked as every valid pixel held "
                     f"one value ({tally.get('one_value_pixels', 0)} pixels)")
    kinds = "unusable pixels, no data or an offset" if tally.get("frames_offset") else (
        "unusable pixels or no data")
    return f"{tally['frames']} frame(s) had {kinds}: {'; '.join(parts)}"


def _panel_list(panels: Sequence[int], names: Sequence[str] | None, n_panels: int) -> str:
    """" (in p2a0, p2a1 and 3 more)" for the warnings: ``panels`` by ``names`` (the
    geometry's) or number; nothing for a frame of one unnamed panel (``n_panels``)."""
    if not panels or (names is None and n_panels == 1):
        return ""
    called = [names[i] if names is not None and i < len(names) else f"panel {i}"
              for i in panels]
    shown = ", ".join(called[:NAMED_PANELS])
    more = len(called) - NAMED_PANELS
    return f" (in {shown}{f' and {more} more' if more > 0 else ''})"


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
    those of panels that hold one value (:func:`_flat_panels`), and counts.

    ``masks`` (True = good) may be None; shapes must match (a mismatch is a ValueError naming the
    panel).  ``dtype``: the type the data were stored as (``Frame.meta["dtype"]``), else the
    panels' own; integer data's marked pixels (:func:`marked_pixels`) depend on it.  Pixel values
    are never changed.
    """
    if masks is not None and len(masks) != len(panels):
        raise ValueError(f"{len(masks)} mask(s) for {len(panels)} panel(s): give one good-pixel "
                         "array per panel")
    check = FrameCheck(n_panels=len(panels))
    images: list[np.ndarray] = []
    goods: list[np.ndarray] = []
    samples: list[np.ndarray | None] = []
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
            check.lost_panels.append(i)
        images.append(image)
        goods.append(good)
        # a strided sample for the offset and one-value checks, not a copy of every good pixel
        samples.append(image.ravel()[::step][good.ravel()[::step]] if usable else None)
    for i in _flat_panels(images, goods, samples, check):
        check.usable -= int(np.count_nonzero(goods[i]))
        check.one_value += int(np.count_nonzero(goods[i]))
        goods[i] = np.zeros_like(goods[i])
        samples[i] = None
    kept = [s for s in samples if s is not None]
    sample = np.concatenate(kept) if kept else np.zeros(0, np.float32)
    if sample.size:
        check.offset = _offset(sample)
    if check.offset is None and len(kept) > 1:
        low = {i: median for i, s in enumerate(samples)
               if s is not None and s.size >= MIN_OFFSET_SAMPLE
               and (median := _offset(s)) is not None}
        if low:
            check.offset_panels = sorted(low)
            check.offset = min(low.values())
    return images, goods, check


def _flat_panels(images: Sequence[np.ndarray], goods: Sequence[np.ndarray],
                 samples: Sequence[np.ndarray | None], check: FrameCheck) -> list[int]:
    """The panels whose valid pixels all hold one value and carry no data (module docstring),
    noted in ``check`` (``flat_panels``; ``frame_value`` where every usable pixel of the frame
    holds the one value).  A panel's strided sample decides almost every panel of real data at
    once (two values differ); only a panel whose sample holds one value is read whole."""
    flat: list[tuple[int, float]] = []
    live = 0
    for i, (image, good, sample) in enumerate(zip(images, goods, samples, strict=True)):
        if sample is None:  # no usable pixel
            continue
        live += 1
        if sample.size > 1 and sample.min() != sample.max():
            continue
        if int(np.count_nonzero(good)) < MIN_ONE_VALUE:
            continue
        low = float(np.min(image, where=good, initial=np.inf))
        if low == float(np.max(image, where=good, initial=-np.inf)):
            flat.append((i, low + 0.0))  # + 0.0: -0.0 (0 times a negative) says 0
    if not flat:
        return []
    if len(flat) == live and len({v for _, v in flat}) == 1:  # the whole frame: no data
        check.frame_value = flat[0][1]
        check.flat_panels = flat
        return [i for i, _ in flat]
    flat_ids = {i for i, _ in flat}
    others = [s for i, s in enumerate(samples) if s is not None and i not in flat_ids]
    counts = bool(others) and all(s.size == 0 or (float(s.min()) >= 0
                                                  and np.array_equal(s, np.rint(s)))
                                  for s in others)
    # photon counts at 0: a panel that counted nothing is a measurement (module docstring)
    check.flat_panels = [(i, v) for i, v in flat if not (counts and v == 0)]
    return [i for i, _ in check.flat_panels]


def _offset(sample: np.ndarray) -> float | None:
    """The median, when it lies far below zero in units of the background's robust spread."""
    median = float(np.median(sample))
    if median >= 0:
        return None
    spread = 1.4826 * float(np.median(np.abs(sample - median)))
    return median if -median > OFFSET_SIGMAS * max(spread, 1.0) else None
