"""False peaks on blank frames and hit calling, with the shared finding defaults.

For each of six real detector geometries (ePix10k2M, CSPAD, JUNGFRAU 4M, Rayonix; the
photon-counting Pilatus 6M and Eiger 16M binned 2x2, whose counts are exact: no read noise, no
pedestal) a simulated run of blank frames (no crystal) and hits is made with randomised
conditions: the simulator's randomised settings (backgrounds, water rings, kapton, read noise,
per-panel pedestals, masked defects), plus on a third of the frames a strong smooth background
with large gradients (``sim.artifacts.add_strong_background``), unmasked hot pixels that recur
in every frame of the run, a jet streak on every other frame and zingers now and then (on the
photon-counting detectors one count in each pixel a track crosses: such a pixel counts a particle
once, whatever charge it leaves); the photon-counting frames are rounded to whole counts after
all of it.  Frames declare no gain of their
own (as a CXI file read through a geometry): the gain is the geometry's or measured from the data,
as every entry point resolves it.  The frames go through one ``InferenceEngine`` per run, in
order, so the run-level defect filter acts as in ``peaknet2cxi``: it counts the run's first
five frames before it filters any, as the engine reads them ahead (before 2026-12-06 this
benchmark did not, and the first frames' hot pixels counted as false peaks).

Printed per detector: false peaks per blank frame (mean, max), blanks called hits, true hits
called hits (all hits, and hits with at least ``--indexable`` strong reflections), peak F1 on the
hits' strong reflections (on a strong background, the simulation's strong reflections that it
drowned, expected SNR below the same 5 on it, are not counted as strong, as in
``examples/make_eval_report.py``: ``sim.artifacts.drowned_reflections``); with ``--sources``,
where the blanks' false peaks come from (hot pixels, streaks, zingers, their SNR and model
probability; after each run's first frames, as the second table) and how their probability and
SNR compare with the hits' true peaks; with ``--sweep``, the same numbers
for other ``min_snr`` / ``min_height`` / ``min_peaks`` values (the model runs once, the peak cuts
are applied afterwards: the defect filter does not depend on them).

Seed ranges (distinct; never the acceptance tests' 3,000,100,001+, make_eval_report's
4,000,000,000+ or the training script's validation 2,000,000,001+):
- ``--set selection``: 5,000,000,000 + 10,000 x detector + frame (used to choose the defaults,
  and by examples/train_default_model.py's stage 4b to choose between models);
- ``--set acceptance``: 6,000,000,000 + 10,000 x detector + frame (only measured).

``--real`` also runs the real frames of ``../shared/data/real``: the ten Pilatus 6M thaumatin
grid frames and the two CSPAD stills (all hits), the three single synchrotron images, and the
L-cysteine Pilatus 2M rotation frames (1-7 sharp spots each; reported, not a hit criterion).

Example (about 10 minutes on a busy 2-core machine for 24 + 24 frames a detector):
  nice -n 10 python benchmarks/bench_blanks.py --set selection --frames 24 --sources --sweep
  nice -n 10 python benchmarks/bench_blanks.py --set acceptance --frames 24 --real
  python benchmarks/bench_blanks.py --set acceptance --detectors pilatus6m eiger16m-bin2 \
      [--noisy-counting]   # the photon-counting pair, on exact counts (or with read noise)
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
GEOMETRIES = REAL / "crystfel_geometry"

#: name -> (geometry file, ADU per photon of the run; None: the geometry's own adu_per_eV);
#: new detectors go last: a detector's seeds follow its place here
DETECTORS: dict[str, tuple[str, float | None]] = {
    "epix10k2m": ("om_lcls_mfx_epix10k2M.geom", 10.0),
    "cspad": ("crystfel_doc_cspad-cxiformat.geom", None),
    "jungfrau4m": ("om_lcls_cxi_jungfrau4M.geom", 8.0),
    "rayonix": ("om_lcls_rayonix.geom", 1.0),
    "pilatus6m": ("crystfel_doc_pilatus.geom", 1.0),
    "eiger16m-bin2": ("crystfel_doc_Eiger16M-binning2-nativefiles.geom", 1.0),
}
#: photon-counting detectors: exact counts (no read noise, no pedestal), as a Pilatus or an
#: Eiger writes them; every other detector's read noise is drawn as the simulator draws it
COUNTING = frozenset({"pilatus6m", "eiger16m-bin2"})
SEED_BASE = {"selection": 5_000_000_000, "acceptance": 6_000_000_000}
HOT_PIXELS = 40  # unmasked, the same pixels in every frame of a run
#: offset of the seeds of ``--flickering`` pixels' places and of when they are lit
FLICKER_SEED = 1 << 40
MATCH_PX = 3.0  # a found peak within this many pixels of a true reflection is on it


@dataclass
class FrameRecord:
    """One frame's peaks at min_snr 0 and min_height 0 (after the defect filter), and what
    the frame was."""

    detector: str
    index: int  # place in its run (the defect filter learns over a run's first frames)
    seed: int
    hit: bool
    strong: int  # true strong reflections
    peaks: np.ndarray  # PEAK_DTYPE, min_snr 0, min_height 0, after the defect filter
    on_truth: np.ndarray  # bool per peak: within MATCH_PX of any true reflection
    matched_strong: np.ndarray  # bool per peak: matches a strong reflection (one-to-one)
    n_strong_found_by_snr: Any = None
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, "U8"))  # per peak, blanks
    dropped_by_defects: int = 0
    gain: float | None = None
    conditions: str = ""


def run_frames(name: str, set_name: str, n_blank: int, n_hit: int, exact_counts: bool = True,
               flickering: int = 0) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """The simulated run of one detector: blanks and hits interleaved (see the module doc);
    ``exact_counts=False`` gives the photon-counting detectors read noise and pedestals as the
    others have (the same frames otherwise: the same random draws).  ``flickering``: that many
    more unmasked hot pixels, each lit in half the frames (as many pixels of a real detector's
    status map flicker, ``../shared/data/real/epix100a_pixel_status``), drawn from generators
    of their own, so the frames are otherwise the same as without them."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import PHOTON_COUNTING, SimConfig, artifacts, simulate_frame, whole_counts

    geom_file, gain = DETECTORS[name]
    geometry = read_geometry(GEOMETRIES / geom_file)
    base = SEED_BASE[set_name] + 10_000 * list(DETECTORS).index(name)
    run_rng = np.random.default_rng(base)
    hot: list[tuple[int, int, int]] | None = None
    flicker: list[tuple[int, int, int]] | None = None
    kinds = ["blank"] * n_blank + ["hit"] * n_hit
    order = run_rng.permutation(len(kinds))
    for k, index in enumerate(order):
        seed = base + 1 + k
        hit = kinds[index] == "hit"
        rng = np.random.default_rng(seed)
        counting = exact_counts and name in COUNTING
        exact = PHOTON_COUNTING if counting else {}
        config = SimConfig.randomised(rng, hit_probability=1.0 if hit else 0.0,
                                      adu_per_photon=gain, **exact)
        frame, truth = simulate_frame(geometry, seed, config)
        adu = float(truth.adu_per_photon)
        shapes = [np.shape(p) for p in frame.panels]
        if hot is None:
            hot = []
            for _ in range(HOT_PIXELS):
                p = int(run_rng.integers(len(shapes)))
                hot.append((p, int(run_rng.integers(shapes[p][0])),
                            int(run_rng.integers(shapes[p][1]))))
        panels = [np.asarray(p, np.float64) for p in frame.panels]
        notes = []
        drowned = np.zeros(len(truth.reflections), dtype=bool)
        if rng.random() < 1 / 3:
            notes.append("strong-bg")
            panels, masks = [], []
            for p, before in enumerate(frame.panels):
                image, scale, psf = artifacts.strong_background_parts(
                    np.asarray(before, np.float64), adu, rng)
                panels.append(image)
                masks.append(artifacts.drowned_strong_peaks(
                    before, truth.peak_masks[p],
                    None if frame.masks is None else frame.masks[p], scale, psf))
            drowned = artifacts.drowned_reflections(truth.reflections, masks)
        for p, y, x in hot:
            panels[p][y, x] += 300.0 * adu * rng.uniform(0.8, 1.2)
        if flickering:
            if flicker is None:
                flick_rng = np.random.default_rng(base + FLICKER_SEED)
                flicker = [(p, int(flick_rng.integers(shapes[p][0])),
                            int(flick_rng.integers(shapes[p][1])))
                           for p in flick_rng.integers(len(shapes), size=flickering).tolist()]
            lit = np.random.default_rng(seed + FLICKER_SEED).random(flickering) < 0.5
            for (p, y, x), on in zip(flicker, lit, strict=True):
                if on:
                    panels[p][y, x] += 100.0 * adu
        streak = None
        if k % 2:
            streak = int(rng.integers(len(panels)))
            before = panels[streak].copy()
            artifacts.add_jet_streak(panels[streak], adu * 0.5, rng)
            streak_map = (panels[streak] - before) > 2 * adu
            notes.append("streak")
        zinger_maps: dict[int, np.ndarray] = {}
        if rng.random() < 1 / 3:
            for _ in range(int(rng.integers(1, 4))):
                p = int(rng.integers(len(panels)))
                before = panels[p].copy()
                artifacts.add_zinger(panels[p], adu, rng, counting=name in COUNTING)
                zinger_maps[p] = zinger_maps.get(p, np.zeros(shapes[p], bool)) | (
                    panels[p] != before)
            notes.append("zinger")
        if counting:  # what such a detector writes: whole counts, artefacts included
            panels = [whole_counts(p) for p in panels]
        frame.panels = [p.astype(np.float32) for p in panels]
        frame.meta["adu_per_photon"] = None  # declared by the geometry or measured, as from CXI
        info = {"hot": hot + (flicker or []),
                "streak": (streak, streak_map) if streak is not None else None,
                "zingers": zinger_maps, "notes": ",".join(notes), "true_gain": adu,
                "drowned": drowned}
        yield frame, truth, info


