"""Fitted peaks per second per core: the engine's pseudo-Voigt fit vs the plain lmfit loop.

    python benchmarks/bench_pvoigt_fit.py [--frames 6] [--baseline 150]

Windows come from simulated frames (every reflection with I/sigma >= 5 of a two-panel detector),
so they have the background, noise, edges and masked pixels of real work.  Both fitters run in this
process, one after the other, on the same windows; rates are per CPU-second of this process
(``time.process_time``), which is what "per core" means and is robust to other load on the
machine.  Target: >= 300 fitted peaks/s per core (the reference reached ~3 per core).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core means one core, BLAS included

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def simulated_windows(n_frames: int) -> list:
    sys.path.insert(0, str(ROOT / "tests" / "labelling"))
    from simdata import make_sim_run  # the same simulated run the tests use

    from peaknet_xtal.labelling.batch import BatchLabeler, FrameJob
    from peaknet_xtal.labelling.ingest import load_frame, records_from_stream, stream_geometry

    with tempfile.TemporaryDirectory() as tmp:
        run = make_sim_run(Path(tmp), n_frames=n_frames)
        geometry = stream_geometry(run.stream)
        labeler = BatchLabeler({"label": {"min_i_over_sigma": 5.0}}, {})
        windows = []
        for rec in records_from_stream(run.stream, geometry=geometry):
            frame = load_frame(rec, geometry)
            windows += labeler.windows(FrameJob(0, rec), frame.panels, frame.masks_or_ones())
    return windows


def rate(fn, windows) -> tuple[float, float, list]:
    wall, cpu = time.perf_counter(), time.process_time()
    results = [fn(w) for w in windows]
    return (len(windows) / (time.process_time() - cpu), len(windows) /
            (time.perf_counter() - wall), results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--baseline", type=int, default=150, help="windows for the slow loop")
    args = parser.parse_args()
    from peaknet_xtal.labelling import pvoigt as pv

    windows = simulated_windows(args.frames)
    pv.fit_windows(windows[:5])  # imports and the parameter template, outside the timing
    pv.fit_window_baseline(windows[0])
    fast_cpu, fast_wall, outcomes = rate(pv.fit_window, windows)
    sub = windows[: args.baseline]
    base_cpu, base_wall, base = rate(pv.fit_window_baseline, sub)
    ok = np.mean([o.ok for o in outcomes])
    shift = [np.hypot(o.row["x0"] - r.params["dx0"].value - w.fs_guess,
                      o.row["y0"] - r.params["dy0"].value - w.ss_guess)
             for o, r, w in zip(outcomes, base, sub) if o.ok and r.success]
    print(f"windows: {len(windows)} from {args.frames} simulated frames; "
          f"{100 * ok:.1f}% trusted fits")
    print(f"engine fit   : {fast_cpu:8.1f} peaks/s per core ({fast_wall:.1f}/s wall)")
    print(f"plain lmfit  : {base_cpu:8.1f} peaks/s per core ({base_wall:.1f}/s wall, "
          f"{len(sub)} windows)")
    print(f"speed-up     : {fast_cpu / base_cpu:8.1f}x   target >= 300 peaks/s per core: "
          f"{'met' if fast_cpu >= 300 else 'NOT met'}")
    print(f"centres agree with the baseline: median {np.median(shift):.3f} px, "
          f"95th percentile {np.percentile(shift, 95):.3f} px")


if __name__ == "__main__":
    main()
