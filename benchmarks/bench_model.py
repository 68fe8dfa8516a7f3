"""Benchmark the PeakNet models on CPU against DIALS' dispersion threshold on the same frames.

    python benchmarks/bench_model.py [--threads 2] [--repeat 3] [--skip-sizes] [--clock cpu]

Prints, for the shipped default model (as trained, and in the fused form the engine runs on a
CPU by default, ``model.fast.fuse_for_inference``, with the fused/plain ratio) and, once a new
default replaces today's, for the previous one (to be kept as benchmarks/baseline/default_v1.*,
the model the 44x/78x ratios of issue 17 were measured on): seconds per frame on a real 2.3-Mpx
CSPAD still and a 6-Mpx Pilatus frame (input normalisation included) beside DIALS' dispersion
threshold (the core of dials.find_spots) on the same pixels in the same run, with their ratio;
the same through the finding engine (``InferenceEngine.predict_panels``: tiles, batches of 8,
stitching; plain and fused); images/s at batch 1 and 8 on one CSPAD panel stack.  Then
parameters and FLOPs per megapixel of every registered size (counted on the meta device).
The default model also runs through the engine with ``precision="bf16"`` (the network under
bfloat16 autocast, opt-in: ``finding.settings.PRECISIONS``), with its speed-up over float32.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine other
jobs share, waiting for a core then does not count (with one thread it is the single-core cost).
``--model WEIGHTS`` times a candidate in the default's place; ``--profile`` prints CPU seconds
per stage of one CSPAD frame through the engine (fused), new and previous side by side.

Measured (``--threads 1 --clock cpu``, the 2-core machine otherwise idle; DIALS dispersion 0.037 s
on CSPAD, 0.095 s on Pilatus 6M in the same run), today's default (local normalisation,
decorrelated input) against v1, the same network with global standardisation:

| per frame, one thread | default | previous (v1) | v1 / default |
|---|---|---|---|
| CSPAD, model per panel, as trained | 1.52 s (41x) | 1.61 s (43x) | 1.06 |
| CSPAD, engine, fused | 0.94 s (25x) | 0.64 s (17x) | 0.68 |
| Pilatus 6M, model, fused | 3.12 s (33x) | 2.84 s (30x) | 0.91 |
| Pilatus 6M, engine, fused | 3.36 s (35x) | 3.24 s (34x) | 0.97 |

A later run (engine asking for the peak logit alone, ``PeakNet.peak_logit``; DIALS 0.031 s on
CSPAD, 0.071 s on Pilatus 6M): engine, fused, 0.98 s (32x) against v1's 0.86 s on CSPAD, 3.32 s
(47x) against 2.77 s on Pilatus 6M; the same code without ``peak_logit``, alternating runs: CSPAD
0.97-1.03 s against 0.86-0.94 s with it, Pilatus 6M 3.4-4.0 against 3.0-3.3 s.

This session's run, after the CPU passes were cut (asinh as logs and roots, the decorrelation's
clipped spreads through numpy, BiFPN fusions in place; DIALS 0.033 s on CSPAD, 0.072 s on
Pilatus 6M): engine, fused, 0.80 s (25x) against v1's 0.75 s on CSPAD, 2.90 s (40x) against
3.11 s on Pilatus 6M.  ``--profile`` (hooks on the modules, so it follows ``peak_logit``), CSPAD,
CPU s: input normalisation 0.20, stem 0.015, backbone stages 0.11, 0.07, 0.08, 0.04, BiFPN neck
0.16, head branches 0.13, head logits and x4 upsampling 0.04, engine rest 0.04; total 0.89.

On the CSPAD frame the difference is the input normalisation (64 panels): local maps 0.06-0.09 s
and the panel decorrelation 0.09 s (v1's standardisation about 0.09 s all told); the network is
the same.  Earlier (``--model benchmarks/candidates/swift.safetensors``, busy 2-core machine;
DIALS dispersion 0.034 s on CSPAD, 0.059 s on Pilatus 6M in the same run):

| per frame, one thread | previous (v1, then installed) | swift (candidate) | speed-up |
|---|---|---|---|
| CSPAD, model per panel, as trained | 1.36 s (40x) | 0.66 s (19x) | 2.1x |
| CSPAD, engine, fused | 0.67 s (20x) | 0.45 s (13x) | 1.5x |
| Pilatus 6M, model, fused | 2.24 s (38x) | 1.12 s (19x) | 2.0x |
| Pilatus 6M, engine, fused | 2.15 s (36x) | 1.07 s (18x) | 2.0x |

The engine's tiles of a large panel are no larger than the cover needs (nine 896 x 864 tiles
of a Pilatus 6M, not nine of 1024): v1 through the engine, fused, 4.46 s (73x) before, 2.15 s
(36x) after, one run each.  Ratios move by a third between runs on the busy machine (DIALS took
0.024-0.042 s on the same CSPAD frame); compare columns of one run.

Where the time goes (``--profile``, an earlier run; CSPAD frame, engine, fused, CPU s; v1 /
swift): input normalisation 0.082 / 0.063 (v1 global, swift local, whole panels batched); stem
0.015 / 0.013; backbone stages 0.100, 0.072, 0.084, 0.042 / 0.046, 0.038, 0.043 (three levels);
BiFPN neck 0.167 / 0.005 (adapters only); head branches 0.115 / 0.037; full-resolution logits +
bilinear x4 0.050 / 0.047, learned x4 upsampling 0.042 / 0.035, mask 0.017 / 0.017; engine rest
(tiles, probability, stitching) 0.037 / 0.026; total 0.82 / 0.37. What is left in swift is about
half full-resolution passes (normalisation, logits, upsampling, mask: 0.16 s) that no narrower
network removes; the 5x of issue 17 needs those cut too (e.g. logits and probability at stride 4
with a cheap final upsampling, or the network only on candidate regions).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
BASELINE = ROOT / "benchmarks" / "baseline" / "default_v1.safetensors"


def read_panels(path: Path) -> list[np.ndarray]:
    import dxtbx

    raw = dxtbx.load(str(path)).get_raw_data()
    raw = raw if isinstance(raw, tuple) else (raw,)
    return [r.as_numpy_array().astype(np.float32) for r in raw]


CLOCK = time.perf_counter


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def speed_up(t_before: float, t_after: float, after: str) -> str:
    """The ratio of two timings and, honestly worded, what it means for ``after``: "1.31 (bf16
    1.31x faster)", "0.78 (default 1.28x slower)"."""
    ratio = t_before / t_after
    if ratio >= 1:
        return f"{ratio:.2f} ({after} {ratio:.2f}x faster)"
    return f"{ratio:.2f} ({after} {1 / ratio:.2f}x slower)"


