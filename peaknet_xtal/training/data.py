"""Training samples: fixed-size crops from label files or the simulator, with augmentation.

Every sample is a pure function of ``(seed, sample_id)``: sample ``i`` of a run is always the same
crop with the same augmentation, whichever process or data-loader worker makes it.  That is what
makes resumed runs bit-identical to uninterrupted ones and lets data-parallel ranks split a global
batch without coordinating random state.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.config import ConfigError
from peaknet_xtal.errors import FormatError

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]  # image float32, good mask bool, peak label bool


class LabelFileSource:
    """Frames from ``stream2labels`` HDF5 files: ``images``, ``masks`` (good), ``labels`` (peak).

    All three datasets are (N, H, W); files may differ in H, W.  Frames are read lazily.
    """

    def __init__(self, paths: list[str | os.PathLike[str]]) -> None:
        import h5py

        if not paths:
            raise ConfigError(None, "data.paths: give at least one stream2labels HDF5 file "
                                    "(data.source is labels)")
        self.paths = [Path(p) for p in paths]
        self.index: list[tuple[int, int]] = []
        for file_no, path in enumerate(self.paths):
            try:
                with h5py.File(path, "r") as handle:
                    shape = self._check(path, handle)
            except OSError as exc:
                raise FormatError(path, f"cannot open as HDF5: {exc}") from exc
            self.index.extend((file_no, i) for i in range(shape[0]))
        if not self.index:
            raise FormatError(self.paths[0] if self.paths else None, "label files hold no frames")
        self._handles: dict[int, Any] = {}

    @staticmethod
    def _check(path: Path, handle: Any) -> tuple[int, ...]:
        shapes = {}
        for name in ("images", "masks", "labels"):
            if name not in handle:
                raise FormatError(path, "missing dataset", dataset=name)
            if handle[name].ndim != 3:
                raise FormatError(path, f"expected (N, H, W), got shape {handle[name].shape}",
                                  dataset=name)
            shapes[name] = handle[name].shape
        if len(set(shapes.values())) != 1:
            raise FormatError(path, f"images/masks/labels shapes differ: {shapes}",
                              dataset="labels")
        return shapes["images"]

    def __len__(self) -> int:
        return len(self.index)

    def frame(self, i: int, rng: np.random.Generator) -> Sample:
        import h5py

        file_no, row = self.index[i % len(self.index)]
        if file_no not in self._handles:  # opened per process (h5py handles do not fork)
            self._handles[file_no] = h5py.File(self.paths[file_no], "r")
        handle = self._handles[file_no]
        arrays = []
        for name in ("images", "masks", "labels"):
            try:
                arrays.append(np.asarray(handle[name][row]))
            except (OSError, ValueError, KeyError) as exc:  # a corrupt chunk, a bad filter
                raise FormatError(self.paths[file_no], f"frame {row} cannot be read "
                                  f"({str(exc).splitlines()[0][:200]}); the file is damaged: "
                                  "remake it or leave it out of data.paths",
                                  dataset=name) from exc
        return (arrays[0].astype(np.float32), arrays[1].astype(bool), arrays[2].astype(bool))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


#: ``data.sim``'s settings (SimulatedSource's options) and their defaults, defined here once:
#: ``trainer.TRAIN_DEFAULTS`` takes them, so the config check knows every key and its type;
#: ``config`` holds SimConfig fields, checked against the dataclass itself.
SIM_OPTIONS: dict[str, Any] = {"geometries": [], "randomise": True, "gain": [1.0, 1.0],
                               "config": {}}


class SimulatedSource:
    """Panels of frames from ``peaknet_xtal.sim.simulate_frame``, made on the fly.

    Options (:data:`SIM_OPTIONS`): ``geometries`` (CrystFEL .geom paths, one drawn per frame),
    ``randomise`` (draw the conditions with ``SimConfig.randomised``), ``gain`` ([lo, hi] ADU per
    photon, log-uniform: CSPAD-like ~25, photon counting 1), and ``config`` (fixed SimConfig
    settings).  One panel is chosen per sample, preferring panels with peaks.  The geometries
    and the fixed settings are read here, so a missing geometry or a setting the simulator
    refuses is an error before training starts, not in the middle of the first batch.
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        unknown = sorted(set(options or {}) - set(SIM_OPTIONS))
        if unknown:
            raise ConfigError(None, f"data.sim: unknown settings {unknown}; known: "
                                    f"{sorted(SIM_OPTIONS)}")
        self.options = {**SIM_OPTIONS, **(options or {})}
        if not self.options["geometries"]:
            raise ConfigError(None, "data.sim.geometries: give at least one CrystFEL geometry "
                                    "file (data.source is sim)")
        from peaknet_xtal.sim import SimConfig

        try:  # the fixed settings alone: names and values the simulator refuses fail here
            SimConfig.from_dict(dict(self.options["config"] or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(None, f"data.sim.config: {exc}") from None
        self._geometries: dict[str, Any] = {}
        for path in self.options["geometries"]:
            self._geometry(str(path))

    def __len__(self) -> int:
        return 1 << 62

    def _geometry(self, path: str) -> Any:
        if path not in self._geometries:
            from peaknet_xtal.formats.geometry import read_geometry

            self._geometries[path] = read_geometry(path)
        return self._geometries[path]

    def frame(self, i: int, rng: np.random.Generator) -> Sample:
        from peaknet_xtal.sim import SimConfig, simulate_frame

        paths = self.options["geometries"]
        geometry = self._geometry(str(paths[int(rng.integers(len(paths)))]))
        fixed = dict(self.options["config"] or {})
        lo, hi = self.options["gain"]
        fixed.setdefault("adu_per_photon", float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        config = (SimConfig.randomised(rng, **fixed) if self.options["randomise"]
                  else SimConfig.from_dict(fixed))
        frame, truth = simulate_frame(geometry, int(rng.integers(1 << 31)), config)
        masks = frame.masks_or_ones()
        counts = np.array([m.sum() for m in truth.peak_masks], dtype=float)
        weights = (counts + 1.0) ** 0.5
        p = int(rng.choice(len(counts), p=weights / weights.sum()))
        return (np.asarray(frame.panels[p], dtype=np.float32), np.asarray(masks[p], bool),
                np.asarray(truth.peak_masks[p], bool))

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "_geometries": {}}


def crop_or_pad(image: np.ndarray, mask: np.ndarray, label: np.ndarray, size: int,
                rng: np.random.Generator, peak_bias: float = 0.8) -> Sample:
    """A ``size`` x ``size`` window; padding is marked invalid.  With probability ``peak_bias``
    the window is centred near a random peak pixel (peaks are ~0.1 % of pixels)."""
    h, w = image.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)))
        mask = np.pad(mask, ((0, ph), (0, pw)))
        label = np.pad(label, ((0, ph), (0, pw)))
        h, w = image.shape
    peaks = np.flatnonzero(label & mask)
    if peaks.size and rng.random() < peak_bias:
        cy, cx = np.unravel_index(peaks[rng.integers(peaks.size)], label.shape)
        y0 = int(np.clip(cy - rng.integers(size // 4, 3 * size // 4 + 1), 0, h - size))
        x0 = int(np.clip(cx - rng.integers(size // 4, 3 * size // 4 + 1), 0, w - size))
    else:
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    window = (slice(y0, y0 + size), slice(x0, x0 + size))
    return image[window].copy(), mask[window].copy(), label[window].copy()


@dataclass
class Augment:
    """Augmentations that keep the physics: the label follows every geometric change.

    Geometry: flips and 90-degree rotations (panel orientation is arbitrary across detectors).
    Intensity: gain (log-uniform) and offset (pedestal drift, in background sigmas), extra Gaussian
    read noise.  Artifacts: dead pixels and dead rows/columns filled with garbage and masked, so the
    model learns that masked values mean nothing.

    Detector realism (what pedestal-subtracted integrating detectors such as the CSPAD show and a
    photon-counting simulation lacks; all amplitudes in background sigmas, each applied to a random
    fraction of crops): per-pixel gain spread, row/column banding (common-mode residuals),
    spatially correlated noise (blobs one to a few pixels wide that are *not* Bragg peaks), bright
    rows/columns, and bright crop borders like the edge pixels of an ASIC.  The label never changes:
    these are exactly the look-alikes a finder must learn to ignore.

    Real backgrounds (``sim.artifacts``, each with its own probability per crop): a smooth
    background up to ``strong_background_max`` sigmas high with a large gradient, an arc or a
    shadow edge, and the correlated shot noise it brings (a spot 10 % above 3,000 ADU must still
    be found); cosmic-ray zingers; liquid-jet streaks; saturation (spots clipped flat, still
    peaks).  Unmasked hot pixels (``hot_pixel_prob``): a few lone pixels far from any labelled
    peak, raised by 5-200 sigmas, constant or flickering (a random fraction of their level); they
    stay background.  On binned detectors a real spot can be one pixel, so the model cannot be
    taught to reject every lone bright pixel: the amplitudes overlap the spots', and recurring
    pixels remain the run-level defect filter's job (``finding.defects``); what this teaches is
    that a lone spike with no profile on a noisy background is not enough by itself.

    Correlated-noise blobs as hard negatives (``noise_blob_prob``, off by default): on that
    fraction of crops, ``sim.artifacts.noise_blobs`` adds Gaussian noise blurred by a point spread
    drawn from ``noise_blob_psf`` (px), its tallest blob ``noise_blob_peak`` background sigmas high
    (the height of the weak spots the model must still find), faded out near labelled pixels; the
    label stays as it was.  Why: on strong smooth backgrounds with correlated noise the locally
    normalised input shows spot-sized blobs, and a model that learnt weak spots only in white
    noise calls them (examples/train_default_model.py).

    Drowned spots lose their label (``strong_background_label_snr``, off at 0, the default; no
    random draws either way): where the strong background is added, labelled peaks whose expected
    background-subtracted sum is below that many stds of its noise (the crop's own plus the added
    correlated noise, ``sim.artifacts.drowned_peaks``) are cleared from the label.  Why: a spot
    the added noise has drowned looks like a noise blob, and a kept label teaches the model to
    call such blobs.
    """

    flips: bool = True
    gain: tuple[float, float] = (0.2, 5.0)
    offset_sigma: float = 2.0
    noise: float = 0.5
    dead_pixel_fraction: float = 2e-3
    dead_line_prob: float = 0.3
    gain_spread: float = 0.0
    banding: float = 0.0
    correlated_noise: float = 0.0
    bright_line_prob: float = 0.0
    bright_edge_prob: float = 0.0
    strong_background_prob: float = 0.0
    strong_background_max: float = 100.0
    zinger_prob: float = 0.0
    jet_streak_prob: float = 0.0
    saturation_prob: float = 0.0
    hot_pixel_prob: float = 0.0
    noise_blob_prob: float = 0.0
    noise_blob_psf: tuple[float, float] = (0.5, 1.0)
    noise_blob_peak: tuple[float, float] = (4.0, 10.0)
    strong_background_label_snr: float = 0.0
    enabled: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, image: np.ndarray, mask: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> Sample:
        if not self.enabled:
            return image, mask, label & mask
        if self.flips:
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            arrays = [np.rot90(a, k) for a in (image, mask, label)]
            if flip:
                arrays = [a[:, ::-1] for a in arrays]
            image, mask, label = (np.ascontiguousarray(a) for a in arrays)
        image = image * np.exp(rng.uniform(np.log(self.gain[0]), np.log(self.gain[1])))
        sigma = _background_sigma(image[mask])
        image = image + rng.normal(0.0, self.offset_sigma) * sigma
        if self.noise > 0:
            image = image + rng.normal(0.0, rng.uniform(0, self.noise) * sigma + 1e-6,
                                       image.shape)
        image = self._detector_artifacts(image, sigma, rng)
        image, label = self._real_backgrounds(image, label, sigma, rng)
        if rng.random() < self.hot_pixel_prob:
            image = _add_hot_pixels(np.array(image, dtype=np.float64), label, sigma, rng)
        mask = mask.copy()
        dead = rng.random(image.shape) < rng.uniform(0, self.dead_pixel_fraction)
        if rng.random() < self.dead_line_prob:
            axis, pos = int(rng.integers(2)), int(rng.integers(image.shape[0]))
            width = int(rng.integers(1, 4))
            if axis == 0:
                dead[pos:pos + width, :] = True
            else:
                dead[:, pos:pos + width] = True
        image = image.astype(np.float32)
        image[dead] = rng.choice([0.0, -1e4, 1e6])
        mask &= ~dead
        # last, and drawn only when enabled, so every config without it gives the same crops
        if self.noise_blob_prob > 0 and rng.random() < self.noise_blob_prob:
            from peaknet_xtal.sim import artifacts

            psf, peak = self.noise_blob_psf, self.noise_blob_peak
            blobs = artifacts.noise_blobs(rng, label & mask, sigma,
                                          (float(psf[0]), float(psf[1])),
                                          (float(peak[0]), float(peak[1])))
            image = (image + blobs * mask).astype(np.float32)
        return image, mask, label & mask


    def _detector_artifacts(self, image: np.ndarray, sigma: float,
                            rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape
        if self.gain_spread > 0 and rng.random() < 0.5:
            median = float(np.median(image))
            spread = rng.uniform(0, self.gain_spread)
            image = median + (image - median) * rng.normal(1.0, spread, image.shape)
        if self.banding > 0 and rng.random() < 0.5:
            amplitude = rng.uniform(0, self.banding) * sigma
            if rng.random() < 0.5:
                image = image + rng.normal(0.0, amplitude, (h, 1))
            if rng.random() < 0.5:
                image = image + rng.normal(0.0, amplitude, (1, w))
        if self.correlated_noise > 0 and rng.random() < 0.5:
            from scipy.ndimage import gaussian_filter

            blobs = gaussian_filter(rng.normal(0.0, 1.0, image.shape), rng.uniform(0.6, 3.0))
            blobs /= max(float(blobs.std()), 1e-9)
            image = image + blobs * rng.uniform(0, self.correlated_noise) * sigma
        if rng.random() < self.bright_line_prob:
            axis, pos = int(rng.integers(2)), int(rng.integers(min(h, w)))
            boost = rng.uniform(2, 10) * sigma
            if axis == 0:
                image[pos, :] = image[pos, :] + boost
            else:
                image[:, pos] = image[:, pos] + boost
        if rng.random() < self.bright_edge_prob:
            width = int(rng.integers(1, 3))
            side = int(rng.integers(4))
            edge = [np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]][side]
            image[edge] = image[edge] * rng.uniform(1.0, 3.0) + rng.uniform(1, 8) * sigma
        return image


    def _real_backgrounds(self, image: np.ndarray, label: np.ndarray, sigma: float,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from peaknet_xtal.sim import artifacts

        if rng.random() < self.strong_background_prob:
            before = image
            image, noise_scale, psf = artifacts.strong_background_parts(
                image, sigma, rng, self.strong_background_max)
            # no random draws: configs without it give the same crops
            if self.strong_background_label_snr > 0:
                label = label & ~artifacts.drowned_peaks(before, label, sigma, noise_scale, psf,
                                                         self.strong_background_label_snr)
        if rng.random() < self.jet_streak_prob:
            image = np.array(image, dtype=np.float64)
            artifacts.add_jet_streak(image, sigma, rng)
        if rng.random() < self.zinger_prob:
            image = np.array(image, dtype=np.float64)
            for _ in range(int(rng.integers(1, 4))):
                artifacts.add_zinger(image, sigma, rng)
        if rng.random() < self.saturation_prob:
            image = artifacts.saturate(image, rng)
        return image, label


def _add_hot_pixels(image: np.ndarray, label: np.ndarray, sigma: float,
                    rng: np.random.Generator) -> np.ndarray:
    """1-6 unmasked hot pixels at least 3 px from any labelled peak pixel: constant (5-200
    sigmas) or flickering (a random fraction of that, as a pixel that is hot in some frames)."""
    from scipy.ndimage import binary_dilation

    near = binary_dilation(label.astype(bool), iterations=3) if label.any() else label.astype(bool)
    ys, xs = np.nonzero(~near)
    if len(ys) == 0:
        return image
    pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(1, 7))), replace=False)
    level = np.exp(rng.uniform(np.log(5.0), np.log(200.0), len(pick))) * sigma
    flicker = rng.random(len(pick)) < 0.5
    level[flicker] *= rng.uniform(0.0, 1.0, int(flicker.sum()))
    image[ys[pick], xs[pick]] += level
    return image


def _background_sigma(values: np.ndarray) -> float:
    """Background noise of a panel (peaks and hot pixels clipped): the package's one estimator,
    :func:`peaknet_xtal.finding.peaks.robust_background`."""
    from peaknet_xtal.finding.peaks import robust_background

    if values.size < 10:
        return 1.0
    return max(robust_background(values)[1], 1e-3)


class CropDataset:
    """Map-style dataset: ``dataset[sample_id]`` -> dict of tensors for one crop."""

    def __init__(self, source: Any, size: int, seed: int, augment: Augment | None = None,
                 peak_bias: float = 0.8, shuffle: bool = True) -> None:
        self.source, self.size, self.seed = source, size, seed
        self.augment = augment or Augment()
        self.peak_bias, self.shuffle = peak_bias, shuffle

    def frame_index(self, sample_id: int) -> int:
        """Each epoch visits every frame once, in an order fixed by (seed, epoch)."""
        n = len(self.source)
        if n >= 1 << 62 or not self.shuffle:
            return sample_id % n
        epoch, pos = divmod(sample_id, n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(n)[pos])

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        import torch

        rng = np.random.default_rng([self.seed, int(sample_id)])
        image, mask, label = self.source.frame(self.frame_index(int(sample_id)), rng)
        image, mask, label = crop_or_pad(image, mask, label, self.size, rng, self.peak_bias)
        image, mask, label = self.augment(image, mask, label, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, np.float32))[None],
                "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
                "label": torch.from_numpy(np.ascontiguousarray(label)).long()}


class StepSampler:
    """Sample ids for one rank from ``start_step``: global batch of step s, micro-batch j is
    ids ``[(s*accum + j) * world * b, ... + world * b)``, rank r takes its slice of b."""

    def __init__(self, start_step: int, total_steps: int, accum: int, world: int, rank: int,
                 batch: int) -> None:
        self.start, self.total = start_step, total_steps
        self.accum, self.world, self.rank, self.batch = accum, world, rank, batch

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.total):
            for micro in range(self.accum):
                base = ((step * self.accum + micro) * self.world + self.rank) * self.batch
                yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return max(self.total - self.start, 0) * self.accum * self.batch


#: The values of ``data.source`` (make_source's branches; the config check lists them).
DATA_SOURCES = ("sim", "labels")


def make_source(data: dict[str, Any]) -> Any:
    """``data.source``: ``labels`` (``data.paths``: stream2labels HDF5) or ``sim``."""
    kind = data.get("source", "sim")
    if kind == "labels":
        return LabelFileSource(data.get("paths") or [])
    if kind == "sim":
        return SimulatedSource(data.get("sim") or {})
    raise ConfigError(None, f"data.source: must be one of {', '.join(DATA_SOURCES)} "
                            f"(got {kind!r})")
