"""GPU throughput: frames/s and GPU memory per detector size, model, precision and batch size.

Measured, on any CUDA machine, for each model (``--models``: the shipped default and the
paper-size atto student, ``student-atto-b2``) and detector size (``--mpx``: 1, 2, 4 and 16
megapixels, square single panels, synthetic Poisson background with Gaussian spots):

- **model**: the engine's segmentation alone (normalisation, tiling, batching, model,
  stitching, probability maps back on the host), at batch sizes doubling from 1 frame until
  memory runs out or ``--max-batch``; GPU memory is torch's peak allocation;
- **engine**: ``InferenceEngine.find_frames`` end to end in one process at each precision's
  fastest batch (segmentation, then peak finding, gain and defect filtering on the host); the
  difference to the model path is printed as the host's time per frame;
- **ray x N**: the Ray pipeline (``peaknet_xtal.pipeline``) reading an HDF5 stack and writing
  CXI with N model workers sharing the GPU (``gpus_per_worker`` 1/N, each its own model), at
  the fastest right precision and batch, steady state (start-up left out), for ``--ray-mpx``;

for float32 and, under ``torch.autocast``, bfloat16 (where the GPU supports it) and float16.  A
reduced precision counts as right only when its peak tables match float32's (same peak count
within 1 %, positions within 0.5 px); the table says so.  The rows are saved after each
measurement (``--json``) and ``--budget-s`` stops starting new ones, so a run on borrowed GPU
time always ends with what it measured.

Printed at the end: the best end-to-end frames/s for 2-Mpx frames with the default model against
the target of 1,000 frames/s on one H100-class GPU, and every configuration against the
reference system's published 4.6 frames/s per L40S GPU.

``--dry-run`` runs on the CPU with tiny frames (64 x 64), batch sizes 1-2 and without Ray
(``--ray-in-dry-run`` adds it), and first prints the plan of what a real run would measure; CI
runs both (tests/benchmarks).

Example (CUDA machine):
  python benchmarks/bench_gpu.py --json gpu.json
  python benchmarks/bench_gpu.py --dry-run
"""
from __future__ import annotations

import argparse
import json
import math
import os
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


def frame_cuts(side: int) -> list[tuple[int, int, int, int, tuple]]:
    """How the engine's defaults cut a ``side`` x ``side`` frame: one whole panel up to
    ``DEFAULTS.tile_size`` (every size measured here)."""
    from peaknet_xtal.finding.engine import tile_panel
    from peaknet_xtal.finding.settings import DEFAULTS

    return tile_panel((side, side), DEFAULTS.tile_size, DEFAULTS.tile_overlap)


def frame_slots(side: int) -> int:
    """Batch slots one frame takes (``engine.slots``): ``batch_size`` for N whole frames a model
    call is N times this."""
    from peaknet_xtal.finding.engine import slots

    return sum(slots(h, w) for _, _, h, w, _ in frame_cuts(side))


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

        @property
        def config(self) -> dict[str, Any]:
            """The inner model's config (the engine reads its ``input_norm``)."""
            return dict(getattr(self.inner, "config", {}))

        @property
        def pad_multiple(self) -> int:
            return int(getattr(self.inner, "pad_multiple", 1))

        def forward(self, x: Any, mask: Any = None, **kw: Any) -> Any:
            return self._autocast(self.inner, x, mask, **kw)

        def peak_logit(self, x: Any, mask: Any = None, **kw: Any) -> Any:
            """The inner model's one-channel peak logit (what the engine asks for)."""
            return self._autocast(self.inner.peak_logit, x, mask, **kw)

        def normalise(self, x: Any, valid: Any) -> Any:
            """The inner model's input normalisation, in float32 as the engine runs it."""
            return self.inner.normalise(x, valid)

        def _autocast(self, run: Any, x: Any, mask: Any, **kw: Any) -> Any:
            dtype = torch_dtype(self.precision)
            if dtype is None:
                return run(x, mask, **kw)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return run(x, mask, **kw)

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


