"""Make a small mixed simulated dataset on three real detectors and draw one frame's true peaks.

    python examples/make_sim_dataset.py [OUT_DIR] [--frames 4]

For the ePix10k2M, CSPAD and Rayonix geometries in ../shared/data/real/crystfel_geometry/ it runs
the simulator with randomised conditions (``peaknet-sim --randomise``), giving per detector a CXI
stack, its .geom, the truth file and a CrystFEL stream, then saves OUT_DIR/frame.png: the first
hit of the CSPAD run, assembled in the lab frame, with its strong true peaks circled.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.sim.run import simulate_run

GEOMETRIES = {
    "epix10k2m": "om_lcls_mfx_epix10k2M.geom",
    "cspad": "crystfel_doc_cspad-cxiformat.geom",
    "rayonix": "om_lcls_rayonix.geom",
}
REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real/crystfel_geometry"


def draw(geometry_path: Path, seed: int, config: SimConfig, png: Path) -> None:
    """Scatter every pixel at its lab position (robust for any panel layout) and circle peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    geometry = read_geometry(geometry_path)
    frame, truth = simulate_frame(geometry, seed, config)
    clen = frame.meta["clen_m"]
    fig, ax = plt.subplots(figsize=(8, 8), dpi=110)
    vmax = np.percentile(np.concatenate([p.ravel() for p in frame.panels]), 99.7)
    for index, panel in enumerate(frame.panels):
        ss, fs = np.mgrid[0:panel.shape[0], 0:panel.shape[1]]
        x, y, _ = geometry.panel_to_lab(np.full(fs.shape, index), fs, ss, clen_m=clen)
        ax.scatter(x.ravel() * 1e3, y.ravel() * 1e3, c=panel.ravel(), s=0.05, marker=",",
                   cmap="gray_r", vmin=0, vmax=vmax, linewidths=0)
    strong = truth.strong
    x, y, _ = geometry.panel_to_lab(strong["panel"], strong["fs"], strong["ss"], clen_m=clen)
    for px, py in zip(x * 1e3, y * 1e3, strict=False):
        ax.add_patch(Circle((px, py), 1.5, fill=False, color="tab:red", lw=0.6))
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_title(f"{geometry_path.name}, seed {seed}: {len(strong)} strong true peaks "
                 f"of {len(truth.reflections)} reflections")
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="sim_dataset")
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    for offset, (name, filename) in enumerate(GEOMETRIES.items()):
        paths = simulate_run(read_geometry(REAL / filename), args.frames, 1000 * offset,
                             out / name, randomise=True)
        print(f"{name}: {paths.cxi}, {paths.truth}, {paths.stream}")
    draw(REAL / GEOMETRIES["cspad"], 7, SimConfig(cell="lysozyme"), out / "frame.png")
    print(f"picture: {out / 'frame.png'}")


if __name__ == "__main__":
    main()
