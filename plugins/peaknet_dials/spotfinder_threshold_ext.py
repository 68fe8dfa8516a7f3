"""DIALS spot-finding threshold extension: ``dials.find_spots ... algorithm=peaknet``.

DIALS finds spots in two steps: a *threshold* step marks foreground pixels per panel, then DIALS
labels connected pixels, filters them (size, centroid distance, ...) and computes centroids and
intensities.  This extension replaces only the first step with the learned segmentation, so every
DIALS option that users know (``spotfinder.filter.*``, ``region_of_interest``, ``mp.nproc``,
``dials.stills_process``, the image viewer) keeps working unchanged.

DIALS finds the class through the ``dials.spotfinder.threshold`` entry point (``peaknet``); DIALS
3.12 looks entry points up with ``pkg_resources`` and DIALS >= 3.24 with ``importlib.metadata``.
Both read the same installed package metadata, so nothing version-specific is needed here.

Contract DIALS imposes (and why the code looks the way it does):

- a class docstring is required (DIALS builds the PHIL help from it and crashes on ``None``);
- no ``default`` class attribute (it would make this the default algorithm for everybody);
- the module is imported whenever DIALS builds its PHIL scope, so torch and the model are imported
  lazily, on the first ``compute_threshold`` call;
- with ``mp.nproc > 1`` DIALS pickles the extension into worker processes, so the pickled state is
  the small settings record only; each process loads the model once and caches it.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PHIL = """
model = default
  .type = str
  .help = "PeakNet model: 'default' (the model shipped with peaknet-xtal), or a path to a"
          ".safetensors file (with its .json config beside it) or to a directory holding"
          "model.safetensors, as written by peaknet-train."
device = *auto cpu cuda
  .type = choice
  .help = "Where the model runs: auto uses CUDA when torch sees a GPU, otherwise the CPU."
threshold = 0.5
  .type = float(value_min=0, value_max=1)
  .help = "Peak probability at or above which a pixel is foreground. Lower values find more and"
          "larger spots; DIALS' spotfinder.filter options then apply as usual."
min_snr = 4.0
  .type = float(value_min=0)
  .help = "Least integrated signal-to-noise of a predicted spot: its background-subtracted sum"
          "over sqrt(pixels x local background variance + gain x sum), background and shot"
          "noise together. Weaker predictions are not foreground; 0 keeps every spot the model"
          "marks. One sigma above peaknet-xtal's own default (3), because DIALS hands spot"
          "finding images divided by the format's nominal gain, which on integrating detectors"
          "is often 1 (CSPAD CBFs), so the shot noise is understated."
gain = 1.0
  .type = float(value_min=0)
  .help = "Counts per photon of the image DIALS hands to spot finding, as"
          "spotfinder.threshold.dispersion.gain: dxtbx has already divided by the detector's"
          "gain, so 1 is right whenever the format's gain is. 0 leaves shot noise out of"
          "min_snr (background noise alone)."
batch_size = 8
  .type = int(value_min=1)
  .help = "How many panel tiles the model processes at once (memory versus speed)."
dilation = 1
  .type = int(value_min=0)
  .help = "Grow each predicted spot by this many pixels (within the mask) before DIALS labels"
          "it. The model marks a spot's core (about half maximum and up), which for sharp XFEL"
          "spots is 1-4 pixels; DIALS' own thresholds mark the whole footprint, and its default"
          "spotfinder.filter.min_spot_size (6 pixels on many detectors) assumes that. The"
          "added rim pixels hold background, so DIALS' value-weighted centroids barely move."
threads = None
  .type = int(value_min=1)
  .help = "torch CPU threads per process. None: the available cores divided by the DIALS"
          "worker processes (spotfinder.mp.nproc, or mp.nproc in dials.stills_process), so"
          "that parallel workers do not oversubscribe the CPU (cores the process's CPU"
          "affinity and cgroup quota allow, less those other work keeps busy). Where cctbx's"
          "stub OpenMP library is loaded first (Debian's DIALS) torch must run on one thread"
          "per process: use mp.nproc in dials.stills_process for parallelism there."
"""


@dataclass(frozen=True)
class PeakNetSettings:
    """The extension's own parameters: small, hashable and cheap to pickle."""

    model: str = "default"
    device: str = "auto"
    threshold: float = 0.5
    min_snr: float = 4.0
    gain: float = 1.0
    batch_size: int = 8
    threads: int = 1
    dilation: int = 1

    @classmethod
    def from_params(cls, params: Any) -> PeakNetSettings:
        """Read ``spotfinder.threshold.peaknet`` from DIALS' extracted PHIL parameters."""
        from peaknet_xtal.threads import default_threads

        scope = params.spotfinder.threshold.peaknet
        threads = scope.threads
        if threads is None:
            nproc = _nproc(params)
            threads = default_threads(nproc)  # free cores (affinity, quota, load) / workers
        return cls(
            model=str(scope.model),
            device=str(scope.device),
            threshold=float(scope.threshold),
            min_snr=float(scope.min_snr),
            gain=float(scope.gain),
            batch_size=int(scope.batch_size),
            threads=int(threads),
            dilation=int(scope.dilation),
        )


