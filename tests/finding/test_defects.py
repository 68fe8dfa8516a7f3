"""Pixel defects: recurring hot/flickering pixels across a run, one-pixel spikes in a frame, the
masks written for CrystFEL and DIALS, and the engine's post-filter."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.finding.defects import (
    DefectFilter,
    DefectTracker,
    noise_sigma,
    off_defects,
    spike_limit,
    spike_map,
    spike_peaks,
    write_crystfel_mask,
    write_dials_mask,
)
from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.types import Frame, peaks_from_columns

EPIX = "crystfel_geometry/om_lcls_mfx_epix10k2M.geom"
STATUS = "epix100a_pixel_status/epix100a_XppGon0_pixel_status_0-end.data"
ASIC = (176, 192)  # ePix ASIC: the 704 x 768 ePix100a status map is 4 x 4 of them


@pytest.fixture(scope="module")
def epix(real_data):
    return read_geometry(real_data / EPIX)


@pytest.fixture(scope="module")
def hot_pixels(real_data):
    """60 pixels placed as in a real ePix100a bad-pixel population (its status map), mapped
    onto the first 16 ePix10k2M ASIC panels."""
    status = np.loadtxt(real_data / STATUS, comments="#")
    ys, xs = np.nonzero(status)
    pick = np.random.default_rng(5).choice(len(ys), 60, replace=False)
    return [(int(ys[k] // ASIC[0] * 4 + xs[k] // ASIC[1]), int(ys[k] % ASIC[0]),
             int(xs[k] % ASIC[1])) for k in pick]


def bright(panels, masks):
    """Stand-in segmenter: pixels 8 robust sigmas above the panel median (it finds hot pixels
    as readily as spots, as any finder would)."""
    out = []
    for p in panels:
        med = np.median(p)
        sigma = 1.4826 * np.median(np.abs(p - med)) + 1e-6
        out.append(((p - med) / sigma > 8).astype(np.float32))
    return out


def run_with_hot_pixels(geometry, hot, n_frames=10, seed=0):
    """Simulated ePix10k2M frames (hits and blanks) with 60 unmasked hot pixels: half stuck at
    a high value, half flickering (off in one frame of ten, at random heights otherwise)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        frame, _ = simulate_frame(geometry, i, SimConfig(adu_per_photon=10.0,
                                                         hit_probability=0.5 if i else 1.0))
        panels = [p.copy() for p in frame.panels]
        for j, (panel, y, x) in enumerate(hot):
            if j % 2:
                panels[panel][y, x] = 5000.0
            elif (i + j) % 10 != 0:
                panels[panel][y, x] += 50.0 + 400.0 * rng.random()
        frames.append(Frame(panels=panels, masks=frame.masks, geometry=geometry, meta={}))
    return frames


def on_hot(peaks, hot):
    return sum(1 for p in peaks for panel, y, x in hot
               if p["panel"] == panel and abs(p["ss"] - y) <= 1 and abs(p["fs"] - x) <= 1)


@pytest.mark.slow
def test_run_with_sixty_hot_pixels_reports_none_from_the_first_frame(epix, hot_pixels):
    frames = run_with_hot_pixels(epix, hot_pixels)
    plain = InferenceEngine(predictor=bright, adu_per_photon=10.0)
    # the filter off, for comparison: no defect named, no spike test
    plain.defects = DefectFilter(DefectTracker(min_frames=len(frames) + 1), spikes=False)
    before = [on_hot(r.peaks, hot_pixels) for r in plain.find_frames(frames)]
    assert min(before) > 10  # without the filter the hot pixels are peaks in every frame
    engine = InferenceEngine(predictor=bright, adu_per_photon=10.0)
    after = [on_hot(r.peaks, hot_pixels) for r in engine.find_frames(iter(frames))]
    assert after == [0] * 10  # the first five frames were read ahead and counted first
    assert engine.defects.tracker.frames == 10  # ... once each
    defects = engine.defects.tracker.defects
    found = {(panel, y, x) for panel, d in enumerate(defects) for y, x in zip(*np.nonzero(d),
                                                                              strict=True)}
    assert set(hot_pixels) <= found
    assert len(found) < 80  # the hot pixels and few others (real spots move between frames)


def test_tracker_memory_is_one_counter_per_pixel_and_needs_min_frames():
    tracker = DefectTracker(min_frames=3)
    rng = np.random.default_rng(0)
    for k in range(3):
        assert tracker.defects is None
        image = rng.normal(0, 1, (64, 64))
        image[5, 7] = 100.0  # stuck: every frame
        if k != 1:
            image[20, 30] = 100.0  # flickers: 2 frames of 3, under three in four
        tracker.update([image])
    assert tracker.counts[0].dtype == np.uint32 and tracker.counts[0].shape == (64, 64)
    defects = tracker.defects[0]
    assert defects[5, 7] and not defects[20, 30] and defects.sum() == 1


