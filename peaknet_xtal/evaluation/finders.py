"""Peak finders behind one interface: ``finder.find(frame) -> PEAK_DTYPE table``.

Every finder here returns peaks in the package convention (panel-relative, 0-based pixel centres),
so one matcher scores them all.  The classic finders are real implementations, not imitations:

- ``peakfinder8``: the Cheetah/OM C++ implementation shipped by the ``cfelpyutils`` package, run on
  the raw slab with a radius map from the CrystFEL geometry, as OM and CrystFEL do;
- ``dispersion``: DIALS' own ``DispersionExtendedThreshold`` (the C++ threshold behind
  ``dials.find_spots``' default) per panel; its strong-pixel mask is turned into peaks by the same
  extractor that measures PeakNet's, so differences come from the thresholding alone.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from peaknet_xtal.errors import require_dials
from peaknet_xtal.finding.peaks import PeakParams, find_peaks
from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.formats.cxi import DEFAULT_MAX_PEAKS
from peaknet_xtal.types import Frame, empty_peaks, peaks_from_columns


class Finder(Protocol):
    """What the evaluation needs from a finder."""

    name: str
    params: dict[str, Any]

    def find(self, frame: Frame) -> np.ndarray: ...


@dataclass
class PeakNetFinder:
    """A registered PeakNet model (``model`` is a name or a weights path)."""

    params: dict[str, Any] = field(default_factory=dict)
    name: str = "peaknet"

    def __post_init__(self) -> None:
        from peaknet_xtal.finding.engine import InferenceEngine
        from peaknet_xtal.finding.peaks import PeakParams

        # every peak setting the engine uses, so that a report's params say what ran
        p: dict[str, Any] = {"model": DEFAULTS.model, "threshold": DEFAULTS.threshold,
                             "min_snr": DEFAULTS.min_snr, "min_height": DEFAULTS.min_height,
                             "rescue_prob": DEFAULTS.rescue_prob,
                             "rescue_height": DEFAULTS.rescue_height,
                             "faint_height": DEFAULTS.faint_height,
                             "faint_support": DEFAULTS.faint_support,
                             "faint_snr": DEFAULTS.faint_snr,
                             "device": DEFAULTS.device,
                             "batch_size": DEFAULTS.batch_size,
                             # None: settings.resolve_gain (what the data declare)
                             "adu_per_photon": None}
        unknown = set(self.params) - set(p)
        if unknown:
            raise ValueError(f"unknown PeakNet finder settings {sorted(unknown)}; known: "
                             f"{sorted(p)}")
        p.update(self.params)
        self.params = p
        self.name = f"peaknet:{p['model']}" if self.name == "peaknet" else self.name
        peak_params = PeakParams(faint_height=p["faint_height"], faint_snr=p["faint_snr"])
        self.engine = InferenceEngine(p["model"], device=p["device"], threshold=p["threshold"],
                                      min_snr=p["min_snr"], min_height=p["min_height"],
                                      rescue_prob=p["rescue_prob"],
                                      rescue_height=p["rescue_height"],
                                      faint_support=p["faint_support"],
                                      batch_size=p["batch_size"],
                                      adu_per_photon=p["adu_per_photon"],
                                      peak_params=peak_params)

    def find(self, frame: Frame) -> np.ndarray:
        return next(iter(self.engine.find_frames([frame]))).peaks

    def find_run(self, frames: Iterable[Frame]) -> Iterator[np.ndarray]:
        """Peak tables of a run's frames, in order, as ``peaknet2cxi`` finds them in a file: one
        engine over the whole run (batched across frames; the defect filter reads the run's
        first frames ahead).  :meth:`find` instead sees one frame a call, as the DIALS plugin
        does."""
        for result in self.engine.find_frames(frames):
            yield result.peaks

    def activation_maps(self, frame: Frame, panels: Sequence[int] | None = None
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(non-peak, peak) logits of the given panels (default all): what the model sees
        before the threshold, tiled and batched as the finding engine runs it."""
        masks = frame.masks_or_ones()
        chosen = list(range(len(frame.panels)) if panels is None else panels)
        logits = self.engine.predict_logits([frame.panels[i] for i in chosen],
                                            [masks[i] for i in chosen])
        return [lg[0] for lg in logits], [lg[1] for lg in logits]


