"""CrystFEL streams (``.stream``): read and write, CrystFEL 0.9 to 0.12.

A stream is the text file indexamajig writes: a header (format version, generator, command line,
the geometry file and target cell, copied verbatim) and then one chunk per frame with the found
peaks and, for indexed frames, one block per crystal with its cell and integrated reflections.
Streams of a whole experiment run to many GB and are often concatenated (``cat a b > c``), so:

- :func:`iter_stream` / :func:`iter_chunks` read line by line and keep only the current chunk
  (constant memory); tables are converted to numpy in one block per table, which is what makes the
  reader fast (see ``benchmarks/bench_stream_read.py``);
- repeated headers in the middle of a file start a new :class:`StreamHeader`;
- ``Event:`` lines may be missing (0.9, single-frame files) or ``//`` (0.10+), chunks may lack a
  peak list (``--no-peaks-in-stream``), crystals may lack reflections
  (``No integrated reflections.``, or no table at all with ``--no-refls-in-stream``);
- a chunk cut short (the file ends, or a new chunk or stream header starts, before its
  ``----- End chunk -----``) is skipped with a warning naming the file and line: that is what an
  interrupted indexamajig run leaves, alone or with further runs ``cat``-ed after it, and every
  complete frame of such a stream is still worth having (CrystFEL's readers, too, drop an
  unfinished last chunk without stopping the program);
- streams compressed with gzip are read as they are (recognised by their first bytes);
- only stream format 2.3 is read: it is what CrystFEL has written since 2015, and the older
  formats lay their peak and reflection tables out differently (CrystFEL 0.10.2+ refuses them too);
- every malformed piece raises one :class:`~peaknet_xtal.errors.StreamError` naming the file and
  line.

Peak and reflection coordinates are kept as the stream has them: raw-slab ("file") coordinates
with the origin at the pixel corner, 1/d in nm^-1.  :meth:`Chunk.peak_table` and
:func:`chunk_from_peak_table` convert to and from the package's panel-relative pixel-centre
:data:`~peaknet_xtal.types.PEAK_DTYPE` table at this edge.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.errors import GeometryError, StreamError
from peaknet_xtal.formats.geometry import Geometry, parse_geometry
from peaknet_xtal.types import peaks_from_columns

log = logging.getLogger(__name__)

FORMAT_LINE = "CrystFEL stream format "
CHUNK_BEGIN = "----- Begin chunk -----"
CHUNK_END = "----- End chunk -----"
GEOM_BEGIN = "----- Begin geometry file -----"
GEOM_END = "----- End geometry file -----"
CELL_BEGIN = "----- Begin unit cell -----"
CELL_END = "----- End unit cell -----"
CRYSTAL_BEGIN = "--- Begin crystal"
CRYSTAL_END = "--- End crystal"
PEAKS_BEGIN = "Peaks from peak search"
PEAKS_END = "End of peak list"
REFL_BEGIN = "Reflections measured after indexing"
REFL_END = "End of reflections"
NO_REFL = "No integrated reflections."
PEAKS_COLUMNS = "  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel"
REFL_COLUMNS = ("   h    k    l          I   sigma(I)       peak background  fs/px  ss/px panel")
#: The one stream format read (what CrystFEL has written since 0.6, 2015).
FORMAT_VERSION = "2.3"
#: Lines that start a new chunk or stream: met inside a chunk, they mean it was cut short.
_NEW_UNIT = (CHUNK_BEGIN, FORMAT_LINE)
_GZIP_MAGIC = b"\x1f\x8b"

#: A stream's peak list: raw-slab, pixel-corner coordinates, 1/d in nm^-1, as in the file.
STREAM_PEAK_DTYPE = np.dtype([("fs", "f8"), ("ss", "f8"), ("one_over_d_nm", "f8"),
                              ("intensity", "f8"), ("panel", "U64")])
#: A crystal's integrated reflections, as in the file.
REFLECTION_DTYPE = np.dtype([("h", "i4"), ("k", "i4"), ("l", "i4"), ("I", "f8"),
                             ("sigma", "f8"), ("peak", "f8"), ("background", "f8"),
                             ("fs", "f8"), ("ss", "f8"), ("panel", "U64")])
_CELL_KEYS = ("a", "b", "c", "al", "be", "ga")
#: Integer columns are read as floats and checked (numpy would silently accept "0.5" as 0).
_LOAD_DTYPES = {
    dt: np.dtype([(n, "f8" if dt[n].kind == "i" else dt[n]) for n in dt.names or ()])
    for dt in (STREAM_PEAK_DTYPE, REFLECTION_DTYPE)
}


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------

@dataclass
class StreamHeader:
    """One stream header (a concatenated stream has several)."""

    version: str = "2.3"
    generator: str | None = None
    command: str | None = None
    indexing_methods: str | None = None
    geometry_text: str | None = None
    cell_text: str | None = None
    target_cell: dict[str, str] = field(default_factory=dict)
    extra_lines: list[str] = field(default_factory=list)
    methods_first: bool = False  # 0.9 wrote "Indexing methods selected" before the geometry
    line: int = 1
    path: str | None = None
    _geometry: Geometry | None = field(default=None, repr=False, compare=False)
    _geometry_error: str | None = field(default=None, repr=False, compare=False)

    @property
    def geometry(self) -> Geometry | None:
        """The embedded geometry, parsed on first use; None if absent or unparsable."""
        if self._geometry is None and self._geometry_error is None and self.geometry_text:
            try:
                self._geometry = _parse_embedded_geometry(self.geometry_text,
                                                          f"{self.path} (embedded geometry)")
            except GeometryError as exc:
                self._geometry_error = str(exc)
        return self._geometry

    @property
    def geometry_error(self) -> str | None:
        """Why the embedded geometry could not be parsed (None when it parsed or is absent)."""
        _ = self.geometry
        return self._geometry_error

    @property
    def cell_parameters(self) -> tuple[float, ...] | None:
        """Target (a, b, c) in Angstrom and (al, be, ga) in degrees, when the header has a cell."""
        if not all(k in self.target_cell for k in _CELL_KEYS):
            return None
        return tuple(float(self.target_cell[k].split()[0]) for k in _CELL_KEYS)


_GEOMETRY_CACHE: dict[str, Geometry] = {}


def _parse_embedded_geometry(text: str, label: str) -> Geometry:
    """Concatenated streams repeat one geometry many times: parse each distinct text once."""
    cached = _GEOMETRY_CACHE.get(text)
    if cached is None:
        if len(_GEOMETRY_CACHE) > 16:
            _GEOMETRY_CACHE.clear()
        cached = _GEOMETRY_CACHE[text] = parse_geometry(text, label)
    return cached


@dataclass
class Crystal:
    """One indexed lattice of a chunk; lengths in Angstrom, reciprocal vectors in 1/nm."""

    a: float | None = None
    b: float | None = None
    c: float | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    astar: np.ndarray | None = None
    bstar: np.ndarray | None = None
    cstar: np.ndarray | None = None
    lattice_type: str | None = None
    centering: str | None = None
    unique_axis: str | None = None
    profile_radius_nm: float | None = None  # nm^-1
    det_shift_mm: tuple[float, float] | None = None
    resolution_limit_nm: float | None = None  # diffraction_resolution_limit, nm^-1
    resolution_limit_A: float | None = None  # the same limit as the stream wrote it in A
    num_reflections: int | None = None
    num_saturated_reflections: int | None = None
    num_implausible_reflections: int | None = None
    reflections: np.ndarray | None = None  # REFLECTION_DTYPE; None when the stream has none
    no_reflections_line: bool = False  # the stream said "No integrated reflections."
    extra: dict[str, str] = field(default_factory=dict)
    line: int | None = None

    @property
    def n_reflections(self) -> int:
        return 0 if self.reflections is None else len(self.reflections)

    def same_as(self, other: Crystal) -> bool:
        return _same(self, other)


@dataclass
class Chunk:
    """One frame's record; peaks in stream (raw-slab, pixel-corner) coordinates."""

    filename: str = ""
    event: str | None = None
    serial: int | None = None
    hit: bool | None = None
    indexed_by: str | None = None
    photon_energy_eV: float | None = None
    camera_length_m: float | None = None  # average_camera_length
    num_peaks: int | None = None
    peaks: np.ndarray | None = None  # STREAM_PEAK_DTYPE; None = no peak list in the stream
    crystals: list[Crystal] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # every other header line, as written
    line: int | None = None  # where "----- Begin chunk -----" is

    @property
    def key(self) -> tuple[str, str]:
        """The frame identity used across the package ((source, event); no Event = '//')."""
        return (self.filename, self.event if self.event is not None else "//")

    @property
    def n_peaks(self) -> int:
        return 0 if self.peaks is None else len(self.peaks)

    def peak_table(self, geometry: Geometry) -> np.ndarray:
        """Peaks as a :data:`PEAK_DTYPE` table: panel index, panel-relative pixel centres, 1/A."""
        peaks = self.peaks if self.peaks is not None else np.zeros(0, STREAM_PEAK_DTYPE)
        lookup = geometry.panel_index()
        try:
            index = np.array([lookup[name] for name in peaks["panel"]], dtype=np.int32)
        except KeyError as exc:
            raise StreamError(None, f"chunk at line {self.line}: panel {exc.args[0]!r} is not "
                                    f"in the geometry", line=self.line) from None
        min_fs = np.array([p.min_fs for p in geometry.panels], dtype=float)
        min_ss = np.array([p.min_ss for p in geometry.panels], dtype=float)
        return peaks_from_columns(
            panel=index, fs=peaks["fs"] - 0.5 - min_fs[index], ss=peaks["ss"] - 0.5 - min_ss[index],
            intensity=peaks["intensity"], one_over_d=peaks["one_over_d_nm"] / 10.0)

    def same_as(self, other: Chunk) -> bool:
        return _same(self, other)


