"""Seconds per frame of ``dials.find_spots algorithm=peaknet`` versus DIALS' dispersion finder.

Both run as the real ``dials.find_spots`` command on the same images in the same run.  Each
command is timed on a short and a long image list; the per-frame cost is the slope
``(t_long - t_short) / (n_long - n_short)``, which removes start-up costs (Python, DIALS import,
loading the model) that a user pays once per command, not per frame.  Those are printed too.

Data sets (from ``../shared/data/real``):
  grid   Pilatus 6M thaumatin grid frames (6.2 Mpx, one panel); dispersion with DIALS defaults.
  cspad  the two CSPAD thermolysin stills (64 panels, 2.3 Mpx); dispersion needs the tuned
         gain/global_threshold/min_spot_size of ../shared/data/README.md (defaults fail there).

The previous default model (``--previous``, benchmarks/baseline/default_v1.*: the one issue 17's
ratios were measured on) runs through the same command in the same run, so that the two ratios
to dispersion sit side by side (``--previous none`` leaves it out).

Example:
  python benchmarks/bench_dials_find_spots.py --dataset grid --short 1 --long 4 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from peaknet_xtal.evaluation.dials_commands import DialsCommandError, dials_environment, run_dials

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
BASELINE = ROOT / "benchmarks" / "baseline" / "default_v1.safetensors"
CSPAD_TUNED = ["spotfinder.threshold.dispersion.gain=25",
               "spotfinder.threshold.dispersion.global_threshold=100",
               "spotfinder.filter.min_spot_size=2"]


def images(dataset: str) -> list[Path]:
    folder = {"grid": "pilatus6m_thaumatin_grid", "cspad": "cspad_thermolysin_stills"}[dataset]
    files = sorted((REAL / folder).glob("*.cbf*"))
    if not files:
        sys.exit(f"no images under {REAL / folder}")
    return files


def dials(command: str, *args: str, cwd: Path) -> float:
    """Wall seconds of one ``dials.<command>`` run from this interpreter's venv."""
    try:
        return run_dials(command, *args, cwd=cwd, env=dials_environment())[1]
    except DialsCommandError as exc:
        sys.exit(str(exc))


def spot_count(refl: Path) -> int:
    from dials.array_family import flex

    return len(flex.reflection_table.from_file(str(refl)))


def time_finder(name: str, options: list[str], sizes: dict[str, int], work: Path,
                repeats: int) -> tuple[float, float, int]:
    """(seconds per frame, start-up seconds, spots on the long list) for one finder."""
    best: dict[str, float] = {}
    for label in sizes:
        runs = [dials("find_spots", f"{label}.expt", *options,
                      f"output.reflections={name}_{label}.refl", cwd=work)
                for _ in range(repeats)]
        best[label] = min(runs)
    n_short, n_long = sizes["short"], sizes["long"]
    per_frame = (best["long"] - best["short"]) / (n_long - n_short)
    startup = best["short"] - per_frame * n_short
    return per_frame, startup, spot_count(work / f"{name}_long.refl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["grid", "cspad"], default="grid")
    parser.add_argument("--short", type=int, default=1, help="frames in the short run")
    parser.add_argument("--long", type=int, default=4, help="frames in the long run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for peaknet")
    parser.add_argument("--device", default="cpu", help="peaknet device (auto/cpu/cuda)")
    parser.add_argument("--model", default="default", help="peaknet model (default or a path)")
    parser.add_argument("--previous", default=str(BASELINE),
                        help="also time this model (default: the previous default; 'none': no)")
    parser.add_argument("--repeats", type=int, default=1, help="take the best of N runs")
    args = parser.parse_args(argv)

    files = images(args.dataset)
    if args.dataset == "cspad":  # two stills only: one versus both
        args.short, args.long = 1, 2
    if not 0 < args.short < args.long <= len(files):
        sys.exit(f"need 0 < --short < --long <= {len(files)} frames")
    sizes = {"short": args.short, "long": args.long}
    dispersion = CSPAD_TUNED if args.dataset == "cspad" else []
    def peaknet(model: str) -> list[str]:
        return ["algorithm=peaknet", f"spotfinder.threshold.peaknet.threads={args.threads}",
                f"spotfinder.threshold.peaknet.device={args.device}",
                f"spotfinder.threshold.peaknet.model={model}"]

    finders = {"dispersion": dispersion, "peaknet": peaknet(args.model)}
    if args.previous != "none":
        finders["previous"] = peaknet(args.previous)

    with tempfile.TemporaryDirectory(prefix="bench_find_spots_") as tmp:
        work = Path(tmp)
        for label, n in sizes.items():
            dials("import", *map(str, files[:n]), f"output.experiments={label}.expt", cwd=work)
        results = {name: time_finder(name, options, sizes, work, args.repeats)
                   for name, options in finders.items()}

    print(f"dataset {args.dataset}: frames {args.short} and {args.long}, peaknet on {args.device} "
          f"with {args.threads} thread(s)")
    for name, (per_frame, startup, spots) in results.items():
        print(f"  {name:<10} {per_frame:8.3f} s/frame   start-up {startup:6.2f} s   "
              f"{spots} spots on {args.long} frames")
    for name in finders:
        if name != "dispersion":
            ratio = results[name][0] / results["dispersion"][0]
            print(f"ratio {name} / dispersion: {ratio:.2f}x seconds per frame")


if __name__ == "__main__":
    main()
