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
  the small settings record only; each process loads the model once and caches it;
- DIALS reads the images itself: importing this module (in DIALS' process and in every worker,
  to unpickle the extension) imports ``peaknet_xtal.formats``, which makes the HDF5 compression
  filters of Eiger and Jungfraujoch frames readable (``formats.hdf5_filters``).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import peaknet_xtal.formats  # noqa: F401  # HDF5 compression filters (module docstring)
from peaknet_xtal.finding.settings import DEFAULTS, LIMITS, PRECISIONS

#: Under DIALS' ``dials`` logger, whose handlers DIALS sets up (console and ``dials.*.log``, and
#: the records its worker processes send back); the package's own loggers reach neither.
log = logging.getLogger("dials.algorithms.spot_finding.threshold.peaknet")

_D = DEFAULTS


def _phil_range(name: str) -> str:
    """PHIL's ``value_min``/``value_max`` of a setting, from ``finding.settings.LIMITS`` (every
    entry point's ranges, defined there once; all closed, as PHIL's are)."""
    limits = LIMITS[name]
    return ", ".join(f"{phil}={limits[key]:g}" for phil, key in (("value_min", "ge"),
                                                                  ("value_max", "le"))
                     if key in limits)


PHIL = f"""
model = {_D.model}
  .type = str
  .help = "PeakNet model: 'default' (the model shipped with peaknet-xtal), or a path to a"
          ".safetensors file (with its .json config beside it) or to a directory holding"
          "model.safetensors, as written by peaknet-train."
device = {" ".join(("*" if c == _D.device else "") + c for c in ("auto", "cpu", "cuda"))}
  .type = choice
  .help = "Where the model runs: auto uses CUDA when torch sees a GPU, otherwise the CPU."
          "cuda without a GPU torch can use stops spot finding before any image is read."
precision = {" ".join(("*" if c == _D.precision else "") + c for c in PRECISIONS)}
  .type = choice
  .help = "The network's arithmetic: fp32 gives the same peaks on every machine; bf16 is"
          "1.1-1.7x faster on CPUs with native bfloat16 (AVX512-BF16, AMX), its peaks within"
          "float rounding of fp32's, and slower on CPUs without (a warning says so). The same"
          "default as peaknet2cxi and the Python API (finding.settings.PRECISIONS)."
threshold = {_D.threshold}
  .type = float({_phil_range("threshold")})
  .help = "Peak probability at or above which a pixel is foreground. Lower values find more and"
          "larger spots; DIALS' spotfinder.filter options then apply as usual."
min_snr = {_D.min_snr}
  .type = float({_phil_range("min_snr")})
  .help = "Least integrated signal-to-noise of a predicted spot: its background-subtracted sum"
          "over the noise of that sum: the local background variance over its pixels (as"
          "correlated as the panel's own noise), the subtracted background's error and the"
          "shot noise (gain x sum). Weaker predictions are not foreground; 0 keeps every spot"
          "the model marks. The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS.min_snr)."
min_height = {_D.min_height}
  .type = float({_phil_range("min_height")})
  .help = "Least height of a predicted spot's brightest pixel over its local background, in"
          "sigmas of that background's noise: the pixel test of the classic finders"
          "(peakfinder8's min-snr, 5 by default). 0: no such cut. 5 removes most noise"
          "spots on blank frames but also broad weak spots (measured in"
          "finding/settings.py). The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS.min_height)."
rescue_prob = {_D.rescue_prob}
  .type = float({_phil_range("rescue_prob")})
  .help = "Also keep point-like spots the model scores at least this, below threshold, when"
          "their brightest pixel stands rescue_height background sigmas high. 1 (not below"
          "threshold) turns it off. Spots sharper than a pixel (LCLS CSPAD stills) score"
          "0.3-0.6; the peaknet-xtal docs/measurements.md has what 0.4 costs on blanks."
rescue_height = {_D.rescue_height}
  .type = float({_phil_range("rescue_height")})
  .help = "Least height of a rescued spot's brightest pixel over its local background, in"
          "sigmas of that background's noise (see rescue_prob)."
faint_support = {_D.faint_support}
  .type = int(value_min=0)
  .help = "Keep an image's faint spots (brightest pixel under {_D.faint_height:g} background"
          "sigmas, or SNR under {_D.faint_snr:g}) only when at least this many of its spots"
          "are neither. 0: always. On"
          "a frame without a crystal the faint spots are nearly all noise; on a frame with"
          "one they are its weak reflections (measured in finding/settings.py). It needs"
          "the whole image: where a panel is found alone (a region of interest, a mask DIALS"
          "folded in) it is off. The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS)."
gain = None
  .type = float({_phil_range("adu_per_photon")})
  .help = "Counts per photon of the image DIALS hands to spot finding, as"
          "spotfinder.threshold.dispersion.gain. None: dxtbx has already divided by the"
          "format's gain, so the image counts photons (1), unless the background says otherwise"
          "(a nominal gain of 1 on an integrating detector: the gain is then measured from the"
          "first images' background). 0 leaves shot noise out of min_snr (background noise"
          "alone)."
batch_size = {_D.batch_size}
  .type = int({_phil_range("batch_size")})
  .help = "How much model input runs at once, in 1-Mpx slots (memory versus speed; a panel"
          "goes to the model whole and takes one slot a megapixel). The panels of an image are"
          "batched together: DIALS asks for one panel at a time, so the first panel"
          "of each image runs the model on the whole image and the other panels are answered"
          "from that (each checked to be the same pixels and mask)."
dilation = {_D.dilation}
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

    model: str = _D.model
    device: str = _D.device
    precision: str = _D.precision
    threshold: float = _D.threshold
    min_snr: float = _D.min_snr
    min_height: float = _D.min_height
    rescue_prob: float = _D.rescue_prob
    rescue_height: float = _D.rescue_height
    faint_support: int = _D.faint_support
    gain: float | None = None
    batch_size: int = _D.batch_size
    threads: int = 1
    dilation: int = _D.dilation

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
            precision=str(scope.precision),
            threshold=float(scope.threshold),
            min_snr=float(scope.min_snr),
            min_height=float(scope.min_height),
            rescue_prob=float(scope.rescue_prob),
            rescue_height=float(scope.rescue_height),
            faint_support=int(scope.faint_support),
            gain=None if scope.gain is None else float(scope.gain),
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


#: Per (settings, panel): the pixel defect filter of a panel found alone (see panel_defects).
_PANEL_DEFECTS: dict[tuple[PeakNetSettings, int], Any] = {}


def panel_defects(settings: PeakNetSettings, i_panel: int) -> Any:
    """The process-wide pixel defect filter of panel ``i_panel`` when it is found alone.

    Where DIALS' panel cannot be answered from a whole-image run (a region of interest, a user
    mask DIALS folded in, no imageset passed), each panel comes as a frame of its own.  Counted
    by the engine's one run filter, the panels of one image would pass for successive frames of
    one panel: pixel (y, x) of every panel would share one counter, a real hot pixel would spike
    in one "frame" of 64 and never be named, and a feature at the same place in every panel
    (an ASIC's edge) would.  So each panel keeps its own run of images.
    """
    from peaknet_xtal.finding.defects import DefectFilter

    with _PREDICTORS_LOCK:
        return _PANEL_DEFECTS.setdefault((settings, i_panel), DefectFilter())


def _build_predictor(settings: PeakNetSettings) -> Any:
    """Build the shared finding engine (imports torch and the model on first use, never at
    module import)."""
    from peaknet_xtal.finding.engine import InferenceEngine

    check_device(settings.device)  # settings not built from DIALS' parameters: still a Sorry
    return InferenceEngine(
        model=settings.model,
        device=settings.device,
        precision=settings.precision,
        threads=settings.threads,
        batch_size=settings.batch_size,
        threshold=settings.threshold,
        min_snr=settings.min_snr,
        min_height=settings.min_height,
        rescue_prob=settings.rescue_prob,
        rescue_height=settings.rescue_height,
        faint_support=settings.faint_support,
        adu_per_photon=settings.gain,
    )


def _check_model_exists(model: str) -> None:
    """Fail at start-up, in the main process, rather than later inside a DIALS worker: the file
    must exist and be a safetensors model of a known family."""
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.model.weights_io import check_model

    if model != "default" and not Path(model).exists():
        raise FormatError(model, "PeakNet model not found (spotfinder.threshold.peaknet.model)")
    check_model(model)


DEVICE_SETTING = "spotfinder.threshold.peaknet.device"


def check_device(spec: str) -> None:
    """Fail at start-up, in the main process, with DIALS' user error (``Sorry``) where the model
    could not run on ``spec``: CUDA that torch does not see, a GPU index it does not have, a
    string that is no device.  The engine would find out only on the first image, inside a
    DIALS worker, as a crash to report.  ``auto`` and ``cpu`` always run and import nothing."""
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
    except RuntimeError:  # torch's own message for a malformed string is long and generic
        why = "not a device torch knows"
    except ValueError:
        why = "torch sees no CUDA GPU"
    else:
        if device.type not in ("cpu", "cuda"):
            why = "not a device PeakNet runs on here"
        elif device.type == "cuda" and device.index is not None and device.index >= n_gpus:
            why = f"torch sees {n_gpus} CUDA GPU{'s' if n_gpus != 1 else ''}"
    if why is not None:
        from libtbx.utils import Sorry

        raise Sorry(f"peaknet: device {spec!r} ({DEVICE_SETTING}): {why}; available here: "
                    f"{', '.join(available)}")


#: The engines whose gain is in DIALS' log already (one line per engine, i.e. per process run).
_GAIN_REPORTED: set[int] = set()


def _report_gain(engine: Any, settings: PeakNetSettings, meta: dict[str, Any]) -> None:
    """Say once per run, in DIALS' log, which gain the peak SNRs count shot noise with.

    The engine logs its gain through the package's own logger, which DIALS does not show, and the
    gain matters: the images DIALS hands over declare 1 count per photon (dxtbx divides by the
    format's gain), a placeholder on integrating detectors, so the gain is usually measured from
    the run's first images' background (``finding/gain.py``), which changes every SNR."""
    with _PREDICTORS_LOCK:
        if id(engine) in _GAIN_REPORTED:
            return
        _GAIN_REPORTED.add(id(engine))
    gain = meta.get("adu_per_photon")
    if settings.gain is not None:
        how = "as set (spotfinder.threshold.peaknet.gain)"
    elif gain is None:
        log.info("peaknet: no detector gain known: peak SNRs count background noise only "
                 "(spotfinder.threshold.peaknet.gain sets one)")
        return
    elif meta.get("gain_measured"):
        how = ("measured from the background of the first image, as the format's gain is "
               "missing or a placeholder; the run pools its first five images' measurements "
               "(spotfinder.threshold.peaknet.gain overrides it)")
    else:
        how = "as the images declare (spotfinder.threshold.peaknet.gain overrides it)"
    if gain == 0:
        log.info("peaknet: detector gain 0 %s: peak SNRs count background noise only", how)
    else:
        log.info("peaknet: peak SNRs count shot noise at a detector gain of %.3g counts per "
                 "photon, %s", gain, how)


def _image_name(kwargs: dict[str, Any]) -> str | None:
    """"<file> panel N" from what DIALS passes to compute_threshold, for warnings."""
    try:
        path = kwargs["imageset"].paths()[0]
    except Exception:  # no imageset (the image viewer, a test): no name
        return None
    return f"{path} panel {kwargs.get('i_panel', 0)}"


@contextlib.contextmanager
def _as_user_error() -> Iterator[None]:
    """The package's own errors (bad model file, bad pixels) become DIALS' user error, which
    DIALS prints as one line instead of asking the user to report a crash."""
    from libtbx.utils import Sorry

    from peaknet_xtal.errors import PeakNetError

    try:
        yield
    except PeakNetError as exc:  # names the file and what is wrong
        raise Sorry(f"peaknet: {exc}") from None  # DIALS prints the one line, no chain


class PeakNetSpotFinderThresholdExt:
    """PeakNet: learned Bragg peak segmentation as the spot-finding threshold. Pixels the
    model calls peak (probability at least peaknet.threshold, in spots with an integrated SNR of
    at least peaknet.min_snr, shot noise included, and a brightest pixel peaknet.min_height
    background sigmas high) within the DIALS mask are foreground; DIALS' own labelling, filters
    and centroids then apply unchanged. No per-experiment gain or threshold tuning is needed."""

    name = "peaknet"

    @staticmethod
    def phil() -> Any:
        from libtbx.phil import parse

        return parse(PHIL)

    def __init__(self, params: Any) -> None:
        self.settings = PeakNetSettings.from_params(params)
        self._image: _ImageForeground | None = None
        check_device(self.settings.device)
        with _as_user_error():
            _check_model_exists(self.settings.model)

    def __getstate__(self) -> dict[str, Any]:
        # Only the settings travel to DIALS worker processes; the model is loaded there lazily.
        return {"settings": asdict(self.settings)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = PeakNetSettings(**state["settings"])
        self._image = None

    def compute_threshold(self, image: Any, mask: Any, **kwargs: Any) -> Any:
        """Foreground mask for one panel: model peak pixels AND the mask DIALS passed in.

        ``image`` is the corrected panel (or its region of interest) as ``flex.double``, ``mask``
        a ``flex.bool`` of the same shape (True = usable).  DIALS does not remove masked pixels
        from the result itself, so the AND with ``mask`` happens here.  With the ``imageset``
        DIALS passes along, the whole image is found at once (see the ``batch_size`` help).
        """
        from dxtbx import flumpy

        pixels = np.asarray(flumpy.to_numpy(image), dtype=np.float32)
        good = np.asarray(flumpy.to_numpy(mask), dtype=bool)
        i_panel: int | None = kwargs.get("i_panel")
        if pixels.shape != good.shape:
            raise ValueError(
                f"peaknet: panel {i_panel} image shape {pixels.shape} differs from "
                f"its mask shape {good.shape}"
            )
        peaks = None
        imageset = kwargs.get("imageset")
        whole = kwargs.get("region_of_interest") is None and i_panel is not None
        with _as_user_error():
            if imageset is not None and whole and good.any():
                peaks = self._from_whole_image(imageset, int(i_panel or 0), pixels, good)
            if peaks is None:
                peaks = self.peak_pixels(pixels, good, source=_image_name(kwargs),
                                         i_panel=i_panel)
        return flumpy.from_numpy(np.ascontiguousarray(peaks))

    def peak_pixels(self, pixels: np.ndarray, good: np.ndarray,
                    source: str | None = None, i_panel: int | None = None) -> np.ndarray:
        """Boolean foreground of one panel (numpy in, numpy out), already ANDed with ``good``;
        ``source`` names the image in warnings.  With ``i_panel`` the panel's pixel defects are
        tracked across images by a filter of its own (:func:`panel_defects`)."""
        if not good.any():
            return np.zeros(good.shape, dtype=bool)
        (foreground,) = self._foreground([pixels], [good], source, i_panel)
        return foreground

    def _foreground(self, panels: list[np.ndarray], goods: list[np.ndarray],
                    source: str | None = None, i_panel: int | None = None
                    ) -> list[np.ndarray]:
        """The shared finding pipeline's DIALS foreground of one image given as panels (or of
        panel ``i_panel`` alone)."""
        from peaknet_xtal.formats.dxtbx_images import CORRECTED_GAIN
        from peaknet_xtal.types import Frame

        frame = Frame(panels=panels, masks=goods, source=source or "",
                      meta={"adu_per_photon": CORRECTED_GAIN})
        engine = get_predictor(self.settings)
        defects = None if i_panel is None else panel_defects(self.settings, i_panel)
        (result,) = engine.find_frames([frame], with_pixels=True, defects=defects,
                                       whole=i_panel is None)
        _report_gain(engine, self.settings, result.meta)
        foreground: list[np.ndarray] = result.dials_foreground(self.settings.dilation)
        return foreground

    def _from_whole_image(self, imageset: Any, i_panel: int, pixels: np.ndarray,
                          good: np.ndarray) -> np.ndarray | None:
        """This panel's foreground from a whole-image run, or None where that cannot be vouched
        for (the panel is then found alone).

        DIALS asks panel by panel and does not say which image; on panel 0 the image is taken
        to be the one after the last (or the first) if its panel 0 and mask are exactly the ones
        handed over.  A later panel is answered from it only if its pixels and mask are equal
        to those handed over too (a user mask DIALS folds in, for instance, makes them differ).
        """
        image = getattr(self, "_image", None)
        if i_panel == 0:
            image = _ImageForeground.load(self, imageset, pixels, good, image)
            self._image = image
        if image is None or image.imageset is not imageset or not image.holds(i_panel, pixels,
                                                                               good):
            return None
        return image.foreground[i_panel]


class _ImageForeground:
    """The foreground of every panel of one image of an imageset, found in one batched run."""

    def __init__(self, imageset: Any, index: int, panels: list[np.ndarray],
                 goods: list[np.ndarray], foreground: list[np.ndarray]) -> None:
        self.imageset, self.index = imageset, index
        self.panels, self.goods, self.foreground = panels, goods, foreground

    def holds(self, i_panel: int, pixels: np.ndarray, good: np.ndarray) -> bool:
        return (i_panel < len(self.panels) and np.array_equal(self.panels[i_panel], pixels)
                and np.array_equal(self.goods[i_panel], good))

    @classmethod
    def load(cls, ext: PeakNetSpotFinderThresholdExt, imageset: Any, pixels: np.ndarray,
             good: np.ndarray, last: _ImageForeground | None) -> _ImageForeground | None:
        from peaknet_xtal.formats.dxtbx_images import image_arrays

        candidates = [0]
        if last is not None and last.imageset is imageset:
            candidates.insert(0, last.index + 1)
        for index in dict.fromkeys(candidates):
            if not 0 <= index < len(imageset):
                continue
            panels, goods = image_arrays(imageset, index)
            if np.array_equal(panels[0], pixels) and np.array_equal(goods[0], good):
                _read_ahead(ext, imageset, index, panels, goods)
                return cls(imageset, index, panels, goods, ext._foreground(panels, goods))
        return None


def _read_ahead(ext: PeakNetSpotFinderThresholdExt, imageset: Any, index: int,
                panels: list[np.ndarray], goods: list[np.ndarray]) -> None:
    """While the run's defect filter is still learning, count this image and the next ones of
    the imageset (as many as it needs) before this one is found, as ``peaknet2cxi`` reads a
    run ahead: the hot pixels of a sequence's first images are then known on those images
    too.  DIALS finds an imageset's images in order, one process per block of them; a still
    is an imageset of one image, and there is nothing to read ahead.  An image that cannot be
    read ends the read-ahead: DIALS reports it, by name, when its own turn comes."""
    from peaknet_xtal.formats.dxtbx_images import image_arrays
    from peaknet_xtal.types import Frame

    engine = get_predictor(ext.settings)
    if engine.defects.learning == 0 or engine.defects.pending:
        return
    ahead = [(panels, goods)]
    for j in range(index + 1, min(index + engine.defects.learning, len(imageset))):
        try:
            ahead.append(image_arrays(imageset, j))
        except Exception:  # noqa: BLE001 - not this image's error; its own turn raises it
            break
    for frame_panels, frame_goods in ahead:
        engine.count_ahead(Frame(panels=frame_panels, masks=frame_goods))
