"""peaknet-show: summarise the files of a serial-crystallography run, like dials.show.

    peaknet-show FILE... [--json] [--geometry G.geom] [--max-frames N]
                 [--source-option KEY=VALUE ...]
    peaknet-show --models [--json]

Understands CrystFEL streams (chunks, peaks, crystals, reflections, peaks per frame), CrystFEL
geometries (panels, slab shape, photon energy, clen), CXI/HDF5 files (frames, image shape, value
range, peak tables), images DIALS can read (.cbf, .cbf.bz2, .nxs...: panels, shapes, value
ranges), DIALS .expt/.refl files (an imported, unindexed .expt too), stream2labels label files
(frames, rows, shapes, label classes and their pixels, fits) and any other input a registered
frame source reads, a plugin's included (frames, panels, shapes, value range: opened through the
plugin registry, as peaknet2cxi opens it; --geometry is passed to the source, and each
--source-option KEY=VALUE to the source types that declare KEY, as in peaknet2cxi): a folder, a
name that is not a file, or an HDF5 file the built-in readers cannot read is shown by the plugin
source whose sniff claims it.  --json prints one JSON object per file in a list instead.  Value
ranges of CXI stacks and other frame sources, and the label pixels of label files, are taken over
the first --max-frames frames or rows (default 20), which is said in the output.  A file that
cannot be read (or a folder) is reported on stderr (one line naming it; -vv adds the traceback),
the files after it are still shown, and the exit status is 1.

--models lists the registered model families, each with its description, the plugin that
registered it (entry point and distribution) and its model names (what peaknet-train's
model.name takes; --model of the finding commands takes trained weights instead), then the
plugins that failed to load.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from peaknet_xtal import source_option
from peaknet_xtal.config import cli_parser, resolve_or_exit, setup_logging
from peaknet_xtal.errors import DialsUnavailable, FormatError

log = logging.getLogger("peaknet_xtal.show")

#: The kinds of file shown, as the error for anything else lists them.
KINDS = (".stream, .geom, .cxi/.h5 (label files too), an image DIALS reads, .expt, .refl, or an "
         "input of a registered frame source")
#: Source types whose files the summarisers above read themselves (with more to say).
OWN_SOURCES = ("cxi", "dxtbx")

DEFAULTS = {"files": [], "json": False, "geometry": None, "max_frames": 20, "models": False,
            "source_options": {}}  # --source-option KEY=VALUE: to the source types declaring KEY
TYPES = {"geometry": str | None}


def _spread(values: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min / median / max of a per-frame count (zeros for an empty run)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def _value_range(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None
                 ) -> list[float] | None:
    """[min, max] over finite (and, with ``masks``, good) pixels; None when there are none.
    A few NaN/inf pixels must not hide the range of all the others."""
    lo, hi = np.inf, -np.inf
    for i, a in enumerate(arrays):
        values = a[masks[i]] if masks is not None else np.asarray(a).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return None if lo > hi else [lo, hi]


def show_stream(path: str, **_: Any) -> dict[str, Any]:
    """Stream counts, read chunk by chunk (constant memory on multi-GB streams)."""
    from peaknet_xtal.formats.stream import StreamHeader, iter_stream

    peaks, indexed, chunks, crystals, reflections, headers = [], 0, 0, 0, 0, 0
    geometry_panels = None
    for item in iter_stream(path):
        if isinstance(item, StreamHeader):  # a (possibly repeated) header
            headers += 1
            if item.geometry_error:
                raise FormatError(path, f"embedded geometry is malformed: {item.geometry_error}",
                                  line=item.line)
            if geometry_panels is None and item.geometry is not None:
                geometry_panels = item.geometry.n_panels
            continue
        chunks += 1
        peaks.append(item.n_peaks)
        crystals += len(item.crystals)
        indexed += bool(item.crystals)
        reflections += sum(x.n_reflections for x in item.crystals)
    return {"kind": "stream", "path": path, "headers": headers, "chunks": chunks,
            "peaks": int(sum(peaks)), "crystals": crystals, "indexed_frames": indexed,
            "reflections": reflections, "peaks_per_frame": _spread(peaks),
            "geometry_panels": geometry_panels}


def show_geometry(path: str, **_: Any) -> dict[str, Any]:
    from peaknet_xtal.formats.geometry import read_geometry

    g = read_geometry(path)
    return {"kind": "geometry", "path": path, "panels": g.n_panels,
            "slab_shape": list(g.slab_shape), "photon_energy_eV": g.photon_energy_eV,
            "photon_energy_path": g.photon_energy_path,
            "wavelength_A": g.wavelength_A, "clen_m": g.clen_m, "clen_path": g.clen_path,
            "data": g.data, "dims": g.dims,
            "bad_regions": len(g.bad_regions), "peak_list": g.peak_list,
            "peak_list_type": g.peak_list_type}


def _peak_table_summary(path: str) -> dict[str, Any] | None:
    import h5py

    from peaknet_xtal.formats.cxi import PEAK_GROUP, read_cxi_peaks

    with h5py.File(path, "r") as h5:
        if f"{PEAK_GROUP}/nPeaks" not in h5:
            return None
    table = read_cxi_peaks(path)
    return {"group": PEAK_GROUP, "frames": len(table), "peaks": int(table.n_peaks.sum()),
            "max_peaks": table.max_peaks, "peaks_per_frame": _spread(table.n_peaks),
            "columns": sorted(table.columns)}


def show_cxi(path: str, geometry: str | None = None, max_frames: int = 20,
             **_: Any) -> dict[str, Any]:
    """Frames, image shape, value range of the first frames, and the peak table if present."""
    from peaknet_xtal.formats.cxi import inspect_cxi, iter_cxi_frames
    from peaknet_xtal.formats.geometry import read_geometry

    geom = read_geometry(geometry) if geometry else None
    info = inspect_cxi(path, geom)
    from peaknet_xtal.finding.sanitise import sanitise_frame

    ranges: list[list[float]] = []
    sampled = nonfinite = absurd = marked = one_value = no_data = 0
    for frame in iter_cxi_frames(path, geom, stop=int(max_frames)):
        sampled += 1
        goods, check = sanitise_frame(frame.panels, None, frame.meta.get("dtype"))[1:]
        for i, value in check.flat_panels:  # no data, but the one value it holds is shown
            goods[i] = frame.panels[i] == value  # (a frame of zeros reads [0, 0])
        r = _value_range(frame.panels, goods)  # what the finder uses: no gap markers
        if r is not None:
            ranges.append(r)
        nonfinite, absurd = nonfinite + check.nonfinite, absurd + check.absurd
        marked += check.marked
        one_value, no_data = one_value + check.one_value, no_data + int(check.no_data)
    import h5py

    with h5py.File(path, "r") as h5:
        # with placeholders in the data path (``/%/data``), the first event's dataset
        virtual = bool(h5[info.frames[0][0] if info.frames else info.dataset].is_virtual)
    return {"kind": "cxi", "path": path, "dataset": info.dataset, "frames": info.n_frames,
            **({"first_and_last_event": [info.events[0], info.events[-1]]} if info.events
               else {}),
            "image_shape": list(info.frame_shape), "dtype": str(info.dtype),
            "virtual": virtual, "mask": info.mask_dataset,
            "panels": geom.n_panels if geom is not None else 1,
            "value_range": ([min(r[0] for r in ranges), max(r[1] for r in ranges)]
                            if ranges else None),
            "value_range_frames": sampled, "nonfinite_pixels": nonfinite,
            "absurd_pixels": absurd, "marker_pixels": marked,
            "one_value_pixels": one_value, "frames_without_data": no_data,
            "peak_table": _peak_table_summary(path)}


def show_image(path: str, **_: Any) -> dict[str, Any]:
    """Every image of a DIALS-readable file: panels, shapes, value ranges over good pixels."""
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    source = DxtbxSource(path, with_geometry=False)
    images = []
    for frame in source:
        shapes = sorted({tuple(p.shape) for p in frame.panels})
        images.append({"event": frame.event,
                       "value_range": _value_range(frame.panels, frame.masks),
                       "masked_pixels": int(sum((~m).sum() for m in frame.masks or [])),
                       "shapes": [list(s) for s in shapes]})
        first = frame
    panels = first.meta["panels"]
    return {"kind": "image", "path": path, "format": first.meta["format"],
            "images": len(images), "panels": len(first.panels),
            "panel_shapes": images[0]["shapes"],
            "pixel_size_mm": panels[0]["pixel_size_mm"],
            "distance_mm": panels[0]["distance_mm"],
            "wavelength_A": panels[0].get("wavelength_A"),
            "value_range": _value_range([np.array(i["value_range"]) for i in images
                                         if i["value_range"] is not None]),
            "per_image": images}


#: What a label file's label values mean (labelling/labels.py: 1 = Bragg peak pixel).
LABEL_CLASSES = {0: "background", 1: "Bragg peak"}


def show_labels(path: str, max_frames: int = 20, **_: Any) -> dict[str, Any]:
    """A stream2labels label file: input frames and what became of them, the labelled frames and
    their rows (one panel each), shapes, label classes with their pixel counts over the first
    ``max_frames`` rows (rows are whole panels: reading every one of a large file takes long),
    and the fits behind the labels."""
    from collections import Counter

    from peaknet_xtal.labelling.labels import LabelFile

    with LabelFile(path) as lf:
        rows = len(lf)
        meta = lf.h5["meta"] if "meta" in lf.h5 else {}
        heights = lf.meta("height") if "height" in meta else np.zeros(0, int)
        widths = lf.meta("width") if "width" in meta else np.zeros(0, int)
        frame_ids = lf.meta("frame") if "frame" in meta else np.zeros(0, int)
        per_row, values = [], Counter[int]()
        sampled = min(rows, int(max_frames))
        for i in range(sampled):
            label = lf.h5["labels"][i]
            good = lf.h5["masks"][i].astype(bool)
            found, counts = np.unique(label[good], return_counts=True)
            values.update({int(v): int(n) for v, n in zip(found, counts, strict=True)})
            per_row.append(int(np.count_nonzero(label[good])))
        status = (Counter(str(s) for s in lf.frames("status"))
                  if "frames" in lf.h5 and "status" in lf.h5["frames"] else None)
        names = json.loads(lf.h5.attrs.get("fit_status", "[]"))
        fits = lf.fits if "fits" in lf.h5 else np.zeros(0, [("status", "i4")])
        fit_status = Counter(names[int(c)] if 0 <= int(c) < len(names) else str(int(c))
                             for c in fits["status"])
        sources = sorted({str(s) for s in lf.meta("source")}) if "source" in meta else []
        shape = list(lf.h5["images"].shape[1:])
    return {"kind": "labels", "path": path,
            "input_frames": int(sum(status.values())) if status is not None else None,
            "frame_status": dict(sorted(status.items())) if status is not None else None,
            "labelled_frames": int(len(np.unique(frame_ids))), "rows": rows,
            "row_shape": shape,
            "panel_shapes": [list(s) for s in sorted(set(zip(heights.tolist(), widths.tolist(),
                                                                strict=True)))],
            "label_classes": {f"{v} ({LABEL_CLASSES.get(v, 'unknown')})": n
                              for v, n in sorted(values.items())},
            "label_pixels_per_row": _spread(per_row), "label_rows_scanned": sampled,
            "fits": int(len(fits)), "fit_status": dict(sorted(fit_status.items())),
            "sources": sources}


def _is_label_file(path: str) -> bool:
    import h5py

    from peaknet_xtal.labelling.labels import FORMAT

    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("format") == FORMAT)
    except OSError:
        return False


def show_experiments(path: str, **_: Any) -> dict[str, Any]:
    from peaknet_xtal.formats.dials_tables import summarize_experiments

    return summarize_experiments(path)


def show_reflections(path: str, **_: Any) -> dict[str, Any]:
    from peaknet_xtal.formats.dials_tables import summarize_reflections

    return summarize_reflections(path)


def _is_stream(path: str) -> bool:
    """A CrystFEL stream by its first line, gzip-compressed or not (the stream reader takes
    both)."""
    import gzip

    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
        if head.startswith(b"\x1f\x8b"):
            with gzip.open(path, "rb") as handle:
                head = handle.read(26)
        return head.startswith(b"CrystFEL stream format")
    except (OSError, EOFError):
        return False


def _is_hdf5(path: str) -> bool:
    import h5py

    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def show_source(path: str, source_type: str, geometry: str | None = None, max_frames: int = 20,
                source_options: Mapping[str, Any] | None = None,
                **_: Any) -> dict[str, Any]:
    """An input of a registered frame source (a plugin's, or ``sim:``): opened through the
    registry as every command opens it, with the ``source_options`` its type declares
    (``--source-option``), so what it shows is what peaknet2cxi would read: the frames, panels
    and shapes, and the value range over the good pixels of the first ``max_frames`` frames.
    The options it was opened with are part of the summary (peaknet-show keeps no record
    beside it: what it printed is the record)."""
    from peaknet_xtal import registry

    given = source_option.for_type(source_type, source_options)
    options = {**given, **({"geometry": geometry} if geometry else {})}
    description = registry.source_types()[source_type].description
    source = registry.checked_source(registry.open_source(path, source_type, **options),
                                     source_type, path)
    try:
        try:
            frames: int | None = len(source)
        except TypeError:  # a source of unknown length (a live stream)
            frames = None
        ranges: list[list[float]] = []
        shapes: set[tuple[int, ...]] = set()
        panels: set[int] = set()
        events: list[str] = []
        for frame in registry.checked_frames(source, path):
            events.append(frame.event)
            panels.add(len(frame.panels))
            shapes.update(tuple(p.shape) for p in frame.panels)
            r = _value_range(frame.panels, frame.masks)
            if r is not None:
                ranges.append(r)
            if len(events) >= int(max_frames):
                break
    finally:
        source.close()
    return {"kind": "frames", "path": path, "source_type": source_type,
            "description": description, **({"source_options": given} if given else {}),
            "frames": frames,
            "panels": sorted(panels)[0] if len(panels) == 1 else sorted(panels),
            "panel_shapes": [list(s) for s in sorted(shapes)],
            "first_event": events[0] if events else None,
            "value_range": ([min(r[0] for r in ranges), max(r[1] for r in ranges)]
                            if ranges else None),
            "value_range_frames": len(events)}


def _registered_source(path: str) -> Callable[..., dict[str, Any]] | None:
    """The summariser of ``path`` if a registered frame source other than the ones shown
    above claims it (a plugin's .npy stacks, ``sim:``), else None."""
    import functools

    from peaknet_xtal.registry import sniff_source

    found = sniff_source(path, exclude=OWN_SOURCES)
    return None if found is None else functools.partial(show_source, source_type=found)


def choose(path: str) -> Callable[..., dict[str, Any]]:
    """Pick the summariser by content first (streams, HDF5), then by name, then ask the
    registered frame sources."""
    from peaknet_xtal.formats.dxtbx_images import sniff_dxtbx

    lower = path.lower()
    if lower.endswith((".stream", ".stream.gz")) or _is_stream(path):
        return show_stream
    if lower.endswith(".geom"):
        return show_geometry
    if lower.endswith(".expt"):
        return show_experiments
    if lower.endswith(".refl"):
        return show_reflections
    if _is_hdf5(path):
        from peaknet_xtal.formats.cxi import sniff_cxi

        if _is_label_file(path):
            return show_labels
        if sniff_cxi(path) or not lower.endswith((".nxs", ".nx5")):
            return show_cxi
    if sniff_dxtbx(path):
        return show_image
    registered = _registered_source(path)
    if registered is not None:
        return registered
    from peaknet_xtal.registry import skipped_plugins

    skipped = "".join(f"; {line}" for line in skipped_plugins())  # it may have been theirs
    raise FormatError(path, f"unknown file type (expected {KINDS}){skipped}")


def summarize(path: str, **options: Any) -> dict[str, Any]:
    """The summary dict of one file (what --json prints).  ``max_frames`` below 1 is an error:
    a summary that scanned no frame would show no value range and look like empty data."""
    if int(options.get("max_frames", 1)) < 1:
        raise ValueError(f"max_frames must be at least 1, got {options['max_frames']}")
    from peaknet_xtal.registry import unclaimed

    if not os.path.exists(path):
        registered = _registered_source(path)  # a name a source reads, not a file (sim:)
        if registered is not None:
            try:
                return registered(path, **options)
            except FileNotFoundError:  # claimed by its name (a suffix), but it is not there
                pass
        raise unclaimed(FormatError(path, "file not found"))
    if os.path.isdir(path):  # content sniffing would call it an unknown file type
        registered = _registered_source(path)  # unless a plugin source reads folders
        if registered is not None:
            return registered(path, **options)
        raise unclaimed(FormatError(path, f"is a folder; give the files in it ({KINDS})"))
    summariser = choose(path)
    if summariser not in (show_cxi, show_image):
        return summariser(path, **options)
    try:
        return summariser(path, **options)
    except FormatError:
        # an HDF5 file (or an image by its name) the built-in readers cannot read may be a
        # plugin source's format: every HDF5 file went to the CXI summary ("no image dataset
        # found"), whatever plugin read it
        registered = _registered_source(path)
        if registered is None:
            raise
        return registered(path, **options)


def _text(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        if "range" in key and len(value) == 2:
            return f"{_text(value[0])} .. {_text(value[1])}"
        if "shape" in key or "size" in key:
            return " x ".join(_text(v) for v in value)
        return ", ".join(_text(v) for v in value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        return "; ".join(_text(v, key) for v in value)
    return str(value)


def render(summary: dict[str, Any]) -> str:
    """Human-readable block: the kind and path, then one indented ``key: value`` per line."""
    kind = summary["kind"]
    if kind == "frames":  # an input of a registered source: name the source type
        kind = f"{summary['source_type']} frames"
    lines = [f"{summary['path']} ({kind})"]
    for key, value in summary.items():
        if key in ("path", "kind", "per_image", "columns"):
            continue
        if isinstance(value, dict) and key == "peak_table":
            lines.append("  peak table:")
            lines += [f"    {k.replace('_', ' ')}: {_text(v, k)}" for k, v in value.items()
                      if k != "columns"]
            continue
        if value is None and key.endswith("_path"):
            continue
        lines.append(f"  {key.replace('_', ' ')}: {_text(value, key)}")
    return "\n".join(lines)


def show_models() -> dict[str, Any]:
    """The registered model families and their models (``model.zoo.catalogue``), and the
    plugins that failed to load (what --models prints)."""
    from peaknet_xtal.model.zoo import catalogue
    from peaknet_xtal.registry import skipped_plugins

    return {"kind": "models", "families": catalogue(), "not_loaded": skipped_plugins()}


def render_models(summary: dict[str, Any]) -> str:
    """One line per family (name: description (origin)), its model names indented below."""
    lines = ["model families (their models: what peaknet-train's model.name takes)"]
    for family in summary["families"]:
        lines.append(f"  {family['family']}: {family['description']} ({family['origin']})")
        lines.append(textwrap.fill(", ".join(family["models"]) or "(no named sizes)", 100,
                                   initial_indent="    ", subsequent_indent="    "))
    lines += [f"not loaded: {line}" for line in summary["not_loaded"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_parser(__doc__, prog="peaknet-show")
    parser.add_argument("files", nargs="*", help="files to summarise")
    parser.add_argument("--models", dest="models", action="store_true",
                        help="list the registered model families and models, with their plugins")
    parser.add_argument("--json", dest="json", action="store_true", help="print JSON")
    parser.add_argument("--geometry", "-g", dest="geometry",
                        help="CrystFEL geometry to split CXI/HDF5 frames into panels")
    parser.add_argument("--max-frames", dest="max_frames", type=int,
                        help="frames of a CXI stack scanned for the value range (default 20)")
    source_option.add_argument(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    source_option.take(parser, args)
    config = resolve_or_exit(parser, DEFAULTS, args, types=TYPES)
    source_option.check_or_exit(parser, config["source_options"])  # before any file is read
    if int(config["max_frames"]) < 1:  # no frame scanned is no value range: not a request for 1
        print(f"peaknet-show: error: --max-frames must be at least 1 (got {config['max_frames']})",
              file=sys.stderr)
        return 2
    if not config["files"] and not config["models"]:
        parser.error("give files to summarise, or --models")
    summaries, failed = [], False
    if config["models"]:
        summaries.append(show_models())
        if not config["json"]:
            print(render_models(summaries[-1]))
    for path in config["files"]:
        try:
            summaries.append(summarize(path, geometry=config["geometry"],
                                       max_frames=config["max_frames"],
                                       source_options=config["source_options"]))
        except (FormatError, DialsUnavailable) as exc:  # each names the file
            print(f"peaknet-show: {exc}", file=sys.stderr)
            failed = True
            continue
        except Exception as exc:
            # a library below us (or a summariser) failed on a file: still one line naming it,
            # and the files after it are shown; -vv says where it failed
            print(f"peaknet-show: {path}: cannot read ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            log.debug("%s: summary failed", path, exc_info=True)
            failed = True
            continue
        if not config["json"]:
            print(render(summaries[-1]))
    if config["json"]:
        print(json.dumps(summaries, indent=2, default=_json_default))
    return 1 if failed else 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