def test_spike_map_finds_lone_and_paired_hot_pixels_not_smooth_backgrounds():
    yy, xx = np.indices((80, 80)).astype(float)
    image = 1000.0 + 20.0 * xx + 0.1 * (yy - 40) ** 2
    image += np.random.default_rng(1).normal(0, 3, (80, 80))
    image[10, 10] += 200.0  # a lone spike
    image[30, 30:32] += 300.0  # two adjacent hot pixels
    good = np.ones(image.shape, bool)
    good[50, 50] = False  # a hot pixel next to a masked one is still found
    image[50, 51] += 200.0
    spikes = spike_map(image, good)
    assert set(zip(*np.nonzero(spikes), strict=True)) == {(10, 10), (30, 30), (30, 31), (50, 51)}


def reference_spikes(image: np.ndarray, good: np.ndarray, lone: bool) -> np.ndarray:
    """The spike rule pixel by pixel, as the module states it (float64, no shortcuts)."""
    from peaknet_xtal.finding.defects import LONE_SIGMAS, PROFILE_FRACTION

    noise = noise_sigma(image.astype(np.float32), good)
    limit = spike_limit(image.astype(np.float32), good)
    h, w = image.shape
    out = np.zeros(image.shape, bool)
    for y in range(h):
        for x in range(w):
            near = sorted(float(image[y + dy, x + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                          if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w
                          and good[y + dy, x + dx])
            if not good[y, x] or not near:
                continue
            background = sum(near[1:-1]) / 6 if len(near) == 8 else near[-1]
            spike = image[y, x] - background > limit
            if lone and spike and len(near) >= 2:
                lift = near[-2] - near[0]
                spike = lift < max(LONE_SIGMAS * noise, PROFILE_FRACTION * (image[y, x] - near[0]))
            out[y, x] = spike
    return out


@pytest.mark.parametrize("lone", [False, True])
def test_spike_map_is_the_rule_at_every_pixel(lone):
    """The pre-screened spike map (statistics only where a spike is possible) equals the rule
    applied at every pixel: spots, hot pixels and pairs, masked pixels, panel edges."""
    rng = np.random.default_rng(4)
    image = rng.normal(100.0, 5.0, (40, 50))
    yy, xx = np.indices(image.shape)
    for _ in range(6):  # spots of one to a few pixels
        cy, cx, width = rng.uniform(0, 40), rng.uniform(0, 50), rng.uniform(0.3, 1.5)
        image += rng.uniform(30, 400) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    spikes = rng.integers(0, 40, 15), rng.integers(0, 50, 15)
    image[spikes] += rng.uniform(20, 300, 15)  # hot pixels, some on the edges or in pairs
    image[0, 10] += 200.0
    image[20, 20:22] += 250.0
    good = rng.random(image.shape) > 0.05
    good[30:33, 30:33] = False
    good[31, 31] = True  # a pixel with no good neighbour: not judged
    image[31, 31] += 500.0
    image = image.astype(np.float32)
    expected = reference_spikes(image, good, lone)
    assert expected.sum() >= 10
    assert np.array_equal(spike_map(image, good, lone=lone), expected)


@pytest.mark.parametrize("lone", [False, True])
def test_on_a_sparse_count_a_spike_stands_a_photon_above_its_neighbours(lone):
    """Mostly zeros (a tenth of a photon a pixel): the noise is below one count, so a spike
    must stand more than one count above its neighbours; lone single photons are no spikes,
    a pixel of a few counts is, and the pre-screened map is still the rule at every pixel.
    A dead-flat panel keeps its floor: a hot pixel there is a spike."""
    rng = np.random.default_rng(6)
    image = rng.poisson(0.1, (60, 70)).astype(np.float32)
    image[9:12, 9:12] = np.minimum(image[9:12, 9:12], 1.0)
    image[10, 10], image[40, 20] = 4.0, 6.0  # hot pixels
    good = np.ones(image.shape, bool)
    assert spike_limit(image, good) == 1.0
    spikes = spike_map(image, good, lone=lone)
    assert spikes[10, 10] and spikes[40, 20]
    assert not spikes[image == 1].any() and spikes.sum() <= np.sum(image >= 2)
    assert np.array_equal(spikes, reference_spikes(image, good, lone))
    flat = np.zeros((40, 40), np.float32)
    flat[20, 20] = 3.0
    assert spike_limit(flat, np.ones(flat.shape, bool)) < 1e-6
    assert spike_map(flat, lone=lone)[20, 20]


def test_peaks_near_a_defect_are_dropped():
    peaks = peaks_from_columns(panel=np.array([0, 0, 1]), fs=np.array([7.4, 30.0, 7.0]),
                               ss=np.array([5.6, 30.0, 5.0]))
    defects = [np.zeros((64, 64), bool), np.zeros((64, 64), bool)]
    defects[0][5, 7] = True
    kept = peaks[off_defects(peaks, defects)]
    assert kept["fs"].tolist() == [30.0, 7.0]


SPOTS = [(20, 20), (20, 90), (90, 20), (90, 90), (60, 100)]


def spots_frame(spots_sigma: float) -> np.ndarray:
    """Five round spots (400 above a background of 100, noise 2) of ``spots_sigma`` px."""
    rng = np.random.default_rng(2)
    image = rng.normal(100.0, 2.0, (120, 120))
    yy, xx = np.indices(image.shape)
    for y, x in SPOTS:
        image += 400.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * spots_sigma ** 2))
    return image


