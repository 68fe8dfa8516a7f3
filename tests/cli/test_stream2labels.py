"""stream2labels end to end: simulated stream + CXI stack in, label file + report + config out."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peaknet_xtal.cli.stream2labels import build_parser, main
from peaknet_xtal.formats.stream import Chunk, write_stream
from peaknet_xtal.labelling.labels import LabelFile

# ``sim_run`` (a simulated two-panel run and its truth stream) comes from tests/conftest.py.

LYSO = "crystfel_streams/rs_palxfel_lysozyme_rayonix_xgandalf.stream"


def test_help_is_the_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "pseudo-Voigt" in capsys.readouterr().out


def test_end_to_end(sim_run, tmp_path, capsys):
    out = tmp_path / "labels.h5"
    code = main([str(sim_run.stream), "-o", str(out), "--no-ray", "--min-peaks", "1",
                 "--min-i-over-sigma", "5", "--batch-size", "4", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "selected" in text and "fits:" in text and str(out) in text
    with LabelFile(out) as lf:
        assert len(lf) == 2 * sim_run.n_frames
        assert lf.h5["labels"][()].sum() > 100
        assert lf.config["label"]["min_i_over_sigma"] == 5.0
    recorded = json.loads((tmp_path / "labels.config.json").read_text())
    assert recorded["config"]["run"]["ray"] is False
    assert recorded["config"]["peakdiff"]["min_found"] == 1
    assert (tmp_path / "labels.peakdiff.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_exit_2_naming_the_file(tmp_path, capsys):
    expt = tmp_path / "lonely.expt"
    expt.write_text("{}")
    assert main([str(expt), "-o", str(tmp_path / "x.h5"), "--no-ray", "--quiet"]) == 2
    assert "lonely.expt" in capsys.readouterr().err
    broken = tmp_path / "broken.stream"
    broken.write_text("CrystFEL stream format 2.3\n----- Begin chunk -----\nImage filename: a.h5\n"
                      "garbage line\n")
    assert main([str(broken), "-o", str(tmp_path / "y.h5"), "--no-ray", "--quiet"]) == 2
    assert "broken.stream" in capsys.readouterr().err
    assert not (tmp_path / "y.h5").exists()


def test_dials_results_without_dials_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
    """A Python without DIALS: an .expt/.refl pair is one line naming the .expt and what to
    do, exit 2 as for any bad input, before anything is read (a traceback before)."""
    from peaknet_test_support import hide_dials

    expt, refl = tmp_path / "stills.expt", tmp_path / "stills.refl"
    expt.write_text("{}")
    refl.write_bytes(b"")
    hide_dials(monkeypatch)
    assert main([str(expt), str(refl), "-o", str(tmp_path / "l.h5"), "--no-ray",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"stream2labels: error: reading {expt} (a DIALS experiment list) "
                           "needs DIALS, which this Python cannot import (No module named "
                           "'dxtbx'): install Debian's dials package or a conda DIALS and run "
                           "from that environment (README, Quick start); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stills.expt", "stills.refl"]


def test_no_images_is_an_error_with_a_hint(sim_run, tmp_path, capsys):
    code = main([str(sim_run.stream), "-o", str(tmp_path / "l.h5"), "--no-ray", "--quiet",
                 "--min-peaks", "1", "--prefix", str(tmp_path) + "/nowhere-"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--prefix" in err and "nowhere-sim.cxi" in err


def test_a_geometry_of_another_detector_is_named_not_blamed_on_prefix(sim_run, tmp_path,
                                                                       capsys,
                                                                       make_geometry_text):
    """-g with a geometry the images do not fit: the error is the reader's, naming the geometry
    and both shapes, with no advice about --prefix (the images were where the stream said);
    one whose panels the stream's peaks do not name names the geometry, not only the stream."""
    bigger = tmp_path / "bigger.geom"
    bigger.write_text(make_geometry_text(["top", "bottom"], 512, 256, [(-256, -256), (-256, 0)]))
    code = main([str(sim_run.stream), "-o", str(tmp_path / "l.h5"), "--no-ray", "--quiet",
                 "--min-peaks", "1", "-g", str(bigger)])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 1 and "could be labelled" in first and str(bigger) in first, first
    assert "384" in first and "--prefix" not in first
    other = tmp_path / "other.geom"
    other.write_text(make_geometry_text(["a0", "a1"], 384, 192, [(-192, -192), (-192, 0)]))
    code = main([str(sim_run.stream), "-o", str(tmp_path / "m.h5"), "--no-ray", "--quiet",
                 "--min-peaks", "1", "-g", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and f"panel 'top' is not in {other} (its panels: a0, a1)" in err, err


def test_config_file_typo_and_wrong_type_are_errors(tmp_path, capsys):
    cfg = tmp_path / "labels.yaml"
    cfg.write_text("fit:\n  windw: 11\nrun:\n  max_frames: many\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["a.stream", "-o", str(tmp_path / "labels.h5"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "labels.yaml" in err and "'fit.windw'" in err and "run.max_frames" in err
    assert not (tmp_path / "labels.config.json").exists()


def test_nothing_selected_is_an_error_saying_why(real_data, tmp_path, capsys):
    """The user trial: 3 indexed PAL-XFEL frames, none with precision >= 0.8, images elsewhere.
    Was: "0 selected", exit 0 and an empty label file; now exit 1, the stream named, one line
    per cause with its count, and no output."""
    stream = real_data / LYSO
    out = tmp_path / "l.h5"
    assert main([str(stream), "-o", str(out), "--no-ray", "--quiet"]) == 1
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("stream2labels: error: ") and str(stream) in first
    assert "none of the 3 indexed frames is selected" in first
    assert "  3 frames: precision below 0.8 (--min-precision; theirs: 0.52 to 0.77)" in err
    assert "  3 frames name an image file that is not here (first: /home/common/" in err
    assert "--prefix" in err and str(tmp_path / "l.peakdiff.png") in err
    assert not out.exists()


def test_frames_turned_away_are_counted_in_the_summary(real_data, tmp_path, capsys):
    code = main([str(real_data / LYSO), "-o", str(tmp_path / "l.h5"), "--no-ray", "--quiet",
                 "--min-precision", "0.6"])
    assert code == 1  # the two selected frames' images are not here (the earlier check)
    err = capsys.readouterr().err
    assert "none of the 2 selected frames could be labelled (2 unreadable" in err
    assert "  not selected: 1 frame: precision below 0.6 (--min-precision; theirs: 0.52)" in err


def test_nothing_selected_with_images_present_names_only_the_rule(sim_run, tmp_path, capsys):
    out = tmp_path / "l.h5"
    assert main([str(sim_run.stream), "-o", str(out), "--no-ray", "--quiet",
                 "--min-peaks", "100000"]) == 1
    err = capsys.readouterr().err
    assert str(sim_run.stream) in err.splitlines()[0]
    assert f"  {sim_run.n_frames} frames: found peaks outside [100000, 100000]" in err
    assert "image file" not in err  # the simulated stack is where the stream says
    assert not out.exists()


def test_stream_without_indexed_frames_is_an_error(tmp_path, capsys):
    stream = tmp_path / "unindexed.stream"
    write_stream(stream, [Chunk(filename="a.h5", event="//0", serial=1, peaks=None)])
    out = tmp_path / "l.h5"
    assert main([str(stream), "-o", str(out), "--no-ray", "--quiet"]) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert "unindexed.stream" in first and "no indexed frame" in first
    assert not out.exists()


@pytest.mark.parametrize("kind", ["folder", "under_a_file"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(kind, sim_run, tmp_path,
                                                                     capsys):
    """The user trial: `-o EXISTING_DIRECTORY` ran every fit, then failed with IsADirectoryError
    on the final rename, leaving X.parts/, X.config.json and X.peakdiff.png behind."""
    if kind == "folder":
        out = tmp_path / "existing"
        out.mkdir()
    else:
        (tmp_path / "notes.txt").write_text("mine")
        out = tmp_path / "notes.txt" / "labels.h5"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main([str(sim_run.stream), "-o", str(out), "--no-ray", "--quiet", "--min-peaks", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stream2labels: error: {out}: "), err
    assert ("is a folder" if kind == "folder" else "notes.txt is not a folder") in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing left behind


@pytest.mark.parametrize("option, value, says", [
    ("--window", "2", "odd"), ("--window", "4", "odd"), ("--window", "1", "odd"),
    ("--num-cpus", "0", ">= 1"), ("--cutoff", "-1", "> 0"), ("--cutoff", "nan", "> 0"),
    ("--min-precision", "2", "in [0, 1]"), ("--min-recall", "-0.1", "in [0, 1]"),
    ("--min-peaks", "-1", ">= 0"), ("--max-peaks", "-5", ">= 0"),
    ("--min-predicted", "-1", ">= 0"), ("--max-predicted", "-1", ">= 0"),
    ("--redchi-max", "0", "> 0"), ("--min-snr", "-1", ">= 0"), ("--max-nfev", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"), ("--max-batches-in-flight", "0", ">= 1"),
    ("--max-fits-in-flight", "0", ">= 1"), ("--max-frames", "0", ">= 1"),
])
def test_a_setting_out_of_range_is_one_line_naming_it_before_any_work(option, value, says,
                                                                      sim_run, tmp_path, capsys):
    """The user trial: --window 2 was a traceback after Ray had started; --num-cpus 0,
    --cutoff -1 and --min-precision 2 were taken."""
    out = tmp_path / "l.h5"
    with pytest.raises(SystemExit) as exit_info:
        main([str(sim_run.stream), "-o", str(out), "--quiet", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stream2labels: error: ") and f"{option}: must" in line, line
    assert says in line and f"(got {value}" in line.replace("'", "")
    assert list(tmp_path.iterdir()) == []  # no config record, report, parts or label file


@pytest.mark.parametrize("text, names", [
    ("fit:\n  label_fraction: 0\n", "fit.label_fraction: must be in (0, 1]"),
    ("fit:\n  tolerance: 0\n", "fit.tolerance: must be > 0"),
    ("fit:\n  max_shift: -1\n", "fit.max_shift: must be > 0"),
    ("fit:\n  min_pixels: -1\n", "fit.min_pixels: must be >= 0"),
    ("fit:\n  prescreen_snr: -2\n", "fit.prescreen_snr: must be >= 0"),
    ("label:\n  chunk_size: 0\n", "label.chunk_size: must be >= 1"),
    ("label:\n  fit_on: centroid\n", "label.fit_on: must be one of predicted, matched, found"),
    ("label:\n  panels: some\n", "label.panels: must be one of all, labelled"),
])
def test_config_file_settings_are_range_checked_too(text, names, tmp_path, capsys):
    cfg = tmp_path / "labels.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["a.stream", "-o", str(tmp_path / "l.h5"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "labels.yaml" in line and names in line, line


@pytest.mark.parametrize("low, high, names", [
    ("--min-peaks", "--max-peaks", "--min-peaks 50 is above --max-peaks 20"),
    ("--min-predicted", "--max-predicted", "--min-predicted 50 is above --max-predicted 20"),
])
def test_a_minimum_above_its_maximum_is_refused(low, high, names, sim_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(sim_run.stream), "-o", str(tmp_path / "l.h5"), "--quiet", low, "50", high,
              "20"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("stream2labels: error: ") and names in line, line
    assert list(tmp_path.iterdir()) == []


def test_no_frame_labelled_leaves_no_label_file(sim_run, tmp_path, capsys):
    """The user trial: "5 selected, 0 labelled (5 unreadable), 0 rows -> b2/l.h5", exit 1, and
    an empty b2/l.h5 left behind, where the help promises no label file."""
    out = tmp_path / "l.h5"
    code = main([str(sim_run.stream), "-o", str(out), "--no-ray", "--quiet", "--min-peaks", "1",
                 "--prefix", str(tmp_path) + "/nowhere-"])
    assert code == 1
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first.startswith("stream2labels: error: ") and str(sim_run.stream) in first
    assert f"none of the {sim_run.n_frames} selected frames could be labelled" in first
    assert f"{sim_run.n_frames} unreadable" in first and "no label file written" in first
    assert "-> " not in captured.out  # no summary pointing at a file that is not there
    assert not out.exists()
    assert not (tmp_path / "l.h5.parts").exists()  # a rerun with --prefix starts afresh


def _stopped_after_one_batch(sim_run, tmp_path, monkeypatch, signum: int | None = None,
                             status: int = 130) -> list[str]:
    """A run of two batches stopped as its second starts (a KeyboardInterrupt, or the real
    signal ``signum`` sent to this process; exit ``status``), its first kept; the labeller is
    whole again afterwards.  Returns the command line, to rerun."""
    import os

    from peaknet_xtal.labelling.batch import BatchLabeler

    run = BatchLabeler.run
    calls = []

    def interrupted_after_one(self, batch, part, fit_map=None):
        calls.append(batch.index)
        if len(calls) > 1:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        return run(self, batch, part) if fit_map is None else run(self, batch, part, fit_map)

    monkeypatch.setattr(BatchLabeler, "run", interrupted_after_one)
    argv = [str(sim_run.stream), "-o", str(tmp_path / "l.h5"), "--no-ray", "--quiet",
            "--min-peaks", "1", "--batch-size", "2", "--min-i-over-sigma", "5",
            "--max-frames", "4"]
    assert main(argv) == status
    monkeypatch.setattr(BatchLabeler, "run", run)
    return argv


def test_ctrl_c_is_one_line_keeping_what_a_rerun_resumes_from(sim_run, tmp_path, capsys,
                                                              monkeypatch):
    """The user trial: Ctrl-C (exit 130, right) printed a whole KeyboardInterrupt traceback."""
    argv = _stopped_after_one_batch(sim_run, tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("stream2labels: interrupted; ") and "Traceback" not in err[0]
    assert "1 finished batch" in err[0] and str(tmp_path / "l.h5.parts") in err[0]
    assert not (tmp_path / "l.h5").exists()
    assert main(argv) == 0  # the rerun resumes from the kept batch
    assert "batches 2 (1 resumed)" in capsys.readouterr().out


def test_a_rerun_with_another_geometry_does_not_resume_the_batches_read_with_the_first(
        sim_run, tmp_path, capsys, monkeypatch):
    """Batches labelled through one layout were merged with batches of a rerun given another
    ``-g`` (the resume fingerprint left the geometry out): the rerun is refused, naming the
    part files, and the original settings still resume."""
    argv = _stopped_after_one_batch(sim_run, tmp_path, monkeypatch)
    capsys.readouterr()
    assert main([*argv, "-g", str(sim_run.geom)]) != 0
    err = capsys.readouterr().err
    assert "other inputs or settings" in err and str(tmp_path / "l.h5.parts") in err
    assert not (tmp_path / "l.h5").exists()
    assert main(argv) == 0  # the original settings resume from the kept batch
    assert "batches 2 (1 resumed)" in capsys.readouterr().out


def test_sigterm_stops_as_ctrl_c_does_with_its_own_exit_status(sim_run, tmp_path, capsys,
                                                              monkeypatch):
    """A batch scheduler's SIGTERM ended the run with exit 143 and not a word; it is one line
    saying so and what a rerun resumes from, as Ctrl-C gives, and the rerun resumes."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    argv = _stopped_after_one_batch(sim_run, tmp_path, monkeypatch, signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stream2labels: interrupted (SIGTERM); "), err
    assert "1 finished batch" in err[0] and not (tmp_path / "l.h5").exists()
    assert main(argv) == 0
    assert "batches 2 (1 resumed)" in capsys.readouterr().out


def test_a_finished_label_file_is_replaced_only_with_overwrite(sim_run, tmp_path, capsys):
    """A rerun into a finished label file with other settings replaced a run's labels without
    a word; it is refused before any work unless --overwrite, and nothing beside it changes."""
    out = tmp_path / "l.h5"
    argv = [str(sim_run.stream), "-o", str(out), "--no-ray", "--quiet", "--min-peaks", "1",
            "--min-i-over-sigma", "5", "--max-frames", "2"]
    assert main(argv) == 0
    before = out.read_bytes()
    record = out.with_suffix(".config.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--min-snr", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished label file: give --overwrite" in err[0]
    assert out.read_bytes() == before
    assert out.with_suffix(".config.json").read_text() == record  # the record still true
    assert main([*argv, "--min-snr", "8", "--overwrite"]) == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_naming_its_input_stream_says_so(overwrite, sim_run, tmp_path, capsys):
    """-o naming the input stream was refused as "already holds a finished label file" (wrong),
    and with --overwrite the label file would have replaced the stream.  Now one line saying
    the output is the input stream itself, before any work; the stream is untouched."""
    stream = tmp_path / "run.stream"
    stream.write_bytes(sim_run.stream.read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(stream), "-o", str(stream), "--no-ray", "--quiet", "--min-peaks", "1",
                 "--max-frames", "2", "--prefix", f"{sim_run.stream.parent}/",
                 *overwrite])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stream2labels: error: {stream}: "), err
    assert "is the input stream itself" in err[0] and "already holds" not in err[0]
    assert stream.read_bytes() == sim_run.stream.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _indexed_chunks(n, *, peaks=True, refls=True, no_refl_line=False, start=0,
                    filename="run.h5"):
    """``n`` indexed chunks of one stack; without a peak list the chunk still says num_peaks,
    as indexamajig's --no-peaks-in-stream writes it."""
    import numpy as np

    from peaknet_xtal.formats.stream import REFLECTION_DTYPE, STREAM_PEAK_DTYPE, Crystal

    chunks = []
    for i in range(start, start + n):
        table = np.zeros(3, STREAM_PEAK_DTYPE)
        table["fs"], table["ss"], table["panel"] = [10.5, 20.5, 30.5], [5.5, 6.5, 7.5], "p0"
        refl = np.zeros(3, REFLECTION_DTYPE)
        refl["fs"], refl["ss"], refl["panel"] = table["fs"], table["ss"], "p0"
        crystal = Crystal(a=79.0, b=79.0, c=38.0, alpha=90.0, beta=90.0, gamma=90.0,
                          reflections=refl if refls else None,
                          no_reflections_line=no_refl_line and not refls)
        chunks.append(Chunk(filename=filename, event=f"//{i}", serial=i + 1, indexed_by="xgandalf",
                            num_peaks=25, peaks=table if peaks else None, crystals=[crystal]))
    return chunks


@pytest.mark.parametrize(("kind", "says", "option"), [
    ({"peaks": False}, "holds no peak lists (num_peaks says 25)", "--no-peaks-in-stream"),
    ({"refls": False}, "holds no reflection lists for its indexed crystals",
     "--no-refls-in-stream"),
    ({"refls": False, "no_refl_line": True}, "each says 'No integrated reflections.'",
     "integrates them")])
def test_a_stream_without_peak_or_reflection_lists_says_so(kind, says, option, tmp_path, capsys):
    """A stream written with --no-peaks-in-stream or --no-refls-in-stream was turned away as
    "precision below 0.8 (theirs: 0.00)" or "found peaks ... theirs: 0" (read as bad indexing,
    though every chunk says num_peaks = 25): one line names the stream, what it lacks, the
    indexamajig option that left it out and what to rerun."""
    stream = tmp_path / "lean.stream"
    write_stream(stream, _indexed_chunks(4, **kind))
    out = tmp_path / "l.h5"
    assert main([str(stream), "-o", str(out), "--no-ray", "--quiet"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if says in x)
    assert str(stream) in line and option in line
    assert "precision" not in err and "found peaks outside" not in err
    assert not out.exists()


def test_frames_without_a_peak_list_are_skipped_with_one_warning(tmp_path, caplog):
    """Where only some chunks lack their lists, those frames are skipped and counted once."""
    from peaknet_xtal.labelling.ingest import records_from_stream

    stream = tmp_path / "some.stream"
    write_stream(stream, _indexed_chunks(3) + _indexed_chunks(2, peaks=False, start=3))
    with caplog.at_level("WARNING"):
        records = list(records_from_stream(stream))
    assert [r.event for r in records] == ["//0", "//1", "//2"]
    said = [r.getMessage() for r in caplog.records if "peak list" in r.getMessage()]
    assert len(said) == 1 and "2 of its 5 indexed frames" in said[0]


def test_the_record_names_the_files_and_no_progress_drops_the_line(sim_run, tmp_path,
                                                                    monkeypatch, capsys):
    """The record's configuration held neither the inputs nor the output (only the command
    line, as typed, relative to a folder); and the switch was --quiet where the other commands
    have --no-progress."""
    monkeypatch.chdir(tmp_path)
    stream = os.path.relpath(sim_run.stream, tmp_path)
    assert main([stream, "-o", "labels.h5", "--no-ray", "--min-peaks", "1",
                 "--no-progress"]) == 0
    assert "stream2labels: 0/" not in capsys.readouterr().err
    recorded = json.loads((tmp_path / "labels.config.json").read_text())
    assert recorded["config"]["inputs"] == [str(Path(sim_run.stream).absolute())]
    assert recorded["config"]["output"] == str(tmp_path / "labels.h5")
    assert recorded["argv"][:3] == [stream, "-o", "labels.h5"]
    for switch in ("--no-progress", "--quiet"):  # --quiet: its earlier name, kept
        assert build_parser().parse_args(["x.stream", "-o", "l.h5", switch]).progress is False


#: A plugin source whose frames need a calibration (a source option it declares); ``OPENED``
#: keeps the file and calibration each source was opened with.
_CALIBRATED = """
    import numpy as np
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl
    from peaknet_xtal.types import Frame

    OPENED = []

    class Run:
        name = "calibrated"

        def __init__(self, path, calibration=None, **_):
            if calibration is None:
                raise ValueError("needs its calibration (calibration=PATH)")
            self.path = path
            OPENED.append((path, calibration))

        def __iter__(self):
            rng = np.random.default_rng(0)
            for i in range(4):
                yield Frame(panels=[rng.poisson(5, (48, 48)).astype(np.float32)],
                            source=self.path, event=f"//{i}")

        def close(self):
            pass

    @hookimpl
    def peaknet_source_types():
        return [SourceType("calibrated", "frames that need a calibration",
                           lambda p: p.endswith(".npy"), Run, options=("calibration",))]
"""


def test_source_options_reach_the_plugin_source_reading_the_images(install_plugin, tmp_path,
                                                                   capsys):
    """stream2labels had no --source-option (peaknet2cxi had): images only a plugin source
    that needs an option reads could not be labelled.  The same flag now, passed to the source
    that declares it, recorded, and refused for a key no source type takes, as in
    peaknet2cxi."""
    import sys

    from peaknet_xtal.errors import PeakNetError
    from peaknet_xtal.labelling.job import label_run

    install_plugin("calibrated", _CALIBRATED)
    stream = tmp_path / "run.stream"
    write_stream(stream, _indexed_chunks(4, filename="frames.npy"))
    (tmp_path / "frames.npy").write_bytes(b"")
    out = tmp_path / "labels.h5"
    code = main([str(stream), "-o", str(out), "--no-ray", "--quiet", "--min-peaks", "1",
                 "--source-option", "calibration=/cal/r7.h5"])
    assert code == 0, capsys.readouterr().err
    opened = sys.modules["calibrated_peaknet"].OPENED
    assert opened and set(opened) == {(str(tmp_path / "frames.npy"), "/cal/r7.h5")}
    with LabelFile(out) as lf:
        assert len(lf) == 4
    recorded = json.loads((tmp_path / "labels.config.json").read_text())
    assert recorded["config"]["run"]["source_options"] == {"calibration": "/cal/r7.h5"}
    for option, said in (("calibratoin=x", "--source-option calibratoin: no registered source "
                                           "type takes it (source options: calibrated: "
                                           "calibration"),
                         ("calibration", "argument --source-option: 'calibration' is not "
                                         "KEY=VALUE")):
        with pytest.raises(SystemExit) as stopped:
            main([str(stream), "-o", str(tmp_path / "other.h5"), "--source-option", option])
        assert stopped.value.code == 2
        assert said in capsys.readouterr().err
    with pytest.raises(PeakNetError, match="--source-option calibratoin: no registered"):
        label_run([str(stream)], tmp_path / "other.h5",
                  {"run": {"source_options": {"calibratoin": "x"}}})
    assert not list(tmp_path.glob("other*"))


def _cbf_stream(folder: Path) -> tuple[Path, Path]:
    """A stream of four indexed chunks, each naming a CBF file beside it (never opened here:
    only their names and presence count); returns the stream and its first image."""
    import dataclasses

    chunks = [dataclasses.replace(chunk, filename=f"shot_{n + 1:04d}.cbf", event=None)
              for n, chunk in enumerate(_indexed_chunks(4))]
    for chunk in chunks:
        (folder / chunk.filename).write_bytes(b"###CBF: VERSION 1.5\n")
    stream = folder / "shots.stream"
    write_stream(stream, chunks)
    return stream, (folder / "shot_0001.cbf").resolve()


@pytest.mark.parametrize("dials", [
    "missing", pytest.param("broken", marks=pytest.mark.dials)])
def test_a_stream_of_cbf_images_without_a_working_dials_is_one_line_before_any_work(
        dials, tmp_path, monkeypatch, capsys):
    """A user trial: on a machine without DIALS a stream naming CBF images (read through
    dxtbx) failed frame by frame, and the run ended in a count of unreadable frames.  It is
    now one line naming the stream, its first such image and what to do, as every command
    says it, before any work: nothing written (no record, report or part files), exit 2.  So
    for a DIALS that is there but fails to load (a compiled extension that does not)."""
    from peaknet_test_support import break_dials, hide_dials

    stream, first = _cbf_stream(tmp_path)
    if dials == "missing":
        hide_dials(monkeypatch)
        why = ("which this Python cannot import (No module named 'dxtbx'): install Debian's "
               "dials package or a conda DIALS and run from that environment (README, Quick "
               "start)")
    else:
        broken = break_dials(monkeypatch, tmp_path / "broken", "dxtbx_model_ext")
        why = ("which is installed but fails to load in this Python (importing "
               f"dxtbx.model.experiment_list: ImportError: {broken}): Debian's DIALS needs "
               "LIBTBX_BUILD=/usr/lib/cctbx/python3.11 and numpy < 2 (README, Quick start)")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(stream), "-o", str(tmp_path / "labels.h5"), "--no-ray", "--quiet",
                 "--min-peaks", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == (f"stream2labels: error: reading the images {stream} names through "
                           f"dxtbx (the first: {first}) needs DIALS, {why}; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_stream_of_hdf5_images_needs_no_dials(sim_run, tmp_path, monkeypatch, capsys):
    """The check for DIALS asks only about images read through dxtbx: a stream of CXI/HDF5
    images is labelled on a machine without DIALS."""
    from peaknet_test_support import hide_dials

    hide_dials(monkeypatch)
    out = tmp_path / "labels.h5"
    assert main([str(sim_run.stream), "-o", str(out), "--no-ray", "--quiet", "--min-peaks",
                 "1", "--batch-size", "4"]) == 0, capsys.readouterr().err
    with LabelFile(out) as lf:
        assert len(lf) == 2 * sim_run.n_frames
