"""Where a frame's host time goes, beside the model's: what bounds frames/s once the model runs
on a GPU.

    python benchmarks/bench_host.py [--detector epix10k2m] [--frames 6] [--repeat 3]

On a GPU the network segments a 2-Mpx frame in about 5 ms (an H200:
``benchmarks/results/bench_gpu_h200.log``), while every frame's peaks, its pixel defects and its
output are worked out on the host's CPU cores.  This measures those host steps one by one on
simulated frames of a real detector geometry (``benchmarks/bench_blanks.py``'s selection run:
blanks and hits, randomised conditions), one thread, CPU clock, best of ``--repeat``, each beside
the baseline measured in the same run: the model's segmentation of the same frames on the CPU
(normalisation, tiles, network, stitching; one thread), as a ratio.  Steps:

- sanitise: non-finite and absurd pixels masked (``finding.sanitise``), once a frame;
- gain look: the photon-transfer estimate (``finding.gain``), while a run's gain is unknown (up
  to 50 frames of it, then never);
- peaks: ``finding.peaks.find_peaks`` from the model's probabilities (threshold, components,
  backgrounds, SNR), every frame;
- spike maps: the defect tracker's lone spikes (``finding.defects``), every frame;
- defect filter: the run's filter on the peak table, every frame;
- CXI linked / copied: one frame into a CXI file (``formats.cxi``), its pixels linked (a VDS
  to HDF5 input) or copied (any other input).

Printed: ms a frame per step, its share of the model's CPU time, the host total of a frame
after the gain is settled, and the frames/s one host core sustains at that total (a GPU node
needs ``1000 / total`` cores for issue 17's 1,000 frames/s, before any other work).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def cpu_best(work: Callable[[], Any], repeat: int) -> float:
    """Least CPU seconds of ``repeat`` calls of ``work``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def measure(detector: str, frames: int, repeat: int) -> dict[str, float]:
    """Milliseconds a frame per host step and for the model (see the module docstring)."""
    import bench_blanks
    import torch

    from peaknet_xtal.finding import InferenceEngine
    from peaknet_xtal.finding.defects import DefectFilter, DefectTracker
    from peaknet_xtal.finding.gain import estimate_gain
    from peaknet_xtal.finding.peaks import find_peaks
    from peaknet_xtal.finding.sanitise import sanitise_frame
    from peaknet_xtal.formats.cxi import CXIWriter
    from peaknet_xtal.types import FrameResult

    torch.set_num_threads(1)
    run = [frame for frame, _, _ in
           bench_blanks.run_frames(detector, "selection", frames // 2, frames - frames // 2)]
    engine = InferenceEngine("default", device="cpu", threads=1)
    goods = [sanitise_frame(f.panels, f.masks)[1] for f in run]
    probs = [engine.predict_panels(f.panels, g) for f, g in zip(run, goods, strict=True)]
    params = engine.params_for(run[0])
    per_frame = len(run)
    ms: dict[str, float] = {}

    def each(step: Callable[[int], Any]) -> Callable[[], None]:
        return lambda: [step(k) for k in range(per_frame)]

    def timed(name: str, work: Callable[[], Any]) -> None:
        ms[name] = 1000 * cpu_best(work, repeat) / per_frame

    timed("model (baseline)", each(lambda k: engine.predict_panels(run[k].panels, goods[k])))
    timed("sanitise", each(lambda k: sanitise_frame(run[k].panels, run[k].masks)))
    timed("gain look", each(lambda k: estimate_gain(run[k].panels, goods[k])))
    tables = [find_peaks(f.panels, p, g, params) for f, p, g in zip(run, probs, goods,
                                                                     strict=True)]
    timed("peaks", each(lambda k: find_peaks(run[k].panels, probs[k], goods[k], params)))
    tracker = DefectTracker()
    timed("spike maps", each(lambda k: tracker.spike_maps(run[k].panels, goods[k])))
    spikes = [tracker.spike_maps(f.panels, g) for f, g in zip(run, goods, strict=True)]

    def filtered() -> None:  # as the engine runs it: the spike maps made already
        defects = DefectFilter()
        for k in range(per_frame):
            defects.keep(tables[k], run[k].panels, goods[k], spikes[k])

    timed("defect filter", filtered)
    with tempfile.TemporaryDirectory() as work:
        for mode, name in (("vds", "CXI linked"), ("copy", "CXI copied")):
            frames_in = _linked(run, Path(work), detector) if mode == "vds" else run

            def write(mode: str = mode, frames_in: list[Any] = frames_in) -> None:
                with tempfile.TemporaryDirectory(dir=work) as out:
                    writer = CXIWriter(Path(out) / "peaks.cxi", frames_in[0].geometry,
                                       mode=mode, write_geometry=False)
                    for frame, table in zip(frames_in, tables, strict=True):
                        writer.write(FrameResult(frame=frame, peaks=table, hit=False))
                    writer.close()

            timed(name, write)
    return ms


def _linked(run: list[Any], work: Path, detector: str) -> list[Any]:
    """The run's frames as read back from a CXI file of their own (linkable: they know their
    HDF5 file and dataset), as ``peaknet2cxi`` reads HDF5 input."""
    from peaknet_xtal.formats.cxi import DATA_PATH, MASK_PATH, iter_cxi_frames, write_cxi
    from peaknet_xtal.types import FrameResult, empty_peaks

    source = work / f"{detector}-input.cxi"
    write_cxi(source, [FrameResult(frame=f, peaks=empty_peaks(), hit=False) for f in run],
              run[0].geometry, mode="copy")
    return list(iter_cxi_frames(source, run[0].geometry, data_path=DATA_PATH,
                                mask_path=MASK_PATH))


def report(ms: dict[str, float], detector: str, megapixels: float) -> None:
    model = ms["model (baseline)"]
    print(f"{detector}, {megapixels:.1f} Mpx a frame, one thread, CPU ms a frame "
          f"(share of the model's):")
    for name, value in ms.items():
        print(f"  {name:18s} {value:8.1f}  {value / model:6.2f}")
    steady = sum(ms[k] for k in ("sanitise", "peaks", "spike maps", "defect filter"))
    for output in ("CXI linked", "CXI copied"):
        total = steady + ms[output]
        print(f"host total, gain settled, {output}: {total:.1f} ms a frame = "
              f"{1000 / total:.1f} frames/s a core ({total:.0f} cores for 1,000 frames/s)")
    print(f"while the gain is measured: + {ms['gain look']:.1f} ms a frame")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="epix10k2m",
                        help="a detector of benchmarks/bench_blanks.py")
    parser.add_argument("--frames", type=int, default=6, help="frames (half blanks, half hits)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("peaknet_xtal").setLevel(logging.ERROR)  # the frames' own notes
    if args.frames < 2:
        parser.error("--frames must be at least 2 (a blank and a hit)")
    import bench_blanks

    if args.detector not in bench_blanks.DETECTORS:
        parser.error(f"--detector must be one of {sorted(bench_blanks.DETECTORS)}")
    ms = measure(args.detector, args.frames, args.repeat)
    from peaknet_xtal.formats.geometry import read_geometry

    geometry = read_geometry(bench_blanks.GEOMETRIES / bench_blanks.DETECTORS[args.detector][0])
    report(ms, args.detector, sum(p.width * p.height for p in geometry.panels) / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
