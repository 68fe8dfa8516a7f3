"""A small simulated run (CXI stack, geometry, truth) and a stream of its true predictions.

Shared by tests/engine (through its conftest) and tests/cli/test_stream2labels.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Two 384x192 panels stacked in one slab: small enough to simulate and fit in seconds, with a
#: panel boundary through the pattern so panel bookkeeping is exercised.
TWO_PANEL_GEOM = """\
photon_energy = 9500 eV
clen = 0.080 m
res = 13333.3
adu_per_photon = 1
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
top/min_fs = 0
top/max_fs = 383
top/min_ss = 0
top/max_ss = 191
top/fs = +1.0x +0.0y
top/ss = +0.0x +1.0y
top/corner_x = -192.0
top/corner_y = -192.0
bottom/min_fs = 0
bottom/max_fs = 383
bottom/min_ss = 192
bottom/max_ss = 383
bottom/fs = +1.0x +0.0y
bottom/ss = +0.0x +1.0y
bottom/corner_x = -192.0
bottom/corner_y = 0.0
"""


@dataclass
class SimRun:
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
    from peaknet_xtal.io import stream as stream_io

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


def make_sim_run(out: Path, n_frames: int = 6, seed: int = 100) -> SimRun:
    """Simulate ``n_frames`` two-panel frames into ``out`` and write their truth stream."""
    from peaknet_xtal.io.geometry import parse_geometry, read_geometry
    from peaknet_xtal.sim.output import read_truth
    from peaknet_xtal.sim.run import simulate_run

    paths = simulate_run(parse_geometry(TWO_PANEL_GEOM), n_frames, seed, out, stream=False,
                         progress=False)
    stream = out / "truth.stream"
    truth_stream(stream, paths.cxi.name, read_geometry(paths.geom), read_truth(paths.truth),
                 n_frames)
    return SimRun(out, paths.cxi, paths.geom, paths.truth, stream, n_frames)