def make_engine(name: str, precision: str, batch: int, side: int, device: str,
                threads: int | None) -> Any:
    """An engine batching ``batch`` whole frames of ``side`` x ``side`` per model call."""
    from peaknet_xtal.finding.engine import InferenceEngine

    return InferenceEngine(build_model(name, precision), device=device, threads=threads,
                           batch_size=batch * frame_slots(side), min_snr=3.0,
                           adu_per_photon=1.0)


def measure_model(name: str, precision: str, batch: int, frames: list[np.ndarray], device: str,
                  threads: int | None) -> tuple[float, float]:
    """(frames/s, peak GPU MiB) of the engine's segmentation alone (normalise, tile, model,
    stitch; the probability maps back on the host), ``batch`` frames a call."""
    engine = make_engine(name, precision, batch, frames[0].shape[0], device, threads)
    gpu_reset(device)
    engine.predict_panels(frames[:batch])  # warm-up: load, cuDNN's algorithm choice
    sync(device)
    start = time.perf_counter()
    done = 0
    for first in range(0, len(frames) - batch + 1, batch):
        engine.predict_panels(frames[first:first + batch])
        done += batch
    sync(device)
    return done / (time.perf_counter() - start), gpu_mib(device)


def measure_stages(name: str, precision: str, batch: int, side: int, device: str,
                   repeats: int = 5) -> tuple[float, float]:
    """Frames/s of two stages alone, on inputs already on ``device``: the network on the tiles
    of ``batch`` frames, and the whole-panel input normalisation of ``batch`` frames (for a
    locally normalised model; NaN otherwise).  Against the segmentation path they say how much
    of it is the GPU's work and how much the host's."""
    import torch

    from peaknet_xtal.finding.engine import _padded

    model = build_model(name, precision).to(device)
    local = model.config.get("input_norm") == "local"
    cuts = frame_cuts(side)
    height, width = _padded(cuts[0][2], cuts[0][3], model.pad_multiple)
    generator = torch.Generator().manual_seed(0)
    tiles = torch.poisson(torch.full((batch * len(cuts), 1, height, width), 1.0),
                          generator=generator).to(device)
    mask = torch.ones_like(tiles, dtype=torch.bool)
    frames = torch.poisson(torch.full((batch, 1, side, side), 1.0), generator=generator).to(device)
    valid = torch.ones_like(frames, dtype=torch.bool)

    def rate(step: Any) -> float:
        with torch.inference_mode():
            step()  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            sync(device)
        return batch * repeats / (time.perf_counter() - start)

    network = rate(lambda: model.peak_logit(tiles, mask, **({"normalised": True} if local
                                                             else {})))
    normalise = rate(lambda: model.normalise(frames, valid)) if local else float("nan")
    return network, normalise


