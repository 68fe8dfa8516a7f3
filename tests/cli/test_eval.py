"""peaknet-eval through main() on a tiny simulated run: tuned classic finders, report numbers.

Real components throughout: a simulated CSPAD 2x2 run on disk, peakfinder8 (cfelpyutils) and
DIALS' dispersion threshold, matplotlib PNGs.  Frames (seeds 8, 9, 10): a hit (used only to
tune), a hit and a blank.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from peaknet_xtal.cli.eval import main
from peaknet_xtal.evaluation import FINDERS
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.model.weights_io import DEFAULT_NAME, WEIGHTS_DIR
from peaknet_xtal.sim import SimConfig
from peaknet_xtal.sim.output import read_truth
from peaknet_xtal.sim.run import simulate_run
from peaknet_xtal.types import Frame, empty_peaks

pytestmark = pytest.mark.dials


@pytest.fixture(scope="module")
def sim_run(real_data, tmp_path_factory):
    geometry = read_geometry(real_data / "crystfel_geometry" / "psgeom_cspad-2x2-approx1.geom")
    folder = tmp_path_factory.mktemp("evalrun")
    simulate_run(geometry, 3, 8, folder, SimConfig(hit_probability=0.6), stream=False,
                 progress=False)
    return folder


def test_eval_cli_tunes_scores_and_draws(sim_run, tmp_path, capsys, dials_env):
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "peakfinder8", "dispersion",
                 "--tune-frames", "1", "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    truth = read_truth(sim_run / "sim_truth.h5")
    assert list(truth["frames"]["hit"]) == [True, True, False]
    refl = truth["reflections"]
    n_strong = [int(np.sum(refl["strong"] & (refl["frame"] == i))) for i in range(3)]
    assert report["frames"] == 2 and report["tuning_frames"] == 1
    for label in ("peakfinder8", "dispersion"):
        entry = report["finders"][label]
        acc = entry["accuracy"]
        assert acc["n_true"] == n_strong[1] + n_strong[2] and n_strong[2] == 0 < n_strong[1]
        assert acc["n_found"] == sum(entry["peaks_per_frame"])
        assert acc["recall"] == pytest.approx(acc["n_matched"] / n_strong[1])
        assert acc["precision"] == pytest.approx(acc["n_correct"] / acc["n_found"])
        # Tuned baselines on a clean simulated hit find most strong spots, few false ones.
        assert acc["f1"] > 0.6 and acc["median_error_px"] < 1.0, (label, acc)
        # The blank is no hit; the hit is.
        assert entry["peaks_per_frame"][1] < 10 <= entry["peaks_per_frame"][0]
        assert entry["hit_rate"] == 0.5
        tuning = entry["tuning"]
        assert entry["params"] == {**entry["params"], **tuning["best"]}
        assert tuning["best_score"]["f1"] == max(p["f1"] for p in tuning["points"] if p["f1"]
                                                 is not None)
        assert f"{label:24s} F1 {acc['f1']:.3f}  hit rate 0.500" in printed
    assert report["finders"]["dispersion"]["params"]["gain"] == pytest.approx(
        read_geometry(sim_run / "sim.geom").adu_per_photon)
    from PIL import Image

    assert "scores.png" in report["figures"] and len(report["figures"]) == 4
    for name in report["figures"]:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    text = (out / "report.md").read_text()
    assert all(f"({name})" in text for name in report["figures"])
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "peaknet-eval" and config["config"]["tune_frames"] == 1


def test_config_file_typo_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("tune_frame: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "-o", str(tmp_path / "report"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "eval.yaml" in err and "'tune_frame'" in err and "'tune_frames'" in err


def test_tuning_on_every_frame_is_an_error_not_an_empty_report(sim_run, tmp_path, capsys):
    """Three frames, all asked for tuning: nothing would be scored (an F1 of NaN that exited 0);
    a missing run folder is one line too."""
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "dispersion",
                 "--tune-frames", "3"]) == 1
    assert "all taken by --tune-frames 3: nothing left to score" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    assert main([str(tmp_path / "nothing"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peaknet-eval: error:") and "Traceback" not in err


def one_error_line(err: str) -> str:
    """The whole of stderr, which must be one ``peaknet-eval: error:`` line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peaknet-eval: error: "), err
    return lines[0]


