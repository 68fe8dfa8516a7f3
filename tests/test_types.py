from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.types import (
    PEAK_DTYPE,
    Frame,
    count_range,
    empty_peaks,
    integer_marker,
    peaks_from_columns,
)


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


def test_frame_result_views_cxi_row_stream_chunk_and_dials_foreground(make_geometry_text):
    """The one result type turns into each writer's form; the DIALS foreground is the reported
    peaks' pixels grown by the dilation within the mask."""
    from peaknet_xtal.finding.peaks import find_peaks
    from peaknet_xtal.formats.geometry import parse_geometry
    from peaknet_xtal.types import Frame, FrameResult

    geometry = parse_geometry(make_geometry_text(["p0", "p1"], 20, 16, [(0.0, 0.0), (0.0, 30.0)],
                                                 adu_per_photon="1"))
    rng = np.random.default_rng(0)
    panels = [rng.normal(10, 1, (16, 20)).astype(np.float32) for _ in range(2)]
    panels[1][5, 7] = 200.0
    probs = [np.zeros((16, 20), np.float32), np.zeros((16, 20), np.float32)]
    probs[1][5, 7] = 1.0
    masks = [np.ones((16, 20), bool), np.ones((16, 20), bool)]
    masks[1][4, :] = False  # the rim row above the peak is masked out
    peaks, pixels = find_peaks(panels, probs, masks, with_pixels=True)
    assert len(peaks) == 1 and pixels[1][5, 7] and pixels[1].sum() == 1 and not pixels[0].any()
    result = FrameResult(Frame(panels=panels, masks=masks, geometry=geometry, source="x.h5",
                               event="//3", serial=3), peaks, hit=True, peak_pixels=pixels)
    count, row = result.cxi_row()
    assert count == 1 and row["peakXPosRaw"][0] == pytest.approx(7, abs=0.05)
    assert row["peakYPosRaw"][0] == pytest.approx(16 + 5, abs=0.05)  # slab row of panel 1
    chunk = result.stream_chunk()
    assert chunk.event == "//3" and len(chunk.peaks) == 1
    (none, grown) = result.dials_foreground(dilation=1)
    assert not none.any() and grown.sum() == 6 and grown[5:7, 6:9].all()


def test_stream_chunk_carries_the_frame_s_own_photon_energy(make_geometry_text):
    """A geometry that reads the photon energy from the file per frame has no number for the
    chunk: the frame's own energy is written, as CrystFEL's stream reader needs one a chunk."""
    from peaknet_xtal.formats.geometry import HC_EV_A, parse_geometry
    from peaknet_xtal.types import FrameResult

    text = make_geometry_text(["p0"], 20, 16, [(0.0, 0.0)], adu_per_photon="1",
                              photon_energy="/LCLS/photon_energy_eV")
    geometry = parse_geometry(text)
    frame = Frame(panels=[np.zeros((16, 20), np.float32)], geometry=geometry, source="x.h5",
                  event="//0", meta={"wavelength_A": HC_EV_A / 9321.5})
    chunk = FrameResult(frame, empty_peaks(0), hit=False).stream_chunk()
    assert chunk.photon_energy_eV == pytest.approx(9321.5)
    unknown = Frame(panels=frame.panels, geometry=geometry, source="x.h5", event="//1")
    assert FrameResult(unknown, empty_peaks(0), hit=False).stream_chunk().photon_energy_eV is None


@pytest.mark.parametrize("dtype, marker", [(np.uint16, 65535.0), (np.uint32, 4294967295.0),
                                           (np.uint8, None), (np.int16, None), (np.int32, None),
                                           (np.float32, None)])
def test_integer_marker_of_each_type(dtype, marker):
    assert integer_marker(dtype) == marker


@pytest.mark.parametrize("dtype, least, expected", [
    (np.uint16, 0.0, (-np.inf, 65535.0)),  # below the marker, whatever the least value
    (np.uint32, None, (-np.inf, 4294967295.0)),
    (np.int32, -1.0, (-1.0, 2147483647.0)),  # signed photon counts with gaps
    (np.int32, -2.0, (-1.0, 2147483647.0)),  # ... and defective pixels
    (np.int32, -3.0, (-2147483648.0, 2147483647.0)),  # pedestal-subtracted: negatives are data
    (np.int16, 0.0, (-32768.0, 32767.0)),  # the extremes mark errors and overloads
    (np.int32, None, (-2147483648.0, 2147483647.0)),
    (np.int8, -1.0, (-1.0, np.inf)),  # -1/-2 marks at any width, the extremes from 16 bits
    (np.int8, -5.0, (-np.inf, np.inf)),
    (np.float32, -1.0, (-np.inf, np.inf)),  # float data mark with NaN, not values
    (np.uint8, 255.0, (-np.inf, np.inf)),  # too narrow to spare a value
])
def test_count_range_of_each_type_and_least_value(dtype, least, expected):
    assert count_range(dtype, least) == expected


def test_a_thin_masked_margin_keeps_the_arrays_edge_a_wider_one_does_not():
    """valid_span: a masked margin of up to MASKED_EDGE rows or columns (a border mask) keeps
    the array's own edge on that side; a wider one (a panel laid out in a larger image) moves
    the valid region's start and stop to the good pixels."""
    from peaknet_xtal.types import MASKED_EDGE, valid_span

    assert valid_span(0, 100, 100) == (0, 100)
    assert valid_span(MASKED_EDGE, 100 - MASKED_EDGE, 100) == (0, 100)
    assert valid_span(MASKED_EDGE + 1, 100 - MASKED_EDGE - 1, 100) == (MASKED_EDGE + 1,
                                                                        100 - MASKED_EDGE - 1)
    assert valid_span(2, 60, 100) == (0, 60)
