"""Integrated spots per second per CPU core: the variational integrator vs summation.

    python benchmarks/bench_integrate.py [--frames 20] [--repeat 3]

Shoeboxes come from simulated frames (every predicted reflection, weak and strong, as in real
integration).  Both methods run in this process on the same boxes with one thread (torch and
BLAS), one after the other; rates are per CPU-second of this process (``time.process_time``),
which is what "per core" means and is robust to other load on the machine.  Shoebox extraction
is timed separately (both methods need it; it includes the VI's neighbour split).  Target: >= 1,000
spots/s per core for VI.
"""
from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core means one core, BLAS included

import numpy as np  # noqa: E402

TARGET = 1000.0


def rate(func, n: int, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        start = time.process_time()
        func()
        best = min(best, time.process_time() - start)
    return n / max(best, 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--weights", default="default")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from peaknet_xtal.integration import Integrator, extract_shoeboxes, summation
    from peaknet_xtal.integration.simdata import default_geometry, frame_config
    from peaknet_xtal.sim import simulate_frame

    geometry = default_geometry()
    frames = []
    for i in range(args.frames):
        config = frame_config(np.random.default_rng(i))
        frames.append((simulate_frame(geometry, 10_000 + i, config), config))
    n = sum(len(t.reflections) for (_, t), _ in frames)

    def extract() -> list:
        return [extract_shoeboxes(f.panels, f.masks, t.reflections["panel"], t.reflections["fs"],
                                  t.reflections["ss"], gain=t.adu_per_photon,
                                  read_noise=c.read_noise, geometry=geometry, clen_m=t.clen_m)
                for (f, t), c in frames]

    boxes = extract()
    integrator = Integrator(args.weights)
    integrator.integrate_boxes(boxes[0])  # warm-up
    r_extract = rate(extract, n, args.repeat)
    r_sum = rate(lambda: [summation(b) for b in boxes], n, args.repeat)

    def vi_only() -> None:
        from peaknet_xtal.integration.train import posterior

        for b in boxes:
            posterior(integrator.model, b)

    r_vi = rate(vi_only, n, args.repeat)
    r_both = rate(lambda: [integrator.integrate_boxes(b) for b in boxes], n, args.repeat)
    print(f"{n} spots on {args.frames} simulated frames, one core")
    print(f"  shoebox extraction      {r_extract:10.0f} spots/s")
    print(f"  summation (baseline)    {r_sum:10.0f} spots/s")
    print(f"  VI posterior            {r_vi:10.0f} spots/s   ratio VI/summation "
          f"{r_vi / r_sum:.3f}")
    print(f"  VI + summation (API)    {r_both:10.0f} spots/s")
    print(f"  target >= {TARGET:.0f} spots/s/core for VI: "
          f"{'met' if r_vi >= TARGET else 'NOT met'} ({r_vi / TARGET:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
