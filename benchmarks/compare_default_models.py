"""Acceptance comparison of two peak models (default: the shipped one and the previous default,
benchmarks/baseline/default_v1.*), measured only: nothing here chooses or tunes anything.

    python benchmarks/compare_default_models.py [--models default benchmarks/baseline/...]

Per model, with the library's default peak settings and one torch thread:
- the held-out simulated frames of evaluation/held_out.py (``--frames N``, 30 by default, on
  each of ePix10k2M, CSPAD, Rayonix and JUNGFRAU 4M; seeds 3,000,100,001+): precision, recall and
  F1 on strong reflections per detector and overall, with bootstrap 95 % intervals over frames,
  and the paired interval of each model's F1 minus the first model's;
- the two real CSPAD thermolysin stills: peak count and median SNR (the test's plausible range is
  30-600 peaks, median SNR above 3);
- the ten real Pilatus 6M thaumatin grid frames: peaks per frame and how many are hits.
False peaks per blank frame are benchmarks/bench_blanks.py's (``--model``); indexing the real
stills through DIALS is tests/plugins/test_dials_commands.py's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
BASELINE = ROOT / "benchmarks" / "baseline" / "default_v1.safetensors"


def held_out(specs: list[str], per_detector: int) -> None:
    """F1 per detector with bootstrap intervals on the held-out set, and the paired interval of
    each model's F1 minus the first model's."""
    from peaknet_xtal.evaluation.held_out import held_out_triples_by_detector
    from peaknet_xtal.evaluation.metrics import (
        bootstrap_f1,
        bootstrap_f1_difference,
        score_frames,
    )
    from peaknet_xtal.finding import InferenceEngine

    triples = {spec: held_out_triples_by_detector(
        InferenceEngine(spec, device="cpu", threads=1), REAL / "crystfel_geometry", per_detector)
        for spec in specs}
    scores = {spec: {name: score_frames(found, cutoff=3.0) for name, found in by_name.items()}
              for spec, by_name in triples.items()}
    first = specs[0]
    for spec in specs:
        for name, score in scores[spec].items():
            total, frames = score["overall"], score["frames"]
            lo, hi = bootstrap_f1(frames)
            line = (f"{spec} {name}: F1 {total.f1:.3f} [{lo:.3f}, {hi:.3f}] (precision "
                    f"{total.precision:.3f}, recall {total.recall:.3f}, {len(frames)} frames, "
                    f"{total.n_true} strong reflections, median error "
                    f"{total.median_error_px:.2f} px)")
            if spec != first:
                dlo, dhi = bootstrap_f1_difference(frames, scores[first][name]["frames"])
                line += f"; minus {Path(first).name}: [{dlo:+.3f}, {dhi:+.3f}]"
            print(line, flush=True)


def real_frames(engine) -> dict[str, str]:
    from peaknet_xtal.formats.dxtbx_images import read_dxtbx_image

    out = {}
    for path in sorted((REAL / "cspad_thermolysin_stills").glob("*.cbf")):
        result = next(iter(engine.find_frames([read_dxtbx_image(path)])))
        out[path.name] = (f"{len(result.peaks)} peaks, median SNR "
                          f"{float(np.nanmedian(result.peaks['snr'])):.1f}")
    counts, hits = [], 0
    engine.new_run()  # another detector: a run of its own
    for path in sorted((REAL / "pilatus6m_thaumatin_grid").glob("*")):
        result = next(iter(engine.find_frames([read_dxtbx_image(path)])))
        counts.append(len(result.peaks))
        hits += bool(result.hit)
    out["thaumatin grid"] = f"{hits} of {len(counts)} hits; peaks {counts}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", str(BASELINE)])
    parser.add_argument("--no-real", dest="real", action="store_false")
    parser.add_argument("--frames", type=int, default=30, metavar="N",
                        help="held-out frames a detector (evaluation/held_out.py; default 30)")
    args = parser.parse_args(argv)
    held_out(args.models, args.frames)
    if args.real:
        from peaknet_xtal.finding import InferenceEngine

        for spec in args.models:
            print(spec, flush=True)
            for name, text in real_frames(InferenceEngine(spec, device="cpu", threads=1)).items():
                print(f"  {name}: {text}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
