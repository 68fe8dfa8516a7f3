"""Plain helpers behind the shared test fixtures: small stacked-panel CrystFEL geometries and a
small simulated run (CXI stack, geometry, truth) with a stream of its true predictions.

Loaded by path from tests/conftest.py (fixtures ``make_geometry_text`` and ``sim_run``) and by
benchmarks/bench_pvoigt_fit.py; tests use the fixtures, never this module directly.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def geometry_text(names: Sequence[str], width: int, height: int,
                  corners: Sequence[tuple[float, float]], *, flipped: Collection[str] = (),
                  photon_energy: str = "9000 eV", clen: str = "0.1 m", res: str = "10000",
                  adu_per_photon: str | None = None, data: str | None = "/entry_1/data_1/data",
                  dims: bool = True, extra: str = "") -> str:
    """A CrystFEL geometry of ``width`` x ``height`` panels stacked down one slab (panel i holds
    slab rows ``i*height`` ..), each at its ``(corner_x, corner_y)``; a ``flipped`` panel has its
    fs and ss axes reversed.  ``data`` and ``dims`` give the CXI stack layout; ``extra`` (bad
    regions, more keys) is appended as written."""
    lines = [f"photon_energy = {photon_energy}", f"clen = {clen}", f"res = {res}"]
    if adu_per_photon is not None:
        lines.append(f"adu_per_photon = {adu_per_photon}")
    if data is not None:
        lines.append(f"data = {data}")
    if dims:
        lines += ["dim0 = %", "dim1 = ss", "dim2 = fs"]
    for i, (name, (corner_x, corner_y)) in enumerate(zip(names, corners, strict=True)):
        sign = "-" if name in flipped else "+"
        lines += [f"{name}/min_fs = 0", f"{name}/max_fs = {width - 1}",
                  f"{name}/min_ss = {i * height}", f"{name}/max_ss = {(i + 1) * height - 1}",
                  f"{name}/fs = {sign}1.0x +0.0y", f"{name}/ss = +0.0x {sign}1.0y",
                  f"{name}/corner_x = {corner_x}", f"{name}/corner_y = {corner_y}"]
    return "\n".join(lines) + "\n" + extra


@dataclass
class SimRun:
    """A small simulated run: CXI stack, geometry, truth file and a stream of its true peaks."""
    dir: Path
    cxi: Path
    geom: Path
    truth: Path
    stream: Path
    n_frames: int


def truth_stream(path: Path, cxi_name: str, geometry, truth: dict[str, np.ndarray],
                 n_frames: int) -> None:
    """A CrystFEL stream whose found peaks are the true strong spots and whose crystal
    reflections are every true reflection (I = expected photons, sigma(I) = I / SNR)."""
    from peaknet_xtal.formats import stream as stream_io

    refl = truth["reflections"]
    min_fs = np.array([p.min_fs for p in geometry.panels], dtype=float)
    min_ss = np.array([p.min_ss for p in geometry.panels], dtype=float)
    names = np.array([p.name for p in geometry.panels])
    chunks = []
    for i in range(n_frames):
        rows = refl[refl["frame"] == i]
        strong = rows[rows["strong"]]
        peaks = np.zeros(len(strong), dtype=stream_io.STREAM_PEAK_DTYPE)
        peaks["fs"] = strong["fs"] + 0.5 + min_fs[strong["panel"]]
        peaks["ss"] = strong["ss"] + 0.5 + min_ss[strong["panel"]]
        peaks["one_over_d_nm"] = strong["one_over_d"] * 10
        peaks["intensity"] = strong["photons"]
        peaks["panel"] = names[strong["panel"]]
        table = np.zeros(len(rows), dtype=stream_io.REFLECTION_DTYPE)
        for key in ("h", "k", "l"):
            table[key] = rows[key]
        table["I"] = rows["photons"]
        table["sigma"] = rows["photons"] / np.maximum(rows["snr"], 1e-6)
        table["fs"] = rows["fs"] + 0.5 + min_fs[rows["panel"]]
        table["ss"] = rows["ss"] + 0.5 + min_ss[rows["panel"]]
        table["panel"] = names[rows["panel"]]
        crystals = [stream_io.Crystal(reflections=table)] if len(rows) else []
        chunks.append(stream_io.Chunk(filename=cxi_name, event=f"//{i}", serial=i + 1,
                                      peaks=peaks, crystals=crystals,
                                      indexed_by="simulation" if crystals else "none"))
    stream_io.write_stream(path, chunks, geometry_text=geometry.to_text())


def make_sim_run(out: Path, n_frames: int = 6, seed: int = 100,
                 adu_per_photon: str = "1") -> SimRun:
    """Simulate ``n_frames`` frames into ``out`` and write their truth stream.  Two 384x192 panels
    stacked in one slab: small enough to simulate and fit in seconds, with a panel boundary
    through the pattern so panel bookkeeping is exercised.  ``adu_per_photon``: the gain the
    geometry declares and the simulator records its photons at."""
    from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
    from peaknet_xtal.sim.output import read_truth
    from peaknet_xtal.sim.run import simulate_run

    text = geometry_text(["top", "bottom"], 384, 192, [(-192.0, -192.0), (-192.0, 0.0)],
                         photon_energy="9500 eV", clen="0.080 m", res="13333.3",
                         adu_per_photon=adu_per_photon)
    paths = simulate_run(parse_geometry(text), n_frames, seed, out, stream=False, progress=False)
    stream = out / "truth.stream"
    truth_stream(stream, paths.cxi.name, read_geometry(paths.geom), read_truth(paths.truth),
                 n_frames)
    return SimRun(out, paths.cxi, paths.geom, paths.truth, stream, n_frames)
