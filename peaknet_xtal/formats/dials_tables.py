"""DIALS reflection tables (``.refl``) and experiment lists (``.expt``), through DIALS' own classes.

Both formats are versioned msgpack/JSON with DIALS-specific column types; reading them with DIALS
itself (``flex.reflection_table.from_file``, ``ExperimentList.from_file``) is the only way to stay
exact across DIALS releases.  Columns come back as numpy arrays so the rest of the package never
touches ``flex``.

:func:`write_strong_refl` goes the other way: a peak table per image becomes a DIALS strong-spot
table that ``dials.index`` accepts in place of ``dials.find_spots`` output.  DIALS puts the pixel
origin at the corner (the centre of pixel i is i + 0.5), so positions shift by +0.5 here, at the
edge, as DEVELOPERS.md asks.

DIALS is imported lazily; it only exists where DIALS is installed, and reading a file without
it says so, naming the file (:func:`~peaknet_xtal.errors.require_dials`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.errors import FormatError, require_dials
from peaknet_xtal.types import PEAK_DTYPE, peaks_from_columns

#: DIALS/CrystFEL coordinates start at the pixel corner; the package's at the pixel centre.
CORNER_OFFSET = 0.5

#: Columns most callers want, when present.
DEFAULT_COLUMNS = ("id", "panel", "miller_index", "xyzobs.px.value", "xyzcal.px",
                   "intensity.sum.value", "bbox", "flags")


def _flex_to_numpy(column: Any) -> np.ndarray:
    """Any flex column as numpy: vec3/int6/miller columns become (n, k) arrays."""
    try:
        return np.asarray(column.as_numpy_array())
    except (AttributeError, TypeError, RuntimeError):
        pass
    try:  # miller_index, int6 and friends: go through a list of tuples
        return np.array(list(column))
    except TypeError as exc:
        raise TypeError(f"cannot convert column of type {type(column).__name__}") from exc


def load_reflection_table(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """The DIALS ``flex.reflection_table`` in ``path``, or a FormatError naming the file.

    Only msgpack tables (what DIALS has written since 2020) are read by default.  DIALS' own
    ``from_file`` falls back to unpickling anything else, and unpickling a crafted file runs
    arbitrary code; an old pickled table is read only with ``trust_pickle=True``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "file not found")
    require_dials(f"reading {path} (a DIALS reflection table)", "dials.array_family.flex")
    from dials.array_family import flex

    try:
        return flex.reflection_table.from_msgpack_file(path)
    except Exception as exc:  # RuntimeError for anything that is not a msgpack table
        if not trust_pickle:
            raise FormatError(path, "not a readable DIALS reflection table (not msgpack); if "
                              "it is an old pickled one from a source you trust, allow reading "
                              "it (stream2labels --trust-pickle), since loading a pickle can "
                              "run code") from exc
    try:
        return flex.reflection_table.from_pickle(path)
    except Exception as exc:  # pickle, EOF and flex errors alike
        raise FormatError(path, f"not a readable DIALS reflection table "
                          f"({type(exc).__name__}: {exc})") from exc


