"""Where a peak model's recall goes, on the simulated model-selection frames only.

    python benchmarks/selection_recall.py [--models WEIGHTS ...] [--json out.json]

Model-selection data (evaluation/selection.py: the 12 mixed validation frames, the 24 clean
hits and 8 more blanks on ePix10k2M, CSPAD, Rayonix and JUNGFRAU 4M, seeds 2,000,000,001+),
never acceptance frames: this is the diagnosis the train script's selection stage rests on.
Per model, one torch thread, the library's peak settings except the probability threshold
(0.3-0.6, on the model's own output: a calibrated model has its threshold folded in already)
and, as a control, the SNR cut switched off at 0.5: recall of the strong reflections binned by
their expected integrated I/sigma, by the frame's spot width (``spot_sigma_px``) and by
detector; precision and F1; false peaks per blank.  Also, for each strong reflection a model
misses at 0.5, the largest peak probability within 1 px of it, which tells a threshold problem
(0.2-0.5) from spots the model does not see at all (below 0.05).  About 3 minutes for two
models on a busy 2-core machine.

``--decorrelate`` (a diagnosis, not a shipped path) divides a local-normalisation model's input
on each panel by how much larger the noise of a 2 x 2 sum is than uncorrelated pixel noise would
make it (robust spreads, never below 1): a check of whether spatially correlated background
noise, which the per-pixel noise scale of layers/local_norm.py does not see, is what makes the
false peaks of blanks on a strong background.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = ROOT.parent / "shared" / "data" / "real" / "crystfel_geometry"
MODELS = [str(ROOT / "benchmarks" / "candidates" / "swift.safetensors"),
          str(ROOT / "benchmarks" / "baseline" / "default_v1.safetensors")]
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
SNR_BINS = (5, 10, 20, 50, 1e9)
SIGMA_BINS = (0.3, 0.5, 0.8, 1.2, 1.7)


def _bin_label(edges: tuple[float, ...], i: int) -> str:
    hi = edges[i + 1]
    return f"{edges[i]:g}-{hi:g}" if hi < 1e8 else f">{edges[i]:g}"


def _recall_by(values: np.ndarray, hit: np.ndarray, edges: tuple[float, ...]) -> dict[str, Any]:
    out = {}
    for i in range(len(edges) - 1):
        sel = (values >= edges[i]) & (values < edges[i + 1])
        out[_bin_label(edges, i)] = (float(hit[sel].mean()) if sel.any() else float("nan"),
                                     int(sel.sum()))
    return out


def _mad(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a)))) if a.size else 0.0


def decorrelate_input() -> None:
    """Wrap ``PeakNet.normalise`` (this process only): per image, the input ``z = asinh(r)``
    becomes ``asinh(r / f)`` with ``f`` the robust spread of half 2 x 2 sums of ``r`` over the
    robust spread of ``r`` (1 for uncorrelated noise; ~1.5 at neighbour correlation 0.5)."""
    import torch

    from peaknet_xtal.model.peaknet import PeakNet

    plain = PeakNet.normalise

    def normalise(self: PeakNet, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        z = plain(self, x, valid)
        out = []
        for i in range(z.shape[0]):
            r = torch.sinh(z[i, 0]).numpy().copy()
            r[~valid[i, 0].numpy()] = np.nan
            h, w = (r.shape[0] // 2) * 2, (r.shape[1] // 2) * 2
            half_sums = r[:h, :w].reshape(h // 2, 2, w // 2, 2).sum((1, 3)) / 2
            f = max(1.0, _mad(half_sums) / max(_mad(r), 1e-6))
            out.append(torch.asinh(torch.sinh(z[i:i + 1]) / f))
        return torch.cat(out)

    PeakNet.normalise = normalise  # type: ignore[method-assign]


def measure(spec: str, parts: dict[str, list[tuple]],
            thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    from peaknet_xtal.evaluation.metrics import match_peaks, score_frames
    from peaknet_xtal.finding import InferenceEngine
    from peaknet_xtal.finding.peaks import find_peaks

    engine = InferenceEngine(spec, device="cpu", threads=1, keep_prob_maps=True)
    variants = [(f"t{t:g}", t, None) for t in thresholds] + [("t0.5 no SNR cut", 0.5, 0.0)]
    rows: dict[str, dict[str, list]] = {v[0]: {"hit": [], "snr": [], "sigma": [], "det": [],
                                               "part": []} for v in variants}
    triples: dict[tuple[str, str], list] = {}
    blanks: dict[str, list[int]] = {v[0]: [] for v in variants}
    missed_prob: list[float] = []
    detector = None
    for part, frames in parts.items():
        for frame, truth in frames:
            info = frame.meta["selection"]
            if info["detector"] != detector:  # another detector: a run of its own
                if detector is not None:
                    engine.new_run()
                detector = info["detector"]
            result = next(iter(engine.find_frames([frame])))
            assert result.prob_maps is not None  # keep_prob_maps
            base = engine.params_for(frame)
            refl = truth.reflections
            strong = refl[refl["strong"]]
            for name, t, min_snr in variants:
                params = replace(base, threshold=t)
                if min_snr is not None:
                    params = replace(params, min_snr=min_snr)
                found = find_peaks(frame.panels, result.prob_maps, frame.masks, params,
                                   geometry=frame.geometry,
                                   wavelength_A=frame.meta.get("wavelength_A"))
                if not len(refl):
                    blanks[name].append(len(found))
                    continue
                triples.setdefault((name, part), []).append((found, strong, refl))
                _, ib, _ = match_peaks(found["panel"], found["fs"], found["ss"],
                                       strong["panel"], strong["fs"], strong["ss"], 3.0)
                hit = np.zeros(len(strong), bool)
                hit[ib] = True
                row_lists = rows[name]
                row_lists["hit"].append(hit)
                row_lists["snr"].append(strong["snr"])
                row_lists["sigma"].append(np.full(len(strong), info["spot_sigma_px"]))
                row_lists["det"].append(np.array([info["detector"].split(".")[0]] * len(strong)))
                row_lists["part"].append(np.array([part] * len(strong)))
                if name == "t0.5":
                    for row in strong[~hit]:
                        prob = result.prob_maps[int(row["panel"])]
                        fs, ss = int(round(row["fs"])), int(round(row["ss"]))
                        window = prob[max(ss - 1, 0):ss + 2, max(fs - 1, 0):fs + 2]
                        missed_prob.append(float(window.max()) if window.size else 0.0)
    out: dict[str, Any] = {"model": spec, "variants": {}}
    for name, *_ in variants:
        r: dict[str, np.ndarray] = {k: np.concatenate(v) for k, v in rows[name].items()}
        hit_parts = [p for p in parts if (name, p) in triples]
        scores = {part: score_frames(triples[(name, part)], cutoff=3.0)["overall"]
                  for part in hit_parts}
        every = score_frames([x for part in hit_parts for x in triples[(name, part)]],
                             cutoff=3.0)["overall"]
        dets = sorted(set(r["det"]))
        out["variants"][name] = {
            "f1": {**{p: float(s.f1) for p, s in scores.items()}, "all": float(every.f1)},
            "precision": {**{p: float(s.precision) for p, s in scores.items()},
                          "all": float(every.precision)},
            "recall": {**{p: float(s.recall) for p, s in scores.items()},
                       "all": float(every.recall)},
            "blank_false_peaks": float(np.mean(blanks[name])) if blanks[name] else float("nan"),
            "blank_false_peaks_each": [int(n) for n in blanks[name]],
            "recall_by_snr": _recall_by(r["snr"], r["hit"], SNR_BINS),
            "recall_by_spot_sigma": _recall_by(r["sigma"], r["hit"], SIGMA_BINS),
            "recall_by_detector": {d: (float(r["hit"][r["det"] == d].mean()),
                                       int((r["det"] == d).sum())) for d in dets},
        }
    mp = np.array(missed_prob)
    out["missed_at_0.5_max_prob"] = {
        "n": int(len(mp)),
        **{f"<{e}": float((mp < e).mean()) if len(mp) else float("nan")
           for e in (0.05, 0.2, 0.3, 0.4, 0.5)}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--decorrelate", action="store_true",
                        help="diagnosis: scale the input by the 2 x 2-sum noise excess")
    args = parser.parse_args(argv)
    import torch

    from peaknet_xtal.evaluation.selection import selection_frames

    torch.set_num_threads(1)
    if args.decorrelate:
        decorrelate_input()
    parts = selection_frames(GEOMETRIES)
    results = []
    for spec in args.models:
        res = measure(spec, parts, tuple(args.thresholds))
        results.append(res)
        print(f"== {spec}")
        for name, v in res["variants"].items():
            print(f"  {name}: F1 " + " ".join(f"{p} {x:.3f}" for p, x in v["f1"].items())
                  + " | recall " + " ".join(f"{p} {x:.3f}" for p, x in v["recall"].items())
                  + " | precision " + " ".join(f"{p} {x:.3f}" for p, x in v["precision"].items())
                  + f" | {v['blank_false_peaks']:.1f} false peaks per blank "
                  f"{v['blank_false_peaks_each']}")
            for key in ("recall_by_snr", "recall_by_spot_sigma", "recall_by_detector"):
                print(f"    {key}: " + ", ".join(f"{b} {x:.2f} (n={n})"
                                                 for b, (x, n) in v[key].items()))
        print(f"  missed strong reflections at 0.5: {res['missed_at_0.5_max_prob']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