def classify(peaks: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Where each false peak of a blank sits: on a hot pixel, a streak, a zinger, or elsewhere."""
    out = np.full(len(peaks), "other", dtype="U8")
    hot = {(p, y, x) for p, y, x in info["hot"]}
    for i, peak in enumerate(peaks):
        panel, y, x = int(peak["panel"]), int(round(peak["ss"])), int(round(peak["fs"]))
        near = {(panel, y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        if near & hot:
            out[i] = "hot"
            continue
        streak = info["streak"]
        if streak is not None and streak[0] == panel:
            window = streak[1][max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]
            if window.any():
                out[i] = "streak"
                continue
        zinger = info["zingers"].get(panel)
        if zinger is not None and zinger[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].any():
            out[i] = "zinger"
    return out


def measure(name: str, set_name: str, n_blank: int, n_hit: int, model: str = "default",
            thresholds: Sequence[float] | None = None, true_gain: bool = False,
            exact_counts: bool = True, variants: Mapping[Hashable, Mapping[str, Any]] | None = None,
            flickering: int = 0) -> dict[Hashable, list[FrameRecord]]:
    """Run one detector's frames through one engine, once; per probability threshold the
    records at min_snr 0 and min_height 0 (the SNR, height and peak-count cuts are applied
    later: :func:`passes`), each through the run-level defect filter (one for all: what it
    learns depends on the pixels alone).  ``true_gain``
    gives the engine the simulated gain instead of letting it resolve one (where the false
    peaks' SNR depends on the gain estimate).  ``variants`` (instead of ``thresholds``): other
    peak settings by name, each a ``PeakParams`` override of the frame's own (e.g.
    ``{"threshold": 0.4}``), the records keyed by those names; a variant's ``"cores"`` (not a
    peak setting) runs it through a defect filter of its own with that ``DefectFilter(cores=)``
    (the sharp-core test and the run's spot width on or off).  ``flickering``: as
    :func:`run_frames`."""
    from peaknet_xtal.evaluation.metrics import match_peaks
    from peaknet_xtal.finding.defects import DefectFilter
    from peaknet_xtal.finding.engine import InferenceEngine
    from peaknet_xtal.finding.peaks import find_peaks

    gain = DETECTORS[name][1] if true_gain else None
    engine = InferenceEngine(model, device="cpu", min_snr=0.0, min_height=0.0,
                             adu_per_photon=gain)
    if variants is None:
        variants = {t: {"threshold": t}
                    for t in list(thresholds or [engine.peak_params.threshold])}
    filters = {bool(o.get("cores", True)): DefectFilter(cores=bool(o.get("cores", True)))
               for o in variants.values()}
    counted: set[bool] = set()  # filters that counted the frame: the others judge it
    records: dict[Hashable, list[FrameRecord]] = {t: [] for t in variants}
    frames = run_frames(name, set_name, n_blank, n_hit, exact_counts, flickering)
    # the run's first frames are counted before any is filtered, as the engine reads them
    # ahead (InferenceEngine._read_ahead): their hot pixels are known when they are filtered
    head = list(itertools.islice(frames, next(iter(filters.values())).learning))
    for frame, _, _ in head:
        for defects in filters.values():
            engine.count_ahead(frame, defects)
    for index, (frame, truth, info) in enumerate(itertools.chain(head, frames)):
        (probs,), (goods,) = engine._predict_many([frame.panels], [frame.masks])
        base = engine.params_for(frame)
        refl = truth.reflections
        # strong: the simulation's strong reflections less those the added background drowned
        strong = refl[refl["strong"] & ~info["drowned"]] if len(refl) else refl
        counted.clear()
        for t, overrides in variants.items():
            cores = bool(overrides.get("cores", True))
            params = replace(base, **{k: v for k, v in overrides.items() if k != "cores"})
            peaks = find_peaks(frame.panels, probs, goods, params, geometry=frame.geometry,
                               wavelength_A=frame.meta.get("wavelength_A"))
            defects = filters[cores]
            kept = peaks[defects.judge(peaks, frame.panels) if cores in counted
                         else defects.keep(peaks, frame.panels, goods)]  # counts it
            counted.add(cores)
            on_truth = np.zeros(len(kept), bool)
            matched = np.zeros(len(kept), bool)
            if len(refl):
                ia, _, _ = match_peaks(kept["panel"], kept["fs"], kept["ss"], refl["panel"],
                                       refl["fs"], refl["ss"], MATCH_PX)
                on_truth[ia] = True
            if len(strong):
                ia, _, _ = match_peaks(kept["panel"], kept["fs"], kept["ss"], strong["panel"],
                                       strong["fs"], strong["ss"], MATCH_PX)
                matched[ia] = True
            records[t].append(FrameRecord(
                detector=name, index=index, seed=int(truth.seed), hit=bool(truth.hit),
                strong=int(len(strong)), peaks=kept, on_truth=on_truth, matched_strong=matched,
                source=classify(kept, info) if not truth.hit else np.zeros(0, "U8"),
                dropped_by_defects=len(peaks) - len(kept), gain=params.adu_per_photon,
                conditions=f"{info['notes']} true gain {info['true_gain']:.3g}"))
    return records


def save_records(path: Path, by_detector: dict[str, list[FrameRecord]]) -> None:
    """Every record in one ``.npz`` (plain arrays, no pickle), for re-analysis with ``--load``."""
    records = [r for rs in by_detector.values() for r in rs]
    frames = np.array([(r.detector, r.index, r.seed, r.hit, r.strong, r.dropped_by_defects,
                        np.nan if r.gain is None else r.gain, r.conditions, len(r.peaks))
                       for r in records],
                      dtype=[("detector", "U16"), ("index", "i4"), ("seed", "i8"), ("hit", "?"),
                             ("strong", "i4"), ("dropped", "i4"), ("gain", "f8"),
                             ("conditions", "U64"), ("n", "i4")])
    from peaknet_xtal.types import empty_peaks

    peaks = np.concatenate([r.peaks for r in records]) if records else empty_peaks()
    np.savez_compressed(path, frames=frames, peaks=peaks,
                        on_truth=np.concatenate([r.on_truth for r in records]),
                        matched=np.concatenate([r.matched_strong for r in records]),
                        source=np.concatenate([r.source if len(r.source) else
                                               np.full(len(r.peaks), "", "U8")
                                               for r in records]))


def load_records(path: Path) -> dict[str, list[FrameRecord]]:
    data = np.load(path, allow_pickle=False)
    out: dict[str, list[FrameRecord]] = {}
    start = 0
    for row in data["frames"]:
        stop = start + int(row["n"])
        part = slice(start, stop)
        out.setdefault(str(row["detector"]), []).append(FrameRecord(
            detector=str(row["detector"]), index=int(row["index"]), seed=int(row["seed"]),
            hit=bool(row["hit"]), strong=int(row["strong"]), peaks=data["peaks"][part],
            on_truth=data["on_truth"][part], matched_strong=data["matched"][part],
            source=data["source"][part] if not row["hit"] else np.zeros(0, "U8"),
            dropped_by_defects=int(row["dropped"]),
            gain=None if np.isnan(row["gain"]) else float(row["gain"]),
            conditions=str(row["conditions"])))
        start = stop
    return out


def passes(peaks: np.ndarray, min_snr: float, min_height: float,
           faint_support: int | None = None, faint_snr: float | None = None) -> np.ndarray:
    """Which of one frame's recorded peaks the finding keeps: its SNR and height cuts, then its
    frame-level faint-peak rule (``faint_support`` None: the shared default; the functions are
    ``finding.peaks.below_height`` and ``faint_unsupported`` themselves, as the engine runs
    them after the defect filter the records have been through)."""
    from peaknet_xtal.finding.peaks import below_height, faint_unsupported
    from peaknet_xtal.finding.settings import DEFAULTS

    keep: np.ndarray = peaks["snr"] >= min_snr
    keep &= ~below_height(peaks["max_value"], peaks["background_sigma"], min_height)
    support = DEFAULTS.faint_support if faint_support is None else faint_support
    snr = DEFAULTS.faint_snr if faint_snr is None else faint_snr
    keep[keep] = ~faint_unsupported(peaks[keep], DEFAULTS.faint_height, support, snr)
    return keep


def summarise(records: Sequence[FrameRecord], min_snr: float, min_peaks: int,
              indexable: int, skip: int = 0, min_height: float | None = None,
              faint_support: int | None = None, faint_snr: float | None = None
              ) -> dict[str, float]:
    """The numbers of one detector at given cuts (``min_height``, ``faint_support`` None: the
    shared defaults), without its run's first ``skip`` frames."""
    if min_height is None:
        from peaknet_xtal.finding.settings import DEFAULTS

        min_height = DEFAULTS.min_height
    blanks = [r for r in records if not r.hit and r.index >= skip]
    hits = [r for r in records if r.hit and r.index >= skip]
    false_blank = [int(np.sum(passes(r.peaks, min_snr, min_height, faint_support, faint_snr)))
                   for r in blanks]
    found = correct = matched = true = 0
    called = called_indexable = n_indexable = 0
    for r in hits:
        keep = passes(r.peaks, min_snr, min_height, faint_support, faint_snr)
        n = int(keep.sum())
        found += n
        correct += int(r.on_truth[keep].sum())
        matched += int(r.matched_strong[keep].sum())
        true += r.strong
        called += n >= min_peaks
        if r.strong >= indexable:
            n_indexable += 1
            called_indexable += n >= min_peaks
    precision = correct / found if found else 0.0  # on any true reflection, weak ones too
    recall = matched / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"blanks": len(blanks), "false_per_blank": float(np.mean(false_blank or [0])),
            "false_max": int(max(false_blank or [0])),
            "blank_hits": int(sum(n >= min_peaks for n in false_blank)),
            "hits": len(hits), "hits_called": int(called),
            "indexable": n_indexable, "indexable_called": int(called_indexable),
            "precision": precision, "recall": recall, "f1": f1}


