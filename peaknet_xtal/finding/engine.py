"""The finding pipeline: one module, composed by every adapter (``PeakFinder``, ``peaknet2cxi``,
``dials.find_spots algorithm=peaknet``, the Ray workers, the evaluation).

The data flow, and where each step lives::

    source    a Frame: per-panel 2-D pixels + good-pixel masks + geometry/meta, from a
              registered frame source (formats/: CXI, dxtbx images (corrected data, gain 1);
              the psana plugin; api.to_panels)
      |
    sanitise  finding/sanitise.sanitise_frame: non-finite and out-of-range pixels, and panels
              of one value (no data), masked, tallied
      |
    tile      InferenceEngine._predict_many: every panel of every frame of a chunk, within its
              valid region (peaks.valid_region: the rectangle of its good pixels; a panel
              without one is skipped), is cut into tiles (tile_panel), tiles of equal padded
              shape are stacked into batches
      |
    normalise + model
              as the model's ``input_norm`` says: each tile standardised over its valid pixels
              (model/layers/standardise.py), or each whole panel normalised against its local
              background before tiling (model/layers/local_norm.py); tiles are padded to the
              model's pad_multiple and it returns logits of the same size (another size is an
              error naming the model); softmax -> peak probability, stitched back per panel
      |
    peaks     finding/peaks.find_peaks: threshold, 8-connected components per panel, sigma-
              clipped annulus background, centroid, intensity, integrated SNR (gain from
              settings.resolve_gain, else measured from the background: finding/gain.py),
              min_snr / size / max_peaks cuts; then finding/defects.py drops pixels that are
              outliers frame after frame and peaks without a spot profile (one-pixel spikes,
              particle tracks), and
              peaks.faint_unsupported the faint peaks of a frame with few tall ones.  Each
              frame's own part runs in host threads (off the CPU while the model segments the
              next chunk); the run's state (gain, defect counts) moves frame by frame, in order
      |
    result    FrameResult (types.py): the peak table, the hit flag and, on request, each
              reported peak's pixels; it turns into a CXI row, a stream chunk, a DIALS
              reflection table (formats/) or the pixel mask DIALS' threshold step takes
      |
    writer    formats/cxi.CXIWriter, formats/stream, formats/dials_tables, or DIALS itself

Why one pipeline: batching, tiling, device choice and the segmentation-to-peaks step are where
adapters would otherwise drift apart, and a peak found by ``peaknet2cxi`` must be the peak found by
``dials.find_spots`` on the same pixels.  Defaults come from :mod:`.settings`, once.

- **Lazy model.**  Nothing heavy happens in ``__init__``: the model is loaded on first use, and
  the pickled state never holds it, so DIALS and Ray can ship the engine to worker processes that
  load their own copy once.
- **Whole panels, batched across frames.**  Each panel goes to the model whole (its valid
  region), so that its peaks never depend on tile cuts: the network's image-wide statistics
  (GRN, GroupNorm) then cover the panel, whatever else the frame holds or wherever the panel
  sits.  Only a panel wider than ``tile_size`` (8192 px by default: no detector in use) is cut,
  with overlap, each pixel taken from the tile where it lies farthest from a cut.  Panels of one
  padded shape share batches; ``batch_size`` counts 1-Mpx slots (:data:`SLOT_PIXELS`), so a
  batch of whole 6-Mpx panels holds the pixels a batch of 1024-px tiles did.  Any geometry
  works: a panel is just a 2-D array.
- **Determinism.**  Eval mode, no autograd, fixed tile order and float32 everywhere: the same
  input gives the same peaks, run after run.  On CUDA that takes cuDNN's deterministic
  algorithms (set when the model loads there): with its defaults two runs of the same tiles on
  an H200 differed in the last bits.
- **Injectable predictor.**  ``predictor(panels, masks) -> prob maps`` replaces the model; tests
  use it to check the plumbing independently of model quality, and hosts can plug in another
  segmenter.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from peaknet_xtal.errors import PeakNetError, out_of_memory_as_memory_error
from peaknet_xtal.finding.defects import DefectFilter, DefectTracker
from peaknet_xtal.finding.gain import GainResolver, panel_names
from peaknet_xtal.finding.peaks import (
    PeakParams,
    faint_unsupported,
    find_peaks,
    frame_clen_m,
    group_by_shape,
    is_hit,
    valid_region,
)
from peaknet_xtal.finding.sanitise import SanitiseTally, sanitise_frame
from peaknet_xtal.finding.settings import (
    DEFAULTS,
    LIMITS,
    MIN_TILE,
    check_faint_support,
    check_limits,
    check_min_peaks,
    check_precision,
    resolve_gain,
)
from peaknet_xtal.threads import default_threads, torch_threads, torch_threads_for
from peaknet_xtal.types import Frame, FrameResult

log = logging.getLogger(__name__)
#: a frame whose peaks are being found: frame, probabilities, good pixels, the peak job, its gain
_InFlight = tuple[Frame, list[np.ndarray], list[np.ndarray], Any, float | None]

Predictor = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], Sequence[np.ndarray]]

#: Pixels of one batch slot (a 1024 x 1024 tile, the engine's tile before panels went whole):
#: ``batch_size`` counts slots, an input of more pixels taking several, so that a batch of whole
#: 6-Mpx Pilatus panels holds as many pixels as one of 1024-px tiles did.  Counting inputs instead
#: put eight whole 6-Mpx frames in one forward pass: 2.0x the CPU time of the same frames in
#: tiles and 3.2x the memory (4.1 against 1.3 GB, one thread); one or two frames at a time, the
#: same time either way.
SLOT_PIXELS = 1024 * 1024
#: Panels normalised in one call (model.normalise): 64 CSPAD ASICs at once, ~2.3 Mpx of float32
#: intermediates; a large single panel (Pilatus 6M) goes alone anyway.
NORMALISE_BATCH = 64


@dataclass(frozen=True)
class Tile:
    """Where a model tile comes from and which part of it is kept when stitching."""

    panel: int
    y0: int  # tile origin in the panel
    x0: int
    height: int  # tile extent (unpadded)
    width: int
    core: tuple[slice, slice]  # kept region, in panel coordinates


def slots(height: int, width: int) -> int:
    """Batch slots a model input of ``height`` x ``width`` pixels takes (:data:`SLOT_PIXELS`)."""
    return max(1, -(-(height * width) // SLOT_PIXELS))


def tile_panel(shape: tuple[int, int], tile_size: int, overlap: int) -> list[tuple[int, int, int,
                                                                                     int, tuple]]:
    """Cover a panel with tiles of at most ``tile_size`` overlapping by ``overlap`` pixels.

    Returns ``(y0, x0, h, w, core)`` items; the cores partition the panel exactly, each pixel
    being taken from the tile where it lies farthest from a cut edge, so that the model's border
    effects at cuts never reach the output.  Tiles start on the model's 32-px grid and the last
    one along an axis runs to the panel's end (padded to the grid as the whole panel is): a
    strided network sees a tile shifted by a pixel as another image, so only aligned tiles can
    give the whole panel's output (model/fixed_stats.py: with fixed image statistics they do).
    """
    ys = _axis_tiles(shape[0], tile_size, overlap)
    xs = _axis_tiles(shape[1], tile_size, overlap)
    return [(y0, x0, h, w, (ycore, xcore)) for y0, h, ycore in ys for x0, w, xcore in xs]


def _axis_tiles(length: int, size: int, overlap: int) -> list[tuple[int, int, slice]]:
    if length <= size:
        return [(0, length, slice(0, length))]
    if size - overlap < MIN_TILE:
        raise ValueError(f"tiles of {size} px overlapping by {overlap} advance less than the "
                         f"model's {MIN_TILE}-px grid")
    count = -(-(length - overlap) // (size - overlap))  # fewest tiles with >= overlap shared
    while True:
        # ... each no larger than that needs (rounded up to the model's 32-px padding multiple):
        # a 2463-px Pilatus side takes three 864-px tiles, not three of 1024 (1.25x the pixels)
        needed = -(-(length + overlap * (count - 1)) // count)
        side = min(size, -(-needed // MIN_TILE) * MIN_TILE)
        last = -(-(length - side) // MIN_TILE) * MIN_TILE  # on the grid, running to the end
        starts = [int(round(k * last / (count - 1) / MIN_TILE)) * MIN_TILE
                  for k in range(count)]
        ends = [start + side for start in starts[:-1]] + [length]
        if all(ends[k] - starts[k + 1] >= overlap for k in range(count - 1)):
            break
        count += 1  # aligning took some overlap: one tile more
    middles = [(starts[k + 1] + ends[k]) // 2 for k in range(count - 1)]
    cuts = [0] + middles + [length]
    return [(start, end - start, slice(cuts[k], cuts[k + 1]))
            for k, (start, end) in enumerate(zip(starts, ends, strict=True))]


def _check_tiles(tile_size: Any, tile_overlap: Any) -> None:
    """A TypeError naming ``tile_size`` or ``tile_overlap`` where it is no whole number, a
    ValueError where tiles of that size would not advance a grid cell past their overlap (the
    least ``tile_size`` :data:`.settings.LIMITS` states is that at the default overlap).  Why
    here: every entry point passes ``tile_size`` through, and ``tile_size=1000.5`` was taken,
    then failed at the first frame as "'float' object cannot be interpreted as an integer"."""
    for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a whole number of pixels, got {value!r}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
    if tile_size - tile_overlap < MIN_TILE:
        raise ValueError(f"tile_size must be >= {MIN_TILE + tile_overlap} (tiles advance on the "
                         f"model's {MIN_TILE}-px grid past their {tile_overlap}-px "
                         f"tile_overlap), got {tile_size}")


class InferenceEngine:
    """Batched segmentation + peak finding, shared by every adapter.

    ``model`` is a registered name (``"default"``), a weights path, or a ready ``torch.nn.Module``;
    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``; ``threads``: torch's CPU
    threads while the model runs (the process's own setting comes back after each run:
    :func:`peaknet_xtal.threads.torch_threads`) and the host threads that find the peaks
    (default: the CPUs the process may use, :func:`peaknet_xtal.threads.torch_threads_for`);
    ``batch_size`` counts 1-Mpx slots of model input (:data:`SLOT_PIXELS`; a CSPAD ASIC takes
    one, a whole Pilatus 6M panel six).  Peak settings
    come from ``peak_params`` or the shorthand keywords ``threshold``, ``min_snr``, ``min_height``,
    ``min_peaks``, ``max_peaks``, ``adu_per_photon``, ``rescue_prob``, ``rescue_height``,
    ``faint_support``; every default is
    :data:`.settings.DEFAULTS`.  A frame is a hit (``FrameResult.hit``) when it has at least
    ``min_peaks`` peaks after every cut, the defect filter's included (the hit rule of
    :mod:`.settings`).  With ``fast`` (the default) a PeakNet on the CPU runs in its fused
    inference form (``model.fast.fuse_for_inference``: the same weights, about 1.4x faster on
    one thread, the same probabilities to float32 rounding); ``fast=False`` runs the layers as
    trained.  The detector gain (ADU per photon, for the shot noise in each peak's SNR) is
    resolved per frame by :func:`.settings.resolve_gain` while ``adu_per_photon`` is None; 0
    leaves shot noise out.
    """

    def __init__(
        self,
        model: Any = DEFAULTS.model,
        *,
        device: str = DEFAULTS.device,
        threads: int | None = None,
        batch_size: int = DEFAULTS.batch_size,
        threshold: float | None = None,
        min_snr: float | None = None,
        min_height: float | None = None,
        min_peaks: int | None = None,
        max_peaks: int | None = None,
        adu_per_photon: float | None = None,
        rescue_prob: float | None = None,
        rescue_height: float | None = None,
        faint_support: int | None = None,
        peak_params: PeakParams | None = None,
        predictor: Predictor | None = None,
        tile_size: int = DEFAULTS.tile_size,
        tile_overlap: int = DEFAULTS.tile_overlap,
        keep_prob_maps: bool = False,
        fast: bool = True,
        precision: str = DEFAULTS.precision,
    ) -> None:
        _check_tiles(tile_size, tile_overlap)
        params = peak_params or PeakParams()
        check_min_peaks(params.min_peaks if min_peaks is None else min_peaks)
        check_faint_support(params.faint_support if faint_support is None else faint_support)
        overrides = {k: v for k, v in (("threshold", threshold), ("min_snr", min_snr),
                                       ("min_height", min_height), ("min_peaks", min_peaks),
                                       ("max_peaks", max_peaks),
                                       ("adu_per_photon", adu_per_photon),
                                       ("rescue_prob", rescue_prob),
                                       ("rescue_height", rescue_height),
                                       ("faint_support", faint_support))
                     if v is not None}
        self.peak_params = _replace(params, overrides)
        check_limits({name: getattr(self.peak_params, name) for name in LIMITS
                      if hasattr(self.peak_params, name)} | {"batch_size": batch_size})
        if isinstance(model, (str, os.PathLike)) and predictor is None:
            from peaknet_xtal.model.weights_io import check_model

            # a missing, damaged or foreign weights file, or a plugin's network that breaks
            # the hook contract (one that downsamples), is refused here, naming it, not at the
            # first frame (after inputs were opened and outputs started); the network the
            # engine runs is still built and loaded on first use
            check_model(model)
        self.model_spec = model
        self.device_spec = device
        self.threads = threads
        self.batch_size = batch_size
        self.predictor = predictor
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.keep_prob_maps = keep_prob_maps
        self.fast = fast
        self.precision = check_precision(precision)
        self._model: Any = None
        self._device: Any = None
        self._torch_threads: int | None = None  # chosen as the model first runs on the CPU
        self._gains_logged: set[float | None] = set()
        self._host_pool: ThreadPoolExecutor | None = None  # peak finding's threads, made on use
        self._host_threads = 0
        self._find_threads: int | None = None  # the last find_frames' threads
        #: Frames and pixels masked as unusable so far (non-finite, absurd, marked, panels of
        #: one value) and frames without data, see :mod:`.sanitise`; a host that reports the
        #: counts says where in its ``reported_in``.
        self.sanitised = SanitiseTally()
        self.new_run()

    def new_run(self) -> None:
        """Forget what the run so far measured: the gain from the data and the pixel defects.
        An engine counts every frame it finds towards its run; one that goes on to another
        detector or experiment calls this first."""
        self._gain_from_data = GainResolver()  # missing/placeholder gains: from the background
        self.defects = DefectFilter()  # hot pixels across the run, spikes and tracks per frame

    # ---- pickling: never ship the model -------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_host_pool"] = None  # threads do not travel; a copy makes its own
        # nor torch's threads (a copy chooses them on its own machine), nor those this one used
        state["_torch_threads"] = state["_find_threads"] = None
        if not _is_module(self.model_spec):
            state["_model"] = None
            state["_device"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- model -------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def threads_used(self) -> int | None:
        """The CPU threads this engine ran on, for run records (``threads`` is the setting,
        None where the machine chose): torch's, as :func:`~peaknet_xtal.threads.
        torch_threads_for` chose them for the model's runs, where it runs on the CPU; else the
        threads that found the peaks; None before the first frame."""
        return self._torch_threads if self._torch_threads is not None else self._find_threads

    @property
    def device(self) -> str:
        """The resolved device name (resolving does not load the model)."""
        if self._device is None:
            self._device = resolve_device(self.device_spec)
        return str(self._device)

    def model(self) -> Any:
        """The model, loaded on first call, in eval mode on :attr:`device`."""
        if self._model is None:
            import torch

            if self.device.startswith("cuda"):
                torch.backends.cudnn.deterministic = True  # same input, same bits (see above)
                torch.backends.cudnn.benchmark = False
            if self.precision == "bf16":
                _check_bf16(torch, self.device)
            if _is_module(self.model_spec):
                model = self.model_spec.to(self.device)
            else:
                from peaknet_xtal.model import load_model

                model = load_model(self.model_spec, device=self.device)
            model = model.eval()
            if self.fast and self.device == "cpu":
                model = _fast_cpu_form(model)
            self._model = model
            log.info("loaded model %s on %s%s", _describe(self.model_spec), self.device,
                     " (fused for CPU inference)" if getattr(model, "fused_for_inference", False)
                     else "")
        return self._model

    # ---- segmentation ------------------------------------------------------------------------
    def predict_panels(self, panels: Sequence[np.ndarray],
                       masks: Sequence[np.ndarray] | None = None, *,
                       source: str | None = None) -> list[np.ndarray]:
        """Peak probability (float32, same shape) for each 2-D panel; masked pixels get 0.
        ``source`` names the image in warnings about unusable pixels."""
        return self._predict_many([list(panels)], [None if masks is None else list(masks)],
                                  None if source is None else [source])[0][0]

    def _predict_many(self, frames: list[list[np.ndarray]],
                      masks: list[list[np.ndarray] | None], sources: Sequence[str] | None = None,
                      dtypes: Sequence[Any] | None = None,
                      names: Sequence[Sequence[str] | None] | None = None
                      ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """Probability maps for several frames' panels, batched across all of them, and the
        good-pixel masks they were computed with.  This is where pixels enter the engine:
        non-finite, absurd and marked values, and panels that hold one value, are masked here
        (and only here, :mod:`.sanitise`; ``dtypes``: each frame's ``meta["dtype"]``, the type
        its data were stored as; ``names``: each frame's panel names, for the warnings)."""
        panels, goods, owner = [], [], []
        frame_goods: list[list[np.ndarray]] = []
        for f, (frame_panels, frame_masks) in enumerate(zip(frames, masks, strict=True)):
            images, good_masks, check = sanitise_frame(frame_panels, frame_masks,
                                                       dtypes[f] if dtypes else None)
            self.sanitised.add(check, sources[f] if sources else "image",
                               names[f] if names else None)
            frame_goods.append(good_masks)
            panels.extend(images)
            goods.extend(good_masks)
            owner.extend([f] * len(images))
        with out_of_memory_as_memory_error():  # torch's words for it: one type everywhere
            if self.predictor is not None:
                probs = [np.asarray(p, dtype=np.float32) for p in self.predictor(panels, goods)]
            else:
                probs = self._run_model(panels, goods)
        out: list[list[np.ndarray]] = [[] for _ in frames]
        for f, prob, good in zip(owner, probs, goods, strict=False):
            out[f].append(np.where(good, prob, np.float32(0)))
        return out, frame_goods

    def predict_logits(self, panels: Sequence[np.ndarray],
                       masks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """The model's raw ``(classes, H, W)`` logits per panel, tiled and batched exactly as
        :meth:`predict_panels` runs it (what the model says before softmax and threshold)."""
        images, goods, check = sanitise_frame(panels, masks)
        self.sanitised.add(check, "image")
        with out_of_memory_as_memory_error():  # as for the probabilities
            return self._run_model(images, goods, logits=True)

    def _run_model(self, panels: list[np.ndarray], goods: list[np.ndarray],
                   logits: bool = False) -> list[np.ndarray]:
        """Peak probability per panel, or with ``logits`` the raw ``(classes, H, W)`` output,
        the model run on each panel's valid region only (:func:`valid_region`): the smallest
        rectangle holding its good pixels.  Outside it every pixel is masked: probability 0,
        the masked logits (``model.peaknet.masked_logits``); a panel without a good pixel never
        reaches the model.

        Why: what the network sees must not depend on where a panel sits.  Masked margins or a
        panel embedded in a larger masked layout used to move the tile cuts, the normalisation
        cells and the pixels the network's tile-wide statistics average over (GRN, GroupNorm),
        so a panel embedded at an offset in a masked layout found 99.3 % of its own peaks
        (``benchmarks/tile_dependence.py``); cropped, it is the same input, the same peaks.  A
        masked margin of up to ``types.MASKED_EDGE`` pixels is kept (a border mask, not a
        layout: ``valid_span``), so a panel embedded with a surround that thin is not cropped
        to itself and its peaks move (a measured trade-off: README, DIALS section).  A dead or
        fully masked ASIC costs nothing."""
        regions = [valid_region(good) for good in goods]
        live = [i for i, region in enumerate(regions) if region is not None]
        found = dict(zip(live, self._segment([panels[i][regions[i]] for i in live],
                                             [goods[i][regions[i]] for i in live], logits)
                         if live else [], strict=True))
        classes = (next(iter(found.values())).shape[0] if found else _classes(self.model())
                   ) if logits else 0
        out: list[np.ndarray] = []
        for i, (panel, region) in enumerate(zip(panels, regions, strict=True)):
            shape, result = _shape2(panel), found.get(i)
            if result is not None and result.shape[-2:] == shape:
                out.append(result)
                continue
            whole = (np.broadcast_to(_masked_logits(classes)[:, None, None], (classes, *shape))
                     .copy() if logits else np.zeros(shape, np.float32))
            if result is not None and region is not None:
                whole[(..., *region)] = result
            out.append(whole)
        return out

    def _segment(self, panels: list[np.ndarray], goods: list[np.ndarray],
                 logits: bool = False) -> list[np.ndarray]:
        """Tile, pad, batch, run and stitch: peak probability per panel, or with ``logits`` the
        raw ``(classes, H, W)`` output.

        Pixels cross to the model's device once and come back once: panels of one shape go up
        stacked, are normalised, cut into tiles and stitched there, and each panel's map comes
        back whole (before, the normalised panels came back to the host, were stacked into
        tiles by numpy and went up again: two extra copies of every frame each way on a GPU;
        on the CPU the same time, 0.83-0.95 s for 2 Mpx on one thread, and the same output)."""
        import torch

        tiles = [Tile(i, y0, x0, h, w, core)
                 for i, panel in enumerate(panels)
                 for y0, x0, h, w, core in tile_panel(_shape2(panel), self.tile_size,
                                                      self.tile_overlap)]
        model = self.model()
        multiple = int(getattr(model, "pad_multiple", 1))
        groups: dict[tuple[int, int], list[Tile]] = {}
        for tile in tiles:
            groups.setdefault(_padded(tile.height, tile.width, multiple), []).append(tile)
        # A locally normalised model sees each whole panel normalised once, before tiling, so
        # that tile cuts cannot change what it sees (model/layers/local_norm.py).
        local = getattr(model, "config", {}).get("input_norm") == "local"
        run = model if logits or not hasattr(model, "peak_logit") else model.peak_logit
        out: list[Any] = [None] * len(panels)
        with torch.inference_mode(), self._cpu_threads():
            images, valid = self._to_device(panels, goods)
            if local:
                images = self._normalise_panels(model, images, valid)
            for shape, members in groups.items():
                per_batch = max(1, self.batch_size // slots(*shape))
                for start in range(0, len(members), per_batch):
                    batch = members[start:start + per_batch]
                    x, m = _stack_tiles(batch, images, valid, shape)
                    with (torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
                          if self.precision == "bf16" else contextlib.nullcontext()):
                        raw = run(x, m, **({"normalised": True} if local else {}))  # network
                    _check_output(raw, x, model, self.model_spec)
                    raw = raw.float()
                    values = raw if logits else peak_probability(raw)
                    for tile, v in zip(batch, values, strict=True):
                        if out[tile.panel] is None:
                            out[tile.panel] = v.new_zeros(v.shape[:-2] + images[tile.panel]
                                                          .shape[-2:])
                        ys, xs = tile.core
                        out[tile.panel][..., ys, xs] = v[..., ys.start - tile.y0:ys.stop - tile.y0,
                                                         xs.start - tile.x0:xs.stop - tile.x0]
        return [to_host(panel_out) for panel_out in out]

    def _cpu_threads(self) -> contextlib.AbstractContextManager[None]:
        """torch's CPU threads for one model run (:func:`torch_threads`), chosen at the first
        (:func:`torch_threads_for`: ``threads``, else the default, said once); nothing on a
        GPU.  Why per run: set when the model loaded, they stayed the process's for good (a
        script's own torch work ran at them after its first ``find``), and an engine loaded
        later set its own for every engine of the process."""
        if self.device != "cpu":
            return contextlib.nullcontext()
        if self._torch_threads is None:
            self._torch_threads = torch_threads_for(self.threads)
        return torch_threads(self._torch_threads)

    def _to_device(self, panels: list[np.ndarray], goods: list[np.ndarray]
                   ) -> tuple[list[Any], list[Any]]:
        """Each panel and its good-pixel mask as a ``(H, W)`` tensor on the model's device;
        panels of one shape travel stacked (one copy each for the 64 ASICs of a CSPAD)."""
        import torch

        images: list[Any] = [None] * len(panels)
        valid: list[Any] = [None] * len(panels)
        for members in group_by_shape(panels):
            x = torch.from_numpy(np.stack([panels[i] for i in members])).to(self.device)
            g = torch.from_numpy(np.stack([goods[i] for i in members])).to(self.device)
            for k, i in enumerate(members):
                images[i], valid[i] = x[k], g[k]
        return images, valid

    def _normalise_panels(self, model: Any, images: list[Any], valid: list[Any]) -> list[Any]:
        """Each whole panel through ``model.normalise``, panels of one shape in one batch: the
        normalisation works per image, so batching changes nothing but float32 rounding and the
        per-call overhead, which dominates on the many small panels of a CSPAD (64 ASICs:
        0.16 -> 0.08 s a frame, one thread)."""
        import torch

        out: list[Any] = [None] * len(images)
        for members in group_by_shape(images):
            for start in range(0, len(members), NORMALISE_BATCH):
                chunk = members[start:start + NORMALISE_BATCH]
                x = torch.stack([images[i] for i in chunk])[:, None]
                g = torch.stack([valid[i] for i in chunk])[:, None]
                z = model.normalise(x, g)
                for k, i in enumerate(chunk):
                    out[i] = z[k, 0]
        return out

    # ---- peaks -------------------------------------------------------------------------------
    def find_frames(self, frames: Iterable[Frame], *, with_pixels: bool = False,
                    with_bbox: bool = False, defects: DefectFilter | None = None,
                    whole: bool = True) -> Iterator[FrameResult]:
        """One :class:`FrameResult` per input frame, in input order, batching across frames;
        ``with_pixels`` keeps each reported peak's pixels (``FrameResult.peak_pixels``),
        ``with_bbox`` its box (``FrameResult.peak_boxes``).  ``defects``: the run's pixel
        defect filter, the engine's own by default (a host that hands over the panels of a
        detector one at a time keeps one per panel, and says ``whole=False``: a frame is then
        one panel of an image, and the frame-level faint-peak rule, which counts the whole
        image's tall peaks, is left out rather than applied to a part)."""
        defects = self.defects if defects is None else defects
        faint_support = self.peak_params.faint_support if whole else 0
        threads = int(self.threads or default_threads())
        ahead = self._in_flight(threads)
        host = max(1, threads - 1) if ahead else threads  # one core feeds the GPU meanwhile
        flight: collections.deque[_InFlight] = collections.deque()
        # frames this call reads ahead are its own to filter; where it stops before filtering
        # them all (Ctrl-C, a loop left with break), they stay counted and are no longer
        # pending: the frames found next are counted as themselves (DefectFilter.drop_pending)
        own_ahead = not defects.pending
        try:
            chunks = self._chunks(self._read_ahead(frames, defects))
            error: Exception | None = None
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as exc:  # a broken input: the frames before it come first
                    error = exc
                    break
                self._find_threads = threads  # for the records (threads_used): frames are found
                probs, goods = self._predict_many([f.panels for f in chunk],
                                                  [f.masks for f in chunk],
                                                  [_where(f) for f in chunk],
                                                  [f.meta.get("dtype") for f in chunk],
                                                  [panel_names(f.geometry, len(f.panels))
                                                   for f in chunk])
                # The run's state (its gain, its pixel defects) moves frame by frame, in order;
                # what depends on one frame alone (its peaks, its spiking pixels: 0.1 s for 2 Mpx
                # on one thread, where the model on an H200 takes 0.02) runs in threads
                for k, frame in enumerate(chunk):
                    params = self.params_for(frame, goods[k])
                    # frames read ahead were counted then: as many as are pending beyond those
                    # in flight (each of which takes one off when filtered)
                    counted = defects.pending > len(flight)
                    flight.append((frame, probs[k], goods[k], self._on_host(
                        host, self._frame_peaks, frame, probs[k], goods[k], params, with_pixels,
                        with_bbox, None if counted else defects.tracker), params.adu_per_photon))
                yield from self._landed(flight, ahead, defects, faint_support)
            yield from self._landed(flight, 0, defects, faint_support)
            if error is not None:
                raise error
        finally:
            if own_ahead:
                defects.drop_pending()

    def _landed(self, flight: collections.deque[_InFlight], keep: int, defects: DefectFilter,
                faint_support: int) -> Iterator[FrameResult]:
        """The results of the oldest frames in ``flight``, in order, until ``keep`` remain; each
        says the gain its peak SNRs counted shot noise with (``meta["adu_per_photon"]``, and
        ``meta["gain_measured"]`` where it was measured from the data because none or a
        placeholder was declared: writers put it into the geometry they write)."""
        while len(flight) > keep:
            frame, probs, goods, job, gain = flight.popleft()
            result = self._result(frame, probs, goods, defects, faint_support, *job.result())
            result.meta["adu_per_photon"] = gain
            result.meta["gain_measured"] = gain is not None and gain != resolve_gain(
                self.peak_params.adu_per_photon, meta=frame.meta, geometry=frame.geometry)
            yield result

    def _in_flight(self, threads: int) -> int:
        """Frames whose peaks may still be being found while the model runs the next chunk:
        off the CPU, two per host thread (the GPU and the host work at once); on the CPU none,
        as the model takes every core (a chunk's peaks are found before the next chunk's model
        runs)."""
        return 2 * threads if self.predictor is None and self.device != "cpu" else 0

    def _on_host(self, threads: int, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on the host's threads, one per CPU the engine may use (``threads``,
        else what the process may use), as a future; run at once with one thread.  An error
        comes with the future, so that the frames before it are delivered first.  numpy and
        scipy let go of the GIL in the array work, so peak finding scales with threads: on
        2-Mpx frames, 2 threads of the 2-core machine took 0.05-0.06 s a frame against 0.10 in
        one, with the same peak tables."""
        if threads <= 1:
            done: Future[Any] = Future()
            try:
                done.set_result(work(*args))
            except Exception as exc:  # raised by result(), in the frames' order
                done.set_exception(exc)
            return done
        if self._host_pool is None or self._host_threads != threads:
            self._host_pool = ThreadPoolExecutor(threads, thread_name_prefix="peaknet-peaks")
            self._host_threads = threads
        return self._host_pool.submit(work, *args)

    def _frame_peaks(self, frame: Frame, probs: list[np.ndarray], goods: list[np.ndarray],
                     params: PeakParams, with_pixels: bool, with_bbox: bool,
                     tracker: DefectTracker | None
                     ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray] | None,
                                list[np.ndarray] | None]:
        """What one frame alone decides: its peak table, boxes and pixels (each None unless
        asked for), and, with ``tracker``, its spiking pixels for the run's defect count."""
        # the frame's own wavelength and camera length where the geometry reads them from the
        # data file: without them every 1/d would be unknown
        found = find_peaks(frame.panels, probs, goods, params, geometry=frame.geometry,
                           wavelength_A=frame.meta.get("wavelength_A"),
                           clen_m=frame_clen_m(frame), with_bbox=with_bbox,
                           with_pixels=with_pixels)
        found = found if isinstance(found, tuple) else (found,)
        spikes = None if tracker is None else tracker.spike_maps(frame.panels, goods)
        return (found[0], found[1] if with_bbox else None, found[-1] if with_pixels else None,
                spikes)

    def _read_ahead(self, frames: Iterable[Frame], defects: DefectFilter) -> Iterator[Frame]:
        """``frames`` unchanged; while the defect filter is still learning (a run's first
        frames), as many frames as it needs are read and counted first, so that the hot pixels of
        those first frames are known when their peaks are filtered (finding/defects.py).  An
        input error while reading ahead comes after the frames read before it are found, as it
        would without reading ahead (nothing readable is lost to a later broken file).  Frames a
        host counted ahead itself (:meth:`count_ahead`) come first; nothing more is read then."""
        if defects.pending:
            yield from frames
            return
        it = iter(frames)
        head: list[Frame] = []
        error: Exception | None = None
        try:
            head.extend(itertools.islice(it, defects.learning))
        except Exception as exc:  # re-raised below, after the frames before it
            error = exc
        for frame in head:
            self.count_ahead(frame, defects)
        yield from head
        if error is not None:
            raise error
        yield from it

    def count_ahead(self, frame: Frame, defects: DefectFilter | None = None) -> None:
        """Count ``frame`` towards the run's pixel defects (``defects``, default the engine's)
        before it is found: it must be the next frame found (then its own finding does not
        count it again).  For hosts that hand frames over one at a time but can look ahead
        themselves (the DIALS plugin within an imageset); :meth:`find_frames` reads ahead by
        itself."""
        _, goods, _ = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))
        (self.defects if defects is None else defects).count_ahead(frame.panels, goods)

    def _chunks(self, frames: Iterable[Frame]) -> Iterator[list[Frame]]:
        """Groups of whole frames holding at least ``batch_size`` slots of model input (the last
        may hold fewer).  An error reading the next frame comes after the group of frames read
        before it, which would otherwise be lost with it (a truncated file after a few small
        ones)."""
        chunk: list[Frame] = []
        tiles = 0
        it = iter(frames)
        while True:
            try:
                frame = next(it)
            except StopIteration:
                break
            except Exception:
                if chunk:
                    yield chunk
                raise
            chunk.append(frame)
            tiles += sum(slots(h, w) for p in frame.panels
                         for _, _, h, w, _ in tile_panel(_shape2(np.asarray(p)), self.tile_size,
                                                         self.tile_overlap))
            if tiles >= self.batch_size:
                yield chunk
                chunk, tiles = [], 0
        if chunk:
            yield chunk

    def _result(self, frame: Frame, probs: list[np.ndarray], goods: list[np.ndarray],
                defects: DefectFilter, faint_support: int, peaks: np.ndarray,
                boxes: np.ndarray | None,
                pixels: list[np.ndarray] | None, spikes: list[np.ndarray] | None
                ) -> FrameResult:
        """The frame's result from its own peaks (:meth:`_frame_peaks`) after the run's defect
        filter, which counts the frame (frames must come here in order), and then the frame's
        faint peaks without support (``peaks.faint_unsupported``: it counts the tall peaks the
        defect filter left; ``faint_support`` 0: none go)."""
        keep = defects.keep(peaks, frame.panels, goods, spikes)
        keep[keep] = ~faint_unsupported(peaks[keep], self.peak_params.faint_height,
                                        faint_support, self.peak_params.faint_snr)
        if not keep.all():  # boxes and pixels stay in step with the peaks
            boxes = None if boxes is None else boxes[keep]
            pixels = None if pixels is None else _without_dropped(pixels, peaks[~keep])
        kept = peaks[keep]
        return FrameResult(frame=frame, peaks=kept, hit=is_hit(kept, self.peak_params.min_peaks),
                           prob_maps=probs if self.keep_prob_maps else None, peak_pixels=pixels,
                           peak_boxes=boxes)

    def observe(self, frame: Frame) -> None:
        """Count a frame the run does not process (done by an interrupted earlier run) towards
        the run-level measurements -- the gain measured from the data and the pixel defects --
        so that a resumed run measures them on the same frames as an uninterrupted one and
        finds the same peaks.  The run's spot width (``DefectFilter.run_widths``) comes from
        the peaks of the frames found, so a resumed run learns it again from its own: until
        they hold 20 strong peaks (its first hit, as a rule), a frame with too few strong
        peaks of its own keeps its spikes and tracks, as every frame did before the filter
        judged blanks."""
        _, goods, _ = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))
        if self.peak_params.adu_per_photon is None:
            self._gain_from_data(resolve_gain(meta=frame.meta, geometry=frame.geometry),
                                 frame.panels, goods,
                                 panel_names(frame.geometry, len(frame.panels)))
        self.defects.tracker.update(frame.panels, goods)

    def params_for(self, frame: Frame, goods: Sequence[np.ndarray] | None = None) -> PeakParams:
        """The peak settings for one frame: the engine's, with the frame's own gain when the
        engine was given none.  ``goods``: the frame's usable pixels as the engine sanitised
        them (:mod:`.sanitise`), where the caller has them; the gain is measured on those only
        (a gap's marked values or a NaN are no background)."""
        if self.peak_params.adu_per_photon is not None:
            return self.peak_params
        if goods is None:
            goods = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))[1]
        # declared (source, geometry), else -- or where the declared one is a placeholder --
        # measured from the run's background (finding/gain.py)
        gain = self._gain_from_data(resolve_gain(meta=frame.meta, geometry=frame.geometry),
                                    frame.panels, goods,
                                    panel_names(frame.geometry, len(frame.panels)))
        if gain not in self._gains_logged:
            self._gains_logged.add(gain)
            log.info("%s: %s", frame.source or "frame", "no detector gain declared: peak SNR "
                     "counts background noise only" if gain is None else
                     f"peak SNR counts shot noise at {gain:.3g} ADU per photon")
        return self.peak_params if gain is None else _replace(self.peak_params,
                                                               {"adu_per_photon": gain})

    def describe(self) -> dict[str, Any]:
        """The engine's settings as plain values, for run records and summaries."""
        return {"model": _describe(self.model_spec), "device": self.device_spec,
                "threads": self.threads, "batch_size": self.batch_size,
                "tile_size": self.tile_size, "tile_overlap": self.tile_overlap,
                "fast": self.fast, "precision": self.precision,
                "predictor": None if self.predictor is None else _describe(self.predictor),
                **{k: getattr(self.peak_params, k) for k in self.peak_params.__dataclass_fields__}}


def peak_probability(logits: Any) -> Any:
    """Softmax's peak channel; for two classes as ``sigmoid(l1 - l0)``, the same value without
    the strided two-channel reduction (4x faster on one thread: 0.19 against 0.74 ms for a
    batch of 8 CSPAD tiles); one channel is that difference already (a model's
    ``peak_logit``)."""
    import torch

    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[1] == 2:
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return torch.softmax(logits, dim=1)[:, 1]


def _fast_cpu_form(model: Any) -> Any:
    """A PeakNet's fused inference copy (``model.fast``); any other module as it is."""
    from peaknet_xtal.model.fast import fuse_for_inference
    from peaknet_xtal.model.peaknet import PeakNet

    return fuse_for_inference(model) if isinstance(model, PeakNet) else model


def _check_bf16(torch: Any, device: str) -> None:
    """bfloat16 where the device computes it: a CUDA GPU without it is an error; a CPU without
    native bfloat16 instructions (AVX512-BF16, AMX) runs it emulated, slower than float32,
    which is said once, as the model loads (``finding.settings.PRECISIONS``)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16: the GPU of {device} has no bfloat16; use fp32")
        return
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: emulated too
        native = False
    if not native:
        log.warning("precision bf16: this CPU has no native bfloat16 instructions, so the "
                    "network runs slower than in fp32 (the default); use fp32 here")


def resolve_device(spec: str) -> Any:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; an unavailable CUDA is an error."""
    import torch

    spec = str(spec or "auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but torch sees no CUDA GPU; use cpu or auto")
    return device


def to_host(tensor: Any) -> np.ndarray:
    """The one place results leave the model's device (tests on torch's ``meta`` device, which
    holds no data, replace it)."""
    out: np.ndarray = tensor.cpu().numpy()
    return out


def _classes(model: Any) -> int:
    """Output channels of a segmentation model (two, peak and background, unless it says)."""
    return int(getattr(model, "config", {}).get("num_classes", 2))


def _check_output(out: Any, batch: Any, model: Any, spec: Any) -> None:
    """The model's output for a ``(B, 1, H, W)`` batch must be ``(B, C, H, W)``; otherwise a
    PeakNetError naming the model and the hook contract.  Why: a smaller output was a torch
    shape traceback from the stitching below, a larger one was cropped without a word.  A
    plugin's model is probed at creation (``model.zoo.check_contract``); this is the check of
    every other (a module handed over as it is) and of every batch, for free."""
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) == 4 and shape[0] == batch.shape[0] and shape[2:] == tuple(batch.shape[2:]):
        return
    family = getattr(model, "config", {}).get("family")
    raise PeakNetError(f"model {_describe(spec)}{f' (family {family!r})' if family else ''}: "
                       f"returned {shape or type(out).__name__} for a {tuple(batch.shape)} "
                       "batch; the finding engine needs an output of the input's height and "
                       "width: a network that downsamples sets pad_multiple (the engine pads "
                       "input sides to a multiple of it) or pads and crops inside forward (see "
                       "the hookspec peaknet_model_families)")


def _masked_logits(classes: int) -> np.ndarray:
    """The logits of a masked pixel, as the model gives them (``model.peaknet``)."""
    from peaknet_xtal.model.peaknet import masked_logits

    return np.array(masked_logits(classes), np.float32)


def _padded(height: int, width: int, multiple: int) -> tuple[int, int]:
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def _stack_tiles(batch: list[Tile], images: list[Any], valid: list[Any],
                 shape: tuple[int, int]) -> tuple[Any, Any]:
    """(B, 1, H, W) image and mask tensors on the panels' device; padding is zero and masked
    out, as are bad pixels."""
    import torch

    first = images[batch[0].panel]
    x = torch.zeros((len(batch), 1, *shape), dtype=first.dtype, device=first.device)
    m = torch.zeros((len(batch), 1, *shape), dtype=torch.bool, device=first.device)
    for k, tile in enumerate(batch):
        window = (slice(tile.y0, tile.y0 + tile.height), slice(tile.x0, tile.x0 + tile.width))
        good = valid[tile.panel][window]
        x[k, 0, :tile.height, :tile.width] = torch.where(good, images[tile.panel][window], 0)
        m[k, 0, :tile.height, :tile.width] = good
    return x, m


#: How far (pixels) from a dropped peak's position its marked pixels are looked for.
DROPPED_REACH = 8


def _without_dropped(pixels: list[np.ndarray], dropped: np.ndarray) -> list[np.ndarray]:
    """Per-panel peak-pixel maps less the connected pixels of the ``dropped`` peaks: for each,
    the marked component nearest its position.  Why nearest, not the one under it: a peak's
    position is the centroid of its footprint, the marked pixels and their rim, so a hot pixel
    beside the one marked pixel puts the centroid on the rim, where no component is; that peak's
    marked pixel stayed in the DIALS foreground, which grows it by one over the hot pixel: a
    dropped defect came back as a strong spot (real CSPAD stills)."""
    from scipy.ndimage import label

    places: dict[int, list[tuple[float, float]]] = {}
    for peak in dropped:
        places.setdefault(int(peak["panel"]), []).append((float(peak["ss"]), float(peak["fs"])))
    out = list(pixels)
    for panel, where in places.items():  # one labelling per panel, however many peaks go
        labels, _ = label(out[panel], structure=np.ones((3, 3), bool))
        gone = {_nearest_label(labels, ss, fs) for ss, fs in where} - {0}
        if gone:
            out[panel] = out[panel] & ~np.isin(labels, list(gone))
    return out


def _nearest_label(labels: np.ndarray, ss: float, fs: float) -> int:
    """The label of the labelled pixel nearest ``(ss, fs)`` within :data:`DROPPED_REACH`
    pixels (0 if none)."""
    height, width = labels.shape
    y, x = int(round(ss)), int(round(fs))
    y0, y1 = max(y - DROPPED_REACH, 0), min(y + DROPPED_REACH + 1, height)
    x0, x1 = max(x - DROPPED_REACH, 0), min(x + DROPPED_REACH + 1, width)
    if y0 >= y1 or x0 >= x1:
        return 0
    window = labels[y0:y1, x0:x1]
    rows, cols = np.nonzero(window)
    if len(rows) == 0:
        return 0
    nearest = np.argmin((rows + y0 - ss) ** 2 + (cols + x0 - fs) ** 2)
    return int(window[rows[nearest], cols[nearest]])


def _shape2(panel: np.ndarray) -> tuple[int, int]:
    """A panel's (height, width); panels are 2-D by the time they are tiled."""
    height, width = panel.shape
    return int(height), int(width)


def _where(frame: Frame) -> str:
    """A frame's name in warnings: its file and event."""
    return f"{frame.source or 'frame'} {frame.event or ''}".strip()


def _replace(params: PeakParams, overrides: dict[str, Any]) -> PeakParams:
    from dataclasses import replace

    return replace(params, **overrides) if overrides else params


def _is_module(obj: Any) -> bool:
    return hasattr(obj, "state_dict") and callable(obj)


def _describe(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    return getattr(obj, "__qualname__", None) or type(obj).__name__