def _nproc(params: Any) -> int:
    """Worker processes DIALS will run: ``spotfinder.mp.nproc`` (dials.find_spots) or the
    top-level ``mp.nproc`` (dials.stills_process); Auto/None count as one."""
    counts = [1]
    for path in (("spotfinder", "mp", "nproc"), ("mp", "nproc")):
        node = params
        for name in path:
            node = getattr(node, name, None)
        if isinstance(node, int) and node > 0:
            counts.append(node)
    return max(counts)


_PREDICTORS: dict[PeakNetSettings, Any] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(settings: PeakNetSettings) -> Any:
    """The process-wide predictor for ``settings``: loaded once per process, then reused.

    DIALS builds a fresh extension object per run and, with ``nproc > 1``, unpickles one per
    worker task; caching at module level keeps the model load to once per process.
    """
    with _PREDICTORS_LOCK:
        predictor = _PREDICTORS.get(settings)
        if predictor is None:
            predictor = _build_predictor(settings)
            _PREDICTORS[settings] = predictor
        return predictor


def _build_predictor(settings: PeakNetSettings) -> Any:
    """Build the inference engine (imports torch and the model here, never at module import)."""
    from peaknet_xtal.finding.engine import InferenceEngine

    return InferenceEngine(
        model=settings.model,
        device=settings.device,
        threads=settings.threads,
        batch_size=settings.batch_size,
    )


def _positive_spots(pixels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """``foreground`` without spots whose pixel values sum to zero or less.

    DIALS weights a spot's centroid by its raw pixel values; on a photon-counting detector with
    no background, a faint spot plus its dilation rim of read-noise pixels can sum below zero,
    which gives a zero centroid variance that stops refinement (dials.stills_process).
    """
    from scipy.ndimage import label

    labels, n = label(foreground, structure=np.ones((3, 3), bool))
    if n == 0:
        return foreground
    sums = np.bincount(labels.ravel(), weights=pixels.ravel().astype(np.float64), minlength=n + 1)
    positive = sums > 0
    positive[0] = False
    return positive[labels]


def _check_model_exists(model: str) -> None:
    """Fail at start-up, in the main process, rather than later inside a DIALS worker."""
    from peaknet_xtal.errors import FormatError

    if model != "default" and not Path(model).exists():
        raise FormatError(model, "PeakNet model not found (spotfinder.threshold.peaknet.model)")


class PeakNetSpotFinderThresholdExt:
    """PeakNet: learned Bragg peak segmentation as the spot-finding threshold. Pixels the
    model calls peak (probability at least peaknet.threshold, in spots with an integrated SNR of
    at least peaknet.min_snr, shot noise included) within the DIALS mask are foreground; DIALS'
    own labelling, filters and centroids then apply unchanged. No per-experiment gain or
    threshold tuning is needed."""

    name = "peaknet"

    @staticmethod
    def phil() -> Any:
        from libtbx.phil import parse

        return parse(PHIL)

    def __init__(self, params: Any) -> None:
        self.settings = PeakNetSettings.from_params(params)
        _check_model_exists(self.settings.model)

    def __getstate__(self) -> dict[str, Any]:
        # Only the settings travel to DIALS worker processes; the model is loaded there lazily.
        return {"settings": asdict(self.settings)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = PeakNetSettings(**state["settings"])

    def compute_threshold(self, image: Any, mask: Any, **kwargs: Any) -> Any:
        """Foreground mask for one panel: model peak pixels AND the mask DIALS passed in.

        ``image`` is the corrected panel (or its region of interest) as ``flex.double``, ``mask``
        a ``flex.bool`` of the same shape (True = usable).  DIALS does not remove masked pixels
        from the result itself, so the AND with ``mask`` happens here.
        """
        from dxtbx import flumpy

        pixels = np.asarray(flumpy.to_numpy(image), dtype=np.float32)
        good = np.asarray(flumpy.to_numpy(mask), dtype=bool)
        if pixels.shape != good.shape:
            raise ValueError(
                f"peaknet: panel {kwargs.get('i_panel')} image shape {pixels.shape} differs from "
                f"its mask shape {good.shape}"
            )
        peaks = self.peak_pixels(pixels, good)
        return flumpy.from_numpy(np.ascontiguousarray(peaks))

    def peak_pixels(self, pixels: np.ndarray, good: np.ndarray) -> np.ndarray:
        """Boolean peak map of one panel (numpy in, numpy out), already ANDed with ``good``."""
        if not good.any():
            return np.zeros(good.shape, dtype=bool)
        from peaknet_xtal.finding.peaks import PeakParams, peak_pixel_mask

        predictor = get_predictor(self.settings)
        (prob,) = predictor.predict_panels([pixels], [good])
        params = PeakParams(threshold=self.settings.threshold, min_snr=self.settings.min_snr,
                            adu_per_photon=self.settings.gain)
        peaks = peak_pixel_mask(pixels, np.asarray(prob), good, params)
        if self.settings.dilation > 0 and peaks.any():
            from scipy.ndimage import binary_dilation

            peaks = binary_dilation(peaks, structure=np.ones((3, 3), bool),
                                    iterations=self.settings.dilation)
        return _positive_spots(pixels, peaks & good)
