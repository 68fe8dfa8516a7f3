"""Run finders on a data set and write the report: ``report.md``, PNGs and ``report.json``.

The JSON holds every number the Markdown shows (and more), so reports can be compared by script;
the PNGs are what a crystallographer looks at before trusting a finder on their own data.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.atomic import make_output_folder, write_json_atomic, write_text_atomic
from peaknet_xtal.evaluation import plots
from peaknet_xtal.evaluation.finders import create_finder
from peaknet_xtal.evaluation.indexing import KnownSymmetry, failure_text
from peaknet_xtal.evaluation.metrics import bootstrap_f1, score_frames
from peaknet_xtal.evaluation.tuning import default_grid, tune
from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.progress import Progress
from peaknet_xtal.stopping import stops_held
from peaknet_xtal.types import Frame

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Frames to evaluate on, with the truth when it is known (simulated data)."""

    name: str
    frames: list[Frame]
    truths: list[np.ndarray] | None = None  # per frame: true strong reflections (panel, fs, ss)
    reflections: list[np.ndarray] | None = None  # per frame: every true reflection, weak ones too
    images: list[str] = field(default_factory=list)  # files for dials.import (indexing)
    adu_per_photon: float = 1.0
    reference_cell: tuple[float, ...] | None = None  # drawn on the cell histograms
    space_group: str | None = None  # the user's: replaces the truth's on every frame
    unit_cell: tuple[float, ...] | None = None  # the user's: replaces the truth's on every frame
    known_symmetry: list[KnownSymmetry] | None = None  # per frame: its crystal (simulated data)


def load_sim_run(directory: str | os.PathLike[str], name: str = "sim") -> Dataset:
    """A run written by ``peaknet-sim`` (``NAME.cxi``, ``NAME.geom``, ``NAME_truth.h5``)."""
    from peaknet_xtal.evaluation.indexing import truth_symmetry
    from peaknet_xtal.formats.cxi import iter_cxi_frames
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim.output import read_truth

    folder = Path(directory)
    check_sim_run(folder, name)
    geometry = read_geometry(folder / f"{name}.geom")
    truth = read_truth(folder / f"{name}_truth.h5")
    frames = list(iter_cxi_frames(folder / f"{name}.cxi", geometry))
    refl = truth["reflections"]
    everything = [refl[refl["frame"] == i] for i in range(len(frames))]
    truths = [rows[rows["strong"]] for rows in everything]
    for frame, row in zip(frames, truth["frames"], strict=False):
        frame.meta["wavelength_A"] = float(row["wavelength_A"])
        frame.meta["truth_hit"] = bool(row["hit"])
    return Dataset(name=folder.name, frames=frames, truths=truths, reflections=everything,
                   images=[str(folder / f"{name}.cxi")],
                   adu_per_photon=_gain(geometry, frames),
                   reference_cell=_one_cell(truth["crystals"]),
                   known_symmetry=truth_symmetry(truth["crystals"], len(frames)))


def check_sim_run(directory: str | os.PathLike[str], name: str = "sim") -> None:
    """Raise FileNotFoundError (one line) unless ``directory`` holds a ``peaknet-sim`` run named
    ``name``: a file, or a folder of something else, would otherwise fail on whichever file
    happens to be read first, with a message that does not say what the command expects."""
    folder = Path(directory)
    wanted = [f"{name}.cxi", f"{name}.geom", f"{name}_truth.h5"]
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{folder} {what}: expected a peaknet-sim output folder "
                                f"(holding {', '.join(wanted)})")
    missing = [w for w in wanted if not (folder / w).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: expected a peaknet-sim output folder; "
                                f"{', '.join(missing)} missing (see --name for another stem)")


