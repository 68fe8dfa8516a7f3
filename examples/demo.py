"""The main job on embedded defaults: the bundled model finds Bragg peaks on a simulated CSPAD
run and on the real CSPAD stills, writes what indexamajig reads, and shows the result.

    python examples/demo.py [--out demo_output] [--frames 6]

1. ``peaknet-sim`` makes a small CSPAD run (CXI stack + .geom + exact truth) from fixed seeds;
2. ``peaknet2cxi`` (bundled default model) writes CXI peak tables, a .geom, a list file, a
   CrystFEL stream and a JSON summary;
3. the peak tables are read back and scored against the simulator's truth;
4. an overlay PNG shows one panel with the true and the found peaks;
5. the same model runs on the two real LCLS CSPAD thermolysin stills (../shared/data/real), if
   present, through the Python API.

Every run makes ``OUT/sim`` and ``OUT/peaks`` afresh: peaknet2cxi resumes an output folder by
(file, event), so an earlier run's peak tables would otherwise be scored as this run's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_STILLS = ROOT.parent / "shared" / "data" / "real" / "cspad_thermolysin_stills"
#: CSPAD's pixel (m), ASIC (fs x ss pixels) and the gap between a sensor's two ASICs (pixels)
PIXEL_M, ASIC, ASIC_GAP = 110e-6, (194, 185), 3


def cspad_geometry_text() -> str:
    """A CrystFEL geometry of a CSPAD-sized detector: 32 sensors of two 194 x 185 ASICs
    (64 panels, 110 um pixels), in the psana/Cheetah slab (quadrant q at fs 388 q, sensor k at
    ss 185 k), laid out square around the beam, 12 cm away.  Why written here: the demo runs on
    embedded defaults, so it needs no file from outside the repository (the real CSPAD
    metrology in ``../shared`` rotates its sensors; which way a panel points does not matter
    to a peak finder that takes each panel as it comes)."""
    fs, ss = ASIC
    sensor_w, sensor_h, gap = 2 * fs + ASIC_GAP, ss, 12
    lines = ["; a CSPAD-sized layout written by examples/demo.py", f"res = {1 / PIXEL_M:.4f}",
             "clen = 0.12", "photon_energy = 9500", "adu_per_eV = 0.0026316",
             "data = /entry_1/data_1/data", "dim0 = %", "dim1 = ss", "dim2 = fs", ""]
    for q in range(4):
        for k in range(8):
            row, col = divmod(q * 8 + k, 4)  # 8 rows of 4 sensors
            x0 = (col - 2) * (sensor_w + gap) + gap / 2
            y0 = (row - 4) * (sensor_h + gap) + gap / 2
            for a in range(2):
                name = f"q{q}a{2 * k + a}"
                lines += [f"{name}/min_fs = {388 * q + fs * a}",
                          f"{name}/max_fs = {388 * q + fs * a + fs - 1}",
                          f"{name}/min_ss = {ss * k}", f"{name}/max_ss = {ss * k + ss - 1}",
                          f"{name}/fs = +1.0x", f"{name}/ss = +1.0y",
                          f"{name}/corner_x = {x0 + a * (fs + ASIC_GAP):.1f}",
                          f"{name}/corner_y = {y0:.1f}", ""]
    return "\n".join(lines)


class DemoError(Exception):
    """Arguments or an output folder the demo cannot use: one line, exit status 2."""


def check_arguments(out: Path, frames: int) -> None:
    """Refuse what would fail only after minutes of work (or with a traceback)."""
    if frames < 1:
        raise DemoError(f"--frames must be at least 1 (got {frames})")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file: give a folder (default demo_output)")


def start_afresh(out: Path) -> None:
    """Remove the peaks folder an earlier demo run left in ``out`` (only that one): peaknet2cxi
    resumes by (file, event), so its tables of frames this run does not make would be kept and
    scored.  A ``peaks`` folder peaknet2cxi did not write is the user's: refused, not removed."""
    from peaknet_xtal.cli.peaknet2cxi import CONFIG_NAME

    peaks = out / "peaks"
    if not peaks.exists():
        return
    if not peaks.is_dir() or (any(peaks.iterdir()) and not (peaks / CONFIG_NAME).exists()):
        raise DemoError(f"{peaks} was not written by peaknet2cxi (no {CONFIG_NAME}); the demo "
                        "would replace it: choose another --out")
    shutil.rmtree(peaks)


def simulate(out: Path, frames: int) -> Path:
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    (out / "sim").mkdir(parents=True, exist_ok=True)
    layout = out / "sim" / "cspad-layout.geom"
    layout.write_text(cspad_geometry_text())
    geometry = read_geometry(layout)
    config = SimConfig(cell="lysozyme", hit_probability=0.85, adu_per_photon=25.0)
    return simulate_run(geometry, frames, seed=2024, out_dir=out / "sim", config=config).cxi


