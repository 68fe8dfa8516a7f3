"""peaknet-integrate as a user meets it: reruns, settings, Ctrl-C, empty streams, the summary."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.integrate import CONFIG_NAME, main


@pytest.fixture(scope="module")
def run(integrate_sim_run):
    return integrate_sim_run


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error:" in line]


def test_rerun_with_other_settings_is_refused_naming_each_difference(run, tmp_path, capsys):
    """A folder holds one run: other settings are refused before anything is recorded (the
    record stays true, the outputs as they were); the same settings skip what is finished."""
    out = tmp_path / "out"
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 0
    record = (out / CONFIG_NAME).read_bytes()
    stamp = (out / run.cxi.name).stat().st_mtime_ns
    capsys.readouterr()
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress",
                 "--adu-per-photon", "5", "--read-noise", "0.2"]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "adu_per_photon" in lines[0] and "5.0" in lines[0], lines
    assert "read_noise" in lines[0] and "0.2" in lines[0], lines
    assert str(out) in lines[0]
    assert (out / CONFIG_NAME).read_bytes() == record
    assert json.loads(record)["config"]["adu_per_photon"] is None
    assert (out / run.cxi.name).stat().st_mtime_ns == stamp
    # settings that do not change the numbers (progress, batch size) may differ
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress",
                 "--batch-size", "64"]) == 0
    assert (out / run.cxi.name).stat().st_mtime_ns == stamp


def test_a_geometry_is_the_same_setting_by_its_contents_not_its_path(run, tmp_path, capsys):
    """The folder's geometry was compared by path: a copy of it elsewhere was refused, and the
    recorded file edited (another gain) was taken, its outputs kept at the old gain."""
    out = tmp_path / "out"
    geom = tmp_path / "detector.geom"
    geom.write_text(run.geom.read_text())
    assert main([str(run.cxi), "-g", str(geom), "-o", str(out), "--no-progress"]) == 0
    copy = tmp_path / "elsewhere" / "copy.geom"
    copy.parent.mkdir()
    copy.write_text(geom.read_text())
    capsys.readouterr()
    assert main([str(run.cxi), "-g", str(copy), "-o", str(out), "--no-progress"]) == 0
    geom.write_text(geom.read_text().replace("adu_per_photon = 8.5", "adu_per_photon = 5"))
    assert main([str(run.cxi), "-g", str(geom), "-o", str(out), "--no-progress"]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "geometry:" in lines[0] and "SHA-256" in lines[0], lines


def test_a_regenerated_input_is_integrated_again(run, tmp_path, caplog):
    """A finished output of an input that changed since is stale: the rerun integrates it
    again (and says so) instead of skipping it."""
    cxi = tmp_path / run.cxi.name
    shutil.copyfile(run.cxi, cxi)
    out = tmp_path / "out"
    args = [str(cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]
    assert main(args) == 0
    stamp = (out / cxi.name).stat().st_mtime_ns
    assert main(args) == 0
    assert (out / cxi.name).stat().st_mtime_ns == stamp  # unchanged input: skipped
    with h5py.File(cxi, "r+") as h5:  # the input made again: one frame's peaks fewer
        h5["/entry_1/result_1/nPeaks"][0] -= 1
    os.utime(cxi, ns=(stamp + 10**9, stamp + 10**9))
    with caplog.at_level("INFO", logger="peaknet_xtal"):
        assert main(args) == 0
    assert (out / cxi.name).stat().st_mtime_ns != stamp
    assert any("changed since" in r.getMessage() for r in caplog.records)
    with h5py.File(out / cxi.name) as h5:
        n0 = int(h5["/entry_1/result_1/nPeaks"][0])
        assert np.isnan(h5["/entry_1/result_1/peakPhotonsVI"][0, n0])


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--read-noise", "-1"),
                                           ("--adu-per-photon", "0"),
                                           ("--adu-per-photon", "nan"), ("--device", "gpu")])
def test_every_setting_is_checked_before_work(run, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([str(run.cxi), "-g", str(run.geom), "-o", str(out), option, value])
    assert exc.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and option in lines[0], lines
    assert not out.exists()


def test_an_unavailable_device_is_one_line(run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--device", "cuda"])
    assert exc.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--device" in lines[0] and "CUDA" in lines[0], lines
    assert not out.exists()


def test_ctrl_c_stops_cleanly_and_the_rerun_continues(run, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first frame of a stream: exit 130, no traceback, the frame kept under
    the partial name; the same command then finishes the stream."""
    from peaknet_xtal.integration import files
    from peaknet_xtal.integration.files import partial_path

    real = files._integrate_chunk
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "_integrate_chunk", interrupted)
    out = tmp_path / "out"
    assert main([str(run.stream), "-o", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err, err
    assert "the same command" in err
    assert partial_path(out / run.stream.name).exists()
    monkeypatch.setattr(files, "_integrate_chunk", real)
    assert main([str(run.stream), "-o", str(out), "--no-progress"]) == 0
    assert (out / run.stream.name).exists()


def test_sigterm_stops_as_ctrl_c_does_keeping_the_frames_done(run, tmp_path, capsys,
                                                             monkeypatch):
    """A batch scheduler's SIGTERM ended the run at once, exit 143 and no word, and the stream
    chunks already integrated were lost (a partial file of 0 chunks); now it stops as Ctrl-C
    does: one line, the frames done kept under the partial name, exit 143, and the same
    command finishes the stream identical to an uninterrupted run."""
    import os
    import signal

    from peaknet_xtal.formats.stream import read_stream
    from peaknet_xtal.integration import files
    from peaknet_xtal.integration.files import partial_path

    real = files._integrate_chunk
    calls = []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "_integrate_chunk", terminated)
    out = tmp_path / "out"
    assert main([str(run.stream), "-o", str(out), "--no-progress"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted (SIGTERM)" in err[0] and "the same command" in err[0]
    assert len(read_stream(partial_path(out / run.stream.name)).chunks) == 1
    monkeypatch.setattr(files, "_integrate_chunk", real)
    assert main([str(run.stream), "-o", str(out), "--no-progress"]) == 0
    whole = tmp_path / "whole"
    assert main([str(run.stream), "-o", str(whole), "--no-progress"]) == 0
    assert (out / run.stream.name).read_bytes() == (whole / run.stream.name).read_bytes()


def _said_integrating(text: str, name: str, words: str, tmp_path, caplog) -> list[str]:
    """Integrate a stream of ``text`` named ``name`` (it succeeds); what the log said with
    ``words`` in it."""
    stream = tmp_path / name
    stream.write_text(text)
    with caplog.at_level("INFO", logger="peaknet_xtal"):
        assert main([str(stream), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_a_stream_without_crystals_says_so(run, tmp_path, caplog):
    text = run.stream.read_text()
    header = text[:text.index("----- Begin chunk -----")]
    said = _said_integrating(header, "empty.stream", "0 crystals, nothing integrated",
                             tmp_path, caplog)
    assert len(said) == 1 and "empty.stream" in said[0], said


def test_crystals_without_reflection_lists_say_so(run, tmp_path, caplog):
    """indexamajig --no-refls-in-stream writes crystals without reflection lists: the run
    integrated nothing and said only 'no spots integrated this run'."""
    import re

    text = re.sub(r"Reflections measured after indexing\n.*?End of reflections\n", "",
                  run.stream.read_text(), flags=re.S)
    assert "Begin crystal" in text and "End of reflections" not in text
    said = _said_integrating(text, "bare.stream", "without reflection lists", tmp_path, caplog)
    assert len(said) == 1 and "bare.stream" in said[0] and "--no-refls-in-stream" in said[0]


def test_progress_has_a_total_and_the_run_ends_with_a_summary(run, tmp_path, capsys,
                                                              monkeypatch):
    import peaknet_xtal.progress as progress

    totals = []
    real = progress.Progress

    def recording(total, *args, **kwargs):
        totals.append(total)
        return real(total, *args, **kwargs)

    monkeypatch.setattr(progress, "Progress", recording)
    out = tmp_path / "out"
    assert main([str(run.cxi), str(run.stream), "-g", str(run.geom), "-o", str(out),
                 "--no-progress"]) == 0
    assert totals == [4]  # two frames in each input
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "spots integrated" in summary and "8.5 ADU/photon" in summary, summary
    assert "median I/sigma" in summary, summary
    # a rerun skips the finished CXI output and says so (it said only "no spots integrated")
    assert main([str(run.cxi), "-g", str(run.geom), "-o", str(out), "--no-progress"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "no spots integrated this run (1 output(s) an earlier run finished are kept)" \
        in summary, summary


def test_a_folder_named_like_a_cxi_file_is_one_line(run, tmp_path, capsys):
    folder = tmp_path / "peaks.cxi"
    folder.mkdir()
    assert main([str(folder), "-g", str(run.geom), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # not HDF5's own two-line message
    assert len(lines) == 1 and "peaks.cxi" in lines[0] and "folder" in lines[0], err


def test_threads_fit_the_machine_as_the_finders_do(run, tmp_path, monkeypatch):
    """peaknet-integrate left torch one thread a core: on a busy 2-core machine 3-4 times
    slower than one thread (a user trial: 13.5-19.5 s against 4.3 s).  It now takes the
    finder's default (the cores free for it) or --threads."""
    import torch

    import peaknet_xtal.threads as threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "default_threads", lambda *a, **k: 1)  # a busy machine
        monkeypatch.setattr(threads, "openmp_shadowed", lambda: None)  # cctbx imported first
        assert main([str(run.cxi), "-g", str(run.geom), "-o", str(tmp_path / "a"),
                     "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
        assert main([str(run.cxi), "-g", str(run.geom), "-o", str(tmp_path / "b"),
                     "--threads", "2", "--no-progress"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
