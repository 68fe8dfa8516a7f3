"""The finding settings every entry point shares, defined once, and the one gain resolution.

``PeakFinder`` (library), ``peaknet2cxi`` (CLI), ``dials.find_spots algorithm=peaknet`` (its PHIL
defaults are generated from :data:`DEFAULTS`, see ``plugins/peaknet_dials``), the Ray workers and
the evaluation all start from these values, so the same pixels give the same peaks (and the same
hit flags) whichever door they came in through.  An entry point may *override* a value
(``peaknet2cxi`` keeps CrystFEL's cap of 2048 peaks for its CXI tables), never redefine a default.

**Hit calling** (:data:`DEFAULTS` ``.min_peaks``, :func:`check_min_peaks`): a frame is a hit when
it has at least ``min_peaks`` peaks, the rule serial crystallography's hit finders use.
CrystFEL's ``indexamajig --min-peaks`` (default 0: every frame is a hit) skips indexing below
that count and writes ``hit = 0`` in the stream; Cheetah's peak-count hit finder
(``hitfinderAlgorithm`` 3/8, ``hitfinderNpeaks``, 50 in its defaults) and OM's crystallography
monitor (``min_num_peaks_for_hit``, 10 in its example configurations) call a hit from a minimum
peak count; indexamajig command lines in public processing scripts use 4-25.  The library once
used 0, which calls every frame a hit, blanks included.  The comment
after :data:`DEFAULTS` says how the default was chosen, and what it cannot do.

The detector gain (ADU per photon; the shot-noise term of each peak's SNR) is resolved by
:func:`resolve_gain` alone: a user override, else what the frame's source declares, else what its
geometry declares (``adu_per_photon``, or ``adu_per_eV`` x photon energy), else an estimate from
the image data when one is plugged in, else unknown (background noise only).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FindingDefaults:
    """Defaults of the finding pipeline (see the module docstring)."""

    model: str = "default"  # a registered name or a weights path
    device: str = "auto"  # CUDA when torch sees a GPU, else the CPU
    threshold: float = 0.5  # peak probability at or above which a pixel is foreground
    min_snr: float = 3.0  # least integrated SNR of a peak (0 keeps every component)
    # least height of a peak's brightest pixel over its local background, in that background's
    # noise sigmas: peakfinder8's pixel test (5 at CrystFEL's default --min-snr); 0, no such cut,
    # is the default (the comment after DEFAULTS says why)
    min_height: float = 0.0
    min_peaks: int = 10  # peaks that make a hit (see the module docstring)
    max_peaks: int | None = None  # keep the strongest N per frame (None: all)
    batch_size: int = 8  # model input per batch, in 1-Mpx slots (engine.SLOT_PIXELS)
    # Largest panel side the model sees whole; only bigger panels are cut into tiles.  Whole
    # panels make a panel's peaks independent of tile cuts (the network's image-wide statistics
    # cover the panel); 1024-px tiles found 99.3 % of the whole panel's peaks (the comment after
    # DEFAULTS).  A smaller value saves memory on huge panels, at that price (a user trial, 3
    # simulated Eiger 16M frames of one 4148 x 4362 panel: 1024-px tiles took peak memory from
    # 1.9 to 1.4 GB and found 878 of frame 0's 881 peaks); every entry point takes it.
    tile_size: int = 8192
    tile_overlap: int = 64  # pixels shared by neighbouring tiles
    dilation: int = 1  # pixels a peak grows by in a pixel mask for DIALS' own labelling
    # The network's arithmetic (PRECISIONS): "bf16" runs it under bfloat16 autocast, the input
    # normalisation, probabilities and peaks staying float32; PRECISIONS says what it gains
    # and why float32 stays the default.
    precision: str = "fp32"
    # Bright backgrounds (finding/bright_background.py): from this many photons a pixel of local
    # background (None: never) a peak is a box significance region the network does not reject.
    bright_photons: float | None = 100.0  # chosen on counting statistics (that module)
    bright_sigmas: float = 5.5  # least significance of the region's best box
    bright_prob: float = 0.3  # least network probability somewhere in the region
    # Doubted peaks (finding/peaks.py, PeakParams): a point-like component the network scores
    # at or above rescue_prob but nowhere at threshold is a peak when its brightest pixel stands
    # rescue_height local background sigmas high; off while rescue_prob is not below threshold.
    # Chosen on model-selection data (the comment after DEFAULTS).
    rescue_prob: float = 0.4
    rescue_height: float = 20.0
    # Faint peaks (finding/peaks.py, faint_unsupported): a peak whose brightest pixel stands
    # under faint_height local background sigmas (peakfinder8's pixel test at CrystFEL's default,
    # not tuned here) is reported only on a frame with at least faint_support peaks that stand
    # that high; 0: always.  Chosen on model-selection data (the comment after DEFAULTS).
    faint_height: float = 5.0
    faint_support: int = 5
    # ... and whose integrated SNR is at least faint_snr (0: height alone); chosen on
    # model-selection data too.
    faint_snr: float = 4.0
    # One min_snr for every entry point, DIALS included.  DIALS used 4 while the images it hands
    # over counted at the format's nominal gain (1 on CSPAD CBFs, really ~30 ADU/photon), which
    # understated shot noise; now that such placeholder gains are measured from the data
    # (finding/gain.py), 3 holds there too.  Measured on the real CSPAD stills with defaults:
    # min_snr 4 -> 176 / 80 spots, 166 / 44 indexed; 3 -> 224 / 106 spots, 195 / 49 indexed,
    # cells within 0.6 % of 92.9, 92.9, 130.4.


DEFAULTS = FindingDefaults()

# How ``min_peaks`` was chosen (``benchmarks/bench_blanks.py --set selection``; model-selection
# seeds 5,000,000,000+, never an acceptance set; threshold 0.5 and min_snr 3 as above): 24 blanks
# and 24 hits on each of ePix10k2M, CSPAD, JUNGFRAU 4M and Rayonix with randomised conditions
# (a third on strong smooth backgrounds, recurring unmasked hot pixels, jet streaks, zingers),
# scored after each run's first five frames (the defect filter's learning frames).  Blanks
# called hits / all 83 blanks, hits called / 89 hits, hits with >= 15 strong reflections called
# / 73: min_peaks 0: 83, 89, 73; 5: 58, 87, 73; 10: 51, 85, 73; 15: 46, 82, 72; 20: 45, 80, 72;
# 30: 41, 79, 71.  10 is the largest count that keeps every hit with 15 or more strong
# reflections (the ones an indexer can use); above it few more blanks are rejected while real
# hits start to go, because the blanks still called hits are those on strong smooth backgrounds
# (31-114 false peaks on ePix10k2M, CSPAD, JUNGFRAU) and most Rayonix blanks (12-356): a model
# limitation that no peak count separates from a hit.  Without a strong background 21 of 52
# blanks remain hits at 10 (14 of them Rayonix), against 52 at 0.  Neither a higher probability
# threshold nor min_snr 4 reaches one false peak per blank either (threshold 0.6: 9-18 a blank;
# min_snr 4: 18-29); both raise F1 a little (precision) but lose recall on the hits (0.6:
# 0.03-0.09; min_snr 4: 0.008-0.02; on the real CSPAD stills min_snr 4 also indexes fewer
# spots, above), so they stay.
#
# Since the SNR counts the background's own noise correlation and the ring background's error
# (finding/peaks.py; the numbers above are from before), on the same selection frames at
# min_snr 3 (after each run's first five frames; ePix10k2M / CSPAD / JUNGFRAU 4M / Rayonix):
# false peaks per blank 23.8 / 44.2 / 32.5 / 55.2 -> 12.3 / 13.2 / 12.9 / 39.0, recall on the
# hits 0.755 / 0.621 / 0.748 / 0.630 -> 0.752 / 0.607 / 0.746 / 0.612, F1 0.820 / 0.683 / 0.718
# / 0.694 -> 0.837 / 0.728 / 0.799 / 0.702, blanks called hits 8 / 12 / 13 / 18 -> 9 / 12 / 12 /
# 18 of 20-23.  min_snr 3.5 or 4 would halve the false peaks again at a similar F1 (4: 5.7 /
# 5.1 / 6.5 / 13.3 false peaks, F1 0.838 / 0.711 / 0.819 / 0.713) but drop one of the 17
# indexable CSPAD and JUNGFRAU hits below min_peaks, so 3 and 10 stay.  What remains on blanks
# is the model's: jet streaks (1-6 a blank), zingers, and blobs of strong smooth backgrounds.
#
# The numbers above are the previous default's (v1, global input standardisation).  For today's
# default (local normalisation, decorrelated input; examples/train_default_model.py) on the same
# selection frames, min_snr 3, after each run's first five frames (ePix10k2M / CSPAD / JUNGFRAU
# 4M / Rayonix): false peaks per blank 6.6 / 1.9 / 6.5 / 3.7; at min_peaks 10 blanks called hits
# 4 / 0 / 4 / 0 of 20-23, hits with >= 15 strong reflections called 21 / 17 / 15 / 18 of 21 / 17
# / 17 / 18.  The rule above would now give min_peaks 5 (every such hit kept), which calls 32 of
# 83 blanks hits (10: 8), so 10 stays: this model finds fewer peaks on two weak JUNGFRAU hits,
# and fewer noise blobs everywhere.  min_snr 4 with min_peaks 5 would call 3 blanks hits and
# keep 72 of those 73 hits, at 0.006-0.035 lower F1 on the hits; not taken without also
# re-measuring the real stills' indexing, which set min_snr 3 above.


# How min_height was measured, and why it is off by default.  5 background sigmas is the pixel test
# of peakfinder8 at CrystFEL's default ``--min-snr`` (no pixel joins a peak below local background +
# min-snr x local sigma; indexamajig's peak search starts from 5), not a value tuned here.  On the
# model-selection runs of ``benchmarks/bench_blanks.py --set selection`` (never an acceptance set;
# the records' peaks at min_snr 0 and min_height 0, both cuts applied afterwards), after each run's
# first five frames (ePix10k2M / CSPAD / JUNGFRAU 4M / Rayonix / Pilatus 6M / Eiger 16M bin 2),
# min_height 0 -> 5: false peaks per blank 2.15 / 2.00 / 5.20 / 3.65 / 2.86 / 2.24 -> 0.75 / 0.65 /
# 1.95 / 1.87 / 0.50 / 0.38 (all 126 blanks: 3.02 -> 1.02), blanks called hits 5 -> 0 of 126,
# indexable hits (>= 15 strong reflections) called 99 of 100 either way, F1 on the hits 0.936 /
# 0.922 / 0.924 / 0.935 / 0.903 / 0.840 -> 0.932 / 0.916 / 0.921 / 0.931 / 0.895 / 0.826 (the
# weakest true spots, SNR 3-6).  The noise-level false peaks stand 3.3-4.8 sigmas high (median),
# weak true peaks 11-22; what remains on blanks is mostly jet streaks and zingers, whose pixels are
# genuinely bright.  It passed the bar a change of default must pass on those runs (fewer false
# peaks per blank, no indexable hit lost, no more blank hits, F1 no more than 0.015 lower on any
# detector), but the acceptance gates that pass today then failed or fell: the evaluation report's
# strong-background Rayonix set found 89.3 % of its strong reflections (issue 14 and
# tests/examples/test_make_eval_report.py ask 90 %; 90.9 % without), its hard ePix10k2M set (weak
# and larger spots) fell from F1 0.844 to 0.789 (recall 0.746 -> 0.657: a broad spot's brightest
# pixel is low while its sum is significant), the other sets by 0.002-0.008 with 0.1-0.8 fewer false
# peaks a blank; the held-out frames of tests/model/test_default_model.py from F1 0.910 to 0.903;
# the real CSPAD still ``...601`` from 47 to 43 indexed spots (dispersion 52); the thaumatin grid
# frames lost 12-20 % of their peaks (weak, SNR 3.4-6, at 2.1-2.4 A median).  So it stays off: users
# whose runs are mostly blanks and whose spots are compact (hit finding at an XFEL) can ask for
# ``min_height 5``, and a selection set that carries broad weak spots must decide before it becomes
# a default.


# How bright_sigmas and bright_prob were chosen (``benchmarks/select_bright_background.py``, its
# rule fixed before the grid ran: the best F1 on the strong-background hits among the settings
# with at most 1 false peak per strong-background blank and nothing worse elsewhere; the 44
# model-selection frames, never an acceptance set; bright_photons 100 fixed beforehand).  Grid:
# prob 0.1 / 0.2 / 0.3 x sigmas 5 / 5.5 / 6 / 6.5.  Test off: strong-background hits F1 0.368,
# false peaks per strong-background blank 2.2 (11 on 5).  prob 0.3, 5.5 sigmas: F1 0.401, 0.8 a
# blank; at 0.1 the network lets noise through (5.5 sigmas: 8.4 a blank), at 6.5 sigmas the
# strong-background F1 falls back (0.3: 0.368).  The clean hits, the other mixed frames and the
# other blanks are unchanged at every setting: none of their pixels is bright.
# With the chosen setting the evaluation report's strong-background Rayonix set (acceptance)
# went from recall 0.852 and 1.83 false peaks per blank to 0.909 and 0.17 (F1 0.912 -> 0.951).


# How rescue_prob and rescue_height were chosen (``benchmarks/select_rescue.py``, its rule fixed
# before the grid ran; model-selection data only: the 68 frames of evaluation/selection.py, their
# 24 sharp-spot hits included, and the 288 frames of bench_blanks.py's selection runs on six
# detectors).  Why: the default scores spots narrower than a pixel 0.3-0.6 (benchmarks/
# spot_shapes.py), so it missed tall, obvious spots of that shape, most of the LCLS CSPAD stills'.
# Grid: prob 0.2 / 0.3 / 0.4 x height 10 / 15 / 20 / 30.  Rescue off: sharp-spot F1 0.725, false
# peaks per blank 3.02 on the runs' 126 blanks (0.64 on the frames' 11), 5 blanks called hits, 99
# indexable hits called.  Without the point-like test every setting added 0.29 or more false
# peaks a blank (cosmic-ray tracks, jet streaks) and none passed; with it, prob 0.4 at height 20
# or 30 passed, and 20 is chosen: sharp-spot F1 0.768, 3.06 false peaks per blank (0.64), 5 blank
# hits, 100 indexable hits called, F1 on the runs' hits 0.936 / 0.928 / 0.928 / 0.939 / 0.908 /
# 0.842 against 0.936 / 0.922 / 0.924 / 0.935 / 0.903 / 0.840 (ePix10k2M / CSPAD / JUNGFRAU 4M /
# Rayonix / Pilatus 6M / Eiger 16M binned), mixed and clean F1 0.918 / 0.911 against 0.918 /
# 0.910.  Lower probabilities gain more sharp-spot F1 (0.3: 0.80; 0.2: 0.81-0.83) at 0.18 or
# more false peaks a blank on the frames, or more blank hits on the runs.  Acceptance, measured
# after the choice: docs/measurements.md, "Real frames".


# How faint_support was chosen (``benchmarks/select_faint_support.py``, output in
# ``benchmarks/results/``; model-selection data only: evaluation/selection.py's 68 frames and the
# 288 frames of bench_blanks.py's selection runs on six detectors; faint_height 5 fixed
# beforehand as peakfinder8's pixel test).  Why: min_height 5 on every peak (above) took the
# selection runs' false peaks per blank from 3.02 to 1.02 but lost the weak and broad true spots
# of hits; the noise-level calls it removed sit on blanks, where nothing tall backs them.  Grid
# 0 (off) / 1 / 2 / 3 / 5 / 7 / 10; the rule (no indexable hit lost, no more blank hits, F1 on no
# detector or selection part down by more than 0.002, the fewest false peaks per blank): 5.
# Off -> 5: false peaks per blank on the runs' 126 blanks 3.06 -> 1.14 (ePix10k2M / CSPAD /
# JUNGFRAU 4M / Rayonix / Pilatus 6M / Eiger 16M binned 2.20 / 2.00 / 5.25 / 3.70 / 2.91 / 2.24
# -> 0.80 / 0.65 / 2.30 / 2.04 / 0.64 / 0.38), blanks called hits 5 -> 2, indexable hits called
# 100 -> 100, F1 on the runs' hits 0.937 / 0.928 / 0.928 / 0.939 / 0.908 / 0.842 -> 0.937 /
# 0.929 / 0.930 / 0.939 / 0.908 / 0.843 (a few faint false peaks of weak hits go too); on the
# selection frames F1 unchanged (mixed 0.863, clean 0.911, sharp-spot 0.768) and false peaks per
# blank 0.64 -> 0.27.  10 would give 1.06 a blank and no blank hit but loses an indexable hit
# (10 peaks, 9 of them tall).  What remains on the blanks (after each run's learning frames):
# jet streaks and zingers, genuinely tall, and tall noise-level calls on JUNGFRAU 4M and
# Rayonix (36 and 31 of the 144), where issue 14's one false peak per blank is still not met.
# Off where a DIALS panel is found alone (the rule needs the whole image).  The training
# script's threshold calibration (stage 3) scores without it, as it scores without the defect
# filter, so the shipped model's rebuild is unchanged; stage 4 and 4b score with it.
#
# How faint_snr was chosen (``benchmarks/select_faint_snr.py``, the same data and limits, its
# rule written before its grid was computed).  Why: those tall noise-level calls stand 5-13
# background sigmas high with an integrated SNR of 3-4.5, clusters of a few photons on sparse
# backgrounds: tall in background sigmas, weak once their own shot noise counts.  Grid 0 (height
# alone) / 4 / 5 / 6 / 8 with faint_support 5: 4.  0 -> 4: false peaks per blank on the runs'
# 126 blanks 1.14 -> 0.53, blanks called hits 2 -> 0, indexable hits called 100 -> 100, F1 on
# the runs' hits within 0.001 per detector, on the selection frames within 0.001 (false peaks
# per blank 0.27 -> 0.09).  5 would give 0.38 but loses two indexable hits (6: 0.33, three).
#
# What the faint-peak rules left on blanks was mostly zingers (genuinely tall, compact), which
# no setting here may touch without the weak peaks of hits.  The defect filter now drops
# sharp-edged tracks and judges a blank by the run's spot width (``finding/defects.py``;
# chosen by ``benchmarks/select_spike_cores.py``, the same data and limits): on the runs' 126
# blanks 0.53 -> 0.35 false peaks per blank, no blank a hit either way, indexable hits 100 ->
# 100, F1 per detector equal or up; measured once on the held-out runs afterwards, every
# integrating detector within issue 14's 1 a blank (README, "Hits").

#
# Why tile_size is 8192 (each panel whole; measured 2026-12-06, docs/measurements.md, "Tiles and
# layouts"): with 1024-px tiles the network's image-wide statistics (GRN, GroupNorm) were each
# tile's, so a panel's peaks depended on where the cuts fell (whole panels found 99.3 % of the
# tiled run's peaks).  Whole, the defaults give one answer per panel.  Acceptance blank runs
# after the change (Rayonix / Pilatus 6M / Eiger 16M binned; the other detectors' panels were
# always whole): false peaks per blank 0.14 / 0.46 / 0.05 against 0.14 / 0.54 / 0.10, no blank
# a hit, F1 on the hits 0.933 / 0.836 / 0.921 against 0.934 / 0.843 / 0.925; the selection runs,
# measured before, the same picture.

def check_count(value: Any, what: str) -> int:
    """``value`` as a count of peaks (a whole number >= 0), or a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


