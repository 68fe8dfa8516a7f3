"""The pipeline on a real local Ray (2 CPUs): every frame once, back-pressure, a worker process
killed with SIGKILL mid-run, a Ctrl-C'd run that flushes and then resumes to completion, a run
stopped by a SIGTERM to its whole process group and resumed, and the run's pixel defect mask and
engine settings; how the workers' defect counts combine.

The frame finder is the plain local-maximum finder (``peaknet_test_support.LocalMaxFinder``), with
a per-frame delay where a batch must be in flight long enough to kill its worker: model quality is
irrelevant here; the engine with a stand-in segmenter where the test is about what it keeps.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import BrightPredictor, LocalMaxFinder

from peaknet_xtal.errors import FormatError
from peaknet_xtal.finding.defects import DefectTracker
from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import PipelineError, run_pipeline
from peaknet_xtal.pipeline.actors import LearnedDefects
from peaknet_xtal.pipeline.driver import frame_finder_options, pooled_defects, resolve_config
from peaknet_xtal.pipeline.ray_session import ray_session

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(num_cpus=2):
        yield


def config(tmp_path: Path, inputs: list[Path], **extra) -> dict:
    return {"inputs": [{"path": str(p), "kind": CXISource} for p in inputs],
            "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
            "writer_options": {"frames_per_file": 20}, "frame_finder": LocalMaxFinder,
            "frame_finder_options": {"threshold": 100.0}, "workers": 2, "batch_size": 4,
            "queue_capacity": 16, "result_queue_capacity": 8, "source_chunk": 4,
            "progress": False, "monitor_interval": 0.1, **extra}


def test_ray_pipeline_every_frame_once_within_the_bound(local_ray, tmp_path: Path, stacks):
    """Every frame written once, the queue within its bound, and both workers given work: each
    frame costs 50 ms (4 s for the run in one worker), so the worker whose process starts second
    finds frames left (without a cost, an idle machine once let the first worker take all 80
    before the second was up)."""
    inputs = [stacks.write(tmp_path / "a.h5", 50, seed=1), stacks.write(tmp_path / "b.h5", 30)]
    summary = run_pipeline(config(tmp_path, inputs, writers=2,
                                  frame_finder_options={"threshold": 100.0, "delay_s": 0.05}))
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(inputs[0], 50) | stacks.expected(inputs[1], 30)
    assert set(keys.values()) == {1}
    assert summary["frames_in"] == summary["frames_out"] == summary["written"] == 80
    assert summary["peak_queue_depth"] <= 16
    assert set(summary["workers"]) == {"w0", "w1"}
    assert all(w["frames"] > 0 for w in summary["workers"].values())  # both took work
    report = json.loads((tmp_path / "out" / "run.cxi.pipeline.json").read_text())
    assert report["live"] is False and report["samples"][-1]["frames_out"] == 80


def test_killing_a_worker_process_loses_nothing_and_duplicates_nothing(local_ray, tmp_path: Path,
                                                                        stacks):
    path = stacks.write(tmp_path / "a.h5", 120)
    cfg = config(tmp_path, [path], frame_finder_options={"threshold": 100.0, "delay_s": 0.02},
                 max_restarts=2)
    live = tmp_path / "out" / "run.cxi.pipeline.json"
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(summary=run_pipeline(cfg)))
    runner.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.05)
        try:
            workers = json.loads(live.read_text())["workers"]
        except (OSError, ValueError, KeyError):
            continue
        if workers.get("w0", {}).get("frames", 0) >= 8:
            victim = workers["w0"]["pid"]
            os.kill(victim, signal.SIGKILL)
    runner.join(timeout=120)
    assert victim is not None, "worker w0 never reported in"
    summary = box["summary"]
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(path, 120)
    assert set(keys.values()) == {1}, "a frame was written twice"
    assert summary["restarts"] == 1 and summary["requeued"] >= 1
    assert any("w0" in f and "re-queued" in f for f in summary["failures"])


SIGINT_SCRIPT = """
import sys
from peaknet_xtal.pipeline import run_pipeline
from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_test_support import LocalMaxFinder
out, src = sys.argv[1], sys.argv[2]
summary = run_pipeline({"inputs": [{"path": src, "kind": CXISource}], "output": out,
    "writer": CXIWriter, "writer_options": {"frames_per_file": 10}, "frame_finder": LocalMaxFinder,
    "frame_finder_options": {"threshold": 100.0, "delay_s": float(sys.argv[3]),
                             "hold_from": int(sys.argv[4]), "hold_file": sys.argv[5]},
    "workers": 2,
    "batch_size": 4, "queue_capacity": 32, "num_cpus": 2, "progress": False,
    "monitor_interval": 0.1})
