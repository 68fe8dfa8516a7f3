"""The simulated model-selection frames: what each part holds, and seeds that never meet the
acceptance frames'."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.evaluation import selection
from peaknet_xtal.evaluation.held_out import held_out_seeds


@pytest.fixture(scope="module")
def geometries(real_data: Path) -> Path:
    return real_data / "crystfel_geometry"


def test_seeds_stay_in_the_selection_range_and_apart():
    parts = [selection.VALIDATION_SEEDS, selection.CLEAN_SEEDS, selection.BLANK_SEEDS,
             selection.SHARP_SEEDS]
    seeds = [s for part in parts for s in part]
    assert len(seeds) == len(set(seeds))  # no frame is in two parts
    assert all(s in selection.SELECTION_SEED_RANGE for s in seeds)
    held_out = {s for v in held_out_seeds().values() for s in v}
    assert not held_out & set(seeds)
    assert max(seeds) < min(held_out)


def test_clean_hits_are_hits_on_four_detectors(geometries):
    frames = selection.clean_hit_frames(geometries)
    assert len(frames) >= 24
    detectors = [f.meta["selection"]["detector"] for f, _ in frames]
    assert set(detectors) == set(selection.CLEAN_GEOMETRIES) and len(set(detectors)) == 4
    assert all(truth.hit and truth.reflections["strong"].any() for _, truth in frames)
    # clean: no frame is put on the strong smooth background (2,500+ ADU everywhere)
    assert all(np.median(np.concatenate([np.ravel(p) for p in f.panels])) < 2000
               for f, _ in frames)


def test_blanks_have_no_reflections_and_half_a_strong_background(geometries):
    frames = selection.blank_frames(geometries)
    assert all(len(truth.reflections) == 0 and not truth.hit for _, truth in frames)
    strong = [np.median(np.concatenate([np.ravel(p) for p in f.panels])) > 2000
              for f, _ in frames]
    assert sum(strong) == len(frames) // 2
    assert {f.meta["selection"]["detector"] for f, _ in frames} == set(selection.CLEAN_GEOMETRIES)


def test_sharp_hits_have_spots_about_a_pixel_across_on_four_detectors(geometries):
    from peaknet_xtal.sim import SimConfig

    frames = selection.sharp_hit_frames(geometries)
    assert len(frames) == len(selection.SHARP_SEEDS)
    assert {f.meta["selection"]["detector"] for f, _ in frames} == set(selection.CLEAN_GEOMETRIES)
    assert all(truth.hit and truth.reflections["strong"].any() for _, truth in frames)
    sigmas = np.array([f.meta["selection"]["spot_sigma_px"] for f, _ in frames])
    assert sigmas.max() <= 0.45  # sim.sharp_spot_settings' cores
    # only the spots are sharpened: the gain and the randomised draws after it are the seed's
    seed = selection.SHARP_SEEDS[0]
    rng = np.random.default_rng(seed)
    gain = float(rng.uniform(1, 30))
    plain = SimConfig.randomised(rng, hit_probability=1.0, adu_per_photon=gain)
    assert frames[0][0].meta["selection"]["gain"] == gain
    assert plain.spot_sigma_px != sigmas[0]


def test_selection_frames_builds_the_parts_asked_for(geometries):
    assert list(selection.selection_frames(geometries, parts=("blanks",))) == ["blanks"]
    with pytest.raises(ValueError, match="unknown selection part"):
        selection.selection_frames(geometries, parts=("blank",))


def test_frames_are_the_same_every_time(geometries):
    first = selection.blank_frames(geometries)[:2]
    again = selection.blank_frames(geometries)[:2]
    for (a, _), (b, _) in zip(first, again, strict=True):
        assert all(np.array_equal(p, q) for p, q in zip(a.panels, b.panels, strict=True))


def test_a_strong_background_unflags_as_strong_the_reflections_it_drowns(geometries):
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame
    from peaknet_xtal.sim.artifacts import strong_background_panel

    gain = 30.0  # the strong-background report set's: spots from tens to thousands of ADU
    frame, truth = simulate_frame(read_geometry(geometries / "om_lcls_rayonix.geom"), 41,
                                  SimConfig(hit_probability=1.0, adu_per_photon=gain))
    before = truth.reflections.copy()
    expected = [strong_background_panel(np.asarray(p, float) / gain,
                                        np.random.default_rng(3), gain).astype(np.float32)
                for p in frame.panels[:1]]
    selection.on_strong_background(frame, truth, np.random.default_rng(3), gain)
    # the frame is what the strong background always made of it
    assert np.array_equal(frame.panels[0], expected[0])
    after = truth.reflections
    assert len(after) == len(before)  # drowned reflections stay true reflections
    assert not (after["strong"] & ~before["strong"]).any()  # nothing becomes strong
    drowned = before["strong"] & ~after["strong"]
    kept = after["strong"]
    assert drowned.any() and kept.any()
    # the background drowns the weak ones, as the simulation measured them
    assert np.median(before["snr"][drowned]) < np.median(before["snr"][kept])
