"""Knowledge distillation: teacher logits cached to HDF5 once, then a student trained on them.

The teacher (e.g. the 673M preset) is far too costly to run at every student step, so it runs once
over the training frames and its logits are stored as float16 (ample for a loss target) in
``<cache>`` with datasets ``images``, ``masks``, ``labels``, ``logits`` and ``tiles``.

Teacher and student must see the same input: the model standardises whatever it is given (median
and background spread of that input), so logits of a whole frame are not the teacher's answer for a
crop of it.  The cache therefore holds the frames cut into crop-sized tiles (the last row and column
of tiles aligned to the frame's edge, so every pixel is covered), the teacher runs on each tile
exactly as the student will see it, and the student trains on those tiles with the same
flips/rotations applied to image, mask, ground truth and logits.  The loss is the paper's
(``losses.distillation_loss``); its focal term learns the ground-truth labels of the label files.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.config import deep_merge
from peaknet_xtal.errors import FormatError
from peaknet_xtal.progress import Progress
from peaknet_xtal.training.trainer import TRAIN_DEFAULTS, TRAIN_TYPES, launch

DISTILL_DEFAULTS: dict[str, Any] = deep_merge(TRAIN_DEFAULTS, {
    "teacher": None,        # "default", a .safetensors file or a model directory
    "cache": None,          # default: OUT/teacher_logits.h5
    "data": {"source": "labels"},
    "loss": {"temperature": 2.0, "weights": [0.4, 0.4, 0.2]},
})
DISTILL_TYPES: dict[str, Any] = {**TRAIN_TYPES, "teacher": str | None, "cache": str | None}


#: Layout version of the cache (2: crop-sized tiles with ground-truth labels).
CACHE_VERSION = 2


def tile_origins(length: int, size: int) -> list[int]:
    """Starts of ``size``-long tiles covering ``length``: stride ``size``, the last one flush with
    the end (overlapping its neighbour) so that no pixel is left out; one tile if it is shorter."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, size))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def cache_teacher_logits(teacher: str, label_files: list[str], cache: Path,
                         threads: int = 2, crop: int | None = None) -> Path:
    """Run ``teacher`` once over ``crop``-sized tiles of every frame of ``label_files`` (whole
    frames when ``crop`` is None); skip if ``cache`` is complete for this teacher and crop."""
    import h5py
    import torch

    from peaknet_xtal.model import load_model
    from peaknet_xtal.training.data import LabelFileSource

    paths: list[str | os.PathLike[str]] = list(label_files)
    source = LabelFileSource(paths)
    rng = np.random.default_rng(0)
    first = source.frame(0, rng)[0]
    h, w = first.shape
    th, tw = (h, w) if crop is None else (min(int(crop), h), min(int(crop), w))
    origins = [(y, x) for y in tile_origins(h, th) for x in tile_origins(w, tw)]
    n_tiles = len(source) * len(origins)
    if cache.exists():
        with h5py.File(cache, "r") as handle:
            if (handle.attrs.get("teacher") == str(teacher)
                    and int(handle.attrs.get("version", 1)) == CACHE_VERSION
                    and int(handle.attrs.get("crop", -1)) == int(crop or 0)
                    and "logits" in handle and len(handle["logits"]) == n_tiles):
                return cache
    torch.set_num_threads(threads)
    model = load_model(teacher)
    with atomic_path(cache) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update({"teacher": str(teacher), "version": CACHE_VERSION,
                          "crop": int(crop or 0)})
        images = out.create_dataset("images", (n_tiles, th, tw), np.float32, chunks=(1, th, tw))
        masks = out.create_dataset("masks", (n_tiles, th, tw), bool, chunks=(1, th, tw))
        labels = out.create_dataset("labels", (n_tiles, th, tw), bool, chunks=(1, th, tw))
        logits = out.create_dataset("logits", (n_tiles, 2, th, tw), np.float16,
                                    chunks=(1, 2, th, tw))
        tiles = out.create_dataset("tiles", (n_tiles, 3), np.int64)  # frame, ss0, fs0
        k = 0
        with Progress(len(source), "frames", desc="teacher logits") as bar, torch.no_grad():
            for i in range(len(source)):
                image, mask, label = source.frame(i, rng)
                if image.shape != (h, w):
                    raise FormatError(label_files[source.index[i][0]],
                                      f"frame {i} is {image.shape}, expected {(h, w)}",
                                      dataset="images")
                for y0, x0 in origins:
                    window = (slice(y0, y0 + th), slice(x0, x0 + tw))
                    tile, tmask = np.ascontiguousarray(image[window]), mask[window]
                    x = torch.from_numpy(tile)[None, None]
                    m = torch.from_numpy(np.ascontiguousarray(tmask))[None, None]
                    images[k], masks[k], labels[k] = tile, tmask, label[window]
                    logits[k] = model(x, m)[0].numpy().astype(np.float16)
                    tiles[k] = (i, y0, x0)
                    k += 1
                bar.update(1)
    return cache


