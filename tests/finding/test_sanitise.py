"""Unusable pixel values are masked and counted where frames enter the engine, never summed."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.finding.sanitise import (
    ABSURD,
    MAX_WARNINGS,
    MIN_ONE_VALUE,
    SanitiseTally,
    describe_tally,
    sanitise_frame,
)
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


def test_a_pedestal_subtracted_twice_is_reported_per_panel_where_pedestals_differ():
    """Pedestals that differ by ASIC, subtracted twice: the frame's median stays within the
    spread they make, but each panel's own median lies far below its own spread."""
    rng = np.random.default_rng(5)
    pedestals = np.linspace(300.0, 3000.0, 8)
    twice = [_background(seed=i) - p - rng.normal(0.0, 20.0, (64, 96))
             for i, p in enumerate(pedestals)]
    _, _, check = sanitise_frame(twice, None)
    assert check.offset_panels == list(range(8))
    assert check.offset == pytest.approx(-3000.0, abs=30)
    said = check.describe(names=[f"q0a{i}" for i in range(8)])
    assert "8 panel(s) (in q0a0, q0a1" in said and "pedestal subtracted twice" in said
    once = [_background() + 40.0 * i for i in range(8)]  # offsets above zero: photons or not
    once[3] = once[3] - 2000.0  # one ASIC far below zero
    _, _, check = sanitise_frame(once, None)
    assert check.offset_panels == [3] and check.offset == float(np.median(once[3]))
    _, _, check = sanitise_frame([_background() - 3.0 for _ in range(8)], None)
    assert check.offset is None and check.offset_panels == []


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
    """Property: the good mask is exactly 'finite and summable' (none where those pixels, at
    least MIN_ONE_VALUE of them, all hold one value: no data), and the counts add up."""
    (_,), (good,), check = sanitise_frame([image], None)
    usable = np.isfinite(image) & (np.abs(image) <= ABSURD)
    one_value = usable.sum() >= MIN_ONE_VALUE and np.unique(image[usable]).size == 1
    assert np.array_equal(good, usable & (not one_value))
    assert check.no_data == one_value
    assert check.nonfinite + check.absurd + check.one_value + check.usable == image.size
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


# ---- panels and frames of one value: no data ---------------------------------------------

