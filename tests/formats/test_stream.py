"""CrystFEL streams: real 0.9 streams, a hand-made 0.12 stream, writers, resume and bad input."""
from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.errors import FormatError, StreamError
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.formats.stream import (
    Chunk,
    StreamWriter,
    iter_chunks,
    iter_stream,
    read_stream,
    write_stream,
)
from peaknet_xtal.types import peaks_from_columns

HT2B = "crystfel_tests_5HT2B_lcls_cspad_xgandalf.stream"
LYSO = "rs_palxfel_lysozyme_rayonix_xgandalf.stream"

# (chunks, peaks, crystals, reflections).  The issue's counts (2,242 / 7,998 and 110 / 621) also
# count each table's column-header line: 2,172 + 70 peak lists = 2,242; 7,966 + 32 reflection
# tables = 7,998; 107 + 3 = 110; 618 + 3 = 621.  The per-chunk num_peaks and per-crystal
# num_reflections lines of the files add up to the counts below.
REAL_COUNTS = {HT2B: (70, 2172, 32, 7966), LYSO: (3, 107, 3, 618)}
ISSUE_COUNTS = {HT2B: (2242, 7998), LYSO: (110, 621)}


def real_stream(real_data: Path, name: str) -> Path:
    return real_data / "crystfel_streams" / name


@pytest.fixture(scope="module")
def fixture_stream(fixtures_dir: Path) -> Path:
    return fixtures_dir / "streams" / "v012_events.stream"


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_stream_counts(real_data: Path, name: str) -> None:
    stream = read_stream(real_stream(real_data, name))
    chunks, peaks, crystals, reflections = REAL_COUNTS[name]
    assert len(stream.chunks) == chunks
    assert stream.n_peaks == peaks == sum(c.num_peaks for c in stream.chunks)
    assert stream.n_crystals == crystals
    assert stream.n_reflections == reflections == sum(
        x.num_reflections for c in stream.chunks for x in c.crystals)
    peak_tables = sum(c.peaks is not None for c in stream.chunks)
    refl_tables = sum(x.reflections is not None for c in stream.chunks for x in c.crystals)
    assert (peaks + peak_tables, reflections + refl_tables) == ISSUE_COUNTS[name]


def test_real_stream_header_and_first_chunk(real_data: Path) -> None:
    stream = read_stream(real_stream(real_data, HT2B))
    header = stream.header
    assert header.version == "2.3" and header.generator == "CrystFEL 0.9.1+2c51b20e"
    assert header.command is not None and "--indexing=xgandalf" in header.command
    assert header.indexing_methods == "xgandalf" and header.methods_first
    assert header.cell_parameters == (61.4, 122.6, 168.0, 90.0, 90.0, 90.0)
    assert header.target_cell["centering"] == "C"
    assert stream.geometry is not None and stream.geometry.n_panels == 64
    assert stream.geometry.clen_path == "/LCLS/detector0-EncoderValue"

    chunk = stream.chunks[0]
    assert chunk.filename == "r0092-ab/data1/LCLS_2013_Mar22_r0092_035103_1824f.h5"
    assert chunk.event is None and chunk.key == (chunk.filename, "//")  # 0.9: no Event line
    assert (chunk.serial, chunk.hit, chunk.indexed_by) == (1, True, "xgandalf-nolatt-cell")
    assert chunk.photon_energy_eV == 9511.868397 and chunk.camera_length_m == 0.152001
    assert chunk.extra["hdf5/LCLS/detector0-EncoderValue"] == "-429.998810"
    assert chunk.line == 669
    first = chunk.peaks[0]
    assert (first["fs"], first["ss"], first["one_over_d_nm"], first["intensity"],
            first["panel"]) == (33.5, 10.98, 2.35, -78.5, "q0a0")
    crystal = chunk.crystals[0]
    assert crystal.a == pytest.approx(61.3532) and crystal.gamma == 90.53769
    np.testing.assert_array_equal(crystal.astar, [0.0706577, -0.1444151, 0.0270631])
    assert crystal.unique_axis == "?" and crystal.det_shift_mm == (0.022, -0.009)
    assert crystal.extra == {"predict_refine/final_residual": "3.289294e-07"}
    assert crystal.num_reflections == crystal.n_reflections == 257
    assert crystal.reflections[0]["panel"] and crystal.reflections.dtype["h"].kind == "i"


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_stream_write_then_read(real_data: Path, name: str, tmp_path: Path) -> None:
    source = real_stream(real_data, name)
    stream = read_stream(source)
    out = tmp_path / "copy.stream"
    assert write_stream(out, stream.chunks, header=stream.header) == len(stream.chunks)
    again = read_stream(out)
    assert len(again.chunks) == len(stream.chunks)
    assert all(a.same_as(b) for a, b in zip(stream.chunks, again.chunks, strict=False))
    assert again.header.geometry_text == stream.header.geometry_text
    assert out.read_text() == source.read_text()  # CrystFEL's own number formats, byte for byte


