"""Label one batch of frames into one part file: the unit of work, resumption and distribution.

:class:`BatchLabeler` is plain Python (no Ray): it reads each frame's image, cuts windows around the
peaks chosen for labelling, hands them to a ``fit_map`` (serial here; an elastic pool of Ray tasks
in :mod:`.distributed`), paints the trusted fits into per-panel label masks and writes everything to
a part file that appears under its final name only when complete.  A frame whose image cannot be
read is recorded with its error, and the batch goes on.
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

    def windows(self, job: FrameJob, panels: list[np.ndarray],
                masks: list[np.ndarray]) -> list[Window]:
        size = int(self.fit_config.get("window", 9))
        panel_ids, fs, ss = self.positions(job)
        out: list[Window] = []
        for p in np.unique(panel_ids):
            if not 0 <= int(p) < len(panels):
                continue  # a panel the image does not have: nothing to fit, nothing to crash on
            sel = panel_ids == p
            out.extend(extract_windows(panels[p], masks[p], fs[sel], ss[sel], size, panel=int(p)))
        return out

    def run(self, batch: Batch, part_path: str | os.PathLike[str],
            fit_map: FitMap = serial_fit_map) -> BatchSummary:
        """Label every frame of the batch into ``part_path`` (atomic: complete or absent)."""
        summary = BatchSummary(batch.index)
        status: dict[str, list[Any]] = {"frame": [], "status": [], "message": []}
        loaded = []
        with FrameLoader() as loader:
            for job in batch.jobs:
                try:
                    frame = loader.load(job.record,
                                        self.geometries.get(job.record.geometry_key))
                except Exception as exc:  # recorded, never fatal: the rest of the batch goes on
                    log.warning("frame %s %s: %s", job.record.image, job.record.event, exc)
                    status["frame"].append(job.number)
                    status["status"].append("image_error")
                    status["message"].append(str(exc))
                    summary.frame_errors += 1
                    continue
                loaded.append((job, frame.panels, frame.masks_or_ones()))
        windows = [self.windows(job, panels, masks) for job, panels, masks in loaded]
        outcomes = self._fit_all(windows, fit_map)
        shape = _max_shape([p for _, panels, _ in loaded for p in panels])
        with LabelWriter(part_path, shape, self.config) as writer:
            for (job, panels, masks), frame_outcomes in zip(loaded, outcomes, strict=False):
                self._write_frame(writer, job, panels, masks, frame_outcomes, summary)
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
                     summary: BatchSummary) -> None:
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
                "mean_redchi": float(redchi.mean()) if len(redchi) else np.nan}))
            fits["row"][on_panel] = row
            summary.rows += 1
        writer.add_fits(fits)


def _max_shape(panels: list[np.ndarray]) -> tuple[int, int]:
    if not panels:
        return (1, 1)
    return (max(p.shape[0] for p in panels), max(p.shape[1] for p in panels))
