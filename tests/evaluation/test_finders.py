"""The classic finders on planted spots: right positions (panel-relative pixel centres), masks
respected, on a real two-panel geometry whose second panel is flipped (so the raw slab <-> panel
conversion is exercised, not assumed)."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.evaluation import create_finder, list_finders
from peaknet_xtal.evaluation.metrics import match_peaks
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.types import Frame

#: (panel, fs, ss) of planted spots: sub-pixel positions, both panels, one 3 px from two edges.
#: Their beam distances (9-42 px) differ by 2.4 px or more: on so small a detector a ring of
#: peakfinder8's radial statistics has only ~50-150 pixels, and spots in one ring raise its noise
#: estimate (real detectors have thousands of pixels per ring); for the same reason peakfinder8
#: runs with min_snr 4 here (at 6 it misses the spots in the sparsest rings, nearest the beam and
#: in the corner).
SPOTS = np.array([(0, 30.0, 6.2), (0, 10.3, 8.6), (0, 50.7, 16.4), (0, 3.2, 28.5),
                  (1, 28.5, 11.5), (1, 20.5, 13.5), (1, 40.2, 25.8)])
HOT = (1, 50, 8)  # a masked hot pixel: no finder may report it


@pytest.fixture(scope="module")
def frame(fixtures_dir) -> Frame:
    geometry = read_geometry(fixtures_dir / "geometry" / "two_panels.geom")
    rng = np.random.default_rng(7)
    panels, masks = [], []
    for index, panel in enumerate(geometry.panels):
        ss, fs = np.mgrid[0:panel.height, 0:panel.width].astype(float)
        expected = np.full(panel.shape, 20.0)
        for p, x, y in SPOTS:
            if p == index:
                expected += 400.0 * np.exp(-((fs - x) ** 2 + (ss - y) ** 2) / (2 * 0.9 ** 2))
        panels.append(rng.poisson(expected).astype(np.float32))
        masks.append(np.ones(panel.shape, bool))
    p, x, y = HOT
    panels[p][y, x] = 60000.0
    masks[p][y, x] = False
    return Frame(panels, masks, source="planted", geometry=geometry)


@pytest.mark.parametrize("spec, params", [
    ("peakfinder8", {"adc_threshold": 50.0, "min_snr": 4.0, "min_pixel_count": 2}),
    pytest.param("dispersion", {"gain": 1.0}, marks=pytest.mark.dials),
])
def test_finder_finds_planted_spots_at_their_positions(frame, spec, params, request):
    request.getfixturevalue("dials_env" if spec == "dispersion" else "fixtures_dir")
    found = create_finder(spec, params).find(frame)
    assert len(found) == len(SPOTS), found[["panel", "fs", "ss"]]
    ia, ib, dist = match_peaks(found["panel"], found["fs"], found["ss"],
                               SPOTS[:, 0], SPOTS[:, 1], SPOTS[:, 2], cutoff=3.0)
    assert len(ia) == len(SPOTS)
    assert dist.max() < 0.5, dict(zip(ib.tolist(), dist.round(3).tolist(), strict=False))
    # Peaks carry their resolution from the geometry (nearer the beam = smaller 1/d).
    assert np.all(np.isfinite(found["one_over_d"])) and np.all(found["one_over_d"] > 0)
    assert not np.any((found["panel"] == HOT[0]) & (np.hypot(found["fs"] - HOT[1],
                                                             found["ss"] - HOT[2]) < 3))


def test_peakfinder8_thresholds_bite(frame):
    """A threshold above every spot leaves nothing; the default grid's knobs reach the C code."""
    assert len(create_finder("peakfinder8", {"adc_threshold": 1e5}).find(frame)) == 0
    assert len(create_finder("peakfinder8", {"adc_threshold": 50.0,
                                             "min_pixel_count": 60}).find(frame)) == 0


def test_peakfinder8_needs_geometry(frame):
    bare = Frame(frame.panels, frame.masks, source="nogeom.h5")
    with pytest.raises(ValueError, match="nogeom.h5: peakfinder8 needs a detector geometry"):
        create_finder("peakfinder8").find(bare)