def test_peak_positions_agree_with_geometry(real_data: Path) -> None:
    """The stream's 1/d matches what our geometry computes for each peak.

    The file rounds 1/d to 0.01 nm^-1 (rms error 0.0029); half a pixel off in our conversion
    would raise the rms to 0.0039 or more, and the largest error to about 0.01.
    """
    stream = read_stream(real_stream(real_data, LYSO))
    geometry = stream.geometry
    assert geometry is not None
    errors = []
    for chunk in stream.chunks:
        table = chunk.peak_table(geometry)
        np.testing.assert_allclose(table["fs"], chunk.peaks["fs"] - 0.5)
        d = geometry.panel_to_one_over_d(table["panel"], table["fs"], table["ss"],
                                         wavelength_A=12398.419843320026 / chunk.photon_energy_eV)
        errors.append(d * 10 - chunk.peaks["one_over_d_nm"])
    error = np.concatenate(errors)
    assert len(error) == 107
    assert np.abs(error).max() < 0.008 and np.sqrt(np.mean(error**2)) < 0.0036


def test_v012_fixture_events_missing_tables_and_round_trip(fixture_stream: Path,
                                                           tmp_path: Path) -> None:
    stream = read_stream(fixture_stream)
    assert [c.event for c in stream.chunks] == ["//0", "//1", "//"]
    assert [c.key for c in stream.chunks][2] == ("single.h5", "//")
    first, second, third = stream.chunks
    assert first.n_peaks == 3 and second.peaks is None and third.peaks is not None
    assert third.n_peaks == 0 and not third.hit
    assert first.extra["header/float/LCLS/detector_1/EncoderValue"] == "80.000000"
    no_refl, with_refl = second.crystals
    assert no_refl.reflections is None and no_refl.no_reflections_line
    assert with_refl.n_reflections == 2 and list(with_refl.reflections["h"]) == [1, -2]
    assert with_refl.resolution_limit_nm == 1.5 and not stream.header.methods_first
    geometry = stream.geometry
    assert geometry is not None and [p.name for p in geometry.panels] == ["upper", "lower"]
    table = first.peak_table(geometry)
    assert list(table["panel"]) == [0, 0, 1]
    assert (table["fs"][2], table["ss"][2]) == (11.5, 17.5)  # corner->centre, minus min_ss 32
    np.testing.assert_allclose(table["one_over_d"], [0.123, 0.048, 0.21])
    out = tmp_path / "copy.stream"
    write_stream(out, stream.chunks, header=stream.header)
    assert out.read_text() == fixture_stream.read_text()


def test_concatenated_streams(real_data: Path, fixture_stream: Path, tmp_path: Path) -> None:
    joined = tmp_path / "joined.stream"
    joined.write_text(real_stream(real_data, LYSO).read_text() + fixture_stream.read_text()
                      + real_stream(real_data, LYSO).read_text())
    stream = read_stream(joined)
    assert len(stream.headers) == 3 and len(stream.chunks) == 3 + 3 + 3
    assert [h.generator for h in stream.headers] == ["CrystFEL 0.9.0", "CrystFEL 0.12.0",
                                                     "CrystFEL 0.9.0"]
    assert stream.headers[0].geometry is stream.headers[2].geometry  # parsed once
    kinds = [type(x).__name__ for x in iter_stream(joined)]
    assert kinds == ["StreamHeader"] + ["Chunk"] * 3 + ["StreamHeader"] + ["Chunk"] * 3 + [
        "StreamHeader"] + ["Chunk"] * 3
    header_only = tmp_path / "empty_run.stream"
    header_only.write_text("".join(fixture_stream.read_text().partition("----- Begin chunk")[:1]))
    assert read_stream(header_only).chunks == []


