"""Memory of the serial CXI writer over a long ePix10k2M-sized run (peaknet2cxi's writer).

The writer streams each frame to disk as it arrives, so its resident memory must stay flat over
``frames_per_file`` frames instead of growing with them.  Measured here: resident set size
(RSS) while 1,000 ePix10k2M frames (16 x 4 panels of 352 x 384, 8.6 MB of float32 each) go
into one CXI file in copy mode (the mode that stores pixels; linked inputs store none), against
a baseline measured in the same run: the same frames held in a list, as a writer that buffers a
file's frames until it is full does (the project's writer before this one), over fewer frames and
extrapolated per frame.

    python benchmarks/bench_cxi_writer_memory.py [--frames 1000] [--baseline-frames 100]

Prints RSS at points through the run, the growth per frame of both, and their ratio.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from peaknet_xtal.formats.cxi import CXIWriter
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.types import Frame, FrameResult, peaks_from_columns

GEOMETRY = (Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "crystfel_geometry"
            / "om_lcls_mfx_epix10k2M.geom")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_result(geometry, index: int, rng: np.random.Generator) -> FrameResult:
    """A fresh frame (new pixel arrays, as a reader returns them) with 50 peaks."""
    panels = [rng.poisson(2.0, size=p.shape).astype(np.float32) for p in geometry.panels]
    peaks = peaks_from_columns(panel=np.arange(50) % len(panels), fs=np.full(50, 10.0),
                               ss=np.full(50, 20.0), intensity=np.full(50, 100.0))
    frame = Frame(panels=panels, masks=None, source="bench", event=f"//{index}", serial=index,
                  geometry=geometry, meta={})
    return FrameResult(frame=frame, peaks=peaks, hit=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--baseline-frames", type=int, default=100)
    args = parser.parse_args()
    geometry = read_geometry(GEOMETRY)
    rng = np.random.default_rng(0)
    frame_mb = sum(p.height * p.width for p in geometry.panels) * 4 / 2**20

    # baseline: the frames of one file held in memory until it is written
    gc.collect()
    start = rss_mb()
    held = [make_result(geometry, i, rng) for i in range(args.baseline_frames)]
    buffered_per_frame = (rss_mb() - start) / args.baseline_frames
    del held
    gc.collect()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        writer = CXIWriter(Path(tmp), geometry, frames_per_file=args.frames, mode="copy")
        marks = sorted({1, 10, 100, args.frames // 2, args.frames})
        samples = {}
        began = time.perf_counter()
        for i in range(args.frames):
            writer.write(make_result(geometry, i, rng))
            if i + 1 in marks:
                gc.collect()
                samples[i + 1] = rss_mb()
                print(f"  {i + 1:5d} frames written: RSS {samples[i + 1]:8.1f} MB "
                      f"({time.perf_counter() - began:6.1f} s)", flush=True)
        writer.close()
        size_mb = sum(p.stat().st_size for p in writer.finished_files()) / 2**20
    first, last = samples[10], samples[args.frames]
    streamed_per_frame = max(last - first, 0.0) / (args.frames - 10)
    print(f"ePix10k2M frame: {frame_mb:.2f} MB of float32; CXI file {size_mb:.0f} MB")
    print(f"buffered (baseline): +{buffered_per_frame:.2f} MB RSS per frame held -> "
          f"{buffered_per_frame * args.frames / 1024:.1f} GB for {args.frames} frames")
    print(f"streamed: RSS {first:.0f} MB after 10 frames, {last:.0f} MB after {args.frames} "
          f"(+{streamed_per_frame * 1024:.1f} kB per frame)")
    ratio = streamed_per_frame / buffered_per_frame if buffered_per_frame > 0 else float("nan")
    print(f"memory growth per frame, streamed / buffered: {ratio:.4f}")


if __name__ == "__main__":
    main()