def test_create_finder_names():
    assert list_finders() == ["dispersion", "peakfinder8", "peaknet"]
    with pytest.raises(KeyError, match="unknown finder 'pf9'"):
        create_finder("pf9")
    with pytest.raises(KeyError, match="only peaknet takes a model suffix"):
        create_finder("dispersion:fast")
    assert create_finder("dispersion", {"sigma_strong": 4.0}).params["sigma_strong"] == 4.0


def test_the_dispersion_finder_without_dials_says_so_when_named(monkeypatch):
    """DIALS' own finder, named in a Python without DIALS: an ImportError saying so when the
    finder is checked, before any finder runs (at its first frame before); the others are
    made as ever."""
    from peaknet_test_support import hide_dials

    hide_dials(monkeypatch)
    with pytest.raises(ImportError, match=r"^the dispersion finder \(DIALS' own\) needs DIALS, "
                       r"which this Python cannot import \(No module named 'dials'\)"):
        create_finder("dispersion")
    assert create_finder("peakfinder8").name == "peakfinder8"

def test_activation_maps_of_chosen_panels_equal_those_of_all_panels():
    import numpy as np
    import torch

    from peaknet_xtal.evaluation.finders import PeakNetFinder
    from peaknet_xtal.model import create_model
    from peaknet_xtal.types import Frame

    torch.manual_seed(0)
    finder = PeakNetFinder(params={"model": create_model("default").eval(), "device": "cpu"})
    rng = np.random.default_rng(0)
    frame = Frame(panels=[rng.normal(10, 2, (40, 48)).astype(np.float32) for _ in range(3)])
    background, peak = finder.activation_maps(frame)
    (b1,), (p1,) = finder.activation_maps(frame, [1])
    assert len(background) == 3 and background[1].shape == (40, 48)
    # batched with other panels or alone: equal up to float32 summation order
    assert np.allclose(b1, background[1], atol=1e-5) and np.allclose(p1, peak[1], atol=1e-5)
    assert not np.allclose(p1, peak[0])


def test_peaknet_finder_records_and_runs_every_peak_setting():
    """A report's params say what ran: every peak setting of the engine, the shared defaults
    unless given, each reaching the engine; an unknown setting is an error, not ignored."""
    from peaknet_xtal.evaluation.finders import PeakNetFinder
    from peaknet_xtal.finding.settings import DEFAULTS

    finder = PeakNetFinder(params={"device": "cpu", "faint_support": 2, "faint_snr": 6.0})
    assert finder.params["rescue_prob"] == DEFAULTS.rescue_prob
    assert finder.params["faint_height"] == DEFAULTS.faint_height
    got = finder.engine.peak_params
    assert (got.faint_support, got.faint_snr, got.rescue_height) == (2, 6.0,
                                                                      DEFAULTS.rescue_height)
    with pytest.raises(ValueError, match="faint_sport"):
        PeakNetFinder(params={"faint_sport": 2})


def test_a_classic_finders_1_over_d_uses_the_frames_own_camera_length(frame, fixtures_dir,
                                                                      tmp_path):
    """Where the geometry reads the camera length from the data file, the classic finders'
    peaks get 1/d with the frame's own value, as PeakNet's do (it was left unknown)."""
    import h5py

    from peaknet_xtal.formats.geometry import parse_geometry

    text = (fixtures_dir / "geometry" / "two_panels.geom").read_text()
    by_path = parse_geometry(text.replace("clen = 0.08 m", "clen = /det/clen mm"))
    source = tmp_path / "frames.h5"
    with h5py.File(source, "w") as h5:
        h5["/det/clen"] = np.array([80.0])  # mm: the number the original geometry states
    read = Frame(frame.panels, frame.masks, source=str(source), geometry=by_path,
                 meta={"h5_file": str(source), "h5_index": 0})
    finder = create_finder("peakfinder8", {"adc_threshold": 50.0, "min_snr": 4.0,
                                           "min_pixel_count": 2})
    expected, found = finder.find(frame), finder.find(read)
    assert len(found) == len(expected) > 0
    np.testing.assert_allclose(found["one_over_d"], expected["one_over_d"], rtol=1e-9)