def measure_end_to_end(name: str, precision: str, batch: int, frames: list[np.ndarray],
                       device: str, threads: int | None) -> tuple[float, list[Any]]:
    """(frames/s, peak tables) of ``InferenceEngine.find_frames``: segmentation on ``device``,
    then peak finding, gain and defect filtering on the host, one process."""
    from peaknet_xtal.types import Frame

    engine = make_engine(name, precision, batch, frames[0].shape[0], device, threads)
    engine.predict_panels(frames[:1])  # load outside the timing
    stream = [Frame(panels=[f], serial=i) for i, f in enumerate(frames)]
    start = time.perf_counter()
    results = list(engine.find_frames(stream))
    return len(results) / (time.perf_counter() - start), [r.peaks for r in results]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
                workers: int, threads: int, count: int, work: Path) -> float:
    """Steady-state frames/s of the Ray pipeline reading ``count`` frames (``frames`` repeated)
    from an HDF5 stack and writing CXI, with ``workers`` model workers sharing ``device``: each
    holds its own model and ``1/workers`` of the GPU, so the host-side peak finding of one
    overlaps the others' segmentation."""
    import h5py

    from peaknet_xtal.formats.cxi import CXISource
    from peaknet_xtal.pipeline import run_pipeline

    side = frames[0].shape[0]
    stack = work / f"stack_{side}_{count}.h5"
    if not stack.exists():  # ``frames`` once, and a virtual dataset repeating them
        with h5py.File(stack, "w") as h5:
            h5.create_dataset("frames", data=np.stack(frames), chunks=(1, side, side))
            layout = h5py.VirtualLayout((count, side, side), np.float32)
            unique = h5py.VirtualSource(".", "frames", (len(frames), side, side))
            for i in range(count):
                layout[i] = unique[i % len(frames)]
            h5.create_virtual_dataset("/entry_1/data_1/data", layout)
    out = work / f"ray_{name}_{precision}_{batch}_{workers}_{time.monotonic_ns()}" / "out.cxi"
    if __name__ != "__main__":  # imported (tests): Ray workers cannot import this script by name
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cuda = device.startswith("cuda")
    summary = run_pipeline({
        "inputs": [{"path": str(stack), "kind": CXISource}], "output": str(out),
        "writer_options": {"frames_per_file": 1000}, "workers": workers,
        "threads_per_worker": threads, "gpus_per_worker": 1.0 / workers if cuda else 0,
        "frame_finder": autocast_engine, "device": device, "batch_size": batch,
        "frame_finder_options": {"model": name, "device": device, "threads": threads,
                                 "precision": precision, "batch_size": batch * frame_slots(side),
                                 "min_snr": 3.0, "adu_per_photon": 1.0},
        "progress": False, "monitor_interval": 0.25, "resume": False})
    busy = sorted(float(w.get("busy_fraction", 0.0)) for w in summary["workers"].values())
    if busy:
        print(f"    Ray workers busy {100 * busy[0]:.0f}-{100 * busy[-1]:.0f} % of the time "
              "(low: the workers wait for frames)", flush=True)
    samples = summary["samples"]
    total = samples[-1]["frames_out"] if samples else 0
    window = [s for s in samples if 0.1 * total <= s["frames_out"] <= 0.9 * total]
    if len(window) >= 2 and window[-1]["t"] > window[0]["t"]:
        return float((window[-1]["frames_out"] - window[0]["frames_out"])
                     / (window[-1]["t"] - window[0]["t"]))
    return float(summary.get("mean_out_per_s", float("nan")))


def plan(args: argparse.Namespace, device: str, precisions: list[str]) -> None:
    print(f"plan: device {device}; models {args.models}; sizes (Mpx) {args.mpx} -> sides "
          f"{[side_for(m) for m in args.mpx]}; precisions {precisions}; segmentation alone at "
          f"batch sizes 1, 2, 4, ... up to {args.max_batch} frames or out of memory "
          f"({args.frames} frames each); end to end at each precision's fastest batch "
          f"({args.e2e_frames} frames)"
          + ("" if args.no_ray else
             f"; Ray pipeline at {args.ray_mpx} Mpx with {args.ray_workers} workers sharing the "
             f"device (64 frames a worker, at most {args.ray_frames})")
          + (f"; stops measuring after {args.budget_s:.0f} s" if args.budget_s is not None else ""))
    print(f"reference: {REFERENCE_PER_L40S} frames/s per L40S (published); target: "
          f"{TARGET_2MPX:.0f} frames/s of 2-Mpx frames, default model, end to end, one H100")


