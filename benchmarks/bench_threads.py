"""``peaknet2cxi`` with its default threads versus ``--threads 1`` on a busy machine (and versus
one thread per core, torch's own default that peaknet2cxi used before).

A competing process (a pure-Python busy loop per ``--load`` core) keeps cores busy, as other
users' jobs do on a shared node; then the same small simulated run (ePix10k2M CXI, default model,
CPU) is processed with the default thread count and with ``--threads 1``, alternately, each as
its own ``python -m peaknet_xtal.cli.peaknet2cxi`` process.  Prints frames/s of both and the
ratio default / one-thread (at least 1.0 means the default is no slower).  Start-up (imports,
model load) is left out by timing two run lengths and taking the difference.

Example:
  python benchmarks/bench_threads.py --frames 2 6 --load 1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def simulate(out: Path, frames: int) -> tuple[Path, Path]:
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    geometry = read_geometry(REAL / "crystfel_geometry" / "om_lcls_mfx_epix10k2M.geom")
    paths = simulate_run(geometry, frames, 7, out, SimConfig(adu_per_photon=10.0),
                         stream=False, progress=False)
    return paths.cxi, paths.geom


def run(cxi: Path, geom: Path, frames: int, threads: int | None, work: Path) -> float:
    """Wall seconds of one peaknet2cxi process over the first ``frames`` frames."""
    listing = work / f"list_{frames}.lst"
    listing.write_text("".join(f"{cxi} //{i}\n" for i in range(frames)))
    out = work / f"out_{frames}_{threads}_{time.monotonic_ns()}"
    args = [sys.executable, "-m", "peaknet_xtal.cli.peaknet2cxi", str(listing), "-g", str(geom),
            "-o", str(out), "--device", "cpu", "--no-progress"]
    if threads is not None:
        args += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True, env=dict(os.environ))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs=2, default=[2, 6], metavar=("SHORT", "LONG"))
    parser.add_argument("--load", type=int, default=1, help="busy-loop processes competing")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (best kept)")
    args = parser.parse_args(argv)
    from peaknet_xtal.threads import available_cores, describe_default

    short, long_ = args.frames
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        work = Path(tmp)
        cxi, geom = simulate(work / "sim", long_)
        budget = 3600
        busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=budget)])
                for _ in range(args.load)]
        try:
            time.sleep(5)  # let the load average see the competition
            print(f"{available_cores()} core(s) available, {args.load} busy-loop process(es); "
                  f"default: {describe_default()}")
            best: dict[tuple[str, int], float] = {}
            variants = (("default", None), ("threads=1", 1),
                        (f"threads={available_cores()}", available_cores()))  # the old default
            for _ in range(args.repeats):
                for label, threads in variants:
                    for n in (short, long_):
                        seconds = run(cxi, geom, n, threads, work)
                        key = (label, n)
                        best[key] = min(best.get(key, float("inf")), seconds)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    rates = {}
    for label in dict(variants):
        per_frame = (best[(label, long_)] - best[(label, short)]) / (long_ - short)
        rates[label] = 1.0 / per_frame if per_frame > 0 else float("inf")
        print(f"  {label:<10} {rates[label]:6.3f} frames/s  ({best[(label, short)]:.1f} s for "
              f"{short} frames, {best[(label, long_)]:.1f} s for {long_})")
    print(f"ratio default / threads=1: {rates['default'] / rates['threads=1']:.2f} "
          "(>= 1: the default is no slower)")
    old = variants[2][0]
    print(f"ratio {old} (torch's own default, all cores) / threads=1: "
          f"{rates[old] / rates['threads=1']:.2f}")


if __name__ == "__main__":
    main()
