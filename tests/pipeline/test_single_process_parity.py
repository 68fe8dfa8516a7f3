"""What a pipeline run shares with the single-process ``peaknet2cxi`` run, on threads (the same
driver and stage classes Ray hosts): the output folder's geometry is the first input's whatever
frame comes first, the summary's ``written`` counts what the output gained when a writer could
not say, and the progress line has the run's total.  The frame finder is the plain local-maximum
finder: these are about the plumbing."""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import LocalMaxFinder

from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import PipelineError, run_pipeline


def _config(tmp_path: Path, inputs: list, **extra) -> dict:
    return {"inputs": inputs, "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
            "writer_options": {"frames_per_file": 4}, "backend": "threads",
            "frame_finder": LocalMaxFinder, "frame_finder_options": {"threshold": 100.0},
            "workers": 2, "batch_size": 2, "queue_capacity": 8, "result_queue_capacity": 8,
            "source_chunk": 2, "progress": False, "monitor_interval": 0.05, **extra}


class LateSource(CXISource):
    """A CXI stack whose first frame comes late (a slow disk, a big first file): the other
    inputs' frames reach the writer first."""

    def __iter__(self):
        time.sleep(0.5)
        yield from super().__iter__()


def _detector(tmp_path: Path, name: str, n: int, height: int, width: int,
              make_geometry_text) -> tuple[Path, Path]:
    """``n`` frames of one ``height`` x ``width`` panel and the CrystFEL geometry of it."""
    data = np.random.default_rng(n).normal(5, 1, (n, height, width)).astype(np.float32)
    data[:, 5, 7] = 500.0
    path = tmp_path / f"{name}.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    geom = tmp_path / f"{name}.geom"
    geom.write_text(make_geometry_text(["p0"], width, height, [(-width / 2, -height / 2)],
                                       adu_per_photon="1"))
    return path, geom


def test_the_first_inputs_geometry_is_the_folders_whichever_frame_comes_first(
        tmp_path: Path, stacks, make_geometry_text):
    """Two detectors, no geometry for the writer, the first input's frames late: the writer
    took the folder's geometry from the first frame it met, the second input's, so the error
    named the first input and the second one's frames were kept.  Now, as in the
    single-process run, the second input is refused before any of its frames is found, with
    the single-process run's error, and every frame of the first is written."""
    near, near_geom = _detector(tmp_path, "near", 12, 32, 48, make_geometry_text)
    far, far_geom = _detector(tmp_path, "far", 3, 40, 40, make_geometry_text)
    inputs = [{"path": str(near), "kind": LateSource, "options": {"geometry": str(near_geom)}},
              {"path": str(far), "kind": CXISource, "options": {"geometry": str(far_geom)}}]
    with pytest.raises(PipelineError) as failed:
        run_pipeline(_config(tmp_path, inputs))
    single = CXIWriter(tmp_path / "single")  # the single-process run's check and its words
    single.check_geometry(next(iter(CXISource(near, near_geom))))
    with pytest.raises(Exception) as refused:
        single.check_geometry(next(iter(CXISource(far, far_geom))))
    assert str(failed.value) == str(refused.value)
    assert str(failed.value).startswith(f"{far}: its detector geometry differs from that of "
                                        f"the first input, {near}")
    assert set(stacks.written(tmp_path / "out")) == stacks.expected(near, 12)
    assert failed.value.summary is not None and failed.value.summary["written"] == 12


class BreakingWriter(CXIWriter):
    """A CXI writer whose disk fails at the 10th frame: the 9 before are in finished files (the
    file in progress is finished as the writer closes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0

    def write(self, result) -> None:
        self.taken += 1
        if self.taken == 10:
            raise OSError("disk failed")
        super().write(result)


def test_written_counts_what_a_writer_that_could_not_say_finished(tmp_path: Path, stacks):
    """A writer that ends without its summary (its process ended by a scheduler's SIGTERM to
    the whole job, or a failed write) counted 0 in the summary's ``written``, though its
    finished files hold frames; they are counted from the output now, as a rerun counts
    them, less what the output held before the run."""
    first = stacks.write(tmp_path / "a.h5", 4)
    run_pipeline(_config(tmp_path, [{"path": str(first), "kind": CXISource}]))
    path = stacks.write(tmp_path / "b.h5", 20)
    cfg = _config(tmp_path, [{"path": str(path), "kind": CXISource}], writer=BreakingWriter,
                  workers=1)
    with pytest.raises(PipelineError, match="disk failed") as failed:
        run_pipeline(cfg)
    kept = stacks.written(tmp_path / "out")
    assert len(set(kept) & stacks.expected(path, 20)) == 9
    summary = failed.value.summary
    assert summary is not None and (summary["written"], summary["resumed_keys"]) == (9, 4)


def test_the_progress_line_has_the_runs_total_and_what_was_done_before(tmp_path: Path, stacks,
                                                                       capsys):
    """The single-process run's progress line gives the frames done of the inputs' total (so a
    share and an ETA); the pipeline's gave a bare count.  A resumed run starts from the frames
    done before, as the single-process run counts them."""
    a = stacks.write(tmp_path / "a.h5", 10)
    b = stacks.write(tmp_path / "b.h5", 6)
    specs = [{"path": str(p), "kind": CXISource} for p in (a, b)]
    run_pipeline(_config(tmp_path, specs[:1], progress=True))
    assert "pipeline: 10/10 frames 100.0%" in capsys.readouterr().err
    run_pipeline(_config(tmp_path, specs, progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if "pipeline:" in line]
    assert lines[0].startswith("pipeline: 10/16 frames")
    assert lines[-1].startswith("pipeline: 16/16 frames 100.0%")


def test_inputs_too_many_to_count_quickly_leave_the_progress_line_without_a_total(
        tmp_path: Path, stacks, capsys, monkeypatch):
    """Counting opens every input: where that outlasts ``progress.COUNT_SECONDS`` the run
    starts at once, its line a bare count and rate, and its frames are all found."""
    from peaknet_xtal import progress

    monkeypatch.setattr(progress, "COUNT_SECONDS", 0.0)
    paths = [stacks.write(tmp_path / f"{name}.h5", 4) for name in "abc"]
    specs = [{"path": str(p), "kind": CXISource} for p in paths]
    run_pipeline(_config(tmp_path, specs, progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if "pipeline:" in line]
    assert lines[-1].startswith("pipeline: 12 frames |"), lines
    assert not any("/12" in line or "ETA" in line for line in lines)
    assert len(stacks.written(tmp_path / "out")) == 12
