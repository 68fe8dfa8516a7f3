"""peaknet-show on real files: through main() and as the installed console script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.show import main
from peaknet_xtal.formats.cxi import write_cxi
from peaknet_xtal.formats.geometry import parse_geometry
from peaknet_xtal.types import Frame, FrameResult, peaks_from_columns

STREAMS = "crystfel_streams"


def run_json(capsys, *args: str) -> list[dict]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_streams_and_geometry(real_data, capsys):
    paths = sorted(str(p) for p in (real_data / STREAMS).glob("*.stream"))
    geom = str(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    five_ht, lysozyme, geometry = run_json(capsys, *paths, geom)
    assert (five_ht["chunks"], five_ht["crystals"], lysozyme["chunks"]) == (70, 32, 3)
    assert five_ht["geometry_panels"] == 64 and lysozyme["crystals"] == 3
    # the per-frame spread is consistent with the total
    spread = five_ht["peaks_per_frame"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert spread["min"] * 70 <= five_ht["peaks"] <= spread["max"] * 70
    assert geometry["panels"] == 64 and geometry["slab_shape"] == [1480, 1552]
    assert main([geom]) == 0
    text = capsys.readouterr().out
    assert "(geometry)" in text and "slab shape: 1480 x 1552" in text


def test_a_gzip_compressed_stream_is_shown_as_the_stream(real_data, tmp_path, capsys):
    """The stream reader takes .stream.gz as it is; show recognises it, by name or by content."""
    import gzip
    import shutil

    plain = sorted((real_data / STREAMS).glob("*.stream"))[-1]
    for name in ("copy.stream.gz", "no_suffix"):
        packed = tmp_path / name
        with open(plain, "rb") as source, gzip.open(packed, "wb") as target:
            shutil.copyfileobj(source, target)
        (shown,) = run_json(capsys, str(packed))
        (expected,) = run_json(capsys, str(plain))
        assert {k: v for k, v in shown.items() if k != "path"} == {
            k: v for k, v in expected.items() if k != "path"}


def test_cxi_with_peak_table(tmp_path, capsys, make_geometry_text):
    # one 20x10 panel centred on the beam
    geometry = parse_geometry(make_geometry_text(["p"], 20, 10, [(-10, -5)], data=None,
                                                 dims=False))
    data = np.arange(4 * 10 * 20, dtype=np.float32).reshape(4, 10, 20) - 7
    src = tmp_path / "raw.h5"
    with h5py.File(src, "w") as h5:
        h5["/data/data"] = data
    results = [FrameResult(Frame(panels=[data[i]], source=str(src), event=f"//{i}",
                                 meta={"h5_file": str(src), "h5_dataset": "/data/data",
                                       "h5_index": i}),
                           peaks_from_columns(panel=np.zeros(i), fs=np.arange(i),
                                              ss=np.arange(i)))
               for i in range(4)]
    out = tmp_path / "peaks.cxi"
    write_cxi(out, results, geometry)
    raw, linked = run_json(capsys, str(src), str(out), "--max-frames", "2")
    assert raw["frames"] == 4 and raw["image_shape"] == [10, 20] and raw["peak_table"] is None
    assert raw["value_range"] == [-7.0, float(data[1].max())] and raw["value_range_frames"] == 2
    assert linked["virtual"] and linked["frames"] == 4
    table = linked["peak_table"]
    assert table["peaks"] == 0 + 1 + 2 + 3 and table["peaks_per_frame"]["max"] == 3
    assert table["max_peaks"] == 2048



def test_a_file_of_one_group_per_event_is_shown_through_its_geometry(tmp_path, capsys,
                                                                     make_geometry_text):
    """``data = /%/data``: peaknet-show counts the events of every group and names the first
    and last as CrystFEL does (it looked the pattern up as a dataset and failed)."""
    geom = tmp_path / "events.geom"
    geom.write_text(make_geometry_text(["p"], 20, 10, [(-10, -5)], data="/%/data", dims=False))
    src = tmp_path / "events.h5"
    with h5py.File(src, "w") as h5:
        for tag in (31, 30, 32):
            h5[f"/tag_{tag}/data"] = np.full((10, 20), tag, np.float32)
    (shown,) = run_json(capsys, str(src), "-g", str(geom))
    assert shown["frames"] == 3 and shown["dataset"] == "/%/data"
    assert shown["first_and_last_event"] == ["tag_30//", "tag_32//"]
    assert shown["value_range"] == [30.0, 32.0] and not shown["virtual"]


def test_frames_and_panels_without_data_are_counted_their_one_value_shown(tmp_path, capsys,
                                                                          make_geometry_text):
    """A frame of zeros (a failed read-out) and a module of zeros are no data to the finder;
    peaknet-show counts them and still shows the value they hold in the range."""
    geom = tmp_path / "two.geom"
    geom.write_text(make_geometry_text(["a", "b"], 20, 10, [(-10, -10), (-10, 0)]))
    data = np.random.default_rng(0).normal(5.0, 1.0, (3, 20, 20)).astype(np.float32)
    data[1] = 0.0
    data[2, 10:] = -3.0
    src = tmp_path / "run.cxi"
    with h5py.File(src, "w") as h5:
        h5["/entry_1/data_1/data"] = data
    (shown,) = run_json(capsys, str(src), "-g", str(geom))
    assert (shown["frames_without_data"], shown["one_value_pixels"]) == (1, 400 + 200)
    assert shown["value_range"] == [-3.0, float(max(data[0].max(), data[2, :10].max()))]

@pytest.mark.dials
def test_dials_image_and_tables(real_data, dials_env, capsys):
    image = real_data / "synchrotron_single_images" / "DLS_I23_P12M_thau_00001.cbf.gz"
    stills = real_data / "dials_stills_results_cxi78513"
    shown, expt, refl = run_json(capsys, str(image), str(stills / "stills.expt"),
                                 str(stills / "stills.refl"))
    assert shown["panels"] == 24 and shown["panel_shapes"] == [[195, 2463]]
    assert shown["value_range"][0] >= 0 and shown["value_range"][1] > 100
    assert shown["wavelength_A"] == pytest.approx(2.7552)
    assert expt["experiments"] == 3 and expt["panels"] == [64, 64, 64]
    assert refl["rows"] == 502


@pytest.mark.dials
def test_an_imported_expt_is_shown_and_so_are_the_files_after_it(tmp_path, real_data,
                                                                  dials_env, capsys):
    """The user trial: `peaknet-show imported.expt` (dials.import, no crystal models) was an
    AttributeError traceback, and the files after it were not shown."""
    image = real_data / "cspad_thermolysin_stills" / "idx-20130301060858401.cbf"
    exe = Path(sys.executable).parent / "dials.import"
    done = subprocess.run([str(exe if exe.exists() else shutil.which("dials.import")),
                           str(image)], cwd=tmp_path, env=dials_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stream = real_data / STREAMS / "rs_palxfel_lysozyme_rayonix_xgandalf.stream"
    assert main([str(tmp_path / "imported.expt"), str(stream)]) == 0
    out = capsys.readouterr().out
    assert "imported.expt (dials-experiments)" in out and "status: not indexed" in out
    assert "images: 1" in out and "panels: 64" in out and "wavelength A: 1.27" in out
    assert "chunks: 3" in out  # the file after it


def test_a_file_a_summariser_fails_on_does_not_stop_the_others(tmp_path, real_data, capsys,
                                                               monkeypatch):
    """Whatever a summariser raises, its file is one line on stderr and the rest are shown."""
    from peaknet_xtal.cli import show

    geom = tmp_path / "some.geom"
    geom.write_text("x")

    def broken(path, **_):
        raise AttributeError("'NoneType' object has no attribute 'get_unit_cell'")

    monkeypatch.setattr(show, "show_geometry", broken)
    stream = real_data / STREAMS / "rs_palxfel_lysozyme_rayonix_xgandalf.stream"
    assert main([str(geom), str(stream)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"peaknet-show: {geom}: cannot read (AttributeError: "
                                    "'NoneType' object has no attribute 'get_unit_cell')")
    assert "chunks: 3" in captured.out


def test_dials_files_without_dials_are_one_line_each_and_the_rest_are_shown(
        tmp_path, monkeypatch, capsys, make_geometry_text):
    """A Python without DIALS: an image DIALS reads, an .expt and a .refl are each one line
    naming the file and what to do (before: 'cannot read (ModuleNotFoundError: No module
    named 'dxtbx')'); a geometry given after them is still shown, exit 1."""
    from peaknet_test_support import hide_dials

    cbf, expt, refl = tmp_path / "x_0001.cbf", tmp_path / "a.expt", tmp_path / "a.refl"
    cbf.write_bytes(b"###CBF: VERSION 1.5\n")
    expt.write_text("{}")
    refl.write_bytes(b"")
    geom = tmp_path / "one.geom"
    geom.write_text(make_geometry_text(["p"], 20, 10, [(-10, -5)]))
    hide_dials(monkeypatch)
    assert main([str(cbf), str(expt), str(refl), str(geom)]) == 1
    captured = capsys.readouterr()
    install = ("install Debian's dials package or a conda DIALS and run from that "
               "environment (README, Quick start)")
    assert captured.err.splitlines() == [
        f"peaknet-show: reading {cbf} through dxtbx needs DIALS, which this Python cannot "
        f"import (No module named 'dxtbx'): {install}",
        f"peaknet-show: reading {expt} (a DIALS experiment list) needs DIALS, which this "
        f"Python cannot import (No module named 'dxtbx'): {install}",
        f"peaknet-show: reading {refl} (a DIALS reflection table) needs DIALS, which this "
        f"Python cannot import (No module named 'dials'): {install}"]
    assert captured.out.startswith(f"{geom} (geometry)")


