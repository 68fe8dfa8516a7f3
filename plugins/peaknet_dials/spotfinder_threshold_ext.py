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
import math
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


#: Lower bounds of the whole-number options ``LIMITS`` does not hold.
_LEAST = {"faint_support": 0, "dilation": 0, "threads": 1}


def _allowed(name: str) -> str:
    """The values a numeric setting allows, for its help: ``finding.settings.LIMITS`` (every
    entry point's ranges, defined there once), else the least whole number (:data:`_LEAST`).
    Not PHIL's ``value_min``/``value_max``: DIALS parses the command line before the extension
    exists, and a value out of PHIL's range ended in a traceback asking users to report it to
    DIALS' developers; the extension checks the range itself (:func:`_phil_number`) and says
    DIALS' user error."""
    from peaknet_xtal.finding.settings import range_text

    bounds = LIMITS.get(name) or {"ge": _LEAST[name]}
    return f"Allowed: {range_text(bounds)}."


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
          "1.1-1.6x faster on CPUs with native bfloat16 (AVX512-BF16, AMX), its peaks within"
          "float rounding of fp32's, and slower on CPUs without (a warning says so). The same"
          "default as peaknet2cxi and the Python API (finding.settings.PRECISIONS)."
threshold = {_D.threshold}
  .type = float
  .help = "{_allowed("threshold")}"
          "Peak probability at or above which a pixel is foreground. Lower values find more and"
          "larger spots; DIALS' spotfinder.filter options then apply as usual. Not the"
          "strictness knob on its own: while rescue_prob is below threshold, a point-like"
          "spot scoring at least rescue_prob but nowhere threshold is still kept when its"
          "brightest pixel stands rescue_height background sigmas high, with every pixel"
          "at or above rescue_prob as its footprint, so a higher threshold moves spots into"
          "that rescue (with larger footprints) rather than dropping them. For stricter"
          "finding raise threshold and set rescue_prob=1 (or rescue_prob=threshold)."
min_snr = {_D.min_snr}
  .type = float
  .help = "{_allowed("min_snr")}"
          "Least integrated signal-to-noise of a predicted spot: its background-subtracted sum"
          "over the noise of that sum: the local background variance over its pixels (as"
          "correlated as the panel's own noise), the subtracted background's error and the"
          "shot noise (gain x sum). Weaker predictions are not foreground; 0 keeps every spot"
          "the model marks. The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS.min_snr)."
min_height = {_D.min_height}
  .type = float
  .help = "{_allowed("min_height")}"
          "Least height of a predicted spot's brightest pixel over its local background, in"
          "sigmas of that background's noise: the pixel test of the classic finders"
          "(peakfinder8's min-snr, 5 by default). 0: no such cut. 5 removes most noise"
          "spots on blank frames but also broad weak spots (measured in"
          "finding/settings.py). The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS.min_height)."
rescue_prob = {_D.rescue_prob}
  .type = float
  .help = "{_allowed("rescue_prob")}"
          "Also keep a spot the model doubts: a connected group of pixels scoring at least"
          "this that holds and touches no pixel at threshold or above is foreground (all its"
          "pixels) when its brightest pixel stands rescue_height background sigmas high, it"
          "is point-like (its pixels at half its height or above fit in 2x2) and it passes"
          "min_snr and min_height. Active only while rescue_prob is below threshold: 1 (or"
          "any value at or above threshold) turns it off. Raising threshold alone makes more"
          "spots doubted and rescued, so set rescue_prob=1 too for stricter finding. Spots"
          "sharper than a pixel (LCLS CSPAD stills) score 0.3-0.6; the peaknet-xtal"
          "docs/measurements.md has what 0.4 costs on blanks."
rescue_height = {_D.rescue_height}
  .type = float
  .help = "{_allowed("rescue_height")}"
          "Least height of a rescued spot's brightest pixel over its local background, in"
          "sigmas of that background's noise (see rescue_prob)."
faint_support = {_D.faint_support}
  .type = int
  .help = "{_allowed("faint_support")}"
          "Keep an image's faint spots (brightest pixel under {_D.faint_height:g} background"
          "sigmas, or SNR under {_D.faint_snr:g}) only when at least this many of its spots"
          "are neither. 0: always. On"
          "a frame without a crystal the faint spots are nearly all noise; on a frame with"
          "one they are its weak reflections (measured in finding/settings.py). It needs"
          "the whole image: where a panel is found alone (no imageset handed over, as in"
          "the image viewer) it is off. The same default as peaknet2cxi and the Python API"
          "(finding.settings.DEFAULTS)."
