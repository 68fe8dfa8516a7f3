"""peaknet2cxi: find Bragg peaks with PeakNet and write them where indexamajig reads them.

usage: peaknet2cxi INPUT [INPUT ...] -o OUTDIR [-g GEOMETRY] [options]
       peaknet2cxi -i files.lst -o OUTDIR [-g GEOMETRY] [options]

INPUT is a CXI/HDF5 file (give its CrystFEL geometry with -g), any image DIALS can read (CBF,
miniCBF .bz2/.gz, NeXus, ...; with -g read through that geometry as indexamajig -g reads a CBF
file, else through the geometry DIALS reads from it), or a list file as `indexamajig -i` takes
(one file per line, optionally followed by an event such as //3); -i LIST names a list file
whatever its suffix.  An input no built-in reads (an HDF5 file without images where the CXI reader
looks, a folder, a name that is not a file), given or in a list file, goes to the first
installed plugin source whose sniff claims it; --source-option KEY=VALUE (repeatable) passes an
option a source type declares (the psana plugin's detector=NAME) to the sources that declare it.

OUTDIR receives:
  peaks-NNNNN.cxi     images (a virtual dataset linking to the input HDF5, or a copy), each
                      frame's good-pixel mask (the input's masks, bad regions, flags and DIALS'
                      trusted range applied), its photon energy, and the peak table at
                      /entry_1/result_1 (raw slab fs/ss, 0-based pixel centres)
  peaknet.geom        the one geometry for all of them (CrystFEL 0.10-0.12 rules: globals first,
                      top-level clen, photon_energy and mask read per frame from the CXI files)
  peaknet.lst         the CXI files, ready for `indexamajig -i`
  peaknet2cxi.json    summary of everything in OUTDIR (all runs), and of this run
  peaknet2cxi.png     peaks per frame of every frame in OUTDIR, in the order written, with the
                      hit threshold (--min-peaks), the running hit rate, and the histogram of
                      peaks per frame
  peaknet2cxi.config.json  this run's resolved settings, command line and working folder, and
                      the CPU threads it used ("used": threads, or with --workers the workers
                      and each one's threads)
  peaks-nonhits-NNNNN.h5  with --hits-only: the frames left out as not hits, so that a rerun
                      skips them as it skips the frames in the CXI files
and, with --stream OUT.stream, a peaks-only CrystFEL stream (0.10+ syntax, geometry embedded);
with --dials, OUTDIR/dials/imported.expt + strong.refl for dials.index (the images as dials.import
imports them, a rotation series as one sequence; a set of stills needs joint_indexing=False: the
command printed at the end has it).

Then index with (YOUR.cell: your unit cell file, CrystFEL .cell or PDB CRYST1; without -p
XGANDALF searches for any cell):

  indexamajig -i OUTDIR/peaknet.lst -g OUTDIR/peaknet.geom --peaks=cxi \\
      --indexing=xgandalf -p YOUR.cell -o OUTDIR/peaknet.stream -j NPROC

(indexamajig adds the half-pixel shift itself; the tables hold 0-based pixel centres.)  The
command printed at the end of a run has OUTDIR and NPROC filled in.

An interruption, by Ctrl-C or by the SIGTERM batch schedulers send, closes what is finished and
exits with 130 or 143.  Re-running the same command after an interruption continues where it
stopped: finished CXI files and stream chunks are kept and their frames skipped (each CXI file
records the settings its peaks were found with; a rerun with other settings or another model is
refused).  Every file appears atomically.  An OUTDIR holding peaks-*.cxi files or a peaknet.lst
that peaknet2cxi did not write is refused.  One OUTDIR holds one detector geometry: images of
different detectors go to separate output folders.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal import config as cfgmod
from peaknet_xtal import source_option
from peaknet_xtal.atomic import make_output_folder
from peaknet_xtal.config import bounded
from peaknet_xtal.errors import (
    DialsUnavailable,
    FormatError,
    GeometryError,
    ImageRefused,
    PeakNetError,
    require_dials,
)
from peaknet_xtal.finding.sanitise import add_tallies, describe_tally
from peaknet_xtal.finding.settings import DEFAULTS as FINDING
from peaknet_xtal.finding.settings import LIMITS, PRECISIONS, check_precision
from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS, has_frame_keys
from peaknet_xtal.progress import Progress, closed_length, count_within, finding_counts
from peaknet_xtal.registry import sniff_plugin_source, unclaimed
from peaknet_xtal.stopping import (
    exit_status,
    interrupted,
    signal_name,
    sigterm_raises,
    stop_exception,
)
from peaknet_xtal.types import Frame, FrameResult, resolved_key

log = logging.getLogger("peaknet_xtal.peaknet2cxi")

DEFAULTS: dict[str, Any] = {
    "inputs": [],
    "geometry": None,
    "source_options": {},  # --source-option KEY=VALUE: to the source types declaring KEY
    "output": None,
    "model": FINDING.model,
    "device": FINDING.device,
    "threads": None,
    "precision": FINDING.precision,  # fp32 | bf16 (finding.settings.PRECISIONS)
    "threshold": FINDING.threshold,
    "min_snr": FINDING.min_snr,
    "min_height": FINDING.min_height,
    "rescue_prob": FINDING.rescue_prob,
    "rescue_height": FINDING.rescue_height,
    "faint_support": FINDING.faint_support,
    "adu_per_photon": None,  # None: finding.settings.resolve_gain (geometry, image format)
    "batch_size": FINDING.batch_size,
    "tile_size": FINDING.tile_size,  # largest panel side the model sees whole
    "min_peaks": FINDING.min_peaks,  # the shared hit rule (finding.settings)
    "max_peaks": DEFAULT_MAX_PEAKS,  # the width of Cheetah's CXI peak tables
    "hits_only": False,
    "stream": None,
    "dials": False,
    "frames_per_file": 1000,
    "link": "auto",  # auto | vds | copy
    "progress": True,
    "workers": 1,
    "address": None,
    "predictor": None,  # Python callers only: predictor(panels, masks) -> probability maps
}


def _limited(kind: type, name: str, optional: bool = False) -> Any:
    """A finding setting's type with its range from ``finding.settings.LIMITS`` (defined there
    once, for the engine and the Python API too)."""
    limits = LIMITS[name]
    return bounded(kind, ge=limits.get("ge"), gt=limits.get("gt"), le=limits.get("le"),
                   lt=limits.get("lt"), optional=optional)


#: Every number's range: config.resolve checks them for the command line and a --config file
#: alike, and run() for Python callers.  A value outside would otherwise run silently with a
#: meaningless cut (a probability of 1.5, a negative SNR) or be bent quietly by a consumer
#: (frames_per_file 0 taken as 1).  The DIALS plugin declares the same in its PHIL.
RANGES: dict[str, Any] = {
    **{name: _limited(float, name) for name in ("threshold", "rescue_prob", "min_snr",
                                                 "min_height", "rescue_height")},
    "adu_per_photon": _limited(float, "adu_per_photon", optional=True),  # 0: no shot noise
    "min_peaks": bounded(int, ge=0), "faint_support": bounded(int, ge=0),  # 0: every frame
    "max_peaks": _limited(int, "max_peaks", optional=True),  # None: no cap
    "batch_size": _limited(int, "batch_size"), "tile_size": _limited(int, "tile_size"),
    "frames_per_file": bounded(int, ge=1),
    "workers": bounded(int, ge=1), "threads": bounded(int, ge=1, optional=True),
}
#: Types of the settings whose default (None) cannot say it, or that the default's type allows too
#: loosely (config.resolve validates them).
TYPES: dict[str, Any] = {**RANGES, "geometry": str | None, "output": str | None,
                         "stream": str | None, "address": str | None,
                         "device": cfgmod.DEVICE, "precision": cfgmod.one_of(PRECISIONS)}
LIST_NAME = "peaknet.lst"
GEOM_NAME = "peaknet.geom"
SUMMARY_NAME = "peaknet2cxi.json"
#: Peaks per frame and the hit rate over the whole output, drawn (:func:`write_run_plot`)
PLOT_NAME = "peaknet2cxi.png"
#: Where the warnings about unusable pixels, which stop after the first frames, say the
#: run's counts are (``finding.sanitise.SanitiseTally.reported_in``)
REPORTED_IN = f"the run summary and {SUMMARY_NAME}"
CONFIG_NAME = "peaknet2cxi.config.json"
#: The progress line's first word, alone and with --workers (one command, one line)
PROGRESS_LABEL = "peaknet2cxi"
PIPELINE_NAME = "peaknet2cxi.pipeline.json"
LIST_SUFFIXES = (".lst", ".txt", ".list")
#: Marks an input given with -i (a list file whatever its suffix).
LIST_MARK = "list:"
CXI_PREFIX = "peaks"
DIALS_DIR = "dials"


def build_parser() -> Any:
    parser = cfgmod.cli_parser(__doc__, prog="peaknet2cxi")
    parser.add_argument("inputs", nargs="*", help="CXI/HDF5 files, DIALS-readable images, or "
                        "list files")
    parser.add_argument("-i", "--input-list", dest="input_lists", action="append",
                        metavar="LIST", help="a list file as `indexamajig -i` takes (repeatable)")
    parser.add_argument("-o", "--output", help="output directory")
    parser.add_argument("-g", "--geometry", help="CrystFEL .geom the input is read through "
                        "(CXI/HDF5 input; images DIALS reads are read through their own "
                        "geometry without it)")
    source_option.add_argument(parser)
    parser.add_argument("--model", help="model name or weights file (default: default)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the network's arithmetic: fp32 (default: the same peaks on every "
                        "machine) or bf16 (1.1-1.6x faster on CPUs with native bfloat16, peaks "
                        "within float rounding of fp32's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (per worker with "
                        "--workers)")
    parser.add_argument("--threshold", type=float,
                        help=f"peak probability cut (default {FINDING.threshold:g})")
    parser.add_argument("--min-snr", dest="min_snr", type=float,
                        help=f"least integrated SNR of a peak (default {FINDING.min_snr:g}; 0: "
                             "keep every peak the model marks)")
    parser.add_argument("--min-height", dest="min_height", type=float,
                        help="least height of a peak's brightest pixel over its local "
                             "background, in background sigmas, as peakfinder8's --min-snr "
                             f"(default {FINDING.min_height:g}: no such cut; 5 removes most "
                             "noise peaks on blanks, and broad weak spots too)")
    parser.add_argument("--rescue-prob", dest="rescue_prob", type=float,
                        help="also keep peaks the model scores at least this, below "
                             "--threshold, when their brightest pixel stands --rescue-height "
                             "background sigmas high and it is point-like (default "
                             f"{FINDING.rescue_prob:g}; 1, not below --threshold, turns it off; "
                             "spots sharper than a pixel, as on LCLS CSPAD stills, score "
                             "0.3-0.6: README, 'What to expect')")
    parser.add_argument("--rescue-height", dest="rescue_height", type=float,
                        help="least height of such a peak, in background sigmas (default "
                             f"{FINDING.rescue_height:g})")
    parser.add_argument("--faint-support", dest="faint_support", type=int,
                        help="report a frame's faint peaks (brightest pixel under "
                             f"{FINDING.faint_height:g} background sigmas, or SNR under "
                             f"{FINDING.faint_snr:g}) only when at least this many of its peaks "
                             "are neither (default "
                             f"{FINDING.faint_support}; 0: always): blanks lose their noise "
                             "peaks, hits keep their weak spots")
    parser.add_argument("--adu-per-photon", dest="adu_per_photon", type=float,
                        help="detector gain for the shot noise in each peak's SNR (default: the "
                             "geometry's adu_per_photon, or adu_per_eV x photon energy, else "
                             "measured from the background; 0: background noise only)")
    parser.add_argument("--batch-size", type=int,
                        help="model input per batch, in 1-Mpx slots: each panel goes whole "
                             f"and takes one slot a megapixel (default {FINDING.batch_size})")
    parser.add_argument("--tile-size", dest="tile_size", type=int,
                        help="largest panel side the model sees whole (default "
                             f"{FINDING.tile_size}: every panel whole); smaller saves memory on "
                             "large panels at the price of a few peaks (99.5 %% found again in "
                             "512-1024 px tiles)")
    parser.add_argument("--min-peaks", type=int, help="peaks that make a hit (default "
                        f"{FINDING.min_peaks}, the library's; the stream's 'hit' flag, "
                        "--hits-only and the summary's hit count follow it)")
    parser.add_argument("--max-peaks", type=int, help="keep the strongest N peaks per frame "
                        f"(default {DEFAULT_MAX_PEAKS}, the width of Cheetah's peak tables; "
                        "indexamajig reads every peak a CXI table holds)")
    parser.add_argument("--hits-only", action="store_true", help="write only hits to the CXI "
                        "files (the stream still gets every frame)")
    parser.add_argument("--stream", help="also write a peaks-only CrystFEL stream here")
    parser.add_argument("--dials", action="store_true", help="also write OUTDIR/dials/"
                        "imported.expt + strong.refl for dials.index")
    parser.add_argument("--frames-per-file", type=int, help="frames per CXI file (default 1000)")
    parser.add_argument("--link", choices=["auto", "vds", "copy"],
                        help="link the images (vds) or copy them into the CXI files")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line (it has a total and an ETA where the inputs' "
                        "frames can be counted within 2 s; opening thousands of image files "
                        "takes longer, and the line then counts frames and their rate)")
    parser.add_argument("--workers", type=int, help="model workers (> 1: Ray pipeline)")
    parser.add_argument("--address", help="Ray cluster address (uses the Ray pipeline)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    cfgmod.setup_logging(getattr(args, "verbose", 0))
    lists = getattr(args, "input_lists", None) or []
    if lists:
        del args.input_lists
        args.inputs = list(getattr(args, "inputs", []) or []) + [f"{LIST_MARK}{p}" for p in lists]
    source_option.take(parser, args)
    config = cfgmod.resolve_or_exit(parser, DEFAULTS, args, types=TYPES)
    # a usage error, before the output folder is made
    source_option.check_or_exit(parser, config["source_options"])
    if not config["inputs"] or not config["output"]:
        build_parser().print_usage(sys.stderr)
        print("peaknet2cxi: need at least one INPUT (or -i LIST) and -o OUTDIR", file=sys.stderr)
        return 2
    try:  # an option this Python cannot serve: a usage error (one line), before any work
        check_dials_option(config)
    except DialsUnavailable as exc:
        print(f"peaknet2cxi: error: {exc}", file=sys.stderr)
        return 2
    try:
        # SIGTERM (a batch scheduler's stop) ends the run as Ctrl-C does: finished files kept,
        # partial ones closed, the record saying "interrupted"; exit 143 (130 for Ctrl-C)
        with sigterm_raises():
            check_model_option(config)  # before an input is opened or the output touched
            expansion = RunInputs(config["inputs"])  # this check's and the run's, read once
            check_dials_inputs(expansion.paths())
            check_output_folder(Path(config["output"]), config, expansion=expansion)
            make_output_folder(config["output"])  # the record goes in it
            record = Path(config["output"]) / CONFIG_NAME
            cfgmod.record(config, record, "peaknet2cxi", argv)
            summary = run(config, argv=argv, expansion=expansion, record=record)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): one line, as every
        # command says a stop, naming what is kept and how the run goes on
        print(f"peaknet2cxi: {interrupted(exc)}; {what_is_kept(Path(config['output']))}",
              file=sys.stderr)
        return exit_status(exc)
    except MemoryError as exc:  # numpy's, Python's, and torch's (finding.engine says it so)
        print(f"peaknet2cxi: error: out of memory: {exc or 'no more could be allocated'}",
              file=sys.stderr)
        print(f"peaknet2cxi: {MEMORY_ADVICE}", file=sys.stderr)
        _say_what_is_kept(Path(config["output"]), rerun=False)
        return 1
    except (PeakNetError, OSError, ValueError) as exc:
        print(f"peaknet2cxi: error: {exc}", file=sys.stderr)
        full = write_failed(exc)
        if full is not None:
            print("peaknet2cxi: the output could not be written: its disk is full (or a file "
                  "size or quota limit was reached); free space first", file=sys.stderr)
        _say_what_is_kept(Path(config["output"]), rerun=rerun_can_help(exc))
        if hdf5_write_failed(exc):
            # HDF5 keeps the dropped file whose writes failed in its own tables and crashes
            # flushing it when the interpreter shuts down (a segmentation fault, exit 139,
            # after these lines): everything finished is closed and said, so leave without it
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(1)
        return 1
    this = summary["this_run"]
    print(f"peaknet2cxi: {summary['output']} holds {summary['frames']} frames in "
          f"{len(summary['cxi_files'])} CXI file(s), {summary['hits']} hits "
          f"(>= {summary['min_peaks']} peaks), "
          + (f"{summary['left_out']} non-hits left out, " if summary["left_out"] else "")
          + f"{summary['peaks_per_frame']['mean']:.1f} peaks/frame; this run: {this['frames']} "
          f"frames ({this['skipped']} already done), {this['frames_per_s']:.2f} frames/s")
    if summary.get("plot"):
        print(f"peaknet2cxi: peaks per frame and hit rate over the run: {summary['plot']}")
    unusable = describe_tally(this.get("unusable_pixels") or {})
    if unusable:  # what the warnings, which stop after the first frames, promised
        print(f"peaknet2cxi: this run: {unusable} (counts: {SUMMARY_NAME}, "
              "this_run.unusable_pixels)")
    if summary.get("dials"):
        print(f"next (DIALS): {summary['dials']['command']}")
    if summary["indexamajig"] is None:  # frames without a geometry: nothing to index with
        print("next: indexamajig needs a geometry: run again into a new folder with -g GEOM "
              "(the detector's CrystFEL geometry) to have peaknet.geom written")
    elif summary.get("indexamajig_problems"):  # it would refuse the geometry as written
        print(f"next: indexamajig would refuse {summary['geometry']}: "
              f"{'; '.join(summary['indexamajig_problems'])}. Add what it lacks to it (or give "
              f"-g a geometry that has it, in a new folder), then run: {summary['indexamajig']}")
    else:
        print(f"next: {summary['indexamajig']}")
        print("      (YOUR.cell: your unit cell file, CrystFEL .cell or PDB CRYST1)")
    if summary.get("list") and any(c.isspace() for c in str(Path(summary["list"]).resolve())):
        print(f"note: indexamajig reads a list line as 'FILE EVENT', split at spaces, and "
              f"{summary['list']} names files in a folder whose path holds a space: it will "
              "not find them; use an output folder without spaces")
    return 0


def _unreadable(path: Path) -> str | None:
    """HDF5's reason a file cannot be opened, None when it opens."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as exc:
        return str(exc)