def pooled(per: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-detector :func:`summarise` numbers and their pool over the detectors: false peaks per
    blank over all the blanks, blanks called hits, indexable hits called (the numbers the
    selection scripts' rules read)."""
    blanks = sum(s["blanks"] for s in per.values())
    return {"detectors": per,
            "false_per_blank": sum(s["false_per_blank"] * s["blanks"] for s in per.values())
            / max(blanks, 1),
            "blank_hits": sum(s["blank_hits"] for s in per.values()),
            "indexable_called": sum(s["indexable_called"] for s in per.values())}


def print_summary(by_detector: dict[str, list[FrameRecord]], min_snr: float, min_peaks: int,
                  indexable: int, skip: int = 0, min_height: float | None = None,
                  faint_support: int | None = None, faint_snr: float | None = None) -> None:
    from peaknet_xtal.finding.settings import DEFAULTS

    min_height = DEFAULTS.min_height if min_height is None else min_height
    support = DEFAULTS.faint_support if faint_support is None else faint_support
    snr = DEFAULTS.faint_snr if faint_snr is None else faint_snr
    print(f"min_snr {min_snr:g}, min_height {min_height:g}, faint_support {support}, "
          f"faint_snr {snr:g}, min_peaks {min_peaks}"
          + (f", without each run's first {skip} frames:" if skip else ", every frame:"))
    print(f"  {'detector':11s} {'false/blank':>11s} {'max':>4s} {'blank hits':>10s} "
          f"{'hits called':>11s} {'indexable called':>16s} {'F1 (hits)':>9s} {'recall':>6s}")
    for name, records in by_detector.items():
        s = summarise(records, min_snr, min_peaks, indexable, skip, min_height, support, snr)
        print(f"  {name:11s} {s['false_per_blank']:11.2f} {s['false_max']:4d} "
              f"{s['blank_hits']:4d} of {s['blanks']:3d} {s['hits_called']:4d} of {s['hits']:4d} "
              f"{s['indexable_called']:8d} of {s['indexable']:4d} {s['f1']:9.3f} "
              f"{s['recall']:6.3f}")


def print_sources(by_detector: dict[str, list[FrameRecord]], min_snr: float,
                  min_height: float, skip: int = 0) -> None:
    """Where the blanks' false peaks come from, after each run's first ``skip`` frames (the
    defect filter's learning frames, read ahead and counted first as ``peaknet2cxi`` does; the
    run's gain and spot width are still being learnt on them); then how the probability and SNR
    of those false peaks compare with the hits' true peaks (:func:`print_prob_snr`)."""
    after = f", without each run's first {skip} frames" if skip else ""
    print(f"false peaks on blanks at min_snr {min_snr:g}, min_height {min_height:g}{after}, by "
          "source; SNR, model probability, size and height:")
    by_detector = {name: [r for r in records if r.index >= skip]
                   for name, records in by_detector.items()}
    for name, records in by_detector.items():
        blanks = [r for r in records if not r.hit]
        if not blanks:
            continue
        kept = [passes(r.peaks, min_snr, min_height) for r in blanks]  # per frame: its rule
        peaks = np.concatenate([r.peaks[k] for r, k in zip(blanks, kept, strict=True)])
        source = np.concatenate([r.source[k] for r, k in zip(blanks, kept, strict=True)])
        counts = {s: int(np.sum(source == s)) for s in ("hot", "streak", "zinger", "other")}
        dropped = sum(r.dropped_by_defects for r in blanks)
        gains = sorted({round(r.gain, 2) if r.gain else None for r in blanks}, key=str)
        snr = np.percentile(peaks["snr"], [10, 50, 90]) if len(peaks) else [np.nan] * 3
        prob = np.percentile(peaks["prob"], [10, 50, 90]) if len(peaks) else [np.nan] * 3
        npix = np.percentile(peaks["npix"], [10, 50, 90]) if len(peaks) else [np.nan] * 3
        print(f"  {name}: {len(peaks)} on {len(blanks)} blanks: {counts}; "
              f"{dropped} dropped by the defect filter (any SNR); gain used {gains}")
        print(f"    SNR p10/50/90 {snr[0]:.1f}/{snr[1]:.1f}/{snr[2]:.1f}, prob "
              f"{prob[0]:.2f}/{prob[1]:.2f}/{prob[2]:.2f}, pixels {npix[0]:.0f}/{npix[1]:.0f}/"
              f"{npix[2]:.0f}")
        # peak height: the brightest pixel over the background's pixel noise, for the noise-level
        # false peaks ("other") beside the weak true peaks of the hits (SNR below 8)
        weak = [r.peaks[passes(r.peaks, min_snr, min_height) & (r.peaks["snr"] < 8)
                        & r.matched_strong] for r in records if r.hit]
        for label, rows in (("other", peaks[source == "other"]),
                            ("weak true", np.concatenate(weak) if weak else peaks[:0])):
            noisy = rows["background_sigma"] > 0  # a noiseless background has no height
            height = rows["max_value"][noisy] / rows["background_sigma"][noisy]
            if len(height):
                q = np.percentile(height, [10, 50, 90])
                print(f"    height over background sigma, {label} peaks p10/50/90 "
                      f"{q[0]:.1f}/{q[1]:.1f}/{q[2]:.1f} ({len(height)})")
        worst = sorted(zip(blanks, kept, strict=True), key=lambda rk: -int(rk[1].sum()))[:3]
        for r, k in worst:
            print(f"    seed {r.seed}: {int(k.sum())} peaks ({r.conditions})")
    print_prob_snr(by_detector, min_snr, min_height)


#: bin edges of :func:`print_prob_snr`
PROB_EDGES = (0.0, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0)
SNR_EDGES = (0.0, 3.5, 4.0, 5.0, 6.0, 8.0, np.inf)


def print_prob_snr(by_detector: dict[str, list[FrameRecord]], min_snr: float,
                   min_height: float) -> None:
    """Counts by peak probability (rows) and SNR (columns), pooled over detectors: the blanks'
    false peaks beside the hits' peaks on a strong reflection.  Why: a cut on either (a higher
    threshold, min_snr, or both for doubtful peaks) removes the false peaks of a cell only with
    the true peaks of the same cell."""
    from peaknet_xtal.types import empty_peaks

    rows = {"blanks' false peaks": [r.peaks[passes(r.peaks, min_snr, min_height)]
                                    for records in by_detector.values()
                                    for r in records if not r.hit],
            "hits' true strong peaks": [r.peaks[passes(r.peaks, min_snr, min_height)
                                                & r.matched_strong]
                                        for records in by_detector.values()
                                        for r in records if r.hit]}
    columns = " ".join(f"{f'<{hi:g}' if np.isfinite(hi) else f'>={lo:g}':>6}"
                       for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:], strict=True))
    for label, parts in rows.items():
        peaks = np.concatenate(parts) if parts else empty_peaks()
        counts, _, _ = np.histogram2d(peaks["prob"], peaks["snr"], (PROB_EDGES, SNR_EDGES))
        print(f"  {label} ({len(peaks)}) by probability (rows) and SNR (columns):")
        print(f"    {'prob':>9} {columns}")
        for lo, hi, row in zip(PROB_EDGES[:-1], PROB_EDGES[1:], counts, strict=True):
            print(f"    {lo:.2f}-{hi:.2f} " + " ".join(f"{int(c):>6}" for c in row))