def _same(a: Any, b: Any) -> bool:
    """Field-by-field equality that understands numpy arrays (``line`` is ignored)."""
    return all(_same_value(getattr(a, name), getattr(b, name))
               for name in a.__dataclass_fields__ if name != "line")


def _same_value(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                and x.shape == y.shape and np.array_equal(x, y))
    if isinstance(x, list) and isinstance(y, list) and x and hasattr(x[0], "same_as"):
        return len(x) == len(y) and all(u.same_as(v) for u, v in zip(x, y, strict=False))
    return bool(x == y)


@dataclass
class Stream:
    """A whole stream in memory (use :func:`iter_chunks` for files too big for that)."""

    headers: list[StreamHeader]
    chunks: list[Chunk]
    path: str | None = None

    @property
    def header(self) -> StreamHeader:
        return self.headers[0]

    @property
    def geometry(self) -> Geometry | None:
        return self.headers[0].geometry if self.headers else None

    @property
    def n_peaks(self) -> int:
        return sum(c.n_peaks for c in self.chunks)

    @property
    def n_crystals(self) -> int:
        return sum(len(c.crystals) for c in self.chunks)

    @property
    def n_reflections(self) -> int:
        return sum(x.n_reflections for c in self.chunks for x in c.crystals)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

class _Cut(Exception):
    """A chunk ends before its end marker; ``why`` says what came instead."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Reader:
    """Consumes ``enumerate(file, 1)``; each ``_read_*`` method eats one block."""

    def __init__(self, path: str, lines: Iterator[tuple[int, str]]) -> None:
        self.path = path
        self.lines = lines
        self.n = 0
        self.pending: tuple[int, str] | None = None  # a line read one block too far

    def fail(self, message: str, line: int | None = None) -> StreamError:
        return StreamError(self.path, message, line=self.n if line is None else line)

    def next_line(self, what: str, start: int) -> str:
        for n, line in self.lines:
            self.n = n
            return line
        raise self.fail(f"file ends inside the {what} that starts at line {start} (truncated?)",
                        line=start)

    def chunk_line(self) -> str:
        """The next line of a chunk; :class:`_Cut` where the chunk stops short of its end marker.

        Only the file's last line can lack a newline, so a chunk line without one (other than
        the end marker itself) is a line the writer never finished.
        """
        for n, line in self.lines:
            self.n = n
            if line.startswith(_NEW_UNIT):
                raise self.cut_by(n, line)
            if not line.endswith("\n") and not line.startswith(CHUNK_END):
                break
            return line
        raise _Cut(f"the file ends before its '{CHUNK_END}' (an interrupted run?)")

    def cut_by(self, n: int, line: str) -> _Cut:
        """A new chunk or stream header at line ``n``: keep it for the caller, cut the chunk."""
        self.pending = (n, line)
        if line.startswith(FORMAT_LINE):
            return _Cut(f"a new stream header starts at line {n} before its '{CHUNK_END}' "
                        "(streams concatenated after an interrupted run?)")
        return _Cut(f"a new chunk starts at line {n} before its '{CHUNK_END}'")

    def items(self) -> Iterator[StreamHeader | Chunk]:
        first = True
        while True:
            if self.pending is not None:
                (self.n, line), self.pending = self.pending, None
            else:
                item = next(self.lines, None)
                if item is None:
                    break
                self.n, line = item
            if line.startswith(FORMAT_LINE):
                yield self._read_header(line)
            elif first:
                raise self.fail("not a CrystFEL stream: the first line should be "
                                f"'{FORMAT_LINE}{FORMAT_VERSION}', got {line.strip()[:60]!r}")
            elif line.startswith(CHUNK_BEGIN):
                chunk = self._read_chunk()
                if chunk is not None:
                    yield chunk
            elif line.strip():
                raise self.fail(f"unexpected line between chunks: {line.strip()[:80]!r}")
            first = False
        if first:
            raise self.fail("empty file, not a CrystFEL stream", line=1)

    # ---- header ------------------------------------------------------------------------------

    def _read_header(self, first: str) -> StreamHeader:
        """Read up to the first chunk (or the next header, or the end: no chunks is valid)."""
        version = first[len(FORMAT_LINE):].strip()
        if version != FORMAT_VERSION:
            raise self.fail(_unsupported_version(version))
        header = StreamHeader(version=version, line=self.n, path=self.path)
        for n, line in self.lines:
            self.n = n
            text = line.rstrip("\r\n")
            if text.startswith((CHUNK_BEGIN, FORMAT_LINE)):
                self.pending = (self.n, line)
                return header
            if text.startswith("Generated by "):
                header.generator = text[len("Generated by "):]
            elif text.startswith("Indexing methods selected: "):
                header.indexing_methods = text[len("Indexing methods selected: "):]
                header.methods_first = header.geometry_text is None and header.cell_text is None
            elif text.startswith(GEOM_BEGIN):
                header.geometry_text = self._read_block(GEOM_END, "geometry file")
            elif text.startswith(CELL_BEGIN):
                header.cell_text = self._read_block(CELL_END, "unit cell")
                header.target_cell = self._parse_cell(header.cell_text, self.n)
            elif header.command is None and header.geometry_text is None and text.strip():
                header.command = text
            elif text.strip():
                header.extra_lines.append(text)
        return header

    def _read_block(self, end: str, what: str) -> str:
        start = self.n
        parts: list[str] = []
        while True:
            line = self.next_line(what, start)
            if line.startswith(end):
                return "".join(parts)
            if line.startswith((CHUNK_BEGIN, FORMAT_LINE)):
                raise self.fail(f"{what} starting at line {start} has no '{end}'", line=start)
            parts.append(line)

    def _parse_cell(self, text: str, end_line: int) -> dict[str, str]:
        cell: dict[str, str] = {}
        lines = text.splitlines()
        first_line = end_line - len(lines)
        for offset, raw in enumerate(lines):
            key, sep, value = raw.split(";", 1)[0].partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                continue
            if key in _CELL_KEYS:
                _number(self, value.split()[0] if value else value, f"cell {key}",
                        first_line + offset)
            cell[key] = value
        return cell

    # ---- chunk -------------------------------------------------------------------------------

    def _read_chunk(self) -> Chunk | None:
        """One chunk, or None (with a warning naming file and line) for one cut short."""
        start = self.n
        try:
            return self._chunk_body(start)
        except _Cut as cut:
            log.warning("%s, line %d: incomplete chunk skipped: %s", self.path, start, cut.why)
            return None

    def _chunk_body(self, start: int) -> Chunk:
        chunk = Chunk(line=start)
        named = False
        while True:
            line = self.chunk_line()
            if line.startswith(CHUNK_END):
                break
            if line.startswith("Image filename: "):
                chunk.filename = line[16:].rstrip("\r\n")
                named = True
            elif line.startswith("Event:"):
                chunk.event = line[6:].strip()
            elif line.startswith(PEAKS_BEGIN):
                chunk.peaks = self._read_table(PEAKS_END, STREAM_PEAK_DTYPE, "peak list", "fs/px")
            elif line.startswith(CRYSTAL_BEGIN):
                chunk.crystals.append(self._read_crystal())
            elif line.startswith("Image serial number: "):
                chunk.serial = _integer(self, line[21:].strip(), "Image serial number", self.n)
            else:
                key, sep, value = line.partition(" = ")
                if not sep or not key.strip():
                    raise self.fail(f"unexpected line in chunk: {line.strip()[:80]!r}")
                self._chunk_field(chunk, key.strip(), value.strip())
        if not named:  # CrystFEL drops such a chunk too; here it would name no image to label
            raise self.fail("chunk has no 'Image filename:' line", line=start)
        return chunk

    def _chunk_field(self, chunk: Chunk, key: str, value: str) -> None:
        """Checked as it is read: a cut-off chunk explains only its unfinished last line, so a
        bad value on a whole line is an error even when the chunk never ends."""
        if key == "hit":
            chunk.hit = _integer(self, value, key, self.n) != 0
        elif key == "indexed_by":
            chunk.indexed_by = value
        elif key == "photon_energy_eV":
            chunk.photon_energy_eV = _number(self, value, key, self.n)
        elif key == "average_camera_length":
            chunk.camera_length_m = _number(self, value.split(" ")[0], key, self.n)
        elif key == "num_peaks":
            chunk.num_peaks = _integer(self, value, key, self.n)
        else:
            chunk.extra[key] = value

    # ---- crystal -----------------------------------------------------------------------------

    def _read_crystal(self) -> Crystal:
        start = self.n
        crystal = Crystal(line=start)
        while True:
            line = self.chunk_line()
            if line.startswith(CRYSTAL_END):
                return crystal
            if line.startswith("Cell parameters "):
                self._cell_line(crystal, line)
            elif line.startswith(REFL_BEGIN):
                crystal.reflections = self._read_table(REFL_END, REFLECTION_DTYPE, "reflections",
                                                       "sigma(I)")
            elif line.startswith(NO_REFL):
                crystal.no_reflections_line = True
            elif line.startswith("predict_refine/det_shift "):
                parts = line.split()
                if len(parts) != 8 or parts[1:3] != ["x", "="] or parts[4:6] != ["y", "="]:
                    raise self.fail(f"malformed det_shift line: {line.strip()[:80]!r}")
                crystal.det_shift_mm = (_number(self, parts[3], "det_shift x", self.n),
                                        _number(self, parts[6], "det_shift y", self.n))
            elif line.startswith(CHUNK_END):
                raise self.fail(f"crystal starting at line {start} has no '{CRYSTAL_END}'",
                                line=start)
            else:
                key, sep, value = line.partition(" = ")
                if not sep or not key.strip():
                    raise self.fail(f"unexpected line in crystal: {line.strip()[:80]!r}")
                self._crystal_field(crystal, key.strip(), value.strip())

    def _cell_line(self, crystal: Crystal, line: str) -> None:
        parts = line.split()
        if len(parts) != 10 or parts[5] != "nm," or parts[9] != "deg":
            raise self.fail(f"malformed cell line: {line.strip()[:80]!r}")
        a, b, c, al, be, ga = (_number(self, p, "cell parameter", self.n)
                               for p in parts[2:5] + parts[6:9])
        crystal.a, crystal.b, crystal.c = a * 10, b * 10, c * 10
        crystal.alpha, crystal.beta, crystal.gamma = al, be, ga

    def _crystal_field(self, crystal: Crystal, key: str, value: str) -> None:
        if key in {"astar", "bstar", "cstar"}:
            parts = value.split()
            if len(parts) != 4:
                raise self.fail(f"{key} needs three components and 'nm^-1': {value!r}")
            setattr(crystal, key, np.array([_number(self, p, key, self.n) for p in parts[:3]]))
        elif key in {"lattice_type", "centering", "unique_axis"}:
            setattr(crystal, key, value)
        elif key == "profile_radius":
            crystal.profile_radius_nm = _number(self, value.split(" ")[0], key, self.n)
        elif key == "diffraction_resolution_limit":
            parts = value.split()
            crystal.resolution_limit_nm = _number(self, parts[0], key, self.n)
            if len(parts) == 5 and parts[2] == "or":
                crystal.resolution_limit_A = _number(self, parts[3], key, self.n)
        elif key in {"num_reflections", "num_saturated_reflections",
                     "num_implausible_reflections"}:
            setattr(crystal, key, _integer(self, value, key, self.n))
        else:
            crystal.extra[key] = value

    # ---- tables ------------------------------------------------------------------------------

    def _read_table(self, end: str, dtype: np.dtype, what: str, column_marker: str) -> np.ndarray:
        start = n = self.n
        rows: list[str] = []
        append = rows.append
        first_row = start + 1
        new_unit = _NEW_UNIT
        for n, line in self.lines:  # noqa: B007  (n: the last line read; a hot loop of locals)
            if line.startswith(end):
                break
            if line[0] in "C-" and line.startswith(new_unit):  # the cheap test first: hot loop
                self.n = n
                raise self.cut_by(n, line)
            append(line)
        else:
            raise _Cut(f"the file ends inside the {what} that starts at line {start} "
                       "(an interrupted run?)")
        self.n = n
        if rows and column_marker in rows[0]:
            rows = rows[1:]
            first_row += 1
        return _table(self, rows, dtype, what, first_row)


def _table(reader: _Reader, rows: list[str], dtype: np.dtype, what: str,
           first_row: int) -> np.ndarray:
    """Convert table lines in one numpy call; on failure find and name the bad line."""
    if not rows:
        return np.zeros(0, dtype)
    load = _LOAD_DTYPES[dtype]
    try:
        table = np.loadtxt(rows, dtype=load, comments=None, ndmin=1)
        if len(table) == len(rows) and _integral(table, dtype).all():
            return table.astype(dtype) if load is not dtype else table
    except (ValueError, OverflowError):
        pass
    n_fields = len(dtype.names or ())
    for offset, row in enumerate(rows):
        parts = row.split()
        message = None
        if len(parts) != n_fields:
            message = f"expected {n_fields} columns, got {len(parts)}"
        else:
            try:
                one = np.loadtxt([row], dtype=load, comments=None, ndmin=1)
                if not _integral(one, dtype).all():
                    message = "not a whole number where one is expected"
            except (ValueError, OverflowError):
                message = "not a number where one is expected"
        if message:
            raise reader.fail(f"bad line in {what}: {message}: {row.strip()[:80]!r}",
                              line=first_row + offset)
    raise reader.fail(f"cannot read the {what}", line=first_row)


def _unsupported_version(version: str) -> str:
    if version in {"2.0", "2.1", "2.2"}:
        return (f"stream format {version} (CrystFEL before 2015) is not supported: its peak and "
                f"reflection tables have no panel column; only format {FORMAT_VERSION} is read "
                "(re-run indexamajig with CrystFEL 0.6 or later)")
    return (f"stream format {version[:20]!r} is not understood: only format {FORMAT_VERSION} "
            "(written by CrystFEL since 2015, version 0.6) is read")


def _integral(table: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows whose integer columns hold whole numbers within int32."""
    ok = np.ones(len(table), dtype=bool)
    for name in dtype.names or ():
        if dtype[name].kind == "i":
            column = table[name]
            ok &= (np.floor(column) == column) & (np.abs(column) < 2**31)
    return ok