#: The smallest tile side: the model's four resampling levels halve it five times (tiles start
#: on this grid, :func:`peaknet_xtal.finding.engine.tile_panel`).
MIN_TILE = 32


#: The network's arithmetic, :data:`DEFAULTS` ``.precision``.  bf16 measured (2026-12-06, one
#: CPU thread of an AMD EPYC with AVX512-BF16, the shipped default through the engine, CPU
#: time): 1.1x on a 2.3-Mpx CSPAD frame (0.44 -> 0.40 s: its 64 small ASICs leave the float32
#: normalisation and per-tile work a larger share), 1.7x on a 6-Mpx Pilatus 6M frame (1.46 ->
#: 0.85 s); on the five simulated sets of the evaluation report F1 within 0.001 of float32
#: (0.976 / 0.981 / 0.988 / 0.847 / 0.951 against 0.976 / 0.980 / 0.988 / 0.848 / 0.951), the
#: same false peaks on blanks (0.22 a blank on the hard set, 0 elsewhere); 0.4-1 % of the
#: pixels over the threshold differ.  Tried the same day and not kept: int8 dynamic
#: quantisation of the linear layers (1.02x: the fused form's matmuls are not nn.Linear).  Not
#: the default: the same pixels should give the same peaks on every machine and device
#: (float32 does, CPU and GPU), and a CPU without native bfloat16 runs it slower than float32
#: (the engine says so).  ``benchmarks/bench_model.py`` prints its ratio.
PRECISIONS = ("fp32", "bf16")


