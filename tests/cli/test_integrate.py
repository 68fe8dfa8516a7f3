"""peaknet-integrate on a simulated run: CXI peak tables and a stream in, VI columns out."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.integrate import main
from peaknet_xtal.errors import FormatError


@pytest.fixture(scope="module")
def run(integrate_sim_run):
    return integrate_sim_run


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
    with h5py.File(out / run.cxi.name) as h5:  # every new column says its unit
        units = {name: h5[f"/entry_1/result_1/{name}"].attrs.get("units")
                 for name in ("peakPhotonsVI", "peakPhotonsVILikSigma", "peakBackgroundVI",
                              "peakProfileXPosRaw")}
    assert units == {"peakPhotonsVI": "photons", "peakPhotonsVILikSigma": "photons",
                     "peakBackgroundVI": "photons per pixel",
                     "peakProfileXPosRaw": "pixel (0-based pixel centre, raw slab)"}
    # a rerun with the same settings keeps the finished output untouched
    stamp = (out / run.cxi.name).stat().st_mtime_ns
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--read-noise", "0.15",
                 "--no-progress"]) == 0
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
    assert main([str(run.stream), "-o", str(out), "--read-noise", "0.15", "--no-progress"]) == 0
    again = read_stream(out / run.stream.name)
    assert [c.key for c in again.chunks] == [c.key for c in after.chunks]


def _one_error_line(capsys, *names):
    """The command's user error: one line on stderr naming the file(s), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "peaknet-integrate: error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], err
    return lines[0]


