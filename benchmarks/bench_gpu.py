"""GPU throughput: frames/s and GPU memory per detector size, model, precision and batch size.

Measured, on any CUDA machine, for each model (``--models``: the shipped default and the
paper-size atto student, ``student-atto-b2``) and detector size (``--mpx``: 1, 2, 4 and 16
megapixels, square single panels, synthetic Poisson background with Gaussian spots):

- **model**: the engine's segmentation alone (tiling, batching, model, stitching), frames in
  GPU-bound batches;
- **engine**: ``InferenceEngine.find_frames`` end to end in one process (segmentation, then peak
  finding, gain and defect filtering on the CPU);
- **ray**: the Ray pipeline (``peaknet_xtal.pipeline``) with one GPU worker reading an HDF5 stack
  and writing CXI, steady state (start-up left out);

for float32 and, under ``torch.autocast``, bfloat16 (where the GPU supports it) and float16, at
batch sizes doubling from 1 until memory runs out or ``--max-batch``.  A reduced precision counts
as right only when its peak tables match float32's (same peak count within 1 %, positions within
0.5 px); the table says so.  GPU memory is torch's peak allocation per configuration.

Printed at the end: the best end-to-end frames/s for 2-Mpx frames with the default model against
the target of 1,000 frames/s on one H100-class GPU, and every configuration against the
reference system's published 4.6 frames/s per L40S GPU.

``--dry-run`` runs on the CPU with tiny frames (64 x 64), batch sizes 1-2 and without Ray
(``--ray-in-dry-run`` adds it), and first prints the plan of what a real run would measure; CI
runs both (tests/benchmarks).

Example (CUDA machine):
  python benchmarks/bench_gpu.py --frames 64
  python benchmarks/bench_gpu.py --dry-run
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Published throughput of the reference system: frames/s per NVIDIA L40S.
REFERENCE_PER_L40S = 4.6
#: Target: frames/s of 2-Mpx frames on one H100-class GPU, default model, end to end.
TARGET_2MPX = 1000.0
PAPER_MODEL = "student-atto-b2"
PRECISIONS = ("fp32", "bf16", "fp16")
#: The engine's default tiling (a batch of N frames is N x tiles-per-frame model tiles).
TILE, OVERLAP = 1024, 64


@dataclass
class Row:
    model: str
    mpx: float
    side: int
    path: str  # model, engine or ray
    precision: str
    batch: int
    frames_per_s: float
    gpu_mib: float
    agrees: bool | None = None  # reduced precision: peaks match float32's


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _module_class() -> type:
    import torch

    class Autocast(torch.nn.Module):
        """The model under ``torch.autocast`` (why a module: the Ray workers get it whole)."""

        def __init__(self, inner: Any, precision: str) -> None:
            super().__init__()
            self.inner = inner
            self.precision = precision

        def forward(self, x: Any, mask: Any = None) -> Any:
            return self._autocast(self.inner, x, mask)

        def peak_logit(self, x: Any, mask: Any = None) -> Any:
            """The inner model's one-channel peak logit (what the engine asks for)."""
            return self._autocast(self.inner.peak_logit, x, mask)

        def _autocast(self, run: Any, x: Any, mask: Any) -> Any:
            dtype = torch_dtype(self.precision)
            if dtype is None:
                return run(x, mask)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return run(x, mask)

    return Autocast


def build_model(name: str, precision: str) -> Any:
    """The named model (shipped weights for ``default``, seed-0 initialisation otherwise: the
    speed does not depend on the weights), wrapped for the precision."""
    import torch

    from peaknet_xtal.model import load_model
    from peaknet_xtal.model.zoo import create_model

    if name == "default":
        model = load_model("default")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(name)
    return _module_class()(model.eval(), precision)


def autocast_engine(model: str, device: str, threads: int, precision: str = "fp32",
                    **options: Any) -> Any:
    """Predictor factory for the Ray pipeline: an engine over the wrapped model, built in the
    worker (defined in the script, so Ray ships it by value)."""
    from peaknet_xtal.finding.engine import InferenceEngine

    return InferenceEngine(build_model(model, precision), device=device, threads=threads,
                           **options)