def check_precision(value: Any) -> str:
    """``value`` as one of :data:`PRECISIONS`, or a ValueError listing them."""
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)


#: The values each finding setting may take (``gt``/``ge``/``lt``/``le`` bounds), defined here
#: once: the engine (so the Python API) checks them, ``peaknet2cxi`` builds its command-line and
#: config-file checks from them, and the DIALS plugin's PHIL states the same ranges.  Outside,
#: a setting runs silently meaningless (a probability cut of 2 keeps nothing; a negative SNR cut
#: keeps every blob).  The DIALS plugin's PHIL ranges (value_min, value_max) are made from it.
LIMITS: dict[str, dict[str, float]] = {
    "threshold": {"ge": 0, "le": 1}, "rescue_prob": {"ge": 0, "le": 1},
    "min_snr": {"ge": 0}, "min_height": {"ge": 0}, "rescue_height": {"ge": 0},
    "adu_per_photon": {"ge": 0}, "max_peaks": {"ge": 1}, "batch_size": {"ge": 1},
    # a tile must reach a grid cell past the overlap it shares (engine.tile_panel); every entry
    # point tiles with the default overlap, the engine checks other overlaps itself
    "tile_size": {"ge": MIN_TILE + DEFAULTS.tile_overlap},
}


#: :data:`LIMITS` settings that count something, so take whole numbers only.
WHOLE_NUMBERS = frozenset({"max_peaks", "batch_size", "tile_size"})


