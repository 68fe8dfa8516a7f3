"""peaknet2cxi end to end on simulated CXI stacks for three real detector geometries.

Model quality is not under test here (the shipped default model may be untrained): the plumbing
tests inject a *truth predictor* that returns the simulator's own peak masks for each panel, so any
error in tiling, peak finding, coordinate conversion or CXI/stream layout shows up as a mismatch
with the truth.  One test runs the real ``load_model("default")`` through ``main()``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import halving_family, tiny_cbf, unchecked_weights, write_packed

import peaknet_xtal
from peaknet_xtal.cli.peaknet2cxi import main, run
from peaknet_xtal.errors import FormatError, PeakNetError
from peaknet_xtal.evaluation.metrics import match_peaks
from peaknet_xtal.formats.cxi import read_cxi_peaks
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.formats.stream import read_stream
from peaknet_xtal.sim import simulate_frame

GEOMETRIES = {
    "epix10k2M": "om_lcls_mfx_epix10k2M.geom",
    "cspad": "crystfel_doc_cspad-cxiformat.geom",
    "rayonix": "om_lcls_rayonix.geom",
}
N_FRAMES = 2


def _digest(panel: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(panel, np.float32).tobytes()).digest()


class TruthPredictor:
    """Probability 1 on the simulator's true peak pixels of each panel (looked up by content)."""

    def __init__(self) -> None:
        self.masks: dict[bytes, np.ndarray] = {}

    def add(self, frame, truth) -> None:
        for panel, mask in zip(frame.panels, truth.peak_masks, strict=False):
            self.masks[_digest(panel)] = mask.astype(np.float32)

    def __call__(self, panels, masks):
        return [self.masks[_digest(p)] for p in panels]


def write_stack(path: Path, geometry, frames) -> Path:
    """A CXI/HDF5 stack laid out as the geometry says (mask dataset included if it names one)."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset(geometry.data or "/entry_1/data_1/data",
                          data=np.stack([geometry.assemble_slab(f.panels) for f in frames]))
        if geometry.mask:  # these geometries flag bad pixels by any nonzero bit
            h5.create_dataset(geometry.mask, data=np.stack(
                [geometry.assemble_slab([~m for m in f.masks]) for f in frames]).astype(np.uint16))
    return path


@pytest.fixture(scope="module")
def stacks(real_data, tmp_path_factory):
    """name -> (geometry path, geometry, stack path, [(frame, truth)], predictor)."""
    out = {}
    predictor = TruthPredictor()
    for name, filename in GEOMETRIES.items():
        geom_path = real_data / "crystfel_geometry" / filename
        geometry = read_geometry(geom_path)
        sims = [simulate_frame(geometry, seed) for seed in range(N_FRAMES)]
        for frame, truth in sims:
            predictor.add(frame, truth)
        stack = write_stack(tmp_path_factory.mktemp(name) / f"{name}.cxi", geometry,
                            [f for f, _ in sims])
        out[name] = (geom_path, geometry, stack, sims, predictor)
    return out


def _run(stack, geom_path, outdir, predictor, **extra):
    config = {"inputs": [str(stack)], "geometry": geom_path and str(geom_path),
              "output": str(outdir),
              "predictor": predictor, "progress": False, "min_peaks": 5, **extra}
    return run(config)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_cxi_tables_match_truth_and_are_laid_out_for_indexamajig(stacks, tmp_path, name):
    geom_path, geometry, stack, sims, predictor = stacks[name]
    outdir = tmp_path / "out"
    summary = _run(stack, geom_path, outdir, predictor, stream=str(tmp_path / "peaks.stream"))
    assert summary["status"] == "ok" and summary["frames"] == N_FRAMES == summary["hits"]
    assert sorted(p.name for p in outdir.glob("*.geom")) == ["peaknet.geom"]  # one geometry

    # the list file names the CXI files; the .geom points indexamajig at the tables
    (cxi_file,) = [Path(p) for p in (outdir / "peaknet.lst").read_text().split()]
    out_geom = read_geometry(outdir / "peaknet.geom")
    assert (out_geom.data, out_geom.dims) == ("/entry_1/data_1/data", ["%", "ss", "fs"])
    assert (out_geom.peak_list, out_geom.peak_list_type) == ("/entry_1/result_1", "cxi")
    assert out_geom.n_panels == geometry.n_panels

    with h5py.File(cxi_file, "r") as h5:
        data = h5["/entry_1/data_1/data"]
        assert data.shape == (N_FRAMES, *geometry.slab_shape)
        assert np.array_equal(data[1], geometry.assemble_slab(sims[1][0].panels))
        n_peaks = h5["/entry_1/result_1/nPeaks"][()]
        assert n_peaks.shape == (N_FRAMES,) and n_peaks.dtype.kind == "i"
        for column in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
            table = h5[f"/entry_1/result_1/{column}"]
            assert table.dtype == np.float32 and table.shape[0] == N_FRAMES
            assert table.shape[1] >= n_peaks.max()

    peaks_file = read_cxi_peaks(cxi_file)
    stream = read_stream(tmp_path / "peaks.stream")
    assert stream.geometry is not None and len(stream.chunks) == N_FRAMES
    for row, (_frame, truth) in enumerate(sims):
        raw = peaks_file.raw(row)
        slab_ss, slab_fs = geometry.slab_shape
        assert np.all((raw["peakXPosRaw"] >= -0.5) & (raw["peakXPosRaw"] < slab_fs - 0.5))
        assert np.all((raw["peakYPosRaw"] >= -0.5) & (raw["peakYPosRaw"] < slab_ss - 0.5))
        peaks = peaks_file.peaks(row, geometry)  # back to panels through the project's reader
        strong = truth.reflections[truth.reflections["strong"]]
        ia, ib, dist = match_peaks(peaks["panel"], peaks["fs"], peaks["ss"],
                                   strong["panel"], strong["fs"], strong["ss"], 3.0)
        assert len(ia) >= 0.95 * len(strong) > 20
        assert np.quantile(dist, 0.99) < 1.0, f"{name} frame {row}: matched peaks > 1 px off"
        chunk = stream.chunks[row]
        assert chunk.event == f"//{row}" and chunk.n_peaks == len(peaks)
        from_stream = chunk.peak_table(stream.geometry)
        assert np.allclose(from_stream["fs"], peaks["fs"], atol=0.01)
        assert np.allclose(from_stream["ss"], peaks["ss"], atol=0.01)


def test_one_over_d_uses_each_frames_camera_length_read_from_the_file(stacks, tmp_path):
    """CrystFEL's CSPAD example reads the camera length (in mm) and the photon energy from the
    HDF5 file: each peak's 1/d, in the CXI table and the stream alike, is measured with its own
    frame's values (two frames at other distances give other 1/d for the same pixels), not
    left unknown, and the stream never writes an unknown 1/d as a real-looking 0.00."""
    import shutil

    from peaknet_xtal.formats.geometry import HC_EV_A

    geom_path, geometry, stack, sims, predictor = stacks["cspad"]
    assert geometry.camera_length_path and geometry.photon_energy_path
    clen_path = geometry.camera_length_path.split()[0]
    copy = Path(shutil.copy(stack, tmp_path / "cspad.cxi"))
    lengths_mm, energies = [80.0, 120.0], [9500.0, 9400.0]
    with h5py.File(copy, "a") as h5:
        h5[clen_path] = np.array(lengths_mm)
        h5[geometry.photon_energy_path.split()[0]] = np.array(energies)
    outdir = tmp_path / "out"
    _run(copy, geom_path, outdir, predictor, stream=str(tmp_path / "peaks.stream"))
    table = read_cxi_peaks(outdir / "peaks-00000.cxi")
    chunks = read_stream(tmp_path / "peaks.stream").chunks
    for row, (clen_mm, energy) in enumerate(zip(lengths_mm, energies, strict=True)):
        peaks = table.peaks(row, geometry)
        assert len(peaks) > 20
        expected = geometry.panel_to_one_over_d(peaks["panel"], peaks["fs"], peaks["ss"],
                                                wavelength_A=HC_EV_A / energy,
                                                clen_m=clen_mm * 1e-3)
        np.testing.assert_allclose(peaks["one_over_d"], expected, rtol=1e-5)
        in_stream = chunks[row].peak_table(geometry)["one_over_d"]
        np.testing.assert_allclose(in_stream, expected, atol=0.001)  # printed to 0.01 nm^-1
    near, far = table.peaks(0, geometry), table.peaks(1, geometry)
    assert np.median(near["one_over_d"]) > np.median(far["one_over_d"])  # closer: wider angles


def test_bitshuffle_compressed_frames_give_the_same_peaks(stacks, tmp_path):
    """Eiger and Jungfraujoch write frames bitshuffle/LZ4-compressed (formats.hdf5_filters)."""
    import hdf5plugin

    geom_path, geometry, stack, _, predictor = stacks["cspad"]
    packed = tmp_path / "packed.cxi"
    with h5py.File(stack) as src, h5py.File(packed, "w") as dst:
        for name in (geometry.data or "/entry_1/data_1/data", geometry.mask):
            if name:
                dst.create_dataset(name, data=src[name][...], chunks=(1, *src[name].shape[1:]),
                                   **hdf5plugin.Bitshuffle(cname="lz4"))
        assert dst[geometry.data or "/entry_1/data_1/data"].id.get_create_plist(
        ).get_filter(0)[0] == 32008
    tables = []
    for source, out in ((stack, tmp_path / "plain"), (packed, tmp_path / "packed")):
        summary = _run(source, geom_path, out, predictor)
        assert summary["status"] == "ok" and summary["frames"] == N_FRAMES
        (cxi_file,) = [Path(p) for p in (out / "peaknet.lst").read_text().split()]
        tables.append(read_cxi_peaks(cxi_file))
    assert tables[0].n_peaks.sum() > 20
    np.testing.assert_array_equal(tables[0].n_peaks, tables[1].n_peaks)
    for row in range(N_FRAMES):
        for column in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
            np.testing.assert_array_equal(tables[0].raw(row)[column], tables[1].raw(row)[column])


def test_rerun_after_interruption_continues_where_it_stopped(stacks, tmp_path):
    geom_path, _, stack, _, predictor = stacks["cspad"]
    outdir, stream_path = tmp_path / "out", tmp_path / "peaks.stream"
    first = _run(stack, geom_path, outdir, predictor, frames_per_file=1, stream=str(stream_path))
    assert len(first["cxi_files"]) == N_FRAMES
    # an interruption: the last CXI file never appeared and the stream ends mid-chunk
    Path(first["cxi_files"][-1]).unlink()
    text = stream_path.read_text()
    stream_path.write_text(text[:text.rindex("----- Begin chunk -----") + 200])
    second = _run(stack, geom_path, outdir, predictor, frames_per_file=1, stream=str(stream_path))
    assert (second["this_run"]["skipped"], second["this_run"]["frames"]) == (N_FRAMES - 1, 1)
    assert len(second["cxi_files"]) == N_FRAMES
    events = [c.event for c in read_stream(stream_path).chunks]
    assert events == [f"//{k}" for k in range(N_FRAMES)]  # no duplicate, no gap
    third = _run(stack, geom_path, outdir, predictor, frames_per_file=1, stream=str(stream_path))
    assert (third["this_run"]["skipped"], third["this_run"]["frames"]) == (N_FRAMES, 0)
    # the summary describes the whole output, not the last invocation
    for summary in (first, second, third):
        assert (summary["frames"], summary["hits"]) == (N_FRAMES, N_FRAMES)
        assert summary["peaks_per_frame"] == first["peaks_per_frame"]
    assert json.loads((outdir / "peaknet2cxi.json").read_text())["frames"] == N_FRAMES


def test_a_moved_output_folder_resumes_and_lists_its_new_place(stacks, tmp_path):
    """peaknet.lst names the CXI files by absolute path: after the folder is moved, its list
    names the old place, but the files are the folder's own; the rerun continues (it refused
    the list as another program's) and lists them where they are now."""
    import shutil

    geom_path, _, stack, _, predictor = stacks["cspad"]
    first = _run(stack, geom_path, tmp_path / "out", predictor, frames_per_file=1)
    Path(first["cxi_files"][-1]).unlink()  # interrupted before its last file
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)
    second = _run(stack, geom_path, moved, predictor, frames_per_file=1)
    assert (second["this_run"]["skipped"], second["frames"]) == (N_FRAMES - 1, N_FRAMES)
    listed = (moved / "peaknet.lst").read_text().split()
    assert listed == [str((moved / f"peaks-{k:05d}.cxi").resolve()) for k in range(N_FRAMES)]


def test_list_file_events_and_hits_only(stacks, tmp_path):
    geom_path, _, stack, sims, predictor = stacks["epix10k2M"]
    listing = tmp_path / "files.lst"
    listing.write_text(f"{stack} //1\n; a comment\n")
    counts = [int(t.reflections["strong"].sum()) for _, t in sims]
    summary = run({"inputs": [str(listing)], "geometry": str(geom_path),
                   "output": str(tmp_path / "one"), "predictor": predictor, "progress": False})
    assert summary["frames"] == 1
    assert read_cxi_peaks(summary["cxi_files"][0]).keys == [(str(stack), "//1")]
    # a min_peaks between the two frames' counts: only the richer frame is a hit
    cut = (min(counts) + max(counts)) // 2
    summary = _run(stack, geom_path, tmp_path / "hits", predictor, min_peaks=cut, hits_only=True,
                   stream=str(tmp_path / "all.stream"))
    assert summary["hits"] == 1 and summary["this_run"]["frames"] == N_FRAMES
    assert summary["frames"] == 1  # the CXI output holds the hit only
    (kept,) = read_cxi_peaks(summary["cxi_files"][0]).keys
    assert kept == (str(stack), f"//{int(np.argmax(counts))}")
    assert len(read_stream(tmp_path / "all.stream").chunks) == N_FRAMES


def test_a_rerun_of_a_hits_only_run_does_not_find_its_blanks_again(stacks, tmp_path):
    geom_path, _, stack, sims, predictor = stacks["epix10k2M"]
    counts = [int(t.reflections["strong"].sum()) for _, t in sims]
    cut = (min(counts) + max(counts)) // 2  # one frame a hit, the other not
    first = _run(stack, geom_path, tmp_path / "hits", predictor, min_peaks=cut, hits_only=True)
    assert (first["frames"], first["left_out"]) == (1, N_FRAMES - 1)
    assert first["hit_rate"] == pytest.approx(1 / N_FRAMES)  # over every frame, left out too
    again = _run(stack, geom_path, tmp_path / "hits", predictor, min_peaks=cut, hits_only=True)
    assert (again["this_run"]["frames"], again["this_run"]["skipped"]) == (0, N_FRAMES)
    assert (again["frames"], again["left_out"]) == (1, N_FRAMES - 1)


def test_a_file_given_under_a_link_and_its_own_name_is_found_once(stacks, tmp_path):
    """Inputs are read under the names given (a link named as an image series needs, a geometry
    beside the link), but a frame is the file's, whatever name it came under: a rerun naming
    the file itself after a run through a link skips its frames (it found them again and wrote
    them twice into one folder), and both names in one command are one input."""
    geom_path, _, stack, _, predictor = stacks["epix10k2M"]
    link = tmp_path / "links" / "myrun.h5"
    link.parent.mkdir()
    link.symlink_to(stack)
    first = _run(link, geom_path, tmp_path / "out", predictor)
    assert first["this_run"]["frames"] == N_FRAMES
    (cxi_file,) = first["cxi_files"]
    assert {key[0] for key in read_cxi_peaks(cxi_file).keys} == {str(link)}  # the given name
    again = _run(stack, geom_path, tmp_path / "out", predictor)
    assert (again["this_run"]["frames"], again["this_run"]["skipped"]) == (0, N_FRAMES)
    assert again["frames"] == N_FRAMES
    both = run({"inputs": [str(link), str(stack)], "geometry": str(geom_path),
                "output": str(tmp_path / "both"), "predictor": predictor, "progress": False,
                "min_peaks": 5})
    assert both["frames"] == both["this_run"]["frames"] == N_FRAMES


