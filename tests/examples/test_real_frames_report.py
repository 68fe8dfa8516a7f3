"""The real-frames report's scoring against DIALS' reference spot list (L-cysteine frames).

A stand-in finder that reports exactly the reference spots must score recall and precision 1;
one that reports them far from any spot must score 0 -- so the report's matching of
frames to reference spots (sweep and image from the file name, shoebox z range) and of peaks to
spots can fail.  The full report runs the shipped model: ``examples/real_frames_report.py``.
"""
from __future__ import annotations

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
    # DIALS' own dispersion is scored against the same list, whatever PeakNet reports
    assert 0 < result["dispersion_precision"] <= 1