def test_bad_input_names_the_file_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing.cxi"), "-g", str(run.geom), "-o", str(out)]) == 1
    _one_error_line(capsys, "missing.cxi", "file not found")
    fake = tmp_path / "fake.cxi"
    fake.write_text("not hdf5")
    assert main([str(fake), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 1
    _one_error_line(capsys, "fake.cxi")
    (tmp_path / "peaks.txt").write_text("x")
    assert main([str(tmp_path / "peaks.txt"), "-o", str(out)]) == 1
    _one_error_line(capsys, "peaks.txt")
    assert main([str(run.cxi), "-o", str(out)]) == 1
    _one_error_line(capsys, "geometry")
    assert not (out / "fake.cxi").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left over
    # Python callers of run() still get the exception itself
    from peaknet_xtal.cli.integrate import DEFAULTS
    from peaknet_xtal.cli.integrate import run as run_integrate

    with pytest.raises(FormatError, match="missing.cxi"):
        run_integrate({**DEFAULTS, "inputs": [str(tmp_path / "missing.cxi")],
                       "geometry": str(run.geom), "output": str(out)})


@pytest.mark.parametrize("kind", ["cxi", "stream"])
def test_output_folder_holding_the_input_is_refused_before_any_work(kind, run, tmp_path,
                                                                    capsys):
    """-o the folder holding the input: a CXI input was skipped as its own finished output (the
    log said to delete it), a stream's chunks counted as done; nothing integrated, exit 0.  Now
    one line naming the input, exit 1, nothing written; from another folder, and for Python
    callers of run() too."""
    from peaknet_xtal.cli.integrate import DEFAULTS
    from peaknet_xtal.cli.integrate import run as run_integrate

    here = tmp_path / "data"
    here.mkdir()
    if kind == "cxi":
        given = here / run.cxi.name
        given.write_bytes(run.cxi.read_bytes())
        options = ["-g", str(run.geom)]
    else:
        given = here / run.stream.name
        given.write_text(run.stream.read_text().replace(f"Image filename: {run.cxi.name}",
                                                        f"Image filename: {run.cxi}"))
        options = []
    before = given.read_bytes()
    assert main([str(given), *options, "-o", str(here), "--no-progress"]) == 1
    _one_error_line(capsys, str(given), "would be this input itself", "another output folder")
    # the same folder named another way (with a trailing "/.") is the same file
    assert main([str(given), *options, "-o", f"{tmp_path}/data/.", "--no-progress"]) == 1
    _one_error_line(capsys, str(given), "would be this input itself")
    assert sorted(p.name for p in here.iterdir()) == [given.name]
    assert given.read_bytes() == before
    with pytest.raises(FormatError, match="would be this input itself"):
        run_integrate({**DEFAULTS, "inputs": [str(given)], "output": str(here),
                       "geometry": str(run.geom) if kind == "cxi" else None})


def test_a_peak_table_with_more_rows_than_frames_is_refused(run, tmp_path, capsys):
    """A CXI file whose peak table has rows past its images was integrated up to the images
    and written whole, its extra rows NaN, exit 0; it is one line naming the file."""
    altered = tmp_path / "altered.cxi"
    altered.write_bytes(run.cxi.read_bytes())
    with h5py.File(altered, "r+") as h5:
        group = h5["/entry_1/result_1"]
        for name in list(group):
            values = group[name][()]
            del group[name]
            group[name] = np.concatenate([values, values[:1]])
    assert main([str(altered), "-g", str(run.geom), "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 1
    _one_error_line(capsys, str(altered), "rows for", "frames of images")


def test_two_inputs_of_one_name_are_refused_before_one_overwrites_the_other(run, tmp_path,
                                                                            capsys):
    """Outputs are named after their inputs: a/run.cxi and b/run.cxi both went to OUT/run.cxi,
    the second over the first, exit 0.  One line naming both, exit 1, nothing written."""
    copies = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        copies.append(tmp_path / folder / run.cxi.name)
        copies[-1].write_bytes(run.cxi.read_bytes())
    out = tmp_path / "out"
    assert main([*map(str, copies), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 1
    _one_error_line(capsys, str(copies[1]), str(copies[0]), "separate output folders")
    assert not out.exists() or not any(out.iterdir())
    # one file named twice is one input, integrated once
    assert main([str(copies[0]), str(copies[0]), "-g", str(run.geom), "-o", str(out),
                 "--no-progress"]) == 0


def test_stream_whose_images_are_missing_is_one_line_and_leaves_no_output(run, tmp_path,
                                                                          capsys):
    """A stream from another machine (its images not here): one line naming the stream, its
    line and the image, exit 1; no header-only stream under the final name, no partial file
    (it would hold nothing)."""
    stream = tmp_path / "elsewhere.stream"
    name = f"Image filename: {run.cxi.name}"
    stream.write_text(run.stream.read_text().replace(name, "Image filename: /nowhere/e88.h5"))
    assert "/nowhere/e88.h5" in stream.read_text()
    out = tmp_path / "out"
    assert main([str(stream), "-o", str(out), "--no-progress"]) == 1
    line = _one_error_line(capsys, "elsewhere.stream", "/nowhere/e88.h5", "not found")
    assert "line " in line
    assert not (out / stream.name).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stream_naming_a_frame_its_image_lacks_is_one_line(run, tmp_path, capsys):
    """``Event: //99`` of a 2-frame file: one line naming the stream, its line, the event and
    the image (it was a traceback: IndexError from the reader)."""
    stream = tmp_path / "beyond.stream"
    text = run.stream.read_text().replace(f"Image filename: {run.cxi.name}",
                                          f"Image filename: {run.cxi}")
    assert "Event: //1\n" in text
    stream.write_text(text.replace("Event: //1\n", "Event: //99\n"))
    assert main([str(stream), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    line = _one_error_line(capsys, "beyond.stream", "'//99'", run.cxi.name, "out of range")
    assert "line " in line


def test_interrupted_stream_keeps_its_frames_under_a_partial_name_and_continues(run, tmp_path,
                                                                                capsys):
    """The first frame's image is there, the second's is not: the first frame's chunk is kept
    under the partial name (nothing processed is lost), the final name holds nothing; with the
    image back, the same command continues and renames the finished stream."""
    from peaknet_xtal.formats.stream import read_stream
    from peaknet_xtal.integration.files import partial_path

    name = f"Image filename: {run.cxi.name}"
    text = run.stream.read_text().replace(name, f"Image filename: {run.cxi}")
    second = text.index("----- Begin chunk -----", text.index("----- Begin chunk -----") + 1)
    stream = tmp_path / "two.stream"
    stream.write_text(text[:second] + text[second:].replace(str(run.cxi), str(tmp_path / "b.cxi")))
    out = tmp_path / "out"
    assert main([str(stream), "-o", str(out), "--no-progress"]) == 1
    _one_error_line(capsys, "b.cxi", "not found")
    final, part = out / stream.name, partial_path(out / stream.name)
    assert not final.exists()
    kept = read_stream(part)
    assert len(kept.chunks) == 1 and kept.chunks[0].crystals[0].reflections is not None
    first_i = kept.chunks[0].crystals[0].reflections["I"].copy()
    (tmp_path / "b.cxi").symlink_to(run.cxi)
    assert main([str(stream), "-o", str(out), "--no-progress"]) == 0
    assert not part.exists()
    done = read_stream(final)
    assert len(done.chunks) == 2
    np.testing.assert_array_equal(done.chunks[0].crystals[0].reflections["I"], first_i)


def test_a_run_draws_every_spot_it_integrated_and_names_the_plot(run, tmp_path, capsys):
    """OUTPUT/integrate.png: a PNG of the VI likelihood's I/sigma and its photons against
    summation's, drawn from every spot the run integrated (those the CXI output holds), named
    in the summary line and in --help; a rerun that integrates nothing keeps it."""
    import matplotlib.image

    from peaknet_xtal.cli.integrate import DEFAULTS, summary_line
    from peaknet_xtal.cli.integrate import run as run_integrate
    from peaknet_xtal.integration.files import RunStats

    out, stats = tmp_path / "out", RunStats()
    run_integrate({**DEFAULTS, "inputs": [str(run.cxi)], "geometry": str(run.geom),
                   "output": str(out), "progress": False}, stats)
    plot = out / "integrate.png"
    assert stats.plot == plot
    assert summary_line(stats).endswith(f"I/sigma and VI against summation: {plot}")
    height, width, _ = matplotlib.image.imread(plot).shape
    assert width > height > 100
    table = _peaks(out / run.cxi.name)
    valid = np.arange(table["peakXPosRaw"].shape[1])[None, :] < table["nPeaks"][:, None]
    drawn = stats.plotted()
    assert len(drawn["lik_photons"]) == stats.spots == valid.sum()
    for name, column in (("lik_photons", "peakPhotonsVILik"), ("lik_sigma",
                         "peakPhotonsVILikSigma"), ("sum_photons", "peakPhotonsSum")):
        np.testing.assert_allclose(drawn[name], table[column][valid], rtol=1e-5)
    stamp = plot.stat().st_mtime_ns
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 0
    assert plot.stat().st_mtime_ns == stamp
    assert "integrate.png" not in capsys.readouterr().out  # nothing drawn this time
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "OUTPUT/integrate.png" in " ".join(capsys.readouterr().out.split())


def test_a_plot_that_cannot_be_written_leaves_the_run_as_it_was(run, tmp_path, capsys,
                                                                monkeypatch, caplog):
    """The picture is never worth a run: savefig failing (a full disk, say) is one warning
    naming the plot; the outputs, the exit status and the summary line (without a plot) are
    as they would be, and nothing half-written is left."""
    from matplotlib.figure import Figure

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", refuse)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 0
    assert _peaks(out / run.cxi.name)["peakPhotonsVILik"].size
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [run.cxi.name, "integrate_config.json", "integrate_inputs.json"])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(out / "integrate.png") in warned[0], warned
    assert "No space left" in warned[0]
    last = capsys.readouterr().out.splitlines()[-1]
    assert "spots integrated" in last and "integrate.png" not in last


def test_placeholder_gain_of_the_geometry_is_measured(run, tmp_path):
    """A geometry declaring the placeholder 1 ADU/photon for a detector of 8.5: the gain is
    measured from the background, so the photons match those of the true gain."""
    geom = tmp_path / "placeholder.geom"
    geom.write_text(run.geom.read_text().replace("adu_per_photon = 8.5", "adu_per_photon = 1"))
    assert "adu_per_photon = 1\n" in geom.read_text()
    true_out, measured_out = tmp_path / "true", tmp_path / "measured"
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(true_out), "--no-progress"]) == 0
    assert main([str(run.cxi), "-g", str(geom), "-o", str(measured_out), "--no-progress"]) == 0
    truth, measured = _peaks(true_out / run.cxi.name), _peaks(measured_out / run.cxi.name)
    valid = np.arange(truth["peakXPosRaw"].shape[1])[None, :] < truth["nPeaks"][:, None]
    ratio = np.median(measured["peakPhotonsVILik"][valid] / truth["peakPhotonsVILik"][valid])
    assert ratio == pytest.approx(1.0, abs=0.1)


@pytest.mark.dials
def test_dials_table_gets_vi_columns(run, tmp_path, dials_env):
    """An .expt read by dxtbx (the project's CXI format class) and a .refl of predicted
    positions: the written table carries intensity.vi.* beside DIALS' own columns."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    expt, refl, _, rows, _ = _dials_frame0(run, tmp_path / "frame0")
    experiments = ExperimentList.from_file(str(expt))
    experiments[0].identifier = "frame-0"  # as dials.import names it
    experiments.as_file(str(expt))
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
    # dials.integrate's slots and flags, which dials.export reads (it found no integrated
    # reflection before): the likelihood as the profile fit, the box sum as the summation
    for slot, ours, flag in (("prf", "vi_lik", result.flags.integrated_prf),
                             ("sum", "vsum", result.flags.integrated_sum)):
        for part in ("value", "variance"):
            np.testing.assert_array_equal(result[f"intensity.{slot}.{part}"].as_numpy_array(),
                                          result[f"intensity.{ours}.{part}"].as_numpy_array())
        variance = result[f"intensity.{slot}.variance"].as_numpy_array()
        flagged = result.get_flags(flag).as_numpy_array()
        np.testing.assert_array_equal(flagged, np.isfinite(variance) & (variance > 0))
        assert flagged.sum() > 0.9 * len(rows)
    # a table of predictions (as dials.predict writes) names no experiment and has no observed
    # position; dials.export needs both ('Corrupted identifiers', "Unknown column
    # 'xyzobs.px.value'"): the experiments' identifiers, and the VI profile's centroid
    assert result.are_experiment_identifiers_consistent(experiments)
    assert dict(result.experiment_identifiers()) == {0: "frame-0"}
    observed = np.array(list(result["xyzobs.px.value"])).reshape(-1, 3)
    predicted = np.array(list(result["xyzcal.px"])).reshape(-1, 3)
    near = np.hypot(*(observed[:, :2] - predicted[:, :2]).T)[strong]
    assert np.median(near) < 0.5  # the profile sits on the bright spot it integrated


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


def _dials_frame0(run, folder, geom_text=None):
    """frame0.expt over a copy of the run's CXI file (with ``geom_text`` as its geometry, if
    given) and a .refl of frame 0's true reflections at their predicted positions."""
    import shutil

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from peaknet_xtal.sim.output import read_truth

    folder.mkdir()
    cxi = folder / run.cxi.name
    shutil.copyfile(run.cxi, cxi)
    (folder / run.geom.name).write_text(geom_text or run.geom.read_text())
    experiments = ExperimentListFactory.from_filenames([str(cxi)])
    expt = folder / "frame0.expt"
    ExperimentList([experiments[0]]).as_file(str(expt))
    rows = read_truth(run.truth)["reflections"]
    rows = rows[rows["frame"] == 0]
    table = flex.reflection_table()
    table["id"] = flex.int(len(rows), 0)
    table["panel"] = flex.size_t(rows["panel"].astype(np.uint64).tolist())
    table["xyzcal.px"] = flex.vec3_double(list(zip((rows["fs"] + 0.5).tolist(),
                                                   (rows["ss"] + 0.5).tolist(),
                                                   [0.0] * len(rows), strict=True)))
    table["d"] = flex.double((1.0 / rows["one_over_d"]).tolist())
    refl = folder / "frame0.refl"
    table.as_file(str(refl))
    return expt, refl, cxi, rows, experiments[0].detector[0].get_gain()


@pytest.mark.dials
def test_dials_placeholder_gain_is_measured_from_the_background(run, tmp_path, dials_env,
                                                                caplog):
    """The image format declares 1 ADU/photon (a placeholder, like CBF on the CSPAD) for a
    detector of 8.5: the gain is measured from the image's background, so the photons come out
    right (not ADU); --adu-per-photon still wins; the log says which gain and why."""
    from dials.array_family import flex

    expt, refl, _, rows, declared = _dials_frame0(
        run, tmp_path / "data",
        run.geom.read_text().replace("adu_per_photon = 8.5", "adu_per_photon = 1"))
    assert declared == 1.0
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="peaknet_xtal"):
        assert main([str(expt), "--refl", str(refl), "-o", str(out), "--read-noise", "0.15",
                     "--no-progress"]) == 0
    said = [r.getMessage() for r in caplog.records if "detector gain" in r.getMessage()]
    assert len(said) == 1 and "placeholder" in said[0], said
    result = flex.reflection_table.from_file(str(out / "frame0_vi.refl"))
    lik = np.asarray(result["intensity.vi_lik.value"].as_numpy_array())
    strong = rows["snr"] > 10
    assert strong.sum() > 10
    assert np.median(lik[strong] / rows["photons"][strong]) == pytest.approx(1.0, abs=0.15)
    # the user's gain wins over both the declared and the measured one
    forced = tmp_path / "forced"
    assert main([str(expt), "--refl", str(refl), "-o", str(forced), "--adu-per-photon", "1",
                 "--no-progress"]) == 0
    adu = np.asarray(flex.reflection_table.from_file(str(forced / "frame0_vi.refl"))[
        "intensity.vi_lik.value"].as_numpy_array())
    assert np.median(adu[strong] / rows["photons"][strong]) == pytest.approx(8.5, rel=0.15)


@pytest.mark.dials
def test_a_dials_expt_without_dials_is_one_line_before_any_input_is_integrated(
        run, tmp_path, monkeypatch, capsys):
    """In a Python without DIALS, the stream before an .expt was integrated and the .expt then
    failed with a traceback (No module named 'dxtbx').  The .expt is now named before any
    input is integrated, with what to do."""
    from peaknet_test_support import hide_dials

    expt, refl = tmp_path / "indexed.expt", tmp_path / "indexed.refl"
    expt.write_text("{}")  # never read: DIALS is looked for first
    refl.write_bytes(b"")
    hide_dials(monkeypatch)
    out = tmp_path / "out"
    code = main([str(run.stream), str(expt), "--refl", str(refl), "-o", str(out),
                 "--no-progress"])
    assert code == 1
    assert _one_error_line(capsys) == (
        f"peaknet-integrate: error: reading {expt} (a DIALS experiment list) needs DIALS, which "
        "this Python cannot import (No module named 'dxtbx'): install Debian's dials package "
        "or a conda DIALS and run from that environment (README, Quick start); nothing was "
        "written")
    assert not out.exists()  # asked before the run's record is written


@pytest.mark.dials
def test_a_dials_expt_with_a_dials_that_fails_to_load_is_one_line_before_any_work(
        run, tmp_path, monkeypatch, capsys):
    """A DIALS that is there but fails to load (a compiled extension that does not) passed the
    check, which only looked for its packages, and the .expt failed after the inputs before it
    were integrated.  What reading it imports is now imported at the start, in a child
    process: one line naming what failed, nothing written."""
    from peaknet_test_support import break_dials

    expt, refl = tmp_path / "indexed.expt", tmp_path / "indexed.refl"
    expt.write_text("{}")  # never read: DIALS is asked for first
    refl.write_bytes(b"")
    broken = break_dials(monkeypatch, tmp_path / "broken")
    out = tmp_path / "out"
    assert main([str(run.stream), str(expt), "--refl", str(refl), "-o", str(out),
                 "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"peaknet-integrate: error: reading {expt} (a DIALS experiment list) "
                           "needs DIALS, which is installed but fails to load in this Python "
                           f"(importing dials.array_family.flex: ImportError: {broken})"), line
    assert line.endswith("; nothing was written"), line
    assert not out.exists()


def test_dials_expt_whose_images_are_missing_is_one_line(run, tmp_path, dials_env, capsys):
    """An .expt whose images are not on this machine: one line naming the .expt and the image,
    exit 1, nothing written under the output name."""
    expt, refl, cxi, _, _ = _dials_frame0(run, tmp_path / "data")
    cxi.unlink()
    out = tmp_path / "out"
    assert main([str(expt), "--refl", str(refl), "-o", str(out), "--adu-per-photon", "8.5",
                 "--no-progress"]) == 1
    _one_error_line(capsys, "frame0.expt", str(cxi), "not found")
    assert not (out / "frame0_vi.refl").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("device", ["cuda:7"])
def test_a_device_that_cannot_run_here_is_a_usage_error(device, tmp_path, capsys):
    """A GPU this machine lacks is refused before work, by the finder's own device check, with
    the devices it has (a GPU index beyond those present passed on a GPU machine)."""
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "any.stream"), "-o", str(tmp_path / "out"), "--device", device])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"--device: device {device!r}: " in err and "available here: auto, cpu" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
