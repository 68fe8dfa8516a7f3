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


def test_the_mask_advice_keeps_the_written_geometrys_own_mask(fixtures_dir, tmp_path, caplog):
    """The log says how a geometry uses the defect mask.  peaknet.geom reads each frame's mask
    in mask slot 0 (``mask = /entry_1/data_1/mask``): the advised lines name a free slot, so
    that peaknet.geom with them added still reads each frame's mask, and the defect mask too,
    wherever indexamajig runs (an absolute path)."""
    import logging
    import re

    stack, geom_path, _ = _hot_run(fixtures_dir, tmp_path)
    outdir = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="peaknet_xtal.finding.defects"):
        _run([str(stack)], geom_path, outdir)
    (advice,) = [r.getMessage() for r in caplog.records if "pixel defect mask (" in r.message]
    lines = re.findall(r"(mask\d_\w+ = [^;\s]+)", advice)
    assert len(lines) == 4 and str(outdir / "peaknet.geom") in advice, advice
    written = outdir / "peaknet.geom"
    before = read_geometry(written)
    assert before.mask == "/entry_1/data_1/mask"  # slot 0: each frame's own mask
    slot = lines[0][len("mask"):lines[0].index("_")]
    assert slot != "0" and f"mask{slot}_" not in written.read_text(), advice
    followed = tmp_path / "followed.geom"
    text = written.read_text()
    first_panel = text.index("\n\n") + 2  # CrystFEL: globals before the first panel
    followed.write_text(text[:first_panel] + "".join(f"{line.strip()}\n" for line in lines)
                        + text[first_panel:])
    after = read_geometry(followed)
    assert (after.mask, after.mask_file) == (before.mask, before.mask_file)
    mask_file = after.keys[f"mask{slot}_file"]
    assert mask_file == str((outdir / "pixel_defects.h5").absolute())
    assert after.keys[f"mask{slot}_data"] == "/data/data"


def test_the_first_free_mask_slot_counts_every_form_of_mask_key():
    """Slot 0's aliases (``mask``, ``mask_file``, ``mask_good``, ``mask_bad``), numbered slots,
    panel keys and comments: the advice takes the first slot from 1 to 7 no line uses, and
    says so when there is none."""
    from peaknet_xtal.finding.defects import mask_advice

    panel = ("res = 10000\nclen = 0.1\nphoton_energy = 9000\ndata = /data\n"
             "p0/min_fs = 0\np0/max_fs = 9\np0/min_ss = 0\np0/max_ss = 9\n"
             "p0/corner_x = 0\np0/corner_y = 0\np0/fs = x\np0/ss = y\n")
    text = ("mask = /entry_1/data_1/mask\nmask_good = 0x1\nmask1_data = /m1\n"
            "; mask3_data = /commented\nmask_edge_pixels = 1\n" + panel
            + "p0/mask2_data = /m2 ; a panel's own\n")
    advice = mask_advice("/x/pixel_defects.h5", text, "peaknet.geom")
    assert "mask3_file = /x/pixel_defects.h5" in advice and "mask0" not in advice
    full = "".join(f"mask{n}_data = /m{n}\n" for n in range(8)) + panel
    assert "every mask slot" in mask_advice("/x/pixel_defects.h5", full, "g.geom")
    assert "mask1_file = " in mask_advice("/x/pixel_defects.h5", None)
