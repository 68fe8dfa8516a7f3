"""peaknet-eval: run peak finders on a data set and write a report (Markdown, PNGs, JSON).

    peaknet-eval SIM_RUN_DIR -o report/ [--finders peaknet:default peakfinder8 dispersion]
                 [--tune-frames 4] [--index] [--space-group P43212] [--unit-cell a,b,c,al,be,ga]
                 [--overwrite]

SIM_RUN_DIR is a folder written by `peaknet-sim` (NAME.cxi, NAME.geom, NAME_truth.h5), so precision,
recall, F1 and position error are scored against the exact truth.  `--tune-frames N` tunes
peakfinder8 and the DIALS dispersion finder by grid search on the first N frames (which are then
left out of scoring), so the comparison is against tuned baselines.  `--index` indexes every
frame's peaks with `dials.index` and reports hit rate, indexing rate, indexing yield and the
unit-cell distributions, and why hits were not indexed.  Each frame is indexed with its own
crystal's cell and lattice from the simulator's truth; `--space-group` and `--unit-cell`, when
given, replace the truth's on every frame (each on its own).  Everything in report.md is also in
report.json.  Finder names, the space group and the cell are checked before any work.

A folder holds one report: a folder that already holds one is refused, leaving it as it was,
unless `--overwrite` is given; the new report then replaces the earlier one once it is complete
(the earlier report's files the new one does not write are removed; other files stay), and a
failed run leaves the earlier one as it was.  Each finder's files (activation maps, DIALS
folder) are named after it, with its model's folders where two models share a file name.

The resolved configuration is logged when the work begins (and saved as config.json with the
report).  Tuning (settings of each grid), finding and indexing (frames) each show a progress
line on stderr unless `--no-progress`.  Ctrl-C, or a batch scheduler's SIGTERM, stops the run
with one line saying what is kept (exit 130, or 143): an unfinished report is never kept, and an
earlier report in the folder stays as it was; the same command runs it again from the start.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal.config import bounded, cli_parser, record, resolve_or_exit, setup_logging
from peaknet_xtal.errors import DialsUnavailable, PeakNetError, require_dials
from peaknet_xtal.finding.settings import DEFAULTS as FINDING
from peaknet_xtal.stopping import exit_status, interrupted, sigterm_raises

PROG = "peaknet-eval"

DEFAULTS: dict[str, Any] = {
    "data": None,
    "output": None,
    "finders": ["peaknet:default", "peakfinder8", "dispersion"],
    "name": "sim",
    "tune_frames": 0,
    "cutoff": 3.0,
    "min_peaks": FINDING.min_peaks,  # the library's hit rule
    "index": False,
    "space_group": None,
    "unit_cell": None,
    "samples": 2,
    "overwrite": False,
    "progress": True,
}
TYPES: dict[str, Any] = {"data": str | None, "output": str | None, "space_group": str | None,
                         "unit_cell": str | list[float] | None,
                         "tune_frames": bounded(int, ge=0), "cutoff": bounded(float, gt=0),
                         "min_peaks": bounded(int, ge=0), "samples": bounded(int, ge=0)}


def check(config: dict[str, Any]) -> None:
    """Raise ValueError (one line) for settings that would fail only after the work: a finder
    typo after the finders before it ran, a space group DIALS refuses on every frame; and
    DialsUnavailable for a DIALS finder, ``--index`` or the symmetry (checked by cctbx) where
    DIALS is not there or fails to load."""
    from peaknet_xtal.errors import PeakNetError
    from peaknet_xtal.evaluation.finders import check_finder
    from peaknet_xtal.evaluation.indexing import check_symmetry, parse_unit_cell

    for spec in config["finders"]:
        try:
            check_finder(spec)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        except PeakNetError as exc:  # the model's weights: missing, or not a model
            raise ValueError(f"--finders {spec}: {exc}") from None
    if config["index"]:  # what indexing imports, in a child: imported here before PeakNet
        # runs, DIALS would hold it to one thread (errors.require_dials)
        require_dials("--index", "dxtbx.model.experiment_list", "dials.array_family.flex",
                      "cctbx.sgtbx", otherwise="run without --index", load=False,
                      before_writing=True)
    check_symmetry(config["space_group"], parse_unit_cell(config["unit_cell"]))


def check_output(config: dict[str, Any]) -> None:
    """Raise FileExistsError (one line) when ``--output`` holds a report and ``--overwrite`` is
    not given: as ``peaknet-sim`` refuses a folder holding a run, a report (an hour of indexing,
    perhaps) is not replaced by a mistyped ``-o``."""
    from peaknet_xtal.evaluation.report import REPORT_FILES

    out = Path(config["output"])
    earlier = [name for name in REPORT_FILES if (out / name).exists()]
    if earlier and not config["overwrite"]:
        raise FileExistsError(f"{out} already holds a report ({', '.join(earlier)}); nothing was "
                              "changed: add --overwrite to replace it, or choose another -o")


def run(config: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate and write the report, with the configuration record (``config.json``) beside
    it; returns the report's numbers."""
    from peaknet_xtal.evaluation.indexing import parse_unit_cell
    from peaknet_xtal.evaluation.report import evaluate, load_sim_run

    dataset = load_sim_run(config["data"], config["name"])
    dataset.space_group = config["space_group"]
    dataset.unit_cell = parse_unit_cell(config["unit_cell"])
    return evaluate(dataset, config["finders"], config["output"],
                    tune_frames=int(config["tune_frames"]), cutoff=float(config["cutoff"]),
                    min_peaks=int(config["min_peaks"]), index=bool(config["index"]),
                    samples=int(config["samples"]), progress=bool(config["progress"]),
                    record=lambda staging: record(config, staging / "config.json",
                                                  PROG, argv))


