"""A whole labelling run: ingest, PeakDiff, selection, report, batches (resumable), merge.

Every input frame is accounted for in the output's ``frames`` table (PeakDiff statistics, whether
it was selected, and what happened to it).  Work is done in batches whose part files appear
atomically in ``<output>.parts/``; a rerun with the same inputs and settings skips every finished
batch, so an interrupted run loses at most the batches that were in flight.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from peaknet_xtal import source_option
from peaknet_xtal.atomic import write_json_atomic
from peaknet_xtal.config import ConfigError, bounded, deep_merge, one_of, validate
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.dials_tables import check_experiments_readable
from peaknet_xtal.labelling.batch import (
    LABEL_DEFAULTS,
    Batch,
    BatchLabeler,
    BatchSummary,
    FrameJob,
    serial_fit_map,
)
from peaknet_xtal.labelling.ingest import (
    FrameRecord,
    ImageSources,
    StreamTally,
    keep_last_copies,
    records_from_dials,
    records_from_stream,
)
from peaknet_xtal.labelling.labels import LabelFile, merge_label_files
from peaknet_xtal.labelling.peakdiff import (
    PEAKDIFF_DEFAULTS,
    FrameDiff,
    Selection,
    peakdiff,
    summary_arrays,
    write_report,
)
from peaknet_xtal.labelling.pvoigt import FIT_DEFAULTS, STATUS
from peaknet_xtal.progress import Progress

log = logging.getLogger(__name__)

#: The built-in frame sources that read files by name: an image name they would read must exist.
FILE_SOURCES = ("cxi", "dxtbx")

DEFAULTS: dict[str, Any] = {
    "peakdiff": dict(PEAKDIFF_DEFAULTS),
    "fit": dict(FIT_DEFAULTS),
    "label": dict(LABEL_DEFAULTS),
    "run": {
        "prefix": None,          # prepended to stream image names (indexamajig --prefix)
        "geometry": None,        # .geom for CXI images (default: the one embedded in the stream)
        "source_options": {},    # --source-option KEY=VALUE: to the source types declaring KEY
        "batch_size": 8,         # frames per batch (per part file)
        "ray": True,             # False: one process, no Ray
        "address": None,         # existing Ray cluster; None starts a local one
        "num_cpus": 2,
        "max_batches_in_flight": 2,
        "max_fits_in_flight": 4,
        "report": None,          # PeakDiff PNG (default: <output stem>.peakdiff.png)
        "keep_parts": False,
        "max_frames": None,
        "trust_pickle": False,   # read pickled (pre-msgpack) .refl files: they can run code
    },
}


def _odd_window(value: int) -> int:
    """A fit window's side: odd, so that the window is centred on the peak's pixel, and at
    least 3 pixels (one pixel either side)."""
    if value < 3 or value % 2 == 0:
        raise PydanticCustomError("odd_window", "must be an odd number of pixels >= 3")
    return value


_COUNT = bounded(int, ge=0)
_POSITIVE_COUNT = bounded(int, ge=1)
_FRACTION = bounded(float, ge=0, le=1)
#: Every setting's type and range (config.resolve checks them for the command line and a config
#: file alike, :func:`label_run` for Python callers), so that a bad value is one line naming it
#: before any work rather than a traceback after Ray started (an even window) or a run that
#: quietly means nothing (a precision of 2, no CPUs, a negative match distance).  Those whose
#: default (None) cannot say their type are here too.
TYPES: dict[str, Any] = {
    "peakdiff.cutoff": bounded(float, gt=0),
    "peakdiff.min_precision": _FRACTION, "peakdiff.min_recall": _FRACTION,
    "peakdiff.min_found": _COUNT, "peakdiff.max_found": _COUNT,
    "peakdiff.min_predicted": _COUNT, "peakdiff.max_predicted": _COUNT,
    "fit.window": Annotated[int, AfterValidator(_odd_window)],
    "fit.max_nfev": _POSITIVE_COUNT,
    "fit.redchi_max": bounded(float, gt=0, le=math.inf),  # inf: no misfit cut
    "fit.min_snr": bounded(float, ge=0),
    "fit.max_shift": bounded(float, gt=0, le=math.inf),  # inf: no shift cut
    "fit.min_pixels": _COUNT,
    "fit.label_fraction": bounded(float, gt=0, le=1),
    "fit.prescreen_snr": bounded(float, ge=0),  # 0: off
    "fit.tolerance": bounded(float, gt=0),
    "label.fit_on": one_of(("predicted", "matched", "found")),
    "label.min_i_over_sigma": bounded(float, optional=True),
    "label.panels": one_of(("all", "labelled")),
    "label.chunk_size": _POSITIVE_COUNT,
    "run.prefix": str | None, "run.geometry": str | None, "run.address": str | None,
    "run.report": str | None,
    "run.batch_size": _POSITIVE_COUNT, "run.num_cpus": _POSITIVE_COUNT,
    "run.max_batches_in_flight": _POSITIVE_COUNT, "run.max_fits_in_flight": _POSITIVE_COUNT,
    "run.max_frames": bounded(int, ge=1, optional=True),  # None: every frame
}
#: Limits that hold between two settings: (lower, upper).
ORDERED = (("peakdiff.min_found", "peakdiff.max_found"),
           ("peakdiff.min_predicted", "peakdiff.max_predicted"))


def check_settings(config: dict[str, Any], names: dict[str, str] | None = None,
                   where: str | None = "settings") -> dict[str, Any]:
    """``config`` (defaults filled in) with every value's type and range checked, and the
    minima not above their maxima; a :class:`ConfigError` naming the setting otherwise (by its
    option in ``names``, ``peakdiff.min_found`` -> ``--min-peaks``, where given).  A minimum
    above its maximum selects nothing, and would only say so after reading every input.
    """
    checked = validate(config, DEFAULTS, TYPES)
    for low, high in ORDERED:
        section, lo_key = low.split(".")
        hi_key = high.split(".")[1]
        lo, hi = checked[section][lo_key], checked[section][hi_key]
        if lo is not None and hi is not None and lo > hi:
            name = (names or {}).get
            raise ConfigError(where, f"{name(low, low)} {lo} is above {name(high, high)} {hi}: "
                                     "no frame could be selected")
    return checked


class NothingToLabel(FormatError):
    """Inputs with frames of which none is kept for labelling (or none indexed at all).

    An error rather than an empty label file: peaknet-train can do nothing with one, and an
    empty output with exit status 0 reads as success.  The message names the inputs and says
    why, one line per cause with its count.
    """


def group_inputs(paths: Sequence[str]) -> list[tuple[str, ...]]:
    """``a.stream b.expt b.refl`` -> [(a.stream,), (b.expt, b.refl)]: each .expt with its .refl."""
    groups: list[tuple[str, ...]] = []
    pending_expt: str | None = None
    for path in paths:
        if path.endswith(".expt"):
            if pending_expt:
                raise FormatError(pending_expt, "an .expt must be followed by its .refl")
            pending_expt = path
        elif path.endswith(".refl"):
            if not pending_expt:
                raise FormatError(path, "a .refl must follow its .expt on the command line")
            groups.append((pending_expt, path))
            pending_expt = None
        else:
            groups.append((path,))
    if pending_expt:
        raise FormatError(pending_expt, "an .expt must be followed by its .refl")
    return groups


def ingest(paths: Sequence[str], run: dict[str, Any]) -> tuple[list[FrameRecord], dict[str, Any]]:
    """Records of every input (indexed frames only) and the geometries their images need.
    Raises :class:`~peaknet_xtal.errors.DialsUnavailable` where an input needs DIALS (an .expt;
    a stream naming images DIALS reads, at the first such chunk) and DIALS is not there or fails
    to load: before any work, where it failed frame by frame (:class:`ImageSources`)."""
    from peaknet_xtal.formats.geometry import read_geometry

    given = read_geometry(run["geometry"]) if run.get("geometry") else None
    records: list[FrameRecord] = []
    geometries: dict[str, Any] = {}
    tallies: list[StreamTally] = []
    groups = group_inputs(paths)
    expts = [group[0] for group in groups if len(group) == 2]
    if expts:  # before the streams before it are read, not at its turn
        check_experiments_readable(expts[0])
    sources = ImageSources(geometries)
    for group in groups:
        if len(group) == 2:
            records.extend(records_from_dials(group[0], group[1], prefix=run.get("prefix"),
                                              trust_pickle=bool(run.get("trust_pickle"))))
            continue
        tallies.append(StreamTally(group[0]))
        for record in records_from_stream(group[0], geometry=given, prefix=run.get("prefix"),
                                          tally=tallies[-1], once=False, geometries=geometries):
            sources.check(record)
            records.append(record)
    lines = [line for tally in tallies for line in tally.lines()]
    if not records and lines:  # said as what the streams lack, not as frames turned away
        raise NothingToLabel(", ".join(paths), "no frame to label, no output written:\n"
                             + "\n".join(f"  {line}" for line in lines))
    for line in lines:
        log.warning("%s", line)
    # a frame in several inputs (or twice in one) is labelled once, from its last copy
    records, _ = keep_last_copies(records, geometries)
    if run.get("max_frames"):
        records = records[: int(run["max_frames"])]
    return records, geometries


def diff_all(records: Iterable[FrameRecord], cutoff: float) -> list[FrameDiff]:
    return [peakdiff(r.found, r.predicted, cutoff) for r in records]


def _fingerprint(paths: Sequence[str], config: dict[str, Any], n_frames: int) -> str:
    """What must not change between an interrupted run and its resumption: the inputs, the
    settings that shape a label, and what decides which pixels the images give (the geometry
    given with ``-g`` and the sources' ``--source-option``s: batches read through another layout
    or detector would be merged with the new ones).  ``--prefix`` is left out: it only says
    where the same images are."""
    def stat(path: str) -> tuple[str, int, int]:
        return os.path.abspath(path), os.path.getsize(path), int(os.path.getmtime(path))

    run = config["run"]
    blob = json.dumps({"inputs": [stat(p) for p in paths],
                       "config": {k: config[k] for k in ("peakdiff", "fit", "label")},
                       "batch_size": run["batch_size"], "frames": n_frames,
                       "geometry": stat(run["geometry"]) if run.get("geometry") else None,
                       "source_options": run.get("source_options") or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _parts_dir(output: Path, fingerprint: str) -> Path:
    parts = output.with_name(output.name + ".parts")
    manifest = parts / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text()).get("fingerprint")
        if old != fingerprint:
            raise FormatError(parts, "holds part files of a run with other inputs or settings; "
                              "remove it (or rerun with the original settings) to continue")
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"fingerprint": fingerprint})
    return parts


def _part_done(part: Path) -> bool:
    if not part.exists():
        return False
    try:
        with LabelFile(part):
            return True
    except FormatError:
        return False


def check_output(output: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse an output the label file cannot be written to, before any work: a folder, something
    that is not a regular file, or a place this process cannot create files in (tried with a
    probe file, so that a read-only mount or a missing permission counts too, whoever runs it).
    Otherwise a whole run of fits would end on the last rename, leaving its part files, report
    and configuration record behind for nothing.  A finished label file is replaced only with
    ``overwrite`` (and then only once the new one is complete): a rerun with other settings or
    inputs silently replaced a run's labels.
    """
    import tempfile

    path = Path(output)
    if path.is_dir():
        raise FormatError(path, "is a folder: the output (-o) is the label file to write, "
                          f"e.g. {path / 'labels.h5'}")
    if path.exists() and not path.is_file():
        raise FormatError(path, "is not a regular file: the output (-o) is the label file to "
                          "write")
    if path.is_file() and not overwrite:
        raise FormatError(path, "already holds a finished label file: give --overwrite to "
                          "replace it (the new one replaces it only once complete), or another "
                          "output (-o)")
    parent = path.absolute().parent
    while not parent.exists():  # the missing folders are made in the first one that exists
        parent = parent.parent
    if not parent.is_dir():
        raise FormatError(path, f"cannot be written: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stream2labels-probe.", dir=parent)
    except OSError as exc:
        raise FormatError(path, f"cannot be written: cannot create files in {parent} "
                          f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def label_run(paths: Sequence[str], output: str | os.PathLike[str],
              config: dict[str, Any] | None = None, *, progress: bool = True,
              overwrite: bool = False, started: Callable[[], object] | None = None
              ) -> dict[str, Any]:
    """Do the whole run; returns the summary that the CLI prints and records (with
    ``not_selected``: why the other frames were turned away, one line per rule).  ``started``
    is called once the inputs are read and found usable, before the first file is written
    (the CLI records its configuration there: a run refused at its start leaves nothing).

    Raises :class:`NothingToLabel`, writing no label file, when the inputs give no frame to
    label, or none of the selected frames could be labelled: an empty file would pass for a
    result; and a FormatError before any work for an
    output that cannot be written, or a finished one without ``overwrite``
    (:func:`check_output`), or a setting out of its range (:func:`check_settings`: a
    ConfigError); a ``run.source_options`` key no source type declares is a PeakNetError
    (:func:`peaknet_xtal.source_option.check`), as on the command line.
    """
    check_output(output, overwrite)
    cfg = check_settings(deep_merge(DEFAULTS, config or {}))
    run = cfg["run"]
    source_option.check(run["source_options"])  # for Python callers too, before any work
    start = time.perf_counter()
    output = Path(output)
    records, geometries = ingest(paths, run)
    if not records:
        raise NothingToLabel(", ".join(paths), "no indexed frame in it (no chunk or experiment "
                             "with a crystal): nothing to label, no output written")
    if started is not None:
        started()
    diffs = diff_all(records, float(cfg["peakdiff"]["cutoff"]))
    selection = Selection.from_config(cfg["peakdiff"])
    report = run.get("report") or str(output.with_suffix("")) + ".peakdiff.png"
    write_report(report, diffs, selection, title=output.name)
    not_selected = selection.rejection_lines(diffs)

    jobs = [FrameJob(i, rec, _stats(d), d.predicted_index)
            for i, (rec, d) in enumerate(zip(records, diffs, strict=False)) if selection.accepts(d)]
    if not jobs:
        causes = not_selected + missing_image_lines(records)
        raise NothingToLabel(", ".join(paths), f"none of the {len(records)} indexed frames is "
                             "selected for labelling, so nothing was written; why:\n"
                             + "".join(f"  {line}\n" for line in causes)
                             + f"  the PeakDiff report {report} shows every frame against the "
                             "selection")
    size = max(int(run["batch_size"]), 1)
    batches = [Batch(b, jobs[i:i + size]) for b, i in enumerate(range(0, len(jobs), size))]
    parts = _parts_dir(output, _fingerprint(paths, cfg, len(records)))
    todo = [(b, parts / f"batch_{b.index:06d}.h5") for b in batches]
    todo = [(b, p) for b, p in todo if not _part_done(p)]
    resumed = len(batches) - len(todo)
    labeler = BatchLabeler(cfg, geometries)
    fit_start = time.perf_counter()
    summaries = _execute(labeler, todo, run, len(jobs) - sum(len(b.jobs) for b, _ in todo),
                         len(jobs), progress)

    part_files = [parts / f"batch_{b.index:06d}.h5" for b in batches]
    frames = _frames_table(records, diffs, selection, part_files)
    if not np.any(frames["status"] == "labelled"):
        # no label file: one without a single labelled frame would pass for a result; and no
        # parts either, since the settings that fix it (--prefix) do not change the fingerprint,
        # so a rerun would resume from these failures instead of reading the images again
        shutil.rmtree(parts, ignore_errors=True)
        raise _nothing_labelled(paths, len(jobs), frames, not_selected)
    fit_seconds = time.perf_counter() - fit_start
    rows = merge_label_files(part_files, output, cfg, frames)
    if not run.get("keep_parts"):
        shutil.rmtree(parts, ignore_errors=True)
    summary = _summary(records, jobs, batches, resumed, summaries, rows, output, report, frames,
                       time.perf_counter() - start, fit_seconds)
    summary["not_selected"] = not_selected
    return summary


def _nothing_labelled(paths: Sequence[str], selected: int, frames: dict[str, np.ndarray],
                      not_selected: Sequence[str]) -> NothingToLabel:
    """Why none of the selected frames became labels: a first line saying how many images could
    not be read and the first reason, then why the other frames were not selected, one line per
    rule (as the summary would say).  The reason comes as the reader gave it: an image that is
    not where the inputs say is an error that points to --prefix itself, while an image read
    through a geometry it does not fit is no matter of --prefix (the advice misled there)."""
    unreadable = frames["status"] == "image_error"
    first = frames["message"][unreadable][0] if unreadable.any() else "none recorded"
    return NothingToLabel(", ".join(paths), f"none of the {selected} selected frames could be "
                          f"labelled ({int(unreadable.sum())} unreadable), no label file "
                          f"written; first error: {first}" + "".join(
                              f"\n  not selected: {line}" for line in not_selected))


def missing_image_lines(records: Sequence[FrameRecord]) -> list[str]:
    """One line counting the frames whose image file is not on this machine (none: no line).

    Streams name images by the path they had where indexing ran; when none of the frames is
    selected this says up front that loosening the selection alone would not be enough.  A name
    that only a non-file source reads (a psana run) is not counted.
    """
    from peaknet_xtal.registry import sniff_source

    missing = [r for r in records if not r.image or not (
        os.path.exists(r.image) or sniff_source(r.image, exclude=FILE_SOURCES) is not None)]
    if not missing:
        return []
    many = len(missing) > 1
    return [f"{len(missing)} frame{'s' if many else ''} name{'' if many else 's'} an image file "
            f"that is not here (first: {missing[0].image or '(none)'}; use --prefix to say "
            "where the images are)"]


def _stats(diff: FrameDiff) -> dict[str, Any]:
    return {"precision": diff.precision, "recall": diff.recall, "n_found": diff.n_found,
            "n_predicted": diff.n_predicted, "n_matched": diff.n_matched}


def _execute(labeler: BatchLabeler, todo: list[tuple[Batch, Path]], run: dict[str, Any],
             already: int, total: int, show: bool) -> list[BatchSummary]:
    summaries: list[BatchSummary] = []
    with Progress(total, "frames", desc="stream2labels", enabled=show, initial=already) as bar:

        def done(summary: BatchSummary) -> None:
            summaries.append(summary)
            fits = sum(s.fits_ok for s in summaries)
            bar.update(summary.frames + summary.frame_errors, extra=f"fits ok {fits}")

        if not todo:
            return summaries
        if run.get("ray", True):
            from peaknet_xtal.labelling.distributed import run_batches_ray
            from peaknet_xtal.pipeline.ray_session import ray_session

            with ray_session(run.get("address"), run.get("num_cpus")):
                run_batches_ray(labeler, [(b, str(p)) for b, p in todo], done,
                                max_batches_in_flight=int(run["max_batches_in_flight"]),
                                max_fits_in_flight=int(run["max_fits_in_flight"]))
        else:
            for batch, part in todo:
                done(labeler.run(batch, part, serial_fit_map))
    return summaries


def _frames_table(records: list[FrameRecord], diffs: list[FrameDiff], selection: Selection,
                  part_files: list[Path]) -> dict[str, np.ndarray]:
    """Every input frame: where it came from, its PeakDiff numbers and what became of it."""
    status = np.array(["not_selected" if not selection.accepts(d) else "lost" for d in diffs],
                      dtype=object)
    message = np.array(["; ".join(selection.reasons(d)) for d in diffs], dtype=object)
    for part in part_files:
        with LabelFile(part) as lf:
            if "batch" not in lf.h5:
                continue
            for number, st, msg in zip(lf.frames("frame", "batch"), lf.frames("status", "batch"),
                                       lf.frames("message", "batch"), strict=False):
                status[int(number)], message[int(number)] = st, msg
    return {
        "source": np.array([r.source for r in records], dtype=object),
        "image": np.array([r.image for r in records], dtype=object),
        "event": np.array([r.event for r in records], dtype=object),
        "n_crystals": np.array([r.n_crystals for r in records], dtype=np.int64),
        **summary_arrays(diffs, selection),
        "status": status, "message": message,
    }


def _summary(records: list[FrameRecord], jobs: list[FrameJob], batches: list[Batch], resumed: int,
             summaries: list[BatchSummary], rows: int, output: Path, report: str,
             frames: dict[str, np.ndarray], seconds: float, fit_seconds: float
             ) -> dict[str, Any]:
    with LabelFile(output) as lf:
        fits = lf.fits
    counts = Counter(STATUS[int(s)] for s in fits["status"])
    errors = frames["message"][frames["status"] == "image_error"]
    return {
        "first_image_error": str(errors[0]) if len(errors) else None,
        "output": str(output), "report": report, "frames": len(records), "selected": len(jobs),
        "labelled": int(np.sum(frames["status"] == "labelled")),
        "image_errors": int(np.sum(frames["status"] == "image_error")),
        "batches": len(batches), "batches_resumed": resumed, "rows": rows,
        "fits": int(len(fits)), "fits_ok": int(counts.get("ok", 0)),
        "fit_status": dict(counts), "seconds": round(seconds, 2),
        # attempted fits of this invocation over the labelling phase (images, fits, part files)
        "fits_per_s": round(sum(s.fits_ok + s.fits_rejected for s in summaries) / fit_seconds, 1)
        if fit_seconds > 0 else 0.0,
    }