def test_inputs_naming_one_file_are_said_to_be_processed_once(tmp_path, caplog):
    """Eight links to one CBF ran as "0/1 frames", exit 0, with no word that seven inputs were
    the same file (a user trial)."""
    from peaknet_xtal.cli.peaknet2cxi import expand_inputs

    image = tmp_path / "image.h5"
    image.write_bytes(b"")
    links = []
    for k in range(4):
        links.append(tmp_path / f"link{k}.h5")
        links[-1].symlink_to(image)
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        entries = expand_inputs([str(image), *map(str, links)])
    assert [e["path"] for e in entries] == [str(image)]
    said = [r.getMessage() for r in caplog.records if "given before" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("4 input(s) name a file given before"), said
    assert said[0].endswith("each file is processed once")
    caplog.clear()
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        expand_inputs([str(image)])
    assert not [r for r in caplog.records if "given before" in r.getMessage()]


def test_missing_mask_dataset_warns_and_continues(stacks, tmp_path, caplog):
    geom_path, geometry, stack, sims, predictor = stacks["cspad"]
    no_mask = tmp_path / "no_mask.cxi"
    with h5py.File(no_mask, "w") as h5:  # the geometry names a mask dataset this file lacks
        h5["/entry_1/data_1/data"] = np.stack([geometry.assemble_slab(sims[0][0].panels)])
    outdir = tmp_path / "out"
    config = {"inputs": [str(stack), str(no_mask)], "geometry": str(geom_path),
              "output": str(outdir), "predictor": predictor, "progress": False}
    with caplog.at_level("WARNING"):
        summary = run(config)
    assert summary["status"] == "ok" and summary["frames"] == N_FRAMES + 1
    warned = [r.getMessage() for r in caplog.records if "no mask dataset" in r.getMessage()]
    assert warned and str(no_mask) in warned[0] and "/entry_1/data_1/mask" in warned[0]
    assert len(warned) == 1  # once, though the file is opened more than once


def test_bad_inputs_fail_clearly_and_keep_finished_results(stacks, tmp_path, capsys):
    geom_path, geometry, stack, sims, predictor = stacks["cspad"]
    broken = tmp_path / "broken.cxi"
    with h5py.File(broken, "w") as h5:  # frames too small for the geometry
        h5["/entry_1/data_1/data"] = np.zeros((1, 100, 100), np.float32)
    outdir = tmp_path / "out"
    config = {"inputs": [str(stack), str(broken)], "geometry": str(geom_path),
              "output": str(outdir), "predictor": predictor, "progress": False}
    with pytest.raises(FormatError, match="1480x1552") as info:
        run(config)
    assert str(broken) in str(info.value)
    kept = (outdir / "peaknet.lst").read_text().split()
    assert len(kept) == 1 and len(read_cxi_peaks(kept[0])) == N_FRAMES
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["status"].startswith("failed") and summary["frames"] == N_FRAMES

    small = tmp_path / "small.cxi"
    with h5py.File(small, "w") as h5:  # 100 x 100 frames cannot hold a 1480 x 1552 CSPAD slab
        h5["/entry_1/data_1/data"] = np.zeros((1, 100, 100), np.float32)
        h5["/entry_1/data_1/mask"] = np.zeros((1, 100, 100), np.uint16)
    garbage = tmp_path / "garbage.cxi"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    for bad, words in ((small, "1480x1552"), (garbage, "garbage.cxi"),
                       (tmp_path / "absent.cxi", "not found")):
        code = main([str(bad), "-g", str(geom_path), "-o", str(tmp_path / "bad"),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and str(bad) in err and words in err, err


def test_help_shows_the_indexamajig_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "indexamajig -i OUTDIR/peaknet.lst -g OUTDIR/peaknet.geom --peaks=cxi" in out
    assert "--indexing=xgandalf -p YOUR.cell -o OUTDIR/peaknet.stream -j NPROC" in out
    assert "YOUR.cell: your unit cell file" in out and "-i LIST, --input-list LIST" in out
    assert "-p cell.pdb" not in out and "..." not in out.split("Then index with")[1][:400]


def test_workers_without_the_pipeline_say_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peaknet_xtal.pipeline", None)
    with pytest.raises(PeakNetError, match="Ray pipeline"):
        run({"inputs": [str(tmp_path)], "output": str(tmp_path / "o"), "workers": 2})


def test_main_with_the_real_default_model(stacks, tmp_path, capsys):
    geom_path, _, stack, _, _ = stacks["cspad"]
    outdir = tmp_path / "out"
    code = main([str(stack), "-g", str(geom_path), "-o", str(outdir), "--device", "cpu",
                 "--threads", "1", "--threshold", "0.99", "--max-peaks", "100",
                 "--min-height", "6", "--rescue-height", "25", "--faint-support", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "peaknet2cxi:" in captured.err and "frames/s" in captured.err  # progress line
    # the real CSPAD geometry reads photon energy and camera length from LCLS datasets these
    # simulated stacks lack: the frames have neither, so indexamajig could not index them, and
    # the run says so before the command (which it gives complete for when they are added)
    (next_line,) = [line for line in captured.out.splitlines() if line.startswith("next: ")]
    assert next_line.startswith(f"next: indexamajig would refuse {outdir / 'peaknet.geom'}: "
                                f"{N_FRAMES} of {N_FRAMES} frames have no photon energy")
    assert next_line.endswith(f"then run: indexamajig -i {outdir / 'peaknet.lst'} -g "
                              f"{outdir / 'peaknet.geom'} --peaks=cxi --indexing=xgandalf "
                              f"-p YOUR.cell -o {outdir / 'peaknet.stream'} -j {os.cpu_count()}")
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["frames"] == N_FRAMES and summary["peaks_per_frame"]["max"] <= 100
    assert summary["config"]["threshold"] == 0.99 and summary["engine"]["model"] == "default"
    recorded = json.loads((outdir / "peaknet2cxi.config.json").read_text())
    assert recorded["config"]["max_peaks"] == 100 and recorded["config"]["min_height"] == 6.0
    assert recorded["config"]["rescue_height"] == 25.0  # off (rescue_prob's default) but saved
    assert recorded["config"]["faint_support"] == 3
    assert read_cxi_peaks(summary["cxi_files"][0]).n_peaks.max() <= 100
    # a rerun continues the run only with its settings: another min_snr is refused before the
    # earlier run's record or files are touched ...
    files = {p: p.read_bytes() for p in outdir.iterdir()}
    same = ["-g", str(geom_path), "-o", str(outdir), "--device", "cpu", "--threads", "1",
            "--threshold", "0.99", "--max-peaks", "100", "--min-height", "6",
            "--rescue-height", "25", "--faint-support", "3"]
    assert main([str(stack), *same, "--min-snr", "5"]) == 1
    err = capsys.readouterr().err
    assert f"{summary['cxi_files'][-1]}: its peaks were found with other settings" in err
    assert "min_snr 3.0 there, 5.0 now" in err and "threshold" not in err
    assert {p: p.read_bytes() for p in outdir.iterdir()} == files
    # ... and the shipped weights named by their path are the same model: the run continues
    shipped = Path(peaknet_xtal.__file__).parent / "model" / "weights" / "default.safetensors"
    assert main([str(stack), *same, "--model", str(shipped)]) == 0, capsys.readouterr().err
    again = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert (again["frames"], again["this_run"]["skipped"]) == (N_FRAMES, N_FRAMES)


def test_a_rerun_over_an_input_rewritten_under_its_name_is_refused(stacks, tmp_path, capsys):
    """Frames are skipped as done by (file, event): an input regenerated under the same name
    would keep the earlier file's peaks (and a linked CXI file would show the new pixels
    beside them).  Each CXI file records its inputs as they were read; a changed one is
    refused, naming it and the CXI file; the same input resumes, a deleted one is not judged."""
    import shutil
    import time

    geom_path, _, stack, _, predictor = stacks["cspad"]
    mine = tmp_path / "run.cxi"
    shutil.copy(stack, mine)
    outdir = tmp_path / "out"
    first = _run(mine, geom_path, outdir, predictor, frames_per_file=1)
    assert len(first["cxi_files"]) == N_FRAMES
    again = _run(mine, geom_path, outdir, predictor, frames_per_file=1)  # unchanged: resumes
    assert again["this_run"]["skipped"] == N_FRAMES
    time.sleep(0.01)
    with h5py.File(mine, "r+") as h5:  # regenerated in place: other pixels, same name
        data = h5["/entry_1/data_1/data"]
        data[0] = data[0] + 1.0
    with pytest.raises(FormatError, match=r"run\.cxi.*has changed since its frames were found "
                       r"into .*peaks-0000[01]\.cxi.*another output folder"):
        _run(mine, geom_path, outdir, predictor, frames_per_file=1)
    assert len(list(outdir.glob("peaks-*.cxi"))) == N_FRAMES  # nothing already written is lost
    capsys.readouterr()
    code = main([str(mine), "-g", str(geom_path), "-o", str(outdir), "--threads", "1",
                 "--min-peaks", "5", "--frames-per-file", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "has changed since its frames were found" in err, err
    assert "Traceback" not in err
    assert main([str(mine), "-g", str(geom_path), "-o", str(outdir), "--threads", "1",
                 "--min-peaks", "5", "--frames-per-file", "1", "--workers", "2"]) == 1
    assert "has changed since" in capsys.readouterr().err
    # refused before this run's settings were recorded (the earlier runs, by the API, left
    # none) and before Ray started
    assert not (outdir / "peaknet2cxi.config.json").exists()
    # another input into the same folder skips none of the changed one's frames: it runs
    shutil.copy(stack, tmp_path / "other.cxi")
    third = _run(tmp_path / "other.cxi", geom_path, outdir, predictor, frames_per_file=1)
    assert third["this_run"]["frames"] == N_FRAMES
    mine.unlink()  # gone: its frames are not read again, the folder is not judged by it
    fourth = _run(tmp_path / "other.cxi", geom_path, outdir, predictor, frames_per_file=1)
    assert fourth["this_run"]["skipped"] == N_FRAMES


def test_an_hdf5_stack_without_a_geometry_uses_one_that_belongs_to_it(stacks, tmp_path, capsys,
                                                                      caplog):
    """Without -g a stack is read with the geometry that belongs to it (NAME.geom beside it,
    or the one its peaknet_geometry attribute names, as peaknet-sim writes); a stack with none
    is read one panel a frame, said in a warning, and the end of the run says how to get a
    .geom for indexamajig (it printed "next: None")."""
    import logging
    import shutil

    geom_path, _, stack, _, predictor = stacks["cspad"]
    plain = tmp_path / "plain.h5"
    shutil.copy(stack, plain)
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal"):
        code = main([str(plain), "-o", str(tmp_path / "alone"), "--threads", "1",
                     "--min-peaks", "5"])
    assert code == 0
    assert "no geometry given (-g) or found beside it: each frame is read as one panel" \
        in caplog.text
    out = capsys.readouterr().out
    assert "next: indexamajig needs a geometry" in out and "None" not in out
    shutil.copy(geom_path, tmp_path / "plain.geom")
    summary = _run(plain, None, tmp_path / "out", predictor)
    assert summary["frames"] == summary["hits"] == N_FRAMES
    assert summary["indexamajig"] is not None  # peaknet.geom written from the file's geometry
    found = read_cxi_peaks(Path(summary["cxi_files"][0]))
    assert found.n_peaks.sum() > 20  # the truth predictor knows the frames split into panels


def test_dials_output_of_a_stack_without_a_geometry_is_refused_before_finding(stacks, tmp_path,
                                                                               capsys):
    """--dials imports HDF5 frames through the .geom written for them, which a plain stack
    read without -g does not get: the run found every frame and then failed, naming the
    peaknet.geom it had said it would not write.  It is now one line before any frame is
    found, naming the file and -g."""
    import shutil

    _, _, stack, _, _ = stacks["cspad"]
    plain = tmp_path / "plain.h5"
    shutil.copy(stack, plain)
    outdir = tmp_path / "out"

    def nothing(panels, masks):  # any layout: the frames are read as one panel here
        return [np.zeros(np.shape(p), np.float32) for p in panels]

    with pytest.raises(PeakNetError, match=r"plain\.h5: --dials .* give the detector's "
                                           r"CrystFEL geometry with -g"):
        run({"inputs": [str(plain)], "output": str(outdir), "predictor": nothing,
             "progress": False, "dials": True, "min_peaks": 0})
    assert not list(outdir.glob("*.cxi")) and not (outdir / "dials").exists()


def test_a_rerun_with_a_retrained_model_at_the_same_path_is_refused(stacks, tmp_path):
    """The CXI files keep the settings their peaks were found with, the model's weights by
    content: new weights at the old path are another model, whose peaks would join the
    earlier ones with nothing to tell them apart."""
    import shutil

    from peaknet_xtal.formats.cxi import read_settings

    geom_path, _, stack, _, predictor = stacks["cspad"]
    outdir, weights = tmp_path / "out", tmp_path / "model.safetensors"
    shipped = Path(peaknet_xtal.__file__).parent / "model" / "weights" / "default.safetensors"
    shutil.copy(shipped, weights)
    first = _run(stack, geom_path, outdir, predictor, model=str(weights), frames_per_file=1)
    Path(first["cxi_files"][-1]).unlink()  # an interrupted run: one frame left to find
    kept = read_settings(first["cxi_files"][0])
    assert kept is not None and kept["model"] == str(weights) and kept["min_snr"] == 3.0
    shutil.copy(Path(__file__).parents[2] / "benchmarks" / "baseline" /
                "default_v1.safetensors", weights)  # retrained in place
    with pytest.raises(FormatError, match=r"model_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' "
                       r"now.*another output folder"):
        _run(stack, geom_path, outdir, predictor, model=str(weights), frames_per_file=1)
    assert [Path(p).name for p in _run(stack, geom_path, tmp_path / "new", predictor,
                                        model=str(weights), frames_per_file=1)["cxi_files"]
            ] == ["peaks-00000.cxi", "peaks-00001.cxi"]


def test_config_file_typo_is_an_error_naming_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("threshhold: 0.9\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["in.cxi", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "'threshhold'" in err and "'threshold'" in err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("line, says", [("precision: fp16", "precision: must be one of fp32, "
                                         "bf16"),
                                        ("device: gpu", "device: must be auto, cpu, cuda")])
def test_a_choice_in_a_config_file_is_checked_before_anything_is_written(tmp_path, capsys,
                                                                         line, says):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["in.cxi", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{cfg}: {says}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.dials
def test_tile_size_is_taken_recorded_and_kept_by_a_rerun(tmp_path, capsys, dials_env):
    """--tile-size and a --config file's tile_size (the README's memory saver on large panels)
    were refused as unknown.  The run's engine tiles as asked, the run's record says so, and,
    as tiles move a few peaks, a rerun into the folder with another tile_size is refused like
    any other finding setting; the same tile_size from a config file continues the run."""
    cbf = tiny_cbf(tmp_path / "big_0001.cbf", 100.0, size=200)
    outdir = tmp_path / "out"
    common = [str(cbf), "-o", str(outdir), "--device", "cpu", "--threads", "1",
              "--no-progress"]
    assert main([*common, "--tile-size", "128"]) == 0, capsys.readouterr().err
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["config"]["tile_size"] == 128 and summary["engine"]["tile_size"] == 128
    files = {p: p.read_bytes() for p in outdir.iterdir()}
    cfg = tmp_path / "tile.yaml"
    cfg.write_text("tile_size: 1024\n")
    assert main([*common, "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "its peaks were found with other settings (tile_size 128 there, 1024 now)" in err
    assert {p: p.read_bytes() for p in outdir.iterdir()} == files
    cfg.write_text("tile_size: 128\n")
    assert main([*common, "--config", str(cfg)]) == 0, capsys.readouterr().err
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["this_run"]["skipped"] == 1 and summary["engine"]["tile_size"] == 128


@pytest.mark.parametrize(("given", "says"), [
    (["--tile-size", "64"], "command line: --tile-size: must be >= 96 (got 64)"),
    (["--config", "tile_size: 64"], "tile.yaml: tile_size: must be >= 96 (got 64)"),
    (["--config", "tile_size: 1024.5"], "tile.yaml: tile_size: Input should be a valid integer"),
])
def test_a_tile_size_the_model_cannot_take_is_refused_before_anything_is_written(
        tmp_path, capsys, given, says):
    """The least tile the model takes at the default overlap (finding.settings.LIMITS)."""
    if given[0] == "--config":
        cfg = tmp_path / "tile.yaml"
        cfg.write_text(given[1] + "\n")
        given = ["--config", str(cfg)]
    with pytest.raises(SystemExit) as exit_info:
        main(["in.cxi", "-o", str(tmp_path / "out"), *given])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["weights file", "weights folder", "architecture name"])
def test_a_plugin_model_that_downsamples_is_refused_before_an_input_is_opened(
        install_plugin, tmp_path, capsys, monkeypatch, given):
    """Found by a plugin author: --model naming weights of a plugin model whose output is
    smaller than its input was refused only when the engine first built the network, after
    the inputs were opened, the output folder made and the run's start recorded in it (its
    architecture's name, which has no weights, was refused after the same).  Now either is one
    line before any of them, from the command line and from run() alike."""
    from peaknet_xtal.cli import peaknet2cxi

    install_plugin("halving", halving_family(2))
    weights = unchecked_weights("halving", "my-halving", tmp_path / "run")
    spec, says = {
        "weights file": (str(weights), f"{weights}: model family 'halving' "),
        "weights folder": (str(weights.parent), f"{weights}: model family 'halving' "),
        "architecture name": ("my-halving", "my-halving: is a model architecture (family "
                                            "'halving') without trained weights"),
    }[given]
    monkeypatch.setattr(peaknet2cxi, "RunInputs", lambda *_: pytest.fail(
        "an input was opened before the model was checked"))
    stack, out = tiny_stack(tmp_path / "in.h5"), tmp_path / "out"
    assert main([str(stack), "-o", str(out), "--model", spec]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"peaknet2cxi: error: {says}"), err
    if given != "architecture name":
        assert ("model 'my-halving': model(image (1, 1, 33, 35), mask) returned (1, 2, 32, 34); "
                in errors[0])
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(PeakNetError, match=f"^{re.escape(says)}"):
        run({"inputs": [str(stack)], "output": str(out), "model": spec})
    assert not out.exists()


def test_config_file_null_lifts_the_peak_cap_and_types_are_checked(tmp_path):
    from peaknet_xtal import config as cfgmod
    from peaknet_xtal.cli.peaknet2cxi import DEFAULTS, TYPES, build_parser

    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_peaks: null\nthreads: 4\n")
    args = build_parser().parse_args(["in.cxi", "-o", "out", "--config", str(cfg)])
    resolved = cfgmod.resolve(DEFAULTS, args, types=TYPES)
    assert resolved["max_peaks"] is None and resolved["threads"] == 4
    cfg.write_text("max_peaks: lots\n")
    with pytest.raises(cfgmod.ConfigError, match=r"run\.yaml.*max_peaks"):
        cfgmod.resolve(DEFAULTS, build_parser().parse_args(["--config", str(cfg)]), types=TYPES)
# --------------------------------------------------------------------------------------------
# inputs with nothing in them, and output folders that are not ours (issue 19)


CLOSE_FAILS = """
import sys
import h5py
from peaknet_xtal.cli.peaknet2cxi import main

original = h5py.File.close
failed = []


def close(self):  # HDF5 flushes its buffers on close: there a full disk shows (RuntimeError)
    name = self.filename
    original(self)
    if name.endswith(".part") and not failed:
        failed.append(name)
        raise RuntimeError("Unable to flush raw data (file write failed: time = now, filename "
                           f"= '{name}', file descriptor = 3, errno = 28, error message = 'No "
                           "space left on device')")


h5py.File.close = close
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_met_while_a_file_is_closed_is_the_same_one_error(tmp_path):
    """HDF5 meets a full disk when it flushes a file on close, and h5py says so with a
    RuntimeError: it escaped as a traceback (and a segmentation fault at shutdown); now the
    same error as a full disk met mid-write, exit 1, no partial file."""
    import subprocess

    stack = tiny_stack(tmp_path / "in.h5")
    script = tmp_path / "run.py"
    script.write_text(CLOSE_FAILS)
    outdir = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), str(stack), "-o", str(outdir),
                           "--no-progress", "--threads", "1", "--min-peaks", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "its disk is full" in done.stderr and "Traceback" not in done.stderr
    assert f"cannot write {outdir / 'peaks-00000.cxi'}" in done.stderr
    assert not [p.name for p in outdir.iterdir() if p.name.endswith(".part")]


def test_list_lines_as_indexamajig_reads_them_and_what_it_cannot(tmp_path, caplog):
    """'#' lines are comments; a line naming a file with spaces is that file; a third word is
    an error (it was dropped); an event listed twice is processed once, with a warning."""
    from peaknet_xtal.cli.peaknet2cxi import expand_inputs

    plain = tiny_stack(tmp_path / "a.h5")
    spaced = tiny_stack(tmp_path / "run one ü.h5")
    listing = tmp_path / "files.lst"
    listing.write_text(f"# made by a script\n{plain} //1\n{plain} //1\n{plain} //2\n"
                       f"{spaced}\n")
    with caplog.at_level("WARNING"):
        entries = {Path(e["path"]).name: e["events"] for e in expand_inputs([str(listing)])}
    assert entries == {"a.h5": {"//1", "//2"}, "run one ü.h5": None}
    assert any("1 event(s) listed more than once" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):  # a list given twice: its repeats said once
        expand_inputs([str(listing), str(listing)])
    assert len([r for r in caplog.records if "more than once" in r.getMessage()]) == 1
    listing.write_text(f"{plain} //1 extra\n")
    with pytest.raises(FormatError, match="not 3 words") as err:
        expand_inputs([str(listing)])
    assert "line 1" in str(err.value)


def test_a_run_reads_its_lists_once_and_says_their_repeats_once(tmp_path, monkeypatch,
                                                                 capsys, caplog):
    """The inputs are expanded once a run, single-process or Ray, good or bad: each expansion
    reads every list file again and looks for every file it names, and the output-folder checks
    (before and after the configuration is recorded), the writer's record of its inputs and the
    run itself each expanded them anew.  A list's repeated events are said once each run, a
    second run in the same process included; a list that fails is reported as before."""
    import peaknet_xtal.cli.peaknet2cxi as peaknet2cxi
    import peaknet_xtal.pipeline as pipeline_module

    stack = tiny_stack(tmp_path / "a.h5")
    listing = tmp_path / "files.lst"
    listing.write_text(f"{stack} //0\n{stack} //0\n{stack} //1\n")
    expand, locate = peaknet2cxi.expand_inputs, peaknet2cxi._locate
    calls = {"expand": 0, "locate": 0}

    def counted_expand(inputs):
        calls["expand"] += 1
        return expand(inputs)

    def counted_locate(name, list_file):
        calls["locate"] += 1
        return locate(name, list_file)

    monkeypatch.setattr(peaknet2cxi, "expand_inputs", counted_expand)
    monkeypatch.setattr(peaknet2cxi, "_locate", counted_locate)
    peaknet2cxi.expand_inputs([str(listing)])
    one_pass = calls["locate"]  # the existence checks of one expansion of the list
    for name in ("one", "two"):  # two runs in one process: each says the repeat
        calls.update(expand=0, locate=0)
        caplog.clear()
        with caplog.at_level("WARNING"):
            code = main([str(listing), "-o", str(tmp_path / name), "--no-progress",
                         "--threads", "1", "--min-peaks", "0"])
        assert code == 0, capsys.readouterr().err
        assert calls == {"expand": 1, "locate": one_pass}
        repeats = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
        assert len(repeats) == 1 and str(listing) in repeats[0], repeats

    plain = tmp_path / "plain.lst"  # the Ray run (per-event lines need the single-process one)
    plain.write_text(f"{stack}\n")
    monkeypatch.setattr(pipeline_module, "run_pipeline", lambda config: {"backend": "test"})
    calls.update(expand=0)
    with pytest.raises(PeakNetError, match="no frames were written"):
        run({"inputs": [str(plain)], "output": str(tmp_path / "ray"), "workers": 2,
             "progress": False})
    assert calls["expand"] == 1

    broken = tmp_path / "broken.lst"  # still reported after the output checks, once looked for
    broken.write_text(f"{stack}\n{tmp_path / 'absent.h5'}\n")
    calls.update(expand=0)
    code = main([str(broken), "-o", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "listed file" in err and "absent.h5" in err and str(broken) in err, err
    assert calls["expand"] == 1
    assert (tmp_path / "bad" / peaknet2cxi.CONFIG_NAME).exists()  # recorded, as before


def test_a_folder_given_or_listed_as_an_input_is_said_to_be_one(tmp_path, capsys):
    """A folder of images given as an input was refused as "not a CXI/HDF5 file and not an
    image DIALS can read", which sent users looking for a damaged file; now one line says it
    is a folder and how to name its images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a_0001.cbf.bz2", "a_0002.cbf.bz2", "notes.txt"):
        (folder / name).write_text("")
    listing = tmp_path / "images.lst"
    listing.write_text("images\n")
    for k, given in enumerate(([str(folder)], [str(listing)], ["-i", str(folder)])):
        code = main([*given, "-o", str(tmp_path / f"out{k}"), "--no-progress"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
        assert "folder" in errors[0] and "DIALS can read" not in err, errors[0]
        if k != 1:  # given itself: the advice globs the kind of file it holds
            assert f"{folder}/*.cbf.bz2" in errors[0], errors[0]


def test_an_output_folder_with_a_space_gets_a_note_for_indexamajig(tmp_path, capsys):
    """indexamajig splits list lines at spaces: peaknet.lst in such a folder names files it
    cannot find, so the run says so under its next step."""
    good = tiny_stack(tmp_path / "good.h5")
    outdir = tmp_path / "out put"
    assert main([str(good), "-o", str(outdir), "--no-progress", "--min-peaks", "0"]) == 0
    out = capsys.readouterr().out
    assert "note: indexamajig reads a list line as 'FILE EVENT'" in out
    assert main([str(good), "-o", str(tmp_path / "output"), "--no-progress",
                 "--min-peaks", "0"]) == 0
    assert "note: indexamajig" not in capsys.readouterr().out


def test_zero_frames_and_empty_lists_say_so_and_name_no_files(stacks, tmp_path, capsys):
    geom_path, geometry, stack, _, _ = stacks["cspad"]
    empty_stack = tmp_path / "empty.cxi"
    with h5py.File(empty_stack, "w") as h5:
        h5["/entry_1/data_1/data"] = np.zeros((0, *geometry.slab_shape), np.float32)
    empty_list = tmp_path / "empty.lst"
    empty_list.write_text("; nothing here\n")
    for inputs, words in (([str(empty_stack)], "no frames were written"),
                          ([str(empty_list)], "the list names no files"),
                          (["-i", str(empty_list)], "the list names no files")):
        outdir = tmp_path / f"out{len(words)}{len(inputs)}"
        code = main([*inputs, "-g", str(geom_path), "-o", str(outdir), "--no-progress"])
        captured = capsys.readouterr()
        assert code == 1 and words in captured.err, captured.err
        assert "indexamajig" not in captured.out
        assert not (outdir / "peaknet.lst").exists() and not list(outdir.glob("*.cxi"))


def test_a_listed_event_the_file_lacks_is_an_error(stacks, tmp_path, capsys):
    geom_path, _, stack, _, predictor = stacks["cspad"]
    listing = tmp_path / "events.lst"
    listing.write_text(f"{stack} //1\n{stack} //999\n")
    with pytest.raises(FormatError, match="//999") as info:
        run({"inputs": [str(listing)], "geometry": str(geom_path),
             "output": str(tmp_path / "out"), "predictor": predictor, "progress": False})
    assert str(listing) in str(info.value) and f"{N_FRAMES} frames" in str(info.value)
    # the event that exists was processed and kept
    kept = (tmp_path / "out" / "peaknet.lst").read_text().split()
    assert read_cxi_peaks(kept[0]).keys == [(str(stack), "//1")]


@pytest.mark.parametrize("intruder", ["peaks-00000.cxi", "peaknet.lst"])
def test_output_folder_with_foreign_files_is_refused(stacks, tmp_path, capsys, intruder):
    geom_path, _, stack, _, _ = stacks["cspad"]
    outdir = tmp_path / "out"
    outdir.mkdir()
    foreign = outdir / intruder
    if intruder.endswith(".cxi"):
        with h5py.File(foreign, "w") as h5:  # someone else's CXI file
            h5["/entry_1/data_1/data"] = np.zeros((1, 4, 4), np.float32)
    else:
        foreign.write_text("/data/run1.cxi\n/data/run2.cxi\n")  # the user's own list
    before = foreign.read_bytes()
    code = main([str(stack), "-g", str(geom_path), "-o", str(outdir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and str(foreign) in err and "new output folder" in err
    assert "finished before it are kept" not in err  # a stranger's file is no finished work
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in outdir.iterdir()) == [intruder]


def test_a_damaged_cxi_file_of_an_earlier_run_is_said_to_be_damaged(stacks, tmp_path, capsys):
    """One of the run's own CXI files, truncated since it was written, was called "not written
    by peaknet2cxi"; it is said to be unreadable, with HDF5's reason, and left as it is."""
    geom_path, _, stack, _, predictor = stacks["cspad"]
    outdir = tmp_path / "out"
    run({"inputs": [str(stack)], "geometry": str(geom_path), "output": str(outdir),
         "predictor": predictor, "progress": False})
    (written,) = outdir.glob("peaks-*.cxi")
    with open(written, "r+b") as handle:
        handle.truncate(written.stat().st_size // 2)
    before = written.read_bytes()
    code = main([str(stack), "-g", str(geom_path), "-o", str(outdir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"{written}: cannot be read as HDF5 (" in err
    assert "truncated" in err and "not written by" not in err
    assert written.read_bytes() == before


def test_hits_only_and_threads_reach_the_ray_pipeline(stacks, tmp_path, monkeypatch):
    """--hits-only, --threads, the peak cuts and -g (the geometry written for every frame,
    whatever geometry a frame comes with) are honoured by --workers runs, not dropped."""
    import peaknet_xtal.pipeline as pipeline_module

    seen = {}

    def fake_run_pipeline(config):
        seen.update(config)
        return {"backend": "test"}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    geom_path, _, stack, _, _ = stacks["cspad"]
    with pytest.raises(PeakNetError, match="no frames were written"):
        run({"inputs": [str(stack)], "geometry": str(geom_path), "output": str(tmp_path / "o"),
             "workers": 2, "threads": 3, "hits_only": True, "progress": False,
             "min_snr": 4.0, "min_height": 0.0, "rescue_prob": 0.4, "precision": "bf16",
             "tile_size": 512})
    assert seen["threads_per_worker"] == 3
    assert seen["frame_finder_options"]["precision"] == "bf16"
    assert seen["writer_options"]["settings"]["precision"] == "bf16"
    assert seen["frame_finder_options"]["tile_size"] == 512
    assert seen["writer_options"]["settings"]["tile_size"] == 512
    assert seen["frame_finder_options"]["min_snr"] == 4.0
    assert seen["frame_finder_options"]["min_height"] == 0.0
    assert seen["frame_finder_options"]["rescue_prob"] == 0.4
    assert seen["writer_options"]["hits_only"] is True
    assert seen["writer_options"]["geometry_name"] == "peaknet.geom"
    assert seen["writer_options"]["geometry"].path == str(geom_path)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        run({"inputs": [str(stack)], "output": str(tmp_path / "q"), "precision": "fp16"})
    assert not (tmp_path / "q").exists()
    with pytest.raises(PeakNetError, match="--dials is written by the single-process run"):
        run({"inputs": [str(stack)], "output": str(tmp_path / "p"), "workers": 2,
             "dials": True})


def test_a_hits_only_ray_run_counts_the_frames_it_left_out(stacks, tmp_path, monkeypatch):
    """A --workers --hits-only run said 'this run: 1 frames' where the single-process run says
    8: it counted what the CXI files gained.  The non-hits it recorded count too (the pipeline
    stands in here; its writer is the real CXI writer with the run's writer options)."""
    import peaknet_xtal.pipeline as pipeline_module
    from peaknet_xtal.formats.cxi import CXIWriter, iter_cxi_frames
    from peaknet_xtal.types import FrameResult, empty_peaks

    geom_path, geometry, stack, _, _ = stacks["cspad"]

    def fake_run_pipeline(config):
        options = dict(config["writer_options"])
        with CXIWriter(config["output"], options.pop("geometry"), **options) as writer:
            for k, frame in enumerate(iter_cxi_frames(stack, geometry)):
                writer.write(FrameResult(frame=frame, peaks=empty_peaks(0), hit=k == 1))
        return {"backend": "test", "engine": {}}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    summary = run({"inputs": [str(stack)], "geometry": str(geom_path),
                   "output": str(tmp_path / "o"), "workers": 2, "hits_only": True,
                   "progress": False})
    assert (summary["frames"], summary["left_out"]) == (1, N_FRAMES - 1)
    assert summary["this_run"]["frames"] == N_FRAMES


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_a_ray_run_summary_records_the_engine_settings_failed_or_not(stacks, tmp_path,
                                                                     monkeypatch, fails):
    """peaknet2cxi.json of a --workers run says how its peaks were found (the engine settings
    the pipeline's workers report), as the single-process run's does, and is written when the
    pipeline fails too, saying so."""
    import peaknet_xtal.pipeline as pipeline_module
    from peaknet_xtal.pipeline.driver import PipelineError

    def fake_run_pipeline(config):
        Path(config["output"]).mkdir(parents=True, exist_ok=True)
        if fails:  # the workers' settings travel with the error
            raise PipelineError("writer0 failed: /data/b.cxi: its detector geometry differs",
                                {"threshold": 0.6, "min_snr": 4.0})
        return {"backend": "test", "engine": {"threshold": 0.6, "min_snr": 4.0}}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    geom_path, _, stack, _, _ = stacks["cspad"]
    outdir = tmp_path / "o"
    with pytest.raises(PeakNetError, match="geometry differs" if fails else "no frames"):
        run({"inputs": [str(stack)], "geometry": str(geom_path), "output": str(outdir),
             "workers": 2, "progress": False})
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["status"].startswith("failed")
    assert ("geometry differs" in summary["status"]) is fails
    assert summary["engine"] == {"pipeline": "ray" if fails else "test", "threshold": 0.6,
                                 "min_snr": 4.0}


def test_an_interrupted_ray_run_exits_130_and_says_so(stacks, tmp_path, monkeypatch, capsys):
    """The pipeline stops cleanly on Ctrl-C and returns; peaknet2cxi must not then report a
    finished run (exit 0, status ok, an indexamajig command for part of the frames)."""
    import peaknet_xtal.pipeline as pipeline_module

    seen = {}

    def interrupted_run(config):
        seen.update(config)
        Path(config["output"]).mkdir(parents=True, exist_ok=True)
        return {"backend": "test", "interrupted": True, "engine": {"threshold": 0.5}}

    monkeypatch.setattr(pipeline_module, "run_pipeline", interrupted_run)
    geom_path, _, stack, _, _ = stacks["cspad"]
    outdir = tmp_path / "o"
    assert main([str(stack), "-g", str(geom_path), "-o", str(outdir), "--workers", "2",
                 "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [  # one line, as the single-process run's
        "peaknet2cxi: interrupted; no CXI file was finished; re-run the same command to "
        "continue"]
    assert "next: " not in captured.out
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["status"] == "interrupted" and summary["engine"]["threshold"] == 0.5
    assert seen["monitor_json"] == str(outdir / "peaknet2cxi.pipeline.json")


def test_a_ray_run_stopped_by_sigterm_exits_143_and_says_so(stacks, tmp_path, monkeypatch,
                                                             capsys):
    """The pipeline stops on SIGTERM as on Ctrl-C and says which: peaknet2cxi ends as an
    interrupted run with 128 + 15, what schedulers and shells expect of a process SIGTERM
    ended, and its record says interrupted, by SIGTERM."""
    import peaknet_xtal.pipeline as pipeline_module

    def terminated_run(config):
        Path(config["output"]).mkdir(parents=True, exist_ok=True)
        return {"backend": "test", "interrupted": True, "stop_signal": "SIGTERM"}

    monkeypatch.setattr(pipeline_module, "run_pipeline", terminated_run)
    geom_path, _, stack, _, _ = stacks["cspad"]
    outdir = tmp_path / "o"
    assert main([str(stack), "-g", str(geom_path), "-o", str(outdir), "--workers", "2",
                 "--no-progress"]) == 143
    captured = capsys.readouterr()
    assert "peaknet2cxi: interrupted (SIGTERM)" in captured.err and "next: " not in captured.out
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert (summary["status"], summary["stop_signal"]) == ("interrupted", "SIGTERM")


STOP_SCRIPT = """
import os, signal, sys
from peaknet_xtal.cli import peaknet2cxi

real_add = peaknet2cxi._Stats.add

def add(self, result):  # a Ctrl-C, or a scheduler's SIGTERM, once the first frame is done
    real_add(self, result)
    if self.frames == 1:
        os.kill(os.getpid(), signal.{signal})

peaknet2cxi._Stats.add = add
sys.exit(peaknet2cxi.main(sys.argv[1:]))
"""

def stop_line(said: str, outdir: Path) -> str:
    """The one line a stopped run ends with (``said``: ``interrupted``, ``interrupted
    (SIGTERM)``), its finished CXI files counted from its summary."""
    files = len(json.loads((outdir / "peaknet2cxi.json").read_text())["cxi_files"])
    return (f"peaknet2cxi: {said}; the {files} CXI file(s) finished before it are kept in "
            f"{outdir}; re-run the same command to continue (finished frames are skipped)")


def stop_lines(err: str) -> list[str]:
    """The command's own lines of ``err``, its progress lines aside."""
    import re

    return [line for line in err.splitlines() if line.startswith("peaknet2cxi: ")
            and not re.match(r"peaknet2cxi: \d+(/\d+)? frames", line)]


@pytest.mark.parametrize("signame, status, said", [
    ("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "interrupted (SIGTERM)")])
def test_a_stop_ends_a_run_in_one_line_and_the_rerun_completes_it(
        tmp_path, make_geometry_text, signame, status, said):
    """A Ctrl-C or a batch scheduler's SIGTERM mid-run, to a process of its own (by default
    SIGTERM kills the process): the frames done kept in finished files, no partial file left
    behind, the stream's complete chunks kept, the record saying interrupted, exit 130 or 143,
    and one last line saying so, what is kept and how to go on, as every command says a stop
    (it was three lines); the same command then completes the run."""
    import subprocess

    stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
    script = tmp_path / "run.py"
    script.write_text(STOP_SCRIPT.format(signal=signame))
    outdir, stream = tmp_path / "out", tmp_path / "out" / "run.stream"
    argv = [str(stack), "-g", str(geom), "-o", str(outdir), "--stream", str(stream),
            "--no-progress", "--min-peaks", "0", "--frames-per-file", "1", "--batch-size", "1"]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == status, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert not [p.name for p in outdir.iterdir() if p.name.endswith(".part")]
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert (summary["status"], summary["stop_signal"]) == ("interrupted", signame)
    line = stop_line(said, outdir)
    assert stop_lines(done.stderr) == [line], done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == line
    kept = summary["frames"]
    assert 1 <= kept < 3 and len(read_stream(stream).chunks) >= kept
    assert main(argv) == 0  # the rerun finishes the run
    assert json.loads((outdir / "peaknet2cxi.json").read_text())["frames"] == 3
    assert [c.event for c in read_stream(stream).chunks] == ["//0", "//1", "//2"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_ctrl_c_to_a_workers_run_says_what_the_single_process_run_says(
        tmp_path, make_geometry_text):
    """``peaknet2cxi --workers 2`` as a real process with its own Ray, Ctrl-C'd once its first
    CXI file is finished.  A user trial found it a different command from the single-process
    run: its progress line said "pipeline:" and no hits or peaks per frame, and its stop took
    two or three lines.  Now its progress line begins as the single-process run's (the label,
    the count, the hits and peaks per frame; the pipeline's rates after them), its stop is that
    run's one last line (exit 130), and its record says the threads each worker ran on."""
    import re
    import signal

    from peaknet_test_support import signalled_when

    size, frames = 512, 64  # about 0.2 s a frame on one thread: the stop comes mid-run
    stack = tmp_path / "run.h5"
    with h5py.File(stack, "w") as h5:
        h5["/entry_1/data_1/data"] = np.random.default_rng(2).poisson(
            5, (frames, size, size)).astype(np.uint16)
    geom = tmp_path / "det.geom"
    geom.write_text(make_geometry_text(["p0"], size, size, [(-size // 2, -size // 2)],
                                       clen="0.1 m", adu_per_photon="1"))
    outdir = tmp_path / "out"
    status, err = signalled_when(
        [sys.executable, "-m", "peaknet_xtal.cli.peaknet2cxi", str(stack), "-g", str(geom),
         "-o", str(outdir), "--workers", "2", "--min-peaks", "0", "--frames-per-file", "2"],
        lambda: any(outdir.glob("peaks-*.cxi")), signal.SIGINT, wait_s=300)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and not re.search(r"^pipeline:", err, re.M), err
    progress = [line for line in err.splitlines()
                if re.match(rf"peaknet2cxi: \d+/{frames} frames ", line)]
    assert len(progress) > 1, err  # the first, drawn as the bar opens, has no counts yet
    assert all(re.search(r", hits \d+ \| \d+\.\d peaks/frame \| in ", line)
               for line in progress[1:]), progress
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["status"] == "interrupted" and summary["cxi_files"]
    line = stop_line("interrupted", outdir)
    assert stop_lines(err) == [line], err
    assert err.rstrip().splitlines()[-1] == line
    record = json.loads((outdir / "peaknet2cxi.config.json").read_text())
    assert record["config"]["threads"] is None
    assert record["used"] == {"workers": 2, "threads_per_worker": 1}


def test_the_run_record_says_the_threads_the_run_used(tmp_path, monkeypatch):
    """peaknet2cxi.config.json said ``threads: null`` where --threads was not given: only the
    log said how many the run used.  The record says the threads used (with --workers, the
    workers and each one's threads), and keeps the configuration as given beside them (null
    where the machine chose: a command built from it is not pinned to this machine's cores;
    a rerun, which reads the settings of the CXI files, is unchanged)."""
    import torch

    import peaknet_xtal.pipeline as pipeline_module

    good = tiny_stack(tmp_path / "in.h5")

    def records(outdir: Path) -> tuple[dict, dict]:
        return (json.loads((outdir / "peaknet2cxi.config.json").read_text()),
                json.loads((outdir / "peaknet2cxi.json").read_text()))

    argv = [str(good), "--no-progress", "--min-peaks", "0", "--adu-per-photon", "1"]
    assert main([*argv, "-o", str(tmp_path / "default")]) == 0
    record, summary = records(tmp_path / "default")
    used = torch.get_num_threads()  # what the run set, as its log says
    assert record["config"]["threads"] is None and record["used"] == {"threads": used}
    assert summary["this_run"]["threads"] == used and summary["config"]["threads"] is None
    assert main([*argv, "-o", str(tmp_path / "default"), "--threads", "1"]) == 0  # a rerun
    record, _ = records(tmp_path / "default")
    assert record["config"]["threads"] == 1
    assert record["used"] == {"threads": None}  # every frame was done: none found, no thread

    seen = {}

    def fake_run_pipeline(config):
        seen.update(config)
        return {"backend": "test", "engine": {}}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    for given, each in ((None, 1), (3, 3)):
        outdir = tmp_path / f"workers-{given}"
        threads = [] if given is None else ["--threads", str(given)]
        assert main([*argv, "-o", str(outdir), "--workers", "2", *threads]) == 1  # no frames
        record, summary = records(outdir)
        assert seen["threads_per_worker"] == each and record["config"]["threads"] == given
        assert record["used"] == {"workers": 2, "threads_per_worker": each}
        assert summary["this_run"]["threads_per_worker"] == each


def test_cxi_writer_hits_only_keeps_only_hits(stacks, tmp_path):
    from peaknet_xtal.formats.cxi import CXIWriter, iter_cxi_frames
    from peaknet_xtal.types import FrameResult, empty_peaks

    geom_path, geometry, stack, _, _ = stacks["cspad"]
    writer = CXIWriter(tmp_path / "w", geometry, hits_only=True)
    for k, frame in enumerate(iter_cxi_frames(stack, geometry)):
        writer.write(FrameResult(frame=frame, peaks=empty_peaks(0), hit=k == 1))
    writer.close()
    (only,) = writer.finished_files()
    assert read_cxi_peaks(only).keys == [(str(stack), "//1")]


def test_a_hits_only_writer_records_the_frames_it_leaves_out(stacks, tmp_path):
    """A hit-finding run writes a few per cent of its frames; the blanks it left out were not
    recorded, so a resumed run found every one of them again (8 of 8 frames on a rerun of a
    finished run).  They are now recorded, with the settings and inputs a CXI file records."""
    import shutil

    from peaknet_xtal.formats.cxi import CXIWriter, iter_cxi_frames, read_nonhits
    from peaknet_xtal.types import FrameResult, empty_peaks

    _, geometry, shared, _, _ = stacks["cspad"]
    stack = Path(shutil.copy(shared, tmp_path / "run.cxi"))  # its time is changed below
    first, second = iter_cxi_frames(stack, geometry)
    frames = [first, second, dataclasses.replace(first, event="//2")]  # blank, hit, blank
    options = {"hits_only": True, "frames_per_file": 1, "settings": {"min_peaks": 5}}
    writer = CXIWriter(tmp_path / "w", geometry, **options)
    for k, frame in enumerate(frames):
        writer.write(FrameResult(frame=frame, peaks=empty_peaks(0), hit=k == 1))
    writer.close()
    records = writer.nonhit_files()
    # one record as the hit's file was finished (the blank before it), one at the close
    assert [p.name for p in records] == ["peaks-nonhits-00000.h5", "peaks-nonhits-00001.h5"]
    assert read_nonhits(records[0]) == [(str(stack), "//0")]
    again = CXIWriter(tmp_path / "w", geometry, **options)
    assert again.done_keys() == {(str(stack), f"//{k}") for k in range(len(frames))}
    # other settings are refused by the records as by the CXI files
    blanks_only = tmp_path / "blanks"
    writer = CXIWriter(blanks_only, geometry, **options)
    writer.write(FrameResult(frame=frames[0], peaks=empty_peaks(0), hit=False))
    writer.close()
    with pytest.raises(FormatError, match="peaks-nonhits-00000.h5.*min_peaks 5 there, 7 now"):
        CXIWriter(blanks_only, geometry, **{**options, "settings": {"min_peaks": 7}})
    # and a record whose input changed since is refused as a CXI file is
    os.utime(stack, ns=(os.stat(stack).st_atime_ns, os.stat(stack).st_mtime_ns + 10**9))
    with pytest.raises(FormatError, match="has changed since its frames were found into"):
        CXIWriter(blanks_only, geometry, **options).done_keys()


def test_a_long_stretch_of_blanks_is_recorded_as_it_goes(stacks, tmp_path):
    """Blanks between two hits are recorded every 10 x frames_per_file, so a run killed in a
    long stretch of them (no file finished, no close) keeps all but the last few."""
    from peaknet_xtal.formats.cxi import CXIWriter, iter_cxi_frames
    from peaknet_xtal.types import FrameResult, empty_peaks

    _, geometry, stack, _, _ = stacks["cspad"]
    (frame, *_) = iter_cxi_frames(stack, geometry)
    writer = CXIWriter(tmp_path / "w", geometry, hits_only=True, frames_per_file=1)
    for k in range(25):  # the same pixels, 25 events
        writer.write(FrameResult(frame=dataclasses.replace(frame, event=f"//{k}"),
                                 peaks=empty_peaks(0), hit=False))
    # killed here: never closed
    assert len(writer.nonhit_files()) == 2
    resumed = CXIWriter(tmp_path / "w", geometry, hits_only=True, frames_per_file=1)
    assert len(resumed.done_keys()) == 20


@pytest.mark.dials
@pytest.mark.slow
def test_dials_output_indexes_the_real_cspad_stills(real_data, dials_env, tmp_path, capsys):
    """--dials: PeakNet's spots on the two real CSPAD stills as strong.refl + imported.expt;
    DIALS indexes both stills from them with the printed command (Debian's build: the
    sequences stills indexer, see ../shared/data/README.md)."""
    import subprocess

    cbfs = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    outdir = tmp_path / "out"
    code = main([*map(str, cbfs), "-o", str(outdir), "--dials", "--device", "cpu",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (line,) = [x for x in captured.out.splitlines() if x.startswith("next (DIALS): ")]
    command = line.removeprefix("next (DIALS): ").replace(
        "YOUR_SPACE_GROUP", "P6122").replace("YOUR_CELL", "92.9,92.9,130.4,90,90,120").split()
    assert command[:3] == ["dials.index", str(outdir / "dials" / "imported.expt"),
                           str(outdir / "dials" / "strong.refl")]
    assert "joint_indexing=False" in command
    exe = Path(sys.executable).parent / command[0]
    done = subprocess.run([str(exe), *command[1:]], cwd=tmp_path, env=dials_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from dxtbx.model.experiment_list import ExperimentListFactory

    indexed = ExperimentListFactory.from_json_file(str(tmp_path / "indexed.expt"),
                                                   check_format=False)
    assert len(indexed) == 2  # both stills, each with its crystal
    for experiment in indexed:
        a, b, c = experiment.crystal.get_unit_cell().parameters()[:3]
        assert a == pytest.approx(92.9, rel=0.02) and c == pytest.approx(130.4, rel=0.03)


# --------------------------------------------------------------------------------------------
# option ranges, mixed detectors, and when a rerun can help


#: option, a value outside its range, the range the error states
OUT_OF_RANGE = [
    ("--threshold", "1.5", "in [0, 1]"), ("--threshold", "-0.1", "in [0, 1]"),
    ("--threshold", "nan", "in [0, 1]"), ("--rescue-prob", "1.5", "in [0, 1]"),
    ("--min-snr", "-3", ">= 0"), ("--min-height", "-1", ">= 0"),
    ("--rescue-height", "-0.5", ">= 0"), ("--faint-support", "-1", ">= 0"),
    ("--adu-per-photon", "-2", ">= 0"), ("--min-peaks", "-1", ">= 0"),
    ("--batch-size", "0", ">= 1"), ("--frames-per-file", "0", ">= 1"),
    ("--workers", "0", ">= 1"), ("--max-peaks", "0", ">= 1"), ("--threads", "0", ">= 1"),
]


@pytest.mark.parametrize("option, value, allowed", OUT_OF_RANGE)
def test_an_option_out_of_range_is_one_clear_error(tmp_path, capsys, option, value, allowed):
    """On the command line and in a --config file alike: exit status 2 before anything runs,
    one line naming the option (or the file and key) and the whole allowed range."""
    key, cfg = option[2:].replace("-", "_"), tmp_path / "run.yaml"
    cfg.write_text(f"{key}: {value}\n")
    for argv, names in (([option, value], ["command line", f"{option}: must be {allowed}"]),
                        (["--config", str(cfg)], [str(cfg), f"{key}: must be {allowed}"])):
        with pytest.raises(SystemExit) as stop:
            main(["in.cxi", "-o", str(tmp_path / "out"), *argv])
        assert stop.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("peaknet2cxi: error: ") and f"(got {value}" in last.replace(
            "'", ""), last  # a YAML nan is the string 'nan'

        assert all(name in last for name in names), last
        assert not (tmp_path / "out").exists()  # nothing ran


def test_values_on_the_edge_of_their_range_are_accepted_and_python_callers_are_checked(
        tmp_path):
    from peaknet_xtal import config as cfgmod
    from peaknet_xtal.cli.peaknet2cxi import DEFAULTS, TYPES, build_parser

    args = build_parser().parse_args(
        ["in.cxi", "-o", "out", "--threshold", "1", "--rescue-prob", "1", "--min-snr", "0",
         "--min-height", "0", "--adu-per-photon", "0", "--frames-per-file", "1",
         "--batch-size", "1", "--max-peaks", "1", "--threads", "1", "--faint-support", "0"])
    resolved = cfgmod.resolve(DEFAULTS, args, types=TYPES)
    assert (resolved["threshold"], resolved["adu_per_photon"], resolved["frames_per_file"]) == (
        1.0, 0.0, 1)
    with pytest.raises(cfgmod.ConfigError, match=r"frames_per_file: must be >= 1 \(got 0\)"):
        run({"inputs": ["in.cxi"], "output": str(tmp_path / "out"), "frames_per_file": 0})
    assert not (tmp_path / "out").exists()


def _blank_predictor(panels, masks):
    """No peak anywhere: these tests are about files and messages, not peaks."""
    return [np.zeros(np.shape(p), np.float32) for p in panels]


def tiny_stack(path: Path, frames: int = 3) -> Path:
    """A CXI/HDF5 stack of ``frames`` 32 x 32 frames at the default data path (no geometry:
    one panel); small enough that the engine batches several frames together."""
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = np.random.default_rng(1).poisson(
            5, (frames, 32, 32)).astype(np.float32)
    return path


#: Where the planted spots of :func:`test_a_cbf_given_with_a_geometry_is_read_through_it`
#: lie (ss, fs): the first in the geometry's bad region, the second clear of it.
CBF_SPOTS = ((6, 11), (36, 30))


def _cbf_spot_predictor(panels, masks):
    """The planted 3 x 3 spots (image rows 0-23 are panel 0, 24-47 panel 1) and nothing else."""
    probs = [np.zeros(np.shape(p), np.float32) for p in panels]
    for ss, fs in CBF_SPOTS:
        probs[ss // 24][ss % 24 - 1:ss % 24 + 2, fs - 1:fs + 2] = 1.0
    return probs


@pytest.mark.dials
def test_a_cbf_given_with_a_geometry_is_read_through_it(tmp_path, capsys, dials_env,
                                                         make_geometry_text):
    """-g with an image DIALS reads: its panels, bad regions and photon energy are the
    geometry's, as indexamajig -g reads a CBF file, in the peaks, the CXI masks, peaknet.geom
    and the DIALS export (imported from the CXI files, with that geometry).  A bright spot in
    the bad region is no peak (before, the geometry was written for indexamajig but the peaks
    were found on DIALS' reading: 28 of a real Pilatus 6M frame's peaks lay in its geometry's
    beam-stop region)."""
    pixels = np.random.default_rng(5).poisson(5, (48, 48))
    for ss, fs in CBF_SPOTS:
        pixels[ss - 1:ss + 2, fs - 1:fs + 2] += 400
    cbf = tiny_cbf(tmp_path / "spots_0001.cbf", 100.0, pixels=pixels)
    geom = tmp_path / "user.geom"
    geom.write_text(make_geometry_text(
        ["top", "bottom"], 48, 24, [(-24, -24), (-24, 0)], data=None, dims=False,
        photon_energy="9000 eV", extra="bad_stop/min_fs = 8\nbad_stop/max_fs = 14\n"
        "bad_stop/min_ss = 3\nbad_stop/max_ss = 9\nbad_stop/panel = top\n"))
    outdir = tmp_path / "out"
    summary = run({"inputs": [str(cbf)], "geometry": str(geom), "output": str(outdir),
                   "predictor": _cbf_spot_predictor, "progress": False, "min_peaks": 1,
                   "dials": True})
    (cxi,) = summary["cxi_files"]
    peaks = read_cxi_peaks(cxi).peaks(0, read_geometry(outdir / "peaknet.geom"))
    assert len(peaks) == 1 and int(peaks["panel"][0]) == 1
    assert (float(peaks["ss"][0]), float(peaks["fs"][0])) == pytest.approx((12.0, 30.0), abs=0.2)
    with h5py.File(cxi) as h5:
        mask = h5["/entry_1/data_1/mask"][0]
        assert mask.shape == (48, 48) and not mask[3:10, 8:15].any() and mask[20:, :].all()
        assert h5["/entry_1/peaknet/photon_energy_eV"][0] == pytest.approx(9000.0)
    written = read_geometry(outdir / "peaknet.geom")
    assert [p.name for p in written.panels] == ["top", "bottom"]
    from dxtbx.model.experiment_list import ExperimentListFactory

    (experiment,) = ExperimentListFactory.from_json_file(summary["dials"]["experiments"],
                                                         check_format=False)
    assert len(experiment.detector) == 2
    assert experiment.beam.get_wavelength() == pytest.approx(12398.419843 / 9000.0, rel=1e-6)
    assert summary["dials"]["spots"] == 1


@pytest.mark.dials
def test_a_cbf_that_no_geometry_can_cut_is_one_line_naming_it(tmp_path, capsys, dials_env,
                                                              real_data):
    """CSPAD CBF files hold one array per sensor: -g has no one array to cut, and says so (not
    that the file is no HDF5), with what to do instead; nothing is written."""
    cbf = real_data / "cspad_thermolysin_stills" / "idx-20130301060858401.cbf"
    geom = real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom"
    code = main([str(cbf), "-g", str(geom), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {cbf}: cannot be read through {geom}" in err, err
    assert "64 panels that are not parts of one image array" in err and "run without -g" in err
    assert "HDF5" not in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("peaks-*.cxi"))


@pytest.mark.dials
def test_two_detectors_in_one_output_is_one_clear_error_and_keeps_the_first(tmp_path, capsys,
                                                                            dials_env):
    """The second detector's file is named, with the input the folder's geometry came from and
    what to do; the first's frames are kept; a rerun says the same (its advice cannot loop)."""
    first = tiny_cbf(tmp_path / "near_0001.cbf", 100.0)
    second = tiny_cbf(tmp_path / "far_0001.cbf", 150.0)
    outdir = tmp_path / "mixed"
    config = {"inputs": [str(first), str(second)], "output": str(outdir),
              "predictor": _blank_predictor, "progress": False}
    with pytest.raises(FormatError) as info:
        run(config)
    message = str(info.value)
    assert message.startswith(f"{second}: its detector geometry differs from that of the first "
                              f"input, {first}")
    assert "its own output folder" in message and "peaknet.geom" not in message
    (kept,) = (outdir / "peaknet.lst").read_text().split()
    assert read_cxi_peaks(kept).keys == [(str(first), "//")]
    assert json.loads((outdir / "peaknet2cxi.json").read_text())["frames"] == 1
    for _ in range(2):  # the command line, then its rerun
        code = main([str(first), str(second), "-o", str(outdir), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and f"error: {second}: its detector geometry differs from" in err, err
        assert "its own output folder" in err and "re-run" not in err
    assert read_cxi_peaks(kept).keys == [(str(first), "//")]  # nothing lost, nothing added


def test_another_geometry_into_an_earlier_runs_folder_is_one_clear_error(
        tmp_path, capsys, make_geometry_text):
    """-g with a geometry other than the one an earlier run wrote there: the error names the
    -g file and says to use another folder, not to remove peaknet.geom (its CXI files need it)
    or to re-run."""
    stack = tiny_stack(tmp_path / "run.h5")
    geoms = []
    for clen in ("0.1 m", "0.2 m"):
        geoms.append(tmp_path / f"clen{clen[:3]}.geom")
        geoms[-1].write_text(make_geometry_text(["p0"], 32, 32, [(-16, -16)], clen=clen,
                                                adu_per_photon="1"))
    outdir = tmp_path / "out"
    assert main([str(stack), "-g", str(geoms[0]), "-o", str(outdir), "--no-progress",
                 "--min-peaks", "0"]) == 0
    capsys.readouterr()
    before = (outdir / "peaknet.geom").read_text()
    more = tiny_stack(tmp_path / "more.h5")  # frames still to do
    code = main([str(more), "-g", str(geoms[1]), "-o", str(outdir), "--no-progress",
                 "--min-peaks", "0"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {geoms[1]}: this geometry (-g) differs from the one in " \
        f"{outdir / 'peaknet.geom'}" in err, err
    assert "another output folder" in err and "re-run" not in err and "remove" not in err
    assert (outdir / "peaknet.geom").read_text() == before
    assert len(read_cxi_peaks(outdir / "peaks-00000.cxi")) == 3


def _small_run_inputs(tmp_path: Path, make_geometry_text) -> tuple[Path, Path]:
    """A 3-frame 32 x 32 stack and a one-panel geometry for it (numeric clen and energy)."""
    stack = tiny_stack(tmp_path / "run.h5")
    geom = tmp_path / "det.geom"
    geom.write_text(make_geometry_text(["p0"], 32, 32, [(-16, -16)], clen="0.1 m",
                                       adu_per_photon="1"))
    return stack, geom


def test_printed_commands_are_quoted_for_the_shell(tmp_path, capsys, make_geometry_text):
    """An output folder named with a space and a quote: the printed indexamajig command, split
    as a shell splits it, still names the run's list, geometry and stream; so does the
    dials.index command of --dials."""
    import shlex

    stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
    outdir = tmp_path / "o sp'ace"
    assert main([str(stack), "-g", str(geom), "-o", str(outdir), "--no-progress",
                 "--min-peaks", "0"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("next: ")]
    words = shlex.split(line[len("next: "):])
    assert words[0] == "indexamajig"
    given = {flag: words[words.index(flag) + 1] for flag in ("-i", "-g", "-o")}
    assert given == {"-i": str(outdir / "peaknet.lst"), "-g": str(outdir / "peaknet.geom"),
                     "-o": str(outdir / "peaknet.stream")}
    assert Path(given["-i"]).is_file() and Path(given["-g"]).is_file()
    from peaknet_xtal.cli.peaknet2cxi import dials_index_command

    dials = shlex.split(dials_index_command(outdir / "dials" / "imported.expt",
                                            outdir / "dials" / "strong.refl"))
    assert dials[:3] == ["dials.index", str(outdir / "dials" / "imported.expt"),
                         str(outdir / "dials" / "strong.refl")]


def test_the_stream_header_holds_the_whole_command_line(tmp_path, make_geometry_text):
    """CrystFEL writes its whole command line as the stream header's third line: so does
    peaknet2cxi (options too, shell-quoted); a Python caller's run records the command that
    would do the same."""
    import shlex

    stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
    stream = tmp_path / "a stream.stream"
    argv = [str(stack), "-g", str(geom), "-o", str(tmp_path / "out 1"), "--stream", str(stream),
            "--no-progress", "--min-peaks", "0", "--threshold", "0.6"]
    assert main(argv) == 0
    (header,) = read_stream(stream).headers
    assert header.command is not None and shlex.split(header.command) == ["peaknet2cxi", *argv]

    again = tmp_path / "b.stream"
    run({"inputs": [str(stack)], "geometry": str(geom), "output": str(tmp_path / "out2"),
         "stream": str(again), "predictor": _blank_predictor, "progress": False,
         "min_peaks": 0, "threshold": 0.6})
    (header,) = read_stream(again).headers
    words = shlex.split(header.command or "")
    assert words[:2] == ["peaknet2cxi", str(stack)] and "--no-progress" in words
    for flag, value in (("-g", str(geom)), ("-o", str(tmp_path / "out2")),
                        ("--stream", str(again)), ("--min-peaks", "0"), ("--threshold", "0.6")):
        assert words[words.index(flag) + 1] == value, (flag, words)


def test_an_input_error_keeps_the_frames_batched_before_it(tmp_path):
    """A bad file after small frames the engine holds in one batch: those frames are found and
    written before the error is raised, not dropped with the batch."""
    good = tiny_stack(tmp_path / "good.h5")
    data = good.read_bytes()
    broken = tmp_path / "broken.h5"
    broken.write_bytes(data[:len(data) // 2])  # truncated
    outdir = tmp_path / "out"
    with pytest.raises(FormatError, match="broken.h5"):
        run({"inputs": [str(good), str(broken)], "output": str(outdir),
             "predictor": _blank_predictor, "progress": False})
    (kept,) = (outdir / "peaknet.lst").read_text().split()
    assert read_cxi_peaks(kept).keys == [(str(good), f"//{k}") for k in range(3)]


@pytest.mark.dials
def test_a_bad_input_gets_no_rerun_advice(stacks, tmp_path, capsys, dials_env):
    """Truncated HDF5, a truncated CBF (said to be perhaps damaged), a dataset the geometry
    names that the file lacks: rerunning the same command fails the same way, so it is not
    advised; the finished frames are still said to be kept."""
    good = tiny_stack(tmp_path / "good.h5")
    truncated_h5 = tmp_path / "truncated.h5"
    truncated_h5.write_bytes(good.read_bytes()[:1500])
    whole = tiny_cbf(tmp_path / "whole_0001.cbf", 100.0).read_bytes()
    cut_header, cut_data = tmp_path / "header_0001.cbf", tmp_path / "data_0001.cbf"
    cut_header.write_bytes(whole[:len(whole) // 10])  # dxtbx cannot open it
    cut_data.write_bytes(whole[:len(whole) // 3])  # it opens, its pixels cannot be read
    geom_path = stacks["cspad"][0]
    for k, (argv, words, kept) in enumerate((
            ([str(good), str(truncated_h5)], "not a readable HDF5 file", True),
            ([str(cut_header)], "the file may be damaged or truncated", False),
            ([str(good), str(cut_data)], "the file may be damaged or truncated", True),
            ([str(good), "-g", str(geom_path)], "1480x1552", False))):
        code = main([*argv, "-o", str(tmp_path / f"out{k}"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and words in err, err
        assert "re-run" not in err and ("are kept in" in err) == kept, err


@pytest.mark.dials
def test_an_image_refused_for_a_stated_reason_is_said_in_those_words(tmp_path, capsys,
                                                                      dials_env):
    """A sound image named without an image number, and an SMV image cut short: each is one
    error in its own words.  Both were said as "DIALS cannot read this image: the file may be
    damaged or truncated (...)": the sound file's cause (dxtbx takes the image number from the
    name) went unsaid, and the cut file's byte counts came wrapped in a guess."""
    from peaknet_test_support import tiny_smv

    pixels = np.random.default_rng(3).poisson(6, (40, 48)) * 12 + 40
    numbered = tiny_cbf(tmp_path / "sound_0001.cbf", 100.0)
    unnumbered = tmp_path / "frame.cbf"
    unnumbered.write_bytes(numbered.read_bytes())
    whole = tiny_smv(tmp_path / "whole_001.img", pixels).read_bytes()
    cut = tmp_path / "cut_001.img"
    cut.write_bytes(whole[:-1000])
    for k, (path, words) in enumerate((
            (unnumbered, "this name holds none (dxtbx: Could not determine filename template)"),
            (cut, "truncated: "))):
        code = main([str(path), "-o", str(tmp_path / f"out{k}"), "--no-progress"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error:")]
        assert code == 1 and len(errors) == 1, err
        assert errors[0].startswith(f"peaknet2cxi: error: {path}: ") and words in errors[0], err
        assert "damaged or truncated" not in err and "Traceback" not in err, err
    assert main([str(numbered), "-o", str(tmp_path / "sound"), "--no-progress"]) == 0
    # the advice followed: a link under a numbered name is that name, given or listed (the
    # link's target was read, and refused again in the same words, naming it)
    link = tmp_path / "linked" / "frame_0001.cbf"
    link.parent.mkdir()
    link.symlink_to(unnumbered)
    listed = tmp_path / "linked" / "images.lst"
    listed.write_text("frame_0001.cbf\n")
    for k, given in enumerate((link, listed)):
        code = main([str(given), "-o", str(tmp_path / f"linked{k}"), "--no-progress"])
        assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("name, with_geometry", [("junk.h5", True), ("junk.h5", False),
                                                  ("junk.dat", True)])
def test_a_corrupt_hdf5_input_is_said_to_be_no_readable_hdf5_file(tmp_path, capsys,
                                                                  make_geometry_text, name,
                                                                  with_geometry):
    """A file given as HDF5 (with -g, whose geometry is for CXI/HDF5 input, or by its name)
    that is no HDF5 file: one error naming it as not a readable HDF5 file, not DIALS' failure
    to read an image it was never meant to be; no traceback, no rerun advice."""
    junk = tmp_path / name
    junk.write_text("x\n")
    geom = tmp_path / "ok.geom"
    geom.write_text(make_geometry_text(["p0"], 32, 32, [(-16, -16)], clen="0.1 m",
                                       adu_per_photon="1"))
    argv = [str(junk), "-o", str(tmp_path / "o5"), "--no-progress"]
    assert main(argv + (["-g", str(geom)] if with_geometry else [])) == 1
    err = capsys.readouterr().err
    assert f"peaknet2cxi: error: {junk}: not a readable HDF5 file" in err, err
    assert ("-g" in err) is with_geometry
    assert "Traceback" not in err and "re-run" not in err and "cannot read this image" not in err


def test_a_transient_failure_or_an_interruption_advises_the_rerun(tmp_path, capsys,
                                                                  monkeypatch):
    from peaknet_xtal.cli import peaknet2cxi

    good = tiny_stack(tmp_path / "good.h5")
    for problem, code in ((OSError(28, "No space left on device"), 1),
                          (KeyboardInterrupt(), 130)):
        def fail(self, result, problem=problem):
            raise problem

        monkeypatch.setattr(peaknet2cxi._Stats, "add", fail)
        outdir = tmp_path / f"out{code}"
        assert main([str(good), "-o", str(outdir), "--no-progress", "--min-peaks", "0"]) == code
        err = capsys.readouterr().err
        assert "re-run the same command to continue" in err, err
        assert ("its disk is full" in err) == (code == 1), err
    monkeypatch.undo()
    assert main([str(good), "-o", str(outdir), "--no-progress", "--min-peaks", "0"]) == 0


def test_running_out_of_memory_is_one_error_saying_what_to_lower(tmp_path, capsys,
                                                                  monkeypatch):
    """Torch's allocator failing inside the model (a real allocation failure, as a user trial
    met on 16-Mpx frames under a memory limit: a 65-line traceback) is one error saying memory
    ran out and what to lower, exit 1, the frames written before it kept."""
    import torch

    from peaknet_xtal.finding.engine import InferenceEngine

    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as h5:  # a megapixel a frame: one model call each
        h5["/entry_1/data_1/data"] = np.random.default_rng(1).poisson(
            5, (3, 1024, 1024)).astype(np.float32)
    real = InferenceEngine._segment
    calls = []

    def starved_later(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            torch.empty(2 ** 50, dtype=torch.uint8)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "_segment", starved_later)
    outdir = tmp_path / "out"
    argv = [str(good), "-o", str(outdir), "--no-progress", "--min-peaks", "0",
            "--batch-size", "1", "--frames-per-file", "1", "--threads", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "peaknet2cxi: error: out of memory: the model ran out of memory" in err, err
    assert "--tile-size" in err and "--workers" in err and "Traceback" not in err
    assert "CXI file(s) finished before it are kept" in err


def test_a_run_failing_before_its_first_file_names_no_geometry_it_did_not_write(
        tmp_path, caplog, monkeypatch, make_geometry_text):
    """The defect mask counted from the read-ahead is still saved when the model fails on the
    first frames, but its advice named ``peaknet.geom``, which the writer had not yet written
    (a memory trial: "add to out/peaknet.geom" with no such file)."""
    from peaknet_xtal.finding.engine import InferenceEngine

    def starved(self, *args, **kwargs):
        raise MemoryError("no more could be allocated")

    monkeypatch.setattr(InferenceEngine, "_segment", starved)
    stack = tiny_stack(tmp_path / "in.h5", frames=8)
    geom = tmp_path / "in.geom"
    geom.write_text(make_geometry_text(["p0"], 32, 32, [(-16, -16)], clen="0.1 m",
                                       adu_per_photon="1"))
    outdir = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert main([str(stack), "-g", str(geom), "-o", str(outdir), "--no-progress",
                     "--min-peaks", "0", "--threads", "1"]) == 1
    assert (outdir / "pixel_defects.h5").exists() and not (outdir / "peaknet.geom").exists()
    said = " ".join(r.getMessage() for r in caplog.records if "pixel_defects.h5" in
                    r.getMessage())
    assert "to apply it, add to" in said and "peaknet.geom" not in said, said


def test_rerun_can_help_only_outside_the_inputs():
    from peaknet_xtal.cli.peaknet2cxi import rerun_can_help

    def raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
        try:
            raise exc from cause
        except BaseException as caught:  # noqa: BLE001
            return caught

    assert rerun_can_help(OSError(5, "Input/output error"))
    assert rerun_can_help(raised(PeakNetError("a stage failed"), OSError(5, "I/O")))
    assert not rerun_can_help(FormatError("x.h5", "truncated"))
    assert not rerun_can_help(raised(FormatError("x.h5", "not a readable HDF5 file"),
                                     OSError("truncated file")))
    assert not rerun_can_help(raised(PeakNetError("a stage failed"), FormatError("x", "bad")))
    assert not rerun_can_help(PeakNetError("no frames were written"))
    assert not rerun_can_help(ValueError("batch_size must be >= 1"))
    # a folder it may not write to fails the same way again
    assert not rerun_can_help(PermissionError(13, "Permission denied", "/out/.x.part"))
    assert not rerun_can_help(raised(PeakNetError("a stage failed"), OSError(30, "Read-only")))


def test_a_full_disk_says_so_and_leaves_no_crash_or_partial_file(tmp_path):
    """A write that finds no room in HDF5 (here a file size limit: EFBIG as a full disk gives
    ENOSPC) is one error saying the disk is full, the rerun advice and exit 1, no partial file:
    it was a traceback ("Can't decrement id ref count", raised while dropping the file, hiding
    the first error) and a segmentation fault as HDF5 shut down."""
    import shlex
    import subprocess

    stack = tiny_stack(tmp_path / "in.h5", frames=40)
    outdir = tmp_path / "out"
    command = shlex.join([sys.executable, "-m", "peaknet_xtal.cli.peaknet2cxi", str(stack), "-o",
                          str(outdir), "--no-progress", "--threads", "1", "--min-peaks", "0"])
    done = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 24; exec {command}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "its disk is full" in done.stderr and "Traceback" not in done.stderr
    assert "re-run the same command to continue" in done.stderr
    assert not [p.name for p in outdir.iterdir() if p.name.endswith(".part")]


def test_ray_sources_open_inputs_as_the_single_process_run_does(sim_run, tmp_path, monkeypatch):
    """Without -g, a CXI file that names its geometry is read through it by the Ray pipeline's
    sources too (they sniffed: one panel a frame, other peaks on every frame than the
    single-process run, no .geom): the pipeline is handed the one opening function (with the
    single-process run's words for a frame that cannot be read)."""
    import peaknet_xtal.pipeline as pipeline_module
    from peaknet_xtal.cli.peaknet2cxi import open_input, open_worker_input
    from peaknet_xtal.formats.cxi import geometry_path

    if geometry_path(str(sim_run.cxi)) is None:  # the fixture's run must name its geometry
        named = tmp_path / "named.cxi"
        named.write_bytes(sim_run.cxi.read_bytes())
        (tmp_path / "named.geom").write_text(sim_run.geom.read_text())
        source_path = named
    else:
        source_path = sim_run.cxi
    seen = {}

    def fake_run_pipeline(config):
        seen.update(config)
        return {"backend": "test"}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    with pytest.raises(PeakNetError, match="no frames were written"):
        run({"inputs": [str(source_path)], "output": str(tmp_path / "o"), "workers": 2,
             "progress": False, "adu_per_photon": 1.5})
    assert seen["source_kind"] is open_worker_input
    source = seen["source_kind"](str(source_path), **seen["source_options"])
    try:
        frame = next(iter(source))
    finally:
        source.close()
    expected = open_input(str(source_path))
    try:
        single = next(iter(expected))
    finally:
        expected.close()
    assert frame.geometry is not None and frame.geometry.n_panels == single.geometry.n_panels > 1
    assert [p.shape for p in frame.panels] == [p.shape for p in single.panels]


@pytest.mark.dials
def test_a_ray_run_measures_the_gain_once_for_every_worker(real_data, dials_env):
    """The gain a --workers run's engines use is measured before they start, over the run's
    first frames as the single-process engine measures it (each worker measured its own on
    whatever frames it got: peaks and the written gain depended on the number of workers)."""
    from peaknet_xtal.cli.peaknet2cxi import run_gain
    from peaknet_xtal.finding import InferenceEngine

    stills = sorted(str(p) for p in (real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    gain = run_gain(stills, None)
    engine = InferenceEngine(predictor=lambda panels, masks: [np.zeros(np.shape(p), np.float32)
                                                             for p in panels])
    from peaknet_xtal.cli.peaknet2cxi import open_input

    last = None
    for path in stills:  # the single-process engine's gain after the same frames
        source = open_input(path)
        try:
            for frame in source:
                last = engine.params_for(frame).adu_per_photon
        finally:
            source.close()
    assert gain is not None and gain == last and 20 < gain < 40  # CSPAD: ~30 ADU a photon
    assert run_gain(stills[:1], None) != gain  # one frame's own estimate: the median moved


def test_a_geometry_indexamajig_would_refuse_is_said_instead_of_a_command(sim_run, tmp_path,
                                                                          capsys):
    """A geometry without a camera length finds peaks, but indexamajig refuses it ("must
    specify the camera length"): the run says what is missing rather than print a command that
    fails at once."""
    text = "".join(line for line in sim_run.geom.read_text().splitlines(keepends=True)
                   if not line.startswith("clen"))
    geom = tmp_path / "no_clen.geom"
    geom.write_text(text)
    outdir = tmp_path / "o"
    assert main([str(sim_run.cxi), "-g", str(geom), "-o", str(outdir), "--no-progress",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"next: indexamajig would refuse {outdir / 'peaknet.geom'}: no camera length" in out
    assert "(YOUR.cell: your unit cell file" not in out  # no ready-to-run command
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["indexamajig_problems"] and summary["indexamajig"]


def test_frames_without_a_photon_energy_are_said_instead_of_a_command(sim_run, tmp_path,
                                                                      capsys):
    """The geometry reads the photon energy from a dataset the input lacks: the CXI files store
    NaN there, and CrystFEL's stream reader refuses every chunk of what indexamajig would make
    of them; the run exited 0 and printed the command as if ready.  It now says which frames
    lack it and what to give."""
    lines = [("photon_energy = /LCLS/photon_energy_eV" if line.startswith("photon_energy")
              else line) for line in sim_run.geom.read_text().splitlines()]
    geom = tmp_path / "energy_path.geom"
    geom.write_text("\n".join(lines) + "\n")
    outdir = tmp_path / "o"
    assert main([str(sim_run.cxi), "-g", str(geom), "-o", str(outdir), "--no-progress",
                 "--threads", "1", "--max-peaks", "5"]) == 0
    out = capsys.readouterr().out
    n = sim_run.n_frames
    assert (f"next: indexamajig would refuse {outdir / 'peaknet.geom'}: {n} of {n} frames have "
            "no photon energy") in out, out
    assert "give the geometry a photon_energy as a number" in out
    assert "(YOUR.cell: your unit cell file" not in out


@pytest.mark.dials
def test_a_nexus_file_dials_cannot_read_is_said_with_dials_reason(tmp_path, capsys, dials_env):
    """A NeXus master whose linked data file is missing (or a field DIALS refuses) was said to
    hold "no image dataset", with its pixel mask offered as image-like data to name with -g;
    the error is DIALS' reason, with the missing data file's name."""
    from peaknet_test_support import tiny_nxmx

    stack = np.random.default_rng(0).poisson(3, (2, 40, 48)).astype(np.uint16)
    master = tiny_nxmx(tmp_path, stack, pixel_mask=np.zeros((40, 48)))
    (tmp_path / "tiny_data_000001.h5").unlink()
    assert main([str(master), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{master}: a NeXus file that DIALS cannot read" in err
    assert "tiny_data_000001.h5" in err and "pixel_mask" not in err and "-g" not in err


@pytest.mark.dials
def test_a_rotation_nexus_master_without_its_data_file_names_the_missing_file(tmp_path, capsys,
                                                                             dials_env):
    """A rotation series' NXmx master counts its images from its own rotation axis, so DIALS
    opens it without its data file and fails only on reading the first image: that was said as
    a damaged file ("can't open file"), naming neither that it is a NeXus master nor the data
    file it lacks."""
    from peaknet_test_support import tiny_nxmx

    stack = np.random.default_rng(0).poisson(3, (2, 40, 48)).astype(np.uint16)
    master = tiny_nxmx(tmp_path, stack, still=False)
    (tmp_path / "tiny_data_000001.h5").unlink()
    assert main([str(master), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{master}: a NeXus file that DIALS cannot read" in err, err
    assert "the data files it links to are missing: tiny_data_000001.h5" in err
    assert "damaged" not in err and "Traceback" not in err


@pytest.mark.dials
def test_inputs_too_many_to_count_quickly_start_without_a_total(tmp_path, monkeypatch, caplog,
                                                                dials_env):
    # a serial run of thousands of files that may hold several images (NeXus): counting them
    # for the progress total opens each through dxtbx, so past its time the run starts without
    # a total; files of one image each (CBF) are counted by name, none opened (opening a CSPAD
    # CBF took 0.4-1 s, so a run of more than a few lost its total: a user trial)
    from peaknet_test_support import tiny_nxmx

    from peaknet_xtal import progress
    from peaknet_xtal.cli import peaknet2cxi

    stack = np.random.default_rng(0).poisson(3, (1, 40, 48)).astype(np.uint16)
    files = [tiny_nxmx(tmp_path / f"shot_{i}", stack, still=True) for i in range(1, 5)]
    inputs = [{"path": str(path), "events": None} for path in files]
    opened: list[str] = []
    real_open = peaknet2cxi.open_input

    def counting_open(path, geometry=None, options=None):
        opened.append(path)
        return real_open(path, geometry, options)

    monkeypatch.setattr(peaknet2cxi, "open_input", counting_open)
    monkeypatch.setattr(progress, "COUNT_SECONDS", 120.0)  # dxtbx's first import, on a busy CPU
    assert peaknet2cxi._count_frames(inputs, None) == 4  # within COUNT_SECONDS: all counted
    opened.clear()
    monkeypatch.setattr(progress, "COUNT_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="peaknet_xtal.progress"):
        assert peaknet2cxi._count_frames(inputs, None) is None
    assert opened == [str(files[0])]  # the other three are left to the run itself
    assert "counting the frames of 4 inputs" in caplog.text
    opened.clear()
    monkeypatch.setattr(progress, "COUNT_SECONDS", 120.0)
    cbfs = [tiny_cbf(tmp_path / f"shot_{i:04d}.cbf", 100.0) for i in range(1, 5)]
    assert peaknet2cxi._count_frames([{"path": str(p), "events": None} for p in cbfs],
                                     None) == 4
    assert opened == []


def test_unusable_pixels_and_frames_without_data_are_counted_where_the_warnings_say(
        tmp_path, make_geometry_text, capsys, caplog):
    """The warnings about unusable pixels stop after MAX_WARNINGS frames and point to the run
    summary, which did not hold the counts (a 20-frame run with a NaN module: ten warnings,
    then nothing); a frame of zeros was written with no word, and a module of zeros had its
    pixels stored as good.  Now the summary line and peaknet2cxi.json count them by kind, the
    zero frame is warned about, named, and written without peaks, and the zero module is
    masked in the stored mask, named by its panel."""
    from peaknet_test_support import spot_panel

    from peaknet_xtal.finding.sanitise import MAX_WARNINGS

    n_nan = MAX_WARNINGS + 2
    frames = [np.concatenate([spot_panel(4, seed=i), spot_panel(3, seed=50 + i)])
              for i in range(n_nan + 3)]
    for frame in frames[:n_nan]:
        frame[96:] = np.nan  # module "b" lost
    frames[n_nan][:] = 0.0  # a failed read-out between good frames
    frames[n_nan + 1][96:] = 0.0  # module "b" dropped
    stack = tmp_path / "run.cxi"
    with h5py.File(stack, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=np.stack(frames))
    geom = tmp_path / "two.geom"
    geom.write_text(make_geometry_text(["a", "b"], 96, 96, [(-48.0, -96.0), (-48.0, 0.0)],
                                       adu_per_photon="1"))
    outdir = tmp_path / "out"
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="peaknet_xtal.finding.sanitise"):
        assert main([str(stack), "-g", str(geom), "-o", str(outdir), "--no-progress",
                     "--threads", "1", "--min-peaks", "1"]) == 0
    said = [r.getMessage() for r in caplog.records]
    out = capsys.readouterr().out
    assert f"{stack} //0: masked 9216 non-finite and 0 absurd" in said[0] and "(in b)" in said[0]
    assert f"{stack} //{n_nan}: every pixel holds the same value (0): no data" in "\n".join(said)
    assert ("further frames with unusable pixels are counted, not reported one by one (see "
            "the run summary and peaknet2cxi.json)") in said
    assert (f"this run: {n_nan + 2} frame(s) had unusable pixels or no data: 1 without data "
            "(every pixel one value); " f"{n_nan * 9216} non-finite pixels masked; 1 panel(s) "
            "masked as every valid pixel held one value (9216 pixels)") in out
    tally = json.loads((outdir / "peaknet2cxi.json").read_text())["this_run"]["unusable_pixels"]
    assert tally["frames"] == n_nan + 2 and tally["nonfinite_pixels"] == n_nan * 9216
    assert (tally["frames_without_data"], tally["one_value_panels"]) == (1, 1)
    (cxi,) = outdir.glob("peaks-*.cxi")
    table = read_cxi_peaks(cxi)
    assert len(table) == n_nan + 3 and table.n_peaks[n_nan] == 0  # the dead frame is kept
    assert np.all(table.raw(n_nan + 1)["peakYPosRaw"] < 96)  # none on the zero module
    with h5py.File(cxi, "r") as h5:
        good = h5["/entry_1/data_1/mask"][()] == 1
    assert good[n_nan + 1, :96].all() and not good[n_nan + 1, 96:].any()
    assert not good[n_nan].any() and good[-1].all()


# ---- inputs a plugin source reads ------------------------------------------------------------

#: A plugin with three sources of what no built-in reads: an HDF5 file of its own layout, a
#: folder, and a name that is no file (frames over a network, of unknown length, that takes a
#: ``detector`` option); ``OPENED`` keeps what each was opened with.
_ELSEWHERE = """
    import os

    import numpy as np
    from peaknet_test_support import is_packed
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl
    from peaknet_xtal.types import Frame

    OPENED = []

    class Source:
        def __init__(self, name, path, n, **options):
            self.name, self.path, self.n = name, path, n
            OPENED.append((name, path, options))

        def __len__(self):
            return self.n

        def __iter__(self):
            rng = np.random.default_rng(self.n)
            for i in range(self.n):
                yield Frame(panels=[rng.poisson(5, (32, 32)).astype(np.float32)],
                            source=self.path, event=f"//{i}", serial=i)

        def close(self):
            pass

    class Live(Source):
        def __len__(self):
            raise TypeError("a live stream has no length before it is read")

    @hookimpl
    def peaknet_source_types():
        return [
            SourceType("packed", "HDF5 of another layout", is_packed,
                       lambda p, **o: Source("packed", p, 2, **o)),
            SourceType("folder", "a folder of frames",
                       lambda p: os.path.isfile(os.path.join(p, "frames.bin")),
                       lambda p, **o: Source("folder", p, 1, **o)),
            SourceType("net", "frames over the network", lambda p: p.startswith("net://"),
                       lambda p, **o: Live("net", p, 3, **o), options=("detector",)),
        ]
"""


def test_inputs_no_built_in_reads_go_to_the_plugin_source_claiming_them(install_plugin,
                                                                        tmp_path, capsys):
    """The README's rule (a plugin source's sniff is asked about the inputs no built-in reads)
    did not hold in peaknet2cxi: every HDF5 file went to the built-in readers ("no image dataset
    found"), a folder was refused as one, and a name that is no file was "input file not found"
    (zmq://host:5555 mangled to zmq:/host:5555).  Now each goes to the plugin claiming it, named
    as typed, with the --source-option its type declares (recorded with the run)."""
    install_plugin("elsewhere", _ELSEWHERE)
    packed = tmp_path / "run.h5"
    write_packed(packed)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frames.bin").write_bytes(b"")
    outdir = tmp_path / "out"
    code = main([str(packed), str(folder), "net://host:5555", "-o", str(outdir), "--no-progress",
                 "--min-peaks", "0", "--source-option", "detector=d1"])
    err = capsys.readouterr().err
    assert code == 0, err
    opened = sys.modules["elsewhere_peaknet"].OPENED
    assert {(name, path) for name, path, _ in opened} == {
        ("packed", str(packed)), ("folder", str(folder)), ("net", "net://host:5555")}
    assert all(options == ({"detector": "d1"} if name == "net" else {})
               for name, _, options in opened)
    keys = set(read_cxi_peaks(outdir / "peaks-00000.cxi").keys)
    assert keys == ({(str(packed), f"//{i}") for i in range(2)} | {(str(folder), "//0")}
                    | {("net://host:5555", f"//{i}") for i in range(3)})
    record = json.loads((outdir / "peaknet2cxi.config.json").read_text())
    assert record["config"]["source_options"] == {"detector": "d1"}


def test_list_file_entries_go_to_plugin_sources_as_direct_arguments_do(install_plugin,
                                                                       tmp_path, capsys):
    """A plugin author's trial: names a plugin source reads (a folder, a name that is not a
    file) were read when given on the command line, but refused as "listed file ... not found"
    (or "is a folder") when the same names were lines of a list file, as CrystFEL users pass
    their inputs.  Listed, they are the same inputs (one resolution for both), events and
    --source-option included."""
    from peaknet_xtal.cli.peaknet2cxi import expand_inputs

    install_plugin("elsewhere", _ELSEWHERE)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frames.bin").write_bytes(b"")
    listing = tmp_path / "lists" / "inputs.lst"
    listing.parent.mkdir()
    listing.write_text("../frames\nnet://host:5555 //1\nnet://host:5555 //2\n")
    direct = expand_inputs([str(folder), "net://host:5555"])
    listed = expand_inputs([str(listing)])
    assert [e["path"] for e in listed] == [e["path"] for e in direct] == [str(folder),
                                                                           "net://host:5555"]
    assert [e["events"] for e in listed] == [None, {"//1", "//2"}]
    outdir = tmp_path / "out"
    code = main(["-i", str(listing), "-o", str(outdir), "--no-progress", "--min-peaks", "0",
                 "--source-option", "detector=d1"])
    assert code == 0, capsys.readouterr().err
    opened = sys.modules["elsewhere_peaknet"].OPENED
    assert {(name, path) for name, path, _ in opened} == {("folder", str(folder)),
                                                          ("net", "net://host:5555")}
    assert all(options == ({"detector": "d1"} if name == "net" else {})
               for name, _, options in opened)
    keys = set(read_cxi_peaks(outdir / "peaks-00000.cxi").keys)
    assert keys == {(str(folder), "//0"), ("net://host:5555", "//1"), ("net://host:5555", "//2")}
    listing.write_text("net://host:5555\nother://host\n")  # one no plugin claims: list and line
    with pytest.raises(FormatError, match="listed file 'other://host' not found") as said:
        expand_inputs([str(listing)])
    assert said.value.path == str(listing) and said.value.line == 2


def test_a_source_option_no_source_type_declares_is_refused(install_plugin, tmp_path, capsys):
    """An option must reach a source that takes it: a misspelt key is a usage error before
    anything is written, from the command line and from Python alike."""
    from peaknet_xtal.cli.peaknet2cxi import DEFAULTS, command_line

    install_plugin("elsewhere", _ELSEWHERE)
    for option, said in (("detectr=d1", "--source-option detectr: no registered source type "
                                        "takes it (source options: net: detector"),
                         ("detector", "argument --source-option: 'detector' is not KEY=VALUE")):
        with pytest.raises(SystemExit) as stopped:
            main(["net://host:5555", "-o", str(tmp_path / "out"), "--source-option", option])
        assert stopped.value.code == 2
        assert said in capsys.readouterr().err
    with pytest.raises(PeakNetError, match="--source-option detectr: no registered source"):
        run({"inputs": ["net://host:5555"], "output": str(tmp_path / "out"),
             "source_options": {"detectr": "d1"}})
    assert not (tmp_path / "out").exists()
    # a Python caller's run is recorded as the command line that does the same
    assert "--source-option detector=d1" in command_line(
        {**DEFAULTS, "inputs": ["net://host:5555"], "source_options": {"detector": "d1"}})


def test_an_input_no_source_claims_names_the_plugins_that_failed_to_load(install_plugin,
                                                                         tmp_path, capsys):
    """With a plugin broken on import, an input only it might have read was said to be no
    CXI/HDF5 file and no image (only the load warning named the plugin); the README promises an
    error that names it again."""
    install_plugin("broken", "import a_module_not_installed\n")
    npy = tmp_path / "frames.npy"
    np.save(npy, np.zeros((2, 8, 8), np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = ((npy, "not a CXI/HDF5 file and not an image DIALS can read"),
             (empty, "a folder, not an input file"),
             (tmp_path / "absent.npy", "input file not found"))
    for k, (given, said) in enumerate(cases):
        code = main([str(given), "-o", str(tmp_path / f"out{k}"), "--no-progress"])
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("peaknet2cxi: error:")]
        assert code == 1 and len(errors) == 1, errors
        assert said in errors[0], errors[0]
        assert ("; not loaded: plugin 'broken' (entry point broken = broken_peaknet of "
                "broken-dist 0.1) failed to load (ModuleNotFoundError") in errors[0], errors[0]


@pytest.mark.parametrize("returns, said", [
    ('"npy"', "peaknet_source_types must return a list of source types"),
    ('[SourceType("cxi", "mine", lambda p: False, lambda p, **_: None)]',
     "two source types are registered as 'cxi'"),
])
def test_a_broken_source_hook_is_said_as_itself(install_plugin, tmp_path, capsys, returns,
                                                said):
    """The registry's PluginError is a ValueError, which peaknet2cxi took for "no source claims
    this input": a plugin's broken hook was said as "not a CXI/HDF5 file"."""
    install_plugin("badhook", f"""
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_source_types():
            return {returns}
    """)
    npy = tmp_path / "frames.npy"
    np.save(npy, np.zeros((2, 8, 8), np.float32))
    code = main([str(npy), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "plugin 'badhook' (entry point badhook" in err and said in err, err
    assert "not a CXI/HDF5 file" not in err


def test_a_plugin_source_yielding_arrays_is_one_error_naming_it(install_plugin, tmp_path, capsys):
    install_plugin("arrays", """
        import numpy as np
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl

        class Arrays:
            name = "arrays"

            def __len__(self):
                return 1

            def __iter__(self):
                yield np.zeros((8, 8), np.float32)

            def close(self):
                pass

        @hookimpl
        def peaknet_source_types():
            return [SourceType("arrays", "arrays, not frames", lambda p: p.endswith(".arr"),
                               lambda p, **_: Arrays())]
    """)
    given = tmp_path / "x.arr"
    given.write_text("")
    code = main([str(given), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peaknet2cxi: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert ("plugin 'arrays' (entry point arrays = arrays_peaknet of arrays-dist 0.1): source "
            f"type 'arrays' yielded a numpy.ndarray of shape (8, 8) float32 for {given}, not a "
            "peaknet_xtal.types.Frame") in errors[0], errors[0]


def test_dials_output_without_dials_is_refused_before_any_frame(tmp_path, monkeypatch, capsys,
                                                                make_geometry_text):
    """In a Python without DIALS (pip alone), --dials found every frame, wrote the CXI files,
    then stopped with a traceback (No module named 'dials') and no peaknet2cxi.json.  It is
    now one line before anything is written, naming --dials and what to do, exit 2 (a usage
    error); Python callers get the error from run()."""
    from peaknet_test_support import hide_dials

    stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
    hide_dials(monkeypatch)
    outdir = tmp_path / "out"
    code = main([str(stack), "-g", str(geom), "-o", str(outdir), "--dials", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("peaknet2cxi: error: --dials needs DIALS, which this Python cannot "
                          "import (No module named 'dials')")
    assert err.rstrip().endswith("or run without --dials (the CXI files for indexamajig need "
                                 "no DIALS); nothing was written")
    assert not outdir.exists()
    from peaknet_xtal.errors import DialsUnavailable

    with pytest.raises(DialsUnavailable, match="--dials needs DIALS"):
        run({"inputs": [str(stack)], "geometry": str(geom), "output": str(outdir),
             "predictor": _blank_predictor, "progress": False, "dials": True})
    assert not outdir.exists()


@pytest.mark.dials
@pytest.mark.parametrize("what", ["--dials", "cbf"])
def test_a_dials_that_fails_to_load_is_refused_before_any_frame(what, tmp_path, monkeypatch,
                                                                capsys, make_geometry_text):
    """A user trial: a DIALS that is there but fails to load (a compiled extension that does
    not) passed the check before the run, which only looked for its packages, and --dials
    stopped the run at the export, after every frame had been found.  The modules it needs are
    now imported at the start, in a child process: one line naming what failed to import and
    that nothing was written; no output folder.  So for a CBF input (read through dxtbx),
    which imported DIALS where the run reached it."""
    from peaknet_test_support import break_dials

    if what == "--dials":
        stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
        args, code, module = [str(stack), "-g", str(geom), "--dials"], 2, "dials.array_family.flex"
        broken = break_dials(monkeypatch, tmp_path / "broken")
        needs = "--dials"
    else:
        cbf = tmp_path / "thau_3_2_0001.cbf"
        cbf.write_bytes(b"###CBF: VERSION 1.5\n")  # never opened: DIALS is asked for first
        args, code, module = [str(cbf)], 1, "dxtbx.model.experiment_list"
        broken = break_dials(monkeypatch, tmp_path / "broken", "dxtbx_model_ext")
        needs = f"reading {cbf} through dxtbx"
    outdir = tmp_path / "out"
    assert main([*args, "-o", str(outdir), "--no-progress"]) == code
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.startswith(f"peaknet2cxi: error: {needs} needs DIALS, which is installed but "
                           f"fails to load in this Python (importing {module}: ImportError: "
                           f"{broken})"), err
    assert line.endswith("; nothing was written") and "Traceback" not in err
    assert not outdir.exists()


@pytest.mark.dials  # the check at the start imports the real DIALS, in a child
def test_a_dials_that_fails_to_load_at_the_export_keeps_the_frames_and_the_summary(
        tmp_path, monkeypatch, make_geometry_text):
    """A DIALS that loads in the check at the start (a child process) but fails where the
    export imports it in this process (here: hidden from this process alone): said with its
    own error, the CXI files and peaknet2cxi.json (status failed) kept; no rerun advice (the
    same command fails the same way until DIALS loads)."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.cli.peaknet2cxi import rerun_can_help

    stack, geom = _small_run_inputs(tmp_path, make_geometry_text)
    hide_dials(monkeypatch, broken=FileNotFoundError(2, "No such file or directory",
                                                      "/venv/lib/cctbx/python3.11"))
    outdir = tmp_path / "out"
    with pytest.raises(ImportError) as info:  # DialsUnavailable is one
        run({"inputs": [str(stack)], "geometry": str(geom), "output": str(outdir),
             "predictor": _blank_predictor, "progress": False, "dials": True,
             "min_peaks": 0})
    assert str(info.value).startswith("--dials needs DIALS, which is installed but fails to "
                                      "load in this Python (importing dials.array_family.flex: "
                                      "FileNotFoundError: ")
    summary = json.loads((outdir / "peaknet2cxi.json").read_text())
    assert summary["status"] == f"failed: {info.value}" and summary["frames"] == 3
    assert [Path(p).name for p in summary["cxi_files"]] == ["peaks-00000.cxi"]
    assert not rerun_can_help(info.value)  # its cause is an OSError, but no rerun helps


def test_an_image_read_through_dxtbx_without_dials_is_one_line_naming_it(tmp_path, monkeypatch,
                                                                         capsys):
    """A CBF file (any input read through dxtbx) in a Python without DIALS: one line naming
    the file and what to do, the exit status of an unreadable input (a traceback ending in
    No module named 'dxtbx' before)."""
    from peaknet_test_support import hide_dials

    cbf = tmp_path / "thau_3_2_0001.cbf"
    cbf.write_bytes(b"###CBF: VERSION 1.5\n")  # never opened: DIALS is asked for first
    hide_dials(monkeypatch)
    code = main([str(cbf), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line == (f"peaknet2cxi: error: reading {cbf} through dxtbx needs DIALS, which this "
                    "Python cannot import (No module named 'dxtbx'): install Debian's dials "
                    "package or a conda DIALS and run from that environment (README, Quick "
                    "start); nothing was written")
    assert "Traceback" not in err and "re-run" not in err
    assert not (tmp_path / "out").exists()  # asked before the output folder is made


def test_an_hdf5_file_without_a_geometry_and_without_dials_asks_for_one(tmp_path, monkeypatch,
                                                                        capsys):
    """Without -g an HDF5 file is offered to DIALS first (a NeXus file's own geometry): a
    Python without it cannot know what DIALS would have read, so the file is refused, naming
    -g, rather than read one panel a frame (a traceback before)."""
    from peaknet_test_support import hide_dials

    stack = tiny_stack(tmp_path / "plain.h5")
    hide_dials(monkeypatch)
    code = main([str(stack), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert (f"peaknet2cxi: error: reading {stack} without -g (DIALS reads the geometry of a "
            "NeXus file) needs DIALS, which this Python cannot import (No module named "
            "'dxtbx')") in err
    assert err.rstrip().endswith("or give the detector's CrystFEL geometry with -g"), err


def _spot_run(tmp_path: Path, make_geometry_text, frames: int = 5) -> tuple[Path, Path]:
    """A stack of ``frames`` 32 x 32 frames, frame k holding k bright 3 x 3 spots, so that its
    peaks per frame in run order are known (0, 1, 2, ...), and a one-panel geometry for it.
    No two spots share a place (a pixel bright in most frames is a defect the run masks)."""
    data = np.random.default_rng(1).poisson(5, (frames, 32, 32)).astype(np.float32)
    places = iter([(ss, fs) for ss in range(3, 30, 6) for fs in range(3, 30, 6)])
    offsets = np.arange(-1, 2)
    bump = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 2)  # a round spot
    for k in range(frames):
        for _, (ss, fs) in zip(range(k), places, strict=False):  # 25 places, 6 px apart
            data[k, ss - 1:ss + 2, fs - 1:fs + 2] += 400.0 * bump
    stack = tmp_path / "spots.h5"
    with h5py.File(stack, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    geom = tmp_path / "det.geom"
    geom.write_text(make_geometry_text(["p0"], 32, 32, [(-16, -16)], clen="0.1 m",
                                       adu_per_photon="1"))
    return stack, geom


def _bright_predictor(panels, masks):
    """Probability 1 on the planted spots' pixels (far above the background), 0 elsewhere."""
    return [(np.asarray(p) > 100).astype(np.float32) for p in panels]


def _find_bright_spots(monkeypatch) -> None:
    """:func:`main` finds peaks with :func:`_bright_predictor` (a Python caller's option)."""
    import peaknet_xtal.cli.peaknet2cxi as command

    real = command.run
    monkeypatch.setattr(command, "run", lambda config, **options: real(
        {**config, "predictor": _bright_predictor}, **options))


def _record_plotted(monkeypatch) -> list[dict]:
    """What each peaks-per-frame plot of the test is drawn from (the real figure is drawn)."""
    import peaknet_xtal.run_plots as run_plots

    drawn: list[dict] = []
    real = run_plots.peaks_figure

    def recording(counts, hits, min_peaks, **options):
        drawn.append({"counts": np.asarray(counts).tolist(),
                      "hits": np.asarray(hits).tolist(), "min_peaks": min_peaks, **options})
        return real(counts, hits, min_peaks, **options)

    monkeypatch.setattr(run_plots, "peaks_figure", recording)
    return drawn


def test_a_resumed_run_plots_peaks_per_frame_of_every_frame_in_the_folder(
        tmp_path, make_geometry_text, monkeypatch):
    """OUTDIR/peaknet2cxi.png (a PNG, named in the summary) is drawn from every frame the
    folder's CXI files hold, in the order written: after an interruption, the rerun's plot
    covers the frames the first run found as well as its own."""
    import matplotlib.image

    from peaknet_xtal.cli.peaknet2cxi import peak_counts

    stack, geom = _spot_run(tmp_path, make_geometry_text)
    outdir = tmp_path / "out"
    config = {"inputs": [str(stack)], "geometry": str(geom), "output": str(outdir),
              "predictor": _bright_predictor, "progress": False, "min_peaks": 2,
              "frames_per_file": 2}
    drawn = _record_plotted(monkeypatch)
    first = run(config)
    plot = outdir / "peaknet2cxi.png"
    assert first["plot"] == str(plot)
    height, width, _ = matplotlib.image.imread(plot).shape
    assert width > height > 100
    Path(first["cxi_files"][-1]).unlink()  # interrupted before its last file
    plot.unlink()
    second = run(config)
    assert (second["this_run"]["frames"], second["this_run"]["skipped"]) == (1, 4)
    counts, hits = peak_counts([Path(p) for p in second["cxi_files"]])
    assert counts.tolist() == [0, 1, 2, 3, 4]
    assert hits.tolist() == [False, False, True, True, True]
    assert drawn[-1]["counts"] == counts.tolist() and drawn[-1]["hits"] == hits.tolist()
    assert (drawn[-1]["min_peaks"], drawn[-1]["left_out"]) == (2, 0)
    assert plot.is_file() and second["plot"] == str(plot)


def test_the_summary_lines_and_the_help_name_the_plot(tmp_path, capsys, monkeypatch,
                                                      make_geometry_text):
    _find_bright_spots(monkeypatch)
    stack, geom = _spot_run(tmp_path, make_geometry_text, frames=3)
    outdir = tmp_path / "out"
    assert main([str(stack), "-g", str(geom), "-o", str(outdir), "--no-progress"]) == 0
    assert (f"peaknet2cxi: peaks per frame and hit rate over the run: "
            f"{outdir / 'peaknet2cxi.png'}") in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "peaknet2cxi.png     peaks per frame" in capsys.readouterr().out


def test_a_plot_that_cannot_be_written_leaves_the_run_as_it_was(tmp_path, capsys, monkeypatch,
                                                                make_geometry_text, caplog):
    """savefig failing (a full disk, say): one warning naming the plot; exit status, summary
    (but for its plot: none), CXI files and list as a run that drew it; nothing half-written."""
    from matplotlib.figure import Figure

    _find_bright_spots(monkeypatch)
    stack, geom = _spot_run(tmp_path, make_geometry_text, frames=3)
    drew, failed = tmp_path / "drew", tmp_path / "failed"
    assert main([str(stack), "-g", str(geom), "-o", str(drew), "--no-progress"]) == 0

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", refuse)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main([str(stack), "-g", str(geom), "-o", str(failed), "--no-progress"]) == 0
    warned = [r.getMessage() for r in caplog.records  # the gain's warning is the run's own
              if r.levelname == "WARNING" and "detector gain" not in r.getMessage()]
    assert len(warned) == 1 and str(failed / "peaknet2cxi.png") in warned[0], warned
    assert "No space left" in warned[0]
    assert "peaks per frame and hit rate" not in capsys.readouterr().out
    assert sorted(p.name for p in failed.iterdir()) == sorted(
        p.name for p in drew.iterdir() if p.name != "peaknet2cxi.png")
    kept, made = (json.loads((d / "peaknet2cxi.json").read_text()) for d in (drew, failed))
    assert made["plot"] is None and kept["plot"] == str(drew / "peaknet2cxi.png")
    for key in ("status", "frames", "hits", "hit_rate", "peaks_per_frame", "left_out"):
        assert made[key] == kept[key], key
    assert [Path(p).name for p in made["cxi_files"]] == [Path(p).name for p in kept["cxi_files"]]


@pytest.mark.parametrize("hits_only", [False, True], ids=["all", "hits-only"])
def test_a_ray_run_ends_with_the_same_plot(tmp_path, monkeypatch, make_geometry_text,
                                           hits_only):
    """--workers runs finish where the single-process run does: the same plot, of every frame
    in the folder (the pipeline stands in; its writer is the real CXI writer); with
    --hits-only the frames left out are counted beside the hits drawn."""
    import peaknet_xtal.pipeline as pipeline_module
    from peaknet_xtal.formats.cxi import CXIWriter, iter_cxi_frames
    from peaknet_xtal.types import FrameResult, empty_peaks

    stack, geom = _spot_run(tmp_path, make_geometry_text, frames=4)
    geometry = read_geometry(geom)

    def fake_run_pipeline(config):
        options = dict(config["writer_options"])
        with CXIWriter(config["output"], options.pop("geometry"), **options) as writer:
            for k, frame in enumerate(iter_cxi_frames(stack, geometry)):
                writer.write(FrameResult(frame=frame, peaks=empty_peaks(3 * k), hit=k >= 2))
        return {"backend": "test", "engine": {}}

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    drawn = _record_plotted(monkeypatch)
    outdir = tmp_path / "o"
    summary = run({"inputs": [str(stack)], "geometry": str(geom), "output": str(outdir),
                   "workers": 2, "hits_only": hits_only, "min_peaks": 5, "progress": False})
    assert summary["plot"] == str(outdir / "peaknet2cxi.png") and Path(summary["plot"]).is_file()
    (plotted,) = drawn
    assert plotted["counts"] == ([6, 9] if hits_only else [0, 3, 6, 9])
    assert plotted["left_out"] == (2 if hits_only else 0) and plotted["min_peaks"] == 5
