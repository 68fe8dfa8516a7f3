"""The real-frames report's scoring against DIALS' reference spot list (L-cysteine frames).

A stand-in finder that reports exactly the reference spots must score recall and precision 1;
one that reports them far from any spot must score 0 -- so the report's matching of
frames to reference spots (sweep and image from the file name, shoebox z range) and of peaks to
spots can fail.  The full report runs the shipped model: ``examples/real_frames_report.py``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from peaknet_test_support import load_script

from peaknet_xtal.types import empty_peaks

pytestmark = pytest.mark.dials

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "real_frames_report.py"


def load_report() -> ModuleType:
    return load_script(SCRIPT)


class ReferenceFinder:
    """Reports the reference spots of the frame it is given, shifted by ``shift`` px."""

    def __init__(self, report: ModuleType, shift: float) -> None:
        self.frame_of = report.frame_of
        self.reference = report.reference_spots()
        self.shift = shift

    def find(self, imageset, index: int = 0) -> np.ndarray:
        spots = self.reference.get(self.frame_of(imageset.get_path(index)), np.zeros((0, 2)))
        peaks = empty_peaks(len(spots))
        peaks["fs"], peaks["ss"] = spots[:, 0] + self.shift, spots[:, 1]
        return peaks


@pytest.fixture(scope="module")
def report(real_data) -> ModuleType:
    return load_report()


def test_a_shoebox_has_one_top_image(report):
    """Each reference spot is at the top of its rocking curve on exactly one image of its
    shoebox (the one holding its z centroid), whichever images the shared data hold."""
    boxes = report.reference_shoeboxes()
    tops: dict[tuple[int, float, float], int] = {}
    for (sweep, _), rows in boxes.items():
        for row in rows:
            key = (sweep, float(row[0]), float(row[1]))
            tops[key] = tops.get(key, 0) + int(row[6])
    assert tops and set(tops.values()) == {1}


def test_reference_spots_cover_the_shared_frames(report):
    spots = report.reference_spots()
    assert report.frame_of(report.CYSTEINE / "l-cyst_02_00001.cbf.bz2") == (1, 0)  # id 1, z 0
    assert report.frame_of("l-cyst_01_00010.cbf.bz2") == (0, 9)
    frames = {report.frame_of(p) for p in report.CYSTEINE.glob("*.cbf.bz2")}
    assert frames <= set(spots)  # every shared frame has reference spots on it
    for xy in spots.values():
        assert np.all((xy >= 0) & (xy < [1475, 1679]))  # inside the Pilatus 2M panel (fs, ss)


@pytest.mark.parametrize("shift,expected", [(0.0, 1.0), (5000.0, 0.0)])  # 5000: off the panel
def test_scores_follow_where_the_peaks_are(report, tmp_path, shift, expected):
    from peaknet_xtal.evaluation.finders import DispersionFinder

    result = report.cysteine(ReferenceFinder(report, shift), DispersionFinder(), tmp_path)
    assert result["recall"] == pytest.approx(expected)
    assert result["precision"] == pytest.approx(expected)
    assert result["met"] is (expected == 1.0)
    assert len(result["frames"]) == 13 and (tmp_path / "lcysteine.png").exists()
    total = sum(r["peaknet"] for r in result["frames"])
    assert result["off_reference"] == round(total * (1 - expected))
    assert result["off_reference_on_dispersion"] == 0  # on the list, or off the panel
    # the missed spots split into tails and tops of their rocking curves, each counted once
    kinds = result["reference_missed_kinds"]
    spots = sum(r["reference"] for r in result["frames"])
    assert kinds["top"]["spots"] + kinds["tail"]["spots"] == round(spots * (1 - expected))
    if expected == 0.0:  # every image of a spot's shoebox: one top (on these 13 frames or not)
        assert 0 < kinds["top"]["spots"] < kinds["tail"]["spots"]
        assert 0 < kinds["top"]["brightest_min"] <= kinds["top"]["brightest_max"]
    # DIALS' own dispersion is scored against the same list, whatever PeakNet reports
    assert 0 < result["dispersion_precision"] <= 1
    assert 0 < result["dispersion_recall"] <= 1 and 0 < result["dispersion_recall_top"] <= 1
    assert result["recall_top"] == pytest.approx(expected)
    if expected == 0.0:  # every spot missed: the ones dispersion finds are among them
        found_by_dispersion = kinds["top"]["by_dispersion"] + kinds["tail"]["by_dispersion"]
        assert found_by_dispersion == round(result["dispersion_recall"] * spots)
    # a stand-in has no network: no probability to judge the missed spots by
    assert np.isnan(kinds["top"]["probability_max"])
    assert result["reference_missed_below_threshold"] == 0
    # the audit of the off-list peaks judges the first sweep's ten consecutive images
    audit = result["audit"]["peaknet"]
    assert audit["frames"] == 10 and audit["on_reference"] == round(audit["peaks"] * expected)
    if expected == 1.0:
        assert audit["off_reference_recurring"] == 0 and audit["on_reference_or_recurring"] == 1
    else:  # moved off the list, a spot that spans images still comes back on the next one
        assert 0 < audit["off_reference_recurring"] < audit["off_reference"]
    assert (tmp_path / "lcysteine_offlist.png").exists()
    spots = sum(r["reference"] for r in result["frames"])
    assert result["reference_missed"] == round(spots * (1 - expected))
    assert result["reference_missed_peak_within_2x"] == 0  # found, or 5000 px away


def test_recurring_needs_the_same_place_on_a_neighbouring_image(report):
    spot, elsewhere = np.array([[100.0, 200.0]]), np.array([[400.0, 50.0]])
    frames = [(0, 0), (0, 1), (0, 3), (1, 0)]
    points = [spot, spot + [1.0, -1.0], spot, spot]  # drifts 1.4 px: still the same place
    again, judged = report.recurring(frames, points)
    # image 3 has no neighbour here (2 and 4 are missing), nor has sweep 1's single image
    assert judged == [True, True, False, False]
    assert [bool(a[0]) for a in again] == [True, True, False, False]
    again, _ = report.recurring(frames, [spot, elsewhere, spot, spot])
    assert not again[0][0] and not again[1][0]  # a peak elsewhere on the next image
    again, _ = report.recurring(frames, [spot, spot + report.MATCH_PX + 1, spot, spot])
    assert not again[0][0]  # beyond MATCH_PX is another place
    assert report.frame_name((1, 0)) == "l-cyst_02_00001"
    assert report.frame_of(report.frame_name((0, 9)) + ".cbf.bz2") == (0, 9)


class _FlatEngine:
    """A segmenter that gives every pixel one peak probability."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict_panels(self, panels, masks=None):
        return [np.full(np.shape(p), self.value, np.float32) for p in panels]


