"""Simulator speed: ePix10k2M frames (2.2 Mpx, ~500 spots) per second on one core.

Baseline, measured in the same run: writing the same frame to an HDF5 file (h5py, float32,
uncompressed).  Target: >= 10 frames/s, so that training data is cheap on CPU.

Both are timed twice: CPU time of this process (``time.process_time``), which is what counts on a
shared or loaded machine, and wall time, which is what a user waits on an idle one.  BLAS/OpenMP
are pinned to one thread so the numbers are per core.  The first frame (which builds the
per-detector maps and the cached background once per run) is not timed; ``--cold`` reports it.

    python benchmarks/bench_sim.py [--frames 20] [--geometry G.geom] [--cell lysozyme] [--kapton]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from peaknet_xtal.formats.geometry import read_geometry  # noqa: E402
from peaknet_xtal.sim import SimConfig, simulate_frame  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPIX = ROOT.parent / "shared/data/real/crystfel_geometry/om_lcls_mfx_epix10k2M.geom"


def timed(work: Callable[[int], Any], count: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call of ``work(i)`` for i in 0..count-1."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        work(i)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


def rate(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms/frame = {1 / seconds:6.1f} frames/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--geometry", default=str(EPIX))
    parser.add_argument("--cell", default="lysozyme", help="preset cell name")
    parser.add_argument("--kapton", action="store_true", help="add the per-frame kapton streak")
    parser.add_argument("--cold", action="store_true",
                        help="also time the first (cache-building) frame")
    args = parser.parse_args()
    geometry = read_geometry(args.geometry)
    config = SimConfig(cell=args.cell, kapton=args.kapton)
    cold_cpu, cold_wall = timed(lambda i: simulate_frame(geometry, 0, config), 1)
    spots: list[int] = []
    strong: list[int] = []
    frames: list[Any] = []

    def simulate(i: int) -> None:
        frame, truth = simulate_frame(geometry, i + 1, config)
        spots.append(len(truth.reflections))
        strong.append(int(truth.reflections["strong"].sum()))
        frames[:] = [frame]

    sim_cpu, sim_wall = timed(simulate, args.frames)
    slab = geometry.assemble_slab(frames[0].panels)
    with tempfile.TemporaryDirectory() as tmp:
        def write(i: int) -> None:
            with h5py.File(Path(tmp) / f"f{i}.h5", "w") as h5:
                h5.create_dataset("data", data=slab)

        write_cpu, write_wall = timed(write, args.frames)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"detector: {Path(args.geometry).name}, {slab.size / 1e6:.2f} Mpx; "
          f"{args.frames} frames; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"reflections per frame: median {int(np.median(spots))} "
          f"(strong {int(np.median(strong))})")
    if args.cold:
        print(f"first frame (builds caches): cpu {cold_cpu * 1000:.0f} ms, "
              f"wall {cold_wall * 1000:.0f} ms")
    print(f"simulate  cpu : {rate(sim_cpu)}   (target >= 10 frames/s)")
    print(f"simulate  wall: {rate(sim_wall)}")
    print(f"HDF5 write cpu : {rate(write_cpu)}   (baseline)")
    print(f"HDF5 write wall: {rate(write_wall)}")
    print(f"ratio simulate/write time: cpu {sim_cpu / write_cpu:.2f}, "
          f"wall {sim_wall / write_wall:.2f}")
    print(f"target met (cpu): {'yes' if 1 / sim_cpu >= 10 else 'NO'}")


if __name__ == "__main__":
    main()
