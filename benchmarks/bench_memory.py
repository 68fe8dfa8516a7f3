"""Peak resident memory of the finding pipeline per detector size, whole panels against tiles.

Why: a user on a laptop or a small cluster node needs to know what a frame costs, and the one
setting that lowers it.  The network's activations on a whole panel dominate on large panels
(an 18-Mpx Eiger 16M module is one panel), so ``tile_size`` is the knob; ``batch_size`` barely
moves it (a user trial: 2 %).  Each measurement runs in a fresh process (``PeakFinder`` over
``--frames`` frames of Poisson background with planted spots, one thread) and reads that
process's high-water mark (``VmHWM``), against a baseline measured in the same run: the same
frames with the default setting (each panel whole).  The import of torch, the model and the
frames themselves are in every number alike.

    python benchmarks/bench_memory.py [--detectors pilatus6m eiger16m jungfrau16m]
                                      [--tiles 1024 512] [--frames 2]

Prints peak RSS (MB), MB per Mpx, seconds a frame and peaks found per setting, and each tile
setting's memory and peak count against the whole panels'.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: (panels, height, width) of each detector: one Pilatus 6M panel, one Eiger 16M panel (its
#: modules as one array, as its NeXus files hold them), 32 JUNGFRAU modules.
DETECTORS = {"pilatus6m": (1, 2527, 2463), "eiger16m": (1, 4362, 4148),
             "jungfrau16m": (32, 512, 1024)}

#: The child: find ``frames`` frames and report the process's own peak memory.
CHILD = r"""
import json, sys, time
import numpy as np
from peaknet_xtal.finding import PeakFinder
panels, height, width, frames, tile = json.loads(sys.argv[1])
rng = np.random.default_rng(7)
yy, xx = np.mgrid[-4:5, -4:5]
spot = np.exp(-(yy ** 2 + xx ** 2) / 2.0)
kwargs = {} if tile is None else {"tile_size": tile}
finder = PeakFinder(threads=1, adu_per_photon=1.0, **kwargs)
found, seconds = [], 0.0
for _ in range(frames):
    image = rng.poisson(0.5, (panels, height, width)).astype(np.float32)
    for p in range(panels):
        for y, x in zip(rng.integers(8, height - 8, 60), rng.integers(8, width - 8, 60)):
            image[p, y - 4:y + 5, x - 4:x + 5] += np.float32(80.0) * spot
    start = time.perf_counter()
    found.append(len(finder.find(image if panels > 1 else image[0])))
    seconds += time.perf_counter() - start
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(json.dumps({"rss_mb": hwm / 1024, "s_per_frame": seconds / frames, "peaks": found}))
"""


def measure(shape: tuple[int, int, int], frames: int, tile: int | None) -> dict[str, float]:
    """One fresh process's peak memory, time and peaks for ``frames`` frames of ``shape``."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([*shape, frames, tile])],
                          capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument("--tiles", nargs="*", type=int, default=[1024, 512])
    parser.add_argument("--frames", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{'detector':12s} {'setting':14s} {'Mpx':>5s} {'peak MB':>8s} {'MB/Mpx':>7s} "
          f"{'s/frame':>8s}  peaks")
    for name in args.detectors:
        shape = DETECTORS[name]
        mpx = shape[0] * shape[1] * shape[2] / 1e6
        whole = measure(shape, args.frames, None)
        rows = [("whole panels", whole)]
        rows += [(f"tile {tile}", measure(shape, args.frames, tile)) for tile in args.tiles]
        for setting, row in rows:
            print(f"{name:12s} {setting:14s} {mpx:5.1f} {row['rss_mb']:8.0f} "
                  f"{row['rss_mb'] / mpx:7.0f} {row['s_per_frame']:8.2f}  {row['peaks']}",
                  flush=True)
        for setting, row in rows[1:]:
            kept = sum(row["peaks"]) / max(1, sum(whole["peaks"]))
            memory = row["rss_mb"] / whole["rss_mb"]
            print(f"  {name}, {setting} / whole panels: memory {memory:.2f}, peaks {kept:.3f}, "
                  f"time {row['s_per_frame'] / whole['s_per_frame']:.2f}")


if __name__ == "__main__":
    main()
