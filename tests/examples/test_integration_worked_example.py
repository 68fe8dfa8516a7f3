"""The worked example's chain on a tiny run: real DIALS indexing from PeakNet's peaks,
peaknet-integrate on the indexed tables, the unmerged MTZ the merger reads -- and careless itself
where its separate environment (bin/setup-merge-env) exists.

The full run (200 frames, minutes) is ``examples/integration_worked_example.py``; here 3 frames
go through the same functions via its ``main``, so a broken step anywhere fails this test.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from peaknet_test_support import load_script

pytestmark = [pytest.mark.dials, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "integration_worked_example.py"
MERGE_ENV = ROOT / ".venv-merge"
FRAMES = 3


def load_example() -> ModuleType:
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, dials_env) -> dict[str, Any]:
    example = load_example()
    root = tmp_path_factory.mktemp("worked")
    work, out = root / "work", root / "out"
    # careless runs only where its environment exists; a handful of steps checks the plumbing.
    example.main(["--frames", str(FRAMES), "--jobs", "2", "--iterations", "20",
                  "--merge-env", str(MERGE_ENV), "--work", str(work), "--out", str(out)])
    return {"example": example, "work": work, "out": out}


def read_table(path: Path):
    from dials.array_family import flex

    return flex.reflection_table.from_file(str(path))


def test_dials_indexes_our_peaks_consistently_with_the_truth(chain):
    """Every frame is a lysozyme hit: DIALS must index them from PeakNet's peaks with the true
    cell, and each observation's asymmetric-unit index must be the true one (a setting that
    differs by more than the structure's symmetry would scramble the merge)."""
    import json

    from dxtbx.model.experiment_list import ExperimentList

    folder = chain["work"] / "dials"
    indexed = ExperimentList.from_file(str(folder / "indexed.expt"), check_format=False)
    assert len(indexed) >= FRAMES - 1, f"{len(indexed)} of {FRAMES} frames indexed"
    for crystal in indexed.crystals():
        np.testing.assert_allclose(crystal.get_unit_cell().parameters(),
                                   (79.1, 79.1, 38.0, 90, 90, 90), rtol=0.02)
    report = json.loads((chain["out"] / "merged.json").read_text())
    agreement = report["index_agreement"]
    assert agreement["matched"] >= 0.9 * agreement["of"]
    assert agreement["same_asu_index"] >= 0.95, agreement


def test_peaknet_integrate_fills_vi_and_summation_for_indexed_reflections(chain):
    folder = chain["work"] / "dials"
    table = read_table(folder / "integrated" / "indexed_only_vi.refl")
    assert len(table) == len(read_table(folder / "indexed_only.refl")) > 50
    assert (np.asarray(table["id"].as_numpy_array()) >= 0).all()
    vi = np.asarray(table["intensity.vi.value"].as_numpy_array())
    vsum = np.asarray(table["intensity.vsum.value"].as_numpy_array())
    var = np.asarray(table["intensity.vi.variance"].as_numpy_array())
    ok = np.isfinite(vi) & np.isfinite(vsum)
    assert ok.mean() > 0.9
    assert (var[ok] > 0).all()
    # the two estimates of the same spots agree on which are strong
    assert np.corrcoef(vi[ok], vsum[ok])[0, 1] > 0.8


def test_likelihood_estimate_is_exported_beside_the_posterior(chain):
    """intensity.vi_lik (what the merger gets) is the VI's likelihood alone: it tracks the
    posterior mean on strong spots, and only it can read below zero (weak spots)."""
    table = read_table(chain["work"] / "dials" / "integrated" / "indexed_only_vi.refl")
    lik = np.asarray(table["intensity.vi_lik.value"].as_numpy_array())
    post = np.asarray(table["intensity.vi.value"].as_numpy_array())
    var = np.asarray(table["intensity.vi_lik.variance"].as_numpy_array())
    ok = np.isfinite(lik) & np.isfinite(post)
    assert ok.mean() > 0.9 and (var[ok] > 0).all()
    strong = ok & (post > 10 * np.sqrt(np.asarray(
        table["intensity.vi.variance"].as_numpy_array())))
    assert strong.sum() > 10
    np.testing.assert_allclose(lik[strong], post[strong], rtol=0.2)
    assert (post[ok] > 0).all()