def table_at(rows) -> np.ndarray:
    """A peak table with a peak at each ``(ss, fs)`` of ``rows``, on :func:`spots_frame`'s
    background."""
    return peaks_from_columns(panel=np.zeros(len(rows), int),
                              fs=np.array([c[1] for c in rows], float),
                              ss=np.array([c[0] for c in rows], float),
                              background=np.full(len(rows), 100.0),
                              background_sigma=np.full(len(rows), 2.0))


def frame_with(spots_sigma: float, spike_at=(50, 50)):
    image = spots_frame(spots_sigma)
    image[spike_at] += 400.0
    return image, table_at([*SPOTS, spike_at])


def test_one_pixel_spike_is_dropped_where_spots_are_wider():
    image, peaks = frame_with(spots_sigma=1.2)
    assert spike_peaks(peaks, [image]).tolist() == [False] * 5 + [True]


def test_binned_detector_with_one_pixel_spots_keeps_single_pixel_peaks():
    """Spots of one pixel (sigma 0.3 px): the frame's spots are as narrow as the spike, so
    nothing tells them apart and nothing is dropped within the frame."""
    image, peaks = frame_with(spots_sigma=0.3)
    assert not spike_peaks(peaks, [image]).any()


def frame_with_extras(spots_sigma: float, extras):
    """:func:`frame_with`'s five spots, no spike, and ``extras(image)`` added in place: a list
    of ``(ss, fs)`` places, each a peak of the table after the spots."""
    image = spots_frame(spots_sigma)
    return image, table_at([*SPOTS, *extras(image)])


def zinger_tracks(image):
    """Sharp-edged tracks, as a charged particle leaves them on an integrating detector: a
    diagonal 6-px one, an 8-px row, a 3-px column."""
    for k in range(6):
        image[40 + k, 45 + k] += 800.0
    image[70, 40:48] += 3000.0
    image[99:102, 60] += 500.0
    return [(42.0, 47.0), (70.0, 43.0), (100.0, 60.0)]


def test_sharp_edged_tracks_are_dropped_where_spots_are_wider():
    """A core of several bright pixels standing on background is no spot either (its ring at
    background), where the frame's spots have profiles."""
    image, peaks = frame_with_extras(1.2, zinger_tracks)
    assert spike_peaks(peaks, [image]).tolist() == [False] * 5 + [True] * 3


def spot_like_cores(image):
    """Bragg-like peaks whose brightest neighbour is as bright as their brightest pixel: a spot
    centred between two pixels, a spot streaked along a line (blurred across it), a flat-topped
    (saturated) spot, and a sharp pair: a spot narrower than a pixel centred on a pixel
    boundary, which nothing tells from a hot pair within one frame (the run's defect count
    does)."""
    yy, xx = np.indices(image.shape)
    image[20, 55:57] += 500.0
    image += 600.0 * np.exp(-((yy - 45) ** 2 + (xx - 50.5) ** 2) / (2 * 0.8 ** 2))
    along = np.clip(np.abs(xx - 43.0) - 3.0, 0, None)
    image += 500.0 * np.exp(-((yy - 70) ** 2 / (2 * 0.7 ** 2) + along ** 2 / 2))
    flat = np.minimum(5000.0 * np.exp(-((yy - 105) ** 2 + (xx - 60) ** 2) / (2 * 1.2 ** 2)),
                      1500.0)
    image += flat
    return [(45.0, 50.5), (70.0, 43.0), (105.0, 60.0), (20.0, 55.5)]


def test_spots_with_bright_cores_keep_their_profile():
    image, peaks = frame_with_extras(1.2, spot_like_cores)
    assert not spike_peaks(peaks, [image]).any()


def test_tracks_are_kept_where_spots_are_one_pixel():
    """On a binned detector's frame (spots of sigma 0.3 px) nothing is judged by its profile."""
    image, peaks = frame_with_extras(0.3, zinger_tracks)
    assert not spike_peaks(peaks, [image]).any()


def test_a_core_reaching_past_the_window_or_masked_beside_is_not_judged():
    """A track longer than the core window, and a track with a NaN pixel beside it, cannot be
    told from a spot by their rings: kept."""
    def extras(image):
        image[30, 30:60] += 3000.0  # 30 px: longer than the 17-px window
        image[110, 40:44] += 3000.0
        image[111, 41] = np.nan
        return [(30.0, 45.0), (110.0, 41.5)]

    image, peaks = frame_with_extras(1.2, extras)
    assert not spike_peaks(peaks, [image]).any()


