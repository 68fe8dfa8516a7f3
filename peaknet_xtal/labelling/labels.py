"""The label dataset: what ``stream2labels`` writes and ``peaknet-train`` reads.

Layout of one HDF5 file (every array chunked one row at a time and gzip-compressed):

==========================  =================  ==================================================
``images``                  (N, H, W) float32  one detector panel per row (zero-padded to H, W)
``masks``                   (N, H, W) uint8    1 = good pixel (0 for bad pixels and padding)
``labels``                  (N, H, W) uint8    1 = Bragg peak pixel (half-max of a trusted fit)
``meta/<column>``           (N,)               source, image, event, panel, panel_name, height,
                                               width, precision, recall, n_found, n_predicted,
                                               n_matched, n_fitted, n_rejected, mean_redchi,
                                               gain (ADU per photon the fits' noise model used)
``fits``                    (M,) FIT_DTYPE     every attempted fit, with ``row`` (its image row,
                                               -1 for panels not stored) and ``frame``
``frames/<column>``         (F,)               PeakDiff statistics of every indexed input frame
                                               (with peak and reflection lists), accepted or not
                                               (written by the driver at the end)
==========================  =================  ==================================================

Attributes: ``format = "peaknet-labels"``, ``version``, ``fit_status`` (names of the fit status
codes), ``config`` (JSON of the run settings).  A row is one panel of one frame so that multi-panel
detectors need no geometry to train on; ``height``/``width`` say how much of a padded row is real.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.errors import FormatError
from peaknet_xtal.labelling.pvoigt import FIT_DTYPE, STATUS

FORMAT = "peaknet-labels"
VERSION = 1

LABEL_FIT_DTYPE = np.dtype([("row", np.int64), ("frame", np.int64)] + FIT_DTYPE.descr)

STR_META = ("source", "image", "event", "panel_name")
INT_META = ("frame", "panel", "height", "width", "n_found", "n_predicted", "n_matched", "n_fitted",
            "n_rejected")
FLOAT_META = ("precision", "recall", "mean_redchi", "gain")


@dataclass
class LabelRow:
    """One panel of one frame, ready to store."""

    image: np.ndarray   # float32 (h, w)
    mask: np.ndarray    # bool (h, w), True = good
    label: np.ndarray   # uint8 (h, w)
    meta: dict[str, Any] = field(default_factory=dict)


def _str_dtype() -> Any:
    return h5py.string_dtype(encoding="utf-8")


class LabelWriter:
    """Appends rows to a label file being built under a temporary name; ``close`` publishes it.

    Use as a context manager: on an exception the partial file is discarded, so a final name
    always holds a complete file (what makes per-batch part files safe to resume from).
    """

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, int],
                 config: dict[str, Any] | None = None, compression: int = 4) -> None:
        self.path = os.fspath(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.h5 = h5py.File(self._tmp, "w")
        self.n = 0
        self._fits: list[np.ndarray] = []
        self._meta: dict[str, list[Any]] = {k: [] for k in STR_META + INT_META + FLOAT_META}
        h, w = self.shape
        opts = {"chunks": (1, h, w), "compression": "gzip", "compression_opts": compression,
                "shuffle": True}
        self.h5.create_dataset("images", (0, h, w), maxshape=(None, h, w), dtype=np.float32, **opts)
        self.h5.create_dataset("masks", (0, h, w), maxshape=(None, h, w), dtype=np.uint8, **opts)
        self.h5.create_dataset("labels", (0, h, w), maxshape=(None, h, w), dtype=np.uint8, **opts)
        self.h5.attrs.update({"format": FORMAT, "version": VERSION,
                              "fit_status": json.dumps(list(STATUS)),
                              "config": json.dumps(config or {}, default=str)})

    def add(self, row: LabelRow) -> int:
        """Store one row (padding it to the file's shape); returns its row index."""
        h, w = row.image.shape
        if h > self.shape[0] or w > self.shape[1]:
            raise ValueError(f"row of shape {(h, w)} does not fit the file's {self.shape}")
        for name in ("images", "masks", "labels"):
            self.h5[name].resize(self.n + 1, axis=0)
        padded = np.zeros(self.shape, dtype=np.float32)
        padded[:h, :w] = row.image
        self.h5["images"][self.n] = padded
        padded = np.zeros(self.shape, dtype=np.uint8)
        padded[:h, :w] = row.mask
        self.h5["masks"][self.n] = padded
        padded = np.zeros(self.shape, dtype=np.uint8)
        padded[:h, :w] = row.label
        self.h5["labels"][self.n] = padded
        meta = {"height": h, "width": w, **row.meta}
        for key, values in self._meta.items():
            default = "" if key in STR_META else (-1 if key in INT_META else np.nan)
            values.append(meta.get(key, default))
        self.n += 1
        return self.n - 1

    def add_fits(self, fits: np.ndarray) -> None:
        """Fit records (LABEL_FIT_DTYPE) of this file's rows, failures included."""
        if len(fits):
            self._fits.append(np.asarray(fits, dtype=LABEL_FIT_DTYPE))

    def add_frames(self, columns: dict[str, np.ndarray], group: str = "frames") -> None:
        """Per-frame columns: PeakDiff of the whole run (``frames``) or a batch's frame status."""
        target = self.h5.require_group(group)
        for key, values in columns.items():
            values = np.asarray(values)
            if values.dtype.kind in "OUS":
                target.create_dataset(key, data=values.astype(object), dtype=_str_dtype())
            else:
                target.create_dataset(key, data=values)

    def close(self) -> None:
        """Write the metadata and fit table, then move the file to its final name."""
        group = self.h5.require_group("meta")
        for key, values in self._meta.items():
            if key in STR_META:
                group.create_dataset(key, data=np.array(values, dtype=object), dtype=_str_dtype())
            else:
                dtype = np.int64 if key in INT_META else np.float64
                group.create_dataset(key, data=np.array(values, dtype=dtype))
        fits = np.concatenate(self._fits) if self._fits else np.zeros(0, LABEL_FIT_DTYPE)
        self.h5.create_dataset("fits", data=fits, compression="gzip")
        self.h5.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self.h5.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> LabelWriter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class LabelFile:
    """Read access to a label file: ``len``, ``file[i] -> (image, mask, label)``, ``meta``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise FormatError(self.path, f"not a readable HDF5 file ({exc})") from exc
        if self.h5.attrs.get("format") != FORMAT:
            self.h5.close()
            raise FormatError(self.path, f"not a {FORMAT} file (attribute 'format' missing)")
        for name in ("images", "masks", "labels"):
            if name not in self.h5:
                self.h5.close()
                raise FormatError(self.path, "dataset missing", dataset=name)

    def __len__(self) -> int:
        return int(self.h5["images"].shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.h5["images"][i], self.h5["masks"][i].astype(bool),
                self.h5["labels"][i])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def meta(self, key: str) -> np.ndarray:
        values = self.h5["meta"][key]
        if h5py.check_string_dtype(values.dtype):
            return np.array(values.asstr()[()], dtype=object)
        return values[()]

    def frames(self, key: str, group: str = "frames") -> np.ndarray:
        values = self.h5[group][key]
        if h5py.check_string_dtype(values.dtype):
            return np.array(values.asstr()[()], dtype=object)
        return values[()]

    @property
    def fits(self) -> np.ndarray:
        return self.h5["fits"][()]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.h5.attrs.get("config", "{}"))

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> LabelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_label_files(parts: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str],
                      config: dict[str, Any] | None = None,
                      frames: dict[str, np.ndarray] | None = None) -> int:
    """Concatenate part files (in order) into one label file, atomically; returns rows written.

    Fit records keep pointing at their rows (offsets are added); ``frame`` indices are global
    already.  Parts may be padded to different shapes: the output takes the largest.
    """
    shapes = []
    for part in parts:
        with LabelFile(part) as lf:
            shapes.append(lf.h5["images"].shape[1:])
    shape = (max((s[0] for s in shapes), default=1), max((s[1] for s in shapes), default=1))
    with LabelWriter(path, shape, config) as out:
        for part in parts:
            with LabelFile(part) as lf:
                offset = out.n
                _copy_rows(lf, out)
                fits = lf.fits
                if len(fits):
                    fits = fits.copy()
                    fits["row"] = np.where(fits["row"] >= 0, fits["row"] + offset, -1)
                    out.add_fits(fits)
        if frames is not None:
            out.add_frames(frames)
        return out.n


def _copy_rows(lf: LabelFile, out: LabelWriter) -> None:
    metas = {key: lf.meta(key) for key in STR_META + INT_META + FLOAT_META if key in lf.h5["meta"]}
    for i in range(len(lf)):
        image, mask, label = lf[i]
        h, w = int(metas["height"][i]), int(metas["width"][i])
        meta = {key: values[i] for key, values in metas.items()}
        out.add(LabelRow(image[:h, :w], mask[:h, :w], label[:h, :w], meta))
