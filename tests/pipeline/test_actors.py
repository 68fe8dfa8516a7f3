"""The stage classes without Ray: source feeding, worker batches, writer de-duplication, what a
worker's engine learned and ran with, and the whole pipeline on threads (same classes, same
driver) including a crashing worker, a failing input and a resume.

The frame finder is the plain local-maximum finder where these tests are about the plumbing, and
the engine with a stand-in segmenter where they are about what the engine keeps.
"""
from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import BrightPredictor, LocalMaxFinder

from peaknet_xtal.errors import FormatError
from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.formats.cxi import CXISource, CXIWriter, read_cxi_peaks
from peaknet_xtal.pipeline import PipelineError, run_pipeline
from peaknet_xtal.pipeline.actors import ModelWorker, ResultWriter, SourceFeeder, shard_of
from peaknet_xtal.types import Frame

#: The stand-in engine's settings: peaks where the pixels are bright, no model loaded.
ENGINE = {"predictor": BrightPredictor(), "adu_per_photon": 1.0, "threshold": 0.6, "threads": 1}
#: In the stacks of ``stacks.write``, bright in every frame (a hot pixel), and in 2 of 4.
HOT, SOMETIMES = (4, 5), (16, 23)


class ListQueue:
    """Records what a SourceFeeder puts; refuses after ``limit`` puts (like an aborted queue)."""

    def __init__(self, limit: int = 10**9) -> None:
        self.items: list = []
        self.limit = limit

    def put(self, items, timeout=None) -> bool:
        if self.limit <= 0:
            return False
        self.limit -= 1
        self.items.extend(items)
        return True


def test_source_feeder_chunks_and_skips_done_keys(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "in.h5", 10)
    done = [(str(path.resolve()), "//3"), (str(path.resolve()), "//7")]
    queue = ListQueue()
    out = SourceFeeder({"path": str(path), "kind": CXISource}, done, chunk=3).run(queue)
    assert out == {"path": str(path), "sent": 8, "skipped": 2, "stopped": False}
    assert [f.event for f in queue.items] == [f"//{i}" for i in range(10) if i not in (3, 7)]


def test_source_feeder_skips_a_files_done_frames_under_any_of_its_names(tmp_path: Path,
                                                                       stacks):
    """Frames done under a link's name are done when the file comes under its own, and the
    other way round (both names were found, and written twice into one folder)."""
    path = stacks.write(tmp_path / "in.h5", 6)
    link = tmp_path / "link.h5"
    link.symlink_to(path)
    for given, done_as in ((path, link), (link, path)):
        done = [(str(done_as), "//1"), (str(done_as), "//4")]
        queue = ListQueue()
        out = SourceFeeder({"path": str(given), "kind": CXISource}, done, chunk=3).run(queue)
        assert (out["sent"], out["skipped"]) == (4, 2)
        assert [f.event for f in queue.items] == ["//0", "//2", "//3", "//5"]


def test_source_feeder_stops_when_the_queue_refuses(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "in.h5", 10)
    out = SourceFeeder({"path": str(path), "kind": CXISource}, chunk=4).run(ListQueue(limit=1))
    assert out["stopped"] and out["sent"] == 4


def test_worker_keeps_identity_and_drops_linkable_pixels(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "in.h5", 6)
    frames = list(CXISource(path))
    worker = ModelWorker("w0", LocalMaxFinder, {"threshold": 100.0}, batch_size=4)
    results = worker.process(frames[:5])  # a partial batch is fine
    assert [r.frame.key for r in results] == [f.key for f in frames[:5]]
    assert [len(r.peaks) for r in results] == [i % 4 + 1 for i in range(5)]
    assert all(r.frame.panels == [] and r.prob_maps is None for r in results)
    unlinked = Frame(panels=[np.zeros((8, 8), np.float32)], source="mem", event="//0")
    kept = worker.process([unlinked])[0]
    assert kept.frame.panels[0].shape == (8, 8)  # the writer will have to copy these pixels
    stats = worker.stats()
    assert stats["frames"] == 6 and stats["batches"] == 2 and 0 < stats["busy_fraction"] <= 1


