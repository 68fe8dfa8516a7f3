"""Integration accuracy and calibration against the simulator's truth (the README's table).

Simulates held-out frames of the *acceptance* seed 2 (data roles: the shipped integrator was
trained on seed 1 and its ``profile_noise`` selected on seed 3, see
examples/train_integrator_default.py; seed 2 chose nothing), cuts a shoebox at every reflection,
integrates with the shipped variational integrator, with summation over the same boxes and (on a
subset, it is slow) with the data engine's pseudo-Voigt fit, and writes
examples/integration_report/{report.md,report.json,report.png}.  tests/integration/
test_evaluation.py checks the issue's criteria on these frames.

    python examples/integration_report.py [--frames 40] [--pvoigt 1500] [--weights PATH]

Spots whose box is less than 95 % on valid detector pixels (panel edges, dead pixels) are left
out, so all three methods see complete boxes (pixels the VI leaves to a neighbouring spot do not
count here: summation and the pseudo-Voigt fit read them).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from peaknet_xtal.atomic import write_json_atomic, write_text_atomic
from peaknet_xtal.integration import Integrator
from peaknet_xtal.integration.evaluation import (
    accuracy_table,
    calibration_table,
    format_markdown,
    plot,
    pvoigt_photons,
)
from peaknet_xtal.integration.simdata import simulate_shoeboxes

OUT = Path(__file__).resolve().parent / "integration_report"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2, help="acceptance seed (default 2)")
    parser.add_argument("--pvoigt", type=int, default=1500, help="spots fitted (0: none)")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    boxes = simulate_shoeboxes(args.frames, args.seed)
    boxes = boxes.select(np.flatnonzero(boxes.mask.mean(axis=(1, 2)) >= 0.95))
    truth, snr = boxes.extra["photons"], boxes.extra["snr"]
    start = time.perf_counter()
    result = Integrator(args.weights).integrate_boxes(boxes)
    seconds = time.perf_counter() - start
    estimates = {"VI": result["photons"], "summation": result["sum_photons"]}
    if args.pvoigt:
        rng = np.random.default_rng(0)
        index = np.sort(rng.choice(len(boxes), min(args.pvoigt, len(boxes)), replace=False))
        pv = np.full(len(boxes), np.nan)
        pv[index] = pvoigt_photons(boxes, index)
        estimates["pseudo-Voigt"] = pv
    accuracy = accuracy_table(truth, snr, estimates)
    calibration = {
        "VI": calibration_table(truth, result["photons"], result["photons_sigma"],
                                lognormal=True),
        "summation": calibration_table(truth, result["sum_photons"], result["sum_sigma"],
                                       lognormal=False)}
    text = (f"{len(boxes)} held-out simulated spots on {args.frames} frames (seed {args.seed}); "
            f"VI + summation took {seconds:.1f} s.\n\n" + format_markdown(accuracy, calibration))
    write_text_atomic(out / "report.md", text)
    write_json_atomic(out / "report.json", {"accuracy": accuracy, "calibration": calibration,
                                            "n_spots": len(boxes), "frames": args.frames,
                                            "seed": args.seed})
    plot(accuracy, calibration, out / "report.png")
    print(text)


if __name__ == "__main__":
    main()