@pytest.mark.parametrize("method", ["vi_lik", "vi", "vsum"])
def test_unmerged_mtz_holds_each_integration_unchanged(chain, method):
    """The MTZ careless reads: one row per integrated observation, I and SIGI exactly the chosen
    method's value and sqrt(variance) (dials.export applies no correction), indices in the P43212
    asymmetric unit, one BATCH per crystal, detector positions present, and each observation's
    Ewald offset (the partiality proxy careless documents for stills) equal to |s0 + A h| - |s0|
    of its crystal, recomputed here from the indexed experiments."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    example = chain["example"]
    folder = chain["work"] / "dials"
    table = read_table(folder / "integrated" / "indexed_only_vi.refl")
    value = np.asarray(table[f"intensity.{method}.value"].as_numpy_array())
    sigma = np.sqrt(np.asarray(table[f"intensity.{method}.variance"].as_numpy_array()))
    ok = np.isfinite(value) & np.isfinite(sigma)
    mtz = example.read_mtz_columns(folder / f"{method}.mtz", ["I", "SIGI", "BATCH", "XDET",
                                                               "YDET"])
    assert len(mtz["I"]) == ok.sum()
    np.testing.assert_allclose(np.sort(mtz["I"]), np.sort(value[ok]), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.sort(mtz["SIGI"]), np.sort(sigma[ok]), rtol=1e-5, atol=1e-3)
    n_crystals = len(set(np.asarray(table["id"].as_numpy_array()).tolist()))
    assert len(np.unique(mtz["BATCH"])) == n_crystals
    assert (mtz["XDET"] >= 0).all() and (mtz["XDET"] <= 768).all()
    symmetry = crystal.symmetry(unit_cell=example.CELL, space_group_symbol=example.SPACE_GROUP)
    indices = flex.miller_index([tuple(map(int, r)) for r in mtz["hkl"]])
    in_asu = miller.set(symmetry, indices, anomalous_flag=False).map_to_asu().indices()
    assert list(in_asu) == list(indices)
    # Ewald offsets: recomputed from each observation's crystal (BATCH order = experiment order)
    from dxtbx.model.experiment_list import ExperimentList
    from iotbx import mtz as iotbx_mtz

    experiments = ExperimentList.from_file(str(folder / "indexed.expt"), check_format=False)
    obj = iotbx_mtz.object(str(folder / f"{method}.mtz"))
    original = np.array(obj.extract_original_index_miller_indices(), float).reshape(-1, 3)
    offsets = np.asarray(obj.get_column("EWALD_OFFSET").extract_values().as_numpy_array())
    batches = np.unique(mtz["BATCH"])
    for eid, batch in enumerate(batches):
        rows = mtz["BATCH"] == batch
        a = np.array(experiments[eid].crystal.get_A()).reshape(3, 3)
        s0 = np.array(experiments[eid].beam.get_s0())
        expected = np.linalg.norm(original[rows] @ a.T + s0, axis=1) - np.linalg.norm(s0)
        np.testing.assert_allclose(offsets[rows], expected, atol=1e-6)
    # a still records spots near the sphere: offsets of a few 1e-3 1/A at most
    assert np.abs(offsets).max() < 0.01 and np.abs(offsets).mean() > 1e-6


def test_careless_reads_the_mtz_and_merges_both(chain):
    careless_python = MERGE_ENV / "bin" / "python"
    if not careless_python.exists():
        pytest.skip(f"no merge environment at {MERGE_ENV} (bin/setup-merge-env builds it: "
                    "careless needs TensorFlow and numpy 2, which the project's venv cannot hold)")
    folder = chain["work"] / "dials"
    # reciprocalspaceship, as careless uses it, reads the exported observations back
    code = "\n".join([
        "import sys, reciprocalspaceship as rs",
        "d = rs.read_mtz(sys.argv[1])",
        "types = ' '.join(f'{k}:{getattr(v, \"mtztype\", \"\")}' for k, v in d.dtypes.items())",
        "print(len(d), d.merged, d.spacegroup.hm, types)"])
    for method in chain["example"].METHODS:
        proc = subprocess.run([str(careless_python), "-c", code, str(folder / f"{method}.mtz")],
                              capture_output=True, text=True, check=True)
        rows, merged_flag, rest = proc.stdout.strip().split(" ", 2)
        assert merged_flag == "False", proc.stdout  # read as unmerged observations (M/ISYM)
        table = read_table(folder / "integrated" / "indexed_only_vi.refl")
        assert int(rows) == np.isfinite(np.asarray(
            table[f"intensity.{method}.value"].as_numpy_array())).sum()
        assert "P 43 21 2" in rest
        for column in ("I:J", "SIGI:Q", "BATCH:B", "XDET:R", "YDET:R", "EWALD_OFFSET:R"):
            assert column in rest, proc.stdout
        merged = chain["example"].read_mtz_columns(chain["work"] / "careless" /
                                                   f"{method}_0.mtz", ["I", "SigI"])
        assert len(merged["I"]) > 0.5 * len(np.unique(
            chain["example"].read_mtz_columns(folder / f"{method}.mtz", [])["hkl"], axis=0))
        assert np.isfinite(merged["I"]).all() and (merged["I"] > 0).all()
