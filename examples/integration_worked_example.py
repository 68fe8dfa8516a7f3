"""Worked example: simulate, find peaks, index (DIALS), integrate (VI, summation), merge, compare.

    bin/setup-merge-env                                   # once: careless in .venv-merge
    python examples/integration_worked_example.py [--frames 200] [--jobs 2] [--out DIR]

The whole chain, from one script, with real programs at every step:

1. ``simulate_run`` writes a serial run of lysozyme stills (one 768x768 panel, fixed fluence) as a
   CXI stack + CrystFEL geometry + the exact truth;
2. ``dials.import`` reads the CXI through the project's dxtbx format, ``dials.find_spots
   algorithm=peaknet`` finds the peaks with the shipped PeakNet model, and ``dials.index``
   (stills, sequences indexer, fft1d, known symmetry P43212 and cell) indexes each frame; the
   frames are split into ``--jobs`` chunks indexed in parallel, then recombined (in Python:
   DIALS 3.12's ``dials.combine_experiments`` fails when a frame of a chunk did not index);
3. ``peaknet-integrate indexed.expt --refl indexed.refl`` integrates every indexed reflection at
   its predicted position with the variational integrator and with summation over the same box
   (``intensity.vsum.*``).  The VI writes two estimates: ``intensity.vi.*``, the posterior mean
   and variance (the best estimate of one spot on its own, shrunk towards the integrator's
   intensity prior), and ``intensity.vi_lik.*``, the likelihood alone (profile fitting with the
   learned profile, no prior).  A merger gets the latter: careless multiplies the likelihoods of
   all observations of a reflection and puts its own Wilson prior on the merged intensity, so a
   posterior mean would bring the integrator's prior in once per observation.  Both are merged
   here, to show what that costs;
4. ``dials.export format=mtz`` writes each integration as an unmerged MTZ (one row per
   observation: H, K, L in the P43212 asymmetric unit, M_ISYM, BATCH, I, SIGI, XDET, YDET), and
   the Ewald offset of each observation (``|s0 + A h| - |s0|`` from its crystal's setting matrix)
   is added as ``EWALD_OFFSET``: on stills every spot is partial by how far its lattice point lies
   off the sphere, and careless' serial-XFEL example supplies exactly this as metadata so that its
   scale model learns the partiality.  ``careless mono`` (PyPI, in the separate environment
   ``bin/setup-merge-env`` builds: its TensorFlow stack needs numpy 2) merges each MTZ on the CPU
   with the settings of that example (metadata dHKL, XDET, YDET, EWALD_OFFSET; two per-image
   layers for per-crystal scales; 10 MLP layers) plus careless' error model
   (``--refine-uncertainties``), the same seed and steps for every integration;
5. the merged intensities are compared with the simulator's exact structure intensities (its
   Wilson draw per reflection, which has the 4/mmm Laue symmetry of P43212): Pearson and Spearman
   correlation per resolution shell, and overall after dividing each set by its mean in 20 thin
   shells (the resolution fall-off is a scale the merger is free to put anywhere).  The plain mean
   of each exported MTZ per unique reflection (no scaling, no model) is reported beside careless as
   a reference.

Outputs under ``--out`` (default ``examples/integration_worked_example/``): ``merged.md`` (tables),
``merged.json`` (numbers, timings, versions), ``merged.png`` (CC per shell).  Intermediate files
(CXI, DIALS tables, MTZs, careless output) go to ``--work`` (default ``runs/worked_example``).

Measured with the defaults (``merged.md``; 200 frames, 2 CPU cores shared with other jobs): 198
crystals indexed, 25,023 reflections integrated, 3,179 unique reflections compared.  careless: CC
0.966 (VI, likelihood) vs 0.964 (summation) vs 0.966 (VI posterior mean) overall, VI ahead or level
in every shell (0.851 vs 0.845 outermost; another careless seed: 0.965 vs 0.964), all far above the
plain means (0.907 / 0.904 / 0.907).  How the setup got there, each step applied to every
integration alike: without the Ewald offset careless scored below the plain mean (0.734 VI
posterior mean vs 0.783 summation); with it, 0.957 (VI) vs 0.961 (summation), the same gap with
another careless seed (0.958 vs 0.961).  Giving careless the VI's intensities with summation's
sigmas gave 0.960: half the gap was the VI's smaller sigmas, honest per spot (z RMS ~1 against the
photons) but not what the merged observations scatter by once partiality and scale misfit are
added, which grows with the intensity; careless' error model (``--refine-uncertainties``) fits that
extra spread and lifted both (0.966 / 0.964).  What remains between VI and summation is small
because the observations are PeakNet's found spots (median 73 photons): the VI's per-observation
error is lower for the fainter ones (RMS 6.8 vs 8.9 photons at 10-50 true photons, 12.2 vs 12.8 at
50-200, 20.9 vs 20.9 above), and its profile fit reads bright spots 1-3 % low where summation is
unbiased (a larger shape error tau does not remove it, nor a border-only background).  Times: peak
finding 204 s, indexing 1,522 s, integration 13 s, export 18 s, careless ~200 s per merge (about 35
minutes in all).  ``--resume`` keeps finished steps of a previous run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.atomic import atomic_path, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SPACE_GROUP = "P43212"
CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
#: DIALS column (intensity.<key>.*) -> name.  ``vi_lik`` is what the VI hands a merger (its
#: likelihood alone); ``vi``, the posterior mean, is merged too, to show why it is not.
METHODS = {"vi_lik": "VI", "vsum": "summation", "vi": "VI posterior mean"}
#: careless settings used for every integration (same model, same steps, same seed): those of
#: careless' own serial-XFEL example (per-image layers for per-crystal scales, 10 MLP layers),
#: with the Ewald offset (partiality proxy) among the scale model's metadata, and its documented
#: error model (--refine-uncertainties: Evans' SdFac/SdB/SdAdd), because an observation's
#: integration sigma does not include the merge's own model error (partiality, scale), which
#: grows with the intensity and which careless otherwise cannot weigh in.
CARELESS_ARGS = ("--disable-progress-bar", "--disable-gpu", "--image-layers", "2",
                 "--mlp-layers", "10", "--refine-uncertainties", "--seed", "1234")
CARELESS_METADATA = "dHKL,XDET,YDET,EWALD_OFFSET"


def sim_config() -> Any:
    """The run's conditions: those of the integrator's held-out checks (fixed fluence, gain)."""
    from peaknet_xtal.integration.simdata import SPOT_RADIUS
    from peaknet_xtal.sim import SimConfig

    return SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                     read_noise=0.15, adu_per_photon=8.5, incident_photons=1e12, d_min_A=1.8)


# ---- steps 1-4: files and programs --------------------------------------------------------------

def dials(command: str, *args: str, cwd: Path) -> float:
    """Run ``dials.<command>``; return its wall time (a failure raises with DIALS' own words)."""
    from peaknet_xtal.evaluation.dials_commands import dials_environment, run_dials

    cwd.mkdir(parents=True, exist_ok=True)
    _, seconds = run_dials(command, *args, cwd=cwd, env=dials_environment())
    return seconds


def index_options() -> list[str]:
    from peaknet_xtal.evaluation.indexing import indexing_options

    return ["joint_indexing=False", *indexing_options(SPACE_GROUP, CELL)]


def split_for_indexing(folder: Path, jobs: int) -> list[Path]:
    """Cut imported.expt + strong.refl into ``jobs`` chunks of whole frames (folders chunk_N)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(folder / "imported.expt"), check_format=False)  # type: ignore[attr-defined]
    strong = flex.reflection_table.from_file(str(folder / "strong.refl"))
    bounds = np.linspace(0, len(experiments), jobs + 1).round().astype(int)
    chunks = []
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = ExperimentList([experiments[i] for i in range(lo, hi)])
        table = strong.select_on_experiment_identifiers(list(part.identifiers()))
        table.reset_ids()
        chunk = folder / f"chunk_{j}"
        chunk.mkdir(exist_ok=True)
        part.as_file(str(chunk / "imported.expt"))  # type: ignore[attr-defined]
        table.as_file(str(chunk / "strong.refl"))
        chunks.append(chunk)
    return chunks


def index_in_parallel(chunks: Sequence[Path]) -> float:
    """``dials.index`` on every chunk at once (one process per chunk, one thread each)."""
    from peaknet_xtal.evaluation.dials_commands import dials_environment, dials_program

    env = dials_environment()
    start = time.perf_counter()
    procs = [subprocess.Popen([dials_program("index", env["PATH"]), "imported.expt",
                               "strong.refl", *index_options()], cwd=chunk, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for chunk in chunks]
    for chunk, proc in zip(chunks, procs, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0 or not (chunk / "indexed.expt").exists():
            raise RuntimeError(f"dials.index failed in {chunk} (see {chunk}/dials.index.log):\n"
                               f"{err[-2000:]}")
    return time.perf_counter() - start


def combine_indexed(chunks: Sequence[Path], folder: Path) -> int:
    """The chunks' indexed experiments and reflections as one ``indexed.expt`` + ``.refl``.

    Done here rather than by ``dials.combine_experiments``: DIALS 3.12's tool fails with a
    KeyError on the imageset ids of a chunk in which a frame did not index.  Each chunk's
    indexed reflections get their experiment ids shifted by the experiments before them, with
    the identifier map rebuilt to match; returns the number of crystals.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList()
    tables = []
    for chunk in chunks:
        part = ExperimentList.from_file(str(chunk / "indexed.expt"), check_format=False)  # type: ignore[attr-defined]
        table = flex.reflection_table.from_file(str(chunk / "indexed.refl"))
        table = table.select(table["id"] >= 0)
        identifiers = table.experiment_identifiers()
        for key in list(identifiers.keys()):
            del identifiers[key]
        offset = len(experiments)
        table["id"] = table["id"] + offset
        table["imageset_id"] = table["id"]
        for i, experiment in enumerate(part):
            identifiers[i + offset] = experiment.identifier
            experiments.append(experiment)
        tables.append(table)
    combined = tables[0]
    for table in tables[1:]:
        combined.extend(table)
    experiments.as_file(str(folder / "indexed.expt"))  # type: ignore[attr-defined]
    combined.as_file(str(folder / "indexed.refl"))
    return len(experiments)


def keep_indexed(refl_in: Path, refl_out: Path) -> int:
    """The indexed reflections only: peaknet-integrate integrates predictions of crystals, and
    the unindexed spots of a DIALS table (id -1) have none."""
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(refl_in))
    table = table.select(table["id"] >= 0)
    table.as_file(str(refl_out))
    return len(table)


