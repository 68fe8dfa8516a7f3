"""Paper rates on known hit/indexed lists, and per-frame indexing through the real ``dials.index``.

The DIALS test feeds ``index_frames`` the simulator's exact strong peaks of a hit, so the only
thing under test is the path peaks -> strong.refl -> ``dials.index`` -> cell: it must give back the
true lysozyme cell, and must not index a blank's random peaks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from peaknet_xtal.evaluation.indexing import (
    IndexingResult,
    index_frames,
    indexing_options,
    summarise,
)
from peaknet_xtal.evaluation.metrics import pipeline_rates
from peaknet_xtal.types import peaks_from_columns

LYSOZYME = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)


def test_pipeline_rates_follow_the_paper():
    hits = [True, True, False, True, False, True, True, False]
    indexed = [True, False, False, True, False, True, False, False]
    rates = pipeline_rates(hits, indexed)
    assert (rates["frames"], rates["hits"], rates["indexed"]) == (8, 5, 3)
    assert rates["hit_rate"] == pytest.approx(5 / 8)
    assert rates["indexing_rate"] == pytest.approx(3 / 5)
    assert rates["indexing_yield"] == pytest.approx(3 / 8)
    none = pipeline_rates([False, False], [False, False])
    assert none["hit_rate"] == 0.0 and math.isnan(none["indexing_rate"])
    assert none["indexing_yield"] == 0.0
    with pytest.raises(ValueError, match="indexed but not a hit"):
        pipeline_rates([False], [True])
    with pytest.raises(ValueError, match="differ in length"):
        pipeline_rates([True], [True, False])


def test_summarise_counts_only_indexed_hits_and_keeps_their_cells():
    cell_a, cell_b = (79.0, 79.2, 38.1, 90, 90, 90), (78.8, 79.0, 37.9, 90, 90, 90)
    results = [IndexingResult(True, cell_a, 40), IndexingResult(False, message="failed"),
               IndexingResult(True, cell_b, 35), IndexingResult(False, message="3 spots"),
               IndexingResult(True, (1, 1, 1, 90, 90, 90), 12)]
    # The last frame "indexed" but is no hit under this finder's hit rule: it must not count.
    hits = [True, True, True, False, False]
    rates = summarise(hits, results)
    assert (rates["hits"], rates["indexed"]) == (3, 2)
    assert rates["hit_rate"] == pytest.approx(3 / 5)
    assert rates["indexing_rate"] == pytest.approx(2 / 3)
    assert rates["indexing_yield"] == pytest.approx(2 / 5)
    assert rates["cells"] == [list(cell_a), list(cell_b)]


def test_indexing_options_carry_known_symmetry():
    options = indexing_options("P43212", LYSOZYME)
    assert "stills.indexer=sequences" in options
    assert "indexing.known_symmetry.space_group=P43212" in options
    assert "indexing.known_symmetry.unit_cell=79.1,79.1,38,90,90,90" in options
    assert not any("known_symmetry" in o for o in indexing_options())


@pytest.mark.dials
@pytest.mark.slow
def test_dials_indexes_true_peaks_of_a_hit_and_not_a_blank(real_data, dials_env, tmp_path):
    from peaknet_xtal.evaluation.indexing import import_images
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.output import read_truth
    from peaknet_xtal.sim.run import simulate_run

    geometry = read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    hit = simulate_run(geometry, 1, 5, tmp_path / "hit", SimConfig(cell="lysozyme"),
                       stream=False, progress=False)
    blank = simulate_run(geometry, 1, 6, tmp_path / "blank", SimConfig(hit_probability=0.0),
                         stream=False, progress=False)
    refl = read_truth(hit.truth)["reflections"]
    strong = refl[refl["strong"]]
    hit_peaks = peaks_from_columns(panel=strong["panel"], fs=strong["fs"], ss=strong["ss"],
                                   intensity=strong["photons"])
    rng = np.random.default_rng(0)
    n = 40
    noise_peaks = peaks_from_columns(panel=rng.integers(0, 64, n), fs=rng.uniform(5, 188, n),
                                     ss=rng.uniform(5, 180, n), intensity=np.full(n, 100.0))
    few = hit_peaks[:5]
    imported = import_images([hit.cxi, blank.cxi, hit.cxi], tmp_path / "dials")
    results = index_frames(imported, [hit_peaks, noise_peaks, few], tmp_path / "dials",
                           indexing_options("P43212", LYSOZYME), min_spots=10)
    assert len(strong) > 50
    assert results[0].indexed, results[0].message
    np.testing.assert_allclose(results[0].cell, LYSOZYME, rtol=0.01)
    assert results[0].n_indexed_spots >= 0.5 * len(strong)
    assert not results[1].indexed
    assert not results[2].indexed and results[2].message == "5 spots"
    assert not (tmp_path / "dials" / "frame_00002").exists()  # never handed to DIALS
