"""Worked example: integrate a simulated serial run with VI and with summation, merge, compare.

    python examples/integration_worked_example.py [--frames 150] [--out DIR]

What it does (one script, a few minutes on a CPU):

1. simulates a serial run of lysozyme stills with a known structure (fixed fluence and detector);
2. takes every reflection the simulator predicts for each crystal at its true position -- the
   stand-in for indexing here: the full chain (peak finding, DIALS stills indexing) is NOT run
   by this script;
3. integrates each with the shipped variational integrator and with summation (same boxes);
4. merges both without scaling: the mean intensity per unique reflection.  The simulator's
   structure gives equal intensities to every sign change of (h, k, l), so reflections are merged
   on (|h|, |k|, |l|);
5. compares the merged intensities with the same merge of the simulator's exact expected photons
   (correlation overall and per resolution shell), writes a table and a PNG.

careless and abismal were NOT run: both install from PyPI (`pip install --dry-run careless` resolves
TensorFlow 2.18) but only into a separate environment, and were not run within this work's time.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from peaknet_xtal.atomic import write_json_atomic, write_text_atomic


def merge(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys, mean value and multiplicity per key."""
    uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.ravel(), weights=values, minlength=len(uniq))
    return uniq, sums / counts, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent /
                                             "integration_worked_example"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.simdata import SPOT_RADIUS, default_geometry
    from peaknet_xtal.progress import Progress
    from peaknet_xtal.sim import SimConfig, simulate_frame

    geometry = default_geometry()
    config = SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                       read_noise=0.15, adu_per_photon=8.5, incident_photons=1e12,
                       d_min_A=1.8)
    integrator = Integrator()
    rows = []
    with Progress(args.frames, "frames", desc="simulate + integrate") as bar:
        for i in range(args.frames):
            frame, truth = simulate_frame(geometry, args.seed * 1000 + i, config)
            refl = truth.reflections
            if len(refl):
                res = integrator.integrate(frame, refl["panel"], refl["fs"], refl["ss"],
                                           gain=truth.adu_per_photon, read_noise=0.15,
                                           one_over_d=refl["one_over_d"])
                ok = np.isfinite(res["sum_photons"])
                rows.append(np.column_stack([np.abs(refl["h"]), np.abs(refl["k"]),
                                             np.abs(refl["l"]), refl["one_over_d"],
                                             refl["photons"], res["photons"],
                                             res["sum_photons"]])[ok])
            bar.update(1)
    data = np.concatenate(rows)
    keys = data[:, :3].astype(int)
    uniq, true_mean, mult = merge(keys, data[:, 4])
    _, vi_mean, _ = merge(keys, data[:, 5])
    _, sum_mean, _ = merge(keys, data[:, 6])
    _, d_mean, _ = merge(keys, data[:, 3])
    edges = np.quantile(d_mean, np.linspace(0, 1, 6))
    lines = [f"{len(data)} observations of {len(uniq)} unique reflections on {args.frames} "
             f"frames (mean multiplicity {mult.mean():.1f}).", "",
             "| resolution (A) | n unique | CC(VI, truth) | CC(summation, truth) |",
             "|---|---|---|---|"]
    result = {"overall": {"vi": float(np.corrcoef(vi_mean, true_mean)[0, 1]),
                          "summation": float(np.corrcoef(sum_mean, true_mean)[0, 1])},
              "shells": []}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (d_mean >= lo) & (d_mean <= hi)
        cc_vi = float(np.corrcoef(vi_mean[sel], true_mean[sel])[0, 1])
        cc_sum = float(np.corrcoef(sum_mean[sel], true_mean[sel])[0, 1])
        result["shells"].append({"d_max": 1 / lo, "d_min": 1 / hi, "n": int(sel.sum()),
                                 "vi": cc_vi, "summation": cc_sum})
        lines.append(f"| {1 / lo:.2f}-{1 / hi:.2f} | {int(sel.sum())} | {cc_vi:.3f} | "
                     f"{cc_sum:.3f} |")
    lines.append(f"| all | {len(uniq)} | {result['overall']['vi']:.3f} | "
                 f"{result['overall']['summation']:.3f} |")
    out = Path(args.out)
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "merged.md", text)
    write_json_atomic(out / "merged.json", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peaknet_xtal.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    centres = [0.5 * (s["d_max"] + s["d_min"]) for s in result["shells"]]
    ax.plot(centres, [s["vi"] for s in result["shells"]], "o-", label="VI")
    ax.plot(centres, [s["summation"] for s in result["shells"]], "s-", label="summation")
    ax.invert_xaxis()
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("CC of merged I with truth")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "merged.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