def ewald_offsets(experiments: Any, table: Any) -> np.ndarray:
    """Each reflection's distance from the Ewald sphere, ``|s0 + A h| - |s0|`` (1/Angstrom).

    The partiality proxy careless documents for stills (its ``ewald_offset`` metadata, computed
    the same way from a DIALS crystal's setting matrix ``A`` and the beam's ``s0``): on a still
    every spot is partial, by how far its reciprocal-lattice point lies off the sphere, and the
    merger's scale model learns the partiality from it.
    """
    ids = np.asarray(table["id"].as_numpy_array())
    hkl = np.array(table["miller_index"], dtype=np.float64).reshape(-1, 3)
    out = np.full(len(ids), np.nan)
    for eid, experiment in enumerate(experiments):
        rows = np.flatnonzero(ids == eid)
        a = np.array(experiment.crystal.get_A(), dtype=np.float64).reshape(3, 3)
        s0 = np.array(experiment.beam.get_s0(), dtype=np.float64)
        out[rows] = np.linalg.norm(hkl[rows] @ a.T + s0, axis=1) - np.linalg.norm(s0)
    return out


def export_mtz(expt: Path, integrated: Path, method: str, folder: Path) -> Path:
    """One integration's intensities as an unmerged MTZ written by ``dials.export``, plus the
    Ewald offset of every observation as the column ``EWALD_OFFSET``.

    dials.export writes the ``intensity.sum`` columns of reflections flagged integrated_sum; a
    copy of the table carries the chosen method's columns under that name (nothing else changes).
    It has no column for the Ewald offset, so that is added to its MTZ afterwards (iotbx), row by
    row: the table is first cut to the rows dials.export keeps, in its order (by experiment), and
    the MTZ's original indices and XDET/YDET are checked to match those rows one for one.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList
    from iotbx import mtz

    table = flex.reflection_table.from_file(str(integrated))
    value = np.asarray(table[f"intensity.{method}.value"].as_numpy_array())
    variance = np.asarray(table[f"intensity.{method}.variance"].as_numpy_array())
    ids = np.asarray(table["id"].as_numpy_array())
    keep = np.flatnonzero(np.isfinite(value) & np.isfinite(variance) & (variance > 0))
    keep = keep[np.argsort(ids[keep], kind="stable")]
    table = table.select(flex.size_t(keep.astype(np.uint64)))
    table["intensity.sum.value"] = table[f"intensity.{method}.value"]
    table["intensity.sum.variance"] = table[f"intensity.{method}.variance"]
    table.set_flags(flex.bool(len(table), True), table.flags.integrated_sum)
    as_sum = folder / f"{method}_as_sum.refl"
    table.as_file(str(as_sum))
    mtz_path = folder / f"{method}.mtz"
    exported = folder / f"{method}.dials_export.mtz"  # completed below, then renamed into place
    dials("export", str(expt), str(as_sum), "format=mtz", "intensity=sum",
          f"mtz.hklout={exported.name}", f"output.log=dials.export.{method}.log", cwd=folder)
    experiments = ExperimentList.from_file(str(expt), check_format=False)  # type: ignore[attr-defined]
    offsets = ewald_offsets(experiments, table)
    obj = mtz.object(str(exported))
    original = np.array(obj.extract_original_index_miller_indices(), dtype=np.int64).reshape(-1, 3)
    xdet = np.asarray(obj.get_column("XDET").extract_values().as_numpy_array())
    ours = np.array(table["miller_index"], dtype=np.int64).reshape(-1, 3)
    ours_x = np.asarray(table["xyzobs.px.value"].parts()[0].as_numpy_array())
    if len(original) != len(ours) or not ((original == ours).all()
                                          and np.allclose(xdet, ours_x, atol=1e-3)):
        raise RuntimeError(f"{exported}: dials.export wrote {len(original)} rows that do not "
                           f"match the {len(ours)} exported reflections one for one; the Ewald "
                           "offsets cannot be attached")
    dataset = obj.crystals()[-1].datasets()[-1]
    dataset.add_column("EWALD_OFFSET", "R").set_values(flex.double(offsets).as_float())
    with atomic_path(mtz_path) as tmp:
        obj.write(str(tmp))
    exported.unlink()
    return mtz_path


def read_mtz_columns(path: Path, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Miller indices and the named columns of an MTZ (iotbx), as numpy arrays."""
    from iotbx import mtz

    obj = mtz.object(str(path))
    hkl = np.array(obj.extract_miller_indices(), dtype=np.int64).reshape(-1, 3)
    out = {"hkl": hkl}
    for label in labels:
        column = obj.get_column(label)
        out[label] = np.asarray(column.extract_values().as_numpy_array(), dtype=np.float64)
    return out