def model_seconds(model, panels: list[np.ndarray], repeat: int) -> float:
    import torch

    def run() -> None:
        with torch.inference_mode():
            for p in panels:
                model(torch.from_numpy(p)[None, None])
    return best_of(run, repeat)


def dials_seconds(panels: list[np.ndarray], repeat: int) -> float:
    from dials.algorithms.image.threshold import DispersionThreshold
    from dials.array_family import flex

    data = [flex.double(p.astype(np.float64)) for p in panels]
    masks = [flex.bool(np.ones(p.shape, bool)) for p in panels]
    algos = [DispersionThreshold(p.shape, (3, 3), 6.0, 3.0, 0.0, 2) for p in panels]

    def run() -> None:
        for algo, d, m in zip(algos, data, masks, strict=True):
            out = flex.bool(flex.grid(d.all()))
            algo(d, m, out)
    return best_of(run, repeat)


def flops_per_mpx(name: str) -> tuple[float, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peaknet_xtal.model import create_model

    with torch.device("meta"):
        model = create_model(name).eval()
        x = torch.zeros(1, 1, 256, 256)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        feats = model.neck(model.backbone(x))
        model.head(feats, (256, 256))
    return params, counter.get_total_flops() / (256 * 256 / 1e6)


def profile_stages(engine, panels: list[np.ndarray], repeat: int) -> dict[str, float]:
    """CPU seconds per stage of one frame through ``engine`` (a PeakNet, fused as the engine
    runs it), timed by hooks on the model's own modules, so the profile follows whichever path
    the engine takes (``peak_logit`` today); what is left of the engine's time (tiling,
    batching, the peak probability, stitching) is its own line, and what is left of the head's
    (its stride-4 logits, bilinear and learned x4 upsampling to full resolution) is the head's.
    """
    model = engine.model()
    times: dict[str, float] = {}
    started: dict[int, float] = {}
    stages = [("backbone stem (stride 4)", model.backbone.stem)]
    for i, stage in enumerate(model.backbone.stages):
        key = f"backbone stage {i + 1} (stride {4 * 2 ** i})"
        if i > 0:
            stages.append((key, model.backbone.downsamples[i - 1]))
        stages += [(key, stage), (key, model.backbone.out_norms[i])]
    stages.append(("neck (BiFPN)", model.neck))
    stages += [("head branches (to stride 4)", b) for b in model.head.branches]
    stages.append(("head", model.head))

    def before(module, args):
        started[id(module)] = time.process_time()

    def after(key):
        def hook(module, args, out):
            times[key] = times.get(key, 0.0) + time.process_time() - started.pop(id(module))
        return hook

    handles = []
    for key, module in stages:
        handles += [module.register_forward_pre_hook(before),
                    module.register_forward_hook(after(key))]
    # the model's own input normalisation, wherever it runs (the engine calls it on whole
    # panels for a local normalisation; a global one runs per tile inside the model)
    normalise_input = model.normalise

    def normalise(*args, **kwargs):
        start = time.process_time()
        out = normalise_input(*args, **kwargs)
        times["input normalisation"] = (times.get("input normalisation", 0.0)
                                        + time.process_time() - start)
        return out

    best: tuple[float, dict[str, float]] | None = None
    model.normalise = normalise
    try:
        for _ in range(repeat):
            times.clear()
            start = time.process_time()
            engine.predict_panels(panels)
            total = time.process_time() - start
            if best is None or total < best[0]:
                best = (total, dict(times))
    finally:
        del model.normalise
        for handle in handles:
            handle.remove()
    assert best is not None
    total, times = best
    head = times.pop("head", 0.0) - times.get("head branches (to stride 4)", 0.0)
    times["head logits + x4 upsampling (full res.)"] = head
    times["engine rest (tiles, probability, stitching)"] = total - sum(times.values())
    times["total"] = total
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also print CPU seconds per model stage on the CSPAD frame")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--model", default="default",
                        help="the model to time as the default (a weights path for a candidate)")
    args = parser.parse_args()

    import torch

    from peaknet_xtal.finding.engine import InferenceEngine
    from peaknet_xtal.model import list_models, load_model
    from peaknet_xtal.model.fast import fuse_for_inference

    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), best of {args.repeat}, {args.clock} clock")
    trained = {"default": load_model(args.model)}
    if BASELINE.exists():
        trained["previous"] = load_model(str(BASELINE))
    models, engines = {}, {}
    for name, model in trained.items():
        models[name] = model
        models[f"{name}, fused"] = fuse_for_inference(model)
        # The finding engine's own path (whole-panel normalisation, tiling, batches of 8 tiles,
        # stitching): as trained (fast=False) and in the fused form it uses on a CPU.
        engines[f"{name}, engine"] = InferenceEngine(model, device="cpu", threads=args.threads,
                                                     fast=False)
        engines[f"{name}, engine fused"] = InferenceEngine(model, device="cpu",
                                                           threads=args.threads)
    # the opt-in bfloat16 network (finding.settings.PRECISIONS), the default model only
    engines["default, engine fused bf16"] = InferenceEngine(trained["default"], device="cpu",
                                                            threads=args.threads,
                                                            precision="bf16")
    frames = {
        "CSPAD 2.3 Mpx": sorted((REAL / "cspad_thermolysin_stills").glob("*.cbf"))[0],
        "Pilatus 6M": sorted((REAL / "pilatus6m_thaumatin_grid").glob("*"))[0],
    }
    print(f"{'model':25s} {'frame':14s} {'Mpx':>5s} {'model s':>8s} {'DIALS s':>8s} "
          f"{'ratio':>6s}")
    for label, path in frames.items():
        panels = read_panels(path)
        mpx = sum(p.size for p in panels) / 1e6
        try:
            t_dials = dials_seconds(panels, args.repeat)
        except Exception as exc:  # DIALS missing: still report the model
            print(f"  (DIALS dispersion unavailable: {exc})")
            t_dials = float("nan")
        seconds = {}
        for name, model in models.items():
            seconds[name] = model_seconds(model, panels, args.repeat)
        for name, engine in engines.items():
            seconds[name] = best_of(lambda e=engine, p=panels: e.predict_panels(p), args.repeat)
        for name, t_model in seconds.items():
            print(f"{name:25s} {label:14s} {mpx:5.2f} {t_model:8.3f} {t_dials:8.3f} "
                  f"{t_model / t_dials:6.1f}x")
        print(f"  default, engine fused, fp32 / bf16 on {label}: "
              + speed_up(seconds["default, engine fused"], seconds["default, engine fused bf16"],
                         "bf16"))
        if "previous" in trained:
            for way in ("", ", fused", ", engine", ", engine fused"):
                print(f"  previous / default{way} on {label}: "
                      + speed_up(seconds["previous" + way], seconds["default" + way], "default"))
    if args.profile:
        panels = read_panels(frames["CSPAD 2.3 Mpx"])
        stages = {name: profile_stages(engines[f"{name}, engine fused"], panels, args.repeat)
                  for name in trained}
        keys = list(dict.fromkeys(k for st in sorted(stages.values(), key=len, reverse=True)
                                  for k in st))
        print("\nCPU seconds per stage, CSPAD frame, engine, fused: "
              + "  ".join(f"{name}" for name in stages))
        for key in keys:
            print(f"  {key:46s} " + "  ".join(f"{st.get(key, 0.0):7.3f} s" for st in
                                              stages.values()))
    panel = torch.from_numpy(read_panels(frames["CSPAD 2.3 Mpx"])[0])[None, None]
    for name, model in models.items():
        for batch in (1, 8):
            x = panel.expand(batch, 1, *panel.shape[-2:]).contiguous()
            with torch.inference_mode():
                per_batch = best_of(lambda m=model, x=x: m(x), args.repeat)
            print(f"{name}, batch {batch}: {batch / per_batch:8.1f} images/s "
                  f"(CSPAD panel {tuple(x.shape[-2:])})")
    if not args.skip_sizes:
        print(f"\n{'size':18s} {'params (M)':>11s} {'GFLOP/Mpx':>10s}")
        for name in list_models():
            params, flops = flops_per_mpx(name)
            print(f"{name:18s} {params / 1e6:11.2f} {flops / 1e9:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
