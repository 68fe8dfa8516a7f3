"""Pixel values no detector can produce are masked and counted before they reach the model.

Why: one NaN, inf or 3e38 pixel is harmless only if nothing downstream ever adds it up.  The
input standardisation, the tile statistics and the peak background rings all sum pixel values;
a float32 value above ``sqrt(float32 max)`` (about 1.8e19) already overflows a variance, so
five such pixels were enough to cut a frame's peaks to a quarter and rows at float max to none,
with exit status 0.  Masking them (the pixels stay unchanged; only the good-pixel mask shrinks)
keeps every other pixel's result as it would have been, and one warning per affected frame
names the source and the counts, so nothing is lost silently.

A constant offset that pushes the whole background far below zero (a pedestal subtracted twice,
or a raw dark frame) is not maskable: the pixels are finite, but peak sums come out negative and
shot-noise SNRs meaningless.  That is reported as a warning with the median, not corrected.

:func:`sanitise_frame` is called at exactly one place, where frames enter
:class:`~peaknet_xtal.finding.engine.InferenceEngine`, so the CLI, the Python API, the DIALS plugin
and the Ray pipeline all apply the same rule.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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
    usable: int = 0
    offset: float | None = None  # the background median when it looks like a lost pedestal

    @property
    def masked(self) -> int:
        return self.nonfinite + self.absurd

    def describe(self) -> str:
        parts = []
        if self.masked:
            parts.append(f"masked {self.nonfinite} non-finite and {self.absurd} absurd "
                         f"(|value| > {ABSURD:.2g}) pixels")
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
                "absurd_pixels": self.absurd, "frames_without_usable_pixels": self.empty,
                "frames_offset": self.offset}


def sanitise_frame(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None
                   ) -> tuple[list[np.ndarray], list[np.ndarray], FrameCheck]:
    """float32 panels, good-pixel masks with non-finite and absurd pixels removed, and counts.

    ``masks`` (True = good) may be None; shapes must match (a mismatch is a ValueError naming the
    panel).  Pixel values are never changed.
    """
    check = FrameCheck()
    images: list[np.ndarray] = []
    goods: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    # one stride over the whole frame, so that a frame of many small panels (64 CSPAD ASICs)
    # samples ~_SAMPLES pixels too, not all of them (a median of 2.3 M values: 20 ms a frame)
    step = max(1, sum(int(np.size(p)) for p in panels) // _SAMPLES)
    for i, panel in enumerate(panels):
        image = np.asarray(panel)
        if image.dtype.kind not in "fiu":
            raise ValueError(f"panel {i}: pixel values must be numbers, got dtype {image.dtype}")
        image = image.astype(np.float32, copy=False)
        if image.ndim != 2:
            raise ValueError(f"panel {i} must be 2-D, got shape {image.shape}")
        given = (np.ones(image.shape, bool) if masks is None
                 else np.asarray(masks[i], dtype=bool))
        if given.shape != image.shape:
            raise ValueError(f"panel {i}: mask shape {given.shape} != {image.shape}")
        with np.errstate(invalid="ignore"):
            ok = np.abs(image) <= ABSURD  # one pass: False for NaN, +-inf and absurd values
        good = given & ok
        check.pixels += image.size
        usable = int(np.count_nonzero(good))
        check.usable += usable
        lost = int(np.count_nonzero(given)) - usable
        if lost:  # rare: only then tell non-finite from absurd
            nonfinite = int(np.count_nonzero(given & ~np.isfinite(image)))
            check.nonfinite += nonfinite
            check.absurd += lost - nonfinite
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
