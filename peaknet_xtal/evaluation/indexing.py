"""Hit rate, indexing rate and indexing yield through DIALS stills indexing.

The paper judges a finder by what indexing makes of its peaks.  Each frame's peaks are written as a
DIALS strong-spot table and indexed on their own with ``dials.index`` (the real program, run as a
subprocess, so nothing about DIALS is imitated), using the same indexing settings for every finder;
when ``indexamajig`` is on PATH it can be used the same way from the CXI peak tables.

The known symmetry is what the rates hinge on: a frame indexed with a cell that is not its
crystal's fails whatever the finder did.  Simulated runs therefore index each frame with its own
crystal's cell and lattice (:func:`truth_symmetry`), and symmetry a user types is checked with
cctbx before any work (:func:`check_symmetry`), since DIALS would refuse it on every frame, one
subprocess at a time.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.errors import require_dials

log = logging.getLogger(__name__)


@dataclass
class IndexingResult:
    """What DIALS made of one frame's peaks."""

    indexed: bool
    cell: tuple[float, ...] | None = None  # a, b, c (A), alpha, beta, gamma (deg)
    n_indexed_spots: int = 0
    message: str = ""


#: The lowest-symmetry space group of each lattice (lattice system, centring) the simulator makes.
#: Its intensities carry no symmetry beyond the lattice's, and the lattice is all ``dials.index``
#: needs from a known space group to pick the right cell.
LATTICE_SPACE_GROUPS: dict[tuple[str, str], str] = {
    ("triclinic", "P"): "P1",
    ("monoclinic", "P"): "P2", ("monoclinic", "C"): "C2",
    ("orthorhombic", "P"): "P222", ("orthorhombic", "C"): "C222",
    ("orthorhombic", "I"): "I222", ("orthorhombic", "F"): "F222",
    ("tetragonal", "P"): "P4", ("tetragonal", "I"): "I4",
    ("hexagonal", "P"): "P3", ("hexagonal", "H"): "R3:H",
    ("rhombohedral", "R"): "R3:R",
    ("cubic", "P"): "P23", ("cubic", "I"): "I23", ("cubic", "F"): "F23",
}


@dataclass(frozen=True)
class KnownSymmetry:
    """What indexing may assume about one frame's crystal (``None``: not known)."""

    space_group: str | None = None
    unit_cell: tuple[float, ...] | None = None

    def options(self) -> list[str]:
        """The ``indexing.known_symmetry`` settings of ``dials.index`` for this frame."""
        options = []
        if self.space_group:
            options.append(f"indexing.known_symmetry.space_group={self.space_group}")
        if self.unit_cell is not None:
            options.append("indexing.known_symmetry.unit_cell="
                           + ",".join(f"{v:g}" for v in self.unit_cell))
        return options


