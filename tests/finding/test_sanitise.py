"""Unusable pixel values are masked and counted where frames enter the engine, never summed."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.finding.sanitise import ABSURD, MAX_WARNINGS, sanitise_frame
from peaknet_xtal.types import Frame


def _background(shape=(64, 96), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, shape).astype(np.float32)


def test_counts_and_masks_nonfinite_and_absurd_pixels_only():
    image = _background()
    image[1, 1], image[2, 2], image[3, 3] = np.nan, np.inf, -np.inf
    image[4, :] = np.finfo(np.float32).max
    image[5, 5] = 3e38
    image[6, 6] = ABSURD / 2  # huge but summable: kept
    mask = np.ones(image.shape, bool)
    mask[1, 1] = False  # already masked: not counted again
    (out,), (good,), check = sanitise_frame([image], [mask])
    assert check.nonfinite == 2 and check.absurd == image.shape[1] + 1
    assert not good[2, 2] and not good[4].any() and not good[5, 5] and good[6, 6]
    assert good.sum() == mask.sum() - check.masked
    assert out is image or np.array_equal(out, image, equal_nan=True)  # pixels never changed
    assert check.offset is None


def test_all_nan_frame_is_reported_as_empty():
    image = np.full((8, 8), np.nan, np.float32)
    _, (good,), check = sanitise_frame([image], None)
    assert check.usable == 0 and not good.any()
    assert "no usable pixel" in check.describe()


def test_a_constant_negative_offset_is_reported_not_a_noisy_zero_background():
    _, _, check = sanitise_frame([_background() - 1000.0], None)
    assert check.offset == pytest.approx(-997.0, abs=2)
    _, _, check = sanitise_frame([_background() - 3.0], None)  # pedestal-subtracted noise
    assert check.offset is None


@pytest.mark.parametrize("bad", ["boolean", "strings"])
def test_non_numeric_panels_are_refused(bad):
    image = np.zeros((4, 4), bool) if bad == "boolean" else np.full((4, 4), "x")
    with pytest.raises(ValueError, match="must be numbers"):
        sanitise_frame([image.astype(bool) if bad == "boolean" else image], None)


def test_engine_never_hands_unusable_pixels_to_the_model_and_warns_per_frame(caplog):
    """The predictor sees the masks; its inputs at good pixels are all finite and summable, and
    one warning per affected frame names its source, up to MAX_WARNINGS frames."""
    seen = []

    def predictor(panels, masks):
        for p, m in zip(panels, masks, strict=True):
            seen.append(bool(np.all(np.isfinite(p[m])) and np.all(np.abs(p[m]) <= ABSURD)))
        return [np.zeros(p.shape, np.float32) for p in panels]

    frames = []
    for i in range(MAX_WARNINGS + 3):
        image = _background(seed=i)
        image[10, 10 + i] = 3e38
        image[20, 20] = np.nan
        frames.append(Frame(panels=[image], source="run.cxi", event=f"//{i}"))
    engine = InferenceEngine(predictor=predictor, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal.finding.sanitise"):
        results = list(engine.find_frames(frames))
    assert len(results) == len(frames) and all(seen)
    named = [r.getMessage() for r in caplog.records if "run.cxi //" in r.getMessage()]
    assert len(named) == MAX_WARNINGS and "1 non-finite and 1 absurd" in named[0]
    assert engine.sanitised.as_dict()["frames"] == len(frames)
    assert engine.sanitised.absurd == len(frames)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
                  elements=st.one_of(st.floats(-1e4, 1e4, width=32),
                                     st.sampled_from([float(np.float32(v)) for v in (
                                         np.nan, np.inf, -np.inf, 3e38, -3e38, 2e19,
                                         np.finfo(np.float32).max)]))))
def test_no_unusable_pixel_passes_and_every_usable_one_does(image):
    """Property: the good mask is exactly 'finite and summable', and the counts add up."""
    (_,), (good,), check = sanitise_frame([image], None)
    usable = np.isfinite(image) & (np.abs(image) <= ABSURD)
    assert np.array_equal(good, usable)
    assert check.nonfinite + check.absurd + check.usable == image.size
    if good.any():  # whatever survives can be summed and squared in float32 without overflow
        with np.errstate(over="raise"):
            values = image[good].astype(np.float32)
            np.sum(values * values / np.float32(image.size))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_unsigned_integer_data_lose_their_marker_pixels(dtype):
    """Gaps and bad pixels at the type's largest value are masked and counted; values below it
    are counts (in uint32 those float32 tells apart from it: 256 below); the pixels themselves
    are kept as they were."""
    marker = np.iinfo(dtype).max
    image = np.random.default_rng(1).poisson(3.0, (32, 48)).astype(dtype)
    image[10, :] = marker
    image[20, 5] = marker - (1 if dtype == np.uint16 else 256)
    mask = np.ones(image.shape, bool)
    mask[10, :4] = False  # already masked: not counted again
    (out,), (good,), check = sanitise_frame([image], [mask])
    assert check.marked == 48 - 4 and f"at {marker}, the largest value" in check.describe()
    assert not good[10].any() and good[20, 5] and good.sum() == mask.sum() - 44
    np.testing.assert_array_equal(out, image.astype(np.float32))


def test_a_reader_passes_the_type_of_data_it_made_float():
    image = np.full((8, 8), 65535.0, np.float32)
    image[:4] = 7.0
    _, (good,), check = sanitise_frame([image], None)  # float data: 65535 is a count
    assert good.all() and check.marked == 0
    _, (good,), check = sanitise_frame([image], None, dtype="uint16")
    assert good.sum() == 32 and check.marked == 32


@pytest.mark.parametrize("least, masked", [(-1, True), (-2, True), (-3, False), (0, False)])
def test_signed_counts_lose_their_gaps_and_bad_pixels(least, masked):
    """Pilatus-style int32: -1 in gaps, -2 on bad pixels, counts never negative; data whose
    values go further below zero are pedestal-subtracted and keep them."""
    image = np.random.default_rng(2).poisson(2.0, (32, 48)).astype(np.int32)
    image[5, :] = -1 if least < 0 else 0
    image[7, 7] = least
    _, (good,), check = sanitise_frame([image], None)
    assert check.marked == (49 if masked else 0)
    assert good[5].any() != masked and good[7, 7] != masked
    if masked:  # and only the marks the data hold: none at the type's largest value
        assert "below zero" in check.describe() and "largest value" not in check.describe()
    _, (good_float,), _ = sanitise_frame([image.astype(np.float32)], None, dtype="int32")
    np.testing.assert_array_equal(good_float, good)


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_signed_integer_data_lose_their_extreme_values(dtype):
    """The extremes of a signed type mark errors and overloads (no detector counts 2**31 - 1);
    values inside them that float32 tells apart (int32: 256 inside) are counts."""
    info = np.iinfo(dtype)
    step = 1 if dtype == np.int16 else 256
    image = np.random.default_rng(3).poisson(5.0, (16, 40)).astype(dtype) - 20
    image[3, :] = info.max
    image[4, :5] = info.min
    image[6, 6] = info.max - step
    image[7, 7] = info.min + step
    _, (good,), check = sanitise_frame([image], None)
    assert not good[3].any() and not good[4, :5].any() and good[6, 6] and good[7, 7]
    assert f"at {info.max}, the largest value" in check.describe()
    assert check.marked == 40 + 5



def test_engine_finds_the_same_peaks_with_gaps_marked_or_masked(one_torch_thread):
    """uint16 data with a gap row at 65535, and int32 data with it at -1, give the peaks (and the
    gain measured from the data) of the same pixels as float32 with the gap masked."""
    from peaknet_xtal.finding import PeakFinder

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:192, 0:224]
    expected = np.full(yy.shape, 4.0)
    for cy, cx in rng.uniform(12, 180, (12, 2)):
        expected += 300 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    image = rng.poisson(expected).astype(np.uint16)
    image[96:98, :] = 65535
    signed = image.astype(np.int32)
    signed[96:98, :] = -1
    found = []
    for data, mask in ((image, None), (signed, None), (image.astype(np.float32), image != 65535)):
        finder = PeakFinder("default", threads=1)
        found.append((finder.find(data, mask=mask), finder.engine._gain_from_data.estimate))
    (masked, gain_masked) = found[-1]
    assert len(masked) >= 8 and not np.any(np.abs(masked["ss"] - 96.5) < 2)
    for marked, gain_marked in found[:-1]:
        assert gain_marked == gain_masked
        np.testing.assert_array_equal(marked[["ss", "fs", "snr"]], masked[["ss", "fs", "snr"]])


def test_the_type_whole_number_pixels_imply_marks_as_that_type_would():
    """Readers that hand counts over as floats (dxtbx: 32-bit integers whatever was stored)
    say no type: whole numbers within 0..65535 are 16-bit data (65535 marks), from -2 up
    signed photon counts (-1 and -2 mark), anything else none: pedestal-subtracted data keep
    every pixel, as they do handed over as float arrays."""
    from peaknet_xtal.finding.sanitise import implied_dtype

    counts = np.array([[0.0, 3.0], [65535.0, np.nan]], np.float32)
    assert implied_dtype([counts]) == "uint16"
    assert implied_dtype([counts, np.array([[-1.0, 7.0]], np.float32)]) == "int32"
    assert implied_dtype([counts, np.array([[0.5]], np.float32)]) is None  # not counts
    assert implied_dtype([counts, np.array([[-3.0]], np.float32)]) is None  # pedestal gone
    assert implied_dtype([np.array([[3e9]], np.float32)]) is None  # beyond 32 bits
    assert implied_dtype([np.full((2, 2), np.nan, np.float32)]) is None
    assert implied_dtype([np.array([[1, 2]], np.int16)]) is None  # its own type says it
    goods = sanitise_frame([counts], None, implied_dtype([counts]))[1][0]
    assert goods.tolist() == [[True, True], [False, False]]


def test_signed_counts_are_judged_by_the_least_value_of_the_whole_frame():
    """-1 and -2 mark gaps and bad pixels where they are the least values of photon counts;
    pedestal-subtracted data reach far lower (an LCLS CSPAD CBF: -5136), and a panel of them
    whose noise happens to stop at -2 had its negative pixels masked, with a warning about
    gaps the data do not have.  The whole frame decides."""
    integrating = [np.array([[-2, 0, 5], [-1, 3, 9]], np.int32),
                   np.array([[-5136, 40, 7], [2, -30, 1]], np.int32)]
    goods, check = sanitise_frame(integrating, None)[1:]
    assert all(g.all() for g in goods) and check.marked == 0
    counting = [np.array([[-2, 0, 5], [-1, 3, 9]], np.int32),
                np.array([[0, 40, 7], [2, -1, 1]], np.int32)]
    goods, check = sanitise_frame(counting, None)[1:]
    assert goods[0].tolist() == [[False, True, True], [False, True, True]]
    assert goods[1].tolist() == [[True, True, True], [True, False, True]] and check.marked == 3
