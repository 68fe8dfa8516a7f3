"""peaknet2cxi: find Bragg peaks with PeakNet and write them where indexamajig reads them.

usage: peaknet2cxi INPUT [INPUT ...] -o OUTDIR [-g GEOMETRY] [options]

INPUT is a CXI/HDF5 file (give its CrystFEL geometry with -g), any image DIALS can read (CBF,
miniCBF .bz2/.gz, NeXus, ...), or a list file as `indexamajig -i` takes (one file per line,
optionally followed by an event such as //3).

OUTDIR receives:
  peaks-NNNNN.cxi     images (a virtual dataset linking to the input HDF5, or a copy) and the
                      peak table at /entry_1/result_1 (raw slab fs/ss, 0-based pixel centres)
  peaknet.geom        the geometry with data/dim0/peak_list/peak_list_type = cxi set
  peaknet.lst         the CXI files, ready for `indexamajig -i`
  peaknet2cxi.json    summary: frames, hits, peaks per frame, time, resolved configuration
and, with --stream OUT.stream, a peaks-only CrystFEL stream (0.10+ syntax, geometry embedded).

Then index with, for example:

  indexamajig -i OUTDIR/peaknet.lst -g OUTDIR/peaknet.geom --peaks=cxi -o out.stream \\
      -p cell.pdb --indexing=xgandalf -j 8

(indexamajig adds the half-pixel shift itself; the tables hold 0-based pixel centres.)

Re-running the same command after an interruption continues where it stopped: finished CXI files
and stream chunks are kept and their frames skipped.  Every file appears atomically.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal import config as cfgmod
from peaknet_xtal.errors import FormatError, PeakNetError
from peaknet_xtal.finding.peaks import DEFAULT_MIN_SNR
from peaknet_xtal.progress import Progress
from peaknet_xtal.types import Frame, FrameResult

log = logging.getLogger("peaknet_xtal.peaknet2cxi")

DEFAULTS: dict[str, Any] = {
    "inputs": [],
    "geometry": None,
    "output": None,
    "model": "default",
    "device": "auto",
    "threads": None,
    "threshold": 0.5,
    "min_snr": DEFAULT_MIN_SNR,
    "adu_per_photon": None,  # None: the gain the geometry or image format declares
    "batch_size": 8,
    "min_peaks": 10,
    "max_peaks": 2048,
    "hits_only": False,
    "stream": None,
    "frames_per_file": 1000,
    "link": "auto",  # auto | vds | copy
    "progress": True,
    "workers": 1,
    "address": None,
    "predictor": None,  # Python callers only: predictor(panels, masks) -> probability maps
}
LIST_NAME = "peaknet.lst"
GEOM_NAME = "peaknet.geom"
SUMMARY_NAME = "peaknet2cxi.json"
CONFIG_NAME = "peaknet2cxi.config.json"
LIST_SUFFIXES = (".lst", ".txt", ".list")


def build_parser() -> Any:
    parser = cfgmod.cli_parser(__doc__, prog="peaknet2cxi")
    parser.add_argument("inputs", nargs="*", help="CXI/HDF5 files, DIALS-readable images, or "
                        "list files")
    parser.add_argument("-o", "--output", help="output directory")
    parser.add_argument("-g", "--geometry", help="CrystFEL .geom for CXI/HDF5 input")
    parser.add_argument("--model", help="model name or weights file (default: default)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--threshold", type=float, help="peak probability cut (default 0.5)")
    parser.add_argument("--min-snr", dest="min_snr", type=float,
                        help=f"least integrated SNR of a peak (default {DEFAULT_MIN_SNR:g}; 0: "
                             "keep every peak the model marks)")
    parser.add_argument("--adu-per-photon", dest="adu_per_photon", type=float,
                        help="detector gain for the shot noise in each peak's SNR (default: the "
                             "geometry's adu_per_photon, or adu_per_eV x photon energy; 0: "
                             "background noise only)")
    parser.add_argument("--batch-size", type=int, help="panel tiles per model batch (default 8)")
    parser.add_argument("--min-peaks", type=int, help="peaks that make a hit (default 10)")
    parser.add_argument("--max-peaks", type=int, help="keep the strongest N peaks per frame "
                        "(default 2048, CrystFEL's own cap)")
    parser.add_argument("--hits-only", action="store_true", help="write only hits to the CXI "
                        "files (the stream still gets every frame)")
    parser.add_argument("--stream", help="also write a peaks-only CrystFEL stream here")
    parser.add_argument("--frames-per-file", type=int, help="frames per CXI file (default 1000)")
    parser.add_argument("--link", choices=["auto", "vds", "copy"],
                        help="link the images (vds) or copy them into the CXI files")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")
    parser.add_argument("--workers", type=int, help="model workers (> 1: Ray pipeline)")
    parser.add_argument("--address", help="Ray cluster address (uses the Ray pipeline)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfgmod.setup_logging(getattr(args, "verbose", 0))
    config = cfgmod.resolve(DEFAULTS, args)
    if not config["inputs"] or not config["output"]:
        build_parser().print_usage(sys.stderr)
        print("peaknet2cxi: need at least one INPUT and -o OUTDIR", file=sys.stderr)
        return 2
    cfgmod.record(config, Path(config["output"]) / CONFIG_NAME, "peaknet2cxi", argv)
    try:
        summary = run(config)
    except (PeakNetError, OSError, ValueError) as exc:
        print(f"peaknet2cxi: error: {exc}", file=sys.stderr)
        print(f"peaknet2cxi: results written before the error are kept in {config['output']}; "
              "re-run the same command to continue", file=sys.stderr)
        return 1
    print(f"peaknet2cxi: {summary['frames']} frames ({summary['skipped']} already done), "
          f"{summary['hits']} hits, {summary['peaks_per_frame']['mean']:.1f} peaks/frame, "
          f"{summary['frames_per_s']:.2f} frames/s")
    print(f"next: indexamajig -i {summary['list']} -g {summary['geometry']} --peaks=cxi "
          "-o out.stream ...")
    return 0


# --------------------------------------------------------------------------------------------
# the run


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Run peaknet2cxi with a resolved configuration (keys as :data:`DEFAULTS`); returns the
    summary that is also written to ``OUTDIR/peaknet2cxi.json``."""
    config = cfgmod.deep_merge(DEFAULTS, dict(config))
    if int(config["workers"] or 1) > 1 or config["address"]:
        return _run_pipeline(config)
    return _run_serial(config)