def test_iter_chunks_keeps_memory_constant(real_data: Path, tmp_path: Path) -> None:
    text = real_stream(real_data, HT2B).read_text()
    big = tmp_path / "big.stream"
    big.write_text(text * 12)  # ~9.6 MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_chunks(big))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 70 * 12
    assert peak < 4_000_000, f"peak traced memory {peak / 1e6:.1f} MB for a 9.6 MB stream"


def test_stream_writer_appends_and_resumes(fixture_stream: Path, fixtures_dir: Path,
                                           tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    geometry = read_geometry(fixtures_dir / "geometry" / "two_panels.geom")
    geometry_text = (fixtures_dir / "geometry" / "two_panels.geom").read_text()
    from peaknet_xtal.formats.stream import chunk_from_peak_table

    peaks = peaks_from_columns(panel=[0, 1], fs=[10.0, 11.5], ss=[5.0, 17.5],
                               intensity=[100.0, 50.0], one_over_d=[0.1234, np.nan])
    out = tmp_path / "run.stream"
    with StreamWriter(out, geometry_text=geometry_text, command="peaknet-xtal test") as writer:
        writer.write(chunk_from_peak_table(peaks, geometry, filename="a.cxi", event="//0",
                                           serial=1))
        writer.write(chunk_from_peak_table(peaks[:0], geometry, filename="b.h5", event=None))
        assert out.read_text().count("----- End chunk -----") == 2  # flushed as written
    text = out.read_text()
    assert text.count("CrystFEL stream format 2.3") == 1 and "Event: //\n" in text
    assert "  10.50    5.50       1.23      100.00   upper" in text
    stream = read_stream(out)
    assert stream.geometry is not None and stream.geometry.n_panels == 2
    back = stream.chunks[0].peak_table(stream.geometry)
    np.testing.assert_allclose(back["fs"], [10.0, 11.5])
    np.testing.assert_allclose(back["ss"], [5.0, 17.5])
    assert list(back["panel"]) == [0, 1] and stream.chunks[0].photon_energy_eV == 12000.0

    with open(out, "a") as handle:  # an interrupted run: half a chunk at the end
        handle.write("----- Begin chunk -----\nImage filename: c.cxi\nEvent: //2\n")
    with caplog.at_level(logging.WARNING, logger="peaknet_xtal.formats.stream"):
        assert len(read_stream(out).chunks) == 2  # the reader skips the partial chunk,
    assert "incomplete chunk skipped" in caplog.text  # the writer cuts it off to resume
    with StreamWriter(out, resume=True) as writer:
        assert writer.done_keys() == {("a.cxi", "//0"), ("b.h5", "//")}
        writer.write(Chunk(filename="c.cxi", event="//2", serial=3, peaks=None))
    resumed = read_stream(out)
    assert [c.key for c in resumed.chunks] == [("a.cxi", "//0"), ("b.h5", "//"),
                                               ("c.cxi", "//2")]
    assert len(resumed.headers) == 1


def test_an_unknown_one_over_d_is_written_as_unknown_not_as_zero(fixtures_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A peak whose 1/d nothing could give (NaN: no camera length or wavelength) is written
    ``nan`` in the stream's 1/d column, as C's printf writes it and CrystFEL's reader takes it;
    a ``0.00`` there read back as a real 1/d of zero.  Known values keep their number."""
    from peaknet_xtal.formats.stream import chunk_from_peak_table

    geometry_path = fixtures_dir / "geometry" / "two_panels.geom"
    geometry = read_geometry(geometry_path)
    peaks = peaks_from_columns(panel=[0, 1], fs=[10.0, 11.5], ss=[5.0, 17.5],
                               intensity=[100.0, 50.0], one_over_d=[0.1234, np.nan])
    out = tmp_path / "run.stream"
    with StreamWriter(out, geometry_text=geometry_path.read_text()) as writer:
        writer.write(chunk_from_peak_table(peaks, geometry, filename="a.cxi", event="//0"))
    rows = out.read_text().split("Panel\n", 1)[1].splitlines()[:2]
    assert [row.split()[2] for row in rows] == [f"{0.1234 * 10:.2f}", "nan"]
    back = read_stream(out).chunks[0].peak_table(geometry)
    assert back["one_over_d"][0] == pytest.approx(0.123, abs=1e-3)
    assert np.isnan(back["one_over_d"][1])


def test_stream_writer_renumbers_across_a_resumed_stream(tmp_path: Path) -> None:
    """``renumber``: serials 1, 2, ... in writing order, going on after a resumed stream's chunks;
    without it the chunk's own serial is written (a re-written stream keeps what it copies)."""
    out = tmp_path / "numbered.stream"
    with StreamWriter(out, renumber=True) as writer:
        for name in ("a.cbf", "b.cbf"):
            writer.write(Chunk(filename=name, serial=1, peaks=None))
    with StreamWriter(out, resume=True, renumber=True) as writer:
        assert writer.existing_chunks == 2
        chunk = Chunk(filename="c.cbf", serial=1, peaks=None)
        writer.write(chunk)
        assert chunk.serial == 1  # the caller's chunk is not changed
    with StreamWriter(out, resume=True) as writer:
        writer.write(Chunk(filename="d.cbf", serial=42, peaks=None))
    assert [c.serial for c in read_stream(out).chunks] == [1, 2, 3, 42]


def _broken(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.stream"
    path.write_text(text)
    return path


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def test_bad_streams_name_file_and_line(fixture_stream: Path, tmp_path: Path) -> None:
    good = fixture_stream.read_text()
    cases = [  # (a chunk cut short is skipped, not refused: tests/formats/test_stream_indexamajig)
        (good.replace("  40.25   20.75", "  40.25   2x.75"), _line_of(good, "  40.25"),
         "not a number"),
        (good.replace("  40.25   20.75", "  40.25"), _line_of(good, "  40.25"), "columns"),
        (good.replace("num_peaks = 2", "num_peaks = two"), _line_of(good, "num_peaks = 2"),
         "not an integer"),
        (good.replace("astar = +0.1265823", "astar = +0.12q5823"), _line_of(good, "astar"),
         "not a number"),
        (good.replace("   1    0    0     250.00", "   1  0.5    0     250.00"),
         _line_of(good, "   1    0    0"), "not a whole number"),
        (good.replace("hit = 0\n", "hit = 0\nsome garbage\n"), _line_of(good, "hit = 0") + 1,
         "unexpected line"),
        (good.replace("--- End crystal\n----- End chunk", "----- End chunk", 1),
         good[: good.rindex("--- Begin crystal")].count("\n") + 1, "no '--- End crystal'"),
        (good + "stray text\n", good.count("\n") + 1, "between chunks"),
        (good[: good.index("upper/max_ss")], _line_of(good, "----- Begin geometry"),
         "truncated"),
        ("Not a stream at all\n", 1, "not a CrystFEL stream"),
        ("", 1, "empty"),
    ]
    for text, line, message in cases:
        path = _broken(tmp_path, text)
        with pytest.raises(StreamError, match=message) as info:
            read_stream(path)
        assert (info.value.path, info.value.line) == (str(path), line), message
        assert str(path) in str(info.value)


def test_unreadable_streams(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        read_stream(tmp_path / "missing.stream")
    binary = tmp_path / "binary.stream"
    binary.write_bytes(b"CrystFEL stream format 2.3\n\xff\xfe\x00garbage\n")
    with pytest.raises(StreamError, match="UTF-8"):
        read_stream(binary)