def test_a_typo_in_finders_is_one_line_before_any_work(sim_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "peaknet:default", "pf8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown finder 'pf8'" in line and "peakfinder8" in line
    assert main([str(sim_run), "-o", str(out), "--finders", "dispersion:fast"]) == 2
    assert "only peaknet takes a model suffix" in one_error_line(capsys.readouterr().err)
    missing = tmp_path / "retrained.safetensors"
    assert main([str(sim_run), "-o", str(out), "--finders", "dispersion",
                 f"peaknet:{missing}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "model weights not found" in line
    assert "'default' for the shipped model" in line  # what a model setting takes
    assert not out.exists()  # refused before anything was written


def test_symmetry_dials_cannot_take_is_refused_before_any_work(sim_run, tmp_path, capsys):
    """dials.index would die on every frame ("Space group symbol not recognized") and the
    report would say 0 indexed; cctbx checks the symbols at once."""
    out = tmp_path / "report"
    for args, words in ((["--space-group", "P9"], "--space-group P9: Space group symbol not "
                                                  "recognized"),
                        (["--unit-cell", "79,79,38"], "--unit-cell 79,79,38: give 6 numbers"),
                        (["--space-group", "P43212", "--unit-cell", "79.1,70,38,90,90,90"],
                         "does not fit space group P43212")):
        assert main([str(sim_run), "-o", str(out), "--index", *args]) == 2, args
        assert words in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_without_dials_what_needs_it_is_one_line_and_the_rest_runs(tmp_path, monkeypatch,
                                                                   capsys):
    """A Python without DIALS: every run failed with a traceback, since the symmetry check
    imported cctbx with no --space-group or --unit-cell given.  Now a run of finders that need
    no DIALS passes the checks; the dispersion finder (a default), --index and the symmetry
    options are one line each naming what needs DIALS, before any work (exit 2)."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.cli.eval import DEFAULTS, check

    hide_dials(monkeypatch)
    check({**DEFAULTS, "finders": ["peaknet:default"]})  # needs no DIALS: nothing said
    out = tmp_path / "report"
    install = ("which this Python cannot import (No module named '{}'): install Debian's dials "
               "package or a conda DIALS and run from that environment (README, Quick start)")
    for args, begins, ends in (
            ([], "--finders dispersion: the dispersion finder (DIALS' own) needs DIALS, "
                 + install.format("dials"),
             "; or give --finders without dispersion (the default includes it); nothing was "
             "written"),
            (["--finders", "peaknet:default", "--index"],
             "--index needs DIALS, " + install.format("dxtbx"),
             "; or run without --index; nothing was written"),
            (["--finders", "peaknet:default", "--space-group", "P43212"],
             "--space-group P43212 (checked by cctbx) needs DIALS, " + install.format("cctbx"),
             "(README, Quick start)")):
        assert main([str(tmp_path), "-o", str(out), *args]) == 2, args
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"peaknet-eval: error: {begins}") and line.endswith(ends), line
    assert not out.exists()


@pytest.mark.dials
@pytest.mark.parametrize("args, needs", [
    ([], "--finders dispersion: the dispersion finder (DIALS' own)"),
    (["--finders", "peaknet:default", "--index"], "--index")])
def test_a_dials_that_fails_to_load_is_one_line_before_any_work(args, needs, tmp_path,
                                                              monkeypatch, capsys):
    """A DIALS that is there but fails to load (a compiled extension that does not) passed the
    checks, which imported the threshold alone or only looked for the packages, and stopped
    the dispersion finder at its first frame, after the finders before it, or --index after
    every finder ran.  The modules they import are now imported at the start, in a child
    process: one line naming what failed, exit 2, nothing written."""
    from peaknet_test_support import break_dials

    broken = break_dials(monkeypatch, tmp_path / "broken")
    out = tmp_path / "report"
    assert main([str(tmp_path), "-o", str(out), *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"peaknet-eval: error: {needs} needs DIALS, which is installed but "
                           "fails to load in this Python (importing dials.array_family.flex: "
                           f"ImportError: {broken})"), line
    assert line.endswith("; nothing was written"), line
    assert not out.exists()


def test_data_that_is_no_sim_run_folder_says_what_is_expected(sim_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sim_run / "sim.cxi"), "-o", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "sim.cxi is a file: expected a peaknet-sim output folder" in line
    peaks = tmp_path / "peaks"
    peaks.mkdir()
    (peaks / "peaks-0.cxi").write_bytes(b"")
    assert main([str(peaks), "-o", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "expected a peaknet-sim output folder; sim.cxi, sim.geom, sim_truth.h5 missing" in line
    assert not out.exists()


def test_trained_models_of_one_file_name_keep_their_own_activation_maps(sim_run, tmp_path,
                                                                        monkeypatch):
    """Every peaknet-train output is model.safetensors: two of them, from two run folders, as a
    user compares them.  Each gets its own activation maps, named after the folder that tells
    them apart, and report.md shows each figure once."""
    monkeypatch.chdir(tmp_path)
    runs = ("t1", "d1")
    for run in runs:
        (tmp_path / "runs" / run).mkdir(parents=True)
        shutil.copy(WEIGHTS_DIR / f"{DEFAULT_NAME}.safetensors",
                    tmp_path / "runs" / run / "model.safetensors")
    labels = [f"peaknet:runs/{run}/model.safetensors" for run in runs]
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", *labels, "--samples", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    maps = [n for n in report["figures"] if n.startswith("activation")]
    assert len(set(maps)) == len(maps) == len(labels), maps
    for label, run in zip(labels, runs, strict=True):
        name = report["finders"][label]["file_name"]
        assert run in name
        assert [n for n in maps if n.endswith(f"_{name}.png")] == [n for n in maps if run in n]
    text = (out / "report.md").read_text()
    for name in report["figures"]:
        assert (out / name).is_file() and text.count(f"({name})") == 1, name


def test_a_folder_holding_a_report_is_refused_unless_overwrite(sim_run, tmp_path, capsys):
    """As peaknet-sim refuses a folder holding a run: a second report into the same folder is
    refused, leaving it as it was; with --overwrite it replaces the first, and none of the
    first report's files (the activation maps of a finder not run again) stay behind."""
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "peakfinder8", "peaknet:default",
                 "--samples", "1"]) == 0
    first = json.loads((out / "report.json").read_text())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    again = [str(sim_run), "-o", str(out), "--finders", "peakfinder8", "--samples", "1"]
    assert main(again) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{out} already holds a report" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*again, "--overwrite"]) == 0
    second = json.loads((out / "report.json").read_text())
    assert any(n.startswith("activation") for n in set(first["files"]) - set(second["files"]))
    assert {p.name for p in out.iterdir()} == set(second["files"])
    assert set(second["figures"]) <= set(second["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["finders"] == ["peakfinder8"] and config["config"]["overwrite"]


def test_an_indexing_rate_of_no_hits_is_printed_as_report_md_shows_it(sim_run, tmp_path, capsys,
                                                                      dials_env):
    """No frame is a hit (a hit rule no frame meets), so there is no indexing rate: the
    command's output says what report.md says, not nan."""
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "peakfinder8", "--samples", "0",
                 "--index", "--min-peaks", "100000"]) == 0
    printed = capsys.readouterr().out
    rates = json.loads((out / "report.json").read_text())["indexing"]["peakfinder8"]
    assert rates["hits"] == 0 and rates["indexing_rate"] is None  # the premise: no rate
    text = (out / "report.md").read_text()
    hits_table = text[text.index("## Hits and indexing"):]
    shown = re.search(r"^\| peakfinder8 \| [^|]+ \| ([^|]+) \| [^|]+ \|$", hits_table, re.M)
    assert shown is not None, hits_table
    assert (f"indexing rate {shown[1].strip()} ({rates['indexed']} of {rates['hits']} hits)"
            in printed), printed
    assert "nan" not in printed


class _Unhandled(Exception):
    """SIGTERM reached the test's own handler: the command did not handle it."""


@pytest.fixture
def sigterm_guard():
    """A SIGTERM the command does not handle fails the test instead of killing the test run."""
    def unhandled(signum, frame):
        raise _Unhandled("SIGTERM reached the test's own handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, before)


class Stopper:
    """A stand-in finder that sends this process ``signum`` at its second frame, as a Ctrl-C or
    a batch scheduler's SIGTERM lands mid-run; it finds nothing."""

    name = "stopper"

    def __init__(self, signum: int) -> None:
        self.params = {"signal": int(signum)}
        self.frames = 0

    def find(self, frame: Frame):
        self.frames += 1
        if self.frames == 2:
            os.kill(os.getpid(), self.params["signal"])
        return empty_peaks()


def status_of(argv: list[str]) -> int:
    """``main``'s exit status; an interruption it lets out fails the test (not the test run)."""
    try:
        return main(argv)
    except KeyboardInterrupt as exc:
        pytest.fail(f"peaknet-eval let {exc!r} out")


def folder_state(folder) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "interrupted (SIGTERM)")])
def test_a_stop_is_one_line_and_an_earlier_report_stays_as_it_was(
        sim_run, tmp_path, capsys, monkeypatch, sigterm_guard, signum, status, said):
    """A user trial: Ctrl-C printed a 44-65 line traceback, and SIGTERM exited 143 without a
    word, leaving its staging folder (``.report.*.partial``) in the report folder.  Each is now
    one line saying what is kept, exit 130 or 143; no staging folder stays, an earlier report is
    as it was, a new folder is not left behind, and the SIGTERM handler is put back."""
    out = tmp_path / "report"
    assert main([str(sim_run), "-o", str(out), "--finders", "peakfinder8", "--samples", "0",
                 "--no-progress"]) == 0
    before = folder_state(out)
    capsys.readouterr()
    monkeypatch.setitem(FINDERS, "stopper", lambda params=None: Stopper(signum))
    stopped = [str(sim_run), "--finders", "stopper", "--samples", "0", "--no-progress"]
    rerun = "the same command runs it again from the start"
    assert status_of([*stopped, "-o", str(out), "--overwrite"]) == status
    assert capsys.readouterr().err.splitlines() == [
        f"peaknet-eval: {said}; no new report was written: the report already in {out} is as "
        f"it was; {rerun}"]
    assert folder_state(out) == before
    fresh = tmp_path / "fresh"
    assert status_of([*stopped, "-o", str(fresh)]) == status
    assert capsys.readouterr().err.splitlines() == [
        f"peaknet-eval: {said}; no report was written and nothing was left behind; {rerun}"]
    assert not fresh.exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_ctrl_c_while_tuning_after_the_configuration_and_progress_lines(sim_run, tmp_path):
    """The user trial's Ctrl-C, to a real process while it tunes: the configuration was logged
    only at the end and tuning showed no progress, so a batch log said nothing for the first
    minute; a stop then printed a traceback.  Now the log opens with the configuration, tuning
    counts its settings, and the stop is one last line (exit 130)."""
    out = tmp_path / "report"
    process = subprocess.Popen(
        [sys.executable, "-m", "peaknet_xtal.cli.eval", str(sim_run), "-o", str(out),
         "--finders", "peakfinder8", "dispersion", "--tune-frames", "2", "--samples", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line.rstrip("\n"))
            if line.startswith("tuning peakfinder8: 0/48 settings"):
                # mid-tuning (48 settings take about a second), not in the moment tqdm still
                # builds the bar after drawing its first line: a stop there leaves the bar
                # half-made, and its __del__ prints an ignored AttributeError (progress.py's)
                time.sleep(0.3)
                process.send_signal(signal.SIGINT)
                break
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    seen += rest.splitlines()
    assert process.returncode == 130, seen
    configuration = [i for i, line in enumerate(seen) if "peaknet-eval configuration: " in line]
    tuning = [i for i, line in enumerate(seen) if line.startswith("tuning peakfinder8: ")]
    assert configuration and tuning and configuration[0] < tuning[0], seen
    assert seen[-1] == ("peaknet-eval: interrupted; no report was written and nothing was left "
                        "behind; the same command runs it again from the start"), seen
    assert not any("Traceback" in line for line in seen) and not out.exists()