def check_limits(values: Mapping[str, Any]) -> None:
    """A TypeError naming the first of ``values`` (None: not set) that is no number (a whole one
    where :data:`WHOLE_NUMBERS` says so), a ValueError naming the first outside :data:`LIMITS`.
    Why the type first: a Python caller's ``threshold="0.5"`` otherwise failed at the first
    comparison with "'>=' not supported between instances of 'str' and 'int'", naming no
    setting, and ``batch_size=2.5`` further in, inside the engine."""
    for name, value in values.items():
        bounds = LIMITS.get(name)
        if value is None or bounds is None:
            continue
        kind = numbers.Integral if name in WHOLE_NUMBERS else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "a whole number" if name in WHOLE_NUMBERS else "a number"
            raise TypeError(f"{name} must be {what}, got {value!r}")
        if not within(bounds, value):
            raise ValueError(f"{name} must be {range_text(bounds, value)}, got {value!r}")


def check_device(spec: str, setting: str | None = None) -> None:
    """A ValueError naming ``spec`` (and the host's ``setting`` that gave it, if said) where the
    model could not run on it here: a string that is
    no torch device, a device type PeakNet does not run on, CUDA that torch does not see, a GPU
    index it does not have; the message lists the devices available.  Why: the engine resolves
    its device at the first frame, so a Python caller's ``device="tpu"`` failed there with
    torch's own message ("Expected one of cpu, cuda, ipu, xpu, ..."), after inputs were opened.
    ``auto`` and ``cpu`` always run and import nothing."""
    if spec in ("auto", "cpu"):
        return
    import torch

    from peaknet_xtal.finding.engine import resolve_device

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n_gpus)]
                                   if n_gpus else [])
    why = None
    try:
        device = resolve_device(spec)  # the engine's own resolution (auto, cpu, cuda[:N])
    except (RuntimeError, TypeError):  # torch's message for a malformed string is long
        why = "not a device torch knows"
    except ValueError:
        why = "torch sees no CUDA GPU"
    else:
        if device.type not in ("cpu", "cuda"):
            why = "not a device PeakNet runs on here"
        elif device.type == "cuda" and device.index is not None and device.index >= n_gpus:
            why = f"torch sees {n_gpus} CUDA GPU{'s' if n_gpus != 1 else ''}"
    if why is not None:
        where = f" ({setting})" if setting else ""
        raise ValueError(f"device {spec!r}{where}: {why}; available here: "
                         f"{', '.join(available)}")