def merge_env_python(env_dir: Path) -> Path | None:
    careless = env_dir / "bin" / "careless"
    return careless if careless.exists() else None


def run_careless(careless: Path, mtz: Path, out_base: Path, iterations: int) -> float:
    """``careless mono`` on one unmerged MTZ, on the CPU; returns wall seconds."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    command = [str(careless), "mono", *CARELESS_ARGS, "--iterations", str(iterations),
               "--spacegroups", SPACE_GROUP, "--intensity-key", "I", "--uncertainty-key",
               "SIGI", CARELESS_METADATA, str(mtz), str(out_base)]
    start = time.perf_counter()
    with open(out_base.parent / f"{out_base.name}.log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"careless exited {proc.returncode}: see "
                           f"{out_base.parent / (out_base.name + '.log')}")
    return time.perf_counter() - start


# ---- step 5: comparison with the truth ----------------------------------------------------------

def structure_truth(hkl: np.ndarray) -> np.ndarray:
    """The simulator's exact structure intensity (Wilson draw, mean 1) of each reflection."""
    from peaknet_xtal.sim import PRESET_CELLS
    from peaknet_xtal.sim.simulate import _structure_intensity

    cell = PRESET_CELLS["lysozyme"]
    key = hash(tuple(round(v, 1) for v in cell.parameters))  # as the simulator keys its structure
    return _structure_intensity(hkl, key, cell.lattice)