def read_reflections(path: str | os.PathLike[str],
                     columns: Sequence[str] | None = DEFAULT_COLUMNS, *,
                     trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Columns of a ``.refl`` as numpy (all columns when ``columns`` is None; absent ones skipped).
    """
    return table_columns(load_reflection_table(path, trust_pickle=trust_pickle), columns)


def table_columns(table: Any, columns: Sequence[str] | None = DEFAULT_COLUMNS
                  ) -> dict[str, np.ndarray]:
    """Columns of a loaded reflection table as numpy (:func:`read_reflections`)."""
    wanted = list(table.keys()) if columns is None else [c for c in columns if c in table]
    out = {}
    for name in wanted:
        try:
            out[name] = _flex_to_numpy(table[name])
        except TypeError:  # shoeboxes and other non-array columns
            continue
    return out


def check_pair(experiments: Any, expt: str, table: Any, refl: str) -> None:
    """A FormatError naming the ``.refl`` where its table cannot belong to ``experiments`` (read
    from ``expt``): it has reflections of an experiment the list lacks, or the identifiers DIALS
    pairs tables and experiments by (``experiment_identifiers``, set by dials.import and kept
    by every later step) differ.  DIALS itself refuses such a pair; read by row number alone,
    another run's reflections would label these images.  Id -1 is DIALS' own for reflections
    of no experiment (the spots ``dials.index`` could not index, kept in its table): they
    belong to none, and the pair is DIALS' own."""
    ids = np.unique(_flex_to_numpy(table["id"])) if "id" in table and table.size() else []
    outside = [int(i) for i in ids if not -1 <= int(i) < len(experiments)]
    if outside:
        raise FormatError(refl, f"has reflections of experiment {outside[0]}, but {expt} holds "
                          f"{len(experiments)} experiment(s): not the reflections of that "
                          "experiment list")
    named = dict(table.experiment_identifiers())
    for exp_id, identifier in sorted(named.items()):
        if not 0 <= int(exp_id) < len(experiments):
            continue
        theirs = experiments[int(exp_id)].identifier
        if theirs and identifier and theirs != identifier:
            raise FormatError(refl, f"experiment {exp_id} is {identifier!r} here and "
                              f"{theirs!r} in {expt}: these reflections belong to another "
                              "experiment list (give the .expt written with this .refl)")


def check_experiments_readable(path: str | os.PathLike[str]) -> None:
    """Before any work: raise :class:`~peaknet_xtal.errors.DialsUnavailable`, naming ``path``
    (a DIALS experiment list, read with its reflections) and saying that nothing was written,
    where DIALS is not there or fails to load.  What reading them imports is imported in a child
    process (``errors.require_dials`` with ``load=False``): imported here before a model runs,
    cctbx would hold torch to one thread."""
    require_dials(f"reading {os.fspath(path)} (a DIALS experiment list)",
                  "dxtbx.model.experiment_list", "dials.array_family.flex", load=False,
                  before_writing=True)


def read_experiments(path: str | os.PathLike[str], check_format: bool = False) -> Any:
    """The DIALS ``ExperimentList`` in ``path`` (images are not opened unless ``check_format``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "file not found")
    require_dials(f"reading {path} (a DIALS experiment list)", "dxtbx.model.experiment_list")
    from dxtbx.model.experiment_list import ExperimentList

    try:
        return ExperimentList.from_file(  # type: ignore[attr-defined]
            path, check_format=check_format)
    except Exception as exc:
        raise FormatError(path, f"not a readable DIALS experiment list "
                          f"({type(exc).__name__}: {exc})") from exc


def summarize_reflections(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts a person checks first: rows, experiments, panels, indexed, strong."""
    table = load_reflection_table(path)
    from dials.array_family import flex

    summary: dict[str, Any] = {"kind": "dials-reflections", "path": os.fspath(path),
                               "rows": len(table), "columns": sorted(table.keys())}
    if "id" in table:
        ids = _flex_to_numpy(table["id"])
        summary["experiments"] = int(len(np.unique(ids)))
        summary["per_experiment"] = {int(i): int(n) for i, n in
                                     zip(*np.unique(ids, return_counts=True), strict=False)}
    if "panel" in table:
        summary["panels"] = int(len(np.unique(_flex_to_numpy(table["panel"]))))
    if "miller_index" in table:
        hkl = np.array(list(table["miller_index"]))
        summary["indexed"] = int(np.count_nonzero(np.any(hkl != 0, axis=1))) if len(hkl) else 0
    if "flags" in table:
        summary["strong"] = int(table.get_flags(flex.reflection_table.flags.strong).count(True))
    return summary


def summarize_experiments(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Experiments, images, detectors, beams, and crystals (unit cells, space groups) where the
    experiments are indexed.

    ``dials.import`` writes experiments without crystals (one ``None`` per experiment): such a
    list is summarised as ``not indexed`` with its images, detector and beam, which is what a
    person checks after importing.  Images are counted from the image sets, not opened.
    """
    experiments = read_experiments(path)
    crystals = []
    for crystal in experiments.crystals():
        if crystal is None:
            continue
        crystals.append({"unit_cell": [round(v, 4) for v in crystal.get_unit_cell().parameters()],
                         "space_group": str(crystal.get_space_group().info())})
    indexed = sum(experiment.crystal is not None for experiment in experiments)
    imagesets = experiments.imagesets()
    files = {name for imageset in imagesets for name in imageset.paths()}
    return {
        "kind": "dials-experiments", "path": os.fspath(path),
        "experiments": len(experiments),
        "status": ("not indexed" if not indexed else "indexed" if indexed == len(experiments)
                   else f"{indexed} of {len(experiments)} experiments indexed"),
        "indexed_experiments": int(indexed),
        "imagesets": len(imagesets),
        "images": int(sum(len(imageset) for imageset in imagesets)),
        "image_files": len(files),
        "detectors": len(experiments.detectors()),
        "panels": [len(d) for d in experiments.detectors()],
        "crystals": crystals,
        "wavelength_A": sorted({round(b.get_wavelength(), 6) for b in experiments.beams()}),
    }


def reflections_to_peaks(path: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    """Observed spots of a ``.refl`` as PEAK_DTYPE tables per experiment id (0-based centre)."""
    cols = read_reflections(path, ("id", "panel", "xyzobs.px.value", "intensity.sum.value"))
    for needed in ("id", "panel", "xyzobs.px.value"):
        if needed not in cols:
            raise FormatError(path, f"no {needed} column")
    xyz = cols["xyzobs.px.value"]
    out = {}
    for exp_id in np.unique(cols["id"]):
        sel = cols["id"] == exp_id
        out[int(exp_id)] = peaks_from_columns(
            panel=cols["panel"][sel], fs=xyz[sel, 0] - CORNER_OFFSET,
            ss=xyz[sel, 1] - CORNER_OFFSET,
            intensity=cols["intensity.sum.value"][sel] if "intensity.sum.value" in cols
            else np.nan)
    return out


def _bbox(peaks: np.ndarray, z0: int) -> np.ndarray:
    """A square box about each peak, sized from its pixel count (DIALS bounds are half-open):
    for tables that carry no boxes (read from a stream or CXI file)."""
    npix = np.where(peaks["npix"] > 0, peaks["npix"], 1)
    half = np.maximum(1.0, np.ceil(np.sqrt(npix) / 2.0))
    x, y = peaks["fs"] + CORNER_OFFSET, peaks["ss"] + CORNER_OFFSET
    x0, y0 = np.floor(x - half), np.floor(y - half)
    x1, y1 = np.ceil(x + half), np.ceil(y + half)
    z = np.full(len(peaks), z0)
    return np.stack([x0, x1, y0, y1, z, z + 1], axis=1).astype(np.int64)


def strong_reflection_table(tables: Sequence[np.ndarray], *, boxes: Sequence[Any] | None = None,
                            sequence: bool = False, z0: int = 0,
                            experiment_ids: Sequence[int] | None = None,
                            experiments: Any = None) -> Any:
    """The one DIALS strong-spot ``flex.reflection_table`` builder: one PEAK_DTYPE table per image.

    Stills (default): image ``i`` is experiment ``experiment_ids[i]`` (default ``i``) at z =
    ``z0`` + 0.5; ``sequence=True``: one experiment, image ``i`` at z = ``z0 + i`` + 0.5.
    ``boxes[i]`` (``(N, 4)`` fs0, fs1, ss0, ss1 end exclusive, as ``find_peaks(with_bbox=True)``
    gives) are the components' own bounds; without them each box is a square sized from
    ``npix``.  Columns: ``id``, ``panel``, ``xyzobs.px.value`` (pixel-corner origin) and its
    variance (1/12 px^2, a uniform pixel), ``bbox``, ``intensity.sum.value`` and its variance
    ((I / SNR)^2 where the finder measured an SNR: the noise of the summed footprint; else shot
    noise of the clipped intensity plus the background spread over the peak's pixels),
    ``background.mean`` and the ``strong`` flag: what ``dials.index`` reads from ``strong.refl``.
    """
    require_dials("a DIALS strong-spot table", "dials.array_family.flex")
    from dials.array_family import flex

    if isinstance(experiments, (str, os.PathLike)):
        experiments = read_experiments(experiments)
    ids_given = list(experiment_ids) if experiment_ids is not None else None
    parts = []
    for i, peaks in enumerate(tables):
        peaks = np.asarray(peaks)
        if peaks.dtype != PEAK_DTYPE:
            raise TypeError(f"table {i} is not a PEAK_DTYPE peak table")
        exp_id = 0 if sequence else (ids_given[i] if ids_given is not None else i)
        z = z0 + i if sequence else z0
        box = _bbox(peaks, z)
        if boxes is not None and boxes[i] is not None:
            box[:, :4] = np.asarray(boxes[i], dtype=np.int64).reshape(-1, 4)
        parts.append((peaks, exp_id, z, box))
    n = sum(len(p) for p, _, _, _ in parts)
    peaks = (np.concatenate([p for p, _, _, _ in parts]) if parts
             else np.zeros(0, dtype=PEAK_DTYPE))
    ids = np.concatenate([np.full(len(p), e) for p, e, _, _ in parts]) if parts else np.zeros(0)
    zs = np.concatenate([np.full(len(p), z) for p, _, z, _ in parts]) if parts else np.zeros(0)
    bbox = (np.concatenate([b for _, _, _, b in parts]) if parts
            else np.zeros((0, 6), dtype=np.int64))
    xyz = np.stack([peaks["fs"] + CORNER_OFFSET, peaks["ss"] + CORNER_OFFSET,
                    zs + CORNER_OFFSET], axis=1) if n else np.zeros((0, 3))
    intensity = np.nan_to_num(peaks["intensity"].astype(np.float64), nan=0.0)
    variance = np.clip(intensity, 0, None) + peaks["npix"] * np.nan_to_num(
        peaks["background_sigma"]) ** 2
    # where the finder measured it, the variance of the summed footprint is the one its SNR
    # divides by (every summed pixel's background with its neighbour correlation, the subtracted
    # background's error, the shot noise): (I / SNR)^2; the formula above is for tables without
    snr = peaks["snr"].astype(np.float64)
    measured = np.isfinite(snr) & (snr != 0) & (intensity != 0)
    variance[measured] = (intensity[measured] / snr[measured]) ** 2
    table = flex.reflection_table()
    table["id"] = flex.int(ids.astype(np.int32).tolist())
    table["panel"] = flex.size_t(peaks["panel"].astype(np.int64).tolist())
    table["xyzobs.px.value"] = flex.vec3_double([tuple(map(float, v)) for v in xyz])
    table["xyzobs.px.variance"] = flex.vec3_double(n, (1 / 12, 1 / 12, 1 / 12))
    table["bbox"] = flex.int6([tuple(int(v) for v in b) for b in bbox])
    table["intensity.sum.value"] = flex.double(intensity.tolist())
    table["intensity.sum.variance"] = flex.double(variance.tolist())
    table["background.mean"] = flex.double(np.nan_to_num(peaks["background"]).tolist())
    table.set_flags(flex.bool(n, True), flex.reflection_table.flags.strong)
    if experiments is not None:
        for exp_id in sorted(set(ids.astype(int).tolist())):
            table.experiment_identifiers()[int(exp_id)] = experiments[int(exp_id)].identifier
    return table


def write_strong_refl(path: str | os.PathLike[str], tables: Sequence[np.ndarray], *,
                      experiments: Any = None, sequence: bool = False,
                      boxes: Sequence[Any] | None = None) -> int:
    """Write :func:`strong_reflection_table` of one PEAK_DTYPE table per image as a DIALS
    ``.refl`` (atomically); returns the rows.

    ``experiments`` (an ``ExperimentList`` or ``.expt`` path) supplies the experiment identifiers
    DIALS uses to match the table to the images.
    """
    table = strong_reflection_table(tables, boxes=boxes, sequence=sequence,
                                    experiments=experiments)
    with atomic_path(path) as tmp:
        table.as_file(str(tmp))
    return int(table.size())
