"""Speed-up of ``dials.stills_process mp.nproc=2`` over ``mp.nproc=1`` with PeakNet spot finding.

``dials.find_spots`` does not parallelise a list of stills (each still is its own imageset:
"Using multiprocessing with 1 parallel job(s)"); ``dials.stills_process`` hands whole images to
``mp.nproc`` worker processes, each with its own PeakNet model (loaded once per process, one torch
thread each under Debian's cctbx).  This runs the real command, spot finding only
(``dispatch.index=False``), on ``--stills`` stills made of the real CSPAD CBFs (symbolic links
under distinct names, so DIALS sees distinct images), with 1 and with 2 processes, and prints the
wall times and their ratio, per still from two list lengths (start-up left out) and for the
whole command.

Example:
  python benchmarks/bench_dials_stills_parallel.py --stills 4 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from peaknet_xtal.evaluation.dials_commands import (
    DialsCommandError,
    dials_environment,
    run_dials,
    stills_process_status,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def stills(work: Path, count: int) -> list[Path]:
    sources = sorted((REAL / "cspad_thermolysin_stills").glob("*.cbf"))
    if not sources:
        sys.exit(f"no CSPAD CBFs under {REAL}")
    links = []
    for i in range(count):
        link = work / f"still_{i:03d}.cbf"
        link.symlink_to(sources[i % len(sources)])
        links.append(link)
    return links


def process(files: list[Path], nproc: int, work: Path, threads: int | None) -> float:
    out = work / f"nproc{nproc}"
    out.mkdir()
    args = [*map(str, files), "dispatch.index=False", "spotfinder.threshold.algorithm=peaknet",
            f"mp.nproc={nproc}", "mp.method=multiprocessing", f"output.output_dir={out}",
            "spotfinder.threshold.peaknet.device=cpu"]
    if threads:
        args.append(f"spotfinder.threshold.peaknet.threads={threads}")
    try:
        _, seconds = run_dials("stills_process", *args, cwd=work, env=dials_environment())
    except DialsCommandError as exc:
        sys.exit(str(exc))
    status = stills_process_status(out / "debug")
    ok = sum(1 for s in status.values() if s.startswith("spotfinding_ok"))
    if ok != len(files):
        sys.exit(f"nproc={nproc}: {ok} of {len(files)} stills found spots: {status}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stills", type=int, nargs=2, default=[4, 8], metavar=("SHORT", "LONG"))
    parser.add_argument("--threads", type=int, help="peaknet threads per process")
    args = parser.parse_args(argv)
    short, long_ = args.stills
    if not 0 < short < long_:
        sys.exit("need 0 < SHORT < LONG stills")
    times: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_stills_") as tmp:
        work = Path(tmp)
        for count in (short, long_):
            folder = work / f"n{count}"
            folder.mkdir()
            files = stills(folder, count)
            for nproc in (1, 2):
                times[(nproc, count)] = process(files, nproc, folder, args.threads)
    per_still = {}
    for nproc in (1, 2):
        per_still[nproc] = (times[(nproc, long_)] - times[(nproc, short)]) / (long_ - short)
        print(f"  mp.nproc={nproc}: {times[(nproc, short)]:6.1f} s for {short} stills, "
              f"{times[(nproc, long_)]:6.1f} s for {long_}: {per_still[nproc]:5.2f} s per still "
              f"(start-up left out)")
    print(f"speed-up with 2 processes: {per_still[1] / per_still[2]:.2f}x per still, "
          f"{times[(1, long_)] / times[(2, long_)]:.2f}x for the whole {long_}-still command")


if __name__ == "__main__":
    main()
