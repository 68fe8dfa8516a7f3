"""The simulated model-selection frames a candidate default peak model is chosen on.

Two parts, both simulated from seeds in the model-selection range (2,000,000,001+), far from the
training bank's draws (examples/train_default_model.py, seed 20240), the held-out acceptance
frames (evaluation/held_out.py, 3,000,100,001+), the report's sets (examples/make_eval_report.py,
4,000,000,000+) and the blank benchmark's sets (benchmarks/bench_blanks.py, selection
5,000,000,000+ is its own selection set):

- ``validation``: 12 mixed frames (seeds 2,000,000,001-012) on ePix10k2M, CSPAD and Rayonix:
  randomised hits, three blanks, a third on a strong smooth background (sim.artifacts; the
  reflections it drowns are not counted as strong: ``on_strong_background``);
- ``clean``: 24 clean randomised hits (seeds 2,000,000,101-124), six each on ePix10k2M, CSPAD,
  Rayonix and JUNGFRAU 4M, drawn as the held-out frames are (``SimConfig.randomised`` with every
  frame a hit and 1-30 ADU per photon), so that a recall loss on ordinary hits shows here before
  acceptance.  The 12 mixed frames alone did not see one: the ``swift`` candidate scored F1 0.815
  there against the previous default's 0.807 and then lost 0.15 of recall on the held-out frames;
- ``blanks``: 8 more blank frames (seeds 2,000,000,201-208), two on each of those four detectors,
  every other one on a strong smooth background.  With the three blanks of the mixed frames
  alone, one strong-background Rayonix blank set the calibrated threshold of ``swift`` (23 false
  peaks there at probability 0.5, at most one on the other two) and with it the recall lost on
  every ordinary hit;
- ``sharp``: 24 randomised hits (seeds 2,000,000,301-324) on the same four detectors whose spots
  are about a pixel across or short radial lines (``sim.sharp_spot_settings``, drawn from a
  generator of their own seeded ``(seed, 1)``), as the LCLS CSPAD stills show them
  (``benchmarks/spot_shapes.py``: 83 % of their bright compact spots are narrower than a pixel
  across, 2 % of the randomised simulation's).  With the other parts alone selection could not
  see what a candidate gains or loses on such spots: they hold almost none.

``PARTS`` names them; ``selection_frames(parts=...)`` builds some of them (benchmarks whose
settings were chosen on the first three rerun on those three).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: mixed frames: seeds and the detector each third of them is on (k % 3), as the train script
#: always drew them
VALIDATION_SEEDS = range(2_000_000_001, 2_000_000_013)
VALIDATION_GEOMETRIES = ("om_lcls_mfx_epix10k2M.geom", "crystfel_doc_cspad-cxiformat.geom",
                         "om_lcls_rayonix.geom")
#: clean hits: seeds, taken in turn by the four detectors below
CLEAN_SEEDS = range(2_000_000_101, 2_000_000_125)
CLEAN_GEOMETRIES = ("om_lcls_mfx_epix10k2M.geom", "crystfel_doc_cspad-cxiformat.geom",
                    "om_lcls_rayonix.geom", "om_lcls_cxi_jungfrau4M.geom")
#: more blanks: seeds, taken in turn by the same four detectors, odd ones on a strong background
BLANK_SEEDS = range(2_000_000_201, 2_000_000_209)
#: sharp-spot hits: seeds, taken in turn by the same four detectors
SHARP_SEEDS = range(2_000_000_301, 2_000_000_325)
#: every part, in the order :func:`selection_frames` builds them
PARTS = ("validation", "clean", "blanks", "sharp")
#: the parts before the sharp-spot one: what the shipped default and the finding settings chosen
#: before it were chosen on (their scripts keep to them, so that their results reproduce)
FIRST_PARTS = PARTS[:3]
#: where the model-selection seed range ends (the held-out frames begin above it)
SELECTION_SEED_RANGE = range(2_000_000_001, 3_000_000_000)


def validation_frames(geometries: str | os.PathLike[str]) -> list[tuple[Any, Any]]:
    """(frame, truth) pairs of the 12 mixed frames: hits and blanks on three detectors, a third
    of them on a strong smooth background."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    out = []
    for k, seed in enumerate(VALIDATION_SEEDS):
        name = VALIDATION_GEOMETRIES[k % len(VALIDATION_GEOMETRIES)]
        rng = np.random.default_rng(seed)
        gain = float(rng.uniform(1, 30))
        config = SimConfig.randomised(rng, hit_probability=0.0 if k % 4 == 3 else 1.0,
                                      adu_per_photon=gain)
        frame, truth = simulate_frame(read_geometry(Path(geometries) / name), seed, config)
        if k % 3 == 2:  # strong background: photons of the simulated frame on a bright field
            on_strong_background(frame, truth, rng, gain)
        frame.meta["selection"] = {"part": "validation", "detector": name, "seed": seed,
                                   "spot_sigma_px": config.spot_sigma_px, "gain": gain}
        out.append((frame, truth))
    return out


