"""Make the committed example evaluation report (examples/eval_report/) on a small simulated set.

    python examples/make_eval_report.py [OUT_DIR] [--frames 10] [--tune-frames 2] [--no-index]

Simulates a fixed-seed run of lysozyme stills on the CSPAD (about one frame in four a blank),
then runs ``peaknet-eval``'s ``evaluate`` with the shipped PeakNet model, peakfinder8 and DIALS'
dispersion finder: the classic finders are tuned by grid search on the first frames, every
finder's peaks are indexed per frame with ``dials.index`` (known lysozyme symmetry), and the
report (report.md, report.json, PNGs) is written to OUT_DIR.  The simulated data and the DIALS
working files stay in a temporary folder, so OUT_DIR holds only what is worth committing (~2 MB).
Takes a few minutes on two cores.  Rerun it after the default model's weights change.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = ROOT.parent / "shared/data/real/crystfel_geometry/crystfel_doc_cspad-cxiformat.geom"
SEED = 40
FINDERS = ["peaknet:default", "peakfinder8", "dispersion"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", default=str(ROOT / "examples" / "eval_report"))
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--tune-frames", dest="tune_frames", type=int, default=2)
    parser.add_argument("--geometry", default=str(GEOMETRY))
    parser.add_argument("--no-index", dest="index", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from peaknet_xtal.config import setup_logging
    from peaknet_xtal.evaluation.report import evaluate, load_sim_run
    from peaknet_xtal.io.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    args = parse_args(argv)
    setup_logging(0)
    logging.getLogger("peaknet_xtal.evaluation.tuning").setLevel(logging.INFO)
    torch.set_num_threads(2)
    out = Path(args.output)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peaknet-eval-example-") as tmp:
        work = Path(tmp)
        simulate_run(read_geometry(args.geometry), args.frames, SEED, work / "cspad",
                     SimConfig(cell="lysozyme", hit_probability=0.75), stream=False)
        dataset = load_sim_run(work / "cspad")
        dataset.name = f"simulated lysozyme stills, CSPAD ({args.frames} frames, seed {SEED})"
        dataset.space_group = "P43212"
        report_dir = work / "report"
        report = evaluate(dataset, FINDERS, report_dir, tune_frames=args.tune_frames,
                          index=args.index, samples=2)
        shutil.rmtree(report_dir / "dials", ignore_errors=True)  # DIALS working files
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(report_dir, out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    for label, entry in report["finders"].items():
        acc = entry.get("accuracy", {})
        print(f"{label:18s} F1 {acc.get('f1', float('nan')):.3f}  hit rate {entry['hit_rate']:.3f}")
    print(f"report: {out / 'report.md'} ({size:.1f} MB, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
