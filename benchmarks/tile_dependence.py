"""Do a panel's peaks depend on how the engine tiles it or where the panel sits?

    python benchmarks/tile_dependence.py [--models default WEIGHTS ...] [--frames 10] [--fixed]
        [--overlap 64]

For each model, on frames with panels larger than 1024 px: the peaks found with the engine's
defaults (each panel whole, as every entry point runs it) against the peaks found with
1024-px tiles (the engine's default until 2026-12-06) and 512-px tiles (64 px overlap), and
with the panel embedded in a larger masked layout at an offset on the 32-px grid (as a panel
sits among others in a detector layout): how many of the default's peaks each finds again
(one-to-one, within 1 px), and how many peaks it finds.  The baseline is the engine's default
for the same model in the same run.  ``--overlap`` sets the pixels neighbouring tiles share in
every tiled variant (the engine's default, 64, leaves 32 px each side of a cut: less than the
convolutions reach, so even a model with local statistics differs at the cuts;
results/tile_dependence_window.txt).  ``--fixed`` adds, for every model given with
per-image statistics, its copy with fixed image statistics (model/fixed_stats.py) as the training
script's stage 2b makes them, on its bank's first 40 frames (a couple of minutes; the script
uses all 320).

Frames: the real Pilatus 6M thaumatin grid (``--frames`` of its 10 frames; 2527 x 2463, one
panel with module gaps), the real Eiger2 still (4M mode, 2162 x 2068), and the simulated Rayonix
frames of the model-selection set (1920 x 1920).  Measurement only: nothing is chosen here.
One torch thread, the library's peak settings.

Measured (the shipped default, per-image statistics, aligned tiles): docs/measurements.md,
"Tiles and layouts"; output in benchmarks/results/tile_dependence*.txt.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
GEOMETRIES = REAL / "crystfel_geometry"
THAUMATIN = REAL / "pilatus6m_thaumatin_grid"
EIGER2 = REAL / "eiger2_still_0mq" / "eiger2_16m_roi4m_acq5291452_frame43.h5"
EIGER_MASKED = 65535
#: the variants set against the default tiling: engine keywords, or "embedded"
VARIANTS = {"tiles 1024": {"tile_size": 1024}, "tiles 512": {"tile_size": 512},
            "embedded": None}
#: where the panel sits in the embedding layout (on the 32-px grid) and how much larger it is
EMBED_AT, EMBED_MARGIN = (64, 96), 256


def frames(count: int) -> Iterator[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """(name, panels, good masks) of the frames the module docstring lists."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    for path in sorted(THAUMATIN.glob("*.cbf*"))[:count]:
        imageset = ExperimentListFactory.from_filenames([str(path)])[0].imageset
        panels = [np.asarray(d.as_numpy_array(), np.float32)
                  for d in imageset.get_corrected_data(0)]
        masks = [np.asarray(m.as_numpy_array(), bool) for m in imageset.get_mask(0)]
        yield path.name, panels, masks
    import h5py

    with h5py.File(EIGER2) as handle:
        raw = np.asarray(handle["data"][0])
    good = raw != EIGER_MASKED
    yield EIGER2.name, [np.where(good, raw, 0).astype(np.float32)], [good]
    from peaknet_xtal.evaluation.selection import FIRST_PARTS, selection_frames

    # the parts its recorded results were measured on (the sharp-spot part came later)
    for part, pairs in selection_frames(GEOMETRIES, FIRST_PARTS).items():
        for k, (frame, _) in enumerate(pairs):
            if max(p.size for p in frame.panels) > 1024 * 1024:
                masks = frame.masks or [np.ones(p.shape, bool) for p in frame.panels]
                yield f"simulated {part} {k}", list(frame.panels), list(masks)


def find(model: Any, panels: list[np.ndarray], masks: list[np.ndarray],
         **engine: Any) -> np.ndarray:
    """Peaks with the library's settings at a declared gain of 1 (these frames count photons;
    a gain measured per variant would differ between them for reasons of its own)."""
    from peaknet_xtal.finding import InferenceEngine
    from peaknet_xtal.types import Frame

    finder = InferenceEngine(model, device="cpu", threads=1, adu_per_photon=1.0, **engine)
    return next(iter(finder.find_frames([Frame(panels=panels, masks=masks)]))).peaks


