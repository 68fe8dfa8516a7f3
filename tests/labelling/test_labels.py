"""The label file: layout peaknet-train reads, atomic writes, merging of part files."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.labelling.labels import (
    LABEL_FIT_DTYPE,
    LabelFile,
    LabelRow,
    LabelWriter,
    merge_label_files,
)


def _row(h, w, value, panel=0):
    label = np.zeros((h, w), np.uint8)
    label[1, 1] = 1
    return LabelRow(np.full((h, w), value, np.float32), np.ones((h, w), bool), label,
                    {"source": "s.stream", "event": f"//{int(value)}", "panel": panel,
                     "precision": 0.9, "n_fitted": 1})


def test_round_trip_and_layout(tmp_path):
    path = tmp_path / "l.h5"
    with LabelWriter(path, (6, 8), {"fit": {"window": 9}}) as out:
        assert out.add(_row(6, 8, 1.0)) == 0
        assert out.add(_row(4, 5, 2.0, panel=3)) == 1
        fits = np.zeros(2, LABEL_FIT_DTYPE)
        fits["row"] = [0, 1]
        out.add_fits(fits)
    with h5py.File(path) as h5:
        assert h5["images"].dtype == np.float32 and h5["images"].shape == (2, 6, 8)
        assert h5["labels"].dtype == np.uint8 and h5["masks"].dtype == np.uint8
        assert h5["images"].chunks == (1, 6, 8) and h5["images"].compression == "gzip"
    with LabelFile(path) as lf:
        assert len(lf) == 2
        image, mask, label = lf[1]
        assert image[:4, :5].min() == 2.0 and image[4:, :].max() == 0.0  # zero padding
        assert mask[:4, :5].all() and not mask[4:, :].any() and not mask[:, 5:].any()
        assert label.sum() == 1
        assert list(lf.meta("event")) == ["//1", "//2"]
        assert list(lf.meta("height")) == [6, 4] and list(lf.meta("panel")) == [0, 3]
        assert np.isnan(lf.meta("recall")).all()
        assert lf.config == {"fit": {"window": 9}}
        assert list(lf.fits["row"]) == [0, 1]


def test_failed_writer_leaves_nothing(tmp_path):
    path = tmp_path / "l.h5"
    with pytest.raises(RuntimeError):
        with LabelWriter(path, (4, 4)) as out:
            out.add(_row(4, 4, 1.0))
            raise RuntimeError("crash mid-batch")
    assert list(tmp_path.iterdir()) == []


def test_not_a_label_file(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as h5:
        h5["images"] = np.zeros((1, 2, 2))
    with pytest.raises(FormatError, match="x.h5"):
        LabelFile(path)


def test_merge_offsets_fit_rows(tmp_path):
    parts = []
    for k in range(2):
        part = tmp_path / f"p{k}.h5"
        with LabelWriter(part, (4, 4 + k)) as out:
            out.add(_row(4, 4 + k, float(k)))
            out.add(_row(4, 4, float(k) + 0.5))
            fits = np.zeros(3, LABEL_FIT_DTYPE)
            fits["row"] = [0, 1, -1]
            out.add_fits(fits)
        parts.append(part)
    n = merge_label_files(parts, tmp_path / "all.h5", {}, {"event": np.array(["//0", "//1"],
                                                                             dtype=object)})
    assert n == 4
    with LabelFile(tmp_path / "all.h5") as lf:
        assert lf.h5["images"].shape == (4, 4, 5)
        assert list(lf.fits["row"]) == [0, 1, -1, 2, 3, -1]
        assert lf[2][0][0, 0] == 1.0 and lf[3][0][0, 0] == 1.5
        assert list(lf.frames("event")) == ["//0", "//1"]
