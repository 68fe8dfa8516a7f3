"""The built-in writers end to end: a CXI stack in, peaks out, read back by the readers."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal import registry
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.cxi import read_cxi_frame, read_cxi_peaks
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.formats.stream import read_stream
from peaknet_xtal.types import FrameResult, peaks_from_columns


def _results(tmp_path: Path, make_geometry_text, files: int, frames: int,
             name: str = "raw") -> list[FrameResult]:
    """``files`` CXI files of ``frames`` frames each (two 16x8 panels, q1 flipped); frame i of a
    file gets i + 1 peaks on q1."""
    geom = tmp_path / "q.geom"
    geom.write_text(make_geometry_text(["q0", "q1"], 16, 8, [(-8, 1), (8, -1)], flipped={"q1"}))
    out = []
    for f in range(files):
        src = tmp_path / f"{name}{f}.cxi"
        with h5py.File(src, "w") as h5:
            h5["/entry_1/data_1/data"] = np.ones((frames, 16, 16), np.float32)
        for frame in registry.open_source(str(src), geometry=str(geom)):
            i = frame.serial
            peaks = peaks_from_columns(panel=[1] * (i + 1), fs=np.arange(i + 1) + 0.25,
                                       ss=np.full(i + 1, 2.0), intensity=np.full(i + 1, 40.0))
            peaks["one_over_d"] = frame.geometry.panel_to_one_over_d(peaks["panel"],
                                                                      peaks["fs"], peaks["ss"])
            out.append(FrameResult(frame=frame, peaks=peaks, hit=True))
    return out


@pytest.fixture()
def results(tmp_path: Path, make_geometry_text) -> list[FrameResult]:
    """Three frames of one file, with 1, 2 and 3 peaks on q1."""
    return _results(tmp_path, make_geometry_text, files=1, frames=3)


def test_stream_writer_output_reads_back_with_geometry(tmp_path, results):
    writer = registry.open_writer("stream", str(tmp_path / "out.stream"))
    for r in results:
        writer.write(r)
    writer.close()
    stream = read_stream(tmp_path / "out.stream")
    assert [c.key for c in stream.chunks] == [r.frame.key for r in results]
    assert stream.geometry is not None and stream.geometry.n_panels == 2
    for chunk, r in zip(stream.chunks, results, strict=False):
        back = chunk.peak_table(stream.geometry)
        np.testing.assert_allclose(back["fs"], r.peaks["fs"], atol=0.006)
        # 1/d goes out in nm^-1 with 2 decimals: +-0.005 nm^-1 = 0.0005 1/A
        np.testing.assert_allclose(back["one_over_d"], r.peaks["one_over_d"], atol=5.1e-4)
        assert list(back["panel"]) == [1] * len(r.peaks)


def test_stream_writer_resumes_after_a_torn_chunk(tmp_path, results):
    path = tmp_path / "torn.stream"
    writer = registry.open_writer("stream", str(path))
    for r in results[:2]:
        writer.write(r)
    writer.close()
    with open(path, "a") as handle:  # a crash in the middle of the third chunk
        handle.write("----- Begin chunk -----\nImage filename: x\nnum_pea")
    resumed = registry.open_writer("stream", str(path))
    assert resumed.done_keys() == {r.frame.key for r in results[:2]}
    resumed.write(results[2])
    resumed.close()
    assert len(read_stream(path).chunks) == 3


def test_stream_chunks_are_numbered_across_the_run_and_a_resumed_run_goes_on(
        tmp_path, make_geometry_text):
    """CrystFEL numbers images 1, 2, 3, ... over the whole run; a frame's own serial restarts in
    every input file (one-frame files: all 1).  A resumed run continues after what is there."""
    stills = _results(tmp_path, make_geometry_text, files=4, frames=1, name="still")
    stacks = _results(tmp_path, make_geometry_text, files=2, frames=2, name="stack")
    assert {r.stream_chunk().serial for r in stills} == {1}  # what each chunk arrives with
    path = tmp_path / "run.stream"
    writer = registry.open_writer("stream", str(path))
    for r in stills + stacks[:2]:
        writer.write(r)
    writer.close()
    assert [c.serial for c in read_stream(path).chunks] == [1, 2, 3, 4, 5, 6]
    with open(path, "a") as handle:  # interrupted inside the seventh chunk
        handle.write("----- Begin chunk -----\nImage filename: x\nImage serial number: 7\n")
    resumed = registry.open_writer("stream", str(path))
    assert resumed.done_keys() == {r.frame.key for r in stills + stacks[:2]}
    for r in stacks[2:]:
        resumed.write(r)
    resumed.close()
    stream = read_stream(path)
    assert [c.serial for c in stream.chunks] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [c.key for c in stream.chunks] == [r.frame.key for r in stills + stacks]


def test_stream_resumed_after_per_file_numbering_repeats_no_serial(tmp_path,
                                                                    make_geometry_text):
    """A stream of one-frame files that an older version numbered per file (1, 1) goes on at 3,
    past both its chunk count and its highest serial."""
    stills = _results(tmp_path, make_geometry_text, files=3, frames=1)
    path = tmp_path / "old.stream"
    writer = registry.open_writer("stream", str(path))
    for r in stills[:2]:
        writer.write(r)
    writer.close()
    path.write_text(path.read_text().replace("Image serial number: 2", "Image serial number: 1"))
    resumed = registry.open_writer("stream", str(path))
    resumed.write(stills[2])
    resumed.close()
    assert [c.serial for c in read_stream(path).chunks] == [1, 1, 3]


def test_stream_closed_without_frame_or_geometry_writes_nothing(tmp_path, caplog):
    """A header without the geometry block is a stream CrystFEL 0.10+ cannot open: none is left
    behind, and one line says why."""
    path = tmp_path / "none.stream"
    writer = registry.open_writer("stream", str(path))
    with caplog.at_level("WARNING", logger="peaknet_xtal.builtin.writers"):
        writer.close()
    assert not path.exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no stream written" in lines[0] and "no frame" in lines[0]
    assert str(path) in lines[0]


def test_stream_closed_without_frame_keeps_an_earlier_stream(tmp_path, results):
    path = tmp_path / "earlier.stream"
    writer = registry.open_writer("stream", str(path))
    writer.write(results[0])
    writer.close()
    before = path.read_bytes()
    registry.open_writer("stream", str(path)).close()  # a rerun with nothing new to add
    assert path.read_bytes() == before


def test_a_stream_path_that_cannot_take_a_stream_is_refused_before_anything_is_written(
        tmp_path, results):
    """A stream already there is continued; any other file named as the stream (a geometry,
    an input, given by mistake) grew by a chunk a frame, exit 0.  It, a folder, and a folder
    that does not exist are refused when the writer opens, naming the path."""
    from peaknet_xtal.errors import PeakNetError

    geometry = tmp_path / "q.geom"
    before = geometry.read_bytes()
    for path, words in ((geometry, "is not a CrystFEL stream"), (tmp_path, "a folder"),
                        (tmp_path / "nowhere" / "x.stream", "does not exist")):
        with pytest.raises(PeakNetError, match=words) as err:
            registry.open_writer("stream", str(path))
        assert str(path) in str(err.value)
    assert geometry.read_bytes() == before
    empty = tmp_path / "empty.stream"
    empty.touch()  # an empty file takes a new stream, as a missing one does
    writer = registry.open_writer("stream", str(empty))
    writer.write(results[0])
    writer.close()
    assert len(read_stream(empty).chunks) == 1


def test_stream_closed_without_frame_but_with_geometry_is_readable(tmp_path, results):
    path = tmp_path / "empty.stream"
    registry.open_writer("stream", str(path), geometry=results[0].frame.geometry).close()
    stream = read_stream(path)
    assert stream.chunks == [] and stream.geometry is not None


def test_stream_header_without_geometry_from_an_earlier_run_is_written_afresh(tmp_path, results):
    """An earlier run's header-only stream has no geometry block; the chunks of the next run
    would not make it readable, so it is replaced by a whole stream with the geometry."""
    path = tmp_path / "header.stream"
    path.write_text("CrystFEL stream format 2.3\nGenerated by peaknet-xtal\n")
    writer = registry.open_writer("stream", str(path))
    assert writer.done_keys() == set()
    writer.write(results[0])
    writer.close()
    stream = read_stream(path)
    assert stream.geometry is not None and [c.serial for c in stream.chunks] == [1]


def test_cxi_writer_geometry_is_ready_for_indexamajig(tmp_path, results):
    writer = registry.open_writer("cxi", str(tmp_path / "out" / "run.cxi"), frames_per_file=10)
    for r in results:
        writer.write(r)
    writer.close()
    geometry = read_geometry(tmp_path / "out" / "run.geom")  # one for all files
    assert (geometry.peak_list, geometry.peak_list_type) == ("/entry_1/result_1", "cxi")
    table = read_cxi_peaks(tmp_path / "out" / "run-00000.cxi")
    assert list(table.n_peaks) == [1, 2, 3]
    # panel q1 starts at raw ss 8: raw = panel + min_ss, and the geometry maps it back
    np.testing.assert_allclose(table.raw(2)["peakYPosRaw"], 10.0)
    back = table.peaks(2, geometry)
    np.testing.assert_allclose(back["fs"], results[2].peaks["fs"], atol=1e-5)
    assert list(back["panel"]) == [1, 1, 1]


@pytest.mark.dials
def test_dials_image_becomes_a_cxi_stack_crystfel_can_read(tmp_path, real_data, dials_env):
    """A 64-panel CSPAD CBF -> copied CXI stack + .geom -> the same panels read back."""
    path = real_data / "cspad_thermolysin_stills" / "idx-20130301060858401.cbf"
    (frame,) = list(registry.open_source(str(path)))
    peaks = peaks_from_columns(panel=[0, 63], fs=[10.0, 100.5], ss=[20.0, 150.25])
    writer = registry.open_writer("cxi", str(tmp_path / "cspad.cxi"))
    writer.write(FrameResult(frame=frame, peaks=peaks))
    writer.close()
    geometry = read_geometry(tmp_path / "cspad.geom")
    again = read_cxi_frame(tmp_path / "cspad-00000.cxi", 0, geometry)
    assert len(again.panels) == 64
    for a, b in zip(again.panels, frame.panels, strict=False):
        np.testing.assert_array_equal(a, b)
    # DIALS' mask of the image (its trusted range included) travels in the CXI file
    assert sum(int((~m).sum()) for m in frame.masks) > 0
    for a, b in zip(again.masks, frame.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.meta["wavelength_A"] == pytest.approx(frame.meta["panels"][0]["wavelength_A"])
    back = read_cxi_peaks(tmp_path / "cspad-00000.cxi").peaks(0, geometry)
    assert list(back["panel"]) == [0, 63]
    np.testing.assert_allclose(back["ss"], [20.0, 150.25])


def test_cxi_writer_options_are_all_passed_on(tmp_path, results):
    """The registry's CXI writer (the Ray pipeline's) takes every option of CXIWriter (those of
    other writers are ignored, as the contract says, so one missing here would be dropped
    silently); it records the finding settings it is given, so a rerun into its folder is
    checked as a single-process run's is."""
    import inspect

    from peaknet_xtal.builtin.writers import _open_cxi
    from peaknet_xtal.formats.cxi import CXIWriter

    takes = set(inspect.signature(_open_cxi).parameters)
    assert set(inspect.signature(CXIWriter).parameters) - {"path"} <= takes
    from peaknet_xtal.formats.cxi import read_settings

    settings = {"model": "default", "model_sha256": "a" * 64, "threshold": 0.5}
    writer = registry.open_writer("cxi", str(tmp_path / "out"), settings=settings)
    for r in results:
        writer.write(r)
    writer.close()
    (path,) = writer.finished_files()
    assert read_settings(path) == settings
    with pytest.raises(FormatError, match="threshold 0.5 there, 0.9 now"):
        registry.open_writer("cxi", str(tmp_path / "out"), settings={**settings,
                                                                     "threshold": 0.9})
