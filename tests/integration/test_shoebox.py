"""Shoebox extraction: the right pixels, in photons, with edges and bad pixels masked."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.integration.shoebox import Shoeboxes, extract_shoeboxes


def _ramp(height: int = 40, width: int = 50) -> np.ndarray:
    return (np.arange(height)[:, None] * 1000 + np.arange(width)[None, :]).astype(np.float32)


def test_box_is_centred_on_the_nearest_pixel_and_divided_by_the_gain():
    image = _ramp()
    boxes = extract_shoeboxes([image], None, np.array([0]), np.array([20.4]), np.array([10.6]),
                              gain=4.0, radius=2)
    assert boxes.pixels.shape == (1, 5, 5) and boxes.mask.all()
    # centre pixel (ss 11, fs 20), corner (ss 9, fs 18), in photons
    assert boxes.pixels[0, 2, 2] == pytest.approx((11 * 1000 + 20) / 4)
    assert boxes.pixels[0, 0, 0] == pytest.approx((9 * 1000 + 18) / 4)
    np.testing.assert_allclose(boxes.offset[0], [0.4, -0.4], atol=1e-6)


def test_off_panel_and_bad_pixels_are_masked_and_zero():
    image = _ramp()
    good = np.ones(image.shape, bool)
    good[0, 1] = False
    boxes = extract_shoeboxes([image], [good], np.array([0, 0]), np.array([1.0, np.nan]),
                              np.array([1.0, 3.0]), radius=3)
    m = boxes.mask[0]
    assert not m[:2, :].any() and not m[:, :2].any()  # rows/columns -2 and -1 are off the panel
    assert not m[2, 3]  # pixel (ss 0, fs 1) is bad
    assert m[3:, 3:].all() and m[2, 2] and m[2, 4]
    assert (boxes.pixels[0][~m] == 0).all()
    assert not boxes.mask[1].any()  # a non-finite position gives an empty box


def test_metadata_from_the_geometry(make_geometry_text):
    from peaknet_xtal.formats.geometry import parse_geometry

    geometry = parse_geometry(make_geometry_text(["a", "b"], 64, 32, [(-32, 2), (32, -2)],
                                                 flipped={"b"}))
    panels = [np.zeros((32, 64), np.float32)] * 2
    boxes = extract_shoeboxes(panels, None, np.array([0, 1]), np.array([60.0, 60.0]),
                              np.array([30.0, 30.0]), geometry=geometry)
    assert (boxes.one_over_d > 0).all()
    # panel a: pixel (60, 30) sits right of and above the beam -> radial points +fs, +ss
    assert boxes.radial[0, 0] > 0.5 and boxes.radial[0, 1] > 0
    # panel b is flipped: both its axes point the other way in the lab
    assert boxes.radial[1, 0] > 0.5 and boxes.radial[1, 1] > 0
    np.testing.assert_allclose(np.hypot(*boxes.radial.T), 1.0, rtol=1e-6)


def test_select_and_concatenate_keep_rows_together():
    image = _ramp()
    boxes = extract_shoeboxes([image], None, np.array([0, 0, 0]), np.array([5.0, 10.0, 15.0]),
                              np.array([5.0, 5.0, 5.0]), radius=1)
    boxes.extra = {"tag": np.array([1, 2, 3])}
    both = Shoeboxes.concatenate([boxes.select([2]), boxes.select([0])])
    assert both.extra["tag"].tolist() == [3, 1]
    assert both.pixels[0, 1, 1] == image[5, 15] and both.fs.tolist() == [15.0, 5.0]


def test_bad_gain_is_an_error():
    with pytest.raises(ValueError, match="gain"):
        extract_shoeboxes([_ramp()], None, np.array([0]), np.array([1.0]), np.array([1.0]),
                          gain=0.0)


def test_neighbours_split_their_shared_pixels_along_the_bisector():
    from peaknet_xtal.integration.shoebox import owned_pixels

    image = np.ones((60, 60), np.float32)
    # spots 0 and 1 are 4 pixels apart in fs on panel 0; spot 2 is far away; spot 3 sits where
    # spot 0 is but on another panel, so it takes nothing from it
    panel, fs, ss = np.array([0, 0, 0, 1]), np.array([20.0, 24.0, 50.0, 20.0]), np.full(4, 20.0)
    boxes = extract_shoeboxes([image, image], None, panel, fs, ss, radius=3)
    owned = boxes.owned
    assert owned is not None and owned.shape == (4, 7, 7)
    np.testing.assert_array_equal(owned, owned_pixels(panel, fs, ss, radius=3))
    cols = np.arange(-3, 4)  # box columns, fs offsets from the centre
    # box 0: columns nearer to fs 24 than to fs 20 (offset > 2) go to spot 1; offset 2 is a tie
    assert owned[0][:, cols <= 2].all() and not owned[0][:, cols > 2].any()
    assert owned[1][:, cols >= -2].all() and not owned[1][:, cols < -2].any()
    assert owned[2].all() and owned[3].all()
    assert boxes.mask.all()  # detector validity is untouched: summation still reads every pixel
    np.testing.assert_array_equal(boxes.vi_mask(), boxes.mask & owned)
    # selections and concatenations keep the split; boxes cut without it own everything
    assert (boxes.select([1]).owned == owned[[1]]).all()
    plain = extract_shoeboxes([image], None, np.array([0, 0]), np.array([20.0, 24.0]),
                              np.full(2, 20.0), radius=3, neighbours=False)
    assert plain.owned is None and plain.vi_mask().all()
    both = Shoeboxes.concatenate([boxes, plain])
    assert both.owned is not None and both.owned[4:].all() and (both.owned[:4] == owned).all()