adu_per_photon = None
  .type = float
  .help = "{_allowed("adu_per_photon")}"
          "Counts per photon of the image DIALS hands to spot finding (the detector gain), as"
          "spotfinder.threshold.dispersion.gain. None: dxtbx has already divided by the"
          "format's gain, so the image counts photons (1), unless the background says otherwise"
          "(a nominal gain of 1 on an integrating detector: the gain is then measured from the"
          "background of the first images this process finds, so with several processes"
          "(mp.nproc) each measures its own and borderline spots can differ; the log says"
          "each image's gain). 0 leaves shot noise out of min_snr (background noise alone)."
batch_size = {_D.batch_size}
  .type = int
  .help = "{_allowed("batch_size")}"
          "How much model input runs at once, in 1-Mpx slots (memory versus speed; a panel"
          "goes to the model whole and takes one slot a megapixel). The panels of an image are"
          "batched together: DIALS asks for one panel at a time, so the first panel"
          "of each image runs the model on the whole image, under the mask DIALS applies"
          "(the format's, spotfinder.filter's and lookup.mask), and the other panels are"
          "answered from that (each checked to be the same pixels and mask; a region of"
          "interest is cut from it)."
tile_size = {_D.tile_size}
  .type = int
  .help = "{_allowed("tile_size")}"
          "Largest panel side the model sees whole ({_D.tile_size}: every panel whole); a larger"
          "panel is cut into overlapping tiles of at most this side. Smaller saves memory on"
          "large panels (batch_size does not: a batch holds at least one whole panel) at the"
          "price of a few spots (99.5 % found again in 512-1024 px tiles). The same default"
          "as peaknet2cxi and the Python API (finding.settings.DEFAULTS.tile_size)."
dilation = {_D.dilation}
  .type = int
  .help = "{_allowed("dilation")}"
          "Grow each predicted spot by this many pixels (within the mask) before DIALS labels"
          "it. The model marks a spot's core (about half maximum and up), which for sharp XFEL"
          "spots is 1-4 pixels; DIALS' own thresholds mark the whole footprint, and its default"
          "spotfinder.filter.min_spot_size (6 pixels on many detectors) assumes that. The"
          "added rim pixels hold background, so DIALS' value-weighted centroids barely move."
threads = None
  .type = int
  .help = "{_allowed("threads")}"
          "torch CPU threads per process. None: the available cores divided by the DIALS"
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
    adu_per_photon: float | None = None
    batch_size: int = _D.batch_size
    tile_size: int = _D.tile_size
    threads: int = 1
    dilation: int = _D.dilation

    @classmethod
    def from_params(cls, params: Any) -> PeakNetSettings:
        """Read ``spotfinder.threshold.peaknet`` from DIALS' extracted PHIL parameters."""
        from peaknet_xtal.threads import default_threads

        scope = params.spotfinder.threshold.peaknet
        threads = _phil_number(scope, "threads", int, optional=True)
        if threads is None:
            nproc = _nproc(params)
            threads = default_threads(nproc)  # free cores (affinity, quota, load) / workers
        return cls(
            model=str(scope.model),
            device=str(scope.device),
            precision=str(scope.precision),
            threshold=_phil_number(scope, "threshold", float),
            min_snr=_phil_number(scope, "min_snr", float),
            min_height=_phil_number(scope, "min_height", float),
            rescue_prob=_phil_number(scope, "rescue_prob", float),
            rescue_height=_phil_number(scope, "rescue_height", float),
            faint_support=_phil_number(scope, "faint_support", int),
            adu_per_photon=_phil_number(scope, "adu_per_photon", float, optional=True),
            batch_size=_phil_number(scope, "batch_size", int),
            tile_size=_phil_number(scope, "tile_size", int),
            threads=int(threads),
            dilation=_phil_number(scope, "dilation", int),
        )




def _phil_number(scope: Any, name: str, kind: type, optional: bool = False) -> Any:
    """``spotfinder.threshold.peaknet.<name>`` as a ``kind`` (None where ``optional`` and
    unset), or a PeakNetError naming the option.  Why here: PHIL passes ``None``, ``Auto`` and
    ``nan`` through its range check (nan compares false with every bound), and they failed at
    the first image with a traceback DIALS asks users to report as its own bug (under
    ``dials.stills_process``, every image's spot finding failed and the run exited 0)."""
    from peaknet_xtal.errors import PeakNetError
    from peaknet_xtal.finding.settings import range_text, within

    value = getattr(scope, name)
    where = f"spotfinder.threshold.peaknet.{name}"
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PeakNetError(f"{where} = {value}: must be a number")
    if not math.isfinite(value):
        raise PeakNetError(f"{where} = {value}: must be a finite number")
    bounds = LIMITS.get(name) or (
        {"ge": _LEAST[name]} if name in _LEAST else None)
    if bounds is not None and not within(bounds, value):
        raise PeakNetError(f"{where} = {value}: must be {range_text(bounds, value)}")
    return kind(value)


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
        tile_size=settings.tile_size,
        threshold=settings.threshold,
        min_snr=settings.min_snr,
        min_height=settings.min_height,
        rescue_prob=settings.rescue_prob,
        rescue_height=settings.rescue_height,
        faint_support=settings.faint_support,
        adu_per_photon=settings.adu_per_photon,
    )