def truth_symmetry(crystals: np.ndarray, n_frames: int) -> list[KnownSymmetry]:
    """Per frame, the symmetry of its first crystal in the simulator's truth (``crystals`` as
    ``peaknet-sim`` writes it); blanks know nothing.  A run with ``cell: null`` has a different
    crystal on every frame, so one cell for the whole run would be wrong for most frames."""
    known = [KnownSymmetry() for _ in range(n_frames)]
    for row in crystals[crystals["crystal"] == 0]:  # a frame's further crystals: one is enough
        frame = int(row["frame"])
        if 0 <= frame < n_frames:
            lattice = (_text(row["lattice"]), _text(row["centring"]))
            known[frame] = KnownSymmetry(LATTICE_SPACE_GROUPS.get(lattice),
                                         tuple(float(v) for v in row["cell"]))
    return known


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_unit_cell(value: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``--unit-cell a,b,c,alpha,beta,gamma`` (commas or spaces; a list from a config file) as
    six numbers, checked by cctbx; raises ValueError saying what is wrong."""
    if value is None:
        return None
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    text = ",".join(str(v) for v in parts)
    try:
        cell = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        cell = ()
    if len(cell) != 6:
        raise ValueError(f"--unit-cell {text}: give 6 numbers, a,b,c,alpha,beta,gamma "
                         "(Angstrom, degrees)")
    require_dials(f"--unit-cell {text} (checked by cctbx)", "cctbx.uctbx")
    from cctbx import uctbx

    try:
        uctbx.unit_cell(cell)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"--unit-cell {text}: {exc}") from None
    return cell


def check_symmetry(space_group: str | None, unit_cell: Sequence[float] | None) -> None:
    """Raise ValueError (one line) unless cctbx knows ``space_group`` and ``unit_cell`` fits it:
    ``dials.index`` would otherwise die on every frame and the report show 0 indexed.
    Neither given, nothing is checked (and cctbx, DIALS', is not needed)."""
    if space_group is None and unit_cell is None:
        return
    given = f"--space-group {space_group}" if space_group is not None else "--unit-cell"
    require_dials(f"{given} (checked by cctbx)", "cctbx.sgtbx", "cctbx.uctbx")
    from cctbx import sgtbx, uctbx

    info = None
    if space_group is not None:
        try:
            info = sgtbx.space_group_info(space_group)
        except RuntimeError as exc:
            reason = str(exc).removeprefix("cctbx Error: ")
            raise ValueError(f"--space-group {space_group}: {reason}") from None
    if unit_cell is None:
        return
    cell = uctbx.unit_cell(tuple(unit_cell))
    if info is not None and not info.group().is_compatible_unit_cell(cell):
        raise ValueError(f"--unit-cell {','.join(f'{v:g}' for v in unit_cell)} does not fit "
                         f"space group {space_group} ({info})")


def indexing_options(space_group: str | None = None,
                     unit_cell: Sequence[float] | None = None) -> list[str]:
    """``dials.index`` settings shared by every finder (known symmetry when given)."""
    known = KnownSymmetry(space_group, None if unit_cell is None else tuple(unit_cell))
    return ["stills.indexer=sequences", "indexing.method=fft1d", *known.options()]


def import_images(images: Sequence[str | os.PathLike[str]], workdir: Path) -> Path:
    """``dials.import`` the images once; every finder is indexed against the same models."""
    from peaknet_xtal.evaluation.dials_commands import dials_environment, run_dials

    workdir.mkdir(parents=True, exist_ok=True)
    run_dials("import", *[str(Path(p).resolve()) for p in images],
              "output.experiments=imported.expt", cwd=workdir, env=dials_environment())
    return workdir / "imported.expt"


def index_frames(imported: Path, tables: Sequence[np.ndarray], workdir: Path,
                 options: Sequence[str], min_spots: int = 10, first: int = 0,
                 known: Sequence[Sequence[str]] | None = None,
                 progress: bool = True) -> list[IndexingResult]:
    """Index each frame's peak table on its own; frames with fewer than ``min_spots`` are skipped
    (DIALS cannot index them, and a non-hit is never indexed).

    ``tables`` belong to the images from number ``first`` on (the frames before it, used to tune
    finders, are not scored and so not indexed); ``known`` adds each table's own options to the
    shared ``options`` (its crystal's cell).  The progress bar counts the frames handed to DIALS,
    which is where the time goes (``progress`` False: no line)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.evaluation.dials_commands import dials_environment
    from peaknet_xtal.progress import Progress

    experiments = ExperimentListFactory.from_json_file(str(imported), check_format=False)
    if len(experiments) != first + len(tables):
        raise ValueError(f"{imported}: {len(experiments)} images but {first} + {len(tables)} "
                         "peak tables")
    if known is not None and len(known) != len(tables):
        raise ValueError(f"{len(known)} known symmetries for {len(tables)} peak tables")
    env = dials_environment()
    results = []
    tried = sum(len(peaks) >= min_spots for peaks in tables)
    with Progress(tried, "frames", desc=f"dials.index {workdir.name}",
                  enabled=progress) as bar:
        for i, peaks in enumerate(tables, start=first):
            if len(peaks) < min_spots:
                results.append(IndexingResult(False, message=f"{len(peaks)} spots"))
                continue
            extra = [] if known is None else list(known[i - first])
            results.append(_index_one(experiments[i], peaks, workdir / f"frame_{i:05d}",
                                      [*options, *extra], env))
            bar.update(1, extra=f"indexed {sum(r.indexed for r in results)}")
    return results


def _index_one(experiment: Any, peaks: np.ndarray, folder: Path, options: Sequence[str],
               env: dict[str, str]) -> IndexingResult:
    """``dials.index`` one frame's peaks in ``folder``; a DIALS failure is a non-indexed frame."""
    from dxtbx.model.experiment_list import ExperimentList

    from peaknet_xtal.formats.dials_tables import write_strong_refl

    single: Any = ExperimentList([experiment])  # dxtbx's stubs lack as_file
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
        dials_reason,
        run_dials,
    )

    try:
        run_dials("index", "imported.expt", "strong.refl", *options, cwd=folder,
                  env=dials_environment() if env is None else env, timeout=600)
    except DialsCommandError as exc:
        return IndexingResult(False, message=dials_reason(str(exc), exc.stderr))
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
    """Paper rates plus the indexed cells (an indexed frame that is no hit is impossible here),
    and why the other hits were not indexed (``failures``: DIALS' last words -> frames), so a
    run that DIALS refused outright does not pass for a finder whose peaks index badly."""
    from peaknet_xtal.evaluation.metrics import pipeline_rates

    indexed = [bool(h and r.indexed) for h, r in zip(hits, results, strict=False)]
    rates: dict[str, Any] = dict(pipeline_rates(hits, indexed))
    rates["cells"] = [list(r.cell) for h, r in zip(hits, results, strict=False)
                      if h and r.indexed and r.cell]
    reasons = Counter(r.message or "no reason given" for h, r in zip(hits, results, strict=False)
                      if h and not r.indexed)
    rates["failures"] = dict(reasons.most_common())
    return rates


def failure_text(failures: Mapping[str, int]) -> str:
    """``summarise``'s ``failures`` as one line, ``N x reason`` each (empty: none), as the log
    and the command's output say them."""
    return "; ".join(f"{n} x {reason}" for reason, n in failures.items())