print("INTERRUPTED" if summary["interrupted"] else "COMPLETE", summary["written"])
"""


@pytest.mark.slow
def test_ctrl_c_flushes_and_a_rerun_completes(tmp_path: Path, stacks):
    """Own Ray in a subprocess (SIGINT goes to that driver only), then a resumed rerun."""
    path = stacks.write(tmp_path / "a.h5", 200)
    out = tmp_path / "out" / "run.cxi"
    script = tmp_path / "drive.py"
    script.write_text(SIGINT_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Frames from 60 on wait for the "go" file, made only after the interrupt: the run cannot
    # finish before the signal however busy the machine is (a timed race did, on a loaded CI).
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(path), "0.05", "60",
                             str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    live = Path(f"{out}.pipeline.json")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            if json.loads(live.read_text())["frames_out"] >= 20:
                break
        except (OSError, ValueError, KeyError):
            continue
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    go.touch()  # the batches already leased finish; the dropped frames are never written
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.split()[0] == "INTERRUPTED", stdout
    first = stacks.written(out.parent)
    assert 20 <= sum(first.values()) < 200 and set(first.values()) == {1}
    assert not list(out.parent.glob(".*.part"))  # nothing half-written left behind
    rerun = subprocess.run([sys.executable, str(script), str(out), str(path), "0", "0", str(go)],
                           capture_output=True, text=True, env=env, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.split() == ["COMPLETE", str(200 - sum(first.values()))]
    final = stacks.written(out.parent)
    assert set(final) == stacks.expected(path, 200) and set(final.values()) == {1}


SIGTERM_SCRIPT = """
import os, sys, time
from peaknet_test_support import BrightPredictor
from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import run_pipeline

class HeldEngine(InferenceEngine):
    # the engine; frames from serial hold_from on wait until hold_file exists

    def __init__(self, hold_from, hold_file, **options):
        super().__init__(**options)
        self.hold_from, self.hold_file = hold_from, hold_file

    def find_frames(self, frames, **kw):
        def held():
            for frame in frames:
                while frame.serial >= self.hold_from and not os.path.exists(self.hold_file):
                    time.sleep(0.05)
                yield frame
        yield from super().find_frames(held(), **kw)

out, src, hold_from, go = sys.argv[1:5]
summary = run_pipeline({"inputs": [{"path": src, "kind": CXISource}], "output": out,
    "writer": CXIWriter, "writer_options": {"frames_per_file": 4}, "frame_finder": HeldEngine,
    "frame_finder_options": {"predictor": BrightPredictor(), "adu_per_photon": 1.0,
                             "threshold": 0.6, "threads": 1, "hold_from": int(hold_from),
                             "hold_file": go},
    "workers": 2, "batch_size": 4, "queue_capacity": 16, "num_cpus": 2, "progress": False,
    "monitor_interval": 0.1})
print("RESULT", "INTERRUPTED" if summary["interrupted"] else "COMPLETE", summary["written"],
      summary["resumed_keys"])