#: The models this process has named in DIALS' log (:func:`_say_what_finds`).
_MODELS_SAID: set[str] = set()


def _say_what_finds(model: str) -> None:
    """Name the package version and the model (with its weights' SHA-256) in DIALS' log, once a
    process and model: a DIALS log said which algorithm found the spots but not which code and
    weights, which ``peaknet2cxi`` records with every run (a user trial)."""
    from peaknet_xtal import __version__
    from peaknet_xtal.model.weights_io import model_digest

    with _PREDICTORS_LOCK:
        if model in _MODELS_SAID:
            return
        _MODELS_SAID.add(model)
    log.info("peaknet: peaknet-xtal %s, model %s (weights SHA-256 %s)", __version__, model,
             model_digest(model))


def _check_model_exists(model: str) -> None:
    """Fail at start-up, in the main process, rather than later inside a DIALS worker: the file
    must exist and be a safetensors model of a known family, and a plugin family's network must
    keep the hook contract (``weights_io.check_model``, the check every host makes).  An
    architecture's name (a model the zoo builds, without weights) is said to be one, as
    ``peaknet2cxi --model`` says it, not "not found"."""
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.model.weights_io import MODEL_FORMS, check_model
    from peaknet_xtal.model.zoo import list_models
    from peaknet_xtal.registry import PluginError

    if model != "default" and not Path(model).exists() and model not in list_models():
        raise FormatError(model, f"PeakNet model not found (spotfinder.threshold.peaknet.model: "
                                 f"{MODEL_FORMS})")
    try:
        check_model(model)
    except FormatError as exc:  # a folder without weights, a broken file: the setting named too
        raise FormatError(exc.path, f"{exc.message} (spotfinder.threshold.peaknet.model)"
                          ) from None
    except PluginError as exc:  # a plugin's model breaking the contract: named so too
        raise PluginError(f"{exc} (spotfinder.threshold.peaknet.model)") from None


DEVICE_SETTING = "spotfinder.threshold.peaknet.device"


def check_device(spec: str) -> None:
    """Fail at start-up, in the main process, with DIALS' user error (``Sorry``) where the model
    could not run on ``spec`` (:func:`peaknet_xtal.finding.settings.check_device`, the Python
    API's check): the engine would find out only on the first image, inside a DIALS worker, as
    a crash to report.  ``auto`` and ``cpu`` always run and import nothing."""
    from peaknet_xtal.finding.settings import check_device as settings_check_device

    try:
        settings_check_device(spec, DEVICE_SETTING)
    except ValueError as exc:
        from libtbx.utils import Sorry

        raise Sorry(f"peaknet: {exc}") from None


def _say_unused_dispersion_settings(params: Any, settings: PeakNetSettings) -> None:
    """A command line or PHIL file carried over from ``algorithm=dispersion`` sets its
    thresholds (``sigma_strong``, ``global_threshold``, ...) and gain under
    ``spotfinder.threshold.dispersion``, which this algorithm does not read: say so in DIALS'
    log, which setting takes the gain, rather than drop them without a word (a user trial kept
    a tuned ``global_threshold=100`` from a data set's README and saw nothing).  What counts as
    set: a value other than DIALS' own default for it."""
    try:
        given = params.spotfinder.threshold.dispersion
        from dials.algorithms.spot_finding.factory import phil_scope

        defaults = phil_scope.extract().spotfinder.threshold.dispersion
    except (AttributeError, ImportError):  # parameters without dispersion's scope (a test)
        return
    changed = [f"{name}={_phil_words(getattr(given, name))}" for name in vars(defaults)
               if not name.startswith("_") and name != "gain"
               and getattr(given, name, None) != getattr(defaults, name)]
    if changed:
        log.warning("peaknet: spotfinder.threshold.dispersion %s %s not read by "
                    "algorithm=peaknet, which sets no threshold per data set (its own settings: "
                    "spotfinder.threshold.peaknet.*)", ", ".join(changed),
                    "is" if len(changed) == 1 else "are")
    gain = getattr(given, "gain", None)
    if gain is None or settings.adu_per_photon is not None:
        return
    log.warning("peaknet: spotfinder.threshold.dispersion.gain=%s is not read by "
                "algorithm=peaknet; spotfinder.threshold.peaknet.adu_per_photon=%s sets the "
                "same gain for it (unset, the format's gain is used, or measured from the "
                "background where that is a placeholder)", gain, gain)