def finite(value: Any) -> bool:
    """Whether the number ``value`` is finite (neither NaN nor +-infinity); a whole number
    always is, however large (``math.isfinite`` overflows on one beyond a float's range)."""
    if isinstance(value, (numbers.Integral, np.integer)):
        return True
    try:
        return math.isfinite(value)
    except (TypeError, ValueError, OverflowError):  # not a real number: no range holds it
        return False


def within(bounds: Mapping[str, float], value: Any) -> bool:
    """Whether ``value`` keeps ``gt``/``ge``/``lt``/``le`` ``bounds`` (NaN keeps none).

    An infinite value keeps them only where its own side is bounded by infinity itself
    (``le=math.inf`` lets ``+inf`` through, ``ge=-math.inf`` ``-inf``): a setting that means
    "no limit" at infinity (a largest reduced chi-square) says so in its bounds.  Any other
    setting is finite: ``gt=0`` once let ``lr: .inf`` through, which trained a model of NaN,
    and ``min_snr inf`` in peaknet2cxi found 0 peaks on every frame without a word.
    """
    if not finite(value):
        if value != value:  # NaN
            return False
        edge = "le" if value > 0 else "ge"
        if bounds.get(edge) != value:
            return False
    return bool(("gt" not in bounds or value > bounds["gt"])
                and ("ge" not in bounds or value >= bounds["ge"])
                and ("lt" not in bounds or value < bounds["lt"])
                and ("le" not in bounds or value <= bounds["le"]))


