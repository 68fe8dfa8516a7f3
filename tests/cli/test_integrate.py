"""peaknet-integrate on a simulated run: CXI peak tables and a stream in, VI columns out."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.integrate import main
from peaknet_xtal.errors import FormatError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from peaknet_xtal.integration.simdata import SPOT_RADIUS, default_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    config = SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                       read_noise=0.15, adu_per_photon=8.5, incident_photons=3e12)
    return simulate_run(default_geometry(), 2, 7, tmp_path_factory.mktemp("sim"), config,
                        progress=False)


def _peaks(path):
    with h5py.File(path, "r") as h5:
        group = h5["/entry_1/result_1"]
        return {name: group[name][()] for name in group}


def test_cxi_peaks_get_photons_close_to_the_truth(run, tmp_path):
    out = tmp_path / "out"
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--read-noise", "0.15",
                 "--no-progress"]) == 0
    table = _peaks(out / run.cxi.name)
    valid = np.arange(table["peakXPosRaw"].shape[1])[None, :] < table["nPeaks"][:, None]
    assert valid.sum() > 50
    truth = table["peakTotalIntensity"][valid] / 8.5  # the simulator's expected photons
    vi, sd = table["peakPhotonsVI"][valid], table["peakPhotonsVISigma"][valid]
    assert np.isfinite(vi).all() and (sd > 0).all()
    assert np.isnan(table["peakPhotonsVI"][~valid]).all()
    assert np.corrcoef(vi, truth)[0, 1] > 0.95
    # the profile centroid lands near the spot; the background is near the simulated level
    dist = np.hypot(table["peakProfileXPosRaw"][valid] - table["peakXPosRaw"][valid],
                    table["peakProfileYPosRaw"][valid] - table["peakYPosRaw"][valid])
    assert np.median(dist) < 0.5
    assert np.isfinite(table["peakPhotonsSum"][valid]).all()
    assert (out / "integrate_config.json").exists()
    # a rerun keeps the finished output untouched
    stamp = (out / run.cxi.name).stat().st_mtime_ns
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 0
    assert (out / run.cxi.name).stat().st_mtime_ns == stamp


def test_stream_reflections_get_vi_intensities_and_resume(run, tmp_path):
    from peaknet_xtal.formats.stream import read_stream

    out = tmp_path / "out"
    assert main([str(run.stream), "-o", str(out), "--read-noise", "0.15", "--no-progress"]) == 0
    before = read_stream(run.stream)
    after = read_stream(out / run.stream.name)
    assert len(after.chunks) == len(before.chunks) == 2
    old = np.concatenate([x.reflections for c in before.chunks for x in c.crystals])
    new = np.concatenate([x.reflections for c in after.chunks for x in c.crystals])
    assert (old[["h", "k", "l"]] == new[["h", "k", "l"]]).all()
    # the input stream's I is the true expected signal (in ADU); the new one is measured
    assert not np.allclose(old["I"], new["I"])
    strong = old["I"] / np.maximum(old["sigma"], 1e-9) > 10
    assert np.corrcoef(old["I"][strong], new["I"][strong])[0, 1] > 0.95
    assert (new["sigma"] > 0).all()
    # rerun after an interruption: cut the output inside its second chunk, run again
    text = (out / run.stream.name).read_text()
    cut = text.rindex("----- Begin chunk -----") + 200
    (out / run.stream.name).write_text(text[:cut])
    assert main([str(run.stream), "-o", str(out), "--no-progress"]) == 0
    again = read_stream(out / run.stream.name)
    assert [c.key for c in again.chunks] == [c.key for c in after.chunks]


def test_bad_input_names_the_file_and_writes_nothing(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FormatError, match="missing.cxi"):
        main([str(tmp_path / "missing.cxi"), "-g", str(run.geom), "-o", str(out)])
    fake = tmp_path / "fake.cxi"
    fake.write_text("not hdf5")
    with pytest.raises(FormatError, match="fake.cxi"):
        main([str(fake), "-g", str(run.geom), "-o", str(out), "--no-progress"])
    with pytest.raises(FormatError, match="peaks.txt"):
        (tmp_path / "peaks.txt").write_text("x")
        main([str(tmp_path / "peaks.txt"), "-o", str(out)])
    with pytest.raises(FormatError, match="geometry"):
        main([str(run.cxi), "-o", str(out)])
    assert not (out / "fake.cxi").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left over


@pytest.mark.dials
def test_dials_table_gets_vi_columns(run, tmp_path, dials_env):
    """An .expt read by dxtbx (the project's CXI format class) and a .refl of predicted
    positions: the written table carries intensity.vi.* beside DIALS' own columns."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from peaknet_xtal.sim.output import read_truth

    experiments = ExperimentListFactory.from_filenames([str(run.cxi)])
    single = ExperimentList([experiments[0]])
    expt = tmp_path / "frame0.expt"
    single.as_file(str(expt))
    truth = read_truth(run.truth)["reflections"]
    rows = truth[truth["frame"] == 0]
    table = flex.reflection_table()
    table["id"] = flex.int(len(rows), 0)
    table["panel"] = flex.size_t(rows["panel"].astype(np.uint64).tolist())
    table["xyzcal.px"] = flex.vec3_double(list(zip((rows["fs"] + 0.5).tolist(),
                                                   (rows["ss"] + 0.5).tolist(),
                                                   [0.0] * len(rows), strict=True)))
    table["d"] = flex.double((1.0 / rows["one_over_d"]).tolist())
    refl = tmp_path / "frame0.refl"
    table.as_file(str(refl))
    out = tmp_path / "out"
    assert main([str(expt), "--refl", str(refl), "-o", str(out), "--adu-per-photon", "8.5",
                 "--read-noise", "0.15", "--no-progress"]) == 0
    result = flex.reflection_table.from_file(str(out / "frame0_vi.refl"))
    vi = np.asarray(result["intensity.vi.value"].as_numpy_array())
    var = np.asarray(result["intensity.vi.variance"].as_numpy_array())
    assert len(vi) == len(rows) and (var > 0).all()
    strong = rows["snr"] > 10
    assert np.corrcoef(vi[strong], rows["photons"][strong])[0, 1] > 0.95
    assert "intensity.vsum.value" in result and "background.vi.mean" in result


def test_dials_table_with_unindexed_rows_and_no_d(run, tmp_path, dials_env):
    """A raw ``indexed.refl`` has unindexed rows (id -1) and no ``d`` column: the indexed rows are
    integrated, the others keep NaN; no crash (DIALS' compute_d refuses id -1)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from peaknet_xtal.sim.output import read_truth

    experiments = ExperimentListFactory.from_filenames([str(run.cxi)])
    expt = tmp_path / "frame0.expt"
    ExperimentList([experiments[0]]).as_file(str(expt))
    rows = read_truth(run.truth)["reflections"]
    rows = rows[rows["frame"] == 0]
    ids = np.zeros(len(rows), dtype=int)
    ids[::4] = -1
    table = flex.reflection_table()
    table["id"] = flex.int(ids.tolist())
    table["panel"] = flex.size_t(rows["panel"].astype(np.uint64).tolist())
    table["xyzcal.px"] = flex.vec3_double(list(zip((rows["fs"] + 0.5).tolist(),
                                                   (rows["ss"] + 0.5).tolist(),
                                                   [0.0] * len(rows), strict=True)))
    hkl = np.stack([rows["h"], rows["k"], rows["l"]], axis=1).astype(int).tolist()
    table["miller_index"] = flex.miller_index([tuple(m) for m in hkl])
    refl = tmp_path / "indexed.refl"
    table.as_file(str(refl))
    out = tmp_path / "out"
    assert main([str(expt), "--refl", str(refl), "-o", str(out), "--adu-per-photon", "8.5",
                 "--no-progress"]) == 0
    result = flex.reflection_table.from_file(str(out / "indexed_vi.refl"))
    vi = np.asarray(result["intensity.vi.value"].as_numpy_array())
    assert len(vi) == len(rows)
    assert np.isnan(vi[ids < 0]).all() and np.isfinite(vi[ids >= 0]).all()