def _one_cell(crystals: np.ndarray, tolerance: float = 0.05) -> tuple[float, ...] | None:
    """The run's cell when all its crystals are one kind (same lattice, lengths within
    ``tolerance`` of the median: jitter only), else None: a median of different crystals'
    cells is no crystal's, and a line drawn at it on the histograms would mislead."""
    if not len(crystals):
        return None
    cells = np.asarray(crystals["cell"], dtype=float)
    median = np.median(cells, axis=0)
    same_lattice = len({(bytes(r["lattice"]), bytes(r["centring"])) for r in crystals}) == 1
    close = np.all(np.abs(cells[:, :3] / median[:3] - 1) <= tolerance)
    return tuple(float(v) for v in median) if same_lattice and close else None


def _gain(geometry: Any, frames: Sequence[Frame]) -> float:
    """The data's ADU per photon (settings.resolve_gain); unknown counts ADU as photons."""
    from peaknet_xtal.finding.settings import resolve_gain

    gain = resolve_gain(meta=frames[0].meta if frames else None, geometry=geometry)
    return 1.0 if gain is None else gain


def run_finders(finders: dict[str, Any], frames: Sequence[Frame], progress: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Every finder on every frame: peak tables and seconds per frame.  A finder that finds
    whole runs (``find_run``: PeakNet, as ``peaknet2cxi`` runs a file) gets the frames as one
    run; its seconds are those between results (batches make them uneven; their mean is
    the cost per frame)."""
    out: dict[str, dict[str, Any]] = {}
    for label, finder in finders.items():
        peaks, seconds = [], []
        with Progress(len(frames), "frames", desc=label, enabled=progress) as bar:
            start = time.perf_counter()
            found = (finder.find_run(frames) if hasattr(finder, "find_run")
                     else (finder.find(frame) for frame in frames))
            for table in found:
                peaks.append(table)
                now = time.perf_counter()
                seconds.append(now - start)
                start = now
                bar.update(1)
        out[label] = {"peaks": peaks, "seconds": seconds}
    return out


def tuned_finders(specs: Sequence[str], dataset: Dataset, tune_frames: int,
                  cutoff: float, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Instantiate finders; classic ones tuned on the first ``tune_frames`` frames (with truth)."""
    finders, tuning = {}, {}
    for spec in specs:
        kind = spec.partition(":")[0]
        params: dict[str, Any] = {}
        if kind in ("peakfinder8", "dispersion"):
            if dataset.truths is not None and tune_frames > 0:
                grid = default_grid(kind, dataset.adu_per_photon)
                result = tune(kind, dataset.frames[:tune_frames], dataset.truths[:tune_frames],
                              grid, cutoff, None if dataset.reflections is None
                              else dataset.reflections[:tune_frames], progress=progress)
                params = result["best"]
                tuning[spec] = result
            elif kind == "dispersion":
                params = {"gain": dataset.adu_per_photon}
        finders[spec] = create_finder(spec, params)
    return finders, tuning


def evaluate(dataset: Dataset, specs: Sequence[str], out_dir: str | os.PathLike[str], *,
             tune_frames: int = 0, cutoff: float = 3.0, min_peaks: int = DEFAULTS.min_peaks,
             index: bool = False, samples: int = 2,
             record: Callable[[Path], None] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Score ``specs`` on ``dataset`` and write the report under ``out_dir``; returns the JSON.

    A frame is a hit with at least ``min_peaks`` peaks: by default the library's own rule
    (``finding.settings.DEFAULTS.min_peaks``), for every finder alike.

    A folder holds one report.  Everything is written into a hidden staging folder inside
    ``out_dir`` and moved into place only once the whole report is complete, so a failed or
    interrupted run leaves an earlier report as it was; one that succeeds replaces it, and the
    files the earlier report recorded (``report.json``'s ``files``) that this one does not write
    are removed: left in place, an earlier run's activation maps and DIALS folders sat beside a
    report.md that no longer mentioned them, as if this run had made them.  Nothing the earlier
    report did not record is touched, so other files in the folder stay.  (Replacing is the
    caller's decision: ``peaknet-eval`` refuses a folder holding a report without
    ``--overwrite``, as ``peaknet-sim`` refuses one holding a run.)  ``record``, if given, is
    called with the staging folder before any work: what it writes there (the command's
    configuration record) is published and recorded with the report, and what it logs (the
    resolved configuration) comes first in the log, not after minutes of tuning and indexing,
    and is there even when the run fails or is stopped.

    A stop (Ctrl-C, SIGTERM as :mod:`peaknet_xtal.stopping` raises it) is held while the report
    is moved into place and while the staging folder is removed, and raised once that is done:
    one landing in between left an earlier report half-replaced, or the staging folder behind.
    ``progress``: the progress lines of tuning, finding and indexing (on stderr)."""
    if not dataset.frames:
        raise ValueError(f"{dataset.name}: no frames to score")
    if tune_frames >= len(dataset.frames):  # the tuning frames are never scored
        raise ValueError(f"{dataset.name}: {len(dataset.frames)} frame(s), all taken by "
                         f"--tune-frames {tune_frames}: nothing left to score")
    out = Path(out_dir)
    created = not out.exists()
    make_output_folder(out)
    earlier = recorded_files(out)
    staging = Path(tempfile.mkdtemp(prefix=".report.", suffix=".partial", dir=out))
    try:
        if record is not None:
            record(staging)
        report = _evaluate(dataset, specs, staging, tune_frames, cutoff, min_peaks, index,
                           samples, progress)
        report["files"] = sorted({p.name for p in staging.iterdir()} | set(REPORT_FILES))
        write_json_atomic(staging / "report.json", strict_json(report))
        write_text_atomic(staging / "report.md", markdown(report, dataset))
        with stops_held(second_stops=False):  # a report moved into place, whole
            _publish(staging, out, report["files"], earlier)
    finally:
        with stops_held(second_stops=False):
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(out.iterdir()):
                out.rmdir()  # a failed report into a new folder leaves no folder either
    return report


#: written by every report, last (after the files they describe)
REPORT_FILES = ("report.json", "report.md")


def recorded_files(folder: str | os.PathLike[str]) -> list[str]:
    """The names of the files and folders the report in ``folder`` recorded as its own (none
    when the folder holds no report); a report from before ``files`` was recorded names its
    figures and its DIALS folder.  Only plain names inside the folder count: a hand-edited
    report.json must not lead ``evaluate`` to remove anything outside it."""
    path = Path(folder) / "report.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or unreadable: nothing known to be the report's
        return []
    if not isinstance(saved, dict):
        return []
    names = saved.get("files")
    if not isinstance(names, list):
        names = [*REPORT_FILES, *(saved.get("figures") or []),
                 *(["dials"] if saved.get("indexing") else [])]
    return [n for n in names if isinstance(n, str) and n not in ("", ".", "..")
            and Path(n).name == n]


def _publish(staging: Path, out: Path, files: Sequence[str], earlier: Sequence[str]) -> None:
    """Move a finished report from ``staging`` into ``out``: its figures and folders first, then
    report.json and report.md, then the earlier report's files this one does not write are
    removed, so a report.md in ``out`` never names a file it did not make."""
    last = [n for n in REPORT_FILES if n in files]
    for name in [*(n for n in files if n not in REPORT_FILES), *last]:
        source, target = staging / name, out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(source, target)
    for name in sorted(set(earlier) - set(files)):
        stale = out / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        elif stale.exists() or stale.is_symlink():
            stale.unlink()


def _evaluate(dataset: Dataset, specs: Sequence[str], out: Path, tune_frames: int,
              cutoff: float, min_peaks: int, index: bool, samples: int,
              progress: bool) -> dict[str, Any]:
    """``evaluate``'s work: scores, indexing and figures written into ``out``."""
    finders, tuning = tuned_finders(specs, dataset, tune_frames, cutoff, progress)
    names = file_names(list(finders))
    frames = dataset.frames[tune_frames:]
    truths = None if dataset.truths is None else dataset.truths[tune_frames:]
    every = (None if dataset.reflections is None else dataset.reflections[tune_frames:])
    runs = run_finders(finders, frames, progress)
    report: dict[str, Any] = {"dataset": dataset.name, "frames": len(frames),
                              "tuning_frames": tune_frames, "cutoff_px": cutoff,
                              "min_peaks": min_peaks, "finders": {}}
    for label, run in runs.items():
        entry: dict[str, Any] = {"params": finders[label].params,
                                 "file_name": names[label],
                                 "seconds_per_frame": float(np.mean(run["seconds"]))
                                 if run["seconds"] else float("nan"),
                                 "peaks_per_frame": [len(p) for p in run["peaks"]]}
        hits = [len(p) >= min_peaks for p in run["peaks"]]
        entry["hit_rate"] = float(np.mean(hits)) if hits else float("nan")
        if truths is not None:
            scores = score_frames(_triples(run["peaks"], truths, every), cutoff)
            entry["accuracy"] = scores["overall"].to_dict()
            entry["accuracy"]["f1_ci95"] = list(bootstrap_f1(scores["frames"]))
            entry["per_frame_f1"] = [s.f1 for s in scores["frames"]]
        blanks = [len(p) for p, f in zip(run["peaks"], frames, strict=True)
                  if f.meta.get("truth_hit") is False]
        if blanks:  # frames without a crystal: every peak on them is false
            entry["blank_frames"] = len(blanks)
            entry["blank_false_peaks"] = float(np.mean(blanks))
            entry["blank_hits"] = int(sum(n >= min_peaks for n in blanks))
        if label in tuning:
            entry["tuning"] = tuning[label]
        report["finders"][label] = entry
    if index:
        report["indexing"] = _index_all(dataset, runs, tune_frames, min_peaks, out / "dials",
                                        names, progress)
    report["figures"] = _figures(dataset, finders, runs, truths, frames, out, samples, cutoff,
                                 report, names)
    return report


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: Python would write them as bare ``NaN``,
    which is no JSON and breaks other readers (jq, browsers); the Markdown shows them as n/a."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    return value


def slug(label: str) -> str:
    """A finder label as a file name: ``peaknet:/path/to/model.safetensors`` -> safe characters.
    Short, so names stay readable; ``file_names`` makes them distinct within a report."""
    kind, _, model = label.partition(":")
    tail = Path(model).stem if model else ""
    return _safe(f"{kind}_{tail}" if tail else kind)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _slug_at(label: str, depth: int) -> str:
    """``slug`` with the model's ``depth - 1`` nearest parent folders before its stem."""
    kind, _, model = label.partition(":")
    if not model or depth <= 1:
        return slug(label)
    path = Path(model)
    folders = [p for p in path.parent.parts if p != path.anchor and p != "."]
    return _safe("_".join([kind, *folders[max(len(folders) - depth + 1, 0):], path.stem]))


def file_names(labels: Sequence[str]) -> dict[str, str]:
    """One distinct file name per finder label, for its activation maps and DIALS folder.

    ``slug`` keeps only a model's file stem, and every ``peaknet-train`` output is
    ``model.safetensors``: two trained models got one name, and the second finder's activation
    maps were written over the first's.  Labels whose slugs collide get their model's parent
    folders, nearest first, as many as it takes to tell them apart (``runs/t1/model.safetensors``
    and ``runs/d1/model.safetensors``: ``peaknet_t1_model``, ``peaknet_d1_model``); labels the
    path cannot tell apart (the same file spelled twice with unsafe characters) a number, in
    label order.  A name depends only on the labels of the run, so a rerun of the same finders
    writes the same files.  Names are compared case-blind: some file systems are."""
    labels = list(dict.fromkeys(labels))
    names = {label: slug(label) for label in labels}
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(names[label].casefold(), []).append(label)
    for group in groups.values():
        if len(group) < 2:
            continue
        deepest = max(len(Path(label.partition(":")[2]).parts) for label in group)
        for depth in range(2, deepest + 1):
            tried = [_slug_at(label, depth) for label in group]
            names.update(zip(group, tried, strict=True))
            if len({t.casefold() for t in tried}) == len(tried):
                break
    used: set[str] = set()
    for label in labels:
        name, number = names[label], 1
        while name.casefold() in used:
            number += 1
            name = f"{names[label]}_{number}"
        names[label] = name
        used.add(name.casefold())
    return names


def _triples(found: Sequence[np.ndarray], truths: Sequence[np.ndarray],
             every: Sequence[np.ndarray] | None) -> list[tuple[np.ndarray, ...]]:
    if every is None:
        return list(zip(found, truths, strict=False))
    return list(zip(found, truths, every, strict=False))


def frame_symmetry(dataset: Dataset, first: int = 0) -> tuple[list[list[str]], str]:
    """Each frame's ``known_symmetry`` options from ``first`` on, and how they were chosen.

    A frame is indexed with its own crystal's cell and lattice from the truth, so the rates
    measure the finder and not a cell that fits no crystal; what the user gave (``space_group``,
    ``unit_cell``) replaces the truth's, each on its own."""
    truth = dataset.known_symmetry or [KnownSymmetry()] * len(dataset.frames)
    known = [KnownSymmetry(dataset.space_group or k.space_group,
                           dataset.unit_cell if dataset.unit_cell is not None else k.unit_cell)
             for k in truth[first:]]
    given = [f"space group {dataset.space_group}" if dataset.space_group else "",
             "unit cell " + ",".join(f"{v:g}" for v in dataset.unit_cell)
             if dataset.unit_cell is not None else ""]
    given = [g for g in given if g]
    if dataset.known_symmetry is not None:
        how = ("each frame's own crystal from the simulator's truth (cell, and the lowest "
               "space group of its lattice)")
        how = f"{' and '.join(given)} as given, else {how}" if given else how
    else:
        how = " and ".join(given) + " as given" if given else "none (nothing known)"
    return [k.options() for k in known], how


def _index_all(dataset: Dataset, runs: dict[str, dict[str, Any]], skip: int, min_peaks: int,
               workdir: Path, names: dict[str, str], progress: bool) -> dict[str, Any]:
    from peaknet_xtal.evaluation.indexing import (
        import_images,
        index_frames,
        indexing_options,
        summarise,
    )

    imported = import_images(dataset.images, workdir)
    options = indexing_options()
    known, how = frame_symmetry(dataset, skip)
    out: dict[str, Any] = {"options": options, "known_symmetry": how}
    for label, run in runs.items():
        # Frames used for tuning are not scored; indexing sees the same evaluation frames.
        results = index_frames(imported, list(run["peaks"]), workdir / names[label], options,
                               min_spots=min_peaks, first=skip, known=known,
                               progress=progress)
        hits = [len(p) >= min_peaks for p in run["peaks"]]
        out[label] = summary = summarise(hits, results)
        if summary["failures"]:
            log.warning("%s: %d of %d hits not indexed: %s", label,
                        sum(summary["failures"].values()), summary["hits"],
                        failure_text(summary["failures"]))
    return out


def _sample_frames(frames: Sequence[Frame], truths: Sequence[np.ndarray] | None,
                   samples: int) -> list[int]:
    """The frames with the most true peaks (or simply the first ones without truth)."""
    if truths is None:
        return list(range(min(samples, len(frames))))
    order = np.argsort([-len(t) for t in truths], kind="stable")
    return [int(i) for i in order[:samples]]


def _windows(frame: Frame, truth: np.ndarray | None, size: int = 64) -> list[tuple[str, int,
                                                                                 tuple[slice,
                                                                                       slice]]]:
    """Zoomed views: the busiest panel whole, a true peak nearest a panel edge, and the
    brightest good pixel far from any true peak (hot pixels, streaks: where finders go wrong)."""
    views = []
    if truth is not None and len(truth):
        counts = np.bincount(truth["panel"], minlength=len(frame.panels))
        busiest = int(np.argmax(counts))
    else:
        busiest = 0
    shape = frame.panels[busiest].shape
    views.append(("panel", busiest, (slice(0, shape[0]), slice(0, shape[1]))))
    if truth is not None and len(truth):
        margins = [min(r["fs"], r["ss"], frame.panels[r["panel"]].shape[1] - 1 - r["fs"],
                       frame.panels[r["panel"]].shape[0] - 1 - r["ss"]) for r in truth]
        r = truth[int(np.argmin(margins))]
        views.append(("edge", int(r["panel"]), _window(frame.panels[r["panel"]].shape,
                                                       r["ss"], r["fs"], size)))
    best = (-np.inf, 0, 0, 0)
    for p, (image, good) in enumerate(zip(frame.panels, frame.masks_or_ones(), strict=False)):
        score = np.where(good, image, -np.inf).astype(float)
        if truth is not None:
            for r in truth[truth["panel"] == p]:
                y, x = int(round(r["ss"])), int(round(r["fs"]))
                score[max(y - 6, 0):y + 7, max(x - 6, 0):x + 7] = -np.inf
        k = int(np.argmax(score))
        if score.flat[k] > best[0]:
            best = (score.flat[k], p, *np.unravel_index(k, score.shape))
    views.append(("artifact", best[1], _window(frame.panels[best[1]].shape, best[2], best[3],
                                              size)))
    return views


def _window(shape: tuple[int, ...], y: float, x: float, size: int) -> tuple[slice, slice]:
    h, w = min(size, shape[0]), min(size, shape[1])
    y0 = int(np.clip(round(y) - h // 2, 0, shape[0] - h))
    x0 = int(np.clip(round(x) - w // 2, 0, shape[1] - w))
    return slice(y0, y0 + h), slice(x0, x0 + w)


def _figures(dataset: Dataset, finders: dict[str, Any], runs: dict[str, dict[str, Any]],
             truths: Sequence[np.ndarray] | None, frames: Sequence[Frame], out: Path,
             samples: int, cutoff: float, report: dict[str, Any],
             names: dict[str, str]) -> list[str]:
    files: list[str] = []
    if truths is not None:
        scores = {label: entry["accuracy"] for label, entry in report["finders"].items()}
        plots.score_bars(out / "scores.png", scores,
                         title=f"{dataset.name}: {report['frames']} frames scored against the "
                         f"truth (match within {cutoff:g} px)")
        files.append("scores.png")
    first = int(report.get("tuning_frames", 0))
    for i in _sample_frames(frames, truths, samples):
        frame = frames[i]
        truth = None if truths is None else truths[i]
        number = first + i  # the frame's index in the data set, not among the scored frames
        views = _windows(frame, truth)
        for kind, panel, window in views:
            found = {label: run["peaks"][i][run["peaks"][i]["panel"] == panel]
                     for label, run in runs.items()}
            panel_truth = None if truth is None else truth[truth["panel"] == panel]
            name = f"overlay_frame{number}_{kind}.png"
            plots.peak_overlay(out / name, frame.panels[panel], frame.masks_or_ones()[panel],
                               found, panel_truth, window, cutoff=cutoff,
                               title=f"{dataset.name} frame {number} panel {panel} ({kind})")
            files.append(name)
        for label, finder in finders.items():
            if hasattr(finder, "activation_maps"):
                panel = views[0][1]  # the busiest panel
                (background,), (peak,) = finder.activation_maps(frame, [panel])
                name = f"activation_frame{number}_{names[label]}.png"
                plots.activation_maps(out / name, frame.panels[panel],
                                      frame.masks_or_ones()[panel], background, peak,
                                      title=f"{label}: frame {number} panel {panel}")
                files.append(name)
    indexing = report.get("indexing")
    if indexing:
        cells = {label: np.asarray(v["cells"]) for label, v in indexing.items()
                 if isinstance(v, dict) and "cells" in v}
        plots.cell_histograms(out / "cells.png", cells, dataset.reference_cell)
        files.append("cells.png")
    return files


def fmt(value: Any, digits: int = 3) -> str:
    """A number as report.md shows it (NaN, infinity and None: n/a); the command's own
    output uses it too, so the two never disagree."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any], dataset: Dataset) -> str:
    """The human-readable report; every number in it is also in ``report.json``."""
    lines = [f"# Peak-finder evaluation: {report['dataset']}", "",
             f"{report['frames']} frames scored"
             + (f" ({report['tuning_frames']} earlier frames used only to tune the classic "
                "finders)" if report["tuning_frames"] else "")
             + f"; a hit has at least {report['min_peaks']} peaks; peaks match truth within "
             f"{report['cutoff_px']} px on the same panel.", ""]
    if dataset.truths is not None:
        lines += ["## Accuracy against the simulator's truth", "",
                  "Recall counts the strong reflections found; precision counts found peaks "
                  "lying on any true reflection (a weak reflection found is no false peak).", "",
                  "| finder | precision | recall | F1 | median error (px) | s/frame |",
                  "|---|---|---|---|---|---|"]
        for label, e in report["finders"].items():
            a = e["accuracy"]
            lines.append(f"| {label} | {fmt(a['precision'])} | {fmt(a['recall'])} | "
                         f"{fmt(a['f1'])} | {fmt(a['median_error_px'], 2)} | "
                         f"{fmt(e['seconds_per_frame'], 2)} |")
        lines += ["", "F1 interval (the error bars of scores.png): 95 % percentile bootstrap "
                  "over frames. Blanks: frames without a crystal, where every peak is false.", "",
                  "| finder | F1 95 % interval | false peaks per blank | blanks called hits |",
                  "|---|---|---|---|"]
        for label, e in report["finders"].items():
            ci = e["accuracy"].get("f1_ci95") or [float("nan")] * 2
            blanks = (f"{e['blank_hits']} of {e['blank_frames']}" if "blank_frames" in e
                      else "n/a")
            lines.append(f"| {label} | {fmt(ci[0])}-{fmt(ci[1])} | "
                         f"{fmt(e.get('blank_false_peaks', float('nan')), 1)} | {blanks} |")
        lines += ["", "![scores](scores.png)", ""]
    indexing = report.get("indexing")
    lines += ["## Hits and indexing", "", "| finder | hit rate | indexing rate | indexing yield |",
              "|---|---|---|---|"]
    for label, e in report["finders"].items():
        ix = indexing.get(label) if indexing else None
        lines.append(f"| {label} | {fmt(e['hit_rate'])} | "
                     f"{fmt(ix['indexing_rate']) if ix else 'not run'} | "
                     f"{fmt(ix['indexing_yield']) if ix else 'not run'} |")
    if indexing:
        lines += ["", "Indexing: `dials.index` per frame with " +
                  " ".join(f"`{o}`" for o in indexing["options"]) + "; known symmetry: "
                  + indexing.get("known_symmetry", "as given") + "."]
        failed = [(label, n, reason) for label, e in indexing.items()
                  if isinstance(e, dict) for reason, n in e.get("failures", {}).items()]
        if failed:
            lines += ["", "Hits DIALS did not index, by its reason:", "",
                      "| finder | hits | reason |", "|---|---|---|"]
            lines += [f"| {label} | {n} | {reason.replace('|', '/')} |"
                      for label, n, reason in failed]
        lines += ["", "![cells](cells.png)"]
    tuned = {k: v["tuning"] for k, v in report["finders"].items() if "tuning" in v}
    if tuned:
        lines += ["", "## Tuned parameters of the classic finders", ""]
        for label, t in tuned.items():
            lines.append(f"- {label}: `{t['best']}` (F1 {fmt(t['best_score']['f1'])} on the "
                         f"tuning frames, best of {len(t['points'])} settings)")
    lines += ["", "## Overlays", "",
              "Gold circles: true strong reflections; markers: each finder's peaks, ringed when "
              "matched to the truth. Views: the busiest panel, the true peak nearest a panel "
              "edge, and the brightest pixel far from any true peak (detector artifacts).", ""]
    lines += [f"![{name}]({name})" for name in report["figures"]
              if name.startswith(("overlay", "activation"))]
    return "\n".join(lines) + "\n"
