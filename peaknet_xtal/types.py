"""Data that flows between sources, the inference engine and writers.

Coordinate convention used everywhere inside the package (and converted only at the edges, in the
``io`` writers and the host adapters):

- positions are **panel-relative** ``(fs, ss)`` = (column, row) of the panel's 2-D array;
- they are **0-based array indices**: the centre of the first pixel is ``(0.0, 0.0)``.

CrystFEL streams and DIALS put the origin at the pixel *corner* (add 0.5); CXI peak tables use raw
slab indices (add the panel's ``min_fs``/``min_ss``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: One row per peak.  ``panel`` indexes ``Frame.panels``.
PEAK_DTYPE = np.dtype(
    [
        ("panel", np.int32),
        ("fs", np.float64),  # panel-relative, 0-based pixel-centre coordinates
        ("ss", np.float64),
        ("intensity", np.float64),  # background-subtracted sum over peak pixels
        ("max_value", np.float64),  # brightest pixel, background subtracted
        ("npix", np.int32),
        ("background", np.float64),  # local background level per pixel
        ("background_sigma", np.float64),
        ("snr", np.float64),
        ("prob", np.float64),  # mean peak probability over the peak pixels (NaN if unknown)
        ("one_over_d", np.float64),  # 1/d in 1/Angstrom (NaN without geometry)
    ]
)


def empty_peaks(n: int = 0) -> np.ndarray:
    """A peak table of ``n`` rows with every float column NaN and every int column 0."""
    table = np.zeros(n, dtype=PEAK_DTYPE)
    for name in ("intensity", "max_value", "background", "background_sigma", "snr", "prob",
                 "one_over_d"):
        table[name] = np.nan
    return table


def peaks_from_columns(**columns: Any) -> np.ndarray:
    """Build a peak table from equal-length columns; missing columns get :func:`empty_peaks` fill.
    """
    lengths = {len(np.atleast_1d(v)) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"peak columns differ in length: {sorted(lengths)}")
    table = empty_peaks(lengths.pop() if lengths else 0)
    for name, values in columns.items():
        if name not in (PEAK_DTYPE.names or ()):
            raise KeyError(f"unknown peak column {name!r}; known: {PEAK_DTYPE.names}")
        table[name] = values
    return table


@dataclass
class Frame:
    """One detector readout, split into panels.

    ``event`` is the CrystFEL event id (``"//5"`` is frame 5 of a ``dim0 = %`` stack, ``"//"`` a
    single-frame file); with ``source`` it identifies the frame end to end, through queues, workers
    and writers, so that results can be matched back and reruns can skip what is done.
    """

    panels: list[np.ndarray]  # float32, one 2-D (ss, fs) array per panel
    masks: list[np.ndarray] | None = None  # bool, True = good pixel; same shapes as panels
    source: str = ""
    event: str = "//"
    serial: int = 0  # 0-based position of the frame in its source
    geometry: Any = None  # peaknet_xtal.formats.geometry.Geometry when known
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the frame across the pipeline."""
        return (self.source, self.event)

    def masks_or_ones(self) -> list[np.ndarray]:
        if self.masks is not None:
            return self.masks
        return [np.ones(p.shape, dtype=bool) for p in self.panels]


@dataclass
class FrameResult:
    """What a finder made of one frame."""

    frame: Frame
    peaks: np.ndarray  # PEAK_DTYPE
    hit: bool = False
    prob_maps: list[np.ndarray] | None = None  # optional per-panel peak probability
    meta: dict[str, Any] = field(default_factory=dict)
