"""Label one batch of frames into one part file: the unit of work, resumption and distribution.

:class:`BatchLabeler` is plain Python (no Ray): it reads each frame's image, cuts windows around the
peaks chosen for labelling, hands them to a ``fit_map`` (serial here; an elastic pool of Ray tasks
in :mod:`.distributed`), paints the trusted fits into per-panel label masks and writes everything to
a part file that appears under its final name only when complete.  A frame whose image cannot be
read is recorded with its error, and the batch goes on.

Each window carries its panel's gain (ADU per photon), the fit's noise model
(:func:`.pvoigt.noise_variance`): resolved as every other entry point resolves it
(:func:`peaknet_xtal.finding.settings.resolve_gain`: what the source or geometry declares), and
measured from the background (:class:`peaknet_xtal.finding.gain.GainResolver`) where nothing
real is declared.  A batch measures on its own frames, so a resumed run labels a batch exactly as
an uninterrupted one does.  The gain used is stored per row (``meta/gain``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peaknet_xtal.labelling.ingest import FrameLoader, FrameRecord
from peaknet_xtal.labelling.labels import LABEL_FIT_DTYPE, LabelRow, LabelWriter
from peaknet_xtal.labelling.pvoigt import (
    FitOutcome,
    Window,
    extract_windows,
    fit_windows,
    outcomes_table,
    paint_labels,
)

log = logging.getLogger(__name__)

#: Maps chunks of windows to their outcomes, chunk by chunk, order kept.
FitMap = Callable[[list[list[Window]], dict[str, Any]], list[list[FitOutcome]]]

LABEL_DEFAULTS: dict[str, Any] = {
    "fit_on": "predicted",      # predicted | matched | found: which positions get a window
    "min_i_over_sigma": None,   # predicted reflections below this I/sigma are not fitted
    "panels": "all",            # all | labelled: which panels of an accepted frame are stored
    "chunk_size": 64,           # windows per fit task
}


@dataclass
class FrameJob:
    """A frame accepted for labelling, with its PeakDiff statistics."""

    number: int                  # position among all input frames (for the frames table)
    record: FrameRecord
    stats: dict[str, Any] = field(default_factory=dict)  # precision, recall, n_* counts
    matched_predicted: np.ndarray | None = None


@dataclass
class Batch:
    index: int
    jobs: list[FrameJob]


@dataclass
class BatchSummary:
    index: int
    frames: int = 0
    rows: int = 0
    fits_ok: int = 0
    fits_rejected: int = 0
    frame_errors: int = 0


def serial_fit_map(chunks: list[list[Window]], config: dict[str, Any]) -> list[list[FitOutcome]]:
    """Fit every chunk in this process."""
    return [fit_windows(chunk, config) for chunk in chunks]


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(int(size), 1)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class BatchLabeler:
    """Turns a :class:`Batch` into a part file; ``geometries`` maps a record's geometry_key."""

    def __init__(self, config: dict[str, Any], geometries: dict[str, Any] | None = None) -> None:
        self.config = config
        self.fit_config = dict(config.get("fit", {}))
        self.label_config = {**LABEL_DEFAULTS, **config.get("label", {})}
        self.geometries = geometries or {}

    def positions(self, job: FrameJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(panel, fs, ss) of the peaks to label in this frame."""
        rec = job.record
        mode = self.label_config["fit_on"]
        if mode == "found":
            table = rec.found
        elif mode == "matched":
            index: Any = job.matched_predicted if job.matched_predicted is not None else []
            table = rec.predicted[np.asarray(index, dtype=np.int64)]
        elif mode == "predicted":
            table = rec.predicted
            cut = self.label_config["min_i_over_sigma"]
            if cut is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = table["intensity"] / table["sigma"]
                table = table[ratio >= float(cut)]
        else:
            raise ValueError(f"label.fit_on must be predicted, matched or found, not {mode!r}")
        return (np.asarray(table["panel"]), np.asarray(table["fs"], float),
                np.asarray(table["ss"], float))

    def windows(self, job: FrameJob, panels: list[np.ndarray], masks: list[np.ndarray],
                gains: Sequence[float] | None = None) -> list[Window]:
        """Windows around this frame's peaks, each with its panel's gain (``gains``, ADU per
        photon; None: data in photons)."""
        size = int(self.fit_config.get("window", 9))
        panel_ids, fs, ss = self.positions(job)
        out: list[Window] = []
        for p in np.unique(panel_ids):
            if not 0 <= int(p) < len(panels):
                continue  # a panel the image does not have: nothing to fit, nothing to crash on
            sel = panel_ids == p
            gain = 1.0 if gains is None else float(gains[p])
            out.extend(extract_windows(panels[p], masks[p], fs[sel], ss[sel], size, panel=int(p),
                                       gain=gain))
        return out

    def run(self, batch: Batch, part_path: str | os.PathLike[str],
            fit_map: FitMap = serial_fit_map) -> BatchSummary:
        """Label every frame of the batch into ``part_path`` (atomic: complete or absent)."""
        summary = BatchSummary(batch.index)
        status: dict[str, list[Any]] = {"frame": [], "status": [], "message": []}
        loaded = []
        gains = BatchGains()  # this batch's own: a resumed batch measures what it measured
        with FrameLoader(options=self.config.get("run", {}).get("source_options")) as loader:
            for job in batch.jobs:
                geometry = self.geometries.get(job.record.geometry_key)
                try:
                    frame = loader.load(job.record, geometry)
                except Exception as exc:  # recorded, never fatal: the rest of the batch goes on
                    log.warning("frame %s %s: %s", job.record.image, job.record.event, exc)
                    status["frame"].append(job.number)
                    status["status"].append("image_error")
                    status["message"].append(str(exc))
                    summary.frame_errors += 1
                    continue
                masks = frame.masks_or_ones()
                loaded.append((job, frame.panels, masks, gains(frame, geometry)))
        windows = [self.windows(job, panels, masks, g) for job, panels, masks, g in loaded]
        outcomes = self._fit_all(windows, fit_map)
        shape = _max_shape([p for _, panels, _, _ in loaded for p in panels])
        with LabelWriter(part_path, shape, self.config) as writer:
            for (job, panels, masks, g), frame_outcomes in zip(loaded, outcomes, strict=False):
                self._write_frame(writer, job, panels, masks, frame_outcomes, summary, g)
                status["frame"].append(job.number)
                status["status"].append("labelled")
                status["message"].append("")
                summary.frames += 1
            writer.add_frames({"frame": np.array(status["frame"], dtype=np.int64),
                               "status": np.array(status["status"], dtype=object),
                               "message": np.array(status["message"], dtype=object)},
                              group="batch")
        return summary

    def _fit_all(self, per_frame: list[list[Window]], fit_map: FitMap) -> list[list[FitOutcome]]:
        """Fit all windows of the batch in chunks (so a pool can spread them), then regroup."""
        flat = [w for frame_windows in per_frame for w in frame_windows]
        chunks = chunked(flat, self.label_config["chunk_size"])
        results = [o for chunk in fit_map(chunks, self.fit_config) for o in chunk]
        out, start = [], 0
        for frame_windows in per_frame:
            out.append(results[start:start + len(frame_windows)])
            start += len(frame_windows)
        return out

    def _write_frame(self, writer: LabelWriter, job: FrameJob, panels: list[np.ndarray],
                     masks: list[np.ndarray], outcomes: list[FitOutcome],
                     summary: BatchSummary, gains: Sequence[float]) -> None:
        table = outcomes_table(outcomes)
        fits = np.zeros(len(table), dtype=LABEL_FIT_DTYPE)
        for name in table.dtype.names or ():
            fits[name] = table[name]
        fits["frame"], fits["row"] = job.number, -1
        ok = np.array([o.ok for o in outcomes], dtype=bool)
        summary.fits_ok += int(ok.sum())
        summary.fits_rejected += int((~ok).sum())
        names = job.record.panel_names
        for p, (image, mask) in enumerate(zip(panels, masks, strict=False)):
            on_panel = table["panel"] == p if len(table) else np.zeros(0, bool)
            if self.label_config["panels"] == "labelled" and not (ok & on_panel).any():
                continue
            panel_outcomes = [o for o, here in zip(outcomes, on_panel, strict=False) if here]
            height, width = image.shape
            label = paint_labels((height, width), panel_outcomes) & mask.astype(np.uint8)
            redchi = table["redchi"][on_panel & ok]
            row = writer.add(LabelRow(image, mask, label, {
                **job.stats, "source": job.record.source, "image": job.record.image,
                "event": job.record.event, "frame": job.number, "panel": p,
                "panel_name": names[p] if p < len(names) else str(p),
                "n_fitted": int((on_panel & ok).sum()),
                "n_rejected": int((on_panel & ~ok).sum()),
                "gain": float(gains[p]) if p < len(gains) else np.nan,
                "mean_redchi": float(redchi.mean()) if len(redchi) else np.nan}))
            fits["row"][on_panel] = row
            summary.rows += 1
        writer.add_fits(fits)


class BatchGains:
    """Per-panel gains (ADU per photon) of a batch's frames, for the fits' noise model.

    A real declared gain (the source's, or the geometry's ``adu_per_photon`` / ``adu_per_eV``
    x photon energy; per panel where the geometry says so) is used as is; a missing or
    placeholder one (:func:`peaknet_xtal.finding.gain.is_placeholder`) is measured from the
    frames' background by one :class:`~peaknet_xtal.finding.gain.GainResolver` (the first
    frames' estimates, then fixed), exactly as the finder does.  When neither gives a gain, the
    data are taken to be in photons (gain 1, what the fit assumed before it knew of gains), said
    once in the log.
    """

    def __init__(self) -> None:
        from peaknet_xtal.finding.gain import GainResolver

        self._measure = GainResolver()
        self._warned = False

    def __call__(self, frame: Any, geometry: Any = None) -> list[float]:
        from peaknet_xtal.finding.gain import is_placeholder
        from peaknet_xtal.finding.sanitise import sanitise_frame
        from peaknet_xtal.finding.settings import resolve_gain

        geometry = frame.geometry if frame.geometry is not None else geometry
        n = len(frame.panels)

        def real(value: float | None) -> bool:
            return value is not None and value > 0 and not is_placeholder(value)

        if geometry is not None and len(getattr(geometry, "panels", ())) == n:
            own = [resolve_gain(meta=frame.meta, geometry=geometry, panel=p) for p in range(n)]
            if all(real(g) for g in own):
                return [float(g) for g in own if g is not None]
        declared = resolve_gain(meta=frame.meta, geometry=geometry)
        if declared is not None and real(declared):
            return [float(declared)] * n
        # a gap's marked values are no background (what marks them depends on the stored type)
        goods = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))[1]
        measured = self._measure(declared, frame.panels, goods)
        if measured is None or not measured > 0:
            if not self._warned:
                self._warned = True
                log.warning("%s: no detector gain declared and the background does not show "
                            "one: the fits take the data to be in photons", frame.source
                            or "frame")
            return [1.0] * n
        return [float(measured)] * n


def _max_shape(panels: list[np.ndarray]) -> tuple[int, int]:
    if not panels:
        return (1, 1)
    return (max(p.shape[0] for p in panels), max(p.shape[1] for p in panels))