class Rows:
    """The measurements so far, saved after each one (a run cut short keeps what it measured)."""

    def __init__(self, path: str | None) -> None:
        self.rows: list[Row] = []
        self.path = Path(path) if path else None
        if self.path:
            self.path.write_text("[]")

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if self.path:
            self.path.write_text(json.dumps([asdict(r) for r in self.rows], indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", PAPER_MODEL])
    parser.add_argument("--mpx", type=float, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--frames", type=int, default=32,
                        help="frames per segmentation measurement")
    parser.add_argument("--e2e-frames", type=int, default=8,
                        help="frames per end-to-end measurement")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch (frames)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, help="CPU threads for peak finding")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray pipeline")
    parser.add_argument("--ray-mpx", type=float, nargs="+", default=[2],
                        help="sizes run through the Ray pipeline")
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[1, 12],
                        help="model workers sharing the device, one Ray run each")
    parser.add_argument("--ray-frames", type=int, default=1024,
                        help="most frames per Ray run (64 a worker)")
    parser.add_argument("--budget-s", type=float,
                        help="start no new measurement after this many seconds")
    parser.add_argument("--json", help="write the rows here (after each measurement)")
    parser.add_argument("--ray-in-dry-run", action="store_true",
                        help="with --dry-run: run the Ray pipeline too (a local Ray on the CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, 64 x 64 frames, batches 1-2, no Ray: check the script runs")
    args = parser.parse_args(argv)
    import torch

    if args.dry_run:
        args.device, args.mpx, args.frames, args.max_batch = "cpu", [64 * 64 / 1e6], 2, 2
        args.e2e_frames, args.ray_mpx, args.ray_workers, args.ray_frames = 2, args.mpx, [1], 8
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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"host: {cpus} CPUs; torch {torch.__version__}")
    if device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}, "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    rows = Rows(args.json)
    began = time.perf_counter()

    def out_of_time(what: str) -> bool:
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            print(f"  skipped (time budget of {args.budget_s:.0f} s spent): {what}", flush=True)
            return True
        return False

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        for mpx in args.mpx:
            side = side_for(mpx)
            frames = synthetic_frames(side, max(args.frames, args.e2e_frames))
            for name in args.models:
                reference: list[Any] | None = None
                fastest: dict[str, tuple[float, int]] = {}
                for precision in precisions:
                    best, batch = (0.0, 1), 1
                    while batch <= min(args.max_batch, args.frames):
                        if out_of_time(f"{name} {mpx:g} Mpx {precision} batch {batch}"):
                            break
                        try:
                            rate, mib = measure_model(name, precision, batch,
                                                      frames[:args.frames], device, args.threads)
                        except (RuntimeError, MemoryError) as exc:
                            if not is_oom(exc):
                                raise
                            print(f"  {name} {mpx:g} Mpx {precision} batch {batch}: out of "
                                  "memory", flush=True)
                            break
                        rows.add(Row(name, mpx, side, "model", precision, batch, rate, mib))
                        memory = "" if math.isnan(mib) else f", GPU {mib:8.0f} MiB"
                        print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {batch:3d}: "
                              f"segmentation {rate:8.2f} fr/s{memory}", flush=True)
                        best = max(best, (rate, batch))
                        batch *= 2
                    if best[0] == 0 or out_of_time(f"{name} {mpx:g} Mpx {precision} stages"):
                        continue
                    batch = best[1]
                    network, normalise = measure_stages(name, precision, batch, side, device)
                    rows.add(Row(name, mpx, side, "network", precision, batch, network,
                                 float("nan")))
                    if not math.isnan(normalise):
                        rows.add(Row(name, mpx, side, "normalise", precision, batch, normalise,
                                     float("nan")))
                    alone = ("" if math.isnan(normalise) else
                             f", input normalisation alone {normalise:8.2f} fr/s")
                    print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {batch:3d}: network "
                          f"alone {network:8.2f} fr/s{alone} (inputs on the device)", flush=True)
                    if name != "default":
                        print(f"  {name:<16} {mpx:6.3g} Mpx {precision}: end to end not "
                              "measured (no trained weights here: its peaks would say nothing)")
                        continue
                    if out_of_time(f"{name} {mpx:g} Mpx {precision} end to end"):
                        continue
                    rate, peaks = measure_end_to_end(name, precision, batch,
                                                     frames[:args.e2e_frames], device,
                                                     args.threads)
                    if precision == "fp32":
                        reference = peaks
                    ok = None if precision == "fp32" or reference is None else agree(peaks,
                                                                                     reference)
                    rows.add(Row(name, mpx, side, "engine", precision, batch, rate, float("nan"),
                                 ok))
                    if ok is not False:
                        fastest[precision] = (rate, batch)
                    host_ms = 1e3 * (1 / rate - 1 / best[0])
                    verdict = ("" if ok is None else ", peaks match fp32" if ok
                               else ", PEAKS DIFFER from fp32: not used")
                    print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {batch:3d}: end to end "
                          f"{rate:8.2f} fr/s ({host_ms:.0f} ms a frame more than segmentation "
                          f"alone: the host-side peak finding not hidden behind it){verdict}",
                          flush=True)
                if args.no_ray or not fastest or not any(abs(mpx - m) < 1e-9
                                                         for m in args.ray_mpx):
                    continue
                precision = max(fastest, key=lambda p: fastest[p][0])
                batch = fastest[precision][1]
                for workers in args.ray_workers:
                    if out_of_time(f"{name} {mpx:g} Mpx Ray with {workers} workers"):
                        break
                    threads = max(1, (cpus or 1) // workers - 1) if workers > 1 else 2
                    # enough frames a worker that start-up (each worker loads its model on
                    # the GPU when its first frames arrive) is a small part of the run: with 24
                    # a worker, some of 12 workers had none left (busy 0 %, bench_gpu_h200.log)
                    count = min(args.ray_frames, max(64, 64 * workers))
                    rate = measure_ray(name, precision, batch, frames, device, workers,
                                       threads, count, work)
                    rows.add(Row(name, mpx, side, f"ray x{workers}", precision, batch, rate,
                                 float("nan")))
                    print(f"  {name:<16} {mpx:6.3g} Mpx {precision} batch {batch:3d}: Ray "
                          f"pipeline, {workers} worker(s) x {threads} thread(s): {rate:8.2f} fr/s",
                          flush=True)
    summarise(rows.rows, time.perf_counter() - began)
    return 0


def summarise(rows: list[Row], seconds: float) -> None:
    print(f"\n{len(rows)} measurements in {seconds:.0f} s.  Best frames/s per model, size and "
          f"path (precision, batch), and x the reference's {REFERENCE_PER_L40S}/s per L40S:")
    keys = sorted({(r.model, r.mpx, r.path) for r in rows})
    for model, mpx, path in keys:
        mine = [r for r in rows if (r.model, r.mpx, r.path) == (model, mpx, path)
                and r.agrees is not False]
        if not mine:
            continue
        top = max(mine, key=lambda r: r.frames_per_s)
        memory = "" if math.isnan(top.gpu_mib) else f", {top.gpu_mib:.0f} MiB"
        print(f"  {model:<16} {mpx:6.3g} Mpx {path:<7}: {top.frames_per_s:9.2f} fr/s "
              f"({top.precision}, batch {top.batch}{memory}) = "
              f"{top.frames_per_s / REFERENCE_PER_L40S:7.2f}x reference")
    target = [r for r in rows if r.model == "default" and abs(r.mpx - 2) < 0.25
              and (r.path == "engine" or r.path.startswith("ray")) and r.agrees is not False]
    if target:
        top = max(target, key=lambda r: r.frames_per_s)
        print(f"2-Mpx default model end to end: {top.frames_per_s:.1f} fr/s ({top.path}) = "
              f"{top.frames_per_s / TARGET_2MPX:.3f} of the {TARGET_2MPX:.0f} fr/s target")
    else:
        print(f"2-Mpx default model end to end: not measured in this run (target "
              f"{TARGET_2MPX:.0f} fr/s on one H100-class GPU)")


if __name__ == "__main__":
    sys.exit(main())
