"""pipeline/monitor.py: the progress line's rates in and out are averages over the last
RATE_WINDOW seconds, not over the last sample's second (frames come back a batch at a time)."""
from __future__ import annotations

import pytest

from peaknet_xtal.pipeline import monitor as monitor_module
from peaknet_xtal.pipeline.monitor import RATE_WINDOW, PipelineMonitor


def test_rates_average_over_the_window_not_the_last_second(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: clock[0])
    watch = PipelineMonitor(120, progress=False)
    queue = {"put": 120, "acked": 0, "depth": 0, "in_flight": 0, "capacity": 3200}
    rates = []
    for second in range(1, 81):  # all 120 frames queued at once; 8 come back every 10 s
        clock[0] = 100.0 + second
        queue["acked"] = 8 * (second // 10)
        rates.append(watch.sample(dict(queue), [])["out_per_s"])
    assert rates[-1] == pytest.approx(0.8, rel=0.15)  # 8 frames every 10 s
    assert max(rates[int(RATE_WINDOW):]) < 1.2  # never a batch a second (8/s) once averaged
    first = watch.sample(dict(queue), [])
    assert first["in_per_s"] == 0.0  # the inputs were all queued long before the window


def _results(peaks: list[int]):
    """Frame results with these numbers of peaks, hits by the library's rule (any peak)."""
    from peaknet_xtal.types import Frame, FrameResult, empty_peaks

    frame = Frame(panels=[], source="x.h5", event="//0")
    return [FrameResult(frame=frame, peaks=empty_peaks(n), hit=n > 0) for n in peaks]


def test_the_line_says_what_the_single_process_line_says():
    """A user trial: ``--workers`` drew "pipeline: ... in 1.2/s out 1.1/s | q1 ..." where the
    single-process run draws "peaknet2cxi: ..., hits 3 | 12.0 peaks/frame": two commands, to
    the user.  The line has the run's label and, first after the rate, the single-process
    line's own words for the hits and peaks the workers report, then the pipeline's own."""
    import io

    from peaknet_xtal.cli.peaknet2cxi import _Stats

    single = _Stats()
    for result in _results([0, 12, 3, 25, 0, 5]):  # the frames both workers found
        single.add(result)
    stream = io.StringIO()
    watch = PipelineMonitor(10, stream=stream, interval=0.0, label="peaknet2cxi")
    reports = {"w0": {"frames": 4, "hits": 3, "peaks": 40, "busy_fraction": 0.5},
               "w1": {"frames": 2, "hits": 1, "peaks": 5, "busy_fraction": 0.25}}
    sample = watch.sample({"put": 10, "acked": 6, "depth": 4, "in_flight": 0,
                           "capacity": 3200, "reports": reports}, [])
    watch.close()
    assert (sample["found"], sample["hits"], sample["peaks"]) == (6, 4, 45)
    assert single.progress() == "hits 4 | 7.5 peaks/frame"
    assert PipelineMonitor.line(sample).startswith(single.progress() + " | in ")
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("peaknet2cxi: 6/10 frames") and "busy w0:50% w1:25%" in last, last
    assert f", {single.progress()} | in " in last, last


@pytest.mark.parametrize("workers", [1, 2])
def test_the_workers_report_the_hits_and_peaks_the_line_shows(tmp_path, capsys, stacks,
                                                              workers):
    """The counts come with what the workers report on each lease (no call per frame): a run
    on threads, the plain local-maximum finder, frames of known peaks, its last line."""
    from peaknet_test_support import LocalMaxFinder

    from peaknet_xtal.formats.cxi import CXISource, CXIWriter
    from peaknet_xtal.pipeline import run_pipeline

    frames = 12
    path = stacks.write(tmp_path / "a.h5", frames)  # frame i: i % 4 + 1 pixels at 500 + i
    run_pipeline({"inputs": [{"path": str(path), "kind": CXISource}],
                  "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
                  "frame_finder": LocalMaxFinder, "backend": "threads", "workers": workers,
                  # frames 0-2 below the cut: no peak, no hit
                  "frame_finder_options": {"threshold": 503.0}, "batch_size": 2,
                  "progress": True, "progress_label": "peaknet2cxi", "monitor_interval": 0.05})
    found = [i % 4 + 1 if i >= 3 else 0 for i in range(frames)]
    said = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("peaknet2cxi: ")]
    assert said and said[-1].startswith(f"peaknet2cxi: {frames}/{frames} frames"), said
    hits, mean = frames - 3, sum(found) / frames
    assert f", hits {hits} | {mean:.1f} peaks/frame | in " in said[-1], said[-1]
