"""peaknet-sim end to end: the files of a run agree with each other and with the truth."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.sim import main
from peaknet_xtal.formats.cxi import iter_cxi_frames
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.formats.stream import read_stream
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.sim.output import read_truth


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("simrun")
    cfg = out / "cfg.yaml"
    cfg.write_text("sim:\n  cell: thermolysin\n  hit_probability: 0.6\n")
    geom = real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom"
    assert main(["-g", str(geom), "-n", "4", "--seed", "10", "-o", str(out),
                 "--config", str(cfg)]) == 0
    return out, geom


def test_cxi_stack_reads_back_with_its_geom(run_dir):
    out, source_geom = run_dir
    geometry = read_geometry(out / "sim.geom")
    assert geometry.clen_m is not None and geometry.wavelength_A == pytest.approx(1.3)
    assert geometry.peak_list == "/entry_1/result_1"
    frames = list(iter_cxi_frames(out / "sim.cxi", geometry))
    assert len(frames) == 4
    # Frame 2 regenerated alone from its seed is the stored frame.
    again, _ = simulate_frame(read_geometry(source_geom), 12,
                              SimConfig(cell="thermolysin", hit_probability=0.6))
    for stored, fresh in zip(frames[2].panels, again.panels, strict=False):
        np.testing.assert_array_equal(stored, fresh)
    with h5py.File(out / "sim.cxi") as h5:
        assert h5.attrs["peaknet_geometry"] == "sim.geom"


def test_truth_stream_and_peak_table_agree(run_dir):
    out, _ = run_dir
    truth = read_truth(out / "sim_truth.h5")
    frames = truth["frames"]
    assert list(frames["seed"]) == [10, 11, 12, 13]
    assert 0 < frames["hit"].sum() < 4 or frames["hit"].all()
    stream = read_stream(out / "sim.stream")
    geometry = read_geometry(out / "sim.geom")
    assert [c.event for c in stream.chunks] == ["//0", "//1", "//2", "//3"]
    with h5py.File(out / "sim.cxi") as h5:
        n_peaks = h5["/entry_1/result_1/nPeaks"][()]
    for i, chunk in enumerate(stream.chunks):
        refl = truth["reflections"][truth["reflections"]["frame"] == i]
        strong = refl[refl["strong"]]
        assert chunk.n_peaks == len(strong) == n_peaks[i]
        assert len(chunk.crystals) == frames["n_crystals"][i]
        table = chunk.peak_table(geometry)
        np.testing.assert_allclose(table["fs"], strong["fs"], atol=0.006)
        np.testing.assert_allclose(table["one_over_d"], strong["one_over_d"], atol=0.002)
        rows = truth["crystals"][truth["crystals"]["frame"] == i]
        for crystal, row in zip(chunk.crystals, rows, strict=False):
            np.testing.assert_allclose(crystal.astar, row["A"][:, 0] * 10, atol=1e-6)
            assert crystal.a == pytest.approx(row["cell"][0], abs=1e-3)
            assert crystal.n_reflections == len(refl[refl["crystal"] == row["crystal"]])


def test_a_damaged_truth_file_is_an_error_naming_it(run_dir, tmp_path):
    """A truncated truth file (it reached peaknet-eval as h5py's "Unable to synchronously open
    file" without a name) or one without its tables is a FormatError naming the file."""
    from peaknet_xtal.errors import FormatError

    out, _ = run_dir
    whole = (out / "sim_truth.h5").read_bytes()
    cut = tmp_path / "cut_truth.h5"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FormatError, match="not a readable HDF5 file") as err:
        read_truth(cut)
    assert str(cut) in str(err.value)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["reflections"] = np.zeros(3)
    with pytest.raises(FormatError, match="no readable frames table") as err:
        read_truth(other)
    assert str(other) in str(err.value)


def test_bad_sim_setting_is_a_usage_error(tmp_path, real_data, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sim:\n  bfactor: 3\n")
    geom = real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom"
    with pytest.raises(SystemExit) as stop:
        main(["-g", str(geom), "-n", "1", "-o", str(tmp_path / "o"), "--config", str(cfg)])
    assert stop.value.code == 2
    assert "'sim.bfactor' (did you mean 'sim.b_factor'?)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def small_geometry(make_geometry_text):
    from peaknet_xtal.formats.geometry import parse_geometry

    return parse_geometry(make_geometry_text(["p0"], 64, 48, [(-32.0, -24.0)], clen="0.05 m"))


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_run_that_fails_leaves_the_earlier_one_as_it_was(tmp_path, small_geometry):
    """Files are staged and published together: a failure after every file is written (here the
    configuration record, as a full disk would) or on the first frame changes nothing."""
    from peaknet_xtal.sim.run import simulate_run

    out = tmp_path / "run"
    simulate_run(small_geometry, 2, 1, out, progress=False,
                 record=lambda staging: (staging / "sim_config.json").write_text("first"))
    before = _files(out)
    assert sorted(before) == ["sim.cxi", "sim.geom", "sim.stream", "sim_config.json",
                              "sim_truth.h5"]

    def full_disk(staging):
        # called once the run's files are complete, before any of them is published
        assert sorted(p.name for p in staging.iterdir()) == ["sim.cxi", "sim.geom",
                                                             "sim.stream", "sim_truth.h5"]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        simulate_run(small_geometry, 2, 5, out, progress=False, record=full_disk)
    assert _files(out) == before
    with pytest.raises(ValueError, match="unknown preset cell"):
        simulate_run(small_geometry, 2, 5, out, SimConfig(cell="bogus"), progress=False)
    assert _files(out) == before
    with pytest.raises(ValueError, match="unknown preset cell"):
        simulate_run(small_geometry, 2, 5, tmp_path / "new", SimConfig(cell="bogus"),
                     progress=False)
    assert not (tmp_path / "new").exists()  # nor a folder of its own


def test_a_complete_run_replaces_the_earlier_one_whole(tmp_path, small_geometry):
    from peaknet_xtal.sim.run import simulate_run

    out = tmp_path / "run"
    simulate_run(small_geometry, 2, 1, out, progress=False,
                 record=lambda staging: (staging / "sim_config.json").write_text("first"))
    before = _files(out)
    paths = simulate_run(small_geometry, 1, 9, out, stream=False, progress=False,
                         record=lambda staging: (staging / "sim_config.json").write_text("2nd"))
    after = _files(out)
    assert sorted(after) == ["sim.cxi", "sim.geom", "sim_config.json", "sim_truth.h5"]
    assert after["sim_config.json"] == b"2nd" and after["sim.cxi"] != before["sim.cxi"]
    assert paths.cxi == out / "sim.cxi" and paths.stream is None
    assert read_truth(out / "sim_truth.h5")["frames"]["seed"].tolist() == [9]


def test_a_run_needs_a_frame(tmp_path, small_geometry):
    from peaknet_xtal.sim.run import simulate_run

    with pytest.raises(ValueError, match="n_frames must be >= 1"):
        simulate_run(small_geometry, 0, 1, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