def score(out: Path, sim_dir: Path) -> tuple[dict, list[np.ndarray]]:
    from peaknet_xtal.evaluation.metrics import score_frames
    from peaknet_xtal.formats.cxi import read_cxi_peaks
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim.output import read_truth

    geometry = read_geometry(sim_dir / "sim.geom")
    truth = read_truth(sim_dir / "sim_truth.h5")["reflections"]
    found: list[np.ndarray] = []
    for cxi in sorted((out / "peaks").glob("peaks-*.cxi")):
        table = read_cxi_peaks(cxi)
        found += [table.peaks(i, geometry) for i in range(len(table))]
    triples = [(f, truth[(truth["frame"] == i) & truth["strong"]], truth[truth["frame"] == i])
               for i, f in enumerate(found)]
    return score_frames(triples, cutoff=3.0), found


def overlay(out: Path, sim_dir: Path, found: list[np.ndarray]) -> Path:
    from peaknet_xtal.evaluation.plots import peak_overlay
    from peaknet_xtal.formats.cxi import read_cxi_frame
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim.output import read_truth

    geometry = read_geometry(sim_dir / "sim.geom")
    truth = read_truth(sim_dir / "sim_truth.h5")["reflections"]
    strong = truth[(truth["frame"] == 0) & truth["strong"]]
    panel = int(np.bincount(strong["panel"], minlength=geometry.n_panels).argmax())
    frame = read_cxi_frame(sim_dir / "sim.cxi", 0, geometry)
    path = out / "overlay_frame0.png"
    peaks = found[0]
    peak_overlay(path, frame.panels[panel], frame.masks_or_ones()[panel],
                 {"peaknet (default)": peaks[peaks["panel"] == panel]},
                 strong[strong["panel"] == panel],
                 title=f"simulated CSPAD frame 0, panel {panel}: gold = true strong peaks")
    return path


def real_stills() -> list[tuple[str, int]]:
    from peaknet_xtal.finding import PeakFinder
    from peaknet_xtal.formats.dxtbx_images import read_dxtbx_image

    finder = PeakFinder()
    results = []
    for path in sorted(REAL_STILLS.glob("*.cbf")):
        frame = read_dxtbx_image(path)
        peaks = finder.find(frame.panels, mask=frame.masks)
        results.append((path.name, len(peaks)))
    return results


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev=False: "--frame 3" must be an error, not --frames guessed from a prefix
    parser = argparse.ArgumentParser(prog="peaknet-demo", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder (its sim/ and "
                        "peaks/ are made afresh)")
    parser.add_argument("--frames", type=int, default=6, help="simulated frames (at least 1)")
    args = parser.parse_args(argv)
    import peaknet_xtal.cli.peaknet2cxi as peaknet2cxi

    out = Path(args.out)
    try:
        check_arguments(out, args.frames)
        start_afresh(out)
    except DemoError as exc:
        print(f"peaknet-demo: error: {exc}", file=sys.stderr)
        return 2
    cxi = simulate(out, args.frames)
    sim_dir = cxi.parent
    status = peaknet2cxi.main([str(cxi), "-g", str(sim_dir / "sim.geom"), "-o", str(out / "peaks"),
                               "--stream", str(out / "peaks" / "peaknet.stream")])
    if status != 0:  # peaknet2cxi said why; the files to score are not there
        return int(status)
    summary = json.loads((out / "peaks" / "peaknet2cxi.json").read_text())
    scores, found = score(out, sim_dir)
    picture = overlay(out, sim_dir, found)
    overall = scores["overall"]
    print("\n=== peaknet-xtal demo: bundled default model ===")
    print(f"simulated CSPAD run: {len(found)} frames -> {out / 'peaks'}")
    print("  peaks per frame:  " + " ".join(str(len(f)) for f in found))
    from peaknet_xtal.finding.settings import DEFAULTS
    from peaknet_xtal.sim.output import read_truth

    true_hits = read_truth(sim_dir / "sim_truth.h5")["frames"]["hit"]
    rule = DEFAULTS.min_peaks
    print(f"  hits (>= {rule} peaks): {sum(len(f) >= rule for f in found)} of {len(found)} "
          f"(the simulator made {int(true_hits.sum())} hits and {int((~true_hits).sum())} blanks)")
    print(f"  vs exact truth: precision {overall.precision:.3f}  recall {overall.recall:.3f}  "
          f"F1 {overall.f1:.3f}  median position error {overall.median_error_px:.2f} px")
    print(f"  summary: {out / 'peaks' / 'peaknet2cxi.json'} "
          f"({summary.get('frames', '?')} frames, {summary.get('hits', '?')} hits)")
    print(f"  overlay: {picture}")
    if summary.get("plot"):
        print(f"  run plot: {summary['plot']} (peaks per frame, hit rate)")
    print(f"  next:    {summary.get('indexamajig') or '(no hits: nothing for indexamajig)'}")
    if REAL_STILLS.is_dir():
        print("real LCLS CSPAD thermolysin stills (no parameter changed):")
        for name, n in real_stills():
            print(f"  {name}: {n} peaks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