def _report_stamp(out: Path | None) -> tuple[int, int] | None:
    """Identity of the report.md in ``out`` (inode, modification time), None when there is
    none: the report is moved into place whole, report.md last, so a new stamp after a stop
    means this run's report was published complete before it."""
    try:
        stat = (out / "report.md").stat() if out is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns)


def what_is_kept(out: Path | None, before: tuple[int, int] | None) -> str:
    """What a stop kept, for its one line: nothing of an unfinished report, ever."""
    if out is None:
        return "stopped before the settings were read: nothing was written"
    now = _report_stamp(out)
    if now is not None and now != before:
        return f"the report was complete before the stop: {out / 'report.md'}"
    if now is not None:
        return (f"no new report was written: the report already in {out} is as it was; the "
                "same command runs it again from the start")
    return ("no report was written and nothing was left behind; the same command runs it "
            "again from the start")


def main(argv: Sequence[str] | None = None) -> int:
    out: Path | None = None
    before: tuple[int, int] | None = None
    try:
        # a batch scheduler's SIGTERM stops the run as Ctrl-C does (Python's default died with
        # 143 and no word, leaving the report's staging folder behind), from the first line:
        # finder checks import torch and DIALS, and the frames are read, before any report
        with sigterm_raises():
            parser = build_parser()
            args = parser.parse_args(argv)
            setup_logging(getattr(args, "verbose", 0))
            config = resolve_or_exit(parser, DEFAULTS, args, types=TYPES)
            before = _report_stamp(Path(config["output"]))  # first: ``out`` set says it is
            out = Path(config["output"])
            return _main(config, argv)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (stopping.Terminated)
        print(f"{PROG}: {interrupted(exc)}; {what_is_kept(out, before)}", file=sys.stderr)
        return exit_status(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser(__doc__, prog=PROG)
    parser.add_argument("data", help="folder written by peaknet-sim")
    parser.add_argument("-o", "--output", required=True, help="report folder")
    parser.add_argument("--finders", nargs="+", help="peaknet[:MODEL], peakfinder8, dispersion")
    parser.add_argument("--name", help="file stem of the simulated run (default sim)")
    parser.add_argument("--tune-frames", dest="tune_frames", type=int)
    parser.add_argument("--cutoff", type=float, help="match distance in pixels (default 3)")
    parser.add_argument("--min-peaks", dest="min_peaks", type=int, help="peaks for a hit")
    parser.add_argument("--index", action="store_true",
                        help="index with dials.index and report the paper's rates")
    parser.add_argument("--space-group", dest="space_group",
                        help="index every frame in this space group (default: the truth's)")
    parser.add_argument("--unit-cell", dest="unit_cell", metavar="A,B,C,AL,BE,GA",
                        help="index every frame with this cell (default: the truth's)")
    parser.add_argument("--samples", type=int, help="frames shown as overlays")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a report already in the output folder (once the new one "
                        "is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress lines (tuning, finding, indexing)")
    return parser


def _main(config: dict[str, Any], argv: Sequence[str] | None) -> int:
    """The run once the settings are read: checks, the report, the summary printed."""
    try:
        check(config)
    except (ValueError, DialsUnavailable) as exc:  # refused before anything is written
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        from peaknet_xtal.evaluation.report import check_sim_run

        check_sim_run(config["data"], config["name"])
        check_output(config)
        report = run(config, sys.argv[1:] if argv is None else argv)
    except (PeakNetError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    from peaknet_xtal.evaluation.indexing import failure_text
    from peaknet_xtal.evaluation.report import fmt

    # Numbers as report.md writes them (fmt): a rate of no frames is n/a there, not nan here.
    for label, entry in report["finders"].items():
        acc = entry.get("accuracy", {})
        print(f"{label:24s} F1 {fmt(acc.get('f1'))}  "
              f"hit rate {fmt(entry['hit_rate'])}  {fmt(entry['seconds_per_frame'], 2)} s/frame")
        rates = report.get("indexing", {}).get(label)
        if rates:  # with the reasons, so a rate of 0 from a refused setting is seen as such
            why = failure_text(rates["failures"])
            print(f"{'':24s} indexing rate {fmt(rates['indexing_rate'])} ({rates['indexed']} of "
                  f"{rates['hits']} hits)" + (f"; not indexed: {why}" if why else ""))
    print(f"report: {Path(config['output']) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
