"""Property-based fuzzing: mutated real streams and geometry files either read or raise FormatError.

Mutations: truncation at any byte, deleted / duplicated / garbled lines, random bytes spliced in.
Anything else escaping the readers (IndexError, UnicodeDecodeError, numpy errors...) is a bug:
a user with a damaged file must get one error naming the file and the place.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
from peaknet_xtal.formats.stream import read_stream, write_stream

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GEOMETRY_NAMES = ["psgeom_cspad-2x2-approx1.geom", "crystfel_doc_jf-swissfel-16M.geom",
                  "crystfel_doc_lcls-june-r0013-r0128.geom", "om_lcls_rayonix.geom"]


def _sources() -> tuple[list[bytes], list[bytes]]:
    """Small real inputs (the 5-HT2B stream cut after 3 chunks keeps each example fast)."""
    streams = [(FIXTURES / "streams" / "v012_events.stream").read_bytes()]
    geometries = [(FIXTURES / "geometry" / "two_panels.geom").read_bytes()]
    real_streams = SHARED / "crystfel_streams"
    if real_streams.is_dir():
        streams.append((real_streams / "rs_palxfel_lysozyme_rayonix_xgandalf.stream").read_bytes())
        big = (real_streams / "crystfel_tests_5HT2B_lcls_cspad_xgandalf.stream").read_bytes()
        end = 0
        for _ in range(3):
            end = big.index(b"----- End chunk -----\n", end) + 22
        streams.append(big[:end])
        geometries += [(SHARED / "crystfel_geometry" / n).read_bytes() for n in GEOMETRY_NAMES]
    return streams, geometries


STREAMS, GEOMETRIES = _sources()


@st.composite
def mutated(draw: st.DrawFn, sources: list[bytes]) -> bytes:
    data = draw(st.sampled_from(sources))
    for _ in range(draw(st.integers(1, 3))):
        lines = data.split(b"\n")
        kind = draw(st.sampled_from(["truncate", "delete", "duplicate", "garble", "bytes",
                                     "swap"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
            continue
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "garble":
            line = bytearray(lines[i])
            for _ in range(draw(st.integers(1, 4))):
                pos = draw(st.integers(0, len(line)))
                line[pos:pos + 1] = draw(st.sampled_from(
                    [b"", b"x", b"-", b".", b" ", b"=", b"/", b"nan", b"1e999", b"9" * 12, b";"]))
            lines[i] = bytes(line)
        else:
            lines.insert(i, draw(st.binary(min_size=1, max_size=40)))
        data = b"\n".join(lines)
    return data


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _write(data: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.write(data)
    handle.close()
    return Path(handle.name)


@FUZZ
@given(mutated(STREAMS))
def test_stream_reader_raises_only_format_errors(data: bytes) -> None:
    path = _write(data, ".stream")
    try:
        stream = read_stream(path)
    except FormatError as exc:
        assert exc.path == str(path) and exc.line is not None and exc.line >= 1
        return
    finally:
        path.unlink()
    for header in stream.headers:
        _ = header.geometry  # the embedded geometry parses or records why not
    out = _write(b"", ".stream")
    try:
        write_stream(out, stream.chunks, header=stream.headers[0] if stream.headers else None)
        again = read_stream(out)  # what we read, we can write and read back
        assert len(again.chunks) == len(stream.chunks)
    finally:
        out.unlink()


@FUZZ
@given(mutated(GEOMETRIES))
def test_geometry_reader_raises_only_format_errors(data: bytes) -> None:
    path = _write(data, ".geom")
    try:
        geometry = read_geometry(path)
    except FormatError as exc:
        assert exc.path == str(path)
        return
    finally:
        path.unlink()
    try:
        text = geometry.to_text()
    except FormatError as exc:  # what CrystFEL 0.11+ cannot express is refused, naming the file
        assert exc.path == str(path)
        return
    again = parse_geometry(text)  # what we read, we can write and read back
    assert len(again.panels) == len(geometry.panels)
    for a, b in zip(geometry.panels, again.panels, strict=True):
        # the writer drops badrow_direction (CrystFEL 0.10+ ignores it) and folds per-panel
        # camera lengths into coffset under one top-level clen: the same panel, placed the same
        a = dataclasses.replace(a, extra={k: v for k, v in a.extra.items()
                                          if k != "badrow_direction"})
        if a.clen_m is not None and b.clen_m is not None and a.clen_m != b.clen_m:
            assert a.clen_m + a.coffset_m == pytest.approx(b.clen_m + b.coffset_m, abs=1e-9)
            a = dataclasses.replace(a, clen_m=b.clen_m, coffset_m=b.coffset_m)
        if a.clen_m is None and a.clen_path is None:  # CrystFEL 0.11+: clen is for all panels
            a = dataclasses.replace(a, clen_m=b.clen_m, clen_path=b.clen_path)
        assert a.same_as(b), a.name


@pytest.mark.parametrize("source", range(len(STREAMS)))
def test_unmutated_sources_read(source: int) -> None:
    path = _write(STREAMS[source], ".stream")
    try:
        assert read_stream(path).chunks
    finally:
        path.unlink()


def _clean_cxi_bytes() -> bytes:
    """A small gzip-chunked CXI stack with a static mask, as bytes to damage."""
    import io

    import h5py
    import numpy as np

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", chunks=(1, 16, 16), compression="gzip",
                          data=np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16))
        h5.create_dataset("/entry_1/data_1/mask", data=np.ones((16, 16), np.uint16))
    return buffer.getvalue()


CXI_BYTES = _clean_cxi_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, len(CXI_BYTES) - 1), st.integers(0, 255)),
                min_size=1, max_size=8), st.booleans())
def test_damaged_cxi_files_read_or_raise_format_error(edits, truncate):
    """Overwritten bytes (headers, B-trees, compressed chunks) and truncation: every frame
    reads, or a FormatError names the file; h5py's own errors never escape."""
    from peaknet_xtal.formats.cxi import iter_cxi_frames

    data = bytearray(CXI_BYTES)
    for offset, value in edits:
        data[offset] = value
    if truncate:
        data = data[: edits[0][0]]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.cxi"
        path.write_bytes(bytes(data))
        try:
            for _ in iter_cxi_frames(path):
                pass
        except FormatError as exc:
            assert "damaged.cxi" in str(exc)