def test_brightest_pixels_at_edges_with_nan_and_on_several_panels():
    """The brightest pixel of the 3 x 3 around a peak's centre (off-panel and NaN pixels left
    out) against its own brightest neighbour; a NaN beside it ranks first, as unknown.  Where
    that pixel is, and its 3 x 3 as read (NaN off the panel)."""
    from peaknet_xtal.finding.defects import _brightest_pixels

    a = np.zeros((6, 7))
    a[0, 1], a[1, 1] = 50.0, 10.0  # at the corner: the peak's brightest, its neighbour
    b = np.zeros((6, 7))
    b[3, 3], b[3, 4], b[4, 4] = 40.0, np.nan, 30.0  # NaN beside the brightest
    b[0, 6], b[1, 6], b[1, 5] = 20.0, np.nan, np.nan  # two NaN beside it
    peaks = peaks_from_columns(panel=np.array([1, 0, 1, 0]), fs=np.array([4.4, 0.0, 6.0, 5.0]),
                               ss=np.array([3.6, 0.0, 0.0, 4.0]), background=np.full(4, 5.0))
    top, side, ratio, where, window = _brightest_pixels(peaks, [a, b])
    np.testing.assert_array_equal(top, [35.0, 45.0, 15.0, -5.0])
    np.testing.assert_array_equal(side[:3], [35.0, 5.0, np.nan])
    assert side[3] == -5.0 and ratio[3] == 1.0  # nothing above the background: no decision
    np.testing.assert_allclose(ratio[:2], [1.0, 5.0 / 45.0])
    np.testing.assert_array_equal(where[:3], [[3, 3], [0, 1], [0, 6]])
    assert np.isnan(window[1, :3]).all() and window[1, 4] == 50.0 and window[1, 7] == 10.0
    assert window[0, 4] == 40.0 and np.isnan(window[0, 5]) and window[0, 8] == 30.0


def stuck_pixel_run(n_frames=5):
    """Noise frames with one stuck pixel at (ss 5, fs 7), and a peak table holding a peak on
    it."""
    rng = np.random.default_rng(3)
    peaks = peaks_from_columns(panel=np.array([0]), fs=np.array([7.0]), ss=np.array([5.0]),
                               background=np.array([0.0]), background_sigma=np.array([1.0]))
    images = []
    for _ in range(n_frames):
        image = rng.normal(0, 1, (64, 64))
        image[5, 7] = 100.0
        images.append(image)
    return images, peaks


def test_trackers_of_parts_of_a_run_merge_into_the_whole_runs():
    """Counts are sums over frames: trackers that counted parts of a run merge into the
    tracker of all of it.  Trackers judging spikes otherwise, or of other panels, are refused."""
    images, _ = stuck_pixel_run(n_frames=5)
    whole, first, second = DefectTracker(), DefectTracker(), DefectTracker()
    for k, image in enumerate(images):
        whole.update([image])
        (first if k < 2 else second).update([image])
    merged = DefectTracker()
    merged.merge(DefectTracker())  # nothing counted: nothing to add
    assert merged.counts is None and merged.frames == 0
    merged.merge(first)
    merged.merge(second)
    assert merged.frames == 5 and first.counts[0][5, 7] == 2  # the parts are left as they were
    np.testing.assert_array_equal(merged.counts[0], whole.counts[0])
    assert merged.defects[0][5, 7] and merged.count() == whole.count() == 1
    with pytest.raises(ValueError, match="other settings"):
        DefectTracker(fraction=0.5).merge(first)
    with pytest.raises(ValueError, match="other panel shapes"):
        merged.merge(counted_once(np.zeros((8, 8))))


def counted_once(image):
    tracker = DefectTracker()
    tracker.update([image])
    return tracker


def test_filter_counts_frames_and_drops_recurring_pixels():
    filt = DefectFilter(DefectTracker(min_frames=3))
    images, peaks = stuck_pixel_run()
    assert [len(filt(peaks, [image])) for image in images] == [1, 1, 0, 0, 0]
    rows = DefectFilter(DefectTracker(min_frames=3))  # the same, as a mask over the rows
    assert [rows.keep(peaks, [image]).tolist() for image in images] == [[True]] * 2 + [[False]] * 3