@dataclass
class DispersionFinder:
    """DIALS' dispersion_extended threshold (``dials.find_spots`` default), per panel."""

    params: dict[str, Any] = field(default_factory=dict)
    name: str = "dispersion"

    DEFAULTS = {"gain": 1.0, "sigma_background": 6.0, "sigma_strong": 3.0, "kernel_size": 3,
                "global_threshold": 0.0, "min_count": 2, "min_spot_size": 2,
                "max_spot_size": 1000}

    def __post_init__(self) -> None:
        self.params = {**self.DEFAULTS, **self.params}
        self._algorithms: dict[tuple[int, int], Any] = {}

    def strong_pixels(self, image: np.ndarray, good: np.ndarray) -> np.ndarray:
        # imported at the first frame (check_finder, before any finder runs, imports them in
        # a child): a DIALS that fails here all the same says so in one line
        require_dials("the dispersion finder (DIALS' own)", "dials.array_family.flex")
        from dials.algorithms.image import threshold
        from dials.array_family import flex

        p = self.params
        shape = (int(image.shape[0]), int(image.shape[1]))
        if shape not in self._algorithms:
            k = int(p["kernel_size"])
            self._algorithms[shape] = threshold.DispersionExtendedThreshold(
                flex.grid(shape[0], shape[1]).all(), (k, k), float(p["sigma_background"]),
                float(p["sigma_strong"]), float(p["global_threshold"]), int(p["min_count"]))
        data = flex.double(np.ascontiguousarray(image, dtype=np.float64))
        mask = flex.bool(np.ascontiguousarray(good, dtype=bool))
        gain = flex.double(flex.grid(shape[0], shape[1]), float(p["gain"]))
        result = flex.bool(flex.grid(shape[0], shape[1]))
        self._algorithms[shape](data, mask, gain, result)
        return result.as_numpy_array().astype(bool) & good

    def find(self, frame: Frame) -> np.ndarray:
        masks = frame.masks_or_ones()
        strong = [self.strong_pixels(np.asarray(img, np.float64), m)
                  for img, m in zip(frame.panels, masks, strict=False)]
        # DIALS' own criteria decide which pixels are strong: no SNR or height cut or
        # bright-background test of ours on top.
        params = PeakParams(threshold=0.5, min_snr=0.0, min_height=0.0, bright_photons=None,
                            min_pixels=int(self.params["min_spot_size"]),
                            max_pixels=int(self.params["max_spot_size"]))
        peaks = find_peaks(frame.panels, [s.astype(np.float32) for s in strong], masks, params,
                           geometry=frame.geometry, wavelength_A=frame.meta.get("wavelength_A"))
        assert isinstance(peaks, np.ndarray)  # the table alone: no label maps were asked for
        return peaks

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "name": self.name, "_algorithms": {}}


