"""``peaknet2cxi --workers 2`` on bad inputs behaves as the single-process run: an unreadable
input ends the run with one error naming it after the frames of the others are kept, the
warnings raised in the Ray workers reach the user, once each, and an input of another detector
than the first input's (no -g) is refused as the single-process run refuses it.

A trial found both broken: a list of 200 good frames and a complex-valued file exited 1 with
no CXI file written (every good frame's result thrown away), and the warnings a worker raised
(a frame's non-finite pixels masked, a file's missing mask) were never shown, Ray being started
with ``log_to_driver=False``.  One local Ray (2 CPUs) serves the module.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import peaknet_bad_inputs as badinputs
import pytest

from peaknet_xtal.cli import peaknet2cxi
from peaknet_xtal.formats.cxi import read_cxi_peaks
from peaknet_xtal.pipeline.ray_session import ray_session

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_geometry_text):
    root = tmp_path_factory.mktemp("bad_inputs")
    base = badinputs.make_base(root, make_geometry_text)
    cases = {case.name: case for case in badinputs.image_cases(base, root)}
    return base, cases


def run(args: list[str], out: Path, capsys, workers: int) -> tuple[int, str]:
    capsys.readouterr()
    extra = ["--workers", str(workers)] if workers > 1 else []
    code = peaknet2cxi.main([*args, "-o", str(out), "--threads", "1", "--no-progress",
                             "--frames-per-file", "1", *extra])
    return code, capsys.readouterr().err


def frames_in(out: Path) -> set[tuple[str, ...]]:
    return {tuple(k) for p in sorted(out.glob("peaks-*.cxi")) for k in read_cxi_peaks(p).keys}


def test_an_unreadable_input_keeps_the_frames_of_the_others_as_single_process_does(
        local_ray, inputs, tmp_path, capsys):
    base, cases = inputs
    bad = cases["string_dtype"].path
    args = [str(base.cxi), str(bad), "-g", str(base.geom)]
    serial_code, serial_err = run(args, tmp_path / "one", capsys, workers=1)
    code, err = run(args, tmp_path / "two", capsys, workers=2)
    assert (code, serial_code) == (1, 1), err
    good = {(str(base.cxi.resolve()), f"//{i}") for i in range(base.n_frames)}
    assert frames_in(tmp_path / "two") == good == frames_in(tmp_path / "one")
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "numbers" in errors[0], err
    assert "source" not in errors[0]  # the input's own error, not the stage that read it
    # the same words as the single-process run, the output folder aside
    assert (err.replace(str(tmp_path / "two"), "OUT").splitlines()
            == serial_err.replace(str(tmp_path / "one"), "OUT").splitlines())
    assert re.search(r"the \d+ CXI file\(s\) finished before it are kept in", err), err
    # finished, so a rerun skips them (and fails again on the same file)
    files = sorted((tmp_path / "two").glob("peaks-*.cxi"))
    code, err = run(args, tmp_path / "two", capsys, workers=2)
    assert code == 1 and str(bad) in err
    pipeline = json.loads((tmp_path / "two" / "peaknet2cxi.pipeline.json").read_text())
    assert (pipeline["resumed_keys"], pipeline["written"]) == (base.n_frames, 0)
    record = json.loads((tmp_path / "two" / "peaknet2cxi.json").read_text())
    assert record["this_run"]["skipped"] == base.n_frames  # the failed run's record says so too
    assert sorted((tmp_path / "two").glob("peaks-*.cxi")) == files


def test_the_workers_warnings_are_shown_once_each_as_single_process_shows_them(
        local_ray, inputs, tmp_path, capsys, caplog):
    _, cases = inputs
    case = cases["nan_pixels"]
    args = [str(case.path), "-g", str(case.geometry)]
    said = []
    for workers in (2, 1):  # Ray first, as in a process of its own
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code, err = run(args, tmp_path / f"w{workers}", capsys, workers=workers)
        assert code == 0, err
        said.append(Counter(r.getMessage() for r in caplog.records
                            if r.name == "peaknet_xtal.finding.sanitise"))
    ray, serial = said
    assert serial and all("non-finite" in m and str(case.path) in m for m in serial)
    assert ray == serial


def test_the_workers_counts_of_unusable_pixels_reach_the_summary_as_single_process_ones(
        local_ray, inputs, tmp_path, capsys):
    """The warnings promise the run summary's counts once they stop; a --workers run's
    summary line and peaknet2cxi.json hold the same counts as the single-process run's."""
    _, cases = inputs
    case = cases["nan_pixels"]
    tallies, lines = [], []
    for workers in (2, 1):
        capsys.readouterr()
        code = peaknet2cxi.main([str(case.path), "-g", str(case.geometry), "-o",
                                 str(tmp_path / f"w{workers}"), "--threads", "1",
                                 "--no-progress", *(["--workers", "2"] if workers > 1 else [])])
        out = capsys.readouterr().out
        assert code == 0
        summary = json.loads((tmp_path / f"w{workers}" / "peaknet2cxi.json").read_text())
        tallies.append(summary["this_run"]["unusable_pixels"])
        lines.append([line for line in out.splitlines() if "had unusable pixels" in line])
    assert tallies[0] == tallies[1] and tallies[0]["nonfinite_pixels"] > 0
    assert lines[0] == lines[1] and len(lines[0]) == 1


