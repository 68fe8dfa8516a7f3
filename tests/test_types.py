from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.types import PEAK_DTYPE, Frame, empty_peaks, peaks_from_columns


def test_empty_peaks_fills_floats_with_nan_and_ints_with_zero():
    table = empty_peaks(3)
    assert table.dtype == PEAK_DTYPE
    assert np.isnan(table["snr"]).all()
    assert (table["npix"] == 0).all() and (table["panel"] == 0).all()


def test_peaks_from_columns_sets_given_columns_only():
    table = peaks_from_columns(panel=[1, 2], fs=[3.5, 4.0], ss=[1.0, 2.0])
    assert table["panel"].tolist() == [1, 2]
    assert table["fs"].tolist() == [3.5, 4.0]
    assert np.isnan(table["intensity"]).all()


def test_peaks_from_columns_rejects_ragged_and_unknown_columns():
    with pytest.raises(ValueError, match="differ in length"):
        peaks_from_columns(fs=[1.0, 2.0], ss=[1.0])
    with pytest.raises(KeyError, match="unknown peak column"):
        peaks_from_columns(colour=[1])


def test_frame_key_and_default_masks():
    frame = Frame(panels=[np.zeros((4, 5), np.float32), np.ones((2, 3), np.float32)],
                  source="run.cxi", event="//7")
    assert frame.key == ("run.cxi", "//7")
    masks = frame.masks_or_ones()
    assert [m.shape for m in masks] == [(4, 5), (2, 3)]
    assert all(m.dtype == bool and m.all() for m in masks)