def one_over_d(hkl: np.ndarray) -> np.ndarray:
    a, _, c = CELL[:3]
    return np.sqrt((hkl[:, 0] ** 2 + hkl[:, 1] ** 2) / a ** 2 + hkl[:, 2] ** 2 / c ** 2)


def plain_mean(hkl: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (asymmetric-unit) indices, mean value and multiplicity: no scaling at all."""
    uniq, inverse, counts = np.unique(hkl, axis=0, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.ravel(), weights=values, minlength=len(uniq))
    return uniq, sums / counts, counts


def shell_normalised(values: np.ndarray, q: np.ndarray, n_shells: int = 20) -> np.ndarray:
    """Each value over the mean of its thin resolution shell (equal counts): E^2-like."""
    edges = np.quantile(q, np.linspace(0, 1, n_shells + 1))
    shell = np.clip(np.searchsorted(edges, q, side="right") - 1, 0, n_shells - 1)
    means = np.array([values[shell == s].mean() for s in range(n_shells)])
    return values / means[shell]


def correlations(estimate: np.ndarray, truth: np.ndarray, q: np.ndarray,
                 edges: np.ndarray) -> dict[str, Any]:
    from scipy.stats import pearsonr, spearmanr

    norm_est, norm_true = shell_normalised(estimate, q), shell_normalised(truth, q)
    result: dict[str, Any] = {
        "n": int(len(truth)),
        "pearson": float(pearsonr(norm_est, norm_true).statistic),
        "spearman": float(spearmanr(estimate, truth).statistic), "shells": []}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (q >= lo) & (q <= hi)
        result["shells"].append({
            "d_max": float(1 / lo), "d_min": float(1 / hi), "n": int(sel.sum()),
            "pearson": float(pearsonr(estimate[sel], truth[sel]).statistic),
            "spearman": float(spearmanr(estimate[sel], truth[sel]).statistic)})
    return result


def index_agreement(folder: Path, truth_path: Path) -> dict[str, Any]:
    """How each indexed observation's asymmetric-unit index compares with the simulator's.

    Each integrated reflection is matched to the nearest true reflection of its frame (within 1.5
    pixels of its predicted position); the fraction whose P43212 asymmetric-unit indices agree
    says whether DIALS' settings differ from the truth only by symmetry the structure has.
    """
    from cctbx import crystal, miller
    from cctbx.array_family import flex as cflex
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList
    from scipy.spatial import cKDTree

    from peaknet_xtal.sim.output import read_truth

    truth = read_truth(truth_path)["reflections"]
    experiments = ExperimentList.from_file(str(folder / "indexed.expt"), check_format=False)  # type: ignore[attr-defined]
    table = flex.reflection_table.from_file(str(folder / "integrated" / "indexed_only_vi.refl"))
    ids = np.asarray(table["id"].as_numpy_array())
    xyz = np.asarray(table["xyzcal.px"].as_numpy_array())[:, :2] - 0.5  # corner -> centre
    hkl = np.array(table["miller_index"], dtype=np.int64).reshape(-1, 3)
    frames = np.array([e.imageset.indices()[0] for e in experiments])
    ours, true_hkl = [], []
    for eid, frame in enumerate(frames):
        rows = np.flatnonzero(ids == eid)
        cand = truth[truth["frame"] == frame]
        if rows.size == 0 or len(cand) == 0:
            continue
        dist, near = cKDTree(np.column_stack([cand["fs"], cand["ss"]])).query(xyz[rows])
        ok = dist < 1.5
        ours.append(hkl[rows[ok]])
        true_hkl.append(np.column_stack([cand["h"], cand["k"], cand["l"]])[near[ok]])
    symmetry = crystal.symmetry(unit_cell=CELL, space_group_symbol=SPACE_GROUP)

    def asu(indices: np.ndarray) -> np.ndarray:
        ms = miller.set(symmetry, cflex.miller_index([tuple(map(int, r)) for r in indices]),
                        anomalous_flag=False).map_to_asu()
        return np.array(ms.indices(), dtype=np.int64).reshape(-1, 3)

    a, b = np.concatenate(ours), np.concatenate(true_hkl)
    same = (asu(a) == asu(b)).all(axis=1)
    return {"matched": int(len(a)), "of": int(len(hkl)), "same_asu_index": float(same.mean())}


# ---- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11000)
    parser.add_argument("--jobs", type=int, default=2, help="parallel dials.index processes")
    parser.add_argument("--iterations", type=int, default=5000, help="careless steps")
    parser.add_argument("--merge-env", default=str(ROOT / ".venv-merge"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "worked_example"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent /
                                             "integration_worked_example"))
    parser.add_argument("--resume", action="store_true", help="keep the simulated run, spots and "
                        "indexing results already in --work (and their recorded times)")
    args = parser.parse_args(argv)
    from peaknet_xtal.integration.simdata import default_geometry
    from peaknet_xtal.sim.run import simulate_run

    work, out = Path(args.work), Path(args.out)
    timings_file = work / "timings.json"
    timings: dict[str, float] = {}
    if args.resume and timings_file.exists():
        timings = json.loads(timings_file.read_text())
    else:
        for sub in ("run", "dials", "careless"):  # this script's own folders, from a past run
            if (work / sub).exists():
                shutil.rmtree(work / sub)

    def step(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[worked example] {name}: {timings[name]:.1f} s", flush=True)
        write_json_atomic(timings_file, timings)

    def done(name: str, *files: Path) -> bool:
        """With --resume, a step whose outputs and time are already there is not run again."""
        if args.resume and name in timings and all(f.exists() for f in files):
            print(f"[worked example] {name}: kept from the previous run", flush=True)
            return True
        return False

    from peaknet_xtal.sim.run import RunPaths

    run_dir = work / "run"
    paths = RunPaths(run_dir / "sim.cxi", run_dir / "sim.geom", run_dir / "sim_truth.h5", None)
    if not done("simulate", paths.cxi, paths.truth):
        t = time.perf_counter()
        paths = simulate_run(default_geometry(), args.frames, args.seed, run_dir, sim_config(),
                             stream=False)
        step("simulate", t)
    folder = work / "dials"
    find = "find peaks (dials.find_spots algorithm=peaknet)"
    if not done(find, folder / "strong.refl"):
        t = time.perf_counter()
        dials("import", str(paths.cxi.resolve()), cwd=folder)
        dials("find_spots", "imported.expt", "algorithm=peaknet",
              "spotfinder.threshold.peaknet.threads=1", f"spotfinder.mp.nproc={args.jobs}",
              cwd=folder)
        step(find, t)
    index = "index (dials.index, stills)"
    chunks = sorted(folder.glob("chunk_*"))
    if not (chunks and done(index, *(c / "indexed.refl" for c in chunks))):
        t = time.perf_counter()
        chunks = split_for_indexing(folder, args.jobs)
        index_in_parallel(chunks)
        step(index, t)
    combine_indexed(chunks, folder)
    n_indexed = keep_indexed(folder / "indexed.refl", folder / "indexed_only.refl")
    integrated = folder / "integrated" / "indexed_only_vi.refl"
    integrate = "integrate (peaknet-integrate, VI + summation)"
    if not done(integrate, integrated):
        integrated.unlink(missing_ok=True)  # peaknet-integrate would keep a finished output
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peaknet_xtal.cli.integrate", "indexed.expt",
                        "--refl", "indexed_only.refl", "-o", "integrated", "--no-progress"],
                       cwd=folder, check=True, stdout=subprocess.DEVNULL)
        step(integrate, t)
    t = time.perf_counter()
    mtzs = {m: export_mtz(folder / "indexed.expt", integrated, m, folder) for m in METHODS}
    step("export (dials.export, unmerged MTZ)", t)
    from dxtbx.model.experiment_list import ExperimentList

    n_crystals = len(ExperimentList.from_file(str(folder / "indexed.expt"), check_format=False))  # type: ignore[attr-defined]
    agreement = index_agreement(folder, paths.truth)

    careless = merge_env_python(Path(args.merge_env))
    merged: dict[str, dict[str, np.ndarray]] = {}
    merge_note = ""
    if careless is not None:
        settings = [*CARELESS_ARGS, "--iterations", str(args.iterations), CARELESS_METADATA]
        for method, mtz in mtzs.items():
            name = f"careless mono ({METHODS[method]})"
            record = work / "careless" / f"{method}.json"
            same = record.exists() and json.loads(record.read_text()) == settings
            if not (same and done(name, work / "careless" / f"{method}_0.mtz")):
                t = time.perf_counter()
                run_careless(careless, mtz, work / "careless" / method, args.iterations)
                step(name, t)
                write_json_atomic(record, settings)
            # careless writes the posterior mean of F and of I = F^2 per unique reflection
            result = read_mtz_columns(work / "careless" / f"{method}_0.mtz", ["I"])
            merged[f"careless {METHODS[method]}"] = {"hkl": result["hkl"], "I": result["I"]}
    else:
        merge_note = (f"careless NOT run: no merge environment at {args.merge_env} "
                      "(bin/setup-merge-env builds it); plain means only.")
        print(f"[worked example] {merge_note}", flush=True)
    for method, mtz in mtzs.items():
        obs = read_mtz_columns(mtz, ["I"])
        uniq, mean, _ = plain_mean(obs["hkl"], obs["I"])
        merged[f"plain mean {METHODS[method]}"] = {"hkl": uniq, "I": mean}

    # Shells on the reflections every merge has, so each row compares like with like.
    common = None
    for data in merged.values():
        keys = {tuple(r) for r in data["hkl"].tolist()}
        common = keys if common is None else common & keys
    assert common is not None
    common_hkl = np.array(sorted(common), dtype=np.int64)
    q = one_over_d(common_hkl)
    truth = structure_truth(common_hkl)
    edges = np.quantile(q, np.linspace(0, 1, 6))
    report: dict[str, Any] = {
        "frames": args.frames, "crystals_indexed": n_crystals, "observations": n_indexed,
        "unique_compared": int(len(common_hkl)), "index_agreement": agreement,
        "timings_s": timings, "careless": {"args": [*CARELESS_ARGS, "--iterations",
                                                    str(args.iterations), CARELESS_METADATA],
                                           "note": merge_note},
        "merges": {}}
    for name, data in merged.items():
        lookup = {tuple(r): v for r, v in zip(data["hkl"].tolist(), data["I"], strict=True)}
        estimate = np.array([lookup[tuple(r)] for r in common_hkl.tolist()])
        report["merges"][name] = correlations(estimate, truth, q, edges)
    text = render(report)
    write_text_atomic(out / "merged.md", text)
    write_json_atomic(out / "merged.json", report)
    plot(report, out / "merged.png")
    print(text)
    return 0


def render(report: dict[str, Any]) -> str:
    names = list(report["merges"])
    agreement = report["index_agreement"]
    lines = [
        f"{report['frames']} simulated lysozyme stills; {report['crystals_indexed']} indexed by "
        f"dials.index from PeakNet's peaks; {report['observations']} indexed reflections "
        f"integrated; {report['unique_compared']} unique reflections (P43212) in every merge.",
        f"Indexing vs truth: {agreement['same_asu_index']:.1%} of {agreement['matched']} "
        "observations matched to a true reflection have its asymmetric-unit index.", "",
        "Pearson CC with the true structure intensities per resolution shell "
        "(Spearman in brackets):", "",
        "| resolution (A) | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names)]
    first = report["merges"][names[0]]
    for i, shell in enumerate(first["shells"]):
        cells = [f"{report['merges'][n]['shells'][i]['pearson']:.3f} "
                 f"({report['merges'][n]['shells'][i]['spearman']:.3f})" for n in names]
        lines.append(f"| {shell['d_max']:.2f}-{shell['d_min']:.2f} | {shell['n']} | "
                     + " | ".join(cells) + " |")
    cells = [f"{report['merges'][n]['pearson']:.3f} ({report['merges'][n]['spearman']:.3f})"
             for n in names]
    lines.append(f"| all (shell-normalised) | {first['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Wall times (s, 2 shared CPU cores): " + ", ".join(
        f"{k} {v:.0f}" for k, v in report["timings_s"].items()) + "."]
    if report["careless"]["note"]:
        lines += ["", report["careless"]["note"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels: list[str] = []
    for name, result in report["merges"].items():
        labels = [f"{s['d_max']:.1f}-{s['d_min']:.2f}" for s in result["shells"]]
        style = "o-" if name.startswith("careless") else "s--"
        ax.plot(range(len(labels)), [s["pearson"] for s in result["shells"]], style, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("resolution shell (A), equal counts")
    ax.set_ylabel("CC of merged I with the true structure")
    ax.set_title(f"{report['frames']} stills, DIALS-indexed, {report['observations']} obs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