def test_worker_hands_over_what_its_engine_learned_and_its_settings(tmp_path: Path, stacks):
    """The driver merges the workers' defect counts into the run's mask: what a worker hands
    over is its engine's own tracker, the counts one engine keeps over the same frames; its
    settings are the engine's ``describe()``, defaults filled in, before any frame too."""
    path = stacks.write(tmp_path / "in.h5", 8)
    frames = list(CXISource(path))
    worker = ModelWorker("w0", "engine", ENGINE, batch_size=4)
    assert worker.learned_defects() is None  # nothing found, nothing built for it
    assert worker.settings() == InferenceEngine(**ENGINE).describe()
    assert worker.settings()["min_snr"] == InferenceEngine().peak_params.min_snr
    worker.process(frames[:4])
    worker.process(frames[4:])
    learned = worker.learned_defects()
    assert learned is not None and learned.tracker.frames == 8
    one = InferenceEngine(**ENGINE)
    list(one.find_frames(frames))
    for mine, theirs in zip(learned.tracker.counts, one.defects.tracker.counts, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    defects = learned.tracker.defects[0]
    assert defects[HOT] and not defects[SOMETIMES]
    assert learned.geometry is frames[-1].geometry


def test_a_worker_without_an_engine_has_no_defects_or_settings_to_hand_over(tmp_path: Path,
                                                                            stacks):
    worker = ModelWorker("w0", LocalMaxFinder, {"threshold": 100.0})
    worker.process(list(CXISource(stacks.write(tmp_path / "in.h5", 6))))
    assert worker.learned_defects() is None and worker.settings() is None


def test_writer_skips_done_and_duplicate_keys(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "in.h5", 4)
    results = list(LocalMaxFinder(100.0).find_frames(CXISource(path)))
    out = tmp_path / "out" / "run.cxi"
    first = ResultWriter(CXIWriter, str(out), {"frames_per_file": 2})
    assert len(first.write(results[:3] + results[:1])) == 4  # every key is acknowledged
    assert first.close() == {"path": str(out), "written": 3, "duplicates": 1, "resumed": 0}
    second = ResultWriter(CXIWriter, str(out), {"frames_per_file": 2})
    assert second.resumed == 3
    second.write(results)
    assert second.close()["written"] == 1
    assert sorted(stacks.written(out.parent).values()) == [1, 1, 1, 1]


def test_shard_of_is_stable_and_spreads():
    keys = [("a.h5", f"//{i}") for i in range(200)]
    shards = [shard_of(k, 3) for k in keys]
    assert shards == [shard_of(k, 3) for k in keys] and set(shards) == {0, 1, 2}
    assert shard_of(keys[0], 1) == 0


def threads_config(tmp_path: Path, inputs: list, **extra) -> dict:
    return {"inputs": [{"path": str(p), "kind": CXISource} for p in inputs],
            "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
            "writer_options": {"frames_per_file": 16}, "backend": "threads",
            "frame_finder": LocalMaxFinder, "frame_finder_options": {"threshold": 100.0},
            "workers": 2, "batch_size": 5, "queue_capacity": 12, "result_queue_capacity": 8,
            "source_chunk": 4, "progress": False, "monitor_interval": 0.1, **extra}


def test_threads_pipeline_writes_every_frame_once_with_peaks(tmp_path: Path, stacks):
    inputs = [stacks.write(tmp_path / "a.h5", 37, seed=1), stacks.write(tmp_path / "b.h5", 23)]
    summary = run_pipeline(threads_config(tmp_path, inputs, writers=2))
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(inputs[0], 37) | stacks.expected(inputs[1], 23)
    assert set(keys.values()) == {1}
    assert summary["written"] == 60 and summary["frames_out"] == 60
    assert summary["peak_queue_depth"] <= 12  # the bound held
    first = sorted((tmp_path / "out").glob("run-w*-00000.cxi"))[0]
    assert np.all(read_cxi_peaks(first).n_peaks >= 1)
    assert (tmp_path / "out" / "run.cxi.pipeline.json").exists()


class FlakyFinder(LocalMaxFinder):
    """Fails once per process on the frame whose event is ``fail_on`` (a crash mid-batch)."""

    failed: set = set()

    def __init__(self, fail_on: str, **kw) -> None:
        super().__init__(**kw)
        self.fail_on = fail_on

    def find_frames(self, frames):
        for result in super().find_frames(frames):
            if result.frame.event == self.fail_on and self.fail_on not in FlakyFinder.failed:
                FlakyFinder.failed.add(self.fail_on)
                raise RuntimeError("simulated crash")
            yield result


def test_threads_pipeline_requeues_a_crashed_workers_batch(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "a.h5", 40)
    FlakyFinder.failed.clear()
    cfg = threads_config(tmp_path, [path], frame_finder=FlakyFinder,
                         frame_finder_options={"fail_on": "//17", "threshold": 100.0})
    summary = run_pipeline(cfg)
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(path, 40) and set(keys.values()) == {1}
    assert summary["restarts"] == 1 and summary["requeued"] >= 1
    assert "re-queued" in summary["failures"][0]


def test_threads_pipeline_fails_after_max_restarts_but_keeps_what_is_done(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "a.h5", 30)

    def broken(**_):
        raise RuntimeError("model will not load")

    with pytest.raises(PipelineError, match="died"):
        run_pipeline(threads_config(tmp_path, [path], frame_finder=broken, max_restarts=1))


def test_threads_pipeline_resumes_without_rewriting(tmp_path: Path, stacks):
    path = stacks.write(tmp_path / "a.h5", 40)
    cfg = threads_config(tmp_path, [path])
    run_pipeline(cfg)
    files = sorted((tmp_path / "out").glob("*.cxi"))
    again = run_pipeline(cfg)
    assert again["resumed_keys"] == 40 and again["written"] == 0
    assert sorted((tmp_path / "out").glob("*.cxi")) == files


#: Set by :class:`SignallingEngine` once it has found :data:`FOUND_BEFORE_FAILING` frames.
FOUND = threading.Event()
FOUND_BEFORE_FAILING = 6


class SignallingEngine(InferenceEngine):
    """The engine, saying when it has found the frames the failing input sent (one worker)."""

    found = 0

    def find_frames(self, frames, **kw):
        for result in super().find_frames(frames, **kw):
            SignallingEngine.found += 1
            if SignallingEngine.found >= FOUND_BEFORE_FAILING:
                FOUND.set()
            yield result


class BreaksAfterItsFrames:
    """A CXI stack whose read fails after its frames, once they have been found: the run then
    fails for good with what the worker learned from them in hand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inner = CXISource(path)

    def __iter__(self):
        yield from self.inner
        FOUND.wait(60)
        raise FormatError(self.path, "truncated after its frames")

    def close(self) -> None:
        self.inner.close()


def test_a_run_that_fails_still_writes_the_pixel_defects_it_learned(tmp_path: Path, stacks):
    """As the single-process run does, a run that fails for good leaves the defect mask of the
    frames found before the failure beside its output."""
    path = stacks.write(tmp_path / "a.h5", FOUND_BEFORE_FAILING)
    FOUND.clear()
    SignallingEngine.found = 0
    cfg = threads_config(tmp_path, [path], frame_finder=SignallingEngine,
                         frame_finder_options=ENGINE, workers=1, batch_size=2, source_chunk=1)
    cfg["inputs"] = [{"path": str(path), "kind": BreaksAfterItsFrames}]
    with pytest.raises(PipelineError, match="truncated") as failed:
        run_pipeline(cfg)
    with h5py.File(tmp_path / "out" / "pixel_defects.h5") as h5:
        mask = h5["/data/data"][()]
    assert mask.dtype == np.uint8 and mask[HOT] == 0 and mask[SOMETIMES] == 1
    # and the error says how the frames were found, for the caller's record of the run
    assert failed.value.engine is not None and failed.value.engine["threshold"] == 0.6


def _spiking_stack(path: Path, n: int, hot: bool) -> Path:
    """``n`` noise frames; with ``hot`` one lone pixel spikes in every one of them."""
    data = np.random.default_rng(n + hot).normal(5, 1, (n, 32, 48)).astype(np.float32)
    if hot:
        data[:, 16, 23] = 5000.0
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    return path


def _run_defects(tmp_path: Path, inputs: list[Path], out: Path) -> dict:
    """One threads-backend run of the engine over ``inputs`` into ``out`` (5 frames a file)."""
    cfg = threads_config(tmp_path, inputs, frame_finder=InferenceEngine,
                         frame_finder_options=ENGINE, workers=1, batch_size=5)
    cfg["output"] = str(out / "run.cxi")
    cfg["writer_options"] = {"frames_per_file": 5}
    return run_pipeline(cfg)


def test_a_resumed_run_writes_the_whole_runs_defect_mask(tmp_path: Path):
    """The frames an earlier run wrote are skipped and reach no worker: the sources count their
    spikes, so the resumed run writes the mask one run over all the frames writes (a pixel
    spiking in the 5 frames of b, none of a's 10: a third of the run,
    under the tracker's three in four; counted over b alone it is a defect)."""
    a = _spiking_stack(tmp_path / "a.h5", 10, hot=False)
    b = _spiking_stack(tmp_path / "b.h5", 5, hot=True)

    def run(inputs: list[Path], out: Path) -> dict:
        return _run_defects(tmp_path, inputs, out)

    def mask(out: Path) -> np.ndarray:
        with h5py.File(out / "pixel_defects.h5") as h5:
            return h5["/data/data"][()]

    run([a, b], tmp_path / "whole")
    run([a], tmp_path / "resumed")
    assert run([a, b], tmp_path / "resumed")["resumed_keys"] == 10
    assert mask(tmp_path / "whole")[16, 23] == 1
    np.testing.assert_array_equal(mask(tmp_path / "resumed"), mask(tmp_path / "whole"))
    assert run([b], tmp_path / "alone")["resumed_keys"] == 0
    assert mask(tmp_path / "alone")[16, 23] == 0  # what the resumed run wrote before


def test_a_resumed_run_counts_the_frames_it_skips_however_the_earlier_run_ended(
        tmp_path: Path):
    """The frames an earlier run finished reach no worker: the sources count their spiking
    pixels, as the single-process run counts them again (``InferenceEngine.observe``), so the
    resumed run's mask is the whole run's whatever the earlier run left.  The earlier run's
    kept counts were used instead, and where they were not of the frames skipped the mask
    counted the resumed run's frames only: after a run stopped with its Ray processes (a
    scheduler's SIGTERM to the whole job writes no mask) a pixel spiking in b's 5 frames and
    none of a's 10 was written as a defect; after a finished file was deleted, 5 frames of 15
    were counted."""
    from peaknet_xtal.finding.defects import DefectTracker

    a = _spiking_stack(tmp_path / "a.h5", 10, hot=False)
    b = _spiking_stack(tmp_path / "b.h5", 5, hot=True)

    def run(inputs: list[Path], out: Path) -> dict:
        return _run_defects(tmp_path, inputs, out)

    def counts(out: Path) -> tuple[int, np.ndarray]:
        kept = DefectTracker.load(out)
        assert kept is not None and kept.counts is not None
        return kept.frames, kept.counts[0]

    run([a, b], tmp_path / "whole")
    frames, whole = counts(tmp_path / "whole")
    assert frames == 15 and whole[16, 23] == 5  # under three in four: no defect
    killed = tmp_path / "killed"  # a's frames finished, then the stop took the mask with it
    run([a], killed)
    for mask in killed.glob("pixel_defects.*"):
        mask.unlink()
    assert run([a, b], killed)["resumed_keys"] == 10
    frames, resumed = counts(killed)
    assert frames == 15
    np.testing.assert_array_equal(resumed, whole)
    deleted = tmp_path / "deleted"  # a finished file deleted after the mask was written
    run([a, b], deleted)
    next(deleted.glob("run-*.cxi")).unlink()
    assert run([a, b], deleted)["resumed_keys"] == 10
    frames, again = counts(deleted)
    assert frames == 15
    np.testing.assert_array_equal(again, whole)


class CrashingEngine(InferenceEngine):
    """The engine, crashing once per process after it has found ``after`` frames (a worker
    killed mid-run): its spike counts die with it."""

    crashed = False

    def __init__(self, after: int = 6, **kw) -> None:
        super().__init__(**kw)
        self.after = after
        self.found = 0

    def find_frames(self, frames, **kw):
        for result in super().find_frames(frames, **kw):
            self.found += 1
            if self.found > self.after and not CrashingEngine.crashed:
                CrashingEngine.crashed = True
                raise RuntimeError("simulated kill -9")
            yield result


def test_a_mask_missing_a_dead_workers_frames_says_so(tmp_path: Path, stacks, caplog):
    """A worker that died took the spike counts of the frames it had found: the mask was of
    fewer frames than the run's ('0 defects over 32 frames' of 48, status ok), with nothing
    to say so; a rerun, whose sources count every frame done, writes the whole run's."""
    path = stacks.write(tmp_path / "a.h5", 20)
    CrashingEngine.crashed = False
    cfg = threads_config(tmp_path, [path], frame_finder=CrashingEngine,
                         frame_finder_options={**ENGINE, "after": 6}, workers=1, batch_size=2,
                         source_chunk=2)
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        summary = run_pipeline(cfg)
    assert summary["restarts"] == 1
    said = [r.getMessage() for r in caplog.records if "defect mask counts" in r.getMessage()]
    assert len(said) == 1 and "run the same command again" in said[0], said
    counted = int(said[0].split("counts ")[1].split()[0])
    assert counted < 20
    caplog.clear()
    with caplog.at_level("INFO", logger="peaknet_xtal"):
        assert run_pipeline(cfg)["resumed_keys"] == 20
    assert not [r for r in caplog.records if "defect mask counts" in r.getMessage()]
    assert any("over 20 frames" in r.getMessage() for r in caplog.records)