def _is_nexus(path: str) -> bool:
    """Whether an HDF5 file is NeXus (an ``NXentry`` at its top, as NXmx master files have):
    read by DIALS, so DIALS' reason is the one to say when it cannot read it."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return any(_nx_class(h5, name) == "NXentry" for name in h5)
    except (OSError, KeyError):
        return False


def _missing_link_targets(path: str) -> list[str]:
    """The files that a NeXus master's external links (its ``data_000001``...) name and that
    are not there, looked for as HDF5 does: beside the master for a relative name."""
    import h5py

    missing: list[str] = []

    def visit(group: Any) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                target = link.filename
                where = target if os.path.isabs(target) else os.path.join(
                    os.path.dirname(os.path.abspath(path)), target)
                if not os.path.exists(where) and target not in missing:
                    missing.append(target)
            elif isinstance(link, h5py.HardLink) and isinstance(group.get(name), h5py.Group):
                visit(group[name])

    try:
        with h5py.File(path, "r") as h5:
            visit(h5)
    except (OSError, KeyError):
        return missing
    return missing


def _nx_class(h5: Any, name: str) -> str:
    try:
        value = h5[name].attrs.get("NX_class", b"")
    except KeyError:  # a dangling link at the top
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _indexamajig_problems(geom_path: Path, files: Sequence[Path] = ()) -> list[str]:
    """What in the written geometry, or in the per-frame values it points indexamajig to,
    would make indexamajig refuse the run or index it wrongly (no camera length, no photon
    energy: ``Geometry.indexamajig_problems``; frames whose photon energy or camera length no
    input gave, stored as NaN in ``files``, which CrystFEL reads as numbers and its stream
    reader then refuses): the run says so rather than print a command that fails."""
    import h5py

    from peaknet_xtal.formats.cxi import CLEN_PATH, PHOTON_ENERGY_PATH
    from peaknet_xtal.formats.geometry import read_geometry

    try:
        problems = read_geometry(geom_path).indexamajig_problems()
    except PeakNetError as exc:  # the run's own geometry, unreadable: say that instead
        return [str(exc)]
    text = geom_path.read_text()
    for dataset, what, key in ((PHOTON_ENERGY_PATH, "photon energy", "photon_energy"),
                               (CLEN_PATH, "camera length", "clen")):
        if dataset not in text:
            continue
        missing = total = 0
        for path in files:
            try:
                with h5py.File(path, "r") as h5:
                    values = np.asarray(h5[dataset][()], dtype=float) if dataset in h5 else None
            except OSError:
                continue
            if values is not None:
                total += values.size
                missing += int(np.count_nonzero(~np.isfinite(values)))
        if missing:
            problems.append(f"{missing} of {total} frames have no {what} (neither the input "
                            f"nor the geometry gave one: stored as NaN); give the geometry a "
                            f"{key} as a number")
    return problems


def rerun_can_help(exc: BaseException) -> bool:
    """Whether running the same command again may get further: after a problem outside the
    inputs (a full disk, a lost mount: an OSError), not after a bad input (a FormatError: a
    damaged file, a wrong dataset path, another detector), nor a setting or a run with nothing
    to write, nor DIALS that cannot be imported (a broken one's cause is an OSError), which
    fail the same way every time.  The cause chain counts too (the Ray pipeline wraps what
    failed)."""
    chain = _chain(exc)
    if any(isinstance(e, (FormatError, DialsUnavailable)) for e in chain):
        return False
    if any(isinstance(e, PermissionError)
           or (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS))
           for e in chain):
        return False  # a folder it may not write to: the same command fails the same way
    return any(isinstance(e, OSError) for e in chain)


#: errno values of a write that failed for want of room: a full disk, a quota, a size limit
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
#: How HDF5's file driver words a failed write (h5py raises it as an OSError with its errno)
HDF5_WRITE_FAILED = "file write failed"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def hdf5_write_failed(exc: BaseException) -> bool:
    """Whether HDF5 failed to write a file in ``exc``'s chain (then it holds that file in its
    own tables and crashes flushing it at shutdown)."""
    from peaknet_xtal.formats.cxi import CXIWriteError

    return any(isinstance(e, CXIWriteError)
               or (isinstance(e, OSError) and HDF5_WRITE_FAILED in str(e)) for e in _chain(exc))


def write_failed(exc: BaseException) -> OSError | None:
    """The write in ``exc`` (or what caused it) that found no room (:data:`NO_ROOM`), if any."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in NO_ROOM), None)


