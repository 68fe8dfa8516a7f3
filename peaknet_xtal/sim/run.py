"""A simulated run: N frames on one geometry written as CXI stack + .geom + truth (+ stream).

Frame ``i`` uses seed ``seed + i``, so any frame of a run can be regenerated alone.  With
``randomise`` every frame gets :meth:`SimConfig.randomised` conditions (seeded by its frame seed),
except the beam and detector settings that the single ``.geom`` of the stack must describe.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.progress import Progress
from peaknet_xtal.sim.config import SimConfig
from peaknet_xtal.sim.output import CXIStackWriter, TruthWriter, run_geometry, write_run_geometry
from peaknet_xtal.sim.simulate import detector_model, resolve_beam, simulate_frame

#: Settings that must stay the same over a stack (one .geom describes all of its frames).
RUN_CONSTANT = ("wavelength_A", "default_clen_m", "adu_per_photon", "defect_seed",
                "dead_fraction", "hot_fraction")


@dataclass
class RunPaths:
    cxi: Path
    geom: Path
    truth: Path
    stream: Path | None


def frame_config(base: SimConfig, seed: int, randomise: bool) -> SimConfig:
    """The settings of one frame: ``base``, or randomised conditions keeping the run constants."""
    if not randomise:
        return base
    fixed = {name: getattr(base, name) for name in RUN_CONSTANT}
    if base.cell is not None:
        fixed["cell"] = base.cell
    return SimConfig.randomised(np.random.default_rng([int(seed), 0xC0F]), **fixed)


def simulate_run(geometry: Any, n_frames: int, seed: int, out_dir: str | os.PathLike[str],
                 config: SimConfig | None = None, *, name: str = "sim", randomise: bool = False,
                 stream: bool = True, progress: bool = True,
                 record: Callable[[Path], None] | None = None) -> RunPaths:
    """Simulate ``n_frames`` (>= 1) frames and write the run's files under ``out_dir``.

    The files are written into a hidden staging folder inside ``out_dir`` and moved to their
    names only once every one of them is complete, so that a failed or interrupted run leaves an
    earlier run of the same ``name`` as it was (and nothing of its own).  A run that succeeds
    replaces the earlier one's files, and removes its ``NAME.stream`` when this run writes none,
    so that the folder never mixes two runs.  ``record``, if given, is called with the staging
    folder once the run's files are written: what it writes there (the command's configuration
    record) is published with them, after them, and its earlier version removed before them.
    """
    if int(n_frames) < 1:
        raise ValueError(f"n_frames must be >= 1 (got {n_frames}): a run needs a frame")
    base = config or SimConfig()
    wavelength, gain = resolve_beam(geometry, base)
    base = _fix_beam(base, wavelength, gain)
    det = detector_model(geometry, base.default_clen_m)
    geom = run_geometry(geometry, wavelength, det.clen_m, gain)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    final = run_paths(out, name, stream)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out))
    try:
        staged = run_paths(staging, name, stream)
        _write_run(geometry, geom, n_frames, seed, base, staged, str(final.cxi), randomise,
                   progress, wavelength, det.clen_m, gain)
        if record is not None:
            record(staging)
        _publish(staging, out, staged, run_paths(out, name, True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed run into a new folder leaves no folder either
    return final


def run_paths(out: Path, name: str, stream: bool = True) -> RunPaths:
    """Where the files of run ``name`` go in ``out`` (no stream without ``stream``)."""
    return RunPaths(out / f"{name}.cxi", out / f"{name}.geom", out / f"{name}_truth.h5",
                    out / f"{name}.stream" if stream else None)


def _write_run(geometry: Any, geom: Any, n_frames: int, seed: int, base: SimConfig,
               paths: RunPaths, source: str, randomise: bool, progress: bool,
               wavelength: float, clen_m: float, gain: float) -> None:
    write_run_geometry(paths.geom, geom)
    first_frame, first_truth = simulate_frame(geometry, seed, frame_config(base, seed, randomise))
    cxi = CXIStackWriter(paths.cxi, geom, first_frame.masks_or_ones(), wavelength, clen_m, gain)
    truth_out = TruthWriter(paths.truth, geom)
    chunks = []
    try:
        with Progress(n_frames, "frames", desc="peaknet-sim", enabled=progress) as bar:
            for i in range(n_frames):
                frame_seed = seed + i
                if i == 0:
                    frame, truth = first_frame, first_truth
                else:
                    frame, truth = simulate_frame(geometry, frame_seed,
                                                  frame_config(base, frame_seed, randomise))
                frame.source, frame.serial, frame.event = source, i, f"//{i}"
                cxi.append(frame, truth)
                truth_out.append(truth)
                if paths.stream is not None:
                    chunks.append(stream_chunk(paths.cxi.name, i, truth, geom))
                bar.update(1, extra=f"hit {truth.hit} "
                                    f"strong {int(truth.reflections['strong'].sum())}")
    except BaseException:
        cxi.abort()
        truth_out.abort()
        raise
    cxi.close()
    truth_out.close()
    if paths.stream is not None:
        write_truth_stream(paths.stream, geom, chunks)


def _publish(staging: Path, out: Path, staged: RunPaths, every: RunPaths) -> None:
    """Move a finished run from ``staging`` into ``out``: the records first removed, then the run's
    files (an earlier stream this run does not replace removed), then the records put in place,
    so that a record in ``out`` never describes files it did not make."""
    data = {p.name for p in vars(staged).values() if p is not None}
    records = sorted(p.name for p in staging.iterdir() if p.name not in data)
    for name in records:
        (out / name).unlink(missing_ok=True)
    for name in sorted(data):
        os.replace(staging / name, out / name)
    for path in vars(every).values():
        if path is not None and path.name not in data:
            path.unlink(missing_ok=True)
    for name in records:
        os.replace(staging / name, out / name)


def _fix_beam(config: SimConfig, wavelength: float, gain: float) -> SimConfig:
    from dataclasses import replace
    return replace(config, wavelength_A=wavelength, adu_per_photon=gain)


def stream_chunk(filename: str, index: int, truth: Any, geometry: Any) -> Any:
    """The CrystFEL chunk of one frame, as indexamajig would write it had it found the truth.

    Peaks: the strong reflections; crystals: the true A matrices (nm^-1) and cells, each with all
    its reflections on the detector (I and sigma(I) in ADU from the expected photons and SNR).
    """
    from peaknet_xtal.formats.stream import REFLECTION_DTYPE as STREAM_REFL_DTYPE
    from peaknet_xtal.formats.stream import Crystal, chunk_from_peak_table
    from peaknet_xtal.types import peaks_from_columns

    geometry = geometry.as_slab()  # run_geometry's already: the layout of the run's .geom
    strong = truth.strong
    gain = truth.adu_per_photon
    peaks = peaks_from_columns(panel=strong["panel"], fs=strong["fs"], ss=strong["ss"],
                               intensity=strong["photons"] * gain,
                               one_over_d=strong["one_over_d"])
    distance = float(np.mean(geometry.panel_planes()[0][:, 2]))  # mean panel z (m)
    chunk = chunk_from_peak_table(peaks, geometry, filename=filename, event=f"//{index}",
                                  serial=index + 1, hit=truth.hit, camera_length_m=distance)
    chunk.extra["beam_divergence"] = "0.00e+00 rad"
    chunk.extra["beam_bandwidth"] = f"{truth.bandwidth:.2e} (fraction)"
    names = np.array([p.name for p in geometry.panels], dtype="U64")
    for number, crystal in enumerate(truth.crystals):
        refl = truth.reflections[truth.reflections["crystal"] == number]
        fs, ss = geometry.panel_to_raw(refl["panel"], refl["fs"], refl["ss"])
        table = np.zeros(len(refl), STREAM_REFL_DTYPE)
        for name in ("h", "k", "l"):
            table[name] = refl[name]
        table["I"] = refl["photons"] * gain
        table["sigma"] = refl["photons"] / np.maximum(refl["snr"], 1e-9) * gain
        table["peak"] = refl["max_photons"] * gain
        table["fs"], table["ss"] = np.asarray(fs) + 0.5, np.asarray(ss) + 0.5
        table["panel"] = names[refl["panel"]] if len(refl) else names[:0]
        cell = crystal.cell
        q_max = float(refl["one_over_d"].max()) if len(refl) else 0.0
        chunk.crystals.append(Crystal(
            a=cell.a, b=cell.b, c=cell.c, alpha=cell.alpha, beta=cell.beta, gamma=cell.gamma,
            astar=crystal.A[:, 0] * 10, bstar=crystal.A[:, 1] * 10, cstar=crystal.A[:, 2] * 10,
            lattice_type=cell.lattice, centering=cell.centring, unique_axis=cell.unique_axis,
            profile_radius_nm=float(truth.meta.get("profile_radius", 0.0)) * 10,
            det_shift_mm=(0.0, 0.0), resolution_limit_nm=q_max * 10,
            num_reflections=len(refl), num_saturated_reflections=0,
            num_implausible_reflections=0, reflections=table))
    if truth.crystals:
        chunk.indexed_by = "simulation"
        chunk.extra["n_indexing_tries"] = "1"
    return chunk


def write_truth_stream(path: Path, geometry: Any, chunks: list[Any]) -> None:
    from peaknet_xtal.formats.stream import write_stream

    write_stream(path, chunks, geometry_text=geometry.as_slab().to_text())