def _integrating(n_panels=4, shape=(40, 48), seed=5) -> list[np.ndarray]:
    """Pedestal-subtracted integrating-detector panels: noise around 0, fractions of an ADU."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 3.0, shape).astype(np.float32) for _ in range(n_panels)]


def _counting(n_panels=4, shape=(40, 48), seed=6, rate=0.05) -> list[np.ndarray]:
    """Photon counts of a weak background (most pixels 0), as an Eiger stores them."""
    rng = np.random.default_rng(seed)
    return [rng.poisson(rate, shape).astype(np.uint32) for _ in range(n_panels)]


@pytest.mark.parametrize("value", [0.0, 1000.0])
def test_a_panel_of_one_value_carries_no_data_and_is_masked_named(value):
    """A module whose read-out dropped (all 0) or stuck (one constant) is masked as NaN pixels
    are, and the warning names it; the other panels keep every pixel."""
    panels = _integrating()
    panels[2][:] = value
    mask = np.ones(panels[2].shape, bool)
    mask[0, :5] = False  # already masked: the panel's valid pixels are the rest
    (_, _, out, _), goods, check = sanitise_frame(panels, [mask] * 4)
    assert out is panels[2] or np.array_equal(out, panels[2])  # pixels never changed
    assert not goods[2].any() and all(goods[i].sum() == mask.sum() for i in (0, 1, 3))
    assert check.flat_panels == [(2, value)] and check.one_value == mask.sum()
    assert not check.no_data and check.usable == 3 * mask.sum()
    said = check.describe(["q0", "q1", "q2", "q3"])
    assert "(in q2)" in said and f"holds one value ({value:g}): no data" in said
    assert "(in panel 2)" in check.describe()  # no geometry: by number


@pytest.mark.parametrize("fill", [0.0, 1000.0, -7.0])
def test_a_frame_of_one_value_is_no_data(fill):
    """A read-out failure (every pixel 0) or a frame of one constant: one 'no data' message,
    not a panel list nor 'no usable pixel'; nothing of it is taken as data."""
    panels = [np.full((40, 48), fill, np.float32) for _ in range(4)]
    _, goods, check = sanitise_frame(panels, None)
    assert check.no_data and check.frame_value == fill and not any(g.any() for g in goods)
    said = check.describe(["q0", "q1", "q2", "q3"])
    assert said.startswith(f"every pixel holds the same value ({fill:g}): no data")
    assert "no usable pixel" not in said and "q2" not in said and check.offset is None


def test_photon_counts_at_zero_on_a_panel_stay_data_any_other_one_value_does_not():
    """Photon counting has no read noise: a module far from the beam can count nothing on a
    blank, so on a frame of counts a panel at exactly 0 is a measurement, kept.  A panel of
    counts at one other value, or a whole frame of 0 counts, is no data; and on integrating
    data a panel at 0 is no data (as tested above)."""
    panels = _counting()
    panels[1][:] = 0
    _, goods, check = sanitise_frame(panels, None)
    assert all(g.all() for g in goods) and not check.flat_panels and check.masked == 0
    as_float = [p.astype(np.float32) for p in panels]  # counts a reader made float (dxtbx)
    assert all(g.all() for g in sanitise_frame(as_float, None)[1])
    panels[1][:] = 3
    _, goods, check = sanitise_frame(panels, None)
    assert not goods[1].any() and check.flat_panels == [(1, 3.0)]
    _, goods, check = sanitise_frame([np.zeros_like(p) for p in panels], None)
    assert check.no_data and not any(g.any() for g in goods)


def test_a_panel_with_too_few_valid_pixels_is_not_judged_by_its_one_value():
    """A few equal pixels of a mostly masked panel of integer data can be chance."""
    panels = [np.round(p).astype(np.int32) for p in _integrating()]
    mask = np.zeros(panels[0].shape, bool)
    mask.flat[:MIN_ONE_VALUE - 1] = True
    panels[0].flat[:MIN_ONE_VALUE] = 4
    masks = [mask] + [np.ones(p.shape, bool) for p in panels[1:]]
    _, goods, check = sanitise_frame(panels, masks)
    assert goods[0].sum() == MIN_ONE_VALUE - 1 and not check.flat_panels
    mask.flat[MIN_ONE_VALUE - 1] = True
    _, goods, check = sanitise_frame(panels, masks)
    assert not goods[0].any() and check.flat_panels == [(0, 4.0)]


def test_the_engine_warns_about_a_dead_frame_and_a_dead_module_naming_file_frame_and_panel(
        caplog, make_geometry_text):
    """A zero frame between good ones is warned about ('no data'), counted, and written as a
    frame without peaks; a zero module is named by its panel name; both count in the tally,
    whose own budget names a dead frame after a run of NaN-module frames used up theirs."""
    from peaknet_xtal.formats.geometry import parse_geometry

    geometry = parse_geometry(make_geometry_text(["left", "right"], 48, 40,
                                                 [(-48.0, -20.0), (0.0, -20.0)]))
    seen = []

    def predictor(panels, masks):
        seen.append([bool(m.any()) for m in masks])
        return [np.where(p > 50, np.float32(1), np.float32(0)) for p in panels]

    def frame(i, panels):
        return Frame(panels=panels, source="run.cxi", event=f"//{i}", geometry=geometry)

    good = _integrating(2)
    for p in good:
        p[10:13, 10:13] = 400.0  # a peak on each panel
    nan_module = [good[0], np.full_like(good[1], np.nan)]
    frames = [frame(i, nan_module) for i in range(MAX_WARNINGS + 2)]
    frames.append(frame(20, [np.zeros_like(p) for p in good]))  # read-out failure
    frames.append(frame(21, [good[0], np.zeros_like(good[1])]))  # one module dropped
    frames.append(frame(22, good))
    engine = InferenceEngine(predictor=predictor, batch_size=1, min_peaks=1)
    engine.sanitised.reported_in = "the run summary"
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal.finding.sanitise"):
        results = list(engine.find_frames(frames))
    said = [r.getMessage() for r in caplog.records]
    assert len(results) == len(frames)
    assert [len(r.peaks) for r in results[-3:]] == [0, 1, 2] and not results[-3].hit
    assert seen[-3:] == [[False, False], [True, False], [True, True]]
    assert any(m.startswith("run.cxi //20: every pixel holds the same value (0): no data")
               for m in said)
    assert "run.cxi //0: masked 1920 non-finite and 0 absurd (|value| > 1.8e+19) pixels " \
           "(in right)" in said
    assert "further frames with unusable pixels are counted, not reported one by one (see " \
           "the run summary)" in said
    assert not any("//21" in m for m in said)  # counted only: the budget was used up
    tally = engine.sanitised.as_dict()
    assert tally["frames_without_data"] == 1 and tally["one_value_panels"] == 1
    assert tally["frames"] == MAX_WARNINGS + 4 and tally["nonfinite_pixels"] == 1920 * 12
    line = describe_tally(tally)
    assert "14 frame(s)" in line and "1 without data" in line and "1 panel(s) masked" in line


def test_a_tally_without_a_report_promises_none(caplog):
    tally = SanitiseTally()
    check = sanitise_frame([np.full((8, 8), np.nan, np.float32)], None)[2]
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal.finding.sanitise"):
        for i in range(MAX_WARNINGS + 1):
            tally.add(check, f"f //{i}")
    assert caplog.records[-1].getMessage() == ("further frames with unusable pixels are not "
                                               "reported one by one")
    assert tally.frames == MAX_WARNINGS + 1 and describe_tally(SanitiseTally().as_dict()) is None