def test_a_label_file_is_shown(tmp_path, capsys):
    """The user trial: a stream2labels output said "no image dataset found"."""
    from peaknet_xtal.labelling.labels import LABEL_FIT_DTYPE, LabelRow, LabelWriter

    path = tmp_path / "labels.h5"
    with LabelWriter(path, (6, 8)) as out:
        for frame, (h, w, peaks) in enumerate([(6, 8, 3), (4, 5, 1), (6, 8, 2)]):
            label = np.zeros((h, w), np.uint8)
            label.flat[:peaks] = 1
            out.add(LabelRow(np.ones((h, w), np.float32), np.ones((h, w), bool), label,
                             {"source": "run.stream", "frame": frame // 2, "panel": frame}))
        fits = np.zeros(4, LABEL_FIT_DTYPE)
        fits["status"] = [0, 0, 0, 5]
        out.add_fits(fits)
        out.add_frames({"status": np.array(["labelled", "labelled", "not_selected"], object)})
    shown = run_json(capsys, str(path), "--max-frames", "2")[0]
    assert shown["kind"] == "labels" and shown["rows"] == 3 and shown["labelled_frames"] == 2
    assert shown["input_frames"] == 3
    assert shown["frame_status"] == {"labelled": 2, "not_selected": 1}
    assert shown["row_shape"] == [6, 8] and shown["panel_shapes"] == [[4, 5], [6, 8]]
    # the first two rows: 48 + 20 real pixels, 3 + 1 of them Bragg peak
    assert shown["label_classes"] == {"0 (background)": 64, "1 (Bragg peak)": 4}
    assert shown["label_rows_scanned"] == 2 and shown["label_pixels_per_row"]["max"] == 3
    assert shown["fits"] == 4 and shown["fit_status"] == {"ok": 3, "weak": 1}
    assert shown["sources"] == ["run.stream"]
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{path} (labels)" in text
    assert "label classes: 0 (background) 110, 1 (Bragg peak) 6" in text


def test_bad_and_unknown_files_fail_with_the_file_named(tmp_path, real_data, capsys):
    broken = tmp_path / "broken.stream"
    broken.write_text("CrystFEL stream format 2.3\nGenerated by CrystFEL 0.10.2\n"
                      "----- Begin chunk -----\nImage filename: x.h5\nnum_peaks = many\n")
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    good = real_data / STREAMS / "rs_palxfel_lysozyme_rayonix_xgandalf.stream"
    assert main([str(broken), str(unknown), str(good)]) == 1
    captured = capsys.readouterr()
    assert str(broken) in captured.err and str(unknown) in captured.err
    assert "unknown file type" in captured.err
    assert "chunks: 3" in captured.out  # the good file is still shown


def test_console_script(real_data):
    exe = Path(sys.executable).parent / "peaknet-show"
    script = str(exe) if exe.exists() else shutil.which("peaknet-show")
    assert script, "peaknet-show is not installed (pip install -e . declares it)"
    stream = real_data / STREAMS / "rs_palxfel_lysozyme_rayonix_xgandalf.stream"
    out = subprocess.run([script, str(stream), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["chunks"] == 3
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert "summarise the files of a serial-crystallography run" in helped.stdout


def test_config_file_wrong_type_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "show.yaml"
    cfg.write_text("max_frames: all\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["x.cxi", "--config", str(cfg)])
    assert exit_info.value.code == 2
    assert "show.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_frames_below_one_is_refused(real_data, value, capsys):
    """No frame scanned is no value range: a count below 1 is a mistake, not a request for 1."""
    geom = str(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    assert main([geom, "--max-frames", value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (f"peaknet-show: error: --max-frames must be at least 1 "
                                    f"(got {value})")


def test_a_folder_is_named_as_a_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"peaknet-show: {tmp_path}: is a folder; give the files in it")
    assert ".stream" in line and ".expt" in line