def _number(reader: _Reader, value: str, key: str, line: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise reader.fail(f"{key}: {value!r} is not a number", line=line) from None
    return number


def _integer(reader: _Reader, value: str, key: str, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise reader.fail(f"{key}: {value!r} is not an integer", line=line) from None


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    """The stream as text lines (CRLF read as LF); a gzip-compressed one decompressed on the fly.

    Streams are large and gzip to about a third, so they are often archived as ``.stream.gz``;
    CrystFEL cannot read those, but nothing here needs the file to be seekable, and handing a
    compressed stream to a reader of text otherwise fails with a baffling "not UTF-8 text".
    """
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        if compressed:
            return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline=None)
        return open(path, encoding="utf-8", errors="strict", newline=None,
                    buffering=1 << 20)
    except OSError as exc:
        raise StreamError(path, f"cannot read: {exc.strerror or exc}") from None


def iter_stream(path: str | os.PathLike[str]) -> Iterator[StreamHeader | Chunk]:
    """Headers and chunks in file order, one at a time (constant memory)."""
    with _open_text(path) as handle:
        reader = _Reader(str(path), enumerate(handle, 1))
        try:
            yield from reader.items()
        except UnicodeDecodeError as exc:
            raise StreamError(path, f"not UTF-8 text ({exc.reason})", line=reader.n + 1) from None
        except (OSError, EOFError, zlib.error) as exc:  # a damaged or cut-off .gz, a failed read
            raise StreamError(path, f"cannot read on from here: {exc}",
                              line=reader.n + 1) from None


def iter_chunks(path: str | os.PathLike[str]) -> Iterator[Chunk]:
    """Every chunk of a stream, one at a time; memory stays constant on multi-GB files."""
    for item in iter_stream(path):
        if isinstance(item, Chunk):
            yield item


def read_stream(path: str | os.PathLike[str]) -> Stream:
    """The whole stream: all headers (concatenated streams repeat them) and all chunks."""
    headers: list[StreamHeader] = []
    chunks: list[Chunk] = []
    for item in iter_stream(path):
        (chunks if isinstance(item, Chunk) else headers).append(item)  # type: ignore[arg-type]
    return Stream(headers=headers, chunks=chunks, path=str(path))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def format_header(header: StreamHeader | None = None, *, geometry_text: str | None = None,
                  generator: str | None = None, command: str | None = None) -> str:
    """Header text in 0.10+ order: version, generator, command, geometry, cell, methods."""
    header = header or StreamHeader()
    lines = [f"{FORMAT_LINE}{header.version}",
             f"Generated by {generator or header.generator or 'peaknet-xtal'}"]
    command = command or header.command
    if command:
        lines.append(command)
    methods = ([f"Indexing methods selected: {header.indexing_methods}"]
               if header.indexing_methods is not None else [])
    if header.methods_first:
        lines += methods
    text = geometry_text if geometry_text is not None else header.geometry_text
    if text is not None:
        lines += [GEOM_BEGIN + "\n" + text + ("" if text.endswith("\n") or not text else "\n")
                  + GEOM_END]
    if header.cell_text is not None:
        lines += [CELL_BEGIN + "\n" + header.cell_text
                  + ("" if header.cell_text.endswith("\n") or not header.cell_text else "\n")
                  + CELL_END]
    lines += header.extra_lines
    if not header.methods_first:
        lines += methods
    return "\n".join(lines) + "\n"


def format_chunk(chunk: Chunk, *, always_event: bool = False) -> str:
    """One chunk as stream text (0.10+ line order; CrystFEL's number formats)."""
    lines = [CHUNK_BEGIN, f"Image filename: {chunk.filename}"]
    if chunk.event is not None or always_event:
        lines.append(f"Event: {chunk.event if chunk.event is not None else '//'}")
    if chunk.serial is not None:
        lines.append(f"Image serial number: {chunk.serial}")
    if chunk.hit is not None:
        lines.append(f"hit = {int(chunk.hit)}")
    if chunk.indexed_by is not None:
        lines.append(f"indexed_by = {chunk.indexed_by}")
    extra = dict(chunk.extra)
    if "n_indexing_tries" in extra:
        lines.append(f"n_indexing_tries = {extra.pop('n_indexing_tries')}")
    if chunk.photon_energy_eV is not None:
        lines.append(f"photon_energy_eV = {chunk.photon_energy_eV:.6f}")
    resolution = extra.pop("peak_resolution", None)
    lines += [f"{k} = {v}" for k, v in extra.items()]
    if chunk.camera_length_m is not None:
        lines.append(f"average_camera_length = {chunk.camera_length_m:.6f} m")
    if chunk.num_peaks is not None:
        lines.append(f"num_peaks = {chunk.num_peaks}")
    if resolution is not None:
        lines.append(f"peak_resolution = {resolution}")
    if chunk.peaks is not None:
        lines += [PEAKS_BEGIN, PEAKS_COLUMNS]
        lines += _peak_lines(chunk.peaks)
        lines.append(PEAKS_END)
    for crystal in chunk.crystals:
        lines += _crystal_lines(crystal)
    lines.append(CHUNK_END)
    return "\n".join(lines) + "\n"


def _peak_lines(peaks: np.ndarray) -> list[str]:
    columns = zip(peaks["fs"].tolist(), peaks["ss"].tolist(), peaks["one_over_d_nm"].tolist(),
                  peaks["intensity"].tolist(), peaks["panel"].tolist(), strict=False)
    return [f"{fs:7.2f} {ss:7.2f} {d:10.2f}  {i:10.2f}   {p}" for fs, ss, d, i, p in columns]


def _reflection_lines(refl: np.ndarray) -> list[str]:
    columns = zip(*(refl[name].tolist() for name in REFLECTION_DTYPE.names or ()), strict=False)
    return [f"{h:4d} {k:4d} {ll:4d} {i:10.2f} {s:10.2f} {pk:10.2f} {bg:10.2f} {fs:6.1f} {ss:6.1f}"
            f" {p}" for h, k, ll, i, s, pk, bg, fs, ss, p in columns]


def _crystal_lines(x: Crystal) -> list[str]:
    lines = [CRYSTAL_BEGIN]
    if x.a is not None and x.b is not None and x.c is not None:
        lines.append(f"Cell parameters {x.a / 10:.5f} {x.b / 10:.5f} {x.c / 10:.5f} nm, "
                     f"{x.alpha:.5f} {x.beta:.5f} {x.gamma:.5f} deg")
    for name in ("astar", "bstar", "cstar"):
        vector = getattr(x, name)
        if vector is not None:
            lines.append(f"{name} = " + " ".join(f"{v:+.7f}" for v in vector) + " nm^-1")
    for name in ("lattice_type", "centering", "unique_axis"):
        if getattr(x, name) is not None:
            lines.append(f"{name} = {getattr(x, name)}")
    if x.profile_radius_nm is not None:
        lines.append(f"profile_radius = {x.profile_radius_nm:.5f} nm^-1")
    lines += [f"{k} = {v}" for k, v in x.extra.items()]
    if x.det_shift_mm is not None:
        lines.append(f"predict_refine/det_shift x = {x.det_shift_mm[0]:.3f} "
                     f"y = {x.det_shift_mm[1]:.3f} mm")
    if x.resolution_limit_nm is not None:
        limit = x.resolution_limit_nm
        angstrom = x.resolution_limit_A
        if angstrom is None:
            angstrom = 10.0 / limit if limit else float("inf")
        lines.append(f"diffraction_resolution_limit = {limit:.2f} nm^-1 or {angstrom:.2f} A")
    for name in ("num_reflections", "num_saturated_reflections", "num_implausible_reflections"):
        if getattr(x, name) is not None:
            lines.append(f"{name} = {getattr(x, name)}")
    if x.reflections is not None:
        lines += [REFL_BEGIN, REFL_COLUMNS, *_reflection_lines(x.reflections), REFL_END]
    elif x.no_reflections_line:
        lines.append(NO_REFL)
    lines.append(CRYSTAL_END)
    return lines


def write_stream(path: str | os.PathLike[str], chunks: Iterable[Chunk], *,
                 geometry_text: str | None = None, header: StreamHeader | None = None) -> int:
    """Write a whole stream atomically; returns the number of chunks written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(format_header(header, geometry_text=geometry_text))
        for chunk in chunks:
            handle.write(format_chunk(chunk))
            count += 1
    return count


class StreamWriter:
    """Appends chunks one at a time to an open stream (0.10+ syntax: ``Event:`` always).

    Each chunk is flushed as soon as it is written, so an interrupted run keeps every finished
    frame.  ``resume=True`` reopens an existing stream, cuts off a half-written last chunk and
    appends after the complete ones; :meth:`done_keys` says which frames are already there.

    ``renumber=True`` gives the chunks CrystFEL's ``Image serial number``: 1, 2, 3, ... in the
    order written across the whole stream, continuing after the chunks of a resumed one.  A peak
    finder's chunk only knows the frame's place in its own input file (1 in every one-frame
    file), which is not what CrystFEL's own streams say nor what tools that sort by it expect;
    a stream re-written from another (re-integration) keeps the serials it copies, so renumbering
    is asked for, not the default.
    """

    def __init__(self, path: str | os.PathLike[str], *, geometry_text: str | None = None,
                 header: StreamHeader | None = None, generator: str | None = None,
                 command: str | None = None, resume: bool = False,
                 renumber: bool = False) -> None:
        self.path = Path(path)
        self._done: set[tuple[str, str]] = set()
        self.count = 0
        #: Complete chunks found in the file when resuming (0 for a new stream).
        self.existing_chunks = 0
        self.renumber = renumber
        self._last_serial = 0
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            found = _truncate_to_complete_chunks(self.path)
            self._done, self.existing_chunks = found.keys, found.chunks
            # Past both the count and the highest serial: a stream an older version numbered
            # per input file (1, 1, 1, ...) still continues without repeating a number.
            self._last_serial = max(found.chunks, found.max_serial)
            self._handle = open(self.path, "a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "w", encoding="utf-8")
            self._handle.write(format_header(header, geometry_text=geometry_text,
                                             generator=generator, command=command))
            self._handle.flush()

    def done_keys(self) -> set[tuple[str, str]]:
        """``(filename, event)`` of the chunks found in the file when resuming."""
        return set(self._done)

    def write(self, chunk: Chunk) -> None:
        if self.renumber:
            self._last_serial += 1
            chunk = replace(chunk, serial=self._last_serial)  # the caller's chunk stays as is
        self._handle.write(format_chunk(chunk, always_event=True))
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Complete(NamedTuple):
    """What a resumed stream already holds: its complete chunks' keys, count and top serial."""

    keys: set[tuple[str, str]]
    chunks: int
    max_serial: int


def _truncate_to_complete_chunks(path: Path) -> _Complete:
    """Cut a stream after its last complete chunk; say what the complete chunks are."""
    done: set[tuple[str, str]] = set()
    chunks = max_serial = 0
    good_end: int | None = None  # byte offset just after the last complete chunk
    offset = 0
    filename, event, serial = "", "//", 0
    end_marker, begin_marker = CHUNK_END.encode(), CHUNK_BEGIN.encode()
    serial_line = b"Image serial number:"
    with open(path, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            if raw.startswith(b"Image filename: "):
                filename, event = raw[16:].decode("utf-8", "replace").rstrip("\r\n"), "//"
            elif raw.startswith(b"Event:"):
                event = raw[6:].decode("utf-8", "replace").strip()
            elif raw.startswith(serial_line):
                text = raw[len(serial_line):].strip()
                serial = int(text) if text.isdigit() else 0
            elif raw.startswith(end_marker):
                good_end = offset
                done.add((filename, event))
                chunks += 1
                max_serial = max(max_serial, serial)
            elif raw.startswith(begin_marker):
                serial = 0
                if good_end is None:  # header only: keep it, drop the partial chunk
                    good_end = offset - len(raw)
    if good_end is None:
        good_end = offset
    with open(path, "r+b") as handle:
        handle.truncate(good_end)
    return _Complete(done, chunks, max_serial)


def chunk_from_peak_table(peaks: np.ndarray, geometry: Geometry, *, filename: str,
                          event: str | None = "//", serial: int | None = None,
                          photon_energy_eV: float | None = None,
                          camera_length_m: float | None = None, hit: bool | None = None) -> Chunk:
    """A peaks-only chunk from a :data:`PEAK_DTYPE` table (panel-relative pixel centres, 1/A).

    Converts at this edge to stream coordinates: raw slab, pixel corner (+0.5), 1/d in nm^-1.
    A 1/d that is unknown (NaN: a camera length or wavelength nothing gave) is written ``nan``,
    as C's printf writes it: CrystFEL's reader takes the column with ``%f`` (which accepts
    ``nan``) and never uses it, and :func:`read_stream` reads it back as unknown; a ``0.00``
    there would read as a real 1/d of zero.
    """
    index = np.asarray(peaks["panel"], dtype=np.int64)
    min_fs = np.array([p.min_fs for p in geometry.panels], dtype=float)
    min_ss = np.array([p.min_ss for p in geometry.panels], dtype=float)
    names = np.array([p.name for p in geometry.panels], dtype="U64")
    table = np.zeros(len(peaks), STREAM_PEAK_DTYPE)
    table["fs"] = peaks["fs"] + 0.5 + min_fs[index]
    table["ss"] = peaks["ss"] + 0.5 + min_ss[index]
    table["one_over_d_nm"] = np.asarray(peaks["one_over_d"], dtype=float) * 10.0
    table["intensity"] = np.nan_to_num(peaks["intensity"], nan=0.0)
    table["panel"] = names[index] if len(index) else names[:0]
    if photon_energy_eV is None:
        photon_energy_eV = geometry.photon_energy_eV
    if camera_length_m is None:
        camera_length_m = geometry.average_camera_length_m()
    return Chunk(filename=filename, event=event, serial=serial,
                 hit=bool(len(peaks)) if hit is None else hit, indexed_by="none",
                 photon_energy_eV=photon_energy_eV, camera_length_m=camera_length_m,
                 num_peaks=len(peaks), peaks=table)