def embedded(model: Any, panels: list[np.ndarray], masks: list[np.ndarray],
             **engine: Any) -> np.ndarray:
    """Peaks of the panels each placed in a larger masked layout, in panel coordinates
    (``engine``: keywords of the finding engine, as :func:`find`)."""
    y0, x0 = EMBED_AT
    out = []
    for k, (panel, good) in enumerate(zip(panels, masks, strict=True)):
        h, w = panel.shape
        layout = np.zeros((h + EMBED_MARGIN, w + EMBED_MARGIN), np.float32)
        inside = np.zeros(layout.shape, bool)
        layout[y0:y0 + h, x0:x0 + w], inside[y0:y0 + h, x0:x0 + w] = panel, good
        peaks = find(model, [layout], [inside], **engine).copy()
        peaks["panel"], peaks["ss"], peaks["fs"] = k, peaks["ss"] - y0, peaks["fs"] - x0
        out.append(peaks)
    return np.concatenate(out)


def shared(a: np.ndarray, b: np.ndarray) -> int:
    from peaknet_xtal.evaluation.metrics import match_peaks

    ia, _, _ = match_peaks(a["panel"], a["fs"], a["ss"], b["panel"], b["fs"], b["ss"], 1.0)
    return len(ia)


def with_fixed_stats(spec: str) -> Any:
    """``spec``'s copy with fixed image statistics as the training script's stage 2b makes them
    (examples/train_default_model.py ``with_fixed_stats``), on its bank's first 40 frames."""
    import tempfile

    sys.path.insert(0, str(ROOT / "examples"))
    from train_default_model import with_fixed_stats as stage_2b

    from peaknet_xtal.model import load_model

    weights = (ROOT / "peaknet_xtal" / "model" / "weights" / "default.safetensors"
               if spec == "default" else Path(spec))
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(str(stage_2b(weights, 40, Path(tmp) / "fixed.safetensors")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default"])
    parser.add_argument("--frames", type=int, default=10, help="thaumatin frames (of 10)")
    parser.add_argument("--fixed", action="store_true",
                        help="also each model with fixed image statistics")
    parser.add_argument("--overlap", type=int, default=None,
                        help="pixels neighbouring tiles share (default: the engine's)")
    args = parser.parse_args(argv)
    import torch

    from peaknet_xtal.model import load_model

    torch.set_num_threads(1)
    models: dict[str, Any] = {}
    for spec in args.models:
        model = load_model(spec)
        models[spec] = model
        if args.fixed and model.config.get("image_stats", "per_image") == "per_image":
            models[f"{spec} (fixed statistics)"] = with_fixed_stats(spec)
    from peaknet_xtal.finding.settings import DEFAULTS

    overlap = {"tile_overlap": DEFAULTS.tile_overlap if args.overlap is None else args.overlap}
    print(f"tile overlap {overlap['tile_overlap']} px")
    totals = {label: {"peaks": 0, **{v: [0, 0] for v in VARIANTS}} for label in models}
    print("| frame | model | peaks, whole (default) | " + " | ".join(
        f"{v}: found again / peaks" for v in VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for name, panels, masks in frames(args.frames):
        for label, model in models.items():
            base = find(model, panels, masks, **overlap)
            cells = []
            for variant, engine in VARIANTS.items():
                other = (embedded(model, panels, masks, **overlap) if engine is None
                         else find(model, panels, masks, **{**overlap, **engine}))
                same = shared(base, other)
                totals[label][variant][0] += same
                totals[label][variant][1] += len(other)
                cells.append(f"{same} / {len(other)}")
            totals[label]["peaks"] += len(base)
            print(f"| {name} | {label} | {len(base)} | " + " | ".join(cells) + " |",
                  flush=True)
    print("\nAll frames: share of the default's peaks found again (one-to-one, 1 px)")
    for label, total in totals.items():
        peaks = max(int(total["peaks"]), 1)
        print(f"  {label}: {total['peaks']} peaks; " + "; ".join(
            f"{v} {total[v][0] / peaks:.1%} ({total[v][1]} peaks)" for v in VARIANTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
