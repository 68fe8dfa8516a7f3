"""``peaknet2cxi --workers 2`` on bad inputs behaves as the single-process run: an unreadable
input ends the run with one error naming it after the frames of the others are kept, and the
warnings raised in the Ray workers reach the user, once each.

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