@dataclass
class Peakfinder8Finder:
    """peakfinder8 (Cheetah/OM) on the raw slab, radial statistics pooled over all panels."""

    params: dict[str, Any] = field(default_factory=dict)
    name: str = "peakfinder8"

    DEFAULTS = {"adc_threshold": 800.0, "min_snr": 5.0, "min_pixel_count": 2,
                "max_pixel_count": 200, "local_bg_radius": 3, "max_num_peaks": DEFAULT_MAX_PEAKS}

    def __post_init__(self) -> None:
        self.params = {**self.DEFAULTS, **self.params}
        self._radius: dict[int, np.ndarray] = {}

    def find(self, frame: Frame) -> np.ndarray:
        from cfelpyutils.peakfinding.lib.peakfinder8_extension import peakfinder_8

        geometry = frame.geometry
        if geometry is None:
            raise ValueError(f"{frame.source}: peakfinder8 needs a detector geometry")
        slab = geometry.assemble_slab(frame.panels, fill=0).astype(np.float32)
        good = geometry.assemble_slab([m.astype(np.float32) for m in frame.masks_or_ones()],
                                      fill=0)
        radius = self._radius_map(geometry)
        p = self.params
        fs, ss, intensity, _, npix, max_value, sigma, snr = peakfinder_8(
            int(p["max_num_peaks"]), slab, (good > 0).astype(np.int8), radius,
            slab.shape[1], slab.shape[0], 1, 1, float(p["adc_threshold"]), float(p["min_snr"]),
            int(p["min_pixel_count"]), int(p["max_pixel_count"]), int(p["local_bg_radius"]))
        if not len(fs):
            return empty_peaks()
        # peakfinder8 reports array indices (pixel centre = integer), the package convention.
        panel, pfs, pss = geometry.raw_to_panel(np.asarray(fs), np.asarray(ss))
        keep = np.asarray(panel) >= 0
        table = peaks_from_columns(
            panel=np.asarray(panel)[keep], fs=np.asarray(pfs)[keep],
            ss=np.asarray(pss)[keep], intensity=np.asarray(intensity)[keep],
            max_value=np.asarray(max_value)[keep], npix=np.asarray(npix)[keep],
            background_sigma=np.asarray(sigma)[keep], snr=np.asarray(snr)[keep])
        if len(table):
            from peaknet_xtal.finding.peaks import frame_clen_m, one_over_d

            # the frame's own wavelength and camera length, as the finding engine uses them
            table["one_over_d"] = one_over_d(geometry, table, frame.meta.get("wavelength_A"),
                                             clen_m=frame_clen_m(frame))
        return table

    def _radius_map(self, geometry: Any) -> np.ndarray:
        key = id(geometry)
        if key not in self._radius:
            maps = []
            for i, panel in enumerate(geometry.panels):
                ss, fs = np.mgrid[0:panel.height, 0:panel.width].astype(np.float64)
                # The in-plane radius does not depend on the camera length: any value will do.
                x, y, _ = geometry.panel_to_lab(np.full(fs.shape, i), fs, ss, clen_m=0.1)
                maps.append((np.hypot(x, y) * panel.res).astype(np.float32))
            self._radius[key] = geometry.assemble_slab(maps, fill=0).astype(np.float32)
        return self._radius[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "name": self.name, "_radius": {}}


FINDERS: dict[str, Callable[..., Any]] = {
    "peaknet": PeakNetFinder,
    "peakfinder8": Peakfinder8Finder,
    "dispersion": DispersionFinder,
}


def list_finders() -> list[str]:
    return sorted(FINDERS)


def check_finder(spec: str) -> None:
    """Raise KeyError unless ``spec`` names a finder, a FormatError naming the file where
    its model's weights are missing or not a model, and a DialsUnavailable where it is DIALS'
    and DIALS is not there or fails to load (imported in a child process, once a process): cheap
    (no network is built), so a command can refuse a typo before it tunes or runs the finders
    named before it."""
    kind, _, model = spec.partition(":")
    if kind not in FINDERS:
        raise KeyError(f"unknown finder {spec!r}; known: {list_finders()} (peaknet:MODEL)")
    if model and kind != "peaknet":
        raise KeyError(f"only peaknet takes a model suffix, got {spec!r}")
    if kind == "dispersion":  # imported in a child: DIALS' flex, imported here before
        # PeakNet runs, would hold it to one thread (errors.require_dials)
        require_dials("the dispersion finder (DIALS' own)", "dials.algorithms.image.threshold",
                      "dials.array_family.flex",
                      otherwise="give --finders without dispersion (the default includes it)",
                      load=False, before_writing=True)
    if model:
        from peaknet_xtal.model.weights_io import check_model

        check_model(model)


def create_finder(spec: str, params: Mapping[str, Any] | None = None) -> Any:
    """``"peakfinder8"``, ``"dispersion"``, ``"peaknet"`` or ``"peaknet:MODEL"`` (name or path)."""
    check_finder(spec)
    kind, _, model = spec.partition(":")
    params = dict(params or {})
    if model:
        params["model"] = model
    return FINDERS[kind](params=params)
