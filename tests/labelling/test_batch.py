"""The plain (no Ray) batch labeller on simulated frames, checked against the simulator's truth."""
from __future__ import annotations

import h5py
import numpy as np
from scipy import ndimage

from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.labelling.batch import Batch, BatchLabeler, FrameJob
from peaknet_xtal.labelling.ingest import records_from_stream, stream_geometry
from peaknet_xtal.labelling.job import label_run
from peaknet_xtal.labelling.labels import LabelFile

CONFIG = {"label": {"min_i_over_sigma": 5.0}}


def _truth_scores(labels_path, sim_run):
    """(fraction of true strong spots touched by a label, fraction of label pixels off-spot)."""
    geometry = read_geometry(sim_run.geom)
    with h5py.File(sim_run.truth) as h5:
        truth = h5["peak_masks"][()]
    covered, outside, total = [], 0, 0
    with LabelFile(labels_path) as lf:
        events, panels = lf.meta("event"), lf.meta("panel")
        for i in range(len(lf)):
            _, _, label = lf[i]
            spots = geometry.split_slab(truth[int(events[i][2:])])[int(panels[i])].astype(bool)
            label = label[:spots.shape[0], :spots.shape[1]].astype(bool)
            comp, n = ndimage.label(spots)
            covered += [label[comp == k].any() for k in range(1, n + 1)]
            outside += int((label & ~spots).sum())
            total += int(label.sum())
    return float(np.mean(covered)), outside / max(total, 1), len(covered)


def test_labels_cover_true_strong_spots(sim_run, tmp_path):
    """Issue 7 item 6: >= 95% of true strong spots covered, < 5% of label pixels outside them."""
    out = tmp_path / "labels.h5"
    summary = label_run([str(sim_run.stream)], out,
                        {**CONFIG, "peakdiff": {"min_found": 1}, "run": {"ray": False}},
                        progress=False)
    assert summary["frames"] == summary["selected"] == summary["labelled"]
    coverage, outside, n_spots = _truth_scores(out, sim_run)
    assert n_spots > 100
    assert coverage >= 0.95
    assert outside < 0.05
    with LabelFile(out) as lf:
        assert len(lf) == 2 * summary["labelled"]  # both panels of every frame
        assert lf.frames("status").tolist() == ["labelled"] * summary["frames"]
        assert (lf.meta("n_fitted") > 0).any() and np.isfinite(lf.meta("precision")).all()


def test_batch_records_unreadable_frames_and_goes_on(sim_run, tmp_path):
    geometry = stream_geometry(sim_run.stream)
    records = list(records_from_stream(sim_run.stream, geometry=geometry))[:2]
    records[1].image = str(tmp_path / "gone.cxi")
    labeler = BatchLabeler(CONFIG, {records[0].geometry_key: geometry})
    part = tmp_path / "part.h5"
    summary = labeler.run(Batch(0, [FrameJob(0, records[0]), FrameJob(1, records[1])]), part)
    assert (summary.frames, summary.frame_errors) == (1, 1)
    assert summary.fits_ok > 0
    with LabelFile(part) as lf:
        assert len(lf) == 2
        assert lf.frames("status", "batch").tolist() == ["image_error", "labelled"]
        assert "gone.cxi" in lf.frames("message", "batch")[0]
        fits = lf.fits
        assert len(fits) == summary.fits_ok + summary.fits_rejected
        assert set(fits["row"]) <= {0, 1}


def test_labelled_panels_only_and_found_positions(sim_run, tmp_path):
    geometry = stream_geometry(sim_run.stream)
    records = list(records_from_stream(sim_run.stream, geometry=geometry))[:1]
    config = {"label": {"panels": "labelled", "fit_on": "found"}}
    labeler = BatchLabeler(config, {records[0].geometry_key: geometry})
    labeler.run(Batch(0, [FrameJob(0, records[0])]), tmp_path / "p.h5")
    with LabelFile(tmp_path / "p.h5") as lf:
        assert len(lf) >= 1
        assert all(lf.meta("n_fitted") > 0)
        assert len(lf.fits) == len(records[0].found)