def test_bragg_spots_on_the_same_pixels_every_frame_are_not_defects():
    """A grid scan of one crystal (the real thaumatin grid: one orientation, the same spots on
    the same pixels frame after frame) must not lose its spots to the defect mask: spikes count
    towards a defect only without a spot profile.  Hot pixels, alone or paired, still do."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:128, :128]
    centres = rng.uniform(8, 120, (25, 2))
    hot = [(20, 30), (90, 100), (90, 101)]  # a lone hot pixel and a hot pair
    tracker, plain = DefectTracker(min_frames=5), DefectTracker(min_frames=5, lone=False)
    for _ in range(8):
        image = rng.normal(100.0, 2.0, (128, 128)) + rng.poisson(0.2, (128, 128)) * 10.0
        for (cy, cx), height in zip(centres, rng.uniform(100, 2000, len(centres)),
                                    strict=True):  # sigma 0.6 px, intensity varies per frame
            image += height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.6 ** 2))
        for y, x in hot:
            image[y, x] += rng.uniform(300, 3000)
        tracker.update([image])
        plain.update([image])
    found = set(zip(*np.nonzero(tracker.defects[0]), strict=True))
    assert found == set(hot)
    assert len(set(zip(*np.nonzero(plain.defects[0]), strict=True))) > 10  # spike alone: spots


@pytest.mark.slow
def test_real_thaumatin_grid_spots_recur_but_are_not_defects(real_data, dials_env):
    """The real thaumatin grid scan: one crystal orientation, its spots on the same pixels in
    all ten frames.  Counting every spike made hundreds of them defects after five frames
    (and peaknet2cxi dropped their peaks); counting lone spikes leaves at most a few pixels."""
    from peaknet_xtal.registry import open_source

    tracker, every_spike = DefectTracker(), DefectTracker(lone=False)
    for path in sorted((real_data / "pilatus6m_thaumatin_grid").glob("*.cbf.bz2")):
        source = open_source(str(path))
        try:
            for frame in source:
                goods = frame.masks_or_ones()
                tracker.update(frame.panels, goods)
                every_spike.update(frame.panels, goods)
        finally:
            source.close()
    assert tracker.frames == every_spike.frames == 10
    assert every_spike.count() > 100  # the failure this guards against
    assert tracker.count() <= 5


def test_frames_counted_ahead_are_filtered_with_what_they_showed_and_counted_once():
    filt = DefectFilter(DefectTracker(min_frames=3))
    images, peaks = stuck_pixel_run()
    assert filt.learning == 3
    for image in images[:3]:
        filt.count_ahead([image])
    assert filt.learning == 0
    assert [len(filt(peaks, [image])) for image in images] == [0] * 5
    assert filt.tracker.frames == 5


def test_engine_reads_ahead_only_while_the_filter_learns():
    """One frame a call (the DIALS plugin's way) has nothing to read ahead: its first frames
    are filtered as they come; a run given at once is counted before any is filtered."""
    seen = []

    class Recording(DefectFilter):
        def count_ahead(self, panels, masks=None):
            seen.append("ahead")
            super().count_ahead(panels, masks)

        def keep(self, peaks, panels, masks=None, spikes=None):
            seen.append("filter")
            return super().keep(peaks, panels, masks, spikes)

    rng = np.random.default_rng(0)
    frames = [Frame(panels=[rng.normal(0, 1, (64, 64)).astype(np.float32)], masks=None,
                    geometry=None, meta={}) for _ in range(7)]
    engine = InferenceEngine(predictor=bright, adu_per_photon=1.0, batch_size=1)
    engine.defects = Recording(DefectTracker(min_frames=5))
    list(engine.find_frames(frames))
    assert seen == ["ahead"] * 5 + ["filter"] * 7
    seen.clear()
    engine.defects = Recording(DefectTracker(min_frames=5))
    for frame in frames[:2]:
        list(engine.find_frames([frame]))
    assert seen == ["ahead", "filter"] * 2


def test_crystfel_mask_in_the_slab_layout(tmp_path, fixtures_dir):
    geometry = read_geometry(fixtures_dir / "geometry" / "two_panels.geom")
    good = [np.ones((32, 64), bool), np.ones((32, 64), bool)]
    good[1][3, 4] = False
    path = write_crystfel_mask(tmp_path / "m.h5", good, geometry)
    with h5py.File(path) as h5:
        data = h5["/data/data"][()]
    assert data.shape == geometry.slab_shape and data.dtype == np.uint8
    assert data[32 + 3, 4] == 0 and data.sum() == 64 * 64 - 1
    assert not list(tmp_path.glob(".*part"))


@pytest.mark.dials
def test_dials_mask_reads_back_as_flex_bool(tmp_path, dials_env):
    import pickle

    good = [np.ones((10, 12), bool)]
    good[0][2, 3] = False
    path = write_dials_mask(tmp_path / "defects.mask", good)
    with open(path, "rb") as fh:  # DIALS' own mask format (this test wrote it)
        masks = pickle.load(fh)
    assert type(masks[0]).__name__ == "bool" and masks[0].all() == (10, 12)
    assert masks[0].count(False) == 1 and not masks[0][2 * 12 + 3]


def test_filter_saves_masks_beside_the_output_after_enough_frames(tmp_path, fixtures_dir,
                                                                   caplog):
    """Nothing is written before enough frames; a run that ends that short says so (its
    folder held no mask, and nothing said why)."""
    geometry = read_geometry(fixtures_dir / "geometry" / "two_panels.geom")
    filt = DefectFilter(DefectTracker(min_frames=3))
    rng = np.random.default_rng(4)
    empty = peaks_from_columns()
    assert filt.save(tmp_path, geometry) == []  # nothing seen yet: nothing written
    for k in range(3):
        panels = [rng.normal(0, 1, (32, 64)), rng.normal(0, 1, (32, 64))]
        panels[1][3, 4] = 50.0
        filt(empty, panels)
        if k == 1:
            with caplog.at_level("INFO", logger="peaknet_xtal.finding.defects"):
                assert filt.save(tmp_path, geometry) == []
            assert "no pixel defect mask written: 2 frame(s) seen, fewer than the 3" in \
                caplog.text
            assert not any(tmp_path.iterdir())
    written = filt.save(tmp_path, geometry)
    assert written[0] == tmp_path / "pixel_defects.h5"
    with h5py.File(written[0]) as h5:
        mask = h5["/data/data"][()]
    assert mask[32 + 3, 4] == 0 and mask.sum() == 64 * 64 - 1


@pytest.mark.parametrize("in_flight", [0, 5])
def test_frames_found_in_threads_give_the_one_thread_results(monkeypatch, in_flight):
    """The engine finds the peaks of a chunk's frames in threads and applies the run's defect
    filter after, frame by frame in order: the same tables, boxes, pixels, hit calls and
    defect counts as one thread, with the first frames (read ahead and counted before any is
    filtered) counted once; also with frames still in flight while the next chunk is
    segmented (what a GPU engine does)."""
    rng = np.random.default_rng(3)
    hot = [(p, int(y), int(x)) for p in range(3) for y, x in rng.integers(2, 94, (4, 2))]
    yy, xx = np.mgrid[-3:4, -3:4]
    frames = []
    for i in range(11):
        panels = [rng.poisson(4.0, (96, 128)).astype(np.float32) for _ in range(3)]
        for panel in panels:
            for y, x in rng.integers(4, 92, (int(rng.integers(0, 6)), 2)):
                panel[y - 3:y + 4, x - 3:x + 4] += 60 * np.exp(-(yy ** 2 + xx ** 2) / 2.0)
        for p, y, x in hot:
            panels[p][y, x] += 400.0
        frames.append(Frame(panels=panels, masks=None, geometry=None, meta={}, serial=i))
    runs = {}
    for threads in (1, 3):
        engine = InferenceEngine(predictor=bright, adu_per_photon=1.0, batch_size=12,
                                 threads=threads)
        if threads > 1:
            monkeypatch.setattr(engine, "_in_flight", lambda threads: in_flight)
        runs[threads] = (list(engine.find_frames(frames, with_bbox=True, with_pixels=True)),
                         engine.defects.tracker)
    (one, one_tracker), (many, many_tracker) = runs[1], runs[3]
    assert many_tracker.frames == one_tracker.frames == len(frames)
    for a, b in zip(one_tracker.counts, many_tracker.counts, strict=True):
        np.testing.assert_array_equal(a, b)
    assert one_tracker.count() >= len(hot)  # the filter had defects to apply
    for a, b in zip(one, many, strict=True):
        assert a.peaks.tobytes() == b.peaks.tobytes() and a.hit == b.hit
        np.testing.assert_array_equal(a.peak_boxes, b.peak_boxes)
        for pa, pb in zip(a.peak_pixels, b.peak_pixels, strict=True):
            np.testing.assert_array_equal(pa, pb)
    assert sum(len(r.peaks) for r in one) > 0


def test_a_blank_is_judged_by_the_spot_width_of_the_run_before_it():
    """A frame with too few strong peaks of its own (a blank with a zinger) is judged once the
    run's earlier frames showed wide spots; not at the start of a run, nor with ``cores``
    off (the rule before)."""
    hits = [frame_with(1.2) for _ in range(4)]  # five wide strong spots each: 20 in all
    rng = np.random.default_rng(5)
    blank = rng.normal(100.0, 2.0, (120, 120))
    blank[70, 40:48] += 3000.0  # a track
    blank[30, 30] += 3000.0  # a one-pixel spike
    peaks = table_at([(70.0, 43.0), (30.0, 30.0)])
    fresh = DefectFilter()
    assert fresh.keep(peaks, [blank]).all()  # nothing known of the spot width yet
    for cores, dropped in ((True, [False, False]), (False, [True, True])):
        run = DefectFilter(cores=cores)
        for image, table in hits:
            run.keep(table, [image])
        assert run.keep(peaks, [blank]).tolist() == dropped
    run = DefectFilter()
    for image, table in hits[:3]:  # 18 strong peaks: fewer than the run needs
        run.keep(table, [image])
    assert run.keep(peaks, [blank]).all()
    run = DefectFilter()
    for image, table in hits:
        run.keep(table, [image])
    other = np.pad(blank, ((0, 8), (0, 0)), constant_values=100.0)  # another detector's panel
    assert run.keep(peaks, [other]).all() and len(run.run_widths) == 0


@pytest.mark.parametrize("extras", [zinger_tracks, spot_like_cores])
@pytest.mark.parametrize("sigma", [0.8, 1.2, 2.0])
def test_the_lifted_neighbour_shortcut_gives_the_ring_test_s_answer(extras, sigma, monkeypatch):
    """Skipping the cores whose brightest pixel has a lifted neighbour changes no answer: the
    same verdicts with every core looked at (the shortcut off)."""
    from peaknet_xtal.finding import defects

    image, peaks = frame_with_extras(sigma, extras)
    rng = np.random.default_rng(int(sigma * 10))
    image += rng.normal(0.0, 2.0, image.shape)
    fast = spike_peaks(peaks, [image])
    monkeypatch.setattr(defects, "_lifted_beside",
                        lambda window, *args: np.zeros(len(window), bool))
    assert spike_peaks(peaks, [image]).tolist() == fast.tolist()


def test_the_engine_drops_a_blank_s_track_once_its_run_showed_wide_spots():
    """Through ``find_frames``: hits with wide spots, then a blank holding a zinger track and
    nothing else.  The engine's run filter drops the track; a run of the blank alone keeps it
    (nothing tells it the spot width)."""
    rng = np.random.default_rng(8)
    hits = [spots_frame(1.2) + rng.normal(0.0, 2.0, (120, 120)) for _ in range(5)]
    blank = rng.normal(100.0, 2.0, (120, 120))
    blank[70, 40:48] += 3000.0

    def frame(image, serial):
        return Frame(panels=[image.astype(np.float32)], masks=None, geometry=None, meta={},
                     serial=serial)

    engine = InferenceEngine(predictor=bright, adu_per_photon=1.0, faint_support=0)
    results = list(engine.find_frames([frame(h, i) for i, h in enumerate(hits)]
                                      + [frame(blank, 5)]))
    assert [len(r.peaks) for r in results[:5]] == [5] * 5 and len(results[5].peaks) == 0
    alone = InferenceEngine(predictor=bright, adu_per_photon=1.0, faint_support=0)
    (result,) = alone.find_frames([frame(blank, 0)])
    assert len(result.peaks) == 1 and abs(float(result.peaks["ss"][0]) - 70.0) < 1.0


def test_the_mask_file_keeps_the_counts_a_resumed_run_adds_to(tmp_path):
    """DefectTracker.save keeps its counts beside the mask (CrystFEL reads only the mask) and
    DefectTracker.load gives them back with the tracker's settings; a file without counts, or
    none, gives None."""
    tracker = DefectTracker(fraction=0.5, min_frames=2)
    rng = np.random.default_rng(3)
    for _ in range(4):
        panels = [rng.normal(5, 1, (20, 30)).astype(np.float32) for _ in range(2)]
        panels[1][7, 9] = 4000.0
        tracker.update(panels)
    assert tracker.save(tmp_path, None)
    back = DefectTracker.load(tmp_path)
    assert back is not None and back.frames == 4
    assert (back.fraction, back.min_frames, back.sigmas, back.lone) == (
        tracker.fraction, tracker.min_frames, tracker.sigmas, tracker.lone)
    for a, b in zip(back.counts, tracker.counts, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.defects is not None and back.defects[1][7, 9]
    with h5py.File(tmp_path / "pixel_defects.h5", "a") as h5:
        del h5["/peaknet"]
    assert DefectTracker.load(tmp_path) is None
    assert DefectTracker.load(tmp_path / "nowhere") is None


def test_a_mask_write_killed_before_leaves_nothing_after_the_next(tmp_path):
    """A kill -9 while the mask was written left '.pixel_defects.h5.XXXX.part' (HDF5 that
    cannot be opened), which a rerun's mask writing kept beside the new one."""
    from peaknet_xtal.finding.defects import write_crystfel_mask

    stale = tmp_path / ".pixel_defects.h5._od1__99.part"
    stale.write_bytes(b"\\x89HDF\\r\\n")
    good = [np.ones((8, 8), bool), np.ones((8, 8), bool)]
    written = write_crystfel_mask(tmp_path / "pixel_defects.h5", good)
    assert not stale.exists() and written.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixel_defects.h5"]


def test_a_run_given_the_last_runs_mask_keeps_its_defects_in_its_own(tmp_path, fixtures_dir,
                                                                     caplog):
    """A run whose geometry applies the previous run's defect mask never sees those pixels
    spike (they are masked): its own mask held none of them ("0 defects"), and a user who
    kept only the newest mask lost them all a run later.  The mask a run writes keeps the
    defects of earlier defect masks its geometry applies, and says so; a mask of other
    making the geometry applies (a detector's own) is not copied into it."""
    geometry = read_geometry(fixtures_dir / "geometry" / "two_panels.geom")
    rng = np.random.default_rng(4)
    first = DefectFilter(DefectTracker(min_frames=3))
    for _ in range(3):
        panels = [rng.normal(0, 1, (32, 64)), rng.normal(0, 1, (32, 64))]
        panels[1][3, 4] = 50.0
        first(peaks_from_columns(), panels)
    (earlier, *_) = first.save(tmp_path / "run1", geometry)
    own = tmp_path / "detector_mask.h5"  # a detector mask, not a defect mask: not carried
    with h5py.File(own, "w") as h5:
        bad = np.ones(geometry.slab_shape, np.uint8)
        bad[10, 10] = 0
        h5["/data/data"] = bad
    text = (fixtures_dir / "geometry" / "two_panels.geom").read_text()
    text = "\n".join([f"mask1_file = {earlier}", "mask1_data = /data/data",
                      "mask1_goodbits = 0x1", "mask1_badbits = 0x0",
                      f"mask2_file = {own}", "mask2_data = /data/data",
                      "mask2_goodbits = 0x1", "mask2_badbits = 0x0", text])
    (tmp_path / "chained.geom").write_text(text)
    chained = read_geometry(tmp_path / "chained.geom")
    second = DefectFilter(DefectTracker(min_frames=3))
    for _ in range(3):  # the hot pixel masked by the first mask: it spikes nowhere now
        second(peaks_from_columns(), [rng.normal(0, 1, (32, 64)), rng.normal(0, 1, (32, 64))])
    assert second.tracker.count() == 0
    with caplog.at_level("INFO", logger="peaknet_xtal.finding.defects"):
        (written, *_) = second.save(tmp_path / "run2", chained)
    with h5py.File(written) as h5:
        mask = h5["/data/data"][()]
    assert mask[32 + 3, 4] == 0 and mask.sum() == 64 * 64 - 1  # carried; the detector's not
    assert f"1 of the earlier mask(s) the input's geometry applies, carried over: {earlier}" \
        in caplog.text


def test_a_defect_stays_one_when_its_share_dips_below_the_fraction():
    """A pixel lit in four frames of five is a defect; its share then dips below three in
    four for a while (it flickers): its peaks stay dropped, where they came back before."""
    rng = np.random.default_rng(6)
    filt = DefectFilter(DefectTracker(min_frames=4), spikes=False)
    peak = peaks_from_columns(panel=[0], fs=[20.0], ss=[10.0], background=[0.0],
                              background_sigma=[1.0])
    lit = [1, 1, 1, 1, 0, 0, 1, 1]  # a share of 6/8 at the end, 4/6 after frame 6
    kept = []
    for on in lit:
        panel = rng.normal(0, 1, (32, 64))
        panel[10, 20] += 60.0 * on
        kept.append(len(filt(peak, [panel])))
    assert filt.tracker.defects is not None and kept[3:] == [0] * 5


def test_pixels_flickering_on_a_blank_do_not_turn_the_spike_test_off():
    """A blank's strong peaks are its flickering pixels: as evidence of the spot width they
    made the blank a frame of one-pixel spots, and its flickering spikes were kept (a user
    trial: 3.7 false peaks a blank, 4 of 112 blanks hits).  Pixels that have spiked alone in
    earlier frames are no such evidence; the run's earlier spots (wide) decide."""
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[-3:4, -3:4]
    spot = np.exp(-(yy ** 2 + xx ** 2) / (2 * 0.9 ** 2))
    flicker = [(5, 7), (20, 40), (12, 55), (27, 13)]
    filt = DefectFilter(DefectTracker(min_frames=50))  # no pixel a defect in this short run

    def frame(spots: bool, lit: bool):
        panel = rng.normal(0, 1, (32, 64))
        rows = []
        if spots:
            for k in range(8):
                y, x = 4 + 3 * k, 4 + 7 * k
                panel[y - 3:y + 4, x - 3:x + 4] += 80.0 * spot
                rows.append((x, y))
        if lit:
            for y, x in flicker:
                panel[y, x] += 60.0
                rows.append((x, y))
        peaks = peaks_from_columns(panel=[0] * len(rows), fs=[float(x) for x, _ in rows],
                                   ss=[float(y) for _, y in rows], background=[0.0] * len(rows),
                                   background_sigma=[1.0] * len(rows))
        return peaks, [panel]

    for k in range(6):  # hits with wide spots; the flickering pixels lit on every other frame
        filt(*frame(True, k % 2 == 0))
    kept = filt(*frame(False, True))  # a blank: only the flickering pixels
    assert len(kept) == 0


def test_the_saved_mask_says_the_pixels_filtered_for_part_of_the_run(tmp_path, caplog):
    """A pixel the filter treated as a defect for a while (it flickered below three frames in
    four by the end) is not in the saved mask, which is the counts' own; the log says so (it
    said "2 pixel(s) ... treated as defects" and then "0 defects")."""
    rng = np.random.default_rng(9)
    filt = DefectFilter(DefectTracker(min_frames=4), spikes=False)
    for on in [1, 1, 1, 1, 0, 0, 0, 0]:
        panel = rng.normal(0, 1, (32, 64))
        panel[10, 20] += 60.0 * on
        filt(peaks_from_columns(), [panel])
    with caplog.at_level("INFO", logger="peaknet_xtal.finding.defects"):
        (written, *_) = filt.save(tmp_path)
    with h5py.File(written) as h5:
        assert h5["/data/data"][()].all()  # 4 of 8 frames: not in the mask
    assert "0 defects over 8 frames; 1 more pixel(s) treated as defects for part of the run" \
        in caplog.text
