"""Data that flows between sources, the inference engine and writers.

Coordinate convention used everywhere inside the package (and converted only at the edges, in the
``io`` writers and the host adapters):

- positions are **panel-relative** ``(fs, ss)`` = (column, row) of the panel's 2-D array;
- they are **0-based array indices**: the centre of the first pixel is ``(0.0, 0.0)``.

CrystFEL streams and DIALS put the origin at the pixel *corner* (add 0.5); CXI peak tables use raw
slab indices (add the panel's ``min_fs``/``min_ss``).
"""
from __future__ import annotations

import functools
import os
import re
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


_EVENT_NUMBER = re.compile(r"//(\d+)")


def event_index(event: str | None) -> int:
    """Frame number of a CrystFEL event id in a file of frames: ``//5`` -> 5, ``//`` or none -> 0
    (a single-frame file), anything not starting with ``//`` -> -1.  Only file sources (CXI,
    dxtbx) number their events so; other sources' events are opaque keys."""
    if event is None or event.strip() in ("", "//"):
        return 0
    match = _EVENT_NUMBER.search(event)
    return int(match.group(1)) if match and event.startswith("//") else -1


def integer_marker(dtype: Any) -> float | None:
    """The value integer data mark unusable pixels with: the largest of an unsigned type of 16
    bits or more (``finding.sanitise.marked_pixels``); None for other types (8-bit data are too
    narrow for a value to be spared, signed and float data mark with other values)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize >= 2:
        return float(np.iinfo(dtype).max)
    return None


#: The least values signed photon counts hold: -1 marks gaps, -2 defective pixels.
SIGNED_MARKS = (-1.0, -2.0)


def count_range(dtype: Any, least: float | None = None) -> tuple[float, float]:
    """The open interval ``(low, high)`` of the values data stored as ``dtype`` use for counts;
    the values outside it mark gaps, defective and overloaded pixels (``finding.sanitise``
    masks them, and DIALS' trusted range, open in the same way, is set from it by the dxtbx
    format).  Below an unsigned type's largest value (:func:`integer_marker`).  Signed integers
    of 16 bits or more: strictly between the type's extremes (writers mark error and overloaded
    pixels with them, and no detector counts 2**31 - 1 in a pixel), and above -1 where the data's
    ``least`` value is one of :data:`SIGNED_MARKS` (photon counts are never negative, and
    pedestal-subtracted data go further below zero).  Anything for other types."""
    marker = integer_marker(dtype)
    if marker is not None:
        return -np.inf, marker
    dtype = np.dtype(dtype)
    if dtype.kind != "i":
        return -np.inf, np.inf
    wide = dtype.itemsize >= 2  # 8-bit data are too narrow to spare their extremes
    low = float(np.iinfo(dtype).min) if wide else -np.inf
    return (-1.0 if least in SIGNED_MARKS else low), (float(np.iinfo(dtype).max) if wide
                                                      else np.inf)


@dataclass
class Frame:
    """One detector readout, split into panels.

    ``event`` is the CrystFEL event id (``"//5"`` is frame 5 of a ``dim0 = %`` stack, ``"//"`` a
    single-frame file); with ``source`` it identifies the frame end to end, through queues, workers
    and writers, so that results can be matched back and reruns can skip what is done.
    ``meta["dtype"]``: the type the frame's data were stored as, kept by a reader that converts
    them to float32 (integer data mark gaps and bad pixels by it: ``finding.sanitise``).
    """

    panels: list[np.ndarray]  # float32, one 2-D (ss, fs) array per panel
    masks: list[np.ndarray] | None = None  # bool, True = good pixel; same shapes as panels
    source: str = ""
    event: str = "//"
    serial: int = 0  # 0-based position of the frame in its source
    geometry: Any = None  # peaknet_xtal.formats.geometry.Geometry when known
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. wavelength_A, dtype

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
    """What a finder made of one frame: the one result type of the finding pipeline.

    Every output is a view of it: :meth:`cxi_row` (CrystFEL's CXI peak columns),
    :meth:`stream_chunk` (a peaks-only CrystFEL stream chunk), :meth:`reflection_table` (DIALS
    strong spots) and :meth:`dials_foreground` (the pixel mask DIALS' threshold step takes).
    """

    frame: Frame
    peaks: np.ndarray  # PEAK_DTYPE
    hit: bool = False
    prob_maps: list[np.ndarray] | None = None  # optional per-panel peak probability
    meta: dict[str, Any] = field(default_factory=dict)
    peak_pixels: list[np.ndarray] | None = None  # optional per-panel pixels of the reported peaks
    peak_boxes: np.ndarray | None = None  # optional (N, 4) fs0, fs1, ss0, ss1 of each peak

    def cxi_row(self, geometry: Any = None, max_peaks: int | None = None
                ) -> tuple[int, dict[str, np.ndarray]]:
        """(peak count, CXI column name -> float32 row) as ``/entry_1/result_1`` stores them."""
        from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS, peak_columns

        counts, columns = peak_columns([self], geometry,
                                       DEFAULT_MAX_PEAKS if max_peaks is None else max_peaks)
        return int(counts[0]), {name: values[0] for name, values in columns.items()}

    def stream_chunk(self, geometry: Any = None) -> Any:
        """A peaks-only CrystFEL stream chunk (``formats.stream.Chunk``) of this frame, with the
        frame's own photon energy (CrystFEL's stream reader refuses a chunk without one; a
        geometry that names an HDF5 path for it has no number to fall back on)."""
        from peaknet_xtal.finding.peaks import frame_clen_m
        from peaknet_xtal.formats.cxi import frame_photon_energy_eV
        from peaknet_xtal.formats.stream import chunk_from_peak_table

        geometry = geometry or self.frame.geometry
        if geometry is None:
            raise ValueError(f"frame {self.frame.source} {self.frame.event}: a stream chunk "
                             "needs a geometry")
        energy = frame_photon_energy_eV(self.frame, geometry)
        # the frame's own camera length where the geometry reads it from the data file
        # (CrystFEL writes average_camera_length for every chunk of a detector it knows)
        clen = frame_clen_m(self.frame) if getattr(geometry, "camera_length_path", None) else None
        return chunk_from_peak_table(self.peaks, geometry, filename=self.frame.source,
                                     event=self.frame.event, serial=self.frame.serial + 1,
                                     hit=self.hit,
                                     photon_energy_eV=energy if np.isfinite(energy) else None,
                                     camera_length_m=geometry.average_camera_length_m(clen))

    def reflection_table(self, z: int = 0, experiment_id: int = 0) -> Any:
        """DIALS strong spots (``flex.reflection_table``) of this frame, image ``z``."""
        from peaknet_xtal.formats.dials_tables import strong_reflection_table

        boxes = None if self.peak_boxes is None else [self.peak_boxes]
        return strong_reflection_table([self.peaks], boxes=boxes, z0=z,
                                       experiment_ids=[experiment_id])

    def dials_foreground(self, dilation: int | None = None) -> list[np.ndarray]:
        """Per panel, the foreground DIALS' threshold step takes (see
        :func:`peaknet_xtal.finding.peaks.dials_foreground`); needs ``peak_pixels``."""
        from peaknet_xtal.finding.peaks import dials_foreground
        from peaknet_xtal.finding.settings import DEFAULTS

        if self.peak_pixels is None:
            raise ValueError("this result kept no peak pixels: find it with with_pixels=True")
        grow = DEFAULTS.dilation if dilation is None else dilation
        return [dials_foreground(np.asarray(panel), pixels, good, grow)
                for panel, pixels, good in zip(self.frame.panels, self.peak_pixels,
                                                self.frame.masks_or_ones(), strict=True)]


#: A masked margin at most this many rows or columns wide along an array's edge is a mask over
#: the panel (DIALS' ``border``, an untrusted first row), not the masked surround of a panel
#: laid out in a larger image: the panel keeps its own edge as where its valid region starts
#: and ends (:func:`valid_span`).
MASKED_EDGE = 4


def valid_span(first: int, stop: int, size: int) -> tuple[int, int]:
    """Where an array's valid region starts and stops along one axis, given its first good
    index ``first`` and one past its last ``stop`` (of ``size``): there, unless a margin is at
    most :data:`MASKED_EDGE` wide, whose side then keeps the array's own edge.

    Why: everything the finding engine anchors (the normalisation's cells, the count dither's
    blocks, the model's 32-px padding) starts at the valid region, so that a panel embedded in
    a larger masked image gives the peaks it gives alone; but a mask of the first row and
    column, or DIALS' ``border=3``, moved that start too, and with it nearly every spot of the
    image (a user trial: 16 of 469 real Pilatus 6M spots kept their place with ``border=3``,
    where DIALS' own finder kept 290 of 290)."""
    return valid_start(first), size - valid_start(size - stop)


def valid_start(first: int) -> int:
    """Where the valid region starts along an axis whose first good index is ``first``
    (:func:`valid_span`): 0 past a masked margin of at most :data:`MASKED_EDGE`."""
    return 0 if first <= MASKED_EDGE else first


def resolved_key(key: tuple[str, str]) -> tuple[str, str]:
    """A frame key (``Frame.key``: source, event) with its source file's symbolic links
    resolved: the frame's identity whatever name its file was given under, for telling the
    frames an earlier run finished.  A run reads each input under the name given (a link named
    with an image number, a geometry beside the link) and records that name; the same file
    given next time by another name, its own or another link's, was found again, its frames
    written twice into one output folder."""
    return _resolved_source(key[0]), key[1]


@functools.lru_cache(maxsize=4096)
def _resolved_source(source: str) -> str:
    """A source naming an existing file, with its links resolved; any other source as it is
    (a psana data source, an in-memory image's name)."""
    return os.path.realpath(source) if source and os.path.exists(source) else source