"""


def _result(stdout: str) -> list[str]:
    """The script's RESULT line, less the word (Ray's processes write to its stdout too)."""
    return next((line.split()[1:] for line in stdout.splitlines()
                 if line.startswith("RESULT ")), [])


@pytest.mark.slow
def test_a_resumed_run_after_a_sigterm_to_the_whole_job_has_the_whole_runs_mask(
        tmp_path: Path, stacks):
    """A scheduler's stop (``kill -TERM -PGID``, a Slurm timeout) reaches Ray's processes too:
    the workers die with their defect counts, the writers with their summaries.  The stopped
    run's record said it wrote 0 frames, though its finished files hold some, and the run
    resuming it wrote a defect mask of its own frames only.  Now the record counts what the
    output gained, and the resumed run's mask counts every frame, those skipped included, as
    the single-process run's does (it counts them again as it skips them)."""
    from peaknet_xtal.finding.defects import DefectTracker

    path = stacks.write(tmp_path / "a.h5", 40)
    out = tmp_path / "out" / "run.cxi"
    script = tmp_path / "drive.py"
    script.write_text(SIGTERM_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    go = tmp_path / "go"  # never made before the stop: frames from 12 on cannot be found
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(path), "12", str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if len(list(out.parent.glob("run-*.cxi"))) >= 2:
            break
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # as timeout and Slurm send it: to the group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _result(stdout)[:1] == ["INTERRUPTED"], stdout[-2000:] + stderr[-3000:]
    first = sum(stacks.written(out.parent).values())
    assert 8 <= first <= 12
    record = json.loads(Path(f"{out}.pipeline.json").read_text())
    assert (record["written"], record["resumed_keys"]) == (first, 0)
    go.touch()
    rerun = subprocess.run([sys.executable, str(script), str(out), str(path), "12", str(go)],
                           capture_output=True, text=True, env=env, timeout=180)
    assert _result(rerun.stdout) == ["COMPLETE", str(40 - first), str(first)], rerun.stderr[-3000:]
    final = stacks.written(out.parent)
    assert set(final) == stacks.expected(path, 40) and set(final.values()) == {1}
    kept = DefectTracker.load(out.parent)
    assert kept is not None and kept.frames == 40


class _Flag:
    stop_requested = False


def test_a_first_ctrl_c_only_requests_a_stop_and_a_second_stops_at_once():
    """The first SIGINT sets a flag the loop reads (an exception raised in a finaliser would be
    ignored); the second raises; the caller's handler comes back afterwards."""
    from peaknet_xtal.pipeline.driver import sigint_requests_stop

    before = signal.getsignal(signal.SIGINT)
    driver = _Flag()
    with sigint_requests_stop(driver):  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert driver.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_unknown_setting_is_refused_with_the_name_it_resembles(tmp_path):
    """A misspelt key must not run the pipeline with the default it meant to change (the GPU
    benchmark once passed ``predictor`` for ``frame_finder`` and measured the wrong model)."""
    with pytest.raises(ValueError, match="'workrs' \\(did you mean 'workers'\\?\\)"):
        resolve_config({"inputs": [str(tmp_path / "x.h5")], "workrs": 4})


#: In the stacks of ``stacks.write``, bright in every frame (a hot pixel), and in 2 of 4.
HOT, SOMETIMES = (4, 5), (16, 23)


def test_ray_run_writes_the_pixel_defects_and_records_the_engine_settings(local_ray,
                                                                          tmp_path: Path, stacks):
    """As the single-process peaknet2cxi does: the run's defect mask beside the output (the
    workers' counts merged), and the engine's resolved settings in the summary (peaknet2cxi's
    --tile-size reaches the workers' engines as a frame finder option)."""
    path = stacks.write(tmp_path / "a.h5", 8)
    cfg = config(tmp_path, [path], frame_finder="engine", batch_size=2,
                 frame_finder_options={"predictor": BrightPredictor(), "adu_per_photon": 1.0,
                                       "min_snr": 4.0, "tile_size": 512}, threshold=0.6)
    summary = run_pipeline(cfg)
    assert summary["written"] == 8
    written = tmp_path / "out" / "pixel_defects.h5"
    assert summary["pixel_defects"][0] == str(written)
    with h5py.File(written) as h5:
        mask = h5["/data/data"][()]
    assert mask.dtype == np.uint8 and mask.shape == (32, 48)
    assert mask[HOT] == 0 and mask[SOMETIMES] == 1
    engine = InferenceEngine(**frame_finder_options(resolve_config(cfg))).describe()
    assert engine["threshold"] == 0.6 and engine["min_snr"] == 4.0 and engine["tile_size"] == 512
    assert summary["engine"] == engine
    report = json.loads((tmp_path / "out" / "run.cxi.pipeline.json").read_text())
    assert report["engine"] == engine


def counted(images: list[np.ndarray]) -> DefectTracker:
    tracker = DefectTracker()
    for image in images:
        tracker.update([image])
    return tracker


def test_workers_defect_counts_add_up_to_one_engines():
    """Pooled, the workers' counts are one tracker's over the same frames, whatever the deal:
    two workers that found four frames each (too few to name a defect alone) name the hot pixel
    together; a burst in four of one worker's five frames, which that worker alone calls a
    defect, is none over the nine frames of the run.  Counts of another detector are left out."""
    rng = np.random.default_rng(2)
    images = []
    for k in range(9):
        image = rng.normal(0, 1, (24, 24))
        image[3, 4] = 80.0  # hot in every frame
        if k in (0, 1, 2, 3):
            image[12, 15] = 80.0  # a burst, in the first five frames only
        images.append(image)
    halves = counted(images[:4]), counted(images[4:8])
    assert all(half.defects is None for half in halves)
    other = counted([rng.normal(0, 1, (10, 10)) for _ in range(2)])
    pooled, geometry = pooled_defects([LearnedDefects(halves[0], "geom"),
                                       LearnedDefects(halves[1], None),
                                       LearnedDefects(other, "another")])
    assert pooled is not None and pooled.frames == 8 and geometry == "geom"
    np.testing.assert_array_equal(pooled.counts[0], counted(images[:8]).counts[0])
    assert pooled.defects[0][3, 4] and pooled.count() == 1
    assert halves[0].counts[0][3, 4] == 4  # the workers' own are left as they were
    burst, rest = counted(images[:5]), counted(images[5:])
    assert burst.defects[0][12, 15]
    pooled, _ = pooled_defects([LearnedDefects(burst, None), LearnedDefects(rest, None)])
    assert pooled is not None and pooled.frames == 9 and pooled.count() == 1
    assert not pooled.defects[0][12, 15]
    assert pooled_defects([]) == (None, None)


def _unreadable(path: Path) -> Path:
    """A stack whose pixels are complex numbers: CXISource refuses it, naming it."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=np.ones((3, 32, 48), np.complex64))
    return path


def test_an_unreadable_input_fails_the_run_after_the_others_are_written(local_ray,
                                                                        tmp_path: Path, stacks):
    """A trial: 200 good frames, then a file refused with a FormatError, on --workers 2: the
    run failed at once and threw away every good frame (the frame queue was aborted, the
    queued frames dropped).  Now the other inputs' frames are all written and finished, and
    the run then fails with the input's own error, naming it, as the single-process run does
    (not 'source1 failed: ...'); a rerun skips what was written."""
    good = stacks.write(tmp_path / "a.h5", 40)
    bad = _unreadable(tmp_path / "b.h5")
    cfg = config(tmp_path, [good, bad])
    with pytest.raises(PipelineError) as failed:
        run_pipeline(cfg)
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(good, 40) and set(keys.values()) == {1}
    message = str(failed.value)
    assert message.startswith(str(bad)) and "numbers" in message and "source" not in message
    assert isinstance(failed.value.__cause__, FormatError)
    assert failed.value.summary is not None and failed.value.summary["written"] == 40
    again = run_pipeline(config(tmp_path, [good]))
    assert again["resumed_keys"] == 40 and again["written"] == 0


def test_the_stages_warnings_reach_the_driver_once_each(local_ray, tmp_path: Path, stacks,
                                                         caplog):
    """Ray prints nothing of its stage processes (log_to_driver=False keeps their INFO lines
    and Ray's own chatter off the terminal), which hid the project's warnings raised there: a
    frame's non-finite pixels masked was said by the single-process run only.  Now each
    warning a worker raises is logged by the driver, once, under its own logger; nothing below
    WARNING comes through."""
    path = stacks.write(tmp_path / "a.h5", 6)
    with h5py.File(path, "r+") as h5:
        h5["/entry_1/data_1/data"][:, 20, 30:33] = np.nan
    cfg = config(tmp_path, [path], frame_finder="engine", batch_size=2,
                 frame_finder_options={"predictor": BrightPredictor(), "adu_per_photon": 1.0})
    with caplog.at_level(logging.INFO):
        assert run_pipeline(cfg)["written"] == 6
    masked = [r.getMessage() for r in caplog.records
              if r.name == "peaknet_xtal.finding.sanitise" and "non-finite" in r.getMessage()]
    for i in range(6):
        assert sum(f"{path} //{i}:" in m for m in masked) == 1, masked
    assert all(r.levelno >= logging.WARNING for r in caplog.records
               if r.pathname == "(stage process)")


def test_the_workers_counts_of_unusable_pixels_and_frames_without_data_are_summed(
        tmp_path: Path, stacks):
    """Each worker's engine warns about its own first frames, then says the rest are counted
    in the run summary: the summary holds the workers' counts, summed, whatever the deal."""
    path = stacks.write(tmp_path / "a.h5", 9)
    with h5py.File(path, "r+") as h5:
        h5["/entry_1/data_1/data"][:6, 20, 30:33] = np.nan
        h5["/entry_1/data_1/data"][7] = 0.0
    cfg = config(tmp_path, [path], frame_finder="engine", batch_size=2, backend="threads",
                 frame_finder_options={"predictor": BrightPredictor(), "adu_per_photon": 1.0})
    tally = run_pipeline(cfg)["unusable_pixels"]
    assert (tally["frames"], tally["nonfinite_pixels"], tally["frames_without_data"]) == (
        7, 18, 1)
    report = json.loads((tmp_path / "out" / "run.cxi.pipeline.json").read_text())
    assert report["unusable_pixels"] == tally


def test_the_stages_a_stop_took_are_named_in_one_short_line():
    """A stop of a run over 500 inputs named every source actor, a 5-kB warning (and the same in
    pipeline.json's failures); numbered stages of a kind beyond three are a count and a range."""
    from peaknet_xtal.pipeline.driver import stage_names

    many = [f"source{i}" for i in range(500)]
    assert stage_names(["writer0", "w1", "w0", *reversed(many)]) == (
        "500 sources (source0-source499), w0, w1, writer0")
    assert stage_names(["source1", "source0", "w0"]) == "source0, source1, w0"
    assert stage_names([]) == ""
