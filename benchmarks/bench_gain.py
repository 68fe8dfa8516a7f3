"""Accuracy of the detector gain estimated from the data (``peaknet_xtal.finding.gain``).

Simulated ePix10k2M frames (hits and blanks, kapton streaks, per-panel pedestals, read noise)
at known gains 1-50 ADU per photon on backgrounds of 0.15-3 photons a pixel: prints estimate /
truth.  Then panels whose chips carry their own pedestal offsets (0.2 photon; JUNGFRAU's
256 x 256 chips in one big panel as a Jungfraujoch file has them, AGIPD's 64 x 64 ASICs in
modules of 512 x 128): estimate / truth, ``*`` where not reliable, ``r`` where the per-region fit
was taken.  Then the two real CSPAD CBFs (nominal gain 1, about 30 ADU per photon): the estimate
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


def chip_offsets(backgrounds: list[float], gain: float = 10.0, seeds: int = 3) -> None:
    """Panels of chips with their own pedestal offsets (0.2 photon), a smooth background (a
    gradient and a ripple), Poisson counts, read noise 0.15 photon."""
    print("chip pedestal offsets inside panels (0.2 photon): estimated / true gain, "
          "* not reliable, r per-region fit")
    layouts = {"JUNGFRAU 1024x1024 panels, 256-px chips": ((1024, 1024), 256, 2),
               "AGIPD 512x128 modules, 64-px ASICs": ((512, 128), 64, 16)}
    for name, (shape, chip, count) in layouts.items():
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        for background in backgrounds:
            row = []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                panels = []
                for _ in range(count):
                    level = background * (0.4 + 0.6 * (xx / shape[1]
                                                       + 0.3 * np.sin(yy / 40.0)) ** 2)
                    offsets = rng.normal(0.0, 0.2 * gain, (shape[0] // chip, shape[1] // chip))
                    panels.append(rng.poisson(level) * gain + rng.normal(0, 0.15 * gain, shape)
                                  + np.kron(offsets, np.ones((chip, chip))))
                estimate = estimate_gain(panels)
                flags = ("" if estimate.reliable else "*") + (
                    "r" if getattr(estimate, "within_regions", False) else "")
                row.append(f"{estimate.gain / gain:5.3f}{flags:2s}")
            print(f"  {name}, background {background:4.2f} ph/px: " + "  ".join(row))


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
    chip_offsets(args.backgrounds)
    if not args.no_real:
        cspad()


if __name__ == "__main__":
    main()
