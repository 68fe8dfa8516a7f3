"""The plain (no Ray) batch labeller on simulated frames, checked against the simulator's truth."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy import ndimage

from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
from peaknet_xtal.labelling.batch import Batch, BatchGains, BatchLabeler, FrameJob
from peaknet_xtal.labelling.ingest import records_from_stream, stream_geometry
from peaknet_xtal.labelling.job import label_run
from peaknet_xtal.labelling.labels import LabelFile
from peaknet_xtal.types import Frame

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


@pytest.fixture(scope="module")
def sim_run_adu(tmp_path_factory):
    """Three simulated frames recorded at 25 ADU per photon, as the geometry declares."""
    import sys

    simdata = sys.modules["_peaknet_tests_simdata"]  # tests/conftest.py loaded it by path
    return simdata.make_sim_run(tmp_path_factory.mktemp("simrun_adu"), n_frames=3,
                                adu_per_photon="25")


def test_bright_spots_in_adu_are_labelled_with_the_declared_gain(sim_run_adu, tmp_path):
    """The user trial: on data in ADU (CSPAD, ~32 ADU per photon) every spot above ~20 photons
    was rejected as redchi and stored as background, since the fit counted ADU as photons."""
    out = tmp_path / "labels.h5"
    label_run([str(sim_run_adu.stream)], out,
              {**CONFIG, "peakdiff": {"min_found": 1}, "run": {"ray": False}}, progress=False)
    coverage, outside, n_spots = _truth_scores(out, sim_run_adu)
    assert n_spots > 50
    assert coverage >= 0.95
    assert outside < 0.05
    with LabelFile(out) as lf:
        assert np.all(lf.meta("gain") == 25.0)  # the gain the fits used, per row
        fits = lf.fits
    fitted = fits[np.isfinite(fits["redchi"])]
    assert np.median(fitted["redchi"]) < 2  # a right noise model: about 1, not about 25


def _gradient_panels(gain, rng, n=2):
    """Panels whose background rises from 0.5 to 4 photons a pixel, recorded at ``gain``."""
    level = np.linspace(0.5, 4.0, 256)[None, :] * np.ones((256, 1))
    return [(gain * rng.poisson(level)).astype(np.float32) for _ in range(n)]


def _geometry(make_geometry_text, extra="", top=""):
    """Two panels; ``extra``: panel lines after them; ``top``: top-level lines before them (a
    top-level default after the last panel has no effect, and CrystFEL refuses it)."""
    text = make_geometry_text(["a", "b"], 256, 256, [(0.0, 0.0), (0.0, 256.0)], extra=extra)
    return parse_geometry(top + text)


def test_batch_gains_follow_the_declared_or_measured_gain(make_geometry_text):
    rng = np.random.default_rng(3)
    panels = _gradient_panels(25.0, rng)
    # per panel, as the geometry declares them (no measurement: the data are not looked at)
    geometry = _geometry(make_geometry_text, "a/adu_per_photon = 20\nb/adu_per_photon = 30\n")
    assert BatchGains()(Frame(panels, geometry=geometry)) == [20.0, 30.0]
    # the whole detector's, from adu_per_eV x photon energy (9000 eV)
    geometry = _geometry(make_geometry_text, top="adu_per_eV = 0.0025\n")
    assert BatchGains()(Frame(panels), geometry) == pytest.approx([22.5, 22.5])
    # a placeholder (1) or nothing declared: measured from the background
    for geometry in (_geometry(make_geometry_text, top="adu_per_photon = 1\n"), None):
        gains = BatchGains()(Frame(panels), geometry)
        assert gains[0] == gains[1] == pytest.approx(25.0, rel=0.1)


def test_batch_gains_take_photons_when_nothing_shows_a_gain(caplog):
    frame = Frame([np.zeros((64, 64), np.float32)] * 2, source="blank.cxi")
    gains = BatchGains()
    assert gains(frame) == [1.0, 1.0]
    assert gains(frame) == [1.0, 1.0]
    said = [r.message for r in caplog.records if "no detector gain" in r.message]
    assert len(said) == 1 and "blank.cxi" in said[0]