def _run_serial(config: dict[str, Any]) -> dict[str, Any]:
    from peaknet_xtal.finding.engine import InferenceEngine
    from peaknet_xtal.formats.cxi import CXIWriter

    outdir = Path(config["output"])
    outdir.mkdir(parents=True, exist_ok=True)
    geometry = _read_geometry(config["geometry"])
    inputs = expand_inputs(config["inputs"])
    engine = InferenceEngine(config["model"], device=config["device"], threads=config["threads"],
                             batch_size=int(config["batch_size"]),
                             threshold=float(config["threshold"]),
                             min_snr=float(config["min_snr"]),
                             adu_per_photon=_optional_float(config["adu_per_photon"]),
                             min_peaks=int(config["min_peaks"]), max_peaks=config["max_peaks"],
                             predictor=config["predictor"])
    cxi = CXIWriter(outdir, geometry, frames_per_file=int(config["frames_per_file"]),
                    mode=config["link"], max_peaks=max(int(config["max_peaks"] or 0), 2048))
    stream = _open_stream(config, geometry)
    done_cxi = cxi.done_keys()
    done_stream = stream.done_keys() if stream is not None else done_cxi
    stats = _Stats(skipped=0)
    started = time.perf_counter()
    error: BaseException | None = None
    seen_geometry: list[Any] = [geometry]
    total = _count_frames(inputs, geometry)
    try:
        with Progress(total, "frames", desc="peaknet2cxi", enabled=bool(config["progress"])) as bar:
            frames = _pending(inputs, geometry, done_cxi | set(), done_stream, stats, bar)
            for result in engine.find_frames(frames):
                if seen_geometry[0] is None:
                    seen_geometry[0] = result.frame.geometry
                key = result.frame.key
                if key not in done_cxi and (result.hit or not config["hits_only"]):
                    cxi.write(result)
                if stream is not None and key not in done_stream:
                    stream.write(result)
                stats.add(result)
                bar.update(1, extra=f"hits {stats.hits} | {stats.mean_peaks():.1f} peaks/frame")
    except BaseException as exc:  # noqa: BLE001  (keep what is done, then re-raise)
        error = exc
        raise
    finally:
        _close_all(cxi, stream, error)
        engine.defects.save(outdir, seen_geometry[0])  # pixel defects found across the run
        summary = _finish(config, outdir, cxi.finished_files(), seen_geometry[0], stats,
                          time.perf_counter() - started, engine.describe(), error)
    return summary