#: What to do when memory runs out.  The network's whole-panel activations dominate on large
#: panels (a user trial, one 18-Mpx Eiger 16M panel: 1.9 GB peak, 1.4 GB in 1024-px tiles, where
#: --batch-size 1 saved 2 %); each worker holds a model and its frames.
MEMORY_ADVICE = ("cut large panels into tiles (--tile-size 1024 saves about a quarter on a 16-Mpx "
                 "panel, at the price of a few peaks), run fewer --workers, or give the job "
                 "more memory; with the same settings a rerun in the same output folder skips "
                 "the frames already written")


def what_is_kept(outdir: Path, *, rerun: bool = True) -> str:
    """What a stopped or failed run leaves, for the one line that says so: the CXI files
    finished before it and where they are, and (``rerun``, where the same command can help)
    that the same command continues the run.  Empty where there is nothing to say (a bad
    input, before any file was finished)."""
    kept = [p for p in _finished(outdir) if has_frame_keys(p)]  # ours, not a stranger's file
    if not kept:
        return "no CXI file was finished; re-run the same command to continue" if rerun else ""
    said = f"the {len(kept)} CXI file(s) finished before it are kept in {outdir}"
    if rerun:
        said += "; re-run the same command to continue (finished frames are skipped)"
    return said


def _say_what_is_kept(outdir: Path, *, rerun: bool) -> None:
    """After a failed run, the line below its error: :func:`what_is_kept` (nothing is said
    where there is nothing to say)."""
    said = what_is_kept(outdir, rerun=rerun)
    if said:
        print(f"peaknet2cxi: {said}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# the run


def run(config: Mapping[str, Any], *, argv: Sequence[str] | None = None,
        expansion: RunInputs | None = None, record: Path | None = None) -> dict[str, Any]:
    """Run peaknet2cxi with a resolved configuration (keys as :data:`DEFAULTS`); returns the
    summary that is also written to ``OUTDIR/peaknet2cxi.json``.  The numbers are checked
    against :data:`RANGES` here too, for Python callers (a ConfigError names the key).
    ``argv``: the command line's arguments, where there is one (:func:`main`), recorded in the
    stream's header as CrystFEL records its own command line; a Python caller's run records
    the command line that does the same (:func:`command_line`).  ``expansion``: the inputs as
    a caller that checked the output folder already expanded them (:func:`main`), so that
    their list files are read and their files looked for once a run; one for other inputs
    than ``config``'s is not used.  ``record``: the run record :func:`main` saved before the
    run (:data:`CONFIG_NAME`), to which the run adds the CPU threads it used
    (``config.add_to_record``), as the summary's ``this_run`` says them."""
    config = cfgmod.deep_merge(DEFAULTS, dict(config))
    config.update(cfgmod.validate({k: config[k] for k in RANGES},
                                  {k: DEFAULTS[k] for k in RANGES}, RANGES,
                                  [("run() arguments", config)]))
    check_precision(config["precision"])  # before the output folder is touched
    source_option.check(config["source_options"])
    check_dials_option(config)
    check_model_option(config)
    if expansion is None or not expansion.expands(config["inputs"]):
        expansion = RunInputs(config["inputs"])
    check_dials_inputs(expansion.paths())
    check_output_folder(Path(config["output"]), config, expansion=expansion)
    if int(config["workers"] or 1) > 1 or config["address"]:
        return _run_pipeline(config, expansion, record)
    return _run_serial(config, expansion, argv, record)


#: What ``--dials`` imports, and what else a user without DIALS can do.
_DIALS_EXPORT = ("dials.array_family.flex", "dxtbx.model.experiment_list")
_WITHOUT_DIALS = "run without --dials (the CXI files for indexamajig need no DIALS)"


def check_dials_option(config: Mapping[str, Any]) -> None:
    """Raise :class:`DialsUnavailable` where ``--dials`` is asked for and DIALS is not there
    or fails to load.  Why before the run: the export is written at its end, and without DIALS
    a run found every frame, wrote the CXI files and then stopped with a traceback (``No
    module named 'dials'``), leaving no summary; a DIALS that is there but fails to load (a
    compiled extension that does not load) stopped it there too, after all the finding.  The
    export's modules are imported in a child process, not in this one: imported before the
    model runs, cctbx would limit it to one thread (``require_dials`` with ``load=False``)."""
    if config.get("dials"):
        require_dials("--dials", *_DIALS_EXPORT, otherwise=_WITHOUT_DIALS, load=False,
                      before_writing=True)


def check_dials_inputs(paths: Sequence[str]) -> None:
    """Raise :class:`DialsUnavailable`, naming the first, where inputs named as images only
    DIALS reads (CBF, SMV, MarCCD: never HDF5, so known by the name alone) meet a DIALS that is
    not there or fails to load.  Why before the run: the first such input imported DIALS where
    the run reached it, after the inputs before it were found and the output folder was made,
    and a DIALS that crashes its importer ended the run without a word.  Imported in a child
    process, as for ``--dials`` (:func:`check_dials_option`)."""
    from peaknet_xtal.formats.dxtbx_images import ONE_IMAGE_SUFFIXES

    first = next((p for p in paths if str(p).lower().endswith(ONE_IMAGE_SUFFIXES)), None)
    if first is not None:
        require_dials(f"reading {first} through dxtbx", "dxtbx.model.experiment_list",
                      load=False, before_writing=True)


def check_model_option(config: Mapping[str, Any]) -> None:
    """The model ``--model`` names, checked as every host checks one
    (``model.weights_io.check_model``: a missing or damaged file, an architecture's name without
    weights, a plugin's network that breaks the hook contract), before an input is opened, the
    output folder made or the run's start logged.  Why here: the engine checks it too, but is
    made after all three, and a plugin model that downsamples left a new output folder with a
    record of a run that never started.  A predictor brings its own model, and a model object
    (Python callers) is checked batch by batch by the engine."""
    from peaknet_xtal.model.weights_io import check_model

    if config.get("predictor") is None and isinstance(config["model"], (str, os.PathLike)):
        check_model(config["model"])


def check_output_folder(outdir: Path, config: Mapping[str, Any] | None = None, *,
                        expansion: RunInputs | None = None) -> None:
    """Refuse a folder whose peaks-*.cxi or peaknet.lst peaknet2cxi did not write: they would be
    listed for indexamajig, overwritten, or numbered into; and, given the run's ``config``, one
    whose files were found with other settings (a rerun continues a run: checked before the
    run's configuration is recorded over the earlier one's).  ``expansion``: the run's inputs,
    expanded once for this check and the run (:class:`RunInputs`); else they are expanded
    here."""
    from peaknet_xtal.formats.cxi import CXIWriter, check_inputs_unchanged, check_same_settings

    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise FormatError(outdir, "the output must be a folder")
    foreign = CXIWriter.__new__(CXIWriter)  # only its file-name rules, nothing created
    foreign.directory, foreign.prefix = outdir, CXI_PREFIX
    others = foreign.foreign_files()
    for other in others:  # ours perhaps, damaged since: say that, not "someone else's"
        reason = _unreadable(other)
        if reason is not None:
            raise FormatError(other, f"cannot be read as HDF5 ({reason}): damaged or truncated "
                              "since it was written; delete it to have its frames found again "
                              "with the rest of the run, or choose a new output folder")
    if others:
        raise FormatError(others[0], f"not written by peaknet2cxi ({len(others)} such file(s) "
                          "in the output folder); choose an empty or new output folder")
    listing = outdir / LIST_NAME
    if listing.exists():  # ours names only peaks-NNNNN.cxi files of this folder
        try:
            named = [Path(line.strip()) for line in listing.read_text().splitlines()
                     if line.strip()]
        except (OSError, UnicodeDecodeError):
            named = [listing]
        # ours: peaks-NNNNN.cxi files of this folder, named by where the folder was when they
        # were listed (a moved folder's list names its old place, where they are no more)
        if any(not re.fullmatch(rf"{CXI_PREFIX}-\d{{5}}\.cxi", p.name)
               or (p.parent.resolve() != outdir.resolve()
                   and not (outdir / p.name).is_file() and p.exists())
               for p in named):
            raise FormatError(listing, "names files peaknet2cxi did not write here; it would "
                              "be overwritten: choose an empty or new output folder")
    if config is not None:
        finished = foreign.finished_files()
        check_same_settings(finished, finding_settings(config))
        # before the record and before Ray starts: a rerun over a regenerated input is refused
        # here as the writer would refuse it (CXIWriter.done_keys)
        sources = (expansion or RunInputs(config["inputs"])).paths()
        for path in finished:
            check_inputs_unchanged(path, sources)


def _run_serial(config: dict[str, Any], expansion: RunInputs,
                argv: Sequence[str] | None = None, record: Path | None = None
                ) -> dict[str, Any]:
    from peaknet_xtal.finding.engine import InferenceEngine
    from peaknet_xtal.formats.cxi import CXIWriter

    outdir = Path(config["output"])
    make_output_folder(outdir)
    geometry = _read_geometry(config["geometry"])
    inputs = expansion.entries()  # a list that failed to expand fails here, as it always did
    engine = InferenceEngine(config["model"], device=config["device"], threads=config["threads"],
                             precision=str(config["precision"]),
                             batch_size=int(config["batch_size"]),
                             tile_size=int(config["tile_size"]),
                             threshold=float(config["threshold"]),
                             min_snr=float(config["min_snr"]),
                             min_height=float(config["min_height"]),
                             rescue_prob=float(config["rescue_prob"]),
                             rescue_height=float(config["rescue_height"]),
                             faint_support=int(config["faint_support"]),
                             adu_per_photon=_optional_float(config["adu_per_photon"]),
                             min_peaks=int(config["min_peaks"]), max_peaks=config["max_peaks"],
                             predictor=config["predictor"])
    engine.sanitised.reported_in = REPORTED_IN
    cxi = CXIWriter(outdir, geometry, **_writer_options(config, expansion))
    stream = _open_stream(config, geometry, argv)
    done_cxi = cxi.done_keys()
    done_stream = stream.done_keys() if stream is not None else done_cxi
    stats = _Stats(skipped=0)
    started = time.perf_counter()
    error: BaseException | None = None
    seen_geometry: list[Any] = [geometry]
    options = dict(config["source_options"])
    total = _count_frames(inputs, geometry, options)
    try:
        with Progress(total, "frames", desc=PROGRESS_LABEL,
                      enabled=bool(config["progress"])) as bar:
            # the writer's own geometry check, early: a frame for another peaknet.geom is
            # refused before the time to find it is spent
            frames = _pending(inputs, geometry, done_cxi | set(), done_stream, stats, bar,
                              engine.observe, _checks(config, cxi.check_geometry), options)
            for result in engine.find_frames(frames):
                if seen_geometry[0] is None:
                    seen_geometry[0] = result.frame.geometry
                key = result.frame.key
                if key not in done_cxi:
                    cxi.write(result)
                if stream is not None and key not in done_stream:
                    stream.write(result)
                stats.add(result)
                bar.update(1, extra=stats.progress())
    except BaseException as exc:  # noqa: BLE001  (keep what is done, then re-raise)
        error = exc
        raise
    finally:
        _close_all(cxi, stream, error)
        # pixel defects found across the run; the advice names a mask slot peaknet.geom
        # leaves free (its slot 0 holds each frame's own mask), where the run wrote one (the
        # writer does before its first file: a run that failed before any has none to name)
        ours = outdir / GEOM_NAME
        engine.defects.save(outdir, seen_geometry[0],
                            geometry_file=ours if ours.exists() else None)
        summary = _finish(config, outdir, cxi.finished_files(), seen_geometry[0], stats,
                          time.perf_counter() - started, engine.describe(), error,
                          engine.sanitised.as_dict(), {"threads": engine.threads_used},
                          record)
    return summary


def _remove_partial_files(outdir: Path) -> None:
    """Remove the CXI files a stopped Ray run left unfinished (``.peaks-NNNNN.cxi.*.part``):
    a writer whose process the stop ended too (a scheduler's SIGTERM reaches every process of
    the job) cannot close them, and their frames are found again by a rerun, whose writer
    would remove them (``CXIWriter``).  After the pipeline has returned, no writer of this
    run writes there (the folder is peaknet2cxi's own: :func:`check_output_folder`)."""
    from peaknet_xtal.formats.cxi import unfinished_files

    for stale in unfinished_files(outdir, CXI_PREFIX):
        try:
            stale.unlink()
        except OSError as exc:  # the summary is still written; a rerun removes it
            log.warning("could not remove the unfinished %s: %s", stale, exc)


def _finished(outdir: Path) -> list[Path]:
    """The output's finished CXI files (none before the folder exists)."""
    if not outdir.is_dir():
        return []
    files = sorted(outdir.glob(f"{CXI_PREFIX}-*.cxi"))
    return [p for p in files if re.fullmatch(rf"{CXI_PREFIX}-\d{{5}}\.cxi", p.name)]


def _left_out(outdir: Path) -> int:
    """Frames the output records as found and left out (``--hits-only``: not hits)."""
    from peaknet_xtal.formats.cxi import count_nonhits

    return count_nonhits(outdir, CXI_PREFIX)


def _writer_options(config: Mapping[str, Any], expansion: RunInputs) -> dict[str, Any]:
    """What the CXI writer is told, the same for the serial run and the Ray pipeline (the
    inputs it records are the run's one expansion of them)."""
    from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS

    gain = _optional_float(config["adu_per_photon"])
    return {"frames_per_file": int(config["frames_per_file"]), "mode": config["link"],
            "max_peaks": max(int(config["max_peaks"] or 0), DEFAULT_MAX_PEAKS),
            "geometry_name": GEOM_NAME, "hits_only": bool(config["hits_only"]),
            "adu_per_photon": gain if gain else None, "settings": finding_settings(config),
            "inputs": expansion.paths()}


#: the settings that decide which peaks a frame gets and which frames are written: every CXI
#: file keeps them, and a rerun into a folder must use the same (formats.cxi.check_same_settings)
FINDING_KEYS = ("model", "precision", "tile_size", "threshold", "min_snr", "min_height",
                "rescue_prob", "rescue_height", "faint_support", "adu_per_photon", "min_peaks",
                "max_peaks", "hits_only")


def finding_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`FINDING_KEYS` of a resolved configuration as plain values, with the SHA-256 of
    the model's weights (a retrained model at the same path is another model)."""
    from peaknet_xtal.model.weights_io import model_digest

    settings = {key: _plain(config[key]) for key in FINDING_KEYS}
    settings["model_sha256"] = model_digest(config["model"])
    return settings


def _run_pipeline(config: dict[str, Any], expansion: RunInputs,
                  record: Path | None = None) -> dict[str, Any]:
    """Hand the run to the Ray pipeline (``--workers N`` / ``--address``), then finish alike."""
    try:
        from peaknet_xtal.pipeline import DEFAULTS as PIPELINE_DEFAULTS
        from peaknet_xtal.pipeline import run_pipeline
    except ImportError as exc:
        raise PeakNetError(f"--workers/--address need the Ray pipeline, which cannot be "
                           f"imported here ({exc}); run without them") from exc

    for option in ("stream", "dials"):
        if config[option]:
            raise PeakNetError(f"--{option} is written by the single-process run only; drop "
                               "--workers/--address, or run peaknet2cxi again without them on "
                               "the same output to add it")
    outdir = Path(config["output"])
    geometry = _read_geometry(config["geometry"])
    started = time.perf_counter()
    pipeline = {
        "inputs": expansion.entries(),
        # every input opened as the single-process run opens it (the geometry it names, etc.)
        "source_kind": open_worker_input,
        "source_options": {"geometry": geometry, "options": dict(config["source_options"])},
        # the given geometry is the one written for every frame, as in the single-process run
        # (whatever geometry a frame arrives with), and the one the writer checks, once
        "output": str(outdir), "writer": "cxi",
        # the pipeline's own record (rates, restarts) inside the output folder, not beside it
        "monitor_json": str(outdir / PIPELINE_NAME),
        "writer_options": {**_writer_options(config, expansion), "geometry": geometry},
        "workers": int(config["workers"] or 1), "address": config["address"],
        "model": config["model"], "device": config["device"],
        "threshold": float(config["threshold"]), "batch_size": int(config["batch_size"]),
        "frame_finder_options": {"min_peaks": int(config["min_peaks"]),
                              "precision": str(config["precision"]),
                              "tile_size": int(config["tile_size"]),
                              "min_snr": float(config["min_snr"]),
                              "min_height": float(config["min_height"]),
                              "rescue_prob": float(config["rescue_prob"]),
                              "rescue_height": float(config["rescue_height"]),
                              "faint_support": int(config["faint_support"]),
                              "adu_per_photon": _optional_float(config["adu_per_photon"]),
                              "max_peaks": config["max_peaks"]},
        "progress": bool(config["progress"]), "progress_label": PROGRESS_LABEL,
    }
    # each worker's CPU threads (and the CPUs Ray reserves for it): --threads, else the
    # pipeline's default, said here so that the run's record can say it too
    pipeline["threads_per_worker"] = int(config["threads"]
                                         or PIPELINE_DEFAULTS["threads_per_worker"])
    for item in pipeline["inputs"]:
        if item.get("events"):
            raise PeakNetError(f"{item['path']}: per-event list entries need the single-process "
                               "run (drop --workers)")
    pipeline["inputs"] = [item["path"] for item in pipeline["inputs"]]
    if config["adu_per_photon"] is None:
        gain = run_gain(pipeline["inputs"], geometry, config["source_options"])
        if gain is not None:  # every worker counts shot noise with the run's one gain
            pipeline["frame_finder_options"]["adu_per_photon"] = gain
            pipeline["writer_options"]["adu_per_photon"] = gain
    before = _Stats.from_cxi(_finished(outdir))
    left_before = _left_out(outdir) if config["hits_only"] else 0
    result: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        result = run_pipeline(pipeline)
        if result.get("interrupted"):  # the pipeline stops cleanly on Ctrl-C or SIGTERM and
            # returns: the run is unfinished all the same (exit 130 or 143, no next step)
            signum = signal.SIGTERM if result.get("stop_signal") == "SIGTERM" else signal.SIGINT
            raise stop_exception(signum)
    except BaseException as exc:  # noqa: BLE001  (summarise what is done, then re-raise)
        error = exc
        raise
    finally:
        if error is not None:
            _remove_partial_files(outdir)
        # as the single-process run: the summary says what the output holds and how it was
        # made (the engine's settings, as the pipeline's workers ran them), failed runs too
        files = _finished(outdir)
        stats = _Stats.from_cxi(files)  # this run: what the output gained, with the
        # frames it found and left out as not hits (--hits-only), as the single-process run
        # counts them
        stats.frames -= before.frames
        if config["hits_only"]:
            stats.frames += _left_out(outdir) - left_before
        stats.hits -= before.hits
        stats.peaks = stats.peaks[len(before.peaks):]
        done = result or getattr(error, "summary", None) or {}  # a failed run's summary too
        stats.skipped = int(done.get("resumed_keys", 0))
        summary = _finish(config, outdir, files, geometry, stats, time.perf_counter() - started,
                          {"pipeline": result.get("backend", "ray"),
                           **(result.get("engine") or getattr(error, "engine", None) or {})},
                          error, done.get("unusable_pixels"),
                          {"workers": pipeline["workers"],
                           "threads_per_worker": pipeline["threads_per_worker"]}, record)
    return summary


# --------------------------------------------------------------------------------------------
# inputs


class RunInputs:
    """A run's inputs, expanded (:func:`expand_inputs`) at most once for every step that needs
    them: the output-folder checks (:func:`main`'s before the configuration is recorded, and
    :func:`run`'s), the inputs the CXI writer records, and the run.  Each expansion reads every
    list file again and looks for every file it names (slow for a long list on a network
    disk), and says each list's repeated events.  A failed expansion is kept as well: the
    output-folder check goes on with the inputs as given, and the run reports the error where
    it always did (after the geometry is read), without reading the lists again."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self.given = list(inputs)
        self._entries: list[dict[str, Any]] | None = None
        self._error: PeakNetError | OSError | ValueError | None = None

    def expands(self, inputs: Sequence[Any]) -> bool:
        """Whether these are the inputs this expansion is of (a caller's may be for others)."""
        return self.given == list(inputs)

    def entries(self) -> list[dict[str, Any]]:
        """The expanded inputs (``[{"path", "events"}]``, as :func:`expand_inputs`); raises
        the expansion's error, every time it is asked, if it failed."""
        if self._error is not None:
            raise self._error
        if self._entries is None:
            try:
                self._entries = expand_inputs(self.given)
            except (PeakNetError, OSError, ValueError) as exc:
                self._error = exc
                raise
        return self._entries

    def paths(self) -> list[str]:
        """The input files (list files expanded); inputs that do not expand count as given
        here, and the run reports them in order (:meth:`entries`)."""
        try:
            return [str(entry["path"]) for entry in self.entries()]
        except (PeakNetError, OSError, ValueError):
            return [str(p) for p in self.given]


def expand_inputs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """``[{"path", "events"}]`` from files and ``indexamajig -i`` style list files.

    A list line is ``path`` or ``path event`` (e.g. ``run7.cxi //3``); relative paths are taken
    from the current directory, like indexamajig does, or else beside the list file.  Each
    name, given or listed, is resolved by :func:`resolve_input` (a plugin source's name in a
    list, with events or without, is its input as it is on the command line).  A list
    that names no file is an error, not an empty run.  A list's events named more than once
    are said once each call (a run expands its inputs once: :class:`RunInputs`), a list given
    twice included.
    """
    out: dict[str, dict[str, Any]] = {}
    warned: set[str] = set()  # lists whose repeated events were said
    again: list[str] = []  # inputs naming a file given before (itself, or a link to it)
    for item in inputs:
        text = os.fspath(item)
        forced = text.startswith(LIST_MARK)
        path = Path(text[len(LIST_MARK):] if forced else text)
        if forced or path.suffix.lower() in LIST_SUFFIXES:
            if not path.exists():
                raise FormatError(path, "list file not found")
            if path.is_dir():
                raise _folder_given(path)
            lines = list(_list_lines(path))
            if not lines:
                raise FormatError(path, "the list names no files")
            repeated = 0
            for line_no, line in lines:
                # a whole line naming a file is that file (a path with spaces, which indexamajig
                # itself would split); else ``FILE`` or ``FILE EVENT``, as indexamajig reads it
                target = _locate(line, path)
                parts = [line] if target is not None else line.split()
                if len(parts) > 2:
                    raise FormatError(path, f"{line!r}: a list line is 'FILE' or 'FILE EVENT' "
                                      f"(indexamajig's list format), not {len(parts)} words",
                                      line=line_no)
                key, name = resolve_input(parts[0], (path, line_no), target)
                entry = out.setdefault(key, {"path": name, "events": set(), "list": str(path)})
                if len(parts) > 1:
                    if entry["events"] is None:
                        continue
                    repeated += parts[1] in entry["events"]
                    entry["events"].add(parts[1])
                else:
                    entry["events"] = None
            if repeated and str(path) not in warned:
                warned.add(str(path))
                log.warning("%s: %d event(s) listed more than once; each is processed once",
                            path, repeated)
        else:
            key, name = resolve_input(text)
            if key in out and out[key].get("list") is None:
                again.append(text)
            out.setdefault(key, {"path": name, "events": None})["events"] = None
    if again:  # eight links to one CBF ran as "0/1 frames" without a word
        log.warning("%d input(s) name a file given before (the same file, or a link to it: "
                    "%s%s); each file is processed once", len(again), ", ".join(again[:3]),
                    ", ..." if len(again) > 3 else "")
    for entry in out.values():
        if entry["events"] is not None and not entry["events"]:
            entry["events"] = None
    return list(out.values())


def resolve_input(name: str, listed: tuple[Path, int] | None = None,
                  found: Path | None = None) -> tuple[str, str]:
    """``(identity, path)`` of one input named on the command line or, with ``listed`` (the
    list file and line), on a list line; ``found``: where the caller found it already.

    One rule for both, since a list line is an input as a direct argument is: a list's entry
    that was no file was refused as "not found" (a folder as "a folder") without asking the
    plugin sources, which every direct argument asks.  A file is itself, named by its
    absolute path and known by its resolved one (a link and its file are one input).  A name
    no file answers to (a folder, a network address, an LCLS run) goes to the first plugin
    source whose ``sniff`` claims it: a folder by its absolute path, any other name as typed
    (``Path()`` would make ``zmq://h`` ``zmq:/h``).  A list line's name is looked for in the
    current folder, as indexamajig takes it, then beside the list file.  One no plugin
    claims is a FormatError naming the plugins that failed to load (``registry.unclaimed``).
    """
    found = found or _locate(name, listed[0] if listed is not None else None)
    if found is not None and not found.is_dir():
        return os.path.realpath(found), str(found)
    asked = str(found) if found is not None else name
    if sniff_plugin_source(asked) is not None:
        return (os.path.realpath(found) if found is not None else name), asked
    if listed is not None:
        list_file, line = listed
        if found is None:
            raise unclaimed(FormatError(list_file, f"listed file {name!r} not found", line=line))
        raise unclaimed(FormatError(list_file, f"{name!r} is a folder: list its image files",
                                    line=line))
    if found is None:
        raise unclaimed(FormatError(Path(name), "input file not found"))
    # said as that: "not a CXI/HDF5 file and not an image" misled
    raise unclaimed(_folder_given(found))


def _folder_given(folder: Path) -> FormatError:
    """The error for a folder given as an input: how to name its images, with a glob of the
    kind of file it holds most (``*.cbf.bz2`` for a folder of those: a ``*.cbf`` glob
    suggested there matched nothing)."""
    kinds = collections.Counter("".join(f.suffixes) for f in folder.iterdir()
                                if f.is_file() and not f.name.startswith(".") and f.suffixes)
    glob = f"{folder}/*{kinds.most_common(1)[0][0]}" if kinds else f"{folder}/*"
    return FormatError(folder, f"a folder, not an input file: give its image files (a glob "
                       f"such as {glob}, unquoted) or a list file")


def _list_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(path, f"cannot read list file ({exc})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split(";", 1)[0].strip()
        if line and not line.startswith("#"):  # '#' lines: comments, as in shell-made lists
            yield number, line


def _locate(name: str, list_file: Path | None = None) -> Path | None:
    """``name`` made absolute (:func:`_absolute`) where something is there: in the current
    folder, else beside ``list_file`` (a list line's name); None where nothing is."""
    for candidate in (Path(name), *(() if list_file is None else (list_file.parent / name,))):
        if candidate.exists():
            return _absolute(candidate)
    return None


def _absolute(path: Path) -> Path:
    """``path`` made absolute with its symbolic links kept: the name a user gives is the file
    (a link named with an image number, as the refusal of a numberless name advises, or one
    with its geometry file beside it).  Resolved, the input was the link's target: the same
    refusal again, naming a file the user never gave, and the geometry beside it unseen."""
    return Path(os.path.abspath(path))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _read_geometry(path: Any) -> Any:
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    from peaknet_xtal.formats.geometry import read_geometry

    return read_geometry(path)


#: HDF5 inputs read without a geometry that were said to be (:func:`open_input`)
_WARNED_NO_GEOMETRY: set[str] = set()


def open_input(path: str, geometry: Any = None,
               options: Mapping[str, Any] | None = None) -> Any:
    """A frame source for one input, as every ``peaknet2cxi`` run opens it, single-process and
    in the Ray pipeline's source actors (it is their ``source_kind``): CXI/HDF5 through the
    geometry (without ``-g``: the geometry the file names, else DIALS' reading of it, else one
    panel a frame), anything else by the built-in sources' sniffing.  Why one function: the Ray
    sources opened inputs by sniffing alone, so without ``-g`` a peaknet-sim CXI file's own
    geometry was not used there: other peaks on every frame than the single-process run gave,
    and no ``.geom`` for indexamajig.

    An input the built-ins cannot read goes to the first plugin source whose ``sniff`` claims
    it, with ``geometry`` (where given) and the ``options`` (``--source-option``) its type
    declares: every HDF5 file went to the built-in readers, so a plugin's HDF5 format ended in
    "no image dataset found" although the README promises plugins every input no built-in
    reads.  One no source claims keeps the built-ins' error, naming any plugin that failed to
    load (``registry.unclaimed``); a plugin's broken hook (a PluginError) is said as itself.
    """
    from peaknet_xtal.registry import checked_source, open_source, sniff_builtin_source

    try:
        return _open_builtin(path, geometry)
    except FormatError as exc:
        kind = sniff_plugin_source(path)
        if kind is None:
            if sniff_builtin_source(path) is not None:
                raise  # a built-in's input, refused for a reason of its own
            raise unclaimed(exc) from exc.__cause__
    given = source_option.for_type(kind, options)
    if geometry is not None:
        given["geometry"] = geometry
    return checked_source(open_source(path, kind, **given), kind, path)


def _open_builtin(path: str, geometry: Any) -> Any:
    """:func:`open_input` by the built-in sources alone; a FormatError where none reads it."""
    import h5py

    from peaknet_xtal.registry import open_source, sniff_builtin_source

    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise FormatError(path, f"cannot read file ({exc})") from exc
    if is_hdf5 and geometry is None:
        # Without -g: the geometry a CXI file names (peaknet-sim's, peaknet2cxi's), else a
        # NeXus file's own (an Eiger master), which DIALS reads; a plain stack has none: each
        # frame is then one panel (right for a one-panel detector; a multi-panel one's gaps
        # and borders would be read as pixels) and no .geom is written for indexamajig
        from peaknet_xtal.formats.cxi import geometry_path

        named = geometry_path(path)
        if named is not None:
            return open_source(path, "cxi", geometry=named)
        # DIALS is asked first; without it, whether it would read the file (and its detector)
        # cannot be known, and a plain one-panel reading could differ from the run with DIALS
        require_dials(f"reading {path} without -g (DIALS reads the geometry of a NeXus file)",
                      "dxtbx.model.experiment_list",
                      otherwise="give the detector's CrystFEL geometry with -g")
        try:
            return open_source(path, "dxtbx")
        except (FormatError, ValueError) as exc:
            unread = exc
        try:
            source = open_source(path, "cxi", geometry=None)  # its own error: no images
        except FormatError:
            if _is_nexus(path):  # DIALS' reason, not a search for a stack it never had
                raise _nexus_unread(path, getattr(unread, "message", str(unread))) from unread
            raise
        if path not in _WARNED_NO_GEOMETRY:  # once a file (it is opened to count, then to run)
            _WARNED_NO_GEOMETRY.add(path)
            log.warning("%s: no geometry given (-g) or found beside it: each frame is read as "
                        "one panel, and no .geom is written for indexamajig; give the "
                        "detector's CrystFEL geometry with -g for a detector of several panels",
                        path)
        return source
    if is_hdf5:
        return open_source(path, "cxi", geometry=geometry)
    if Path(path).suffix.lower() in HDF5_SUFFIXES:  # HDF5 by its name, not by its bytes
        raise _not_hdf5(path, geometry is not None)
    kind = sniff_builtin_source(path)
    if kind is None:  # no built-in claims it
        if geometry is not None:
            raise _not_hdf5(path, True)
        raise FormatError(path, "not a CXI/HDF5 file and not an image DIALS can read")
    try:  # with -g read through it, as indexamajig -g reads a CBF file
        return (open_source(path, kind) if geometry is None
                else open_source(path, kind, geometry=geometry))
    except (GeometryError, ImageRefused):  # read, but refused for a reason said in full
        raise
    except FormatError as exc:  # named like an image DIALS reads, but it could not read it
        if geometry is not None:  # -g: a CXI/HDF5 input by the user's own statement
            raise _not_hdf5(path, True, _dials_reason(exc)) from exc
        raise _damaged(path, exc) from exc


class _ReadErrorsSaid:
    """An open source whose frames' read errors are said as the single-process run says them
    (:func:`_frames`): the Ray source actors iterate a source themselves, and said only "cannot
    read image 0" where a NeXus master's data file was missing."""

    def __init__(self, source: Any, path: str) -> None:
        self.source, self.path = source, path

    def __iter__(self) -> Iterator[Frame]:
        return _frames(self.source, self.path)

    def __len__(self) -> int:
        return len(self.source)

    def close(self) -> None:
        self.source.close()

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not yet set: no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def open_worker_input(path: str, geometry: Any = None,
                      options: Mapping[str, Any] | None = None) -> Any:
    """:func:`open_input` for the Ray pipeline's source actors (their ``source_kind``), its
    read errors said as in the single-process run."""
    return _ReadErrorsSaid(open_input(path, geometry, options), path)


def run_gain(inputs: Sequence[str], geometry: Any,
             options: Mapping[str, Any] | None = None) -> float | None:
    """The detector gain the run's first frames settle on, measured before the Ray workers
    start as the single-process engine measures it over the same frames
    (:class:`~peaknet_xtal.finding.gain.GainResolver`: the median of the first five frames
    that show one, looking at up to 50), for every worker to use; None where the inputs
    declare a real gain (each frame then keeps its own) or none can be measured.

    Why: each worker measured its own gain on the frames it happened to get first, so a
    frame's peaks depended on the number of workers and on scheduling (a real CSPAD still:
    132 peaks single-process, 129 with two workers; the gain written into peaknet.geom 30.3
    against 32.7).  The single-process run uses the running median on the frames before its
    gain settles (at most its first four measured frames), so only those can differ from it."""
    from peaknet_xtal.finding.gain import GainResolver, is_real_gain, panel_names
    from peaknet_xtal.finding.sanitise import sanitise_frame
    from peaknet_xtal.finding.settings import resolve_gain

    resolver = GainResolver()
    gain = declared = None
    try:
        for path in inputs:
            source = open_input(path, geometry, options)
            try:
                for frame in _frames(source, path):
                    declared = resolve_gain(meta=frame.meta, geometry=frame.geometry)
                    if is_real_gain(declared):
                        return None
                    goods = sanitise_frame(frame.panels, frame.masks,
                                           frame.meta.get("dtype"))[1]
                    gain = resolver(declared, frame.panels, goods,
                                    panel_names(frame.geometry, len(frame.panels)))
                    if resolver.settled:
                        break
            finally:
                source.close()
            if resolver.settled:
                break
    except (PeakNetError, OSError, ValueError):
        pass  # a bad input: the run itself reports it, in order, after the frames before it
    if gain is None or gain == declared:
        return None
    log.info("detector gain %.4g ADU per photon, measured from the run's first frames' "
             "background: every worker uses it", gain)
    return float(gain)


#: Names of HDF5 files (CXI, NeXus, plain stacks): such a file without HDF5's signature is a
#: broken HDF5 file, not an image for DIALS to try.
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs", ".nx5", ".he5")


def _not_hdf5(path: str, with_geometry: bool, dials: str | None = None) -> FormatError:
    """A file given as HDF5 (by its name, or with -g, which most runs give for CXI/HDF5 input)
    that lacks HDF5's signature, said as that rather than as DIALS' failure to read an image
    (which it was never meant to be); DIALS' reason is added where it was asked too (a -g run
    may list CBFs)."""
    why = " (input given with -g)" if with_geometry else ""
    also = f", nor an image DIALS can read ({dials})" if dials else ""
    return FormatError(path, f"not a readable HDF5 file{why}: it lacks HDF5's signature (a "
                       f"damaged or truncated copy, or another kind of file){also}")


def _dials_reason(exc: FormatError) -> str:
    """dxtbx's own reason for not reading a file, on one line."""
    cause = exc.__cause__
    return (f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause is not None
            else exc.message)


def _nexus_unread(path: str, reason: str) -> FormatError:
    """A NeXus file DIALS cannot read, with DIALS' reason and the data files its links name
    that are not there (HDF5 says only "can't open file", naming neither)."""
    missing = _missing_link_targets(path)
    if missing:
        reason += f"; the data files it links to are missing: {', '.join(missing)}"
    return FormatError(path, f"a NeXus file that DIALS cannot read: {reason}")


def _damaged(path: str, exc: FormatError) -> FormatError:
    """DIALS' failure to read a file named like one of its images, said as what it most likely
    is (a damaged or truncated file: a copy cut short, a disk that filled), with dxtbx's own
    reason; dxtbx says only that it could not read it.  A NeXus master whose linked data files
    are missing is said as that, naming them: DIALS opens such a master (a rotation series
    counts its images from the master's own axis) and fails only on reading an image."""
    if _is_nexus(path) and _missing_link_targets(path):
        return _nexus_unread(path, _dials_reason(exc))
    return FormatError(path, "DIALS cannot read this image: the file may be damaged or "
                       f"truncated ({_dials_reason(exc)})")


def _frames(source: Any, path: str) -> Iterator[Frame]:
    """The frames of an open source, each checked to be a Frame (a plugin's source yielding
    anything else is an error naming it: ``registry.checked_frames``); where DIALS fails to
    read one, the error says the file may be damaged (see :func:`_damaged`)."""
    from peaknet_xtal.registry import checked_frames

    if getattr(source, "name", None) != "dxtbx":
        yield from checked_frames(source, path)
        return
    try:
        yield from source
    except ImageRefused:  # refused for a reason said in full (a file cut short, say)
        raise
    except FormatError as exc:
        raise _damaged(path, exc) from exc


def _checks(config: Mapping[str, Any],
            check_geometry: Callable[[Frame], None]) -> Callable[[Frame], None]:
    """What each frame must pass before it is found: the writer's geometry check, and with
    --dials a geometry at all.  Why the second here: the DIALS export imports HDF5 frames
    through the ``.geom`` written for them, and a plain stack read without -g has none; the
    export failed after every frame had been found, naming a file the run had said it would
    not write."""
    if not config["dials"]:
        return check_geometry

    def check(frame: Frame) -> None:
        if frame.geometry is None:
            raise PeakNetError(f"{frame.source}: --dials imports HDF5 frames through the "
                               "geometry written for them, and this file, read without -g, "
                               "has none: give the detector's CrystFEL geometry with -g, or "
                               "drop --dials")
        check_geometry(frame)

    return check


def _count_frames(inputs: list[dict[str, Any]], geometry: Any,
                  options: Mapping[str, Any] | None = None) -> int | None:
    """Total frames for the progress bar: None when a source cannot say cheaply, or when
    counting them all would hold up the first frame (``progress.count_within``)."""
    from peaknet_xtal.formats.dxtbx_images import ONE_IMAGE_SUFFIXES

    def frames_in(entry: dict[str, Any]) -> int | None:
        if entry["events"] is not None:
            return len(entry["events"])
        if str(entry["path"]).lower().endswith(ONE_IMAGE_SUFFIXES):
            return 1
        try:
            source = open_input(entry["path"], geometry, options)
        except (TypeError, PeakNetError, OSError, ValueError):
            return None  # the run itself reports the error, in order, after earlier inputs
        return closed_length(source)

    return count_within(inputs, frames_in)


def _pending(inputs: list[dict[str, Any]], geometry: Any, done_cxi: set[tuple[str, str]],
             done_stream: set[tuple[str, str]], stats: _Stats, bar: Progress,
             observe: Callable[[Frame], None] | None = None,
             check: Callable[[Frame], None] | None = None,
             options: Mapping[str, Any] | None = None) -> Iterator[Frame]:
    """Frames not yet in every output, input by input (a bad input fails after the good ones
    before it were processed).  An input without frames is reported; events a list asks for
    that the file lacks are an error naming both.  Frames already done go to ``observe`` (the
    engine's run-level measurements, e.g. the gain, see them as an uninterrupted run would);
    frames to do pass ``check`` first (an input error comes after the frames before it are
    found: ``InferenceEngine.find_frames``).  ``options``: the run's source options
    (:func:`open_input`)."""
    # by file, whatever name it was given under, then and now (types.resolved_key)
    done = {resolved_key(key) for key in done_cxi} & {resolved_key(key) for key in done_stream}
    for entry in inputs:
        source = open_input(entry["path"], geometry, options)
        seen: set[str] = set()
        try:
            if _known_length(source) == 0:
                log.warning("%s holds no frames: nothing to do for it", entry["path"])
            for frame in _frames(source, entry["path"]):
                seen.add(frame.event)
                if entry["events"] is not None and frame.event not in entry["events"]:
                    continue
                if resolved_key(frame.key) in done:
                    if observe is not None:
                        observe(frame)
                    stats.skipped += 1
                    bar.update(1)
                    continue
                if check is not None:
                    check(frame)
                yield frame
        finally:
            source.close()
        missing = sorted(set(entry["events"] or ()) - seen)
        if missing:
            raise FormatError(entry.get("list", entry["path"]),
                              f"{entry['path']} has no event(s) {', '.join(missing)} "
                              f"({len(seen)} frames: {min(seen, default='none')} to "
                              f"{max(seen, default='none')})")


def _known_length(source: Any) -> int | None:
    """``len(source)``, None where the source cannot know it before its frames are read (it
    raises TypeError, as the hookspecs ask of a live stream or an LCLS run)."""
    try:
        return len(source)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# outputs


def _open_stream(config: Mapping[str, Any], geometry: Any,
                 argv: Sequence[str] | None = None) -> Any:
    if not config["stream"]:
        return None
    from peaknet_xtal.registry import open_writer

    return open_writer("stream", os.fspath(config["stream"]), geometry=geometry,
                       command=command_line(config, argv))


#: Settings a command line cannot give (Python callers' objects) or gives as its positionals.
_NOT_OPTIONS = ("inputs", "predictor")
#: Options whose flag is not ``--`` + the key with dashes.
_FLAGS = {"geometry": "-g", "output": "-o"}


def command_line(config: Mapping[str, Any], argv: Sequence[str] | None = None) -> str:
    """The run's command line, shell-quoted (:func:`shell_command`), for the stream header's
    third line, where CrystFEL writes its whole command line: ``argv`` as given where there is
    one; for a Python caller, the command that runs the same: the inputs (list files as
    ``-i LIST``) and every setting that differs from its default."""
    if argv is not None:
        return shell_command(["peaknet2cxi", *argv])
    words: list[Any] = ["peaknet2cxi"]
    for item in config["inputs"]:
        text = os.fspath(item)
        words += ["-i", text[len(LIST_MARK):]] if text.startswith(LIST_MARK) else [text]
    for key, default in DEFAULTS.items():
        value = config.get(key, default)
        if key in _NOT_OPTIONS or value == default:
            continue
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        if key == "source_options":  # one --source-option KEY=VALUE each
            for name, given in value.items():
                words += ["--source-option", f"{name}={given}"]
        elif isinstance(value, bool):
            words.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            words += [flag, _plain(value)]
    return shell_command(words)


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
        self.peak_total = 0  # sum(self.peaks), kept as it grows: the progress line's O(1)

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        self.hits += int(result.hit)
        self.peaks.append(len(result.peaks))
        self.peak_total += len(result.peaks)

    def progress(self) -> str:
        """The progress line's counts, in the words the Ray pipeline's line uses too
        (``progress.finding_counts``), from running sums: the mean of every frame's count,
        taken again at each frame, cost 31 ms a frame by the millionth frame (2-core machine)."""
        return finding_counts(self.hits, self.frames, self.peak_total)

    @classmethod
    def from_cxi(cls, files: Sequence[Path]) -> _Stats:
        """Counts over every frame in the output's CXI files (all runs together)."""
        return cls.of(*peak_counts(files))

    @classmethod
    def of(cls, counts: np.ndarray, hits: np.ndarray) -> _Stats:
        """Counts over frames of these peak counts and hit flags (:func:`peak_counts`)."""
        stats = cls()
        stats.frames, stats.hits = len(counts), int(np.sum(hits))
        stats.peaks = counts.astype(int).tolist()
        stats.peak_total = int(np.sum(counts))
        return stats

    def summary(self) -> dict[str, float]:
        peaks = np.asarray(self.peaks or [0])
        return {"mean": float(peaks.mean()), "median": float(np.median(peaks)),
                "min": int(peaks.min()), "max": int(peaks.max())}


def indexamajig_command(list_path: Path, geom_path: Path, outdir: Path,
                        nproc: int | None = None) -> str:
    """The complete next step; ``YOUR.cell`` is the one thing only the user can supply.  Each
    argument is quoted for the shell (:func:`shell_command`): a folder named with a space must
    still give a command that can be pasted."""
    nproc = nproc or os.cpu_count() or 1
    return shell_command(["indexamajig", "-i", list_path, "-g", geom_path, "--peaks=cxi",
                          "--indexing=xgandalf", "-p", "YOUR.cell", "-o",
                          outdir / "peaknet.stream", "-j", nproc])


def shell_command(words: Sequence[Any]) -> str:
    """A command line as a POSIX shell reads it back: every word quoted where it needs to be
    (spaces, quotes, ``$``...), so a printed command runs as printed when pasted."""
    return shlex.join(os.fspath(w) if isinstance(w, os.PathLike) else str(w) for w in words)


def dials_index_command(expt: Path, refl: Path, *, rotation: bool = False,
                        grid: bool = False) -> str:
    """The ``dials.index`` command for what ``--dials`` wrote (shell-quoted); the space group
    and cell are the user's to fill in.  Stills are indexed one by one, with the indexer
    Debian's DIALS build has; rotation series (``rotation``: every experiment a sequence that
    turns) as ``dials.import`` + ``dials.find_spots`` output is, with DIALS' defaults.  Images
    of a grid scan (``grid``: sequences that do not turn, an experiment an image sharing one
    imageset) take the stills indexer: DIALS 3.12's sequences indexer, its default for them
    too, indexes each and then fails joining the tables ('IndexError: list index out of
    range'), on dials.find_spots' own spots as on these (three real Pilatus 6M grid frames)."""
    indexer = "stills" if grid else "sequences"
    stills = [] if rotation else ["joint_indexing=False", f"stills.indexer={indexer}",
                                  "indexing.method=fft1d"]
    return shell_command(["dials.index", expt, refl, *stills,
                          "indexing.known_symmetry.space_group=YOUR_SPACE_GROUP",
                          "indexing.known_symmetry.unit_cell=YOUR_CELL"])


def peak_counts(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every frame's peak count and hit flag in the output's CXI files, in the order they were
    written (file by file, row by row): all runs of the folder together, so that a resumed
    run's summary and plot cover every frame.  Only ``nPeaks`` and the hit flags are read, not
    the peak tables: a run of 10^6 frames reads a few MB.  A file without hit flags (none this
    package writes) counts no hits, as the summary always has."""
    import h5py

    from peaknet_xtal.formats.cxi import KEY_GROUP, PEAK_GROUP

    counts: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    for path in files:
        with h5py.File(path, "r") as h5:
            counts.append(np.asarray(h5[f"{PEAK_GROUP}/nPeaks"][()], dtype=np.int64))
            hits.append(np.asarray(h5[f"{KEY_GROUP}/hit"][()], dtype=bool)
                        if f"{KEY_GROUP}/hit" in h5 else np.zeros(len(counts[-1]), bool))
    if not counts:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(counts), np.concatenate(hits)


def write_run_plot(outdir: Path, counts: np.ndarray, hits: np.ndarray, min_peaks: int,
                   left_out: int = 0, status: str = "ok") -> Path | None:
    """``OUTDIR/peaknet2cxi.png``: peaks per frame over the run with the hit threshold, the
    running hit rate and the histogram of peaks per frame (:func:`~peaknet_xtal.run_plots.
    peaks_figure`), of every frame in the folder (:func:`peak_counts`).  None, after one
    warning, where it cannot be written: the run's outputs and status stand without it."""
    from peaknet_xtal.run_plots import peaks_figure, write_plot

    seen = len(counts) + left_out
    rate = 100 * int(np.sum(hits)) / seen if seen else 0.0
    title = (f"peaknet2cxi: {outdir}: {seen} frames, {int(np.sum(hits))} hits ({rate:.1f} %), "
             f"min_peaks {min_peaks}" + ("" if status == "ok" else " (run "
                                         f"{status.split(':')[0]}: see {SUMMARY_NAME})"))
    return write_plot(outdir / PLOT_NAME, lambda: peaks_figure(counts, hits, min_peaks,
                                                               left_out=left_out, title=title))


def _finish(config: Mapping[str, Any], outdir: Path, files: list[Path], geometry: Any,
            stats: _Stats, seconds: float, engine: Mapping[str, Any],
            error: BaseException | None,
            unusable: Mapping[str, int] | None = None,
            used: Mapping[str, int | None] | None = None,
            record: Path | None = None) -> dict[str, Any]:
    """Write the list file and the JSON summary (atomically), describing the whole output.

    The geometry file is written by the CXI writer before the first CXI file appears.  Without
    any CXI file no list is written and no indexamajig command is given.  ``unusable``: the
    run's counts of unusable pixels and frames without data
    (``finding.sanitise.SanitiseTally.as_dict``, summed over the workers of a Ray run), kept
    as ``this_run.unusable_pixels``: its warnings stop after the first frames and promise
    these counts (:data:`REPORTED_IN`).  ``used``: the CPU threads the run ran on (``threads``,
    None where no frame was found; with --workers ``workers`` and ``threads_per_worker``),
    kept in ``this_run`` and added to the run ``record`` (``config.add_to_record``): the
    configuration's ``threads`` is what was given, null where the machine chose.
    """
    from peaknet_xtal.atomic import write_json_atomic, write_text_atomic

    list_path = outdir / LIST_NAME
    geom_path = outdir / GEOM_NAME
    if files:
        write_text_atomic(list_path, "".join(f"{p.resolve()}\n" for p in files))
    counts, hits = peak_counts(files)
    whole = _Stats.of(counts, hits)
    left_out = _left_out(outdir) if config["hits_only"] else 0
    status = ("ok" if error is None else "interrupted" if isinstance(error, KeyboardInterrupt)
              else f"failed: {error}")
    if error is None and not files:
        status = "failed: no frames written (the inputs hold no frames, or none were hits)"
    if record is not None and used:  # a stopped or failed run's too: what it ran on
        cfgmod.add_to_record(record, used)
    # before the summary, which names it; a stopped or failed run's too: what the folder holds
    plot = (write_run_plot(outdir, counts, hits, int(config["min_peaks"]), left_out, status)
            if files else None)
    summary: dict[str, Any] = {
        "status": status, "output": str(outdir),
        **({"stop_signal": signal_name(error)} if isinstance(error, KeyboardInterrupt) else {}),
        "frames": whole.frames, "hits": whole.hits, "min_peaks": int(config["min_peaks"]),
        # over every frame found, the non-hits a --hits-only run leaves out too
        "hit_rate": (whole.hits / (whole.frames + left_out) if whole.frames + left_out
                     else 0.0),
        "left_out": left_out,
        "peaks_per_frame": whole.summary(),
        "this_run": {"frames": stats.frames, "skipped": stats.skipped, "hits": stats.hits,
                     "time_s": round(seconds, 3),
                     "frames_per_s": stats.frames / seconds if seconds > 0 else 0.0,
                     "unusable_pixels": add_tallies([unusable or {}]), **(used or {})},
        "cxi_files": [str(p) for p in files],
        "list": str(list_path) if files else None,
        "geometry": str(geom_path) if files and geom_path.exists() else None,
        "plot": str(plot) if plot is not None else None,
        "stream": config["stream"], "engine": dict(engine),
        "config": {k: _plain(v) for k, v in config.items()},
        "indexamajig": (indexamajig_command(list_path, geom_path, outdir)
                        if files and geom_path.exists() else None),
        "indexamajig_problems": (_indexamajig_problems(geom_path, files)
                                 if files and geom_path.exists() else []),
    }
    if config.get("dials") and files and error is None:
        try:
            summary["dials"] = write_dials_output(files, outdir / DIALS_DIR,
                                                  given_geometry=config["geometry"] is not None)
        except Exception as exc:  # the frames are found and kept: the summary says so too
            summary["status"] = f"failed: {exc}"
            write_json_atomic(outdir / SUMMARY_NAME, summary)
            raise
    write_json_atomic(outdir / SUMMARY_NAME, summary)
    if error is None and not files:
        raise PeakNetError(f"no frames were written to {outdir}: the inputs hold no frames "
                           "(or, with --hits-only, no hits); nothing for indexamajig")
    return summary


def write_dials_output(files: Sequence[Path], folder: Path, *, given_geometry: bool = False
                       ) -> dict[str, Any]:
    """``imported.expt`` + ``strong.refl`` of every frame in the CXI files, for DIALS.

    Images DIALS reads natively (CBF...) are imported from the original files, all at once and
    as ``dials.import`` imports them: the files of a rotation series are one sequence
    experiment, a still is one experiment.  Each frame's spots are the CXI peaks, on the image
    DIALS places that file at (z counts a sequence's images from its first image number, as
    ``dials.find_spots`` gives them: 0.5 on image 1, 3.5 on image 4).  Where the images were
    read through a geometry the user gave (``given_geometry``: ``-g``), whose panels, bad
    regions and beam the peaks are found in, and for frames of HDF5 inputs always, they are
    imported from the CXI files written here (their geometry is ``peaknet.geom``, read by the
    project's dxtbx format), one still experiment per frame.
    """
    import h5py

    # check_dials_option imported it in a child at the run's start; a DIALS that fails here
    # all the same (a Python caller who skipped the check) says so in one line
    require_dials("--dials", *_DIALS_EXPORT, otherwise=_WITHOUT_DIALS)
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from peaknet_xtal.atomic import atomic_path
    from peaknet_xtal.formats.cxi import read_cxi_peaks
    from peaknet_xtal.formats.dials_tables import strong_reflection_table
    from peaknet_xtal.formats.geometry import read_geometry

    geometry = read_geometry(Path(files[0]).parent / GEOM_NAME)
    experiments = ExperimentList()
    spots: list[tuple[np.ndarray, int, int]] = []  # peaks, experiment, z (image) of each frame
    native: list[tuple[str, str, np.ndarray]] = []  # source, event, peaks of each native frame
    for path in files:
        table = read_cxi_peaks(path)
        sources = {source for source, _ in table.keys if not h5py.is_hdf5(source)}
        if sources and len(sources) != len(set(s for s, _ in table.keys)):
            raise PeakNetError(f"{path}: mixes HDF5 and other inputs; --dials needs one kind "
                               "per CXI file")
        if sources and not given_geometry:
            for row in range(len(table)):
                source, event = table.keys[row]
                native.append((source, event, table.peaks(row, geometry)))
            continue
        found = ExperimentListFactory.from_filenames([str(path)])
        if len(found) != len(table):
            raise PeakNetError(f"{path}: DIALS sees {len(found)} images for {len(table)} "
                               "frames; cannot pair spots with images")
        for row, experiment in enumerate(found):
            # DIALS pairs a table with its images by these identifiers (dials.import sets them)
            experiment.identifier = _dials_identifier(*table.keys[row])
            spots.append((table.peaks(row, geometry), len(experiments), 0))
            experiments.append(experiment)  # panel-relative peaks, as DIALS counts
    if native:
        spots += _place_native_frames(native, experiments)
    rotation = bool(len(experiments)) and all(
        e.scan is not None and e.scan.get_oscillation()[1] > 0 for e in experiments)
    grid = any(e.scan is not None and e.scan.get_oscillation()[1] == 0 for e in experiments)
    by_image: dict[int, list[tuple[np.ndarray, int]]] = {}
    for peaks, exp_id, z in spots:
        by_image.setdefault(z, []).append((peaks, exp_id))
    whole = flex.reflection_table()
    for image, here in sorted(by_image.items()):  # one table of each image number
        whole.extend(strong_reflection_table([p for p, _ in here], z0=image,
                                             experiment_ids=[e for _, e in here]))
    for exp_id, experiment in enumerate(experiments):
        whole.experiment_identifiers()[exp_id] = experiment.identifier
    folder.mkdir(parents=True, exist_ok=True)
    expt, refl = folder / "imported.expt", folder / "strong.refl"
    with atomic_path(expt) as tmp:
        experiments.as_file(str(tmp.with_suffix(".expt")))  # type: ignore[attr-defined]
        tmp.with_suffix(".expt").replace(tmp)
    with atomic_path(refl) as tmp:
        whole.as_file(str(tmp))
    command = dials_index_command(expt, refl, rotation=rotation, grid=grid)
    return {"experiments": str(expt), "reflections": str(refl), "images": len(spots),
            "spots": int(whole.size()), "command": command}


def _dials_identifier(source: str, event: str) -> str:
    """The experiment identifier of the experiment whose first image is ``source`` ``event``:
    a name of the image, so a rerun writes the same one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{source}{event}"))


def _place_native_frames(frames: Sequence[tuple[str, str, np.ndarray]],
                         experiments: Any) -> list[tuple[np.ndarray, int, int]]:
    """Import the files of ``frames`` (source, event, peaks) as ``dials.import`` does, append
    the experiments to ``experiments``, and give each frame's peaks with the experiment and
    image (z: the image's array index in its sequence, 0 for a still) DIALS holds it at.

    Why all at once: the files of a rotation series are one sequence to DIALS, of as many images
    as files, where counting one experiment per frame could not pair them; and a series written
    across several CXI files is still one sequence.  A frame DIALS does not hold among the
    images it imported is an error naming its file."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.types import event_index

    names = list(dict.fromkeys(source for source, _, _ in frames))
    try:
        found = ExperimentListFactory.from_filenames(names)
    except OSError as exc:  # an image file gone since its peaks were found
        raise FormatError(exc.filename or names[0], "cannot be read again to import it for "
                          f"--dials ({exc.strerror or exc})") from exc
    # (file, image in it) -> (experiment, image of its imageset, z); an experiment with a scan
    # holds the images of its scan's range: a grid scan's zero-oscillation images are one
    # imageset shared by an experiment an image, each with a scan of one image
    where: dict[tuple[str, int], tuple[int, int, int]] = {}
    for exp_id, experiment in enumerate(found):
        imageset: Any = experiment.imageset
        one_file = imageset.reader().is_single_file_reader()
        images, base = range(len(imageset)), 0
        if experiment.scan is not None and hasattr(imageset, "get_array_range"):
            base = int(imageset.get_array_range()[0])
            start, stop = experiment.scan.get_array_range()
            images = range(int(start) - base, int(stop) - base)
        for image in images:
            within = int(imageset.indices()[image]) if one_file else 0
            key = (os.path.realpath(imageset.get_path(image)), within)
            z = base + image if experiment.scan is not None else 0
            where.setdefault(key, (exp_id, image, z))
    placed: list[tuple[np.ndarray, int, int]] = []
    first: dict[int, tuple[int, str, str]] = {}  # experiment -> its first image's frame
    for source, event, peaks in frames:
        spot = where.get((os.path.realpath(source), event_index(event)))
        if spot is None:
            which = "" if event.strip() in ("", "//") else f" (frame {event})"
            raise PeakNetError(f"{source}{which}: not among the images DIALS imports from this "
                               f"run's {len(names)} image file(s) (damaged since its peaks were "
                               "found?); --dials cannot place its spots")
        exp_id, image, z = spot
        placed.append((peaks, len(experiments) + exp_id, z))
        if exp_id not in first or image < first[exp_id][0]:
            first[exp_id] = (image, source, event)
    for exp_id, experiment in enumerate(found):
        # DIALS pairs a table with its images by these identifiers (dials.import sets them)
        imageset = experiment.imageset
        _, source, event = first.get(exp_id, (0, imageset.get_path(0), "//"))
        experiment.identifier = _dials_identifier(source, event)
        experiments.append(experiment)
    return placed


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
