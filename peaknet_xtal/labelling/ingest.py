"""Inputs of the data engine: found peaks and predicted reflections per frame, and their images.

Two kinds of results come in:

- a CrystFEL stream: per chunk the found peaks and, for each indexed crystal, the predicted
  reflections, in raw file coordinates with the pixel corner as origin;
- DIALS stills results (``.expt`` + ``.refl``): per experiment the observed (``xyzobs.px.value``,
  strong spots) and calculated (``xyzcal.px``, indexed reflections) positions, panel-relative with
  the corner origin.

Both become :class:`FrameRecord` objects in the package convention (panel-relative, 0-based pixel
centre), together with where their image lives: a stream's ``Image filename`` is resolved like
``indexamajig --prefix`` (the prefix is prepended literally) and its ``Event: //N`` picks frame N of
a CXI stack; a DIALS experiment names its image file and index through its imageset.

Images are read through the registered frame sources (:class:`FrameLoader`), like every other
entry point reads frames, so anything a source plugin reads (an LCLS psana run, say) can be
labelled too.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.errors import FormatError
from peaknet_xtal.types import Frame, event_index, peaks_from_columns

log = logging.getLogger(__name__)

#: Predicted reflections, package convention (panel-relative 0-based pixel centre).
PRED_DTYPE = np.dtype([
    ("panel", np.int32), ("fs", np.float64), ("ss", np.float64),
    ("h", np.int32), ("k", np.int32), ("l", np.int32),
    ("intensity", np.float64), ("sigma", np.float64), ("crystal", np.int32),
])



@dataclass
class FrameRecord:
    """One frame's found and predicted peaks plus the address of its image.

    ``kind`` names the registered frame source that reads the image (``"dxtbx"`` for DIALS
    experiments); empty, the sources' ``sniff`` decides (a stream's CXI/HDF5 images go to
    ``"cxi"`` with the CrystFEL geometry of ``geometry_key``, a psana run to the psana plugin).
    ``event`` is the frame's key in its source; ``index`` its position in a file of frames (-1
    when the event is not a frame number).
    """

    source: str
    image: str
    event: str
    index: int
    found: np.ndarray           # PEAK_DTYPE
    predicted: np.ndarray       # PRED_DTYPE
    kind: str = ""
    n_crystals: int = 0
    geometry_key: str = ""
    panel_names: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.image, self.event)


# ------------------------------------------------------------------------------------ streams


def resolve_image(filename: str, prefix: str | None, base_dir: str | os.PathLike[str]) -> str:
    """Where ``indexamajig`` would have looked: ``prefix + filename`` (literal concatenation).

    Without a prefix a relative name is tried beside the stream first (streams are usually moved
    together with their data), then relative to the current directory.
    """
    if prefix:
        return os.path.abspath(prefix + filename)
    if os.path.isabs(filename):
        return filename
    beside = Path(base_dir) / filename
    return str(beside.resolve()) if beside.exists() else os.path.abspath(filename)


def _column(table: Any, *names: str) -> np.ndarray:
    """The first of ``names`` present in a structured array (streams name some columns twice)."""
    for name in names:
        if table.dtype.names and name in table.dtype.names:
            return np.asarray(table[name])
    raise KeyError(f"none of the columns {names} in {table.dtype.names}")


class _PanelIndex:
    """Panel name -> (index, min_fs, min_ss): from the geometry, or by first appearance."""

    def __init__(self, geometry: Any = None) -> None:
        self.geometry = geometry
        self.names: list[str] = [p.name for p in geometry.panels] if geometry is not None else []
        self._index = {name: i for i, name in enumerate(self.names)}

    def lookup(self, names: Sequence[str] | np.ndarray,
               path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.empty(len(names), dtype=np.int32)
        min_fs = np.zeros(len(names))
        min_ss = np.zeros(len(names))
        for i, raw in enumerate(names):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name not in self._index:
                if self.geometry is not None:
                    where = getattr(self.geometry, "path", None) or "the geometry"
                    raise FormatError(path, f"panel {name!r} is not in {where} (its panels: "
                                      f"{', '.join(self.names[:4])}"
                                      f"{' ...' if len(self.names) > 4 else ''}): a geometry of "
                                      "another detector than the stream's peaks?")
                self._index[name] = len(self.names)
                self.names.append(name)
            idx[i] = self._index[name]
            if self.geometry is not None:
                panel = self.geometry.panels[idx[i]]
                min_fs[i], min_ss[i] = panel.min_fs, panel.min_ss
        return idx, min_fs, min_ss


def _found_from_chunk(chunk: Any, panels: _PanelIndex, path: str) -> np.ndarray:
    peaks = chunk.peaks
    if peaks is None or len(peaks) == 0:
        return peaks_from_columns(panel=np.zeros(0, np.int32), fs=np.zeros(0), ss=np.zeros(0))
    idx, min_fs, min_ss = panels.lookup(_column(peaks, "panel", "panel_name"), path)
    return peaks_from_columns(
        panel=idx,
        fs=_column(peaks, "fs") - 0.5 - min_fs,
        ss=_column(peaks, "ss") - 0.5 - min_ss,
        intensity=_column(peaks, "intensity"),
        one_over_d=_column(peaks, "one_over_d_nm") / 10.0,
    )


def _predicted_from_chunk(chunk: Any, panels: _PanelIndex, path: str) -> np.ndarray:
    tables = []
    for number, crystal in enumerate(getattr(chunk, "crystals", None) or []):
        refl = getattr(crystal, "reflections", None)
        if refl is None or len(refl) == 0:
            continue
        idx, min_fs, min_ss = panels.lookup(_column(refl, "panel", "panel_name"), path)
        table = np.zeros(len(refl), dtype=PRED_DTYPE)
        table["panel"] = idx
        table["fs"] = _column(refl, "fs") - 0.5 - min_fs
        table["ss"] = _column(refl, "ss") - 0.5 - min_ss
        for name in ("h", "k", "l"):
            table[name] = _column(refl, name)
        table["intensity"] = _column(refl, "I", "intensity")
        table["sigma"] = _column(refl, "sigma", "sigma_I", "sigma(I)")
        table["crystal"] = number
        tables.append(table)
    return np.concatenate(tables) if tables else np.zeros(0, dtype=PRED_DTYPE)


def stream_geometry(path: str | os.PathLike[str]) -> Any:
    """The geometry embedded in a stream's (first) header; None when absent.  A malformed one is
    an error (with the parser's reason), not silently "no geometry"."""
    from peaknet_xtal.formats.stream import StreamHeader, iter_stream

    for item in iter_stream(path):
        if isinstance(item, StreamHeader):
            if item.geometry_error:
                raise FormatError(path, f"embedded geometry is malformed: "
                                  f"{item.geometry_error} (or pass --geometry)", line=item.line)
            return item.geometry
        return None
    return None


@dataclass
class StreamTally:
    """What :func:`records_from_stream` passed over in one stream, so that it can be said once.

    An indexed chunk without a peak list (indexamajig's ``--no-peaks-in-stream``: ``num_peaks``
    still counts them) has no found peaks to compare, and one whose crystals carry no reflection
    list (``--no-refls-in-stream``, or ``No integrated reflections.``) has no predicted
    reflections to fit: PeakDiff would turn them away as "precision 0.00", which reads as bad
    indexing, so they are skipped here and counted.
    """

    path: str
    indexed: int = 0
    no_peaks: int = 0
    num_peaks_said: set[int] = field(default_factory=set)  # num_peaks of those chunks
    no_refls: int = 0
    no_refls_said: int = 0  # of which every crystal said "No integrated reflections."
    skipped: int = 0  # chunks lacking either list (some lack both)

    def lines(self) -> list[str]:
        """One line per missing kind of list: what the stream holds and what to do about it."""
        lines = []
        if self.no_peaks:
            said = sorted(set(self.num_peaks_said))
            counts = (f" (num_peaks says {', '.join(map(str, said[:3]))}"
                      f"{' ...' if len(said) > 3 else ''})" if said else "")
            which = ("holds no peak lists" if self.no_peaks == self.indexed else
                     f"holds no peak list for {self.no_peaks} of its {self.indexed} indexed "
                     "frames, which are skipped")
            lines.append(f"{self.path}: {which}{counts}: it was written with indexamajig's "
                         "--no-peaks-in-stream; stream2labels needs the found peaks to compare "
                         "with the predicted reflections: rerun indexamajig without "
                         "--no-peaks-in-stream")
        if self.no_refls:
            which = ("holds no reflection lists for its indexed crystals"
                     if self.no_refls == self.indexed else
                     f"holds no reflection lists for the crystals of {self.no_refls} of its "
                     f"{self.indexed} indexed frames, which are skipped")
            if self.no_refls_said == self.no_refls:
                why = ("each says 'No integrated reflections.': indexamajig had no reflection "
                       "list to write for them")
                fix = "rerun indexamajig so that it integrates them"
            else:
                why = "it was written with indexamajig's --no-refls-in-stream"
                fix = "rerun indexamajig without --no-refls-in-stream"
            lines.append(f"{self.path}: {which}: {why}; stream2labels needs the predicted "
                         f"reflections to fit: {fix}")
        return lines


def _lacks_reflections(crystals: Sequence[Any]) -> tuple[bool, bool]:
    """(no crystal has a reflection list, every one said "No integrated reflections.")."""
    none = all(getattr(x, "reflections", None) is None for x in crystals)
    said = none and all(getattr(x, "no_reflections_line", False) for x in crystals)
    return none, said


def records_from_stream(path: str | os.PathLike[str], *, geometry: Any = None,
                        prefix: str | None = None, indexed_only: bool = True,
                        tally: StreamTally | None = None, once: bool = True,
                        geometries: dict[str, Any] | None = None) -> Iterator[FrameRecord]:
    """One record per chunk (per indexed chunk unless ``indexed_only`` is False).

    With a geometry (given, or embedded in the stream) positions become panel-relative; without
    one they stay in file coordinates, which is enough for matching but not for fitting.  Streams
    concatenated after a re-run with another geometry carry it in their own header: without a
    given geometry, each header's chunks are read through the geometry it embeds, under its own
    ``geometry_key`` (``geometries``, when given, is filled with key -> geometry).

    With ``once`` a frame (image and event) met more than once is labelled once, from its last
    copy (:func:`keep_last_copies`, which warns); without it every chunk is yielded, for a caller
    that merges several streams first.  An indexed chunk without a peak list or without
    reflection lists (:class:`StreamTally`) is skipped, with one warning per stream saying which
    option of indexamajig left them out (when ``tally`` is given, it is filled with the counts
    instead, for the caller to say).
    """
    from peaknet_xtal.formats.stream import StreamHeader, iter_stream

    if once:
        found: dict[str, Any] = {} if geometries is None else geometries
        kept, _ = keep_last_copies(list(records_from_stream(
            path, geometry=geometry, prefix=prefix, indexed_only=indexed_only, tally=tally,
            once=False, geometries=found)), found)
        yield from kept
        return
    path = os.fspath(path)
    source = os.path.abspath(path)
    given = geometry is not None
    key, panels = source, _PanelIndex(geometry)
    where = f"given geometry {getattr(geometry, 'path', None) or ''}".rstrip()
    by_key = {key: panels}  # a later run's geometry and the first one's, each read once
    first_text: str | None = None
    headers = 0
    base = os.path.dirname(source)
    say = tally is None
    tally = tally if tally is not None else StreamTally(path)
    for item in iter_stream(path):
        if isinstance(item, StreamHeader):
            headers += 1
            if given:
                continue
            if item.geometry_error:
                raise FormatError(path, f"embedded geometry is malformed: "
                                  f"{item.geometry_error} (or pass --geometry)", line=item.line)
            where = f"geometry embedded in {path} (header at line {item.line})"
            if headers == 1:
                first_text = item.geometry_text
                panels = by_key[source] = _PanelIndex(item.geometry)
            elif item.geometry_text is not None and item.geometry_text != first_text:
                # a run concatenated after another, with a geometry of its own
                key = f"{source}@{item.line}"
                panels = by_key[key] = _PanelIndex(item.geometry)
            else:
                key, panels = source, by_key[source]
            if geometries is not None:
                geometries[key] = panels.geometry
            continue
        chunk = item
        crystals = getattr(chunk, "crystals", None) or []
        if indexed_only and not crystals:
            continue
        if crystals:
            tally.indexed += 1
            no_peaks = getattr(chunk, "peaks", None) is None
            no_refls, said = _lacks_reflections(crystals)
            if no_peaks:
                tally.no_peaks += 1
                said_peaks = getattr(chunk, "num_peaks", None)
                if said_peaks is not None:
                    tally.num_peaks_said.add(int(said_peaks))
            if no_refls:
                tally.no_refls += 1
                tally.no_refls_said += int(said)
            if no_peaks or no_refls:
                tally.skipped += 1
                continue
        event = (getattr(chunk, "event", None) or "//").strip()
        _check_event_path(event, panels.geometry, where, path, chunk)
        image = resolve_image(str(chunk.filename), prefix, base)
        if geometries is not None and key not in geometries:
            geometries[key] = panels.geometry
        yield FrameRecord(
            source=source,
            image=image,
            event=event,
            index=event_index(event),
            found=_found_from_chunk(chunk, panels, path),
            predicted=_predicted_from_chunk(chunk, panels, path),
            n_crystals=len(crystals),
            geometry_key=key,
            panel_names=panels.names,
        )
    for line in tally.lines() if say else ():
        log.warning("%s", line)


def _check_event_path(event: str, geometry: Any, where: str, path: str, chunk: Any) -> None:
    """An event's path part (before ``//``) fills the ``%`` of the geometry's data path, as
    CrystFEL reads it; a geometry without one cannot read such an event.  Said once, naming the
    geometry and the stream line, rather than blamed on each event as "not a frame number"."""
    part = event.partition("//")[0]
    if not part or geometry is None:
        return
    data = [geometry.data] + [getattr(p, "data", None) for p in geometry.panels]
    if any(d and "%" in d for d in data):
        return
    shown = next((d for d in data if d), "/data/data")
    raise FormatError(path, f"event {event!r}: its path part {part!r} has no '%' to fill in the "
                      f"{where}'s data path ({shown}): CrystFEL fills the data path's '%' with "
                      "the event's path part; give a geometry whose data path has one (e.g. "
                      f"data = /%/{shown.lstrip('/').partition('/')[2]}) with --geometry",
                      line=getattr(chunk, "line", None))


def keep_last_copies(records: Sequence[FrameRecord], geometries: dict[str, Any] | None = None
                     ) -> tuple[list[FrameRecord], str | None]:
    """One record per frame (image and event), the last copy, and the warning that says so.

    A frame met twice would give two label rows, which can land on both sides of a
    training/validation split.  The last copy is kept: streams are concatenated, and given on
    the command line, in run order, so a frame re-indexed (another geometry, another cell) and
    appended has its newer result last; copies of one run (``cat a a``) are the same either way.
    The warning (also returned; None when no frame repeats) names the inputs the repeats come
    from, how many frames, which copy was kept, and whether the copies differ.
    """
    geometries = geometries or {}
    last = {r.key: i for i, r in enumerate(records)}
    kept = [r for i, r in enumerate(records) if last[r.key] == i]
    dropped = [r for i, r in enumerate(records) if last[r.key] != i]
    if not dropped:
        return kept, None
    frames = {r.key for r in dropped}
    by_frame: dict[Any, list[FrameRecord]] = {}  # each repeated frame's copies, in order
    for r in records:
        if r.key in frames:
            by_frame.setdefault(r.key, []).append(r)
    sources = list(dict.fromkeys(r.source for r in records if r.key in frames))
    other_geometry = other_result = 0
    for copies in by_frame.values():
        newest = copies[-1]
        if any(_geometry_of(r, geometries) is not _geometry_of(newest, geometries)
               or r.panel_names != newest.panel_names for r in copies[:-1]):
            other_geometry += 1
        if any(r.n_crystals != newest.n_crystals or not _same_table(r.found, newest.found)
               or not _same_table(r.predicted, newest.predicted) for r in copies[:-1]):
            other_result += 1
    where = "in " + ", ".join(sources)  # one stream twice over, given twice, or several
    if other_geometry or other_result:
        differ = ("the copies differ: "
                  + ", ".join(part for part in (
                      f"{other_geometry} in geometry" if other_geometry else "",
                      f"{other_result} in crystals, found peaks or reflections"
                      if other_result else "") if part))
    else:
        differ = "the copies are identical"
    extra = f"{len(dropped)} extra cop{'y' if len(dropped) == 1 else 'ies'}"
    message = (f"{len(frames)} frame(s) appear more than once {where} ({extra}); each is "
               "labelled once, from its last copy (the later run: streams are concatenated and "
               f"given in run order); {differ}")
    log.warning("%s", message)
    return kept, message


def _geometry_of(record: FrameRecord, geometries: dict[str, Any]) -> Any:
    return geometries.get(record.geometry_key)


def _same_table(a: np.ndarray, b: np.ndarray) -> bool:
    """Bytewise: NaN columns (unknown 1/d) compare equal to themselves."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _is_hdf5(path: str) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:  # missing or unreadable: the opener says so
        return False


# -------------------------------------------------------------------------------------- DIALS


def _dials_found(cols: dict[str, np.ndarray], sel: np.ndarray) -> np.ndarray:
    """Observed spots: the ``strong`` ones when flags say so, else every row with an xyzobs."""
    xyz = cols["xyzobs.px.value"]
    found = sel & np.any(xyz != 0, axis=1)
    if "flags" in cols:
        strong = (cols["flags"].astype(np.int64) & 32) != 0  # reflection_table.flags.strong
        if strong.any():
            found &= strong
    return peaks_from_columns(panel=cols["panel"][found].astype(np.int32),
                              fs=xyz[found, 0] - 0.5, ss=xyz[found, 1] - 0.5,
                              intensity=cols.get("intensity.sum.value",
                                                 np.full(len(xyz), np.nan))[found])


def _dials_predicted(cols: dict[str, np.ndarray], sel: np.ndarray) -> np.ndarray:
    """Indexed reflections (non-zero Miller index) at their calculated positions."""
    hkl = cols["miller_index"]
    keep = sel & np.any(hkl != 0, axis=1)
    xyz = cols["xyzcal.px"]
    table = np.zeros(int(keep.sum()), dtype=PRED_DTYPE)
    table["panel"] = cols["panel"][keep]
    table["fs"] = xyz[keep, 0] - 0.5
    table["ss"] = xyz[keep, 1] - 0.5
    table["h"], table["k"], table["l"] = hkl[keep, 0], hkl[keep, 1], hkl[keep, 2]
    if "intensity.sum.value" in cols:
        table["intensity"] = cols["intensity.sum.value"][keep]
        var = cols.get("intensity.sum.variance")
        table["sigma"] = np.sqrt(np.clip(var[keep], 0, None)) if var is not None else np.nan
    else:
        table["intensity"] = table["sigma"] = np.nan
    return table


def records_from_dials(expt: str | os.PathLike[str], refl: str | os.PathLike[str],
                       prefix: str | None = None, *,
                       trust_pickle: bool = False) -> Iterator[FrameRecord]:
    """One record per experiment of a stills ``.expt``/``.refl`` pair (a pickled ``.refl`` only
    with ``trust_pickle``: see :func:`~peaknet_xtal.formats.dials_tables.load_reflection_table`).
    """
    from peaknet_xtal.formats.dials_tables import (
        check_pair,
        load_reflection_table,
        read_experiments,
        table_columns,
    )

    expt, refl = os.fspath(expt), os.fspath(refl)
    experiments = read_experiments(expt)
    table = load_reflection_table(refl, trust_pickle=trust_pickle)
    check_pair(experiments, expt, table, refl)
    cols = table_columns(table, ("id", "panel", "miller_index", "xyzobs.px.value", "xyzcal.px",
                                 "flags", "intensity.sum.value", "intensity.sum.variance"))
    for needed in ("id", "panel", "xyzobs.px.value", "xyzcal.px", "miller_index"):
        if needed not in cols:
            raise FormatError(refl, f"no {needed} column (need observed and calculated positions)")
    for exp_id, experiment in enumerate(experiments):
        sel = cols["id"] == exp_id
        image, index = _dials_image(experiment, prefix, expt)
        yield FrameRecord(
            source=os.path.abspath(expt), image=image, event=f"//{index}", index=index,
            found=_dials_found(cols, sel), predicted=_dials_predicted(cols, sel),
            kind="dxtbx", n_crystals=int(experiment.crystal is not None), geometry_key="",
            panel_names=[p.get_name() for p in experiment.detector] if experiment.detector
            else [],
        )


def _dials_image(experiment: Any, prefix: str | None, expt: str) -> tuple[str, int]:
    imageset = experiment.imageset
    if imageset is None:
        return "", -1
    paths = list(imageset.paths())
    try:
        index = int(list(imageset.indices())[0])
    except Exception:
        index = 0
    name = paths[0] if paths else ""
    if prefix:
        name = prefix + os.path.basename(name)
    elif name and not os.path.exists(name):
        beside = Path(expt).resolve().parent / os.path.basename(name)
        name = str(beside) if beside.exists() else name
    return name, index


# ---------------------------------------------------------------------------------------- images


def image_source(record: FrameRecord, geometry: Any = None) -> tuple[str | None, bool]:
    """The registered frame source that reads ``record``'s image (None: none claims it), and
    whether it is the CXI reader by force (an HDF5 image read through ``geometry``): what
    :class:`FrameLoader` opens it with, and what :class:`ImageSources` asks before any
    work."""
    from peaknet_xtal.registry import sniff_source

    if record.kind:
        return record.kind, False
    if geometry is not None and _is_hdf5(record.image):
        # an HDF5 image with a geometry (the stream's, or --geometry) is read through it, as
        # peaknet2cxi -g reads it: sniffing looks only at the default data paths, so a
        # geometry's own (/%/data of a SACLA-style file) fell to dxtbx, which has no reader
        return "cxi", True
    return sniff_source(record.image), False  # a plugin's raising sniff: not its file


class ImageSources:
    """Checks, record by record as a stream is read, that what reads its images can be
    imported: the images DIALS reads (CBF...) need DIALS, asked for once, at the first record
    naming one (:func:`~peaknet_xtal.errors.require_dials`, in a child process).  Why: on a
    machine without DIALS a stream of CBF images failed frame by frame, every frame an error,
    and the run ended in a count of unreadable images; one line, before any work, says what is
    missing.  Each image file is asked about once; images that are not there are left to the
    frames' own error, which says where to look (--prefix)."""

    def __init__(self, geometries: dict[str, Any]) -> None:
        self.geometries = geometries
        self.dials = False  # DIALS checked: nothing more to ask
        self._seen: set[tuple[str, str]] = set()

    def check(self, record: FrameRecord) -> None:
        from peaknet_xtal.errors import require_dials
        from peaknet_xtal.formats.dxtbx_images import sniff_dxtbx

        key = (record.image, record.geometry_key)
        if self.dials or key in self._seen:
            return
        self._seen.add(key)
        if not (record.image and sniff_dxtbx(record.image) and os.path.exists(record.image)):
            return  # dxtbx claims images by their name alone: no other is read through it
        kind, _ = image_source(record, self.geometries.get(record.geometry_key))
        if kind == "dxtbx":
            require_dials(f"reading the images {record.source} names through dxtbx (the "
                          f"first: {record.image})", "dxtbx.model.experiment_list",
                          load=False, before_writing=True)
            self.dials = True


class FrameLoader:
    """Reads the images records name through the registered frame sources (hookspecs), the way
    every other entry point reads frames, keeping the last few sources open (records of one file
    usually come together).  A context manager: leaving it closes them.

    ``options``: the run's source options (``stream2labels --source-option``, the setting
    ``run.source_options``); each source is opened with those its type declares
    (:func:`peaknet_xtal.source_option.for_type`), as peaknet2cxi opens it: a plugin source
    that needs a run number or a calibration path could not be labelled from otherwise."""

    def __init__(self, keep_open: int = 4, options: Mapping[str, Any] | None = None) -> None:
        self.keep_open = int(keep_open)
        self.options = dict(options or {})
        self._open: OrderedDict[tuple[str, str, int], Any] = OrderedDict()

    def load(self, record: FrameRecord, geometry: Any = None) -> Frame:
        """The image of ``record``, split into panels, with its good-pixel masks."""
        from peaknet_xtal.registry import frame_at

        frame = frame_at(self._source(record, geometry), record.event)
        names = record.panel_names
        if names and len(frame.panels) != len(names):
            raise FormatError(record.image, f"{len(frame.panels)} panel(s) read, but "
                              f"{record.source} names {len(names)}: its panels need a geometry "
                              "to be cut out of the images (the stream embeds none; pass "
                              "--geometry)")
        return frame

    def _source(self, record: FrameRecord, geometry: Any) -> Any:
        from peaknet_xtal.registry import open_source, sniff_plugin_source, source_types
        from peaknet_xtal.source_option import for_type

        image = record.image
        if not image:
            raise FormatError(record.source, f"event {record.event}: no image named")
        key = (image, record.kind, id(geometry))
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        missing = FormatError(image, f"image of event {record.event} not found (from "
                              f"{record.source}; use --prefix to say where the images are)")
        types = source_types()
        kind, forced = image_source(record, geometry)
        if kind is None:
            if not os.path.exists(image):
                raise missing
            raise FormatError(image, f"no registered frame source reads it ({sorted(types)}); "
                              f"named by {record.source}")
        try:
            source = open_source(image, kind, geometry=geometry,
                                 **for_type(kind, self.options))
        except FormatError as exc:  # a file source's own "no such file": say where to look
            plugin = sniff_plugin_source(image) if forced else None
            if plugin is not None:  # an HDF5 format of a plugin's, not the CXI reader's
                source = open_source(image, plugin, geometry=geometry,
                                     **for_type(plugin, self.options))
            elif os.path.exists(image):
                raise
            else:
                raise missing from exc
        self._open[key] = source
        while len(self._open) > self.keep_open:
            self._open.popitem(last=False)[1].close()
        return source

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> FrameLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_frame(record: FrameRecord, geometry: Any = None) -> Frame:
    """The image a record refers to (one-off: :class:`FrameLoader` keeps files open)."""
    with FrameLoader(keep_open=1) as loader:
        return loader.load(record, geometry)