def _run_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """Hand the run to the Ray pipeline (``--workers N`` / ``--address``), then finish alike."""
    try:
        from peaknet_xtal.pipeline import run_pipeline
    except ImportError as exc:
        raise PeakNetError(f"--workers/--address need the Ray pipeline, which cannot be "
                           f"imported here ({exc}); run without them") from exc
    from peaknet_xtal.formats.cxi import CXIWriter

    if config["stream"]:
        raise PeakNetError("--stream is written by the single-process run only; drop --workers "
                           "or convert the CXI output afterwards")
    outdir = Path(config["output"])
    geometry = _read_geometry(config["geometry"])
    started = time.perf_counter()
    pipeline = {
        "inputs": expand_inputs(config["inputs"]),
        "source_options": {"geometry": geometry} if geometry is not None else {},
        "output": str(outdir), "writer": "cxi",
        "writer_options": {"frames_per_file": int(config["frames_per_file"]),
                           "mode": config["link"], "max_peaks": max(int(config["max_peaks"] or 0),
                                                                     2048)},
        "workers": int(config["workers"] or 1), "address": config["address"],
        "model": config["model"], "device": config["device"],
        "threshold": float(config["threshold"]), "batch_size": int(config["batch_size"]),
        "predictor_options": {"min_peaks": int(config["min_peaks"]),
                              "min_snr": float(config["min_snr"]),
                              "adu_per_photon": _optional_float(config["adu_per_photon"]),
                              "max_peaks": config["max_peaks"]},
        "progress": bool(config["progress"]),
    }
    for item in pipeline["inputs"]:
        if item.get("events"):
            raise PeakNetError(f"{item['path']}: per-event list entries need the single-process "
                               "run (drop --workers)")
    pipeline["inputs"] = [item["path"] for item in pipeline["inputs"]]
    result = run_pipeline(pipeline)
    files = CXIWriter(outdir, geometry).finished_files()
    stats = _Stats.from_cxi(files)  # every frame in the output, earlier runs' included
    stats.skipped = int(result.get("resumed_keys", 0))
    return _finish(config, outdir, files, geometry, stats, time.perf_counter() - started,
                   {"pipeline": result.get("backend", "ray")}, None)


# --------------------------------------------------------------------------------------------
# inputs