def range_text(bounds: Mapping[str, float], value: Any = None) -> str:
    """``in (0, 1]``, ``>= 1``, ...: a :data:`LIMITS` entry as a user would write it.  Given the
    ``value`` refused, an infinite one, ``a finite number >= 0``: ``inf`` is >= 0, and the range
    alone would not say what is wrong with it."""
    if value is not None and not finite(value) and value == value:
        return "a finite number" + ("" if not bounds else f" {range_text(bounds)}")
    low, low_open = (bounds["gt"], True) if "gt" in bounds else (bounds.get("ge"), False)
    high, high_open = (bounds["lt"], True) if "lt" in bounds else (bounds.get("le"), False)
    if high == math.inf and low is not None:  # a range reaching infinity: "no limit" allowed
        return f"{'>' if low_open else '>='} {low:g} (inf: no limit)"
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "any number"


def check_min_peaks(value: Any) -> int:
    """``value`` as a hit's least peak count, or a ValueError saying why it cannot be one."""
    return check_count(value, "min_peaks (peaks that make a hit)")


def check_faint_support(value: Any) -> int:
    """``value`` as ``faint_support`` (tall peaks a frame needs before its faint ones count), or
    a ValueError saying why it cannot be one."""
    return check_count(value, "faint_support (tall peaks a frame needs before its faint ones "
                              "count)")


