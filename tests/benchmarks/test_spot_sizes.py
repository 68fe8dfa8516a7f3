"""benchmarks/spot_sizes.py: spots are planted at the SNR asked for, scored by distance, and the
widest width reported is the last of an unbroken run of found ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

from peaknet_xtal.types import peaks_from_columns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "spot_sizes.py")


@pytest.mark.parametrize("snr, sigma, background", [(10.0, 1.0, 20.0), (30.0, 4.0, 2.0),
                                                    (5.0, 0.7, 0.0)])
def test_spot_photons_give_the_snr_asked_for(script, snr, sigma, background):
    photons = script.spot_photons(snr, sigma, background)
    area = np.pi * (2 * sigma) ** 2
    assert photons / np.sqrt(photons + area * background) == pytest.approx(snr)


def test_planted_spots_hold_their_photons_apart(script):
    centres = script.spot_centres(np.random.default_rng(0))
    gaps = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert len(centres) == 144 and gaps[gaps > 0].min() >= 40
    image = script.expected_photons(centres, 2.0, 500.0)
    assert image.sum() == pytest.approx(500.0 * len(centres), rel=1e-3)
    y, x = np.round(centres[0]).astype(int)
    assert image[y - 8:y + 9, x - 8:x + 9].sum() == pytest.approx(500.0, rel=0.01)


def test_score_counts_found_spots_and_far_peaks(script):
    centres = np.array([[100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    peaks = peaks_from_columns(ss=[101.0, 202.5, 150.0], fs=[100.5, 200.0, 150.0])
    # sigma 1: found within 2 px (only the first), false from 3 px on (only the third)
    assert script.score(peaks, centres, 1.0) == (pytest.approx(1 / 3), 1)
    # sigma 2: found within 4 px (the first two)
    assert script.score(peaks, centres, 2.0) == (pytest.approx(2 / 3), 1)
    assert script.score(peaks[:0], centres, 1.0) == (0.0, 0)


def test_widest_stops_at_the_first_miss(script):
    rows = [script.Row(20, 10, s, {"a": f}, {}, {}) for s, f in
            [(1.0, 1.0), (2.0, 0.95), (3.0, 0.5), (4.0, 0.95)]]
    assert script.widest(rows, "a") == 2.0
    assert script.widest(rows[2:3], "a") is None


@pytest.mark.dials
def test_the_script_measures_both_finders_on_the_same_frames(script, capsys, tmp_path):
    assert script.main(["--sigmas", "1", "--snrs", "30", "--backgrounds", "20",
                        "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("20"))
    values = row.split()
    assert len(values) == 4 + 2 * 4  # bg SNR sigma FWHM, then found, false hit / blank twice
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "widest spot sigma" in out
