"""Knowledge distillation: teacher logits cached to HDF5 once, then a student trained on them.

The teacher (e.g. the 673M preset) is far too costly to run at every student step, so it runs once
per frame over the training frames and its logits are stored as float16 (ample for a loss target)
in ``<cache>`` with datasets ``images``, ``masks``, ``logits``.  The student then sees crops with
the same flips/rotations applied to image, mask and logits, and the paper's loss
(``losses.distillation_loss``).
"""
from __future__ import annotations

import functools
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


def cache_teacher_logits(teacher: str, label_files: list[str], cache: Path,
                         threads: int = 2) -> Path:
    """Run ``teacher`` once over every frame of ``label_files``; skip if ``cache`` is complete."""
    import h5py
    import torch

    from peaknet_xtal.model import load_model
    from peaknet_xtal.training.data import LabelFileSource

    source = LabelFileSource(label_files)
    if cache.exists():
        with h5py.File(cache, "r") as handle:
            if handle.attrs.get("teacher") == str(teacher) and len(handle["logits"]) == len(source):
                return cache
    torch.set_num_threads(threads)
    model = load_model(teacher)
    rng = np.random.default_rng(0)
    first = source.frame(0, rng)[0]
    n, (h, w) = len(source), first.shape
    with atomic_path(cache) as tmp, h5py.File(tmp, "w") as out:
        out.attrs["teacher"] = str(teacher)
        images = out.create_dataset("images", (n, h, w), np.float32, chunks=(1, h, w))
        masks = out.create_dataset("masks", (n, h, w), bool, chunks=(1, h, w))
        logits = out.create_dataset("logits", (n, 2, h, w), np.float16, chunks=(1, 2, h, w))
        with Progress(n, "frames", desc="teacher logits") as bar, torch.no_grad():
            for i in range(n):
                image, mask, _ = source.frame(i, rng)
                if image.shape != (h, w):
                    raise FormatError(label_files[source.index[i][0]],
                                      f"frame {i} is {image.shape}, expected {(h, w)}",
                                      dataset="images")
                x, m = torch.from_numpy(image)[None, None], torch.from_numpy(mask)[None, None]
                images[i], masks[i] = image, mask
                logits[i] = model(x, m)[0].numpy().astype(np.float16)
                bar.update(1)
    return cache


class DistillDataset:
    """Crops of cached frames with their teacher logits, same geometry augmentation on all."""

    def __init__(self, cache: Path, size: int, seed: int) -> None:
        self.cache, self.size, self.seed = Path(cache), size, seed
        import h5py

        with h5py.File(self.cache, "r") as handle:
            self.n = len(handle["logits"])
        self._handle: Any = None

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
        teacher = self._handle["logits"][i].astype(np.float32)
        h, w = image.shape
        y0 = int(rng.integers(max(h - self.size, 0) + 1))
        x0 = int(rng.integers(max(w - self.size, 0) + 1))
        window = (slice(y0, y0 + self.size), slice(x0, x0 + self.size))
        k, flip = int(rng.integers(4)), bool(rng.integers(2))

        def geo(a: np.ndarray) -> np.ndarray:
            a = np.rot90(a, k, axes=(-2, -1))
            return np.ascontiguousarray(a[..., ::-1] if flip else a)

        image, mask = geo(image[window]), geo(mask[window])
        teacher = geo(teacher[(slice(None),) + window])
        return {"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)[None],
                "teacher": torch.from_numpy(teacher)}


def distill_batch_loss(logits: Any, batch: dict[str, Any], temperature: float,
                       weights: tuple[float, float, float]) -> tuple[Any, Any]:
    from peaknet_xtal.training.losses import distillation_loss

    valid = batch["mask"][:, 0]
    return (distillation_loss(logits, batch["teacher"], valid, temperature, weights,
                              reduction="sum"), valid.sum())


def distill(config: dict[str, Any]) -> Path:
    """Cache teacher logits (once), then train the student; returns the student model path."""
    config = deep_merge(DISTILL_DEFAULTS, config)
    if not config.get("teacher"):
        raise ValueError("distillation needs 'teacher' (a model name, file or directory)")
    cache = Path(config.get("cache") or Path(config["out"]) / "teacher_logits.h5")
    cache_teacher_logits(config["teacher"], list(config["data"]["paths"]), cache,
                         int(config["threads"]))
    loss = functools.partial(distill_batch_loss,
                             temperature=float(config["loss"]["temperature"]),
                             weights=tuple(config["loss"]["weights"]))
    dataset = DistillDataset(cache, int(config["data"]["crop"]), int(config["seed"]))
    return launch(config, dataset, loss)