def clean_hit_frames(geometries: str | os.PathLike[str]) -> list[tuple[Any, Any]]:
    """(frame, truth) pairs of the 24 clean randomised hits on four detectors."""
    return _randomised_frames(geometries, CLEAN_SEEDS, "clean", hit=True, strong_background=False)


def blank_frames(geometries: str | os.PathLike[str]) -> list[tuple[Any, Any]]:
    """(frame, truth) pairs of the 8 extra blanks on four detectors, half on a strong smooth
    background."""
    return _randomised_frames(geometries, BLANK_SEEDS, "blanks", hit=False,
                              strong_background=True)


def sharp_hit_frames(geometries: str | os.PathLike[str]) -> list[tuple[Any, Any]]:
    """(frame, truth) pairs of the 24 sharp-spot hits on four detectors."""
    return _randomised_frames(geometries, SHARP_SEEDS, "sharp", hit=True, strong_background=False,
                              sharp=True)


def _randomised_frames(geometries: str | os.PathLike[str], seeds: range, part: str, *,
                       hit: bool, strong_background: bool, sharp: bool = False
                       ) -> list[tuple[Any, Any]]:
    """Randomised frames on ``CLEAN_GEOMETRIES`` in turn, 1-30 ADU per photon; with
    ``strong_background`` every other one on a strong smooth background; with ``sharp`` spots
    about a pixel across (their settings from a generator of their own, so that the frames'
    other conditions are the draws they would be without)."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, sharp_spot_settings, simulate_frame

    cache: dict[str, Any] = {}
    out = []
    for k, seed in enumerate(seeds):
        name = CLEAN_GEOMETRIES[k % len(CLEAN_GEOMETRIES)]
        if name not in cache:
            cache[name] = read_geometry(Path(geometries) / name)
        rng = np.random.default_rng(seed)
        gain = float(rng.uniform(1, 30))
        spots = sharp_spot_settings(np.random.default_rng([seed, 1])) if sharp else {}
        config = SimConfig.randomised(rng, hit_probability=1.0 if hit else 0.0,
                                      adu_per_photon=gain, **spots)
        frame, truth = simulate_frame(cache[name], seed, config)
        if strong_background and k % 2 == 1:
            on_strong_background(frame, truth, rng, gain)
        frame.meta["selection"] = {"part": part, "detector": name, "seed": seed,
                                   "spot_sigma_px": config.spot_sigma_px, "gain": gain}
        out.append((frame, truth))
    return out


def on_strong_background(frame: Any, truth: Any, rng: np.random.Generator, gain: float) -> None:
    """Put ``frame``'s photons on a strong smooth background in place
    (``sim.artifacts.strong_background_panel``), and unflag as strong the reflections of
    ``truth`` that it drowned (``drowned_strong_peaks``, ``drowned_reflections``).

    Why: the simulation flags a reflection strong against the background it simulated; one that
    the added background buries is no longer findable, and counting it charged every candidate
    with the same misses (on the mixed frames 208 of the 257 strong reflections of the three
    strong-background hits).  Unflagged reflections stay true reflections: a peak on one is not
    false.  Same random draws as before, so the frames themselves are unchanged.
    """
    from peaknet_xtal.sim import artifacts

    panels, drowned = [], []
    for p, panel in enumerate(frame.panels):
        photons = np.asarray(panel, float) / gain
        image, scale, psf = artifacts.strong_background_panel_parts(photons, rng, gain)
        panels.append(image.astype(np.float32))
        if len(truth.reflections):
            drowned.append(artifacts.drowned_strong_peaks(
                photons * gain, truth.peak_masks[p],
                None if frame.masks is None else frame.masks[p], scale, psf))
    frame.panels = panels
    if len(truth.reflections):
        gone = artifacts.drowned_reflections(truth.reflections, drowned)
        truth.reflections["strong"] &= ~gone


def selection_frames(geometries: str | os.PathLike[str], parts: Sequence[str] = PARTS
                     ) -> dict[str, list[tuple[Any, Any]]]:
    """The ``parts`` (default: all of :data:`PARTS`), by name."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown selection part(s) {unknown}; the parts are {list(PARTS)}")
    build = {"validation": validation_frames, "clean": clean_hit_frames, "blanks": blank_frames,
             "sharp": sharp_hit_frames}
    return {part: build[part](geometries) for part in PARTS if part in parts}
