"""Pipeline benchmark: Ray pipeline vs the bare in-process loop on the same frames and hardware.

Measures, on one stack of simulated frames written to a CXI file:

1. the bare loops in one process: ``InferenceEngine.find_frames`` on frames in memory, and
   read -> model -> ``CXIWriter`` in series;
2. the pipeline with 1 worker: overhead = bare model-only frames/s / pipeline frames/s - 1
   (target <= 10 %; the model-only loop on frames already in memory is the strict baseline);
3. the pipeline with 2 workers: speed-up over 1 worker;
4. a long run (default 10,000 small frames): total RSS of the driver and every Ray process at
   the start and at the end, to show memory stays flat (back-pressure, nothing accumulates).

Pipeline rates are steady-state (from the live monitor samples between 10 % and 90 % of the
frames out), so Ray start-up and actor creation are reported apart, not folded into the ratio.

    python benchmarks/bench_pipeline.py [--frames 400] [--size 128] [--long-frames 10000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import run_pipeline
from peaknet_xtal.pipeline.ray_session import ray_session


def make_stack(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """Poisson background plus 5-30 Gaussian spots per frame, written in blocks (flat memory)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("/entry_1/data_1/data", shape=(n, size, size), dtype=np.float32,
                               chunks=(1, size, size))
        for start in range(0, n, 256):
            block = rng.poisson(3.0, size=(min(256, n - start), size, size)).astype(np.float32)
            for frame in block:
                for y, x, amp in zip(*rng.uniform(4, size - 4, (2, rng.integers(5, 30))),
                                     rng.uniform(50, 500, 30), strict=False):
                    frame += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.0)
            ds[start:start + len(block)] = block
    return path


def bare_loops(path: Path, out: Path, engine_options: dict, batch: int) -> tuple[float, float]:
    """Frames/s in this process: model alone on frames already in memory (the strict baseline),
    and read -> model -> write in series (what a single-process run does)."""
    from peaknet_xtal.finding.engine import InferenceEngine

    engine = InferenceEngine(**engine_options)
    frames = list(CXISource(path))
    list(engine.find_frames(frames[:1]))  # load the model outside the timing, like a warm worker
    t0 = time.perf_counter()
    for start in range(0, len(frames), batch):
        list(engine.find_frames(frames[start:start + batch]))
    model_only = len(frames) / (time.perf_counter() - t0)
    del frames
    source = iter(CXISource(path))
    writer = CXIWriter(out, frames_per_file=1000)
    t0, n = time.perf_counter(), 0
    while chunk := [f for _, f in zip(range(batch), source, strict=False)]:
        for result in engine.find_frames(chunk):
            writer.write(result)
        n += len(chunk)
    writer.close()
    return model_only, n / (time.perf_counter() - t0)


def steady_rate(summary: dict) -> float:
    """Frames/s between 10 % and 90 % of the frames out (start-up and drain excluded)."""
    samples = summary["samples"]
    total = samples[-1]["frames_out"]
    window = [s for s in samples if 0.1 * total <= s["frames_out"] <= 0.9 * total]
    if len(window) < 2:
        return summary["mean_out_per_s"]
    return (window[-1]["frames_out"] - window[0]["frames_out"]) / (window[-1]["t"] - window[0]["t"])


def pipeline(path: Path, out: Path, workers: int, engine_options: dict, batch: int) -> dict:
    cfg = {"inputs": [str(path)], "source_kind": None, "output": str(out),
           "writer": CXIWriter, "writer_options": {"frames_per_file": 1000},
           "workers": workers, "threads_per_worker": 1, "batch_size": batch,
           "frame_finder_options": engine_options, "model": engine_options["model"],
           "progress": True, "monitor_interval": 0.5}
    cfg["inputs"] = [{"path": str(path), "kind": CXISource}]
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    summary["wall_s"] = time.perf_counter() - t0
    summary["steady_per_s"] = steady_rate(summary)
    return summary


def tree_rss() -> float:
    """MiB resident in this process and all its descendants (the local Ray processes)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def long_run(path: Path, out: Path, engine_options: dict, batch: int) -> dict:
    """RSS of the whole process tree sampled every second through a 2-worker run."""
    trace: list[tuple[float, int, float]] = []
    stop = threading.Event()
    live = Path(f"{out}.pipeline.json")

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.wait(1.0):
            try:
                done = json.loads(live.read_text())["frames_out"]
            except (OSError, ValueError, KeyError):
                done = 0
            trace.append((time.perf_counter() - t0, done, tree_rss()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    summary = pipeline(path, out, 2, engine_options, batch)
    stop.set()
    thread.join()
    started = [rss for _, done, rss in trace if done > 0]
    return {"frames": summary["frames_out"], "steady_per_s": summary["steady_per_s"],
            "rss_start_mib": started[0] if started else float("nan"),
            "rss_end_mib": started[-1] if started else float("nan"),
            "rss_peak_mib": max(started) if started else float("nan"),
            "peak_queue_depth": summary["peak_queue_depth"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--long-frames", type=int, default=10000)
    parser.add_argument("--long-size", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    engine_options = {"model": args.model, "device": "cpu", "threads": 1}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        stack = make_stack(tmp / "frames.h5", args.frames, args.size)
        bare, serial = bare_loops(stack, tmp / "bare" / "bare.cxi", engine_options, args.batch)
        print(f"bare model loop: {bare:.1f} frames/s; read+model+write: {serial:.1f}", flush=True)
        with ray_session(num_cpus=args.num_cpus):
            one = pipeline(stack, tmp / "one" / "one.cxi", 1, engine_options, args.batch)
            two = pipeline(stack, tmp / "two" / "two.cxi", 2, engine_options, args.batch)
            report = {"frames": args.frames, "size": args.size, "bare_per_s": round(bare, 2),
                      "bare_read_model_write_per_s": round(serial, 2),
                      "one_worker_per_s": round(one["steady_per_s"], 2),
                      "one_worker_wall_s": round(one["wall_s"], 2),
                      "overhead_1_worker": round(bare / one["steady_per_s"] - 1, 4),
                      "two_workers_per_s": round(two["steady_per_s"], 2),
                      "speedup_2_vs_1": round(two["steady_per_s"] / one["steady_per_s"], 3)}
            print(json.dumps(report, indent=2), flush=True)
            if args.long_frames:
                long_stack = make_stack(tmp / "long.h5", args.long_frames, args.long_size, seed=1)
                report["long_run"] = long_run(long_stack, tmp / "long" / "long.cxi",
                                              engine_options, args.batch)
                print(json.dumps(report["long_run"], indent=2), flush=True)
    target = report["overhead_1_worker"] <= 0.10
    print(f"overhead {100 * report['overhead_1_worker']:.1f}% "
          f"({'within' if target else 'above'} the 10% target); "
          f"2 workers {report['speedup_2_vs_1']:.2f}x 1 worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
