"""Stream reading speed: peaknet_xtal.formats.stream.iter_chunks vs a plain line-count pass.

Builds a stream of at least ``--mb`` MB (default 100) in a temporary directory by concatenating the
real streams in ``../shared/data/real/crystfel_streams`` (a concatenated stream, repeated headers
included, is a valid stream), then times, on one core and in the same run:

- baseline: ``for line in file: n += 1`` over the same file (text mode, same buffering);
- reader:   every chunk through ``iter_chunks`` (peaks and reflections converted to numpy).

Prints MB/s of both and their ratio, from CPU time of this process (what one core does; robust
on a shared machine) and from wall-clock time.  Target: the reader at >= 50 MB/s of CPU time.

    python benchmarks/bench_stream_read.py [--mb 100] [--repeat 3] [--streams DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peaknet_xtal.formats.stream import iter_chunks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STREAMS = ROOT.parent / "shared" / "data" / "real" / "crystfel_streams"


def build_stream(sources: list[Path], target_bytes: int, out: Path) -> tuple[int, int]:
    """Concatenate ``sources`` round-robin until ``out`` holds ``target_bytes``; (bytes, copies)."""
    blobs = [p.read_bytes() for p in sources]
    written = copies = 0
    with open(out, "wb") as handle:
        while written < target_bytes:
            blob = blobs[copies % len(blobs)]
            handle.write(blob)
            written += len(blob)
            copies += 1
    return written, copies


def count_lines(path: Path) -> int:
    n = 0
    with open(path, encoding="utf-8", buffering=1 << 20) as handle:
        for _ in handle:
            n += 1
    return n


def read_all(path: Path) -> tuple[int, int, int]:
    chunks = peaks = reflections = 0
    for chunk in iter_chunks(path):
        chunks += 1
        peaks += chunk.n_peaks
        reflections += sum(c.n_reflections for c in chunk.crystals)
    return chunks, peaks, reflections


def best_time(func: Callable[..., object], *args: Any,
              repeat: int) -> tuple[float, float, object]:
    """Best CPU time and best wall time over ``repeat`` runs, and the result."""
    cpu = wall = float("inf")
    result = None
    for _ in range(repeat):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = func(*args)
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    return cpu, wall, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the test stream in MB")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (best is kept)")
    parser.add_argument("--streams", type=Path, default=DEFAULT_STREAMS)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    sources = sorted(args.streams.glob("*.stream"))
    if not sources:
        print(f"no .stream files in {args.streams}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.stream"
        size, copies = build_stream(sources, int(args.mb * 1e6), path)
        mb = size / 1e6
        print(f"stream: {mb:.1f} MB from {copies} copies of {len(sources)} real streams")
        base_cpu, base_wall, lines = best_time(count_lines, path, repeat=args.repeat)
        read_cpu, read_wall, counts = best_time(read_all, path, repeat=args.repeat)
    chunks, peaks, reflections = counts  # type: ignore[misc]
    print(f"baseline line count : {lines:>10,} lines   cpu {mb / base_cpu:8.1f} MB/s   "
          f"wall {mb / base_wall:8.1f} MB/s")
    print(f"iter_chunks         : {chunks:>10,} chunks  cpu {mb / read_cpu:8.1f} MB/s   "
          f"wall {mb / read_wall:8.1f} MB/s  ({peaks:,} peaks, {reflections:,} reflections)")
    print(f"ratio reader/baseline speed (cpu): {base_cpu / read_cpu:.3f} "
          f"(reader is {read_cpu / base_cpu:.1f}x slower than counting lines)")
    target = 50.0
    verdict = "meets" if mb / read_cpu >= target else "MISSES"
    print(f"target >= {target:.0f} MB/s (cpu time, one core): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
