"""Hit rate, indexing rate and indexing yield through DIALS stills indexing.

The paper judges a finder by what indexing makes of its peaks.  Each frame's peaks are written as a
DIALS strong-spot table and indexed on their own with ``dials.index`` (the real program, run as a
subprocess, so nothing about DIALS is imitated), using the same indexing settings for every finder;
when ``indexamajig`` is on PATH it can be used the same way from the CXI peak tables.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class IndexingResult:
    """What DIALS made of one frame's peaks."""

    indexed: bool
    cell: tuple[float, ...] | None = None  # a, b, c (A), alpha, beta, gamma (deg)
    n_indexed_spots: int = 0
    message: str = ""


def indexing_options(space_group: str | None = None,
                     unit_cell: Sequence[float] | None = None) -> list[str]:
    """``dials.index`` settings shared by every finder (known symmetry when given)."""
    options = ["stills.indexer=sequences", "indexing.method=fft1d"]
    if space_group:
        options.append(f"indexing.known_symmetry.space_group={space_group}")
    if unit_cell is not None:
        options.append("indexing.known_symmetry.unit_cell=" + ",".join(f"{v:g}" for v in unit_cell))
    return options


def import_images(images: Sequence[str | os.PathLike[str]], workdir: Path) -> Path:
    """``dials.import`` the images once; every finder is indexed against the same models."""
    from peaknet_xtal.evaluation.dials_commands import dials_environment, run_dials

    workdir.mkdir(parents=True, exist_ok=True)
    run_dials("import", *[str(Path(p).resolve()) for p in images],
              "output.experiments=imported.expt", cwd=workdir, env=dials_environment())
    return workdir / "imported.expt"


def index_frames(imported: Path, tables: Sequence[np.ndarray], workdir: Path,
                 options: Sequence[str], min_spots: int = 10) -> list[IndexingResult]:
    """Index each frame's peak table on its own; frames with fewer than ``min_spots`` are skipped
    (DIALS cannot index them, and a non-hit is never indexed)."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from peaknet_xtal.evaluation.dials_commands import dials_environment
    from peaknet_xtal.progress import Progress

    experiments = ExperimentListFactory.from_json_file(str(imported), check_format=False)
    if len(experiments) != len(tables):
        raise ValueError(f"{imported}: {len(experiments)} images but {len(tables)} peak tables")
    env = dials_environment()
    results = []
    with Progress(len(tables), "frames", desc=f"dials.index {workdir.name}") as bar:
        for i, (experiment, peaks) in enumerate(zip(experiments, tables, strict=False)):
            if len(peaks) < min_spots:
                results.append(IndexingResult(False, message=f"{len(peaks)} spots"))
            else:
                results.append(_index_one(ExperimentList([experiment]), peaks,
                                          workdir / f"frame_{i:05d}", options, env))
            bar.update(1, extra=f"indexed {sum(r.indexed for r in results)}")
    return results


def _index_one(single: Any, peaks: np.ndarray, folder: Path, options: Sequence[str],
               env: dict[str, str]) -> IndexingResult:
    """``dials.index`` one frame's peaks in ``folder``; a DIALS failure is a non-indexed frame."""
    from peaknet_xtal.formats.dials_tables import write_strong_refl

    folder.mkdir(parents=True, exist_ok=True)
    single.as_file(str(folder / "imported.expt"))
    write_strong_refl(folder / "strong.refl", [peaks], experiments=single)
    return index_strong(folder, options, env)


def index_strong(folder: Path, options: Sequence[str], env: dict[str, str] | None = None
                 ) -> IndexingResult:
    """``dials.index imported.expt strong.refl`` in ``folder`` (files any finder wrote, e.g.
    ``dials.find_spots``); a DIALS failure is a non-indexed frame, with DIALS' last words."""
    from peaknet_xtal.evaluation.dials_commands import (
        DialsCommandError,
        dials_environment,
        run_dials,
    )

    try:
        run_dials("index", "imported.expt", "strong.refl", *options, cwd=folder,
                  env=dials_environment() if env is None else env, timeout=600)
    except DialsCommandError as exc:
        return IndexingResult(False, message=str(exc).splitlines()[-1][:200])
    return _read_indexed(folder)


def _read_indexed(folder: Path) -> IndexingResult:
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.formats.dials_tables import read_reflections

    expt_path = folder / "indexed.expt"
    if not expt_path.exists():
        return IndexingResult(False, message="no indexed.expt")
    indexed = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    crystals = [e.crystal for e in indexed if e.crystal is not None]
    if not crystals:
        return IndexingResult(False, message="no crystal")
    cell = tuple(float(v) for v in crystals[0].get_unit_cell().parameters())
    table = read_reflections(folder / "indexed.refl", ["miller_index"])
    n = int(np.count_nonzero(np.any(np.asarray(table["miller_index"]) != 0, axis=1)))
    return IndexingResult(True, cell=cell, n_indexed_spots=n)


def indexamajig_available() -> bool:
    return shutil.which("indexamajig") is not None


def summarise(hits: Sequence[bool], results: Sequence[IndexingResult]) -> dict[str, Any]:
    """Paper rates plus the indexed cells (an indexed frame that is no hit is impossible here)."""
    from peaknet_xtal.evaluation.metrics import pipeline_rates

    indexed = [bool(h and r.indexed) for h, r in zip(hits, results, strict=False)]
    rates: dict[str, Any] = dict(pipeline_rates(hits, indexed))
    rates["cells"] = [list(r.cell) for h, r in zip(hits, results, strict=False)
                      if h and r.indexed and r.cell]
    return rates