def resolve_gain(override: float | None = None, *, meta: Mapping[str, Any] | None = None,
                 geometry: Any = None, wavelength_A: float | None = None,
                 panel: int | None = None,
                 estimate: Callable[[], float | None] | None = None) -> float | None:
    """ADU per photon for the shot noise of one frame's peaks, or None when unknown.

    In order: ``override`` (a user's value; 0 leaves shot noise out), the source's declared
    ``meta["adu_per_photon"]`` (dxtbx data divided by the format's gain declare 1), the
    ``geometry``'s ``adu_per_photon`` or ``adu_per_eV`` x photon energy (``wavelength_A`` when the
    geometry has no energy of its own; ``panel`` asks for one panel's own value), then
    ``estimate()`` (a measurement from the pixels).
    """
    if override is not None:
        return float(override)
    declared = (meta or {}).get("adu_per_photon")
    if declared is not None and float(declared) > 0:
        return float(declared)
    if wavelength_A is None and meta:
        wavelength_A = meta.get("wavelength_A")
    detector_gain = getattr(geometry, "detector_gain", None)
    if detector_gain is not None:
        gain: float | None = (detector_gain(wavelength_A) if panel is None
                              else detector_gain(wavelength_A, panel=panel))
        if gain is not None:
            return gain
    return None if estimate is None else estimate()