def _phil_words(value: Any) -> str:
    """A PHIL value as a command line gives it (``3 3`` for a list)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


#: Per engine (one per process and settings): the gain line DIALS' log shows last.
_GAIN_REPORTED: dict[int, tuple[float | None, str]] = {}


def _report_gain(engine: Any, settings: PeakNetSettings, meta: dict[str, Any],
                 source: str | None, declared: float | None = None) -> None:
    """Say in DIALS' log which gain the peak SNRs of image ``source`` counted shot noise with:
    at info level whenever it differs from the last one said, at debug level otherwise, so
    every image's gain is in a ``-vv`` log.

    The engine logs its gain through the package's own logger, which DIALS does not show, and the
    gain matters: the images DIALS hands over declare 1 count per photon (dxtbx divides by the
    format's gain), a placeholder on integrating detectors, so the gain is usually measured from
    the background (``finding/gain.py``), which changes every SNR.  It is pooled (a median)
    over the first images that show one *in this process*, so it moves over the first images
    and depends on which images one process sees (``mp.nproc``, the stills of one command).

    ``declared``: the gain the image format declares (dxtbx's detector model), which dxtbx has
    divided the images by; where it is not 1 the line says so, rather than that the images
    declare 1 (an ADSC image declares 2.4, and its corrected data count photons of that gain)."""
    from peaknet_xtal.formats.dxtbx_images import CORRECTED_GAIN

    gain = meta.get("adu_per_photon")
    if settings.adu_per_photon is not None:
        how = "as set (spotfinder.threshold.peaknet.adu_per_photon)"
    elif meta.get("gain_measured"):
        how = ("measured from the background, as the images' gain is a placeholder (1 after "
               "dxtbx's correction): the median over the first images (up to five that show "
               "one) this process has found (spotfinder.threshold.peaknet.adu_per_photon sets it)")
    elif gain == CORRECTED_GAIN and declared is not None and declared != CORRECTED_GAIN:
        how = (f"as dxtbx hands the images over: it has divided them by the {declared:.4g} ADU "
               "per photon the format declares (spotfinder.threshold.peaknet.adu_per_photon "
               "overrides it)")
    elif gain == CORRECTED_GAIN and declared is None:
        how = ("as dxtbx hands the images over, divided by the format's gain "
               "(spotfinder.threshold.peaknet.adu_per_photon overrides it)")
    else:
        how = "as the images declare (spotfinder.threshold.peaknet.adu_per_photon overrides it)"
    if gain is None:
        text = ("no detector gain known: peak SNRs count background noise only "
                "(spotfinder.threshold.peaknet.adu_per_photon sets one)")
    elif gain == 0:
        text = f"detector gain 0 {how}: peak SNRs count background noise only"
    else:
        text = (f"peak SNRs count shot noise at a detector gain of {gain:.4g} counts per "
                f"photon, {how}")
    said = (None if gain is None else float(f"{gain:.4g}"), how)
    with _PREDICTORS_LOCK:
        new = _GAIN_REPORTED.get(id(engine)) != said
        _GAIN_REPORTED[id(engine)] = said
    (log.info if new else log.debug)("peaknet: %s%s", f"{source}: " if source else "", text)


def _image_name(kwargs: dict[str, Any]) -> str | None:
    """"<file> panel N" from what DIALS passes to compute_threshold, for warnings."""
    try:
        path = kwargs["imageset"].paths()[0]
    except Exception:  # no imageset (the image viewer, a test): no name
        return None
    return f"{path} panel {kwargs.get('i_panel', 0)}"


def _declared_gain(imageset: Any) -> float | None:
    """The gain an imageset's format declares (ADU per photon, which dxtbx divides its
    corrected data by); None without an imageset or where its panels differ."""
    from peaknet_xtal.formats.dxtbx_images import format_gain

    try:
        return format_gain(imageset.get_detector())
    except Exception:  # noqa: BLE001 - no imageset (the image viewer, a test), no detector
        return None


@contextlib.contextmanager
def _as_user_error() -> Iterator[None]:
    """The package's own errors (bad model file, bad pixels) and running out of memory become
    DIALS' user error, which DIALS prints as one line instead of asking the user to report a
    crash (a user trial under a memory limit: 120 lines ending in "Please report this error to
    dials-support")."""
    from libtbx.utils import Sorry

    from peaknet_xtal.errors import PeakNetError

    try:
        yield
    except PeakNetError as exc:  # names the file and what is wrong
        raise Sorry(f"peaknet: {exc}") from None  # DIALS prints the one line, no chain
    except MemoryError as exc:  # numpy's, Python's, torch's (finding.engine says it so)
        raise Sorry(f"peaknet: out of memory: {exc or 'no more could be allocated'}; set "
                    "spotfinder.threshold.peaknet.tile_size=1024 (large panels in tiles), "
                    "fewer spotfinder.mp.nproc, or give the job more memory") from None


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
        with _as_user_error():
            self.settings = PeakNetSettings.from_params(params)
        _say_unused_dispersion_settings(params, self.settings)
        self.dials_mask = DialsMask.from_params(params)
        self.chunking = Chunking.from_params(params)
        self._image: _ImageForeground | None = None
        check_device(self.settings.device)
        with _as_user_error():
            _check_model_exists(self.settings.model)
            _say_what_finds(self.settings.model)

    def __getstate__(self) -> dict[str, Any]:
        # Only the settings (and what DIALS' own mask and work split are made of) travel to
        # DIALS worker processes; the model is loaded there lazily.
        return {"settings": asdict(self.settings), "dials_mask": self.dials_mask,
                "chunking": self.chunking}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = PeakNetSettings(**state["settings"])
        self.dials_mask = state.get("dials_mask") or DialsMask(None, None)
        self.chunking = state.get("chunking") or Chunking()
        self._image = None

    def compute_threshold(self, image: Any, mask: Any, **kwargs: Any) -> Any:
        """Foreground mask for one panel: model peak pixels AND the mask DIALS passed in.

        ``image`` is the corrected panel (or its region of interest) as ``flex.double``, ``mask``
        a ``flex.bool`` of the same shape (True = usable).  DIALS does not remove masked pixels
        from the result itself, so the AND with ``mask`` happens here.  With the ``imageset``
        DIALS passes along, the whole image is found at once under DIALS' mask, and a region
        of interest is cut from it (see the ``batch_size`` help): the rules that judge a whole
        image (spikes against its spot widths, faint_support) then hold whatever is masked.
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
        roi = kwargs.get("region_of_interest")
        with _as_user_error():
            if imageset is not None:
                _check_linked_frames(imageset)
            if imageset is not None and i_panel is not None:
                peaks = self._from_whole_image(imageset, int(i_panel), pixels, good, roi)
            if peaks is None:
                peaks = self.peak_pixels(pixels, good, source=_image_name(kwargs),
                                         i_panel=i_panel,
                                         image=self._image_of(i_panel, pixels, roi),
                                         declared=_declared_gain(imageset))
        return flumpy.from_numpy(np.ascontiguousarray(peaks))

    def _image_of(self, i_panel: int | None, pixels: np.ndarray, roi: Any
                  ) -> _ImageForeground | None:
        """The last whole image, where it holds this panel's pixels (its mask may differ):
        the values marking gaps are judged on the whole image, as in the batched run, not on
        one panel alone."""
        image: _ImageForeground | None = getattr(self, "_image", None)
        if (image is None or i_panel is None or not 0 <= i_panel < len(image.panels)
                or not np.array_equal(_cut(image.panels[i_panel], roi), pixels)):
            return None
        return image

    def peak_pixels(self, pixels: np.ndarray, good: np.ndarray,
                    source: str | None = None, i_panel: int | None = None,
                    image: _ImageForeground | None = None,
                    declared: float | None = None) -> np.ndarray:
        """Boolean foreground of one panel (numpy in, numpy out), already ANDed with ``good``;
        ``source`` names the image in warnings.  With ``i_panel`` the panel's pixel defects are
        tracked across images by a filter of its own (:func:`panel_defects`).  ``image``: the
        whole image it is part of, where known, whose values decide the type they imply
        (else the panel's own).  ``declared``: the format's gain, for the log."""
        from peaknet_xtal.finding.sanitise import implied_dtype

        if not good.any():
            return np.zeros(good.shape, dtype=bool)
        dtype = image.dtype if image is not None else implied_dtype([pixels])
        (foreground,) = self._foreground([pixels], [good], source, i_panel, dtype=dtype,
                                         declared=declared)
        return foreground

    def _foreground(self, panels: list[np.ndarray], goods: list[np.ndarray],
                    source: str | None = None, i_panel: int | None = None, *,
                    dtype: str | None, declared: float | None = None) -> list[np.ndarray]:
        """The shared finding pipeline's DIALS foreground of one image given as panels (or of
        panel ``i_panel`` alone); ``dtype``: the type the whole image's values imply
        (:func:`peaknet_xtal.finding.sanitise.implied_dtype`), as in every dxtbx adapter;
        ``declared``: the gain the format declares (:func:`_report_gain`)."""
        from peaknet_xtal.formats.dxtbx_images import CORRECTED_GAIN
        from peaknet_xtal.types import Frame

        if not any(g.any() for g in goods):  # all masked: nothing to find, nothing to learn
            return [np.zeros(g.shape, dtype=bool) for g in goods]
        frame = Frame(panels=panels, masks=goods, source=source or "",
                      meta={"adu_per_photon": CORRECTED_GAIN, "dtype": dtype})
        engine = get_predictor(self.settings)
        defects = None if i_panel is None else panel_defects(self.settings, i_panel)
        (result,) = engine.find_frames([frame], with_pixels=True, defects=defects,
                                       whole=i_panel is None)
        _report_gain(engine, self.settings, result.meta, source, declared)
        foreground: list[np.ndarray] = result.dials_foreground(self.settings.dilation)
        return foreground

    def _from_whole_image(self, imageset: Any, i_panel: int, pixels: np.ndarray,
                          good: np.ndarray, roi: Any) -> np.ndarray | None:
        """This panel's foreground (within ``roi``, DIALS' region of interest, if any) from a
        whole-image run, or None where that cannot be vouched for (the panel is then found
        alone).

        DIALS asks panel by panel and does not say which image; on panel 0 the image is taken
        to be the one after the last, the first, or the first of a block of images DIALS gives
        a worker process (:class:`Chunking`), if its panel 0 and DIALS' mask of it are exactly
        the ones handed over.  A later panel is answered from it only if its pixels and mask
        are equal to those handed over too.
        """
        image = getattr(self, "_image", None)
        if i_panel == 0:
            image = _ImageForeground.load(self, imageset, pixels, good, roi, image)
            self._image = image
        if image is not None and image.holds(imageset, i_panel, pixels, good, roi):
            return image.answer(i_panel, roi)
        log.debug("peaknet: panel %d is not the panel of an image of the imageset under the "
                  "mask DIALS applies: found alone", i_panel)
        return None


#: master files checked in this process by :func:`_check_linked_frames` (and found whole)
_WHOLE_MASTERS: set[str] = set()


def _check_linked_frames(imageset: Any) -> None:
    """Refuse, once a process, a master file whose frames lie in data files this dxtbx does
    not all read (``formats.dxtbx_images.check_every_linked_frame``), as ``peaknet2cxi`` and
    the Python API refuse it.  Without it ``dials.find_spots algorithm=peaknet`` on an Eiger
    master of 3 frames in two data files found the 2 of the first, exit 0, no word."""
    from peaknet_xtal.formats.dxtbx_images import check_every_linked_frame

    try:
        path = str(imageset.get_path(0))
    except Exception:  # noqa: BLE001 - an imageset without paths (in memory): no files
        return
    if path not in _WHOLE_MASTERS:
        check_every_linked_frame(imageset, path)
        _WHOLE_MASTERS.add(path)


class DialsMask:
    """The pixels DIALS masks on top of the format's mask before it hands a panel over:
    ``spotfinder.filter`` (border, untrusted regions, resolution and ice-ring ranges, which
    DIALS makes per imageset with ``dials.util.masking.generate_mask``) and
    ``spotfinder.lookup.mask``.

    Why: DIALS hands over one panel at a time, each under its mask, and the whole image must be
    found under the same mask on every panel, or a pixel masked on one panel would change what
    is found on all (the rules that judge the whole image would be lost, or judge other pixels).
    So the other panels' mask is made here from the same parameters, as DIALS makes it; every
    panel is still checked against the mask DIALS hands over (:class:`_ImageForeground`)."""

    def __init__(self, filter_params: Any, lookup: list[np.ndarray] | None) -> None:
        self.filter_params = filter_params
        self.lookup = lookup
        self._made: tuple[Any, list[np.ndarray] | None] | None = None

    @classmethod
    def from_params(cls, params: Any) -> DialsMask:
        spotfinder = getattr(params, "spotfinder", None)
        filter_params = getattr(spotfinder, "filter", None)
        lookup_param = getattr(getattr(spotfinder, "lookup", None), "mask", None)
        lookup = None
        if lookup_param:  # a file name, or the masks DIALS' factory has loaded from it
            from dials.algorithms.spot_finding.factory import SpotFinderFactory

            lookup = [np.asarray(m.as_numpy_array(), dtype=bool)
                      for m in SpotFinderFactory.load_image(lookup_param)]
        return cls(filter_params, lookup)

    def __getstate__(self) -> dict[str, Any]:
        # bit-packed: DIALS pickles the extension into every worker task
        lookup = None if self.lookup is None else [(m.shape, np.packbits(m))
                                                   for m in self.lookup]
        return {"filter_params": self.filter_params, "lookup": lookup}

    def __setstate__(self, state: dict[str, Any]) -> None:
        lookup = state["lookup"]
        self.filter_params = state["filter_params"]
        self.lookup = None if lookup is None else [
            np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
            for shape, bits in lookup]
        self._made = None

    def of(self, imageset: Any) -> list[np.ndarray] | None:
        """The mask DIALS adds for ``imageset`` (per panel, True = usable), None where it adds
        nothing; made once per imageset, as DIALS makes it."""
        if self._made is not None and self._made[0] is imageset:
            return self._made[1]
        masks: list[np.ndarray] | None = None
        if self.filter_params is not None:
            from dials.util.masking import generate_mask

            masks = [np.asarray(m.as_numpy_array(), dtype=bool)
                     for m in generate_mask(imageset, self.filter_params)]
        if self.lookup is not None:
            masks = list(self.lookup) if masks is None else [
                a & b for a, b in zip(masks, self.lookup, strict=True)]
        if masks is not None and all(m.all() for m in masks):
            masks = None
        self._made = (imageset, masks)
        return masks


def _with(goods: list[np.ndarray], extra: list[np.ndarray] | None) -> list[np.ndarray]:
    """The format's masks ANDed with DIALS' own (:class:`DialsMask`), as DIALS combines them;
    unchanged where DIALS adds none or its panels are not these."""
    if extra is None or len(extra) != len(goods) or any(
            a.shape != b.shape for a, b in zip(goods, extra, strict=True)):
        return goods
    return [a & b for a, b in zip(goods, extra, strict=True)]


@dataclass(frozen=True)
class Chunking:
    """How DIALS splits an imageset's images between worker processes (``spotfinder.mp``).

    Why: each block of images reaches a worker with a fresh copy of the extension, which must
    tell which image it is handed (DIALS does not say), and reading every image to find it
    would cost more than the finding; the blocks' first images are the likely ones.  The split
    is DIALS' (``SpotFinder._find_spots``), worked out here; a DIALS that splits otherwise
    costs whole-image finding on those blocks, never a wrong answer (every candidate image is
    checked against the pixels handed over)."""

    nproc: int | None = 1  # None: Auto
    njobs: int = 1
    chunksize: int | None = None  # None: Auto
    min_chunksize: int = 20

    #: At most this many blocks' first images are read to find a block's first image.
    MAX_TRIES = 16

    @classmethod
    def from_params(cls, params: Any) -> Chunking:
        mp = getattr(getattr(params, "spotfinder", None), "mp", None)

        def number(name: str, default: int | None) -> int | None:
            value = getattr(mp, name, default)
            return value if isinstance(value, int) and value > 0 else default

        return cls(nproc=number("nproc", None), njobs=number("njobs", 1) or 1,
                   chunksize=number("chunksize", None),
                   min_chunksize=number("min_chunksize", 20) or 1)

    def starts(self, n_images: int) -> list[int]:
        """The first image of each block DIALS hands a worker, for ``n_images`` images."""
        if self.nproc is None:
            from dials.util.mp import available_cores

            nproc = int(available_cores())
        else:
            nproc = self.nproc
        njobs = self.njobs
        if nproc * njobs > n_images:
            nproc = min(nproc, n_images)
            njobs = -(-n_images // max(nproc, 1))
        if nproc * njobs <= 1 or n_images <= 1:
            return [0]
        size = self.chunksize or _chunksize(n_images, nproc * njobs, self.min_chunksize)
        size = max(1, min(size, n_images // (nproc * njobs)))
        return list(range(0, n_images, size))[: self.MAX_TRIES]


def _chunksize(n_images: int, nproc: int, min_chunksize: int) -> int:
    """DIALS' automatic block size (``SpotFinder._compute_chunksize``)."""
    chunksize = -(-n_images // nproc)
    remainder = n_images % (chunksize * nproc)
    test = chunksize - 1
    while test >= min_chunksize:
        if n_images % (test * nproc) <= remainder:
            chunksize, remainder = test, n_images % (test * nproc)
        test -= 1
    return chunksize


def _cut(array: np.ndarray, roi: Any) -> np.ndarray:
    """The region of interest ``roi`` (DIALS' ``x0, x1, y0, y1``) of a panel; all of it for
    None."""
    if roi is None:
        return array
    x0, x1, y0, y1 = (int(v) for v in roi)
    return array[y0:y1, x0:x1]


def _path(imageset: Any, index: int) -> str | None:
    """The file of image ``index``, for the log."""
    try:
        return str(imageset.get_path(index))
    except Exception:  # noqa: BLE001 - an in-memory imageset: no name
        return None


class _ImageForeground:
    """The foreground of every panel of one image of an imageset, found in one batched run
    under DIALS' mask; the imageset, the image's pixels and that mask are its key.  ``dtype``:
    the type its values imply, judged once for the image (:func:`implied_dtype`)."""

    def __init__(self, imageset: Any, index: int, panels: list[np.ndarray],
                 masks: list[np.ndarray], foreground: list[np.ndarray]) -> None:
        self.imageset, self.index = imageset, index
        self.panels, self.masks, self.foreground = panels, masks, foreground
        self.dtype: str | None = None

    def holds(self, imageset: Any, i_panel: int, pixels: np.ndarray, good: np.ndarray,
              roi: Any) -> bool:
        return (imageset is self.imageset and i_panel < len(self.panels)
                and np.array_equal(_cut(self.panels[i_panel], roi), pixels)
                and np.array_equal(_cut(self.masks[i_panel], roi), good))

    def answer(self, i_panel: int, roi: Any) -> np.ndarray:
        return np.ascontiguousarray(_cut(self.foreground[i_panel], roi))

    @classmethod
    def load(cls, ext: PeakNetSpotFinderThresholdExt, imageset: Any, pixels: np.ndarray,
             good: np.ndarray, roi: Any, last: _ImageForeground | None
             ) -> _ImageForeground | None:
        from peaknet_xtal.finding.sanitise import implied_dtype
        from peaknet_xtal.formats.dxtbx_images import image_arrays

        extra = ext.dials_mask.of(imageset)
        candidates = [0, *ext.chunking.starts(len(imageset))]
        if last is not None and last.imageset is imageset:
            candidates.insert(0, last.index + 1)
        for index in dict.fromkeys(candidates):
            if not 0 <= index < len(imageset):
                continue
            panels, goods = image_arrays(imageset, index)
            masks = _with(goods, extra)
            found = cls(imageset, index, panels, masks, [])
            if found.holds(imageset, 0, pixels, good, roi):
                found.dtype = implied_dtype(panels)
                _read_ahead(ext, imageset, index, panels, masks, extra, found.dtype)
                found.foreground = ext._foreground(panels, masks, _path(imageset, index),
                                                   dtype=found.dtype,
                                                   declared=_declared_gain(imageset))
                return found
        return None


def _read_ahead(ext: PeakNetSpotFinderThresholdExt, imageset: Any, index: int,
                panels: list[np.ndarray], masks: list[np.ndarray],
                extra: list[np.ndarray] | None, dtype: str | None) -> None:
    """While the run's defect filter is still learning, count this image and the next ones of
    the imageset (as many as it needs, under DIALS' mask ``extra`` too) before this one is
    found, as ``peaknet2cxi`` reads a run ahead: the hot pixels of a sequence's first images
    are then known on those images too.  DIALS finds an imageset's images in order, one process
    per block of them; a still is an imageset of one image, and there is nothing to read ahead.
    An image that cannot be read ends the read-ahead: DIALS reports it, by name, when its own
    turn comes.  ``dtype``: the type this image's values imply, judged once by the caller."""
    from peaknet_xtal.finding.sanitise import implied_dtype
    from peaknet_xtal.formats.dxtbx_images import image_arrays
    from peaknet_xtal.types import Frame

    engine = get_predictor(ext.settings)
    if engine.defects.learning == 0 or engine.defects.pending:
        return
    ahead = [(panels, masks, dtype)]
    for j in range(index + 1, min(index + engine.defects.learning, len(imageset))):
        try:
            frame_panels, frame_goods = image_arrays(imageset, j)
        except Exception:  # noqa: BLE001 - not this image's error; its own turn raises it
            break
        ahead.append((frame_panels, _with(frame_goods, extra), implied_dtype(frame_panels)))
    for frame_panels, frame_masks, dtype in ahead:
        engine.count_ahead(Frame(panels=frame_panels, masks=frame_masks,
                                 meta={"dtype": dtype}))
