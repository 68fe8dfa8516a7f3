"""Batches on a real local Ray, elastic scheduling, and resuming an interrupted run."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.labelling.job import label_run
from peaknet_xtal.labelling.labels import LabelFile

CONFIG = {"label": {"min_i_over_sigma": 5.0}, "peakdiff": {"min_found": 1}}


def _config(**run):
    return {**CONFIG, "run": {"batch_size": 1, "max_frames": 3, **run}}


def test_resume_redoes_only_missing_batches(sim_run, tmp_path):
    out = tmp_path / "labels.h5"
    first = label_run([str(sim_run.stream)], out, _config(ray=False, keep_parts=True),
                      progress=False)
    assert first["batches"] == 3 and first["batches_resumed"] == 0
    parts = sorted((tmp_path / "labels.h5.parts").glob("batch_*.h5"))
    assert len(parts) == 3
    with LabelFile(out) as lf:
        before = lf.h5["labels"][()]
    # an interrupted run: the output never appeared and the last batch was in flight
    out.unlink()
    parts[-1].unlink()
    (tmp_path / "labels.h5.parts" / ".batch_000002.h5.x.part").write_bytes(b"half")
    second = label_run([str(sim_run.stream)], out, _config(ray=False), progress=False)
    assert second["batches_resumed"] == 2
    assert second["fits"] == first["fits"]
    with LabelFile(out) as lf:
        assert np.array_equal(lf.h5["labels"][()], before)
    assert not (tmp_path / "labels.h5.parts").exists()


def test_parts_of_another_run_are_refused(sim_run, tmp_path):
    out = tmp_path / "labels.h5"
    label_run([str(sim_run.stream)], out, _config(ray=False, keep_parts=True, max_frames=2),
              progress=False)
    changed = _config(ray=False, max_frames=2)  # same inputs, another fit setting
    changed["fit"] = {"window": 7}
    with pytest.raises(FormatError, match="parts"):
        label_run([str(sim_run.stream)], out, changed, progress=False)


@pytest.mark.ray
def test_ray_run_matches_the_plain_run(sim_run, tmp_path):
    from peaknet_xtal.labelling import pvoigt as pv
    from peaknet_xtal.labelling.batch import serial_fit_map
    from peaknet_xtal.labelling.distributed import elastic_map, ray_fit_map
    from peaknet_xtal.pipeline.ray_session import ray_session

    plain = tmp_path / "plain.h5"
    label_run([str(sim_run.stream)], plain, _config(ray=False), progress=False)
    with ray_session(num_cpus=2) as ray:
        assert ray.is_initialized()

        @ray.remote
        def square(x: int) -> int:
            return x * x

        # order kept, never more than 2 in flight
        assert elastic_map(lambda x: square.remote(x), list(range(7)), 2) == [
            x * x for x in range(7)]
        # a window's gain (its noise model) travels with it to the Ray workers
        bright = [9600.0, 104.3, 57.6, 1.1, 0.9, 1.2, 1.0, 0.4, 64.0, 0.0, 0.0]
        chunks = [[pv.synthetic_window(bright, 9, fs0=100, ss0=53, gain=32.0)]]
        remote = ray_fit_map(2)(chunks, {})[0][0]
        assert remote.status == "ok" and remote.row["redchi"] < 2
        assert remote.row["redchi"] == serial_fit_map(chunks, {})[0][0].row["redchi"]
        summary = label_run([str(sim_run.stream)], tmp_path / "ray.h5",
                            _config(max_fits_in_flight=2), progress=False)
        assert ray.is_initialized()  # a caller's session is reused, not shut down
    assert not ray.is_initialized()
    assert summary["batches"] == 3 and summary["labelled"] == summary["frames"]
    with LabelFile(plain) as a, LabelFile(tmp_path / "ray.h5") as b:
        assert np.array_equal(a.h5["labels"][()], b.h5["labels"][()])
        assert np.array_equal(a.fits["status"], b.fits["status"])
        assert np.array_equal(a.meta("gain"), b.meta("gain"))
