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


def test_symmetry_checks_need_cctbx_only_for_what_is_given(monkeypatch):
    """Without DIALS (cctbx is DIALS'), nothing given is nothing to check (every peaknet-eval
    run imported cctbx here, and failed without it); a space group or a cell is one line
    naming the option."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.evaluation.indexing import check_symmetry, parse_unit_cell

    hide_dials(monkeypatch)
    assert check_symmetry(None, None) is None and parse_unit_cell(None) is None
    with pytest.raises(ImportError, match=r"^--space-group P43212 \(checked by cctbx\) needs "
                       r"DIALS, which this Python cannot import \(No module named 'cctbx'\)"):
        check_symmetry("P43212", None)
    with pytest.raises(ImportError, match=r"^--unit-cell 79,79,38,90,90,90 \(checked by "
                       r"cctbx\) needs DIALS"):
        parse_unit_cell("79,79,38,90,90,90")

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


def crystals_table(rows: list[tuple[int, tuple[float, ...], str, str]]) -> np.ndarray:
    """A truth ``crystals`` table (as ``peaknet-sim`` writes it) from (frame, cell, lattice,
    centring) rows; crystal numbers count up within each frame."""
    from peaknet_xtal.sim.output import TruthWriter

    table = np.zeros(len(rows), dtype=TruthWriter.CRYSTAL_DTYPE)
    for i, (frame, cell, lattice, centring) in enumerate(rows):
        table[i]["frame"] = frame
        table[i]["crystal"] = sum(r[0] == frame for r in rows[:i])
        table[i]["cell"] = cell
        table[i]["lattice"] = lattice.encode()
        table[i]["centring"] = centring.encode()
    return table


def test_each_frame_is_indexed_with_its_own_crystal_from_the_truth():
    """peaknet-sim without a fixed cell gives every frame another crystal: a median of the cells
    matches none of them, so each frame gets its own cell and its lattice's space group."""
    from peaknet_xtal.evaluation.indexing import truth_symmetry

    thermolysin = (92.9, 92.9, 130.4, 90.0, 90.0, 120.0)
    gpcr = (61.5, 91.5, 151.1, 90.0, 98.5, 90.0)
    triclinic = (27.2, 31.9, 34.2, 88.5, 108.5, 111.9)
    crystals = crystals_table([(0, thermolysin, "hexagonal", "P"), (1, gpcr, "monoclinic", "C"),
                               (3, triclinic, "triclinic", "P"),
                               (3, LYSOZYME, "tetragonal", "P")])
    known = truth_symmetry(crystals, 4)
    assert [k.space_group for k in known] == ["P3", "C2", None, "P1"]
    assert [k.unit_cell for k in known] == [thermolysin, gpcr, None, triclinic]
    assert known[0].options() == [
        "indexing.known_symmetry.space_group=P3",
        "indexing.known_symmetry.unit_cell=92.9,92.9,130.4,90,90,120"]
    assert known[2].options() == []  # a blank: nothing known
    from cctbx import sgtbx, uctbx

    from peaknet_xtal.sim.crystal import PRESET_CELLS

    for preset in PRESET_CELLS.values():  # every lattice the simulator makes, DIALS can take
        (one,) = truth_symmetry(crystals_table([(0, preset.parameters, preset.lattice,
                                                 preset.centring)]), 1)
        group = sgtbx.space_group_info(one.space_group).group()
        assert group.is_compatible_unit_cell(uctbx.unit_cell(one.unit_cell)), preset


def test_symmetry_the_user_types_is_checked_before_any_work():
    from peaknet_xtal.evaluation.indexing import check_symmetry, parse_unit_cell

    assert parse_unit_cell("79.1,79.1,38,90,90,90") == LYSOZYME
    assert parse_unit_cell([79.1, 79.1, 38, 90, 90, 90]) == LYSOZYME
    assert parse_unit_cell(None) is None
    for bad, words in (("79,79,38", "6 numbers"), ("79,79,38,90,90,x", "6 numbers"),
                       ("79,-79,38,90,90,90", "zero or negative"),
                       ("79,79,38,90,90,190", "180")):
        with pytest.raises(ValueError, match=words):
            parse_unit_cell(bad)
    check_symmetry("P43212", LYSOZYME)
    check_symmetry(None, LYSOZYME)
    check_symmetry("P 43 21 2", None)
    with pytest.raises(ValueError, match=r"--space-group P9: .*not recognized"):
        check_symmetry("P9", None)
    with pytest.raises(ValueError, match="--unit-cell 79.1,70,38,90,90,90 does not fit "
                                         "space group P43212"):
        check_symmetry("P43212", (79.1, 70.0, 38.0, 90.0, 90.0, 90.0))


def test_summarise_counts_why_hits_were_not_indexed():
    """A run where DIALS refuses every frame must not look like a finder that found nothing
    indexable: the reasons are counted per message (non-hits are not tried, so not counted)."""
    refused = "Sorry: Space group symbol not recognized: P9"
    results = [IndexingResult(False, message=refused), IndexingResult(False, message=refused),
               IndexingResult(True, (1, 1, 1, 90, 90, 90), 30),
               IndexingResult(False, message="Sorry: No suitable lattice could be found."),
               IndexingResult(False, message="3 spots")]
    rates = summarise([True, True, True, True, False], results)
    assert rates["failures"] == {refused: 2, "Sorry: No suitable lattice could be found.": 1}


def test_progress_counts_only_the_frames_handed_to_dials(monkeypatch, tmp_path):
    """Tuning frames (before ``first``) and non-hits are never indexed: the bar counts neither,
    and the frame folders keep the frame's number in the data set."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal import progress
    from peaknet_xtal.evaluation import indexing

    experiments = ["e0", "e1", "e2", "e3"]
    monkeypatch.setattr(ExperimentListFactory, "from_json_file",
                        staticmethod(lambda *a, **k: experiments))
    handed: list[tuple[object, str, list[str]]] = []

    def fake_index(experiment, peaks, folder, options, env):
        handed.append((experiment, folder.name, list(options)))
        return IndexingResult(True, (1.0,) * 6, len(peaks))

    monkeypatch.setattr(indexing, "_index_one", fake_index)
    totals: list[int | None] = []

    class Recorder(progress.Progress):
        def __init__(self, total, *args, **kwargs):
            totals.append(total)
            super().__init__(total, *args, **kwargs)

    monkeypatch.setattr(progress, "Progress", Recorder)
    spots = peaks_from_columns(panel=np.zeros(12, int), fs=np.arange(12.0), ss=np.arange(12.0))
    known = [[], ["k2"], ["k3"]]
    results = index_frames(tmp_path / "imported.expt", [spots[:3], spots, spots],
                           tmp_path / "finder", ["base"], min_spots=10, first=1, known=known)
    assert [r.indexed for r in results] == [False, True, True]
    assert totals == [2]
    assert handed == [("e2", "frame_00002", ["base", "k2"]),
                      ("e3", "frame_00003", ["base", "k3"])]
