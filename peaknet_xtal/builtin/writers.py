"""Built-in peak writers: CXI peak tables for ``indexamajig --peaks=cxi`` ("cxi") and CrystFEL
streams ("stream").

Registered through :func:`peaknet_xtal.hookspecs.peaknet_writer_types`, the same hook a
third-party plugin uses.  Both writers resume: ``done_keys()`` names the frames an earlier,
interrupted run already wrote.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peaknet_xtal.builtin.options import geometry_option
from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.types import FrameResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterType:
    """What ``peaknet_writer_types`` returns (see hookspecs); plugins may reuse this class."""

    name: str
    description: str
    suffix: str
    open: Callable[..., Any]


def _open_cxi(path: str, geometry: Any = None, frames_per_file: int = 1000, mode: str = "auto",
              max_peaks: int | None = None, write_geometry: bool = True,
              geometry_name: str | None = None, adu_per_photon: float | None = None,
              hits_only: bool = False, settings: Mapping[str, Any] | None = None,
              inputs: Sequence[str] | None = None, **ignored: Any) -> Any:
    """The CXI writer.  Options meant for other writers are ignored, as the writer contract
    says (hookspecs); each option of the CXI writer must be named here, or it is lost: the
    finding ``settings`` once were, so files a Ray run wrote recorded none and a rerun with
    another model went unchecked (``tests/builtin/test_builtin_writers.py`` checks that every
    keyword of ``CXIWriter`` is passed on)."""
    if ignored:
        log.debug("cxi writer: options for other writers ignored: %s", sorted(ignored))
    from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS, CXIWriter

    return CXIWriter(path, geometry_option(geometry), frames_per_file=frames_per_file, mode=mode,
                     max_peaks=max_peaks or DEFAULT_MAX_PEAKS, write_geometry=write_geometry,
                     geometry_name=geometry_name, adu_per_photon=adu_per_photon,
                     hits_only=hits_only, settings=settings, inputs=inputs)


class StreamPeakWriter:
    """A ``PeakWriter`` over :class:`peaknet_xtal.formats.stream.StreamWriter`.

    An existing stream is resumed (a half-written last chunk is cut off); a new one is created at
    the first result, because the stream header embeds the geometry, which may only be known from
    the frames themselves.  An existing stream without a complete chunk holds nothing to keep, so
    it too is written afresh at the first result (an earlier run may have left a header without
    the geometry, which chunks appended to it would not make readable).

    Chunks are numbered 1, 2, 3, ... across the run, as CrystFEL numbers images, continuing after
    the chunks of a resumed stream (the frame's own serial counts within its input file only).
    Closed before any frame without a geometry, nothing is written: a header without the geometry
    block is a stream CrystFEL 0.10+ cannot open.
    """

    name = "stream"

    def __init__(self, path: str | os.PathLike[str], geometry: Any = None,
                 command: str | None = None) -> None:
        from peaknet_xtal.formats.stream import FORMAT_LINE, StreamWriter

        self.path = os.fspath(path)
        self.geometry = geometry_option(geometry)
        self.command = command
        self._writer: Any = None
        _check_stream_path(self.path, FORMAT_LINE)
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._writer = StreamWriter(self.path, resume=True, renumber=True)
            if self._writer.existing_chunks == 0 and _starts_with(self.path, FORMAT_LINE):
                self._writer.close()  # only a header: rewritten, with the geometry, if a frame
                self._writer = None   # comes; left as it is otherwise

    def _open(self, geometry: Any) -> Any:
        from peaknet_xtal.formats.stream import StreamWriter

        if self._writer is None:
            text = geometry.to_text() if geometry is not None else None
            self._writer = StreamWriter(self.path, geometry_text=text, command=self.command,
                                        generator="peaknet-xtal", renumber=True)
        return self._writer

    def done_keys(self) -> set[tuple[str, str]]:
        return set() if self._writer is None else self._writer.done_keys()

    def write(self, result: FrameResult) -> None:
        geometry = self.geometry or result.frame.geometry
        if geometry is None:
            raise ValueError(f"{self.path}: writing a stream needs a geometry (frame "
                             f"{result.frame.source} {result.frame.event} has none)")
        self._open(geometry).write(result.stream_chunk(geometry))

    def close(self) -> None:
        if self._writer is None and self.geometry is None:
            log.warning("no stream written to %s: no frame was found, and without a frame or "
                        "a geometry its header would lack the geometry CrystFEL needs",
                        self.path)
            return
        self._open(self.geometry).close()


def _check_stream_path(path: str, format_line: str) -> None:
    """Refuse, before any frame is found, a stream path that cannot take a stream: a folder, a
    folder that is missing or not writable (found only when the run had finished), or an
    existing file that is no stream, which resuming would append chunks to (a user's geometry
    or input file given by mistake grew by a chunk a frame, exit 0)."""
    from peaknet_xtal.errors import PeakNetError

    if os.path.isdir(path):
        raise PeakNetError(f"{path}: a folder; a stream is written to a file: give its name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PeakNetError(f"{path}: cannot write the stream there: folder {folder} does not "
                           "exist")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        if not _starts_with(path, format_line):
            raise PeakNetError(f"{path}: exists and is not a CrystFEL stream (it does not "
                               f"begin '{format_line.strip()}'); a stream already there is "
                               "continued, any other file is left alone: give a new file name")
        if not os.access(path, os.W_OK):
            raise PeakNetError(f"{path}: the stream to continue is not writable")
    elif not os.access(folder, os.W_OK):
        raise PeakNetError(f"{path}: cannot write the stream there: folder {folder} is not "
                           "writable")


def _starts_with(path: str, text: str) -> bool:
    """Whether the file begins with ``text`` (a stream of ours, not some other file)."""
    with open(path, "rb") as handle:
        return handle.read(len(text.encode())) == text.encode()


def _open_stream(path: str, geometry: Any = None, command: str | None = None,
                 **_: Any) -> StreamPeakWriter:
    return StreamPeakWriter(path, geometry=geometry, command=command)


WRITER_TYPES = (
    WriterType("cxi", "CXI peak tables at /entry_1/result_1 beside the images (virtual dataset "
               "or copy) plus a .geom for indexamajig --peaks=cxi", ".cxi", _open_cxi),
    WriterType("stream", "CrystFEL stream with one peaks-only chunk per frame", ".stream",
               _open_stream),
)


@hookimpl
def peaknet_writer_types() -> tuple[WriterType, ...]:
    return WRITER_TYPES