def _detector_run(root: Path, name: str, frames: int, height: int, width: int,
                  make_geometry_text) -> Path:
    """A CXI stack and the geometry beside it that peaknet2cxi reads it with (``NAME.geom``),
    without -g."""
    data = np.random.default_rng(frames).poisson(5, (frames, height, width)).astype(np.float32)
    path = root / f"{name}.cxi"
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    (root / f"{name}.geom").write_text(make_geometry_text(
        ["p0"], width, height, [(-width / 2, -height / 2)], adu_per_photon="1"))
    return path


def test_two_detectors_without_g_end_as_the_single_process_run_ends(
        local_ray, tmp_path, capsys, make_geometry_text):
    """Two inputs of different detectors and no -g: the error names the second input, whose
    geometry does not fit the first's, and every frame of the first is kept, none of the
    second, as in the single-process run.  The inputs are read in parallel, and the writer
    took the folder's geometry from the first frame it met: with the first input's frames
    larger (slower to read), that was the second input's, and the run blamed the first and
    kept the second's frames."""
    first = _detector_run(tmp_path, "near", 12, 96, 96, make_geometry_text)
    second = _detector_run(tmp_path, "far", 2, 40, 48, make_geometry_text)
    args = [str(first), str(second)]
    serial_code, serial_err = run(args, tmp_path / "one", capsys, workers=1)
    code, err = run(args, tmp_path / "two", capsys, workers=2)
    assert (code, serial_code) == (1, 1), err
    errors = [line.replace(str(tmp_path / "two"), "OUT") for line in err.splitlines()
              if line.startswith("peaknet2cxi:")]
    assert errors == [line.replace(str(tmp_path / "one"), "OUT")
                      for line in serial_err.splitlines() if line.startswith("peaknet2cxi:")]
    assert errors[0] == (f"peaknet2cxi: error: {second}: its detector geometry differs from "
                         f"that of the first input, {first}; one output folder holds one "
                         "geometry: process each detector into its own output folder (-o) "
                         "(what is already written is kept)"), err
    kept = {(str(first), f"//{i}") for i in range(12)}
    assert frames_in(tmp_path / "two") == kept == frames_in(tmp_path / "one")


@pytest.mark.dials
def test_a_missing_nexus_data_file_is_named_as_single_process_names_it(local_ray, tmp_path,
                                                                      capsys, dials_env):
    """A rotation NXmx master opens without its data file and fails on its first image: the
    Ray sources said only "cannot read image 0"; now the single-process run's words, naming
    the missing data file."""
    import numpy as np
    from peaknet_test_support import tiny_nxmx

    stack = np.random.default_rng(0).poisson(3, (2, 40, 48)).astype(np.uint16)
    master = tiny_nxmx(tmp_path / "in", stack, still=False)
    (tmp_path / "in" / "tiny_data_000001.h5").unlink()
    serial_code, serial_err = run([str(master)], tmp_path / "one", capsys, workers=1)
    code, err = run([str(master)], tmp_path / "two", capsys, workers=2)
    assert (code, serial_code) == (1, 1), err
    errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error:")]
    assert len(errors) == 1, err
    assert f"{master}: a NeXus file that DIALS cannot read" in errors[0]
    assert "missing: tiny_data_000001.h5" in errors[0]
    assert errors == [line for line in serial_err.splitlines()
                      if line.startswith("peaknet2cxi: error:")]
