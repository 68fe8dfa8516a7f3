"""Accuracy of the detector gain estimated from the data (``peaknet_xtal.finding.gain``).

Simulated ePix10k2M frames (hits and blanks, kapton streaks, per-panel pedestals, read noise)
at known gains 1-50 ADU per photon on backgrounds of 0.15-3 photons a pixel: prints estimate /
truth.  Then the two real CSPAD CBFs (nominal gain 1, about 30 ADU per photon): the estimate
beside the real ``dials.estimate_gain`` on the same files, run in this process's venv.

Example:
  python benchmarks/bench_gain.py
"""
from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from peaknet_xtal.finding.gain import estimate_gain

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def simulated(gains: list[float], backgrounds: list[float]) -> list[float]:
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    geometry = read_geometry(REAL / "crystfel_geometry" / "om_lcls_mfx_epix10k2M.geom")
    ratios = []
    print("simulated ePix10k2M: estimated / true gain (rel. standard error, seconds)")
    for hit in (1.0, 0.0):
        for background in backgrounds:
            row = []
            for gain in gains:
                config = SimConfig(adu_per_photon=gain, air_photons=background,
                                   water_photons=background, kapton=True, hit_probability=hit)
                frame, _ = simulate_frame(geometry, 1, config)
                start = time.perf_counter()
                estimate = estimate_gain(frame.panels, frame.masks)
                seconds = time.perf_counter() - start
                ratios.append(estimate.gain / gain)
                row.append(f"g={gain:g}: {estimate.gain / gain:5.3f} "
                           f"({100 * estimate.relative_error:.1f} %, {seconds:.2f} s)")
            kind = "hit  " if hit else "blank"
            print(f"  {kind} background {background:4.2f} ph/px  " + "  ".join(row))
    worst = max(abs(r - 1) for r in ratios)
    print(f"worst relative error over {len(ratios)} frames: {100 * worst:.1f} %")
    return ratios


def cspad() -> None:
    import dxtbx

    from peaknet_xtal.evaluation.dials_commands import dials_environment, run_dials

    print("real CSPAD CBFs (nominal gain 1; about 30 ADU/photon):")
    for path in sorted((REAL / "cspad_thermolysin_stills").glob("*.cbf")):
        image = dxtbx.load(str(path))
        panels = [np.asarray(p.as_numpy_array(), dtype=float) for p in image.get_raw_data()]
        ours = estimate_gain(panels)
        with tempfile.TemporaryDirectory(prefix="bench_gain_") as tmp:
            env = dials_environment()
            run_dials("import", str(path), "output.experiments=imported.expt", cwd=Path(tmp),
                      env=env)
            out = run_dials("estimate_gain", "imported.expt", cwd=Path(tmp), env=env)[0]
        match = re.search(r"Estimated gain:\s*([-\d.]+)", str(out))
        theirs = float(match.group(1)) if match else float("nan")
        print(f"  {path.name}: peaknet-xtal {ours.describe()}; dials.estimate_gain {theirs:.2f}; "
              f"ratio {ours.gain / theirs:.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gains", type=float, nargs="+", default=[1, 5, 10, 30, 50])
    parser.add_argument("--backgrounds", type=float, nargs="+", default=[0.15, 1.0, 3.0])
    parser.add_argument("--no-real", action="store_true", help="skip the CSPAD/DIALS part")
    args = parser.parse_args(argv)
    simulated(args.gains, args.backgrounds)
    if not args.no_real:
        cspad()


if __name__ == "__main__":
    main()