@pytest.mark.parametrize("value", [0.3, 0.9])
def test_missed_spots_carry_the_networks_probability(report, tmp_path, value):
    """Spots missed with a probability map under the threshold count as the network's doubt;
    over it (lost to a later cut), they do not."""
    from peaknet_xtal.evaluation.finders import DispersionFinder
    from peaknet_xtal.finding.settings import DEFAULTS

    finder = ReferenceFinder(report, 5000.0)
    finder.engine = _FlatEngine(value)
    result = report.cysteine(finder, DispersionFinder(), tmp_path)
    kinds = result["reference_missed_kinds"]
    for kind in ("top", "tail"):
        assert kinds[kind]["probability_min"] == kinds[kind]["probability_max"] == \
            pytest.approx(value)
    if value < DEFAULTS.threshold:
        assert result["reference_missed_below_threshold"] == result["reference_missed"] > 0
    else:
        assert result["reference_missed_below_threshold"] == 0
    assert "finding threshold" in report.markdown({**_minimal(), "cysteine": result})


def _minimal() -> dict:
    """The report's other sections, empty, for :func:`markdown`."""
    return {"model": "stand-in", "min_peaks": 10, "cspad": [], "thaumatin": [],
            "eiger2": {"peaknet": 0, "hit": False, "peaknet_on_dispersion": 0,
                       "dispersion": 0, "max_counts": 0}, "seconds": 0.0}


def test_near_misses_are_counted_apart(report, tmp_path):
    """Peaks 4.5 px from every reference centroid: all missed at MATCH_PX, all within twice it."""
    from peaknet_xtal.evaluation.finders import DispersionFinder

    result = report.cysteine(ReferenceFinder(report, 4.5), DispersionFinder(), tmp_path)
    assert result["reference_missed"] > 0
    assert result["reference_missed_peak_within_2x"] == result["reference_missed"]


def test_each_data_set_is_a_run_of_its_own(report, tmp_path, monkeypatch, caplog):
    """The report's data sets are different detectors found by one finder.  Without a new run
    between them, what the finder learns over a run (pixel defects, a measured gain) carried
    from one detector to the next, and the once-a-run warning "panel shapes changed within the
    run" was printed at each later data set.  The sets here are stand-ins of three shapes, found
    by a real PeakFinder with a stand-in segmenter; the report's own loop drives them."""
    from peaknet_test_support import BrightPredictor, spot_panel

    from peaknet_xtal.finding import PeakFinder

    finder = PeakFinder(predictor=BrightPredictor(), adu_per_photon=1.0, threads=1)
    counted_before: dict[str, int] = {}

    def data_set(name: str, shape: tuple[int, int]):
        def step(peaknet, dispersion, plots):
            counted_before[name] = peaknet.engine.defects.tracker.frames
            return [len(peaknet.find(spot_panel(3, shape, seed=k))) for k in range(2)]
        return step

    monkeypatch.setattr(report, "both_finders", lambda model: (finder, None))
    monkeypatch.setattr(report, "model_identity", lambda spec: spec)
    monkeypatch.setattr(report, "markdown", lambda result: "")
    monkeypatch.setattr(report, "cspad_stills", lambda work: [])
    monkeypatch.setattr(report, "thaumatin", data_set("thaumatin", (96, 96)))
    monkeypatch.setattr(report, "cysteine", data_set("cysteine", (60, 78)))
    monkeypatch.setattr(report, "eiger2", data_set("eiger2", (96, 96)))
    with caplog.at_level(logging.WARNING):
        assert report.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path)]) == 0
    assert not [r for r in caplog.records if "panel shapes changed" in r.getMessage()]
    # every set starts from nothing counted, the third too (its shape is the first's)
    assert counted_before == {"thaumatin": 0, "cysteine": 0, "eiger2": 0}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["thaumatin"] == saved["cysteine"] == saved["eiger2"] == [3, 3]