def real_frames(min_snr: float | None, min_peaks: int | None, min_height: float | None = None
                ) -> list[tuple[str, str, int, bool]]:
    """(group, file, peaks, hit) for the real frames, through the engine with the defaults
    (one engine per group: one run per detector, as ``peaknet2cxi`` would process them)."""
    from peaknet_xtal.finding.engine import InferenceEngine
    from peaknet_xtal.registry import open_source

    groups = {
        "thaumatin (Pilatus 6M grid, hits)": sorted(
            (REAL / "pilatus6m_thaumatin_grid").glob("*.cbf.bz2")),
        "CSPAD stills (hits)": sorted((REAL / "cspad_thermolysin_stills").glob("*.cbf")),
        "single synchrotron images": sorted(
            (REAL / "synchrotron_single_images").glob("*.cbf.gz")),
        "L-cysteine Pilatus 2M (5-18 listed spots each)": sorted(
            (REAL / "pilatus2m_lcysteine_rotation").glob("*.cbf.bz2")),
    }
    options: dict[str, Any] = {}
    if min_snr is not None:
        options["min_snr"] = min_snr
    if min_peaks is not None:
        options["min_peaks"] = min_peaks
    if min_height is not None:
        options["min_height"] = min_height
    out = []
    for group, files in groups.items():
        engine = InferenceEngine(device="cpu", **options)
        for path in files:
            source = open_source(str(path))
            try:
                for result in engine.find_frames(iter(source)):
                    out.append((group, path.name, len(result.peaks), bool(result.hit)))
            finally:
                source.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="set_name", choices=sorted(SEED_BASE), default="acceptance")
    parser.add_argument("--frames", type=int, default=24, help="blanks (and hits) a detector")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--model", default="default")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="probability thresholds to measure (default: the shared default); "
                             "the first is summarised, --save writes one file per threshold")
    parser.add_argument("--min-snr", dest="min_snr", type=float, default=None,
                        help="default: the shared default")
    parser.add_argument("--min-height", dest="min_height", type=float, default=None,
                        help="default: the shared default")
    parser.add_argument("--min-peaks", dest="min_peaks", type=int, default=None,
                        help="default: the shared default")
    parser.add_argument("--indexable", type=int, default=15,
                        help="strong reflections that make a hit 'indexable' (default 15)")
    parser.add_argument("--sources", action="store_true")
    parser.add_argument("--true-gain", dest="true_gain", action="store_true",
                        help="give the engine the simulated gain (detectors with a fixed one)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--noisy-counting", dest="exact_counts", action="store_false",
                        help="photon-counting detectors with read noise and pedestals, as the "
                             "training bank's frames all have")
    parser.add_argument("--real", action="store_true", help="also the real frames")
    parser.add_argument("--flickering", type=int, default=0,
                        help="that many more unmasked hot pixels, each lit in half the frames")
    parser.add_argument("--no-sim", dest="sim", action="store_false")
    parser.add_argument("--skip", type=int, default=None,
                        help="also summarise without each run's first SKIP frames (default: "
                             "the defect filter's learning frames)")
    parser.add_argument("--save", type=Path, help="write the per-frame records here (.npz)")
    parser.add_argument("--load", type=Path, help="analyse saved records instead of running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from peaknet_xtal.finding.settings import DEFAULTS

    min_snr = DEFAULTS.min_snr if args.min_snr is None else args.min_snr
    min_peaks = DEFAULTS.min_peaks if args.min_peaks is None else args.min_peaks
    min_height = DEFAULTS.min_height if args.min_height is None else args.min_height
    from peaknet_xtal.finding.defects import MIN_FRAMES

    skip = MIN_FRAMES if args.skip is None else args.skip
    by_detector: dict[str, list[FrameRecord]] = {}
    per_threshold: dict[Hashable, dict[str, list[FrameRecord]]] = {}
    if args.load:
        by_detector = load_records(args.load)
    elif args.sim:
        print(f"{args.set_name} set: seeds {SEED_BASE[args.set_name]:,} + 10,000 x detector + "
              f"frame; {args.frames} blanks + {args.frames} hits per detector", flush=True)
        for name in args.detectors:
            start = time.perf_counter()
            measured = measure(name, args.set_name, args.frames, args.frames, args.model,
                               args.thresholds, args.true_gain, args.exact_counts,
                               flickering=args.flickering)
            for t, records in measured.items():
                per_threshold.setdefault(t, {})[name] = records
            print(f"  {name}: {2 * args.frames} frames in {time.perf_counter() - start:.0f} s",
                  flush=True)
        for t, records_by_detector in per_threshold.items():
            if args.save:
                save_records(args.save.with_name(f"{args.save.stem}-t{t:g}.npz"),
                             records_by_detector)
        by_detector = next(iter(per_threshold.values()))
    if by_detector:
        print_summary(by_detector, min_snr, min_peaks, args.indexable, 0, min_height)
        if skip:
            print_summary(by_detector, min_snr, min_peaks, args.indexable, skip, min_height)
        if min_peaks != 0:
            print("the former default, min_peaks 0 (every frame a hit), for comparison:")
            print_summary(by_detector, min_snr, 0, args.indexable, skip, min_height)
        if args.sources:
            print_sources(by_detector, min_snr, min_height, skip)
        if args.sweep:
            for snr in (3.0, 3.5, 4.0, 5.0):
                for peaks in (1, 5, 10, 15, 20):
                    print_summary(by_detector, snr, peaks, args.indexable, skip, min_height)
            for height in (0.0, 4.0, 5.0, 6.0):
                print_summary(by_detector, min_snr, min_peaks, args.indexable, skip, height)
            for support in (0, 1, 3, 5, 10):
                print_summary(by_detector, min_snr, min_peaks, args.indexable, skip, None,
                              support)
            for faint_snr in (0.0, 4.0, 5.0, 6.0):
                print_summary(by_detector, min_snr, min_peaks, args.indexable, skip, None,
                              None, faint_snr)
    if args.real:
        print(f"real frames (min_snr {min_snr:g}, min_height {min_height:g}, min_peaks "
              f"{min_peaks}):")
        rows = real_frames(args.min_snr, args.min_peaks, args.min_height)
        for group in dict.fromkeys(r[0] for r in rows):
            mine = [r for r in rows if r[0] == group]
            print(f"  {group}: {sum(r[3] for r in mine)} of {len(mine)} called hits; peaks "
                  + ", ".join(f"{r[1]} {r[2]}" for r in mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