class DistillDataset:
    """Cached tiles with their teacher logits and ground truth, same flips/rotations on all.

    The tiles are the student's crops: a cache made for another crop size is refused, since its
    logits answer a different input.
    """

    def __init__(self, cache: Path, size: int, seed: int) -> None:
        self.cache, self.size, self.seed = Path(cache), size, seed
        import h5py

        with h5py.File(self.cache, "r") as handle:
            self.n = len(handle["logits"])
            made_for = int(handle.attrs.get("crop", -1))
            has_tiles = int(handle.attrs.get("version", 1)) >= CACHE_VERSION
        if not has_tiles or made_for != int(size):
            raise FormatError(self.cache, f"teacher logits were cached for crop {made_for}, the "
                              f"student trains on crop {size}: delete the cache to rebuild it")
        self._handle: Any = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        import h5py
        import torch

        if self._handle is None:
            self._handle = h5py.File(self.cache, "r")
        rng = np.random.default_rng([self.seed, int(sample_id)])
        epoch, pos = divmod(int(sample_id), self.n)
        i = int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[pos])
        image, mask = self._handle["images"][i], self._handle["masks"][i]
        label = self._handle["labels"][i]
        teacher = self._handle["logits"][i].astype(np.float32)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))

        def geo(a: np.ndarray) -> np.ndarray:
            a = np.rot90(a, k, axes=(-2, -1))
            return np.ascontiguousarray(a[..., ::-1] if flip else a)

        return {"image": torch.from_numpy(geo(image))[None],
                "mask": torch.from_numpy(geo(mask))[None],
                "label": torch.from_numpy(geo(label)).long(),
                "teacher": torch.from_numpy(geo(teacher))}


def distill_batch_loss(logits: Any, batch: dict[str, Any], temperature: float,
                       weights: tuple[float, float, float]) -> tuple[Any, Any]:
    from peaknet_xtal.training.losses import distillation_loss

    valid = batch["mask"][:, 0]
    return (distillation_loss(logits, batch["teacher"], valid, temperature, weights,
                              reduction="sum", target=batch.get("label")), valid.sum())


def distill(config: dict[str, Any]) -> Path:
    """Cache teacher logits (once), then train the student; returns the student model path."""
    config = deep_merge(DISTILL_DEFAULTS, config)
    if not config.get("teacher"):
        raise ValueError("distillation needs 'teacher' (a model name, file or directory)")
    cache = Path(config.get("cache") or Path(config["out"]) / "teacher_logits.h5")
    crop = int(config["data"]["crop"])
    cache_teacher_logits(config["teacher"], list(config["data"]["paths"]), cache,
                         int(config["threads"]), crop=crop)
    loss = functools.partial(distill_batch_loss,
                             temperature=float(config["loss"]["temperature"]),
                             weights=tuple(config["loss"]["weights"]))
    dataset = DistillDataset(cache, crop, int(config["seed"]))
    return launch(config, dataset, loss)