def expand_inputs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """``[{"path", "events"}]`` from files and ``indexamajig -i`` style list files.

    A list line is ``path`` or ``path event`` (e.g. ``run7.cxi //3``); relative paths are taken
    from the current directory, like indexamajig does, or else beside the list file.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in inputs:
        path = Path(os.fspath(item))
        if path.suffix.lower() in LIST_SUFFIXES:
            for line_no, line in _list_lines(path):
                parts = line.split()
                target = _locate(parts[0], path)
                if target is None:
                    raise FormatError(path, f"listed file {parts[0]!r} not found", line=line_no)
                entry = out.setdefault(str(target), {"path": str(target), "events": set()})
                if len(parts) > 1:
                    if entry["events"] is None:
                        continue
                    entry["events"].add(parts[1])
                else:
                    entry["events"] = None
        else:
            if not path.exists():
                raise FormatError(path, "input file not found")
            out[str(path.resolve())] = {"path": str(path.resolve()), "events": None}
    for entry in out.values():
        if entry["events"] is not None and not entry["events"]:
            entry["events"] = None
    return list(out.values())


def _list_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(path, f"cannot read list file ({exc})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split(";", 1)[0].strip()
        if line:
            yield number, line


def _locate(name: str, list_file: Path) -> Path | None:
    for candidate in (Path(name), list_file.parent / name):
        if candidate.exists():
            return candidate.resolve()
    return None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _read_geometry(path: Any) -> Any:
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    from peaknet_xtal.formats.geometry import read_geometry

    return read_geometry(path)


def _open(entry: Mapping[str, Any], geometry: Any) -> Any:
    """A frame source for one input: CXI/HDF5 through the geometry, anything else by sniffing."""
    import h5py

    from peaknet_xtal.registry import open_source

    path = entry["path"]
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise FormatError(path, f"cannot read file ({exc})") from exc
    if is_hdf5:
        return open_source(path, "cxi", geometry=geometry)
    try:
        return open_source(path)
    except ValueError as exc:
        raise FormatError(path, "not a CXI/HDF5 file and not an image DIALS can read") from exc


def _count_frames(inputs: list[dict[str, Any]], geometry: Any) -> int | None:
    """Total frames for the progress bar (None when a source cannot say cheaply)."""
    total = 0
    for entry in inputs:
        if entry["events"] is not None:
            total += len(entry["events"])
            continue
        try:
            source = _open(entry, geometry)
            total += len(source)
            source.close()
        except (TypeError, PeakNetError, OSError, ValueError):
            return None  # the run itself reports the error, in order, after earlier inputs
    return total


def _pending(inputs: list[dict[str, Any]], geometry: Any, done_cxi: set[tuple[str, str]],
             done_stream: set[tuple[str, str]], stats: _Stats, bar: Progress) -> Iterator[Frame]:
    """Frames not yet in every output, input by input (a bad input fails after the good ones
    before it were processed)."""
    for entry in inputs:
        source = _open(entry, geometry)
        try:
            for frame in source:
                if entry["events"] is not None and frame.event not in entry["events"]:
                    continue
                if frame.key in done_cxi and frame.key in done_stream:
                    stats.skipped += 1
                    bar.update(1)
                    continue
                yield frame
        finally:
            source.close()


# --------------------------------------------------------------------------------------------
# outputs


def _open_stream(config: Mapping[str, Any], geometry: Any) -> Any:
    if not config["stream"]:
        return None
    from peaknet_xtal.registry import open_writer

    command = "peaknet2cxi " + " ".join(str(i) for i in config["inputs"])
    return open_writer("stream", os.fspath(config["stream"]), geometry=geometry, command=command)


def _close_all(cxi: Any, stream: Any, error: BaseException | None) -> None:
    """Finalise every writer, even after an error, so finished frames are kept."""
    for writer in (cxi, stream):
        if writer is None:
            continue
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001
            if error is None:
                raise
            log.error("could not finalise %s after an earlier error: %s", writer.name, exc)


class _Stats:
    """Running counts for the progress line and the summary."""

    def __init__(self, skipped: int = 0) -> None:
        self.skipped = skipped
        self.frames = 0
        self.hits = 0
        self.peaks: list[int] = []

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        self.hits += int(result.hit)
        self.peaks.append(len(result.peaks))

    def mean_peaks(self) -> float:
        return float(np.mean(self.peaks)) if self.peaks else 0.0

    @classmethod
    def from_cxi(cls, files: Sequence[Path]) -> _Stats:
        import h5py

        from peaknet_xtal.formats.cxi import KEY_GROUP, PEAK_GROUP

        stats = cls()
        for path in files:
            with h5py.File(path, "r") as h5:
                counts = np.asarray(h5[f"{PEAK_GROUP}/nPeaks"][()])
                hits = np.asarray(h5[f"{KEY_GROUP}/hit"][()]) if f"{KEY_GROUP}/hit" in h5 else []
            stats.frames += len(counts)
            stats.hits += int(np.sum(hits))
            stats.peaks += counts.astype(int).tolist()
        return stats

    def summary(self) -> dict[str, float]:
        peaks = np.asarray(self.peaks or [0])
        return {"mean": float(peaks.mean()), "median": float(np.median(peaks)),
                "min": int(peaks.min()), "max": int(peaks.max())}


def _finish(config: Mapping[str, Any], outdir: Path, files: list[Path], geometry: Any,
            stats: _Stats, seconds: float, engine: Mapping[str, Any],
            error: BaseException | None) -> dict[str, Any]:
    """Write the list file, the shared .geom and the JSON summary (all atomically)."""
    from peaknet_xtal.atomic import write_json_atomic, write_text_atomic
    from peaknet_xtal.formats.cxi import write_cxi_geometry

    list_path = outdir / LIST_NAME
    write_text_atomic(list_path, "".join(f"{p.resolve()}\n" for p in files))
    geom_path = outdir / GEOM_NAME
    if geometry is not None and files:
        write_cxi_geometry(files[0], geometry, geom_path)
    summary = {
        "status": "ok" if error is None else f"failed: {error}",
        "frames": stats.frames, "skipped": stats.skipped, "hits": stats.hits,
        "hit_rate": stats.hits / stats.frames if stats.frames else 0.0,
        "peaks_per_frame": stats.summary(),
        "time_s": round(seconds, 3),
        "frames_per_s": stats.frames / seconds if seconds > 0 else 0.0,
        "cxi_files": [str(p) for p in files], "list": str(list_path),
        "geometry": str(geom_path), "stream": config["stream"],
        "engine": dict(engine),
        "config": {k: _plain(v) for k, v in config.items()},
        "indexamajig": f"indexamajig -i {list_path} -g {geom_path} --peaks=cxi -o out.stream",
    }
    write_json_atomic(outdir / SUMMARY_NAME, summary)
    return summary


def _plain(value: Any) -> Any:
    """A JSON-friendly rendering of a configuration value (objects become their names)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "path", None) or getattr(value, "__qualname__", None) or repr(value)


if __name__ == "__main__":
    raise SystemExit(main())