def synthetic_frames(side: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """Poisson background (about 1 photon) with 50-200 Gaussian spots per frame, float32."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        image = rng.poisson(1.0, (side, side)).astype(np.float32)
        n = int(rng.integers(50, 200))
        ys, xs = rng.integers(4, side - 4, (2, n))
        for y, x, amp in zip(ys, xs, rng.uniform(30, 300, n), strict=True):
            yy, xx = np.mgrid[y - 3:y + 4, x - 3:x + 4]
            image[y - 3:y + 4, x - 3:x + 4] += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2)
                                                            / 2.0)
        frames.append(image)
    return frames


def side_for(mpx: float) -> int:
    """Side of a square frame of about ``mpx`` megapixels, a multiple of 32 (rounded up)."""
    return max(64, math.ceil(math.sqrt(mpx * 1e6) / 32) * 32)


def gpu_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return float("nan")


def is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def measure_engine(name: str, precision: str, batch: int, frames: list[np.ndarray],
                   device: str, threads: int | None) -> tuple[float, float, float, Any]:
    """(model-only frames/s, end-to-end frames/s, peak GPU MiB, peak tables) for one config."""
    from peaknet_xtal.finding.engine import InferenceEngine, tile_panel
    from peaknet_xtal.types import Frame

    tiles = len(tile_panel((frames[0].shape[0], frames[0].shape[1]), TILE, OVERLAP))
    engine = InferenceEngine(build_model(name, precision), device=device, threads=threads,
                             batch_size=batch * tiles, min_snr=3.0, adu_per_photon=1.0)
    gpu_reset(device)
    engine.predict_panels(frames[:batch])  # warm-up: load, cuDNN autotuning
    start = time.perf_counter()
    done = 0
    for first in range(0, len(frames) - batch + 1, batch):
        engine.predict_panels(frames[first:first + batch])
        done += batch
    model_rate = done / (time.perf_counter() - start)
    stream = [Frame(panels=[f], serial=i) for i, f in enumerate(frames)]
    start = time.perf_counter()
    results = list(engine.find_frames(stream))
    e2e_rate = len(results) / (time.perf_counter() - start)
    return model_rate, e2e_rate, gpu_mib(device), [r.peaks for r in results]


def agree(peaks: list[Any], reference: list[Any]) -> bool:
    """Same peak count within 1 % and every matched position within 0.5 px, frame by frame."""
    for a, b in zip(peaks, reference, strict=True):
        if abs(len(a) - len(b)) > max(1, 0.01 * len(b)):
            return False
        if len(a) and len(b):
            pa = np.stack([a["ss"], a["fs"]], 1)
            pb = np.stack([b["ss"], b["fs"]], 1)
            nearest = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1)
            if np.mean(nearest <= 0.5) < 0.99:
                return False
    return True


def measure_ray(name: str, precision: str, batch: int, frames: list[np.ndarray], device: str,
                work: Path) -> float:
    """Steady-state frames/s of the Ray pipeline with one worker on ``device``."""
    import h5py

    from peaknet_xtal.finding.engine import tile_panel
    from peaknet_xtal.formats.cxi import CXISource
    from peaknet_xtal.pipeline import run_pipeline

    stack = work / f"stack_{frames[0].shape[0]}.h5"
    if not stack.exists():
        with h5py.File(stack, "w") as h5:
            h5.create_dataset("/entry_1/data_1/data", data=np.stack(frames),
                              chunks=(1, *frames[0].shape))
    out = work / f"ray_{name}_{precision}_{batch}_{time.monotonic_ns()}" / "out.cxi"
    tiles = len(tile_panel((frames[0].shape[0], frames[0].shape[1]), TILE, OVERLAP))
    if __name__ != "__main__":  # imported (tests): Ray workers cannot import this script by name
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    summary = run_pipeline({
        "inputs": [{"path": str(stack), "kind": CXISource}], "output": str(out),
        "writer_options": {"frames_per_file": 1000}, "workers": 1, "threads_per_worker": 2,
        "predictor": autocast_engine, "model": name, "device": device, "batch_size": batch,
        "predictor_options": {"model": name, "device": device, "threads": 2,
                              "precision": precision, "batch_size": batch * tiles,
                              "min_snr": 3.0, "adu_per_photon": 1.0},
        "progress": False, "monitor_interval": 0.25, "resume": False})
    samples = summary["samples"]
    total = samples[-1]["frames_out"] if samples else 0
    window = [s for s in samples if 0.1 * total <= s["frames_out"] <= 0.9 * total]
    if len(window) >= 2 and window[-1]["t"] > window[0]["t"]:
        return float((window[-1]["frames_out"] - window[0]["frames_out"])
                     / (window[-1]["t"] - window[0]["t"]))
    return float(summary.get("mean_out_per_s", float("nan")))


def plan(args: argparse.Namespace, device: str, precisions: list[str]) -> None:
    print(f"plan: device {device}; models {args.models}; sizes (Mpx) {args.mpx} -> sides "
          f"{[side_for(m) for m in args.mpx]}; precisions {precisions}; batch sizes 1, 2, 4, ... "
          f"up to {args.max_batch} or out of memory; {args.frames} frames per measurement; "
          f"paths: model-only, engine end to end"
          f"{'' if args.no_ray else ', Ray pipeline (1 GPU worker, best batch per precision)'}")
    print(f"reference: {REFERENCE_PER_L40S} frames/s per L40S (published); target: "
          f"{TARGET_2MPX:.0f} frames/s of 2-Mpx frames, default model, end to end, one H100")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", PAPER_MODEL])
    parser.add_argument("--mpx", type=float, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--frames", type=int, default=64, help="frames per measurement")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch (frames)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, help="CPU threads for peak finding")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray pipeline")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--ray-in-dry-run", action="store_true",
                        help="with --dry-run: run the Ray pipeline too (a local Ray on the CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, 64 x 64 frames, batches 1-2, no Ray: check the script runs")
    args = parser.parse_args(argv)
    import torch

    if args.dry_run:
        args.device, args.mpx, args.frames, args.max_batch = "cpu", [64 * 64 / 1e6], 2, 2
        args.no_ray = not args.ray_in_dry_run
        args.threads = args.threads or 1
    elif not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; use --dry-run to check the script on a CPU")
        return 2
    device = args.device
    precisions = [p for p in args.precisions
                  if p == "fp32" or device == "cpu" and p == "bf16"
                  or device.startswith("cuda") and (p != "bf16" or torch.cuda.is_bf16_supported())]
    plan(args, device, precisions)
    if device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}, "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        for mpx in args.mpx:
            side = side_for(mpx)
            frames = synthetic_frames(side, args.frames)
            for name in args.models:
                reference: list[Any] | None = None
                for precision in precisions:
                    best: tuple[float, int] = (0.0, 1)
                    batch = 1
                    while batch <= min(args.max_batch, args.frames):
                        try:
                            model_rate, e2e, mib, peaks = measure_engine(
                                name, precision, batch, frames, device, args.threads)
                        except (RuntimeError, MemoryError) as exc:
                            if not is_oom(exc):
                                raise
                            print(f"  {name} {mpx:g} Mpx {precision} batch {batch}: out of "
                                  "memory")
                            break
                        if precision == "fp32" and reference is None:
                            reference = peaks
                        ok = None if precision == "fp32" or reference is None else agree(
                            peaks, reference)
                        for path, rate in (("model", model_rate), ("engine", e2e)):
                            rows.append(Row(name, mpx, side, path, precision, batch, rate, mib,
                                            ok))
                        verdict = ("" if ok is None else ", peaks match fp32" if ok
                                   else ", PEAKS DIFFER from fp32: not used")
                        print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {batch:3d}: "
                              f"model {model_rate:8.2f} fr/s, engine {e2e:8.2f} fr/s, "
                              f"GPU {mib:8.0f} MiB{verdict}", flush=True)
                        best = max(best, (e2e, batch))
                        batch *= 2
                    if not args.no_ray:
                        rate = measure_ray(name, precision, best[1], frames, device, work)
                        rows.append(Row(name, mpx, side, "ray", precision, best[1], rate,
                                        float("nan")))
                        print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {best[1]:3d}: "
                              f"Ray pipeline {rate:8.2f} fr/s", flush=True)
    summarise(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def summarise(rows: list[Row]) -> None:
    print("\nbest frames/s per model, size and path (precision, batch), and x the reference's "
          f"{REFERENCE_PER_L40S}/s per L40S:")
    keys = sorted({(r.model, r.mpx, r.path) for r in rows})
    for model, mpx, path in keys:
        mine = [r for r in rows if (r.model, r.mpx, r.path) == (model, mpx, path)
                and r.agrees is not False]
        if not mine:
            continue
        top = max(mine, key=lambda r: r.frames_per_s)
        print(f"  {model:<16} {mpx:6.3g} Mpx {path:<6}: {top.frames_per_s:9.2f} fr/s "
              f"({top.precision}, batch {top.batch}, {top.gpu_mib:.0f} MiB) = "
              f"{top.frames_per_s / REFERENCE_PER_L40S:7.2f}x reference")
    target = [r for r in rows if r.model == "default" and abs(r.mpx - 2) < 0.25
              and r.path in ("engine", "ray") and r.agrees is not False]
    if target:
        top = max(target, key=lambda r: r.frames_per_s)
        print(f"2-Mpx default model end to end: {top.frames_per_s:.1f} fr/s ({top.path}) = "
              f"{top.frames_per_s / TARGET_2MPX:.3f} of the {TARGET_2MPX:.0f} fr/s target")
    else:
        print(f"2-Mpx default model end to end: not measured in this run (target "
              f"{TARGET_2MPX:.0f} fr/s on one H100-class GPU)")


if __name__ == "__main__":
    sys.exit(main())
