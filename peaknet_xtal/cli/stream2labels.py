"""stream2labels: pixel-exact training labels from indexing results.

    stream2labels STREAM|EXPT REFL ... -o labels.h5 [options]

Reads CrystFEL streams and/or DIALS stills results (an .expt followed by its .refl), matches found
peaks against predicted reflections per frame (PeakDiff), keeps the frames that pass the
selection (precision >= 0.8 and peak-count limits by default), fits a 2-D pseudo-Voigt to a small
window around every predicted reflection of those frames and writes the half-maximum masks of the
trusted fits as labels: images, masks (good pixels) and labels, one panel per row, plus per-frame
metadata, in one compressed HDF5 file that peaknet-train reads directly.

Beside the output: <output>.peakdiff.png (found-vs-predicted and precision-recall scatter with the
selection box) and <output>.config.json (the resolved settings, the inputs and the output among
them as absolute paths).  Images are read through the registered frame sources, a plugin's
included; --source-option KEY=VALUE (repeatable) passes an option a source type declares (the
psana plugin's detector=NAME) to the sources that declare it, as in peaknet2cxi, and is recorded
in <output>.config.json.  Fits run on a local Ray (2 CPUs) unless --no-ray; --address joins a
running cluster.  --no-progress (or --quiet, its earlier name): no progress line.  An
interrupted run resumes where it stopped (finished batches in <output>.parts/ are kept; Ctrl-C
stops with exit 130, a batch scheduler's SIGTERM with exit 143, each with one line saying what
is kept).  A run that
selects no frame, or labels none of those it selected (their images cannot be read), writes
no label file and exits 1, saying why (one line per cause, with counts).  Every setting is
checked before any work: one out of its range (--window 2, --min-precision 2), or a minimum
above its maximum, is one line naming it (exit 2); so is an output that cannot be written (a
folder, a place without write permission).  Images only DIALS reads (CBF...) and DIALS results
need DIALS: where it is missing or fails to load, one line says so at the first input or chunk
that needs it, before anything is written (exit 2); streams of CXI/HDF5 images need no DIALS.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal import config as cfgmod
from peaknet_xtal import source_option
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.stopping import exit_status, interrupted, sigterm_raises


def build_parser() -> Any:
    parser = cfgmod.cli_parser(__doc__, prog="stream2labels")
    parser.add_argument("inputs", nargs="+", help="streams, or .expt .refl pairs")
    parser.add_argument("-o", "--output", required=True, help="label file to write (.h5)")
    add = parser.add_argument
    add("--prefix", dest="run.prefix", help="prepended to image names, like indexamajig --prefix")
    add("-g", "--geometry", dest="run.geometry", help="geometry for the images (default: the "
        "one embedded in the stream)")
    source_option.add_argument(parser)
    add("--cutoff", dest="peakdiff.cutoff", type=float, help="match distance in pixels (5)")
    add("--min-precision", dest="peakdiff.min_precision", type=float, help="(0.8)")
    add("--min-recall", dest="peakdiff.min_recall", type=float, help="(0)")
    add("--min-peaks", dest="peakdiff.min_found", type=int, help="fewest found peaks (10)")
    add("--max-peaks", dest="peakdiff.max_found", type=int, help="most found peaks")
    add("--min-predicted", dest="peakdiff.min_predicted", type=int, help="(1)")
    add("--max-predicted", dest="peakdiff.max_predicted", type=int)
    add("--fit-on", dest="label.fit_on", choices=("predicted", "matched", "found"),
        help="which positions are fitted (predicted)")
    add("--min-i-over-sigma", dest="label.min_i_over_sigma", type=float,
        help="skip predicted reflections below this I/sigma(I)")
    add("--panels", dest="label.panels", choices=("all", "labelled"),
        help="store every panel of a selected frame, or only panels with labels (all)")
    add("--window", dest="fit.window", type=int, help="fit window side in pixels (9)")
    add("--redchi-max", dest="fit.redchi_max", type=float, help="reject worse fits (5)")
    add("--min-snr", dest="fit.min_snr", type=float, help="reject fainter fits (5)")
    add("--max-nfev", dest="fit.max_nfev", type=int, help="evaluations per fit (200)")
    add("--batch-size", dest="run.batch_size", type=int, help="frames per batch/part file (8)")
    add("--no-ray", dest="run.ray", action="store_false", help="one process, no Ray")
    add("--address", dest="run.address", help="Ray cluster address (default: start a local Ray)")
    add("--num-cpus", dest="run.num_cpus", type=int, help="CPUs of the local Ray (2)")
    add("--max-batches-in-flight", dest="run.max_batches_in_flight", type=int)
    add("--max-fits-in-flight", dest="run.max_fits_in_flight", type=int)
    add("--report", dest="run.report", help="PeakDiff PNG path")
    add("--keep-parts", dest="run.keep_parts", action="store_true")
    add("--max-frames", dest="run.max_frames", type=int, help="only the first N indexed frames")
    add("--trust-pickle", dest="run.trust_pickle", action="store_true",
        help="also read old pickled .refl files (loading a pickle can run code: only for "
        "files from a source you trust)")
    add("--no-progress", "--quiet", dest="progress", action="store_false",
        help="no progress line (--quiet: the same, its earlier name)")
    add("--overwrite", action="store_true", help="replace a finished label file at -o (only "
        "once the new one is complete)")
    return parser


def stream2labels(inputs: Sequence[str], output: str, config: dict[str, Any],
                  progress: bool = True, overwrite: bool = False,
                  started: Callable[[], object] | None = None) -> dict[str, Any]:
    """The command without its argument parsing (for scripts and tests); ``started``: called
    before the first file is written (``label_run``)."""
    from peaknet_xtal.labelling.job import label_run

    return label_run(list(inputs), output, config, progress=progress, overwrite=overwrite,
                     started=started)


def format_summary(summary: dict[str, Any]) -> str:
    status = ", ".join(f"{k} {v}" for k, v in sorted(summary["fit_status"].items()))
    # why the other frames were turned away, one line per selection rule with its count
    why = "".join(f"  not selected: {line}\n" for line in summary.get("not_selected", ()))
    return (f"stream2labels: {summary['frames']} indexed frames, {summary['selected']} selected, "
            f"{summary['labelled']} labelled ({summary['image_errors']} unreadable), "
            f"{summary['rows']} rows -> {summary['output']}\n{why}"
            f"  fits: {summary['fits']} ({status}); {summary['fits_per_s']} fits/s; "
            f"{summary['seconds']} s; batches {summary['batches']} "
            f"({summary['batches_resumed']} resumed)\n  report: {summary['report']}")


def what_is_kept(output: Path) -> str:
    """What a rerun of the same command resumes from: the finished batches' part files."""
    parts = output.with_name(output.name + ".parts")
    done = len(list(parts.glob("batch_*.h5"))) if parts.is_dir() else 0
    if not done:
        return "no batch had finished, so a rerun starts afresh"
    return (f"{done} finished batch{'es' if done > 1 else ''} kept in {parts}: the same command "
            "resumes from them")


