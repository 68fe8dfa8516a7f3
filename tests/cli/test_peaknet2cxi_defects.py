"""``peaknet2cxi`` drops peaks on a hot pixel the run shows, from its first frame on, and leaves
the run's pixel defect mask beside its output, in the data's layout, for a CrystFEL geometry to
name."""
from __future__ import annotations

import h5py
import numpy as np

from peaknet_xtal.cli.peaknet2cxi import run
from peaknet_xtal.formats.cxi import read_cxi_peaks
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig, simulate_frame

HOT = (1, 10, 20)  # panel, ss, fs


def bright(panels, masks):
    """Stand-in segmenter: pixels 8 robust sigmas above the panel median."""
    out = []
    for p in panels:
        med = np.median(p)
        sigma = 1.4826 * np.median(np.abs(p - med)) + 1e-6
        out.append(((p - med) / sigma > 8).astype(np.float32))
    return out


def _hot_run(fixtures_dir, tmp_path):
    """An 8-frame blank run with one hot pixel, as a CXI stack."""
    geom_path = fixtures_dir / "geometry" / "two_panels.geom"
    geometry = read_geometry(geom_path)
    slabs = []
    for seed in range(8):
        frame, _ = simulate_frame(geometry, seed, SimConfig(air_photons=2.0, hit_probability=0.0))
        panels = [p.copy() for p in frame.panels]
        panels[HOT[0]][HOT[1], HOT[2]] = 500.0
        slabs.append(geometry.assemble_slab(panels))
    stack = tmp_path / "run.cxi"
    with h5py.File(stack, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=np.stack(slabs))
    return stack, geom_path, geometry


def _run(inputs, geom_path, outdir):
    return run({"inputs": inputs, "geometry": str(geom_path), "output": str(outdir),
                "predictor": bright, "progress": False, "min_peaks": 1, "adu_per_photon": 1.0})


def _peaks_on_hot(outdir, geometry):
    """Peaks at the hot pixel per frame, in event order, over every CXI file of the run."""
    counts = {}
    for cxi_file in (outdir / "peaknet.lst").read_text().split():
        peaks = read_cxi_peaks(cxi_file)
        for row in range(len(peaks)):
            table = peaks.peaks(row, geometry)
            counts[int(peaks.keys[row][1].lstrip("/"))] = int(np.sum((table["panel"] == HOT[0])
                                     & (np.abs(table["ss"] - HOT[1]) <= 1)
                                     & (np.abs(table["fs"] - HOT[2]) <= 1)))
    return counts


def test_hot_pixel_is_masked_and_the_mask_is_saved(fixtures_dir, tmp_path):
    stack, geom_path, geometry = _hot_run(fixtures_dir, tmp_path)
    outdir = tmp_path / "out"
    summary = _run([str(stack)], geom_path, outdir)
    assert summary["frames"] == 8
    counts = _peaks_on_hot(outdir, geometry)
    on_hot = [counts[i] for i in range(8)]
    # the run's first five frames are read ahead and counted before any is filtered
    assert on_hot == [0] * 8
    with h5py.File(outdir / "pixel_defects.h5") as h5:
        mask = h5["/data/data"][()]
    slab_index = geometry.panels[HOT[0]].slab_index()
    assert mask.shape == geometry.slab_shape and mask[slab_index][HOT[1], HOT[2]] == 0
    assert mask.sum() >= mask.size - 3  # the hot pixel, and little else


def test_a_resumed_run_knows_the_defects_of_the_frames_done_before(fixtures_dir, tmp_path):
    """Frames done by an interrupted run count towards the defect tracker of the run that
    resumes it, so the resumed run drops the hot pixel from its first frame on, as an
    uninterrupted run does (and saves the same mask)."""
    stack, geom_path, geometry = _hot_run(fixtures_dir, tmp_path)
    outdir = tmp_path / "out"
    first = tmp_path / "first.lst"
    first.write_text("".join(f"{stack} //{i}\n" for i in range(5)))
    assert _run([str(first)], geom_path, outdir)["frames"] == 5
    _run([str(stack)], geom_path, outdir)  # resumes: frames 0-4 done, 5-7 to do
    counts = _peaks_on_hot(outdir, geometry)
    assert sorted(counts) == list(range(8))
    assert [counts[i] for i in (5, 6, 7)] == [0, 0, 0]  # a fresh tracker would need 5 frames
    with h5py.File(outdir / "pixel_defects.h5") as h5:
        mask = h5["/data/data"][()]
    assert mask[geometry.panels[HOT[0]].slab_index()][HOT[1], HOT[2]] == 0