def check_not_an_input(output: Path, inputs: Sequence[str]) -> None:
    """Refuse an output (-o) that is one of the inputs: it was refused as "already holds a
    finished label file", wrong, and with --overwrite the labels would replace the input."""
    from peaknet_xtal.errors import FormatError

    for given in inputs:
        try:
            same = os.path.samefile(output, given)
        except OSError:  # one of them is not there: not the same file
            continue
        if same:
            what = "the input stream" if output.suffix.lower() == ".stream" else "an input"
            raise FormatError(output, f"is {what} itself: the output (-o) is the label file to "
                              f"write, e.g. {output.with_name('labels.h5')}")


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.labelling.job import (
        DEFAULTS,
        TYPES,
        NothingToLabel,
        check_output,
        check_settings,
    )

    parser = build_parser()
    args = parser.parse_args(argv)
    cfgmod.setup_logging(getattr(args, "verbose", 0))
    source_option.take(parser, args, "run.source_options")
    given = vars(args)
    inputs, output = given.pop("inputs"), given.pop("output")
    progress = given.pop("progress", True)
    overwrite = given.pop("overwrite", False)
    config = cfgmod.resolve_or_exit(parser, DEFAULTS, given, types=TYPES)
    try:  # what no single setting's range can say (a minimum above its maximum)
        check_settings(config, cfgmod.option_names(parser))
    except cfgmod.ConfigError as exc:
        parser.error(str(exc))
    source_option.check_or_exit(parser, config["run"]["source_options"])
    out = Path(output)
    try:  # before anything is written beside it, and before hours of fits
        check_not_an_input(out, inputs)
        check_output(out, overwrite)
    except PeakNetError as exc:
        print(f"stream2labels: error: {exc}", file=sys.stderr)
        return 2

    def record() -> None:
        # the files too, absolute: the record names what was labelled and where it went
        # wherever it is read from (the command line it keeps holds them as typed, relative to
        # its cwd); written once the inputs are read, so that a run refused for them (DIALS
        # missing for their images) leaves nothing behind
        cfgmod.record({"inputs": [os.path.abspath(p) for p in inputs],
                       "output": os.path.abspath(out), **config},
                      out.with_suffix(".config.json"), "stream2labels",
                      list(argv) if argv is not None else sys.argv[1:])

    try:  # a batch scheduler's SIGTERM stops it as Ctrl-C does (exit 143, not 130)
        with sigterm_raises():
            summary = stream2labels(inputs, output, config, progress=progress,
                                    overwrite=overwrite, started=record)
    except KeyboardInterrupt as exc:  # a stop the user asked for, not a failure to explain
        print(f"stream2labels: {interrupted(exc)}; {what_is_kept(out)}", file=sys.stderr)
        return exit_status(exc)
    except NothingToLabel as exc:  # the inputs are fine; none of their frames became labels
        print(f"stream2labels: error: {exc}", file=sys.stderr)
        return 1
    except PeakNetError as exc:
        print(f"stream2labels: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
